"""The package as a user gets it: a wheel built from a clean copy of the repository, installed
in a fresh virtual environment outside it, then ``init`` and ``run --once`` from another folder."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import typing
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import FULLRES
from watcher import __version__, model_store
from watcher.config import Config, load_config
from watcher.init import init_installation, template_text

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = (ROOT / "model_store" / "CURRENT").read_text(encoding="utf-8").strip()
WARNING_WORDS = ("Deprecat", "BuildBackendWarning", "SetuptoolsDeprecationWarning", "SetuptoolsWarning")


def source_copy(dest: Path) -> Path:
    """The repository's files as a clean clone has them (plus new, not yet committed, files)."""
    listing = None
    if (ROOT / ".git").exists() and shutil.which("git"):  # refused for a checkout of another user
        listing = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
        )
    if listing is not None and listing.returncode == 0:
        listed = listing.stdout.split(b"\0")
        for name in filter(None, (n.decode() for n in listed)):
            if (ROOT / name).is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, dest / name)
    else:
        junk = shutil.ignore_patterns(".*", "__pycache__", "*.egg-info", "build", "dist", ".build-*")
        shutil.copytree(ROOT, dest, ignore=junk, dirs_exist_ok=True)
    return dest


def build_wheel(src: Path, out: Path) -> tuple[Path, str]:
    """``python -m build --wheel``; without build isolation when this venv has setuptools>=77."""
    cmd = [sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(src)]
    if int(metadata.version("setuptools").split(".")[0]) >= 77:
        cmd.insert(4, "--no-isolation")  # else an isolated env fetches setuptools>=77 (pyproject.toml)
    proc = subprocess.run(cmd, cwd=src, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert 0 == proc.returncode, output
    (wheel,) = out.glob("*.whl")
    return wheel, output


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The wheel built from a copy of the repository, and what the build printed."""
    base = tmp_path_factory.mktemp("pkg")
    src = source_copy(base / "src")
    return build_wheel(src, base / "dist")


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory, built: tuple[Path, str]) -> Path:
    """A fresh venv outside the repository with the wheel installed; dependencies from this venv."""
    root = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python), "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "--no-deps", "--quiet", str(built[0])], check=True, timeout=300)
    # after the install, so pip never sees this venv's (editable) xray-watcher: .pth lines only
    # extend sys.path, the editable finder's own .pth there is not run
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (Path(site) / "test-deps.pth").write_text("\n".join(ours) + "\n", encoding="utf-8")
    return root


def user_env() -> dict[str, str]:
    """The environment of a user's shell: no PYTHONPATH pointing into the repository."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    return env


def config_keys(cls: Any, prefix: str = "") -> set[str]:
    """Every dotted key of a config dataclass."""
    keys: set[str] = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == "source":
            continue
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            keys |= config_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.add(prefix + f.name)
    return keys


def yaml_keys(raw: dict[str, Any], prefix: str = "") -> set[str]:
    """Every dotted key of a YAML mapping."""
    keys: set[str] = set()
    for k, v in raw.items():
        keys |= yaml_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
    return keys


class TestTemplate:
    def test_names_every_config_key(self) -> None:
        """The config template sets every key Config knows, and nothing else."""
        assert config_keys(Config) == yaml_keys(yaml.safe_load(template_text()))

    def test_every_key_has_a_comment(self) -> None:
        """Each key line of the template carries a comment."""
        lines = [ln for ln in template_text().splitlines() if re.match(r"^\s*\w+:", ln)]
        assert [] == [ln for ln in lines if "#" not in ln]

    def test_defaults_match_the_repository_config(self) -> None:
        """Keys in the repository's config.yaml have the same values in the template."""
        repo = yaml_items(yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8")))
        template = yaml_items(yaml.safe_load(template_text()))
        assert repo == {k: template[k] for k in repo}


def yaml_items(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value of a YAML mapping."""
    out: dict[str, Any] = {}
    for k, v in raw.items():
        out.update(yaml_items(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


class TestInitInstallation:
    def test_lays_out_a_loadable_installation(self, tmp_path: Path) -> None:
        """init makes the config, the folders and a store whose CURRENT is the shipped model,
        under the shipped version's own name (a row's model_version means the same weights)."""
        report = init_installation(tmp_path / "site")
        cfg = load_config(report.config)
        assert tmp_path / "site" / "inbox" == cfg.inbox
        assert [SHIPPED] == model_store.list_versions(cfg.model_store)
        assert SHIPPED == model_store.current_version(cfg.model_store) == report.model_version
        meta = model_store.read_metadata(cfg.model_store, SHIPPED)
        assert {"xray_watcher": __version__, "source_version": SHIPPED} == meta["bundled"]
        assert SHIPPED == meta["version"]
        shipped = ROOT / "model_store" / SHIPPED / model_store.MODEL_FILE
        assert shipped.read_bytes() == (cfg.model_store / SHIPPED / model_store.MODEL_FILE).read_bytes()
        (entry,) = (json.loads(ln) for ln in (cfg.model_store / "history.jsonl").read_text().splitlines())
        assert f"bundled with xray-watcher {__version__}" == entry["reason"]
        assert [] == report.left_alone

    def test_leaves_an_existing_installation_alone(self, tmp_path: Path) -> None:
        """A second init changes nothing and lists everything as left alone."""
        first = init_installation(tmp_path)
        (tmp_path / "config.yaml").write_text(template_text() + "# mine\n")
        second = init_installation(tmp_path)
        assert [] == second.created
        assert ["config.yaml", "inbox/", "processed/", "failed/", "model_store/"] == [
            line.split(" ")[0] for line in second.left_alone
        ]
        assert (tmp_path / "config.yaml").read_text().endswith("# mine\n")
        assert [SHIPPED] == model_store.list_versions(tmp_path / "model_store")
        assert first.model_version == second.model_version

    def test_force_backs_up_the_config_and_adds_a_version(self, tmp_path: Path) -> None:
        """--force keeps the old config as .bak and publishes the bundle beside the old versions."""
        init_installation(tmp_path)
        (tmp_path / "config.yaml").write_text("# mine\n")
        report = init_installation(tmp_path, force=True)
        assert template_text() == (tmp_path / "config.yaml").read_text()
        assert ["# mine\n"] == [p.read_text() for p in tmp_path.glob("config.yaml.*.bak")]
        after = f"v{int(SHIPPED[1:]) + 1:04d}"  # the shipped name is taken: the next one
        assert [SHIPPED, after] == model_store.list_versions(tmp_path / "model_store")
        assert after == model_store.current_version(tmp_path / "model_store") == report.model_version

    def test_force_into_a_store_of_older_versions_keeps_the_shipped_name(self, tmp_path: Path) -> None:
        """A store holding only versions older than the shipped one gets it under its own name."""
        store = tmp_path / "model_store"
        store.mkdir()
        shutil.copytree(ROOT / "model_store" / "v0001", store / "v0001")
        model_store.set_current(store, "v0001", reason="test")
        report = init_installation(tmp_path, force=True)
        assert ["v0001", SHIPPED] == model_store.list_versions(store)
        assert SHIPPED == model_store.current_version(store) == report.model_version

    def test_refuses_a_file_as_target(self, tmp_path: Path) -> None:
        """A target that is a file is an error, and nothing is created."""
        from watcher.errors import WatcherError

        target = tmp_path / "file"
        target.write_text("x")
        with pytest.raises(WatcherError, match="is not a folder"):
            init_installation(target)


@pytest.mark.slow
class TestWheel:
    def test_carries_the_shipped_model_and_the_template(self, built: tuple[Path, str]) -> None:
        """The wheel holds model_store/<CURRENT>/ as watcher/bundled_model/<version>/ and the template."""
        wheel, _ = built
        assert f"xray_watcher-{__version__}-py3-none-any.whl" == wheel.name
        with zipfile.ZipFile(wheel) as zf:
            names = set(zf.namelist())
            shipped = sorted(p.name for p in (ROOT / "model_store" / SHIPPED).iterdir() if p.is_file())
            bundled = f"watcher/bundled_model/{SHIPPED}/"
            inside = sorted(n[len(bundled) :] for n in names if n.startswith("watcher/bundled_model/"))
            assert shipped == inside
            for name in shipped:
                assert (ROOT / "model_store" / SHIPPED / name).read_bytes() == zf.read(bundled + name)
            assert template_text() == zf.read("watcher/templates/config.yaml").decode()
        assert "watcher/init.py" in names
        assert [] == [n for n in names if n.startswith(("tests/", "model_store/"))]

    def test_build_prints_no_deprecation_warning(self, built: tuple[Path, str]) -> None:
        """Building the wheel prints no deprecation or backend warning."""
        _, output = built
        assert [] == [ln for ln in output.splitlines() if any(w in ln for w in WARNING_WORDS)]


@pytest.mark.slow
class TestInstalled:
    def test_init_then_run_once(self, venv: Path, tmp_path: Path) -> None:
        """A user's init DIR, a second init, then run --once files two images with the bundled model."""
        home = tmp_path / "user"
        home.mkdir()
        site = home / "xray"
        bin_dir = venv / "bin"

        def sh(*cmd: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [str(c) for c in cmd], cwd=home, env=user_env(), capture_output=True, text=True, timeout=300
            )

        probe = sh(
            bin_dir / "python",
            "-c",
            "import json, os, watcher, watcher.init as i; "
            "print(json.dumps([watcher.__file__, str(i.bundled_model()), os.getcwd()]))",
        )
        assert 0 == probe.returncode, probe.stderr
        module, bundle, cwd = json.loads(probe.stdout)
        assert Path(module).is_relative_to(venv)
        assert Path(bundle) == Path(module).parent / "bundled_model" / SHIPPED
        assert not Path(cwd).resolve().is_relative_to(ROOT)

        help_text = sh(bin_dir / "xray-watcher", "--help").stdout
        init_cmd: list[object] = (
            [bin_dir / "xray-watcher", "init"]
            if re.search(r"\{[^}]*\binit\b", help_text)
            else [bin_dir / "python", "-m", "watcher.init"]
        )
        first = sh(*map(str, init_cmd), "xray")
        assert 0 == first.returncode, first.stderr
        config = site / "config.yaml"
        assert f"xray-watcher check --config {config}" in first.stdout
        assert f"xray-watcher run --config {config}" in first.stdout
        assert "left alone" not in first.stdout
        version = model_store.current_version(site / "model_store")

        second = sh(*map(str, init_cmd), "xray")
        assert 0 == second.returncode, second.stderr
        assert "created" not in second.stdout
        assert "left alone  config.yaml" in second.stdout
        assert "left alone  model_store/" in second.stdout
        assert [version] == model_store.list_versions(site / "model_store")

        for image in FULLRES[:2]:
            shutil.copy2(image, site / "inbox" / image.name)
        run = sh(bin_dir / "xray-watcher", "run", "--once", "--config", "xray/config.yaml")
        assert 0 == run.returncode, run.stdout[-3000:] + run.stderr[-3000:]
        with (site / "results.csv").open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        assert sorted(p.name for p in FULLRES[:2]) == sorted(r["file"] for r in rows)
        assert [("ok", version)] * 2 == [(r["status"], r["model_version"]) for r in rows]
        for row in rows:
            assert row["label"] in ("NORMAL", "PNEUMONIA")
            assert (site / "processed" / row["label"] / row["file"]).is_file()
            assert not (site / "inbox" / row["file"]).exists()
        meta = model_store.read_metadata(site / "model_store", version)
        assert SHIPPED == meta["bundled"]["source_version"]
