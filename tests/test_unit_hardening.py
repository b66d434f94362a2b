"""The hardened systemd unit: verify, exposure score, and a real run inside an emulated sandbox.

systemd is not PID 1 here, so the unit cannot be started. Instead the daemon runs
(`run --once` on the real full-size fixture radiographs) in a private mount and pid namespace
set up like the unit's sandbox:

- ProtectSystem=strict + ReadWritePaths= + ReadOnlyPaths=: every mount re-mounted read-only,
  except a bind mount of each ReadWritePaths= entry (the data folder, once: inbox/ and
  processed/ on one mount, so files are hard-linked, not copied), inside which each
  ReadOnlyPaths= entry (the model store) is bound read-only again; the config stays read-only.
  The paths are the unit's own, moved from /var/lib/xray-watcher to the test's data folder;
- PrivateTmp=: fresh tmpfs on /tmp and /var/tmp; ProtectHome=yes: /home, /root, /run/user
  hidden (the interpreter's own folder is bound back when it lives there);
- PrivateDevices=: a /dev with only null, zero, full, random, urandom, tty and a /dev/shm;
- ProtectProc=invisible + ProcSubset=: a new /proc mounted with hidepid=invisible (and
  subset=pid if the unit asks for it, which hides /proc/cpuinfo from ONNX Runtime);
- CapabilityBoundingSet= + NoNewPrivileges=yes: setpriv drops every capability;
- SystemCallFilter=@system-service ~@privileged + SystemCallErrorNumber=EPERM +
  SystemCallArchitectures=native: a seccomp filter built from `systemd-analyze
  syscall-filter` (this file, run as a script, installs it and execs the daemon).

Not emulated: User= (the run is uid 0 without capabilities, so still the owner of the test
files), RestrictAddressFamilies=, RestrictNamespaces=, IPAddress*=, the device cgroup and the
other knobs enforced by systemd itself: those need systemd as PID 1.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import json
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "xray-watcher.service"
GPU_DROPIN = REPO / "systemd" / "gpu.conf"
FULLRES = sorted((Path(__file__).parent / "fixtures" / "fullres").glob("*.jpeg"))
MAX_EXPOSURE = 3.0
UNISTD = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")


def unit_settings(text: str) -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit file, values in order."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith(("#", ";", "[")) or "=" not in line:
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def unit_mounts(data: Path) -> tuple[list[Path], list[Path]]:
    """The unit's ReadWritePaths= and ReadOnlyPaths=, /var/lib/xray-watcher moved to ``data``."""
    s = unit_settings(UNIT.read_text())

    def moved(key: str) -> list[Path]:
        paths = [Path(p.lstrip("-")) for value in s.get(key, []) for p in value.split()]
        return [data / p.relative_to("/var/lib/xray-watcher") for p in paths]

    return moved("ReadWritePaths"), moved("ReadOnlyPaths")


def proc_options() -> str:
    """The /proc mount options of the unit's ProtectProc=invisible and ProcSubset=."""
    s = unit_settings(UNIT.read_text())
    return "hidepid=invisible" + (",subset=pid" if s.get("ProcSubset") == ["pid"] else "")


def runnable_unit(tmp_path: Path) -> Path:
    """A copy of the unit whose ExecStart exists here (the venv's console script)."""
    exe = Path(sys.executable).parent / "xray-watcher"
    if not exe.exists():
        pytest.skip(f"no console script {exe} (pip install -e . first)")
    text = UNIT.read_text().replace("/opt/xray-watcher/.venv/bin/xray-watcher", str(exe))
    copy = tmp_path / "units" / UNIT.name
    copy.parent.mkdir()
    copy.write_text(text)
    return copy


def systemd_analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def exposure(unit: Path) -> tuple[float, str]:
    proc = systemd_analyze("security", "--offline=yes", "--no-pager", str(unit), cwd=unit.parent)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert match, f"no score in: {proc.stdout[-500:]} {proc.stderr}"
    return float(match.group(1)), proc.stdout


class TestUnitFile:
    def test_verify_clean(self, tmp_path: Path) -> None:
        """systemd-analyze verify has nothing to say (no unknown key, bad value or missing file)."""
        unit = runnable_unit(tmp_path)
        proc = systemd_analyze("verify", str(unit), cwd=unit.parent)
        assert (0, "", "") == (proc.returncode, proc.stdout, proc.stderr)

    def test_verify_catches_a_typo(self, tmp_path: Path) -> None:
        """The check above would see a misspelt key (so its silence means something)."""
        unit = runnable_unit(tmp_path)
        unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSystm=strict"))
        proc = systemd_analyze("verify", str(unit), cwd=unit.parent)
        assert "Unknown key 'ProtectSystm'" in proc.stderr

    def test_exposure_score(self, tmp_path: Path) -> None:
        """`systemd-analyze security --offline=yes` scores the unit at most 3.0."""
        score, table = exposure(runnable_unit(tmp_path))
        assert score <= MAX_EXPOSURE, table

    def test_exposure_with_the_gpu_dropin(self, tmp_path: Path) -> None:
        """With systemd/gpu.conf merged in, the unit still verifies and scores at most 3.0."""
        unit = runnable_unit(tmp_path)
        merged = unit.read_text() + "\n[Service]" + GPU_DROPIN.read_text().split("[Service]", 1)[1]
        unit.write_text(merged.replace("PrivateDevices=yes\n", "", 1))
        proc = systemd_analyze("verify", str(unit), cwd=unit.parent)
        assert (0, "") == (proc.returncode, proc.stderr)
        score, table = exposure(unit)
        assert score <= MAX_EXPOSURE, table
        assert "PrivateDevices=no" in merged

    def test_contract(self) -> None:
        """What the daemon relies on is still there, and the sandbox is what README promises."""
        s = unit_settings(UNIT.read_text())
        assert ["notify"] == s["Type"]
        assert ["/opt/xray-watcher/.venv/bin/xray-watcher run --config /etc/xray-watcher/config.yaml"] == s[
            "ExecStart"
        ]
        assert ["/bin/kill -HUP $MAINPID"] == s["ExecReload"]
        assert ["2"] == s["RestartPreventExitStatus"]
        assert ["on-failure"] == s["Restart"]
        assert s["WatchdogSec"]
        assert ["strict"] == s["ProtectSystem"]
        # one mount for the data folder: link(2) from inbox/ into processed/ fails between two
        assert ["/var/lib/xray-watcher"] == s["ReadWritePaths"]
        assert ["/var/lib/xray-watcher/model_store"] == s["ReadOnlyPaths"]  # the service only reads it
        # ONNX Runtime reads /proc/cpuinfo: with ProcSubset=pid it logs plain-text errors
        assert (["invisible"], ["all"]) == (s["ProtectProc"], s["ProcSubset"])
        assert "ORT_DISABLE_TELEMETRY=1" in " ".join(s["Environment"]).split()  # no device id under $HOME
        assert [""] == s["CapabilityBoundingSet"]
        assert ["AF_UNIX AF_INET AF_INET6"] == s["RestrictAddressFamilies"]
        assert ["@system-service", "~@privileged"] == s["SystemCallFilter"]
        assert "MemoryDenyWriteExecute" not in s  # oneDNN's JIT needs executable pages
        assert ["0027"] == s["UMask"]


# ---------------------------------------------------------------- install and uninstall

INSTALL = REPO / "scripts" / "install-service.sh"
UNINSTALL = REPO / "scripts" / "uninstall-service.sh"
DATA = "/var/lib/xray-watcher"


def run_script(script: Path, root: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """A script against a fake root (ROOT=...): no users, owners or systemctl."""
    xw = Path(sys.executable).parent / "xray-watcher"
    return subprocess.run(
        ["sh", str(script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "ROOT": str(root), "VENV": "skip", "GPU": "no", "XW": str(xw), **env},
    )


def mode(path: Path) -> str:
    return oct(path.stat().st_mode & 0o7777)


def fake_wheel(folder: Path, marker: str) -> Path:
    """A tiny wheel named xray-watcher 0.1.0 holding one module: two builds differ in ``marker``."""
    files = {
        "xw_probe.py": f"MARKER = {marker!r}\n",
        "xray_watcher-0.1.0.dist-info/METADATA": (
            "Metadata-Version: 2.1\nName: xray-watcher\nVersion: 0.1.0\n"
        ),
        "xray_watcher-0.1.0.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    files["xray_watcher-0.1.0.dist-info/RECORD"] = (
        "\n".join([*record, "xray_watcher-0.1.0.dist-info/RECORD,,"]) + "\n"
    )
    folder.mkdir(parents=True)
    wheel = folder / "xray_watcher-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return wheel


class TestInstallScripts:
    def test_syntax(self) -> None:
        """Both scripts parse as POSIX sh."""
        for script in (INSTALL, UNINSTALL):
            assert 0 == subprocess.run(["sh", "-n", str(script)]).returncode

    def test_fake_root_layout(self, tmp_path: Path) -> None:
        """Folders with their modes, the unit, a config that loads, a seeded model store."""
        from watcher import model_store
        from watcher.config import load_config

        root = tmp_path / "root"
        proc = run_script(INSTALL, root)
        assert 0 == proc.returncode, proc.stderr
        data = root / DATA.lstrip("/")
        assert "0o2770" == mode(data / "inbox")  # group xray-drop may drop; setgid keeps the group
        for name in ("processed", "failed", "results", "model_store"):
            assert "0o750" == mode(data / name), name
        assert "0o755" == mode(data)
        etc = root / "etc" / "xray-watcher"
        assert ("0o750", "0o640") == (mode(etc), mode(etc / "config.yaml"))
        assert "0o640" == mode(etc / "config.yaml.dist")  # this version's template, paths set
        assert (etc / "config.yaml.dist").read_text() == (etc / "config.yaml").read_text()
        # the installer's mark on PREFIX (uninstall-service.sh removes only a PREFIX that has it)
        assert (root / "opt" / "xray-watcher" / ".xray-watcher-install").is_file()
        # and the installed version (here: XW, the checkout's) takes the config it wrote
        assert "xray-watcher check --config /etc/xray-watcher/config.yaml: ok" in proc.stdout
        units = root / "etc" / "systemd" / "system"
        assert UNIT.read_text() == (units / UNIT.name).read_text()  # default folders: unchanged
        listener = REPO / "systemd" / "xray-watcher-listener.service"
        assert listener.exists() == (units / listener.name).exists()
        assert not (units / "xray-watcher.service.d").exists()  # GPU=no
        assert (root / "opt" / "xray-watcher" / "README.md").exists()
        link = root / "usr" / "local" / "bin" / "xray-watcher"
        assert "/opt/xray-watcher/.venv/bin/xray-watcher" == os.readlink(link)

        text = (etc / "config.yaml").read_text()
        for key, path in [
            ("inbox", f"{DATA}/inbox"),
            ("processed", f"{DATA}/processed"),
            ("failed", f"{DATA}/failed"),
            ("results", f"{DATA}/results/results.csv"),
            ("model_store", f"{DATA}/model_store"),
        ]:
            assert re.search(rf"^{key}: {re.escape(path)}\b", text, re.M), key
        staged = tmp_path / "staged.yaml"  # the same config, pointed into the fake root
        staged.write_text(text.replace(DATA, str(data)))
        cfg = load_config(staged)
        assert (data / "inbox", data / "results" / "results.csv") == (cfg.inbox, cfg.results)
        assert str(cfg.explain.folder).startswith(str(data / "results"))  # a writable folder
        assert model_store.current_version(cfg.model_store) in model_store.list_versions(cfg.model_store)

    def test_rerun_keeps_config_and_models(self, tmp_path: Path) -> None:
        """A second run (an upgrade) keeps an edited config.yaml and the model store, and names
        a template that is still there to compare with: ETC/config.yaml.dist, replaced."""
        root = tmp_path / "root"
        assert 0 == run_script(INSTALL, root).returncode
        config = root / "etc" / "xray-watcher" / "config.yaml"
        config.write_text(config.read_text() + "# edited by the site\n")
        dist = config.with_name("config.yaml.dist")
        dist.write_text("# an older version's template\n")
        current = root / DATA.lstrip("/") / "model_store" / "CURRENT"
        served = current.read_text()
        note = current.with_name("site-note.txt")
        note.write_text("kept\n")
        proc = run_script(INSTALL, root)
        assert 0 == proc.returncode, proc.stderr
        assert config.read_text().endswith("# edited by the site\n")
        assert (served, "kept\n") == (current.read_text(), note.read_text())
        assert "kept /etc/xray-watcher/config.yaml" in proc.stdout
        named = re.findall(r"diff -u /etc/xray-watcher/config.yaml ([^\s)]+)", proc.stdout)
        assert ["/etc/xray-watcher/config.yaml.dist"] == named, proc.stdout
        assert re.search(r"^inbox: /var/lib/xray-watcher/inbox\b", dist.read_text(), re.M)  # replaced
        assert "0o640" == mode(dist)

    def test_check_after_install(self, tmp_path: Path) -> None:
        """After installing, `xray-watcher check` runs on the config: a config the installed
        version rejects is exit 3 (installed, not to be restarted), with the check's reason."""
        root = tmp_path / "root"
        assert 0 == run_script(INSTALL, root).returncode
        config = root / "etc" / "xray-watcher" / "config.yaml"
        config.write_text(config.read_text().replace("\nbatch:", "\nbatch:\n  max_sise: 4", 1))
        proc = run_script(INSTALL, root)
        assert 3 == proc.returncode, proc.stdout + proc.stderr
        assert "max_sise" in proc.stderr  # the check's own message
        assert "'xray-watcher check --config /etc/xray-watcher/config.yaml' fails (exit 2)" in proc.stderr
        assert "/etc/xray-watcher/config.yaml.dist" in proc.stderr
        units = root / "etc" / "systemd" / "system"
        assert (units / UNIT.name).exists()  # everything else was installed

    @pytest.mark.slow
    def test_upgrade_reinstalls_the_same_version(self, tmp_path: Path) -> None:
        """A rebuilt wheel of the installed version is installed (pip alone skips it), and the
        script says which version and which wheel (sha256) it installed."""
        root = tmp_path / "root"
        first = fake_wheel(tmp_path / "first", "first build")
        second = fake_wheel(tmp_path / "second", "second build")
        venv = dict(
            VENV="create", PYTHON=sys.executable, PIP_ARGS="--no-deps --no-index", ALLOW_HOME_PYTHON="1"
        )
        proc = run_script(INSTALL, root, SOURCE=str(first), **venv)
        assert 0 == proc.returncode, proc.stdout + proc.stderr
        probes = list((root / "opt" / "xray-watcher" / ".venv").glob("lib/python*/site-packages/xw_probe.py"))
        assert 1 == len(probes), probes
        assert "first build" in probes[0].read_text()
        proc = run_script(INSTALL, root, SOURCE=str(second), **venv)
        assert 0 == proc.returncode, proc.stdout + proc.stderr
        assert "second build" in probes[0].read_text()
        digest = hashlib.sha256(second.read_bytes()).hexdigest()
        assert (
            f"installed xray-watcher 0.1.0 into /opt/xray-watcher/.venv from {second} (sha256 {digest})"
            in (proc.stdout)
        )
        info = (root / "opt" / "xray-watcher" / ".xray-watcher-install").read_text()
        assert ("xray-watcher 0.1.0", f"sha256: {digest}") == tuple(info.splitlines()[i] for i in (0, 2))

    @pytest.mark.parametrize(
        ("key", "value"),
        [
            ("PREFIX", "/opt/xray watcher"),
            ("DATA", "/var/lib/xray data"),
            ("DATA", "/srv/a&b"),
            ("ETC", "/etc/x|w"),
            ("PREFIX", "/opt/x\\w"),
            ("DATA", "/srv/xw%i"),
            ("DATA", "/var/lib/"),
            ("DATA", "//"),
            ("PREFIX", "/opt/../usr"),
            ("PREFIX", "/home/alice/xw"),
            ("DATA", "/opt/xray-watcher/data"),
        ],
    )
    def test_refuses_paths_a_unit_cannot_hold(self, tmp_path: Path, key: str, value: str) -> None:
        """Whitespace or | & \\ % in PREFIX, DATA or ETC (the unit files would split or expand
        it), a system folder in any spelling, a folder ProtectHome=yes hides, or one inside
        another (uninstalling PREFIX would take DATA with it): one error line, exit 2, nothing
        written."""
        root = tmp_path / "root"
        args = [value] if key == "PREFIX" else []
        env = {} if key == "PREFIX" else {key: value}
        proc = run_script(INSTALL, root, *args, **env)
        assert 2 == proc.returncode, proc.stdout + proc.stderr
        assert 1 == len(proc.stderr.splitlines()), proc.stderr
        assert proc.stderr.startswith(f"install-service: error: {key} "), proc.stderr
        assert not root.exists()

    @pytest.mark.parametrize(
        ("python", "home"),
        [
            ("/usr/bin/python3", "/root/.pyenv/versions/3.11.7/bin"),
            ("/home/alice/py/bin/python3", "/usr/bin"),
        ],
    )
    def test_refuses_a_venv_under_a_home(self, tmp_path: Path, python: str, home: str) -> None:
        """A venv whose interpreter (or pyvenv.cfg `home`) lies under /home, /root or /run/user
        cannot run under ProtectHome=yes: refused (exit 2) unless ALLOW_HOME_PYTHON=1."""
        root = tmp_path / "root"
        venv = root / "opt" / "xray-watcher" / ".venv"
        (venv / "bin").mkdir(parents=True)
        (venv / "bin" / "python").symlink_to(python)
        (venv / "pyvenv.cfg").write_text(f"home = {home}\ninclude-system-site-packages = false\n")
        proc = run_script(INSTALL, root)
        assert 2 == proc.returncode, proc.stdout + proc.stderr
        assert "ProtectHome=yes" in proc.stderr and "ALLOW_HOME_PYTHON=1" in proc.stderr
        assert not (root / "etc").exists()  # refused before anything was written
        proc = run_script(INSTALL, root, ALLOW_HOME_PYTHON="1")
        assert 0 == proc.returncode, proc.stderr
        assert "warning:" in proc.stdout

    def test_prefix_rewrites_the_unit(self, tmp_path: Path) -> None:
        """PREFIX moves the program; the installed unit's ExecStart follows."""
        root = tmp_path / "root"
        assert 0 == run_script(INSTALL, root, "/srv/xw").returncode
        unit = unit_settings((root / "etc" / "systemd" / "system" / UNIT.name).read_text())
        assert ["/srv/xw/.venv/bin/xray-watcher run --config /etc/xray-watcher/config.yaml"] == unit[
            "ExecStart"
        ]
        assert (root / "srv" / "xw" / "README.md").exists()

    def test_data_and_etc_rewrite_the_units(self, tmp_path: Path) -> None:
        """DATA and ETC move the folders; both units follow (one writable mount for DATA, its
        model store read-only), and a new path holding a default one is rewritten once."""
        root = tmp_path / "root"
        proc = run_script(INSTALL, root, "/srv/var/lib/xray-watcher/", DATA="/data//xw/", ETC="/srv/etc")
        assert 0 == proc.returncode, proc.stderr
        units = root / "etc" / "systemd" / "system"
        unit = unit_settings((units / UNIT.name).read_text())
        assert ["/srv/var/lib/xray-watcher/.venv/bin/xray-watcher run --config /srv/etc/config.yaml"] == unit[
            "ExecStart"
        ]
        assert (["/data/xw"], ["/data/xw/model_store"]) == (unit["ReadWritePaths"], unit["ReadOnlyPaths"])
        assert ["/data/xw"] == unit["WorkingDirectory"]
        listener = unit_settings((units / "xray-watcher-listener.service").read_text())
        assert ["/data/xw/inbox"] == listener["ReadWritePaths"]
        assert (root / "data" / "xw" / "model_store" / "CURRENT").exists()
        assert re.search(
            r"^inbox: /data/xw/inbox\b", (root / "srv" / "etc" / "config.yaml").read_text(), re.M
        )

    def test_gpu_dropin(self, tmp_path: Path) -> None:
        """GPU=yes installs systemd/gpu.conf as a drop-in."""
        root = tmp_path / "root"
        assert 0 == run_script(INSTALL, root, GPU="yes").returncode
        dropin = root / "etc" / "systemd" / "system" / "xray-watcher.service.d" / "gpu.conf"
        assert GPU_DROPIN.read_text() == dropin.read_text()

    def test_uninstall_keeps_data_unless_purge(self, tmp_path: Path) -> None:
        """uninstall removes the program and units and keeps config and data; --purge removes all."""
        root = tmp_path / "root"
        assert 0 == run_script(INSTALL, root, GPU="yes").returncode
        results = root / DATA.lstrip("/") / "results" / "results.csv"
        results.write_text("processed_at\n")
        proc = run_script(UNINSTALL, root)
        assert 0 == proc.returncode, proc.stderr
        assert not (root / "opt" / "xray-watcher").exists()
        assert not os.path.lexists(root / "usr" / "local" / "bin" / "xray-watcher")
        assert [] == list((root / "etc" / "systemd" / "system").iterdir())
        assert results.exists()
        assert (root / "etc" / "xray-watcher" / "config.yaml").exists()
        assert 0 == run_script(UNINSTALL, root, "--purge").returncode
        assert not (root / "etc" / "xray-watcher").exists()
        assert not (root / DATA.lstrip("/")).exists()

    def test_uninstall_refuses_a_system_folder(self, tmp_path: Path) -> None:
        """A PREFIX such as /usr is never removed, however it is spelt: the other program under
        /opt and the installation itself stay."""
        root = tmp_path / "root"
        assert 0 == run_script(INSTALL, root).returncode
        other = root / "opt" / "other-app" / "important"
        other.parent.mkdir(parents=True)
        other.write_text("keep me\n")
        (root / "usr" / "local" / "lib").mkdir(parents=True)
        for prefix in ("/usr", "/opt/", "/opt//", "//", "/opt/xray-watcher/..", "/usr/local/../local"):
            proc = run_script(UNINSTALL, root, prefix)
            assert (2, "uninstall-service: error: refusing") == (proc.returncode, proc.stderr[:34]), prefix
            assert other.exists() and (root / "usr" / "local" / "lib").is_dir(), prefix
            assert (root / "opt" / "xray-watcher" / "README.md").exists(), prefix
            assert (root / "etc" / "systemd" / "system" / UNIT.name).exists(), prefix  # nothing removed

    def test_uninstall_refuses_what_the_installer_did_not_make(self, tmp_path: Path) -> None:
        """PREFIX must hold the installer's venv or mark; with --purge, DATA must hold inbox/ and
        model_store/ and ETC a config.yaml with an inbox: key. A folder reached through a link
        above it is judged where it resolves, and never outside ROOT."""
        root = tmp_path / "root"
        assert 0 == run_script(INSTALL, root).returncode
        other = root / "srv" / "other-app"
        (other / "bin").mkdir(parents=True)
        (root / "etc" / "other").mkdir(parents=True)
        (root / "etc" / "other" / "config.yaml").write_text("server: {port: 80}\n")
        outside = tmp_path / "outside" / "prog"
        (outside / ".venv" / "bin").mkdir(parents=True)
        (outside / ".venv" / "bin" / "xray-watcher").write_text("#!/bin/sh\n")
        (outside / ".venv" / "bin" / "xray-watcher").chmod(0o755)
        (root / "opt" / "out").symlink_to(outside.parent)  # leads out of ROOT
        (root / "opt" / "up").symlink_to(root)  # /opt/up/usr is /usr
        (root / "usr").mkdir(exist_ok=True)
        refused = [
            run_script(UNINSTALL, root, "/srv/other-app"),
            run_script(UNINSTALL, root, "/opt/out/prog"),
            run_script(UNINSTALL, root, "/opt/up/usr"),
            run_script(UNINSTALL, root, "--purge", DATA="/srv/other-app"),
            run_script(UNINSTALL, root, "--purge", DATA="/var/lib/"),
            run_script(UNINSTALL, root, "--purge", DATA="//"),
            run_script(UNINSTALL, root, "--purge", ETC="/etc/other/"),
            run_script(UNINSTALL, root, "--purge", ETC="/etc//"),
        ]
        assert [2] * len(refused) == [p.returncode for p in refused], [p.stderr for p in refused]
        assert all("refusing" in p.stderr for p in refused), [p.stderr for p in refused]
        assert (other / "bin").is_dir() and (root / "etc" / "other" / "config.yaml").exists()
        assert (outside / ".venv" / "bin" / "xray-watcher").exists() and (root / "usr").is_dir()
        assert (root / "opt" / "xray-watcher" / "README.md").exists()  # nothing removed
        assert (root / DATA.lstrip("/") / "inbox").is_dir()
        proc = run_script(UNINSTALL, root, "/opt//xray-watcher/", "--purge", DATA="/var/lib/xray-watcher/")
        assert 0 == proc.returncode, proc.stderr
        assert not (root / "opt" / "xray-watcher").exists() and not (root / DATA.lstrip("/")).exists()
        assert not (root / "etc" / "xray-watcher").exists()
        assert not os.path.lexists(root / "usr" / "local" / "bin" / "xray-watcher")


# ---------------------------------------------------------------- the sandbox emulation


def syscall_numbers() -> dict[str, int]:
    """x86_64 system call numbers from the kernel headers."""
    out = {}
    for m in re.finditer(r"#define __NR_(\w+)\s+(\d+)", UNISTD.read_text()):
        out[m.group(1)] = int(m.group(2))
    return out


def syscall_groups() -> dict[str, list[str]]:
    """`systemd-analyze syscall-filter`: every @group with its members (names or @groups)."""
    text = subprocess.run(
        ["systemd-analyze", "syscall-filter", "--no-pager"], capture_output=True, text=True, check=True
    ).stdout
    groups: dict[str, list[str]] = {}
    current = ""
    for line in text.splitlines():
        if line.startswith("@"):
            current = line.strip()
            groups[current] = []
        elif line.strip() and not line.strip().startswith("#") and current:
            groups[current].append(line.strip())
    return groups


def expand(name: str, groups: dict[str, list[str]]) -> set[str]:
    if not name.startswith("@"):
        return {name}
    return set().union(*(expand(member, groups) for member in groups[name]))


def allowed_syscalls(unit_text: str) -> list[int]:
    """The numbers the unit's SystemCallFilter= lines allow, applied in order as systemd does."""
    groups = syscall_groups()
    allowed: set[str] = set()
    for value in unit_settings(unit_text)["SystemCallFilter"]:
        deny = value.startswith("~")
        names = set().union(*(expand(n, groups) for n in value.lstrip("~").split()))
        allowed = allowed - names if deny else allowed | names
    numbers = syscall_numbers()
    return sorted(numbers[n] for n in allowed if n in numbers)


def install_seccomp(allowed: list[int], deny_write_execute: bool = False) -> None:
    """no_new_privs + a filter: native arch only, the allowed numbers, EPERM for the rest.

    ``deny_write_execute``: also MemoryDenyWriteExecute=yes as systemd builds it (mmap with
    PROT_WRITE|PROT_EXEC, and mprotect/pkey_mprotect adding PROT_EXEC, fail with EPERM).
    """
    audit_arch_x86_64 = 0xC000003E
    ret_allow, ret_kill, ret_errno = 0x7FFF0000, 0x80000000, 0x00050000
    eperm = 1

    def insn(code: int, jt: int, jf: int, k: int) -> bytes:
        return struct.pack("HBBI", code, jt, jf, k)

    prog = [
        insn(0x20, 0, 0, 4),  # A = seccomp_data.arch
        insn(0x15, 1, 0, audit_arch_x86_64),  # native: skip the kill
        insn(0x06, 0, 0, ret_kill),
        insn(0x20, 0, 0, 0),  # A = seccomp_data.nr
    ]
    if deny_write_execute:
        mmap, mprotect, pkey_mprotect = 9, 10, 329
        prot = 32  # offsetof(seccomp_data, args[2]), low 32 bits (little-endian)
        prog += [
            insn(0x15, 0, 4, mmap),
            insn(0x20, 0, 0, prot),
            insn(0x54, 0, 0, 6),  # A &= PROT_WRITE | PROT_EXEC
            insn(0x15, 0, 1, 6),
            insn(0x06, 0, 0, ret_errno | eperm),
            insn(0x20, 0, 0, 0),  # A = nr again
            insn(0x15, 1, 0, mprotect),
            insn(0x15, 0, 4, pkey_mprotect),
            insn(0x20, 0, 0, prot),
            insn(0x54, 0, 0, 4),  # A &= PROT_EXEC
            insn(0x15, 0, 1, 4),
            insn(0x06, 0, 0, ret_errno | eperm),
            insn(0x20, 0, 0, 0),
        ]
    for nr in allowed:
        prog += [insn(0x15, 0, 1, nr), insn(0x06, 0, 0, ret_allow)]
    prog.append(insn(0x06, 0, 0, ret_errno | eperm))
    buf = ctypes.create_string_buffer(b"".join(prog))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(prog), ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_no_new_privs, pr_set_seccomp, seccomp_mode_filter = 38, 22, 2
    if libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(pr_set_seccomp, seccomp_mode_filter, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


PROBE = """
import errno, json, os, sys
out = {}
for path in sys.argv[1:]:
    try:
        fd = os.open(os.path.join(path, ".probe"), os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
        os.unlink(os.path.join(path, ".probe"))
        out[path] = "writable"
    except OSError as exc:
        out[path] = errno.errorcode.get(exc.errno, str(exc.errno))
out["/proc/cpuinfo"] = os.path.exists("/proc/cpuinfo")
out["/proc/sys"] = os.path.exists("/proc/sys")
mounts = [line.split(" - ") for line in open("/proc/self/mountinfo")]
out["proc_opts"] = [tail.split()[2] for head, tail in mounts if head.split()[4] == "/proc"]
out["/dev"] = sorted(os.listdir("/dev"))
out["caps"] = [l.split()[1] for l in open("/proc/self/status") if l.startswith("CapEff")]
try:
    os.setuid(0)
    out["setuid"] = "allowed"
except OSError as exc:
    out["setuid"] = errno.errorcode[exc.errno]
print(json.dumps(out))
"""

SANDBOX = r"""
set -eu
stage=$1; shift
rw=$1; shift          # colon-separated ReadWritePaths: each one a mount of its own, as systemd makes it
ro=$1; shift          # colon-separated ReadOnlyPaths (inside those): bound again, read-only
svc=$1; shift         # the folder holding config.yaml (under /tmp)
keep=$1; shift        # colon-separated: interpreter, venv, repo (bound back if a hidden home holds them)
procopts=$1; shift    # ProtectProc= and ProcSubset= as /proc mount options
IFS=:
for p in $rw; do mount --bind "$p" "$p"; done
for p in $ro; do mount --bind "$p" "$p"; mount -o remount,bind,ro "$p"; done
unset IFS
# ProtectHome=yes
n=0
for home in /home /root /run/user; do
    [ -d "$home" ] || continue
    inside=""
    IFS=:
    for k in $keep; do case $k/ in "$home"/*) inside="$inside:$k" ;; esac; done
    unset IFS
    if [ -z "$inside" ]; then mount -t tmpfs -o mode=0000 tmpfs "$home"; continue; fi
    first=$n
    IFS=:
    for k in ${inside#:}; do n=$((n + 1)); mkdir -p "$stage/keep$n"; mount --rbind "$k" "$stage/keep$n"; done
    unset IFS
    mount -t tmpfs -o mode=0111 tmpfs "$home"
    i=$first
    IFS=:
    for k in ${inside#:}; do i=$((i + 1)); mkdir -p "$k"; mount --rbind "$stage/keep$i" "$k"; done
    unset IFS
done
# PrivateDevices=yes
mkdir -p "$stage/dev"
mount -t tmpfs -o mode=0755,nosuid,noexec tmpfs "$stage/dev"
for d in null zero full random urandom tty; do
    touch "$stage/dev/$d"; mount --bind "/dev/$d" "$stage/dev/$d"
done
mkdir "$stage/dev/shm"; mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$stage/dev/shm"
ln -s /proc/self/fd "$stage/dev/fd"
mount --rbind "$stage/dev" /dev
# PrivateTmp=yes: a fresh /tmp that still holds the service folders (they live in pytest's tmp)
mkdir -p "$stage/tmp"
mount -t tmpfs -o mode=1777 tmpfs "$stage/tmp"
mkdir -p "$stage/tmp/${svc#/tmp/}"
mount --rbind "$svc" "$stage/tmp/${svc#/tmp/}"
# and the interpreter, venv and code where they live under /tmp (a checkout there; installed,
# they are under /opt)
IFS=:
for k in $keep; do
    case $k/ in /tmp/*) mkdir -p "$stage/tmp/${k#/tmp/}"; mount --rbind "$k" "$stage/tmp/${k#/tmp/}" ;; esac
done
unset IFS
mount --rbind "$stage/tmp" /tmp
mount -t tmpfs -o mode=1777 tmpfs /var/tmp
# ProtectProc=invisible, ProcSubset= (a new pid namespace may mount its own /proc)
mount -t proc -o "nosuid,nodev,noexec,$procopts" proc /proc
# ProtectSystem=strict: everything else read-only
writable=":$rw:/tmp:/var/tmp:/dev/shm:"
awk '{print $5}' /proc/self/mountinfo | sort -u | while read -r mp; do
    case $mp in /proc | /proc/*) continue ;; esac
    case $writable in *":$mp:"*) continue ;; esac
    mount -o remount,bind,ro "$mp" 2>/dev/null || true
done
exec "$@"
"""


def in_sandbox(
    stage: Path,
    data: Path,
    svc: Path,
    argv: list[str],
    seccomp: list[int] | None,
    deny_write_execute: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in the emulated sandbox of the unit, with its /var/lib/xray-watcher at
    ``data`` (its ReadWritePaths= and ReadOnlyPaths=), ``svc`` (under /tmp) kept visible."""
    rw, ro = unit_mounts(data)
    inner = ["setpriv", "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all", "--"]
    if seccomp is not None:
        inner += [sys.executable, str(Path(__file__).resolve())]
        inner += ["--deny-write-execute"] if deny_write_execute else []
        inner += ["--seccomp", ",".join(map(str, seccomp)), "--"]
    # what the unit's /opt install has outside the homes: the interpreter, the venv, the code
    repo = Path(__file__).resolve().parents[1]
    keep = ":".join(sorted({os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, repo)}))
    unshare = ["unshare", "--mount", "--pid", "--fork", "--propagation", "private"]
    script = ["sh", "-c", SANDBOX, "sandbox", str(stage), ":".join(map(str, rw)), ":".join(map(str, ro))]
    script += [str(svc), keep, proc_options()]
    return subprocess.run(
        [*unshare, *script, *inner, *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **SANDBOX_ENV},
    )


SANDBOX_ENV = {  # the unit's Environment= (no GPU here)
    **dict(
        item.split("=", 1)
        for value in unit_settings(UNIT.read_text())["Environment"]
        for item in value.split()
    ),
    "CUDA_VISIBLE_DEVICES": "",
}


def service_layout(root: Path) -> Path:
    """The installed layout in miniature, serving the shipped model (a real CNN: oneDNN's JIT
    runs): root/config.yaml (/etc/xray-watcher) and root/data/ (/var/lib/xray-watcher)."""
    data = root / "data"
    for name in ("inbox", "processed", "failed", "results"):
        (data / name).mkdir(parents=True)
    shutil.copytree(REPO / "model_store", data / "model_store", ignore=shutil.ignore_patterns(".build-*"))
    config = root / "config.yaml"
    config.write_text(
        "inbox: data/inbox\nprocessed: data/processed\nfailed: data/failed\n"
        "results: data/results/results.csv\n"
        "model_store: data/model_store\ninstance_id: sandboxed\nlog: {format: json}\n"
        "ingest: {settle_ms: 0}\nbatch: {max_wait_ms: 50}\n"
    )
    return config


@pytest.fixture
def stage(tmp_path: Path) -> Path:
    """A scratch folder for the sandbox's mounts (skips with the reason where it cannot be built)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("setpriv") is None:
        pytest.skip("needs root, unshare and setpriv to build the sandbox")
    if not str(tmp_path).startswith("/tmp/"):
        pytest.skip(f"the emulated PrivateTmp expects pytest's tmp_path under /tmp, got {tmp_path}")
    if not UNISTD.exists() or platform.machine() != "x86_64":
        pytest.skip(f"the seccomp emulation needs x86_64 and {UNISTD}")
    mounts = f"mount -t tmpfs tmpfs /var/tmp && mount -t proc -o {proc_options()} proc /proc"
    probe = subprocess.run(
        ["unshare", "--mount", "--pid", "--fork", "--propagation", "private", "sh", "-c", mounts],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        pytest.skip(f"unshare/mount refused here: {probe.stderr.strip()}")
    folder = tmp_path / "stage"
    folder.mkdir()
    return folder


@pytest.mark.slow
class TestSandboxedRun:
    def test_scores_real_files_in_the_sandbox(self, tmp_path: Path, stage: Path) -> None:
        """`run --once` inside the unit's sandbox and system-call filter scores the fixtures end to end."""
        from watcher.config import load_config
        from watcher.report import read_rows

        cfg = load_config(service_layout(tmp_path / "svc"))
        assert cfg.source is not None
        for src in FULLRES:
            shutil.copy(src, cfg.inbox / src.name)
        (cfg.inbox / "broken.jpeg").write_bytes(FULLRES[0].read_bytes()[:2000])
        dropped = {p.name: p.stat().st_ino for p in cfg.inbox.iterdir()}
        data = cfg.inbox.parent
        rw = [data, cfg.inbox, cfg.processed, cfg.failed, cfg.results.parent]
        svc = cfg.source.parent
        allowed = allowed_syscalls(UNIT.read_text())

        probe_paths = [*rw, svc, cfg.model_store, Path("/tmp"), REPO, Path("/etc"), Path("/usr")]
        probe = in_sandbox(stage, data, svc, [sys.executable, "-c", PROBE, *map(str, probe_paths)], allowed)
        assert 0 == probe.returncode, probe.stderr
        seen = json.loads(probe.stdout)
        writable = {k for k, v in seen.items() if v == "writable"}
        rw_mounts, ro_mounts = unit_mounts(data)  # what the unit's ReadWritePaths=/ReadOnlyPaths= allow

        def under(path: Path, tops: list[Path]) -> bool:
            return any(path == top or top in path.parents for top in tops)

        allowed_rw = {str(p) for p in probe_paths if under(p, rw_mounts) and not under(p, ro_mounts)}
        assert allowed_rw | {"/tmp"} == writable
        assert {str(p) for p in rw[1:]} <= writable  # the four folders the daemon writes
        for path in (svc, cfg.model_store, REPO, Path("/etc"), Path("/usr")):
            assert "EROFS" == seen[str(path)], (path, seen)
        subset_pid = "subset=pid" in proc_options()
        assert (not subset_pid, not subset_pid) == (seen["/proc/cpuinfo"], seen["/proc/sys"])  # ProcSubset=
        assert "hidepid=invisible" in seen["proc_opts"][-1]  # ProtectProc=invisible
        assert {"fd", "full", "null", "random", "shm", "tty", "urandom", "zero"} == set(seen["/dev"])
        assert ["0000000000000000"] == seen["caps"]  # CapabilityBoundingSet=
        assert "EPERM" == seen["setuid"]  # ~@privileged

        run = [sys.executable, "-m", "watcher", "run", "--once", "--config", str(cfg.source)]
        proc = in_sandbox(stage, data, svc, run, allowed)
        assert 0 == proc.returncode, proc.stdout[-3000:] + proc.stderr[-3000:]
        events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        assert [] == [e for e in events if e.get("level") in ("error", "critical")]
        # hard-linked from the inbox, not copied: the inbox and processed/ share one mount (a
        # link(2) between two mounts fails with EXDEV, and each file would be copied and fsynced)
        filed = {p.name: p.stat().st_ino for p in [*cfg.processed.rglob("*.jpeg"), *cfg.failed.iterdir()]}
        assert dropped == filed
        # no plain-text lines from ONNX Runtime in the journal: it found /proc/cpuinfo
        # (ProcSubset=all) and did not try to keep a telemetry id under $HOME (Environment=)
        assert [] == [line for line in proc.stderr.splitlines() if "cpuinfo" in line or "onnxruntime" in line]
        shipped = (Path(__file__).resolve().parents[1] / "model_store" / "CURRENT").read_text().strip()
        assert [shipped] == [e["model_version"] for e in events if e.get("event") == "model_loaded"]
        rows = {r["file"]: r for r in read_rows(cfg.results)}
        assert {p.name for p in FULLRES} | {"broken.jpeg"} == set(rows)
        assert {"ok"} == {rows[p.name]["status"] for p in FULLRES}
        assert "failed" == rows["broken.jpeg"]["status"]
        assert sorted(p.name for p in FULLRES) == sorted(p.name for p in cfg.processed.rglob("*.jpeg"))
        assert ["broken.jpeg"] == [p.name for p in cfg.failed.iterdir()]
        assert [] == [p for p in cfg.inbox.iterdir() if not p.name.startswith(".")]

    def test_memory_deny_write_execute_breaks_tensorflow(self, tmp_path: Path, stage: Path) -> None:
        """Why MemoryDenyWriteExecute= stays off: with it, a daemon that loads TensorFlow (here
        for a version without model.onnx, converted at load) dies; one that serves the
        version's stored graph through ONNX Runtime alone runs."""
        from watcher.config import load_config
        from watcher.report import read_rows

        cfg = load_config(service_layout(tmp_path / "svc"))
        assert cfg.source is not None
        data = cfg.inbox.parent
        allowed = allowed_syscalls(UNIT.read_text())
        wx = "import mmap; mmap.mmap(-1, 4096, prot=7)"  # the filter works: W+X is refused
        probe = in_sandbox(stage, data, cfg.source.parent, [sys.executable, "-c", wx], allowed, True)
        assert "PermissionError" in probe.stderr
        shutil.copy(FULLRES[0], cfg.inbox / FULLRES[0].name)
        run = [sys.executable, "-m", "watcher", "run", "--once", "--config", str(cfg.source)]
        proc = in_sandbox(stage, data, cfg.source.parent, run, allowed, deny_write_execute=True)
        assert 0 == proc.returncode, proc.stderr[-2000:]
        loaded = [json.loads(line) for line in proc.stdout.splitlines() if '"model_loaded"' in line]
        assert [("model.onnx", False)] == [(e["onnx_graph"], e["tensorflow_loaded"]) for e in loaded]
        assert ["ok"] == [row["status"] for row in read_rows(cfg.results)]
        for graph in cfg.model_store.glob("v*/model.onnx"):
            graph.unlink()
        shutil.copy(FULLRES[1], cfg.inbox / FULLRES[1].name)
        # oneDNN is on by default only on CPUs with AVX-512 VNNI or newer: asked for here, so the
        # outcome does not depend on the machine (off, TensorFlow's Eigen kernels generate no code)
        onednn = [shutil.which("env") or "/usr/bin/env", "TF_ENABLE_ONEDNN_OPTS=1", *run]
        proc = in_sandbox(stage, data, cfg.source.parent, onednn, allowed, deny_write_execute=True)
        # observed: oneDNN "could not create a primitive" (its JIT refused), or SIGSEGV in it
        assert 0 != proc.returncode
        events = [json.loads(line)["event"] for line in proc.stdout.splitlines() if line.startswith("{")]
        assert "device" in events and "model_loaded" not in events, proc.stderr[-2000:]


if __name__ == "__main__":  # the seccomp helper: test_unit_hardening.py --seccomp N,N,... -- argv...
    mdwe = "--deny-write-execute" in sys.argv[1:2]
    argv = sys.argv[2:] if mdwe else sys.argv[1:]
    if len(argv) < 4 or argv[0] != "--seccomp" or argv[2] != "--":
        sys.exit(
            "usage: test_unit_hardening.py [--deny-write-execute] --seccomp NR,NR,... -- PROGRAM ARGS..."
        )
    install_seccomp([int(n) for n in argv[1].split(",")], deny_write_execute=mdwe)
    os.execv(argv[3], argv[3:])
