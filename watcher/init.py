"""``xray-watcher init DIR``: lay out a working installation from the installed package.

DIR gets ``config.yaml`` (the commented template, relative paths), ``inbox/``,
``processed/``, ``failed/`` and ``model_store/`` seeded with the model bundled in the
package, published like ``train`` does (build folder, ``publish``, ``set_current``) under its
own name (``v0004``: the same name as in the project's store) where the store has none newer.
Nothing that exists is overwritten without ``force``: an existing config is left alone (with
``force``: kept as ``config.yaml.<time>.bak`` and replaced), and a store that already holds
versions is left alone (with ``force``: the bundled model is published beside them, as the
next version where its name is taken, and made current; published versions are never
touched).

The bundled model is ``watcher/bundled_model/<version>/`` in a wheel (setup.py's build hook
copies it from ``model_store/<CURRENT>``); an editable install reads the checkout's
``model_store/`` instead.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from watcher import __version__, model_store
from watcher.errors import ModelStoreError, WatcherError
from watcher.fsutil import atomic_write_text

CONFIG_FILE = "config.yaml"
FOLDERS = ("inbox", "processed", "failed")
STORE_DIR = "model_store"
BUNDLE_DIR = "bundled_model"
PACKAGE_DIR = Path(__file__).resolve().parent


@dataclass
class InitReport:
    """What ``init_installation`` did: paths relative to ``target``, with a note each."""

    target: Path
    model_version: str  # the version CURRENT names in the installation's store
    created: list[str] = field(default_factory=list)
    left_alone: list[str] = field(default_factory=list)

    @property
    def config(self) -> Path:
        """The installation's config file."""
        return self.target / CONFIG_FILE


def template_text() -> str:
    """The commented config template shipped in the package."""
    return resources.files("watcher").joinpath("templates", CONFIG_FILE).read_text(encoding="utf-8")


def bundled_model() -> Path:
    """The model version folder this installation ships.

    A wheel holds exactly one under ``watcher/bundled_model/``; an editable install or a
    source checkout falls back to the checkout's ``model_store/<CURRENT>``.
    """
    bundle = PACKAGE_DIR / BUNDLE_DIR
    if bundle.is_dir():
        found = sorted(p for p in bundle.iterdir() if p.is_dir() and not p.name.startswith("."))
        if len(found) != 1:
            raise ModelStoreError(f"{bundle} must hold exactly one model version, found {len(found)}")
        return found[0]
    checkout = PACKAGE_DIR.parent
    store = checkout / STORE_DIR
    if (checkout / "pyproject.toml").is_file() and (store / model_store.CURRENT_FILE).is_file():
        return store / model_store.current_version(store)
    raise ModelStoreError(
        f"this installation of xray-watcher {__version__} carries no bundled model "
        f"(no {bundle}, and {PACKAGE_DIR} is not in a source checkout with a model_store/)"
    )


def seed_store(store: Path, source: Path) -> str:
    """Publish the version folder ``source`` into ``store`` and make it current; returns its name."""
    build = model_store.new_build_dir(store)
    try:
        for entry in sorted(source.iterdir()):
            if entry.is_file() and not entry.name.startswith("."):
                shutil.copy2(entry, build / entry.name)
        meta_path = build / model_store.METADATA_FILE
        try:
            metadata = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelStoreError(f"bundled model {source}: cannot read metadata.json: {exc}") from exc
        metadata["bundled"] = {"xray_watcher": __version__, "source_version": source.name}

        def stamp(version: str) -> None:
            metadata["version"] = version
            meta_path.write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")

        stamp("unpublished")
        # the bundled version's own name where the store has no newer one, so that a row's
        # model_version names the same weights here as in the project's store and README
        named = re.fullmatch(r"v(\d{4,})", source.name)
        version = model_store.publish(store, build, stamp=stamp, at_least=int(named[1]) if named else 1)
    except BaseException:
        model_store.remove_build(build)
        raise
    model_store.set_current(store, version, reason=f"bundled with xray-watcher {__version__}")
    return version


def init_installation(target: Path, force: bool = False) -> InitReport:
    """Lay out a working installation in ``target``; see the module docstring."""
    target = target.expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise WatcherError(f"{target} exists and is not a folder")
    source = bundled_model()  # before creating anything: no half-made installation without a model
    target.mkdir(parents=True, exist_ok=True)
    report = InitReport(target=target, model_version="")

    config = target / CONFIG_FILE
    if config.exists() and not force:
        report.left_alone.append(f"{CONFIG_FILE} (exists; --force replaces it, keeping a .bak copy)")
    else:
        note = ""
        if config.exists():
            backup = config.with_name(f"{CONFIG_FILE}.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.bak")
            shutil.copy2(config, backup)
            note = f" (replaced; the old one is {backup.name})"
        atomic_write_text(config, template_text())
        report.created.append(f"{CONFIG_FILE}{note}")

    for name in FOLDERS:
        folder = target / name
        if folder.is_dir():
            report.left_alone.append(f"{name}/ (exists)")
        else:
            folder.mkdir()  # a file of that name raises FileExistsError: reported by cli_main
            report.created.append(f"{name}/")

    store = target / STORE_DIR
    store_existed = store.is_dir()
    store.mkdir(exist_ok=True)
    versions = model_store.list_versions(store)
    current = _current_or_empty(store)
    if versions and not force:
        report.model_version = current
        report.left_alone.append(
            f"{STORE_DIR}/ (holds {', '.join(versions)}; CURRENT: {current or 'none'}; "
            "--force adds the bundled model as a new version and makes it current)"
        )
    else:
        previous = f", was {current}" if current else ""
        version = seed_store(store, source)
        report.model_version = version
        what = f"{STORE_DIR}/{version}" if store_existed else f"{STORE_DIR}/ with {version}"
        report.created.append(
            f"{what} (the bundled model {source.name} of xray-watcher {__version__}; CURRENT{previous})"
        )
    return report


def _current_or_empty(store: Path) -> str:
    try:
        return model_store.current_version(store)
    except ModelStoreError:
        return ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``xray-watcher init``."""
    parser.add_argument("dir", type=Path, metavar="DIR", help="installation folder (created if needed)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace an existing config.yaml (kept as .bak) and make the bundled model current "
        "in a store that already holds versions",
    )


def cli_main(args: argparse.Namespace) -> int:
    """Run ``init`` and print what it did and how to start; 0, or 1 with a message."""
    try:
        report = init_installation(args.dir, force=args.force)
    except (WatcherError, OSError) as exc:
        print(f"xray-watcher init: error: {exc}", file=sys.stderr)
        return 1
    print(f"xray-watcher {__version__}: installation in {report.target}")
    for line in report.created:
        print(f"  created     {line}")
    for line in report.left_alone:
        print(f"  left alone  {line}")
    if not report.model_version:
        print(f"  warning     {STORE_DIR}/ has no CURRENT version: promote one with xray-watcher models")
    print("Next:")
    print(f"  xray-watcher check --config {report.config}")
    print(f"  xray-watcher run --config {report.config}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m watcher.init DIR [--force]``, the same as ``xray-watcher init``."""
    from watcher.logs import configure_logging

    parser = argparse.ArgumentParser(
        prog="xray-watcher init", description="Lay out a working installation in DIR."
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging("info", "auto", stream=sys.stderr)
    return cli_main(args)


if __name__ == "__main__":
    raise SystemExit(main())
