"""Build hook: the wheel carries the shipped model, ``model_store/<CURRENT>/``.

Everything else about the package is in pyproject.toml. The model is not committed twice:
``build_py`` copies the version that ``model_store/CURRENT`` names (model, metadata,
metrics, plots) into the build tree as ``watcher/bundled_model/<version>/``, and ``sdist``
puts ``model_store/CURRENT`` and that one version into the source archive, so a wheel built
from the sdist carries it too. An editable install (``pip install -e .``) copies nothing:
``watcher.init`` then reads the checkout's ``model_store/`` directly.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

STORE = Path("model_store")  # setuptools runs this file from the project root
BUNDLE = Path("watcher", "bundled_model")
REQUIRED = ("model.keras", "metadata.json")


def shipped_version() -> Path:
    """The folder of the version model_store/CURRENT names, checked to be complete."""
    pointer = STORE / "CURRENT"
    try:
        version = pointer.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SystemExit(f"cannot bundle the shipped model: {pointer}: {exc.strerror or exc}") from exc
    folder = STORE / version
    if not re.fullmatch(r"v\d{4,}", version) or not folder.is_dir():
        raise SystemExit(f"cannot bundle the shipped model: {pointer} names {version!r}, not a version")
    missing = [name for name in REQUIRED if not (folder / name).is_file()]
    if missing:
        raise SystemExit(f"cannot bundle the shipped model: {folder} lacks {', '.join(missing)}")
    return folder


def copy_version(folder: Path, dest: Path) -> None:
    """Copy a version's files (no hidden or temporary ones) to ``dest``."""
    shutil.copytree(folder, dest, ignore=shutil.ignore_patterns(".*", "*.tmp"))


class BuildPyWithModel(build_py):
    """build_py, plus the shipped model version as package data."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return  # the checkout's model_store/ is used in place
        folder = shipped_version()
        target = Path(self.build_lib) / BUNDLE
        shutil.rmtree(target, ignore_errors=True)  # a build/ left from an earlier CURRENT
        copy_version(folder, target / folder.name)


class SdistWithModel(sdist):
    """sdist, plus model_store/CURRENT and the version it names (not the other versions)."""

    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        folder = shipped_version()
        store = Path(base_dir) / STORE
        store.mkdir(exist_ok=True)
        shutil.copy2(STORE / "CURRENT", store / "CURRENT")
        copy_version(folder, store / folder.name)


setup(cmdclass={"build_py": BuildPyWithModel, "sdist": SdistWithModel})
