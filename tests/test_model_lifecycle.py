"""A real daemon when the model store goes wrong: a promoted version that does not load, a damaged
model file, a stored drift reference of another shape, a pointer that names nothing. The daemon
keeps scoring with a version that loads, says so in its log and in ``status``, and swaps as soon
as the version CURRENT names can serve, without a SIGHUP."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import fixture_images, publish_tiny
from tests.harness import Daemon, wait_for
from watcher import model_store, status
from watcher.config import Config
from watcher.fsutil import atomic_write_text
from watcher.report import read_rows


def _rows(cfg: Config) -> list[dict[str, str]]:
    return [dict(r) for r in read_rows(cfg.results)] if cfg.results.exists() else []


def _drop(cfg: Config, name: str) -> None:
    tmp = cfg.inbox / f".{name}.part"
    shutil.copyfile(fixture_images()[0], tmp)
    tmp.rename(cfg.inbox / name)


def _edit_metadata(store: Path, version: str, **changes: object) -> None:
    path = store / version / model_store.METADATA_FILE
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


def _status(cfg: Config) -> dict[str, object]:
    return status.check(cfg)


class TestAVersionThatDoesNotLoad:
    def test_promoted_while_running_then_fixed_is_served_without_sighup(
        self, make_config: Callable[..., Config]
    ) -> None:
        """CURRENT moved to a version whose threshold is out of range: the daemon keeps v0001,
        `status` says it is degraded and why; once the metadata is fixed it swaps on its own."""
        cfg = make_config()
        store = cfg.model_store
        d = Daemon(cfg)
        try:
            d.wait_event("watching")
            bad = publish_tiny(store, promote=False, threshold=0.6)
            _edit_metadata(store, bad, threshold=1.5)
            model_store.set_current(store, bad, reason="test: a version that cannot load")
            wait_for(lambda: bool(d.events("model_load_failed")), 30, "model_load_failed")
            (failed,) = d.events("model_load_failed")
            assert (bad, "v0001") == (failed["version"], failed["serving"])
            wait_for(lambda: not _status(cfg)["healthy"], 30, "status to say the daemon is degraded")
            summary = str(_status(cfg)["summary"])
            assert f"DEGRADED: CURRENT names {bad}, which does not load" in summary
            assert "threshold 1.5" in summary and "serving v0001" in summary
            _drop(cfg, "meanwhile.jpeg")
            wait_for(lambda: len(_rows(cfg)) == 1, 30, "the row scored meanwhile")
            assert "v0001" == _rows(cfg)[0]["model_version"]
            time.sleep(1.5)  # five polls of an unchanged version: not loaded again
            assert 1 == len(d.events("model_load_failed"))

            _edit_metadata(store, bad, threshold=0.6)  # the fix: its files change
            wait_for(lambda: bool(d.events("model_swapped")), 30, "the swap to the fixed version")
            assert bad == d.events("model_swapped")[0]["model_version"]
            wait_for(lambda: bool(_status(cfg)["healthy"]), 30, "status healthy again")
            _drop(cfg, "after.jpeg")
            wait_for(lambda: len(_rows(cfg)) == 2, 30, "the row after the fix")
            assert bad == _rows(cfg)[1]["model_version"]
        finally:
            assert 0 == d.stop()

    def test_restart_with_a_damaged_current_version_serves_the_one_before(
        self, make_config: Callable[..., Config]
    ) -> None:
        """CURRENT names a version whose model.keras was truncated after publishing: a daemon
        started then falls back to the version promoted before it (instead of exiting 1 and
        being restarted by systemd for ever), names the damage, and never loads TensorFlow."""
        cfg = make_config()
        store = cfg.model_store
        bad = publish_tiny(store, promote=True)
        model = store / bad / model_store.MODEL_FILE
        model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
        d = Daemon(cfg)
        try:
            d.wait_event("watching")
            (fallback,) = d.events("model_fallback")
            assert (bad, "v0001") == (fallback["current"], fallback["serving"])
            (failed,) = d.events("model_load_failed")
            assert "is damaged" in str(failed["error"]) and "model.onnx cannot stand in" in str(
                failed["error"]
            )
            (loaded,) = d.events("model_loaded")
            assert ("v0001", False) == (loaded["model_version"], loaded["tensorflow_loaded"])
            _drop(cfg, "x.jpeg")
            wait_for(lambda: len(_rows(cfg)) == 1, 30, "the row")
            assert "v0001" == _rows(cfg)[0]["model_version"]
            wait_for(lambda: "DEGRADED" in str(_status(cfg)["summary"]), 30, "status to say degraded")
            assert not _status(cfg)["healthy"]
        finally:
            assert 0 == d.stop()

    def test_back_on_a_version_that_failed_is_degraded_again(
        self, make_config: Callable[..., Config]
    ) -> None:
        """CURRENT moved off a version that failed and back onto it, its files unchanged: it is not
        loaded again (nothing changed), but `status` says DEGRADED again (it said healthy while
        the daemon served another version than CURRENT's)."""
        cfg = make_config()
        store = cfg.model_store
        d = Daemon(cfg)
        try:
            d.wait_event("watching")
            bad = publish_tiny(store, promote=False)
            _edit_metadata(store, bad, threshold=1.5)
            model_store.set_current(store, bad, reason="test")
            wait_for(lambda: not _status(cfg)["healthy"], 30, "DEGRADED")
            model_store.set_current(store, "v0001", reason="test: back")
            wait_for(lambda: bool(_status(cfg)["healthy"]), 30, "healthy after going back")
            model_store.set_current(store, bad, reason="test: the same bad version again")
            wait_for(lambda: not _status(cfg)["healthy"], 30, "DEGRADED again")
            assert f"CURRENT names {bad}, which does not load" in str(_status(cfg)["summary"])
            assert 1 == len(d.events("model_load_failed"))
        finally:
            assert 0 == d.stop()

    def test_fallback_is_only_the_version_current_replaced(self, make_config: Callable[..., Config]) -> None:
        """v0001, v0002, back to v0001 (v0002 withdrawn), then v0003. With v0003 and v0001 both
        unusable the daemon served v0002, the withdrawn one; it now falls back only to the version
        CURRENT replaced (v0001, what `models rollback` would go back to) and exits 1 without it."""
        cfg = make_config()
        store = cfg.model_store
        withdrawn = publish_tiny(store, promote=True)
        model_store.set_current(store, "v0001", reason="test: v0002 withdrawn")
        newest = publish_tiny(store, promote=True)
        for version in (newest, "v0001"):
            _edit_metadata(store, version, threshold=7)
        done = subprocess.run(
            [sys.executable, "-m", "watcher", "run", "--once", "--config", str(cfg.source)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert 1 == done.returncode, done.stdout[-2000:]
        assert f'"serving": "{withdrawn}"' not in done.stdout
        tried = [json.loads(x)["version"] for x in done.stdout.splitlines() if '"model_load_failed"' in x]
        assert [newest, "v0001"] == tried

    def test_current_naming_a_deleted_version_falls_back(self, make_config: Callable[..., Config]) -> None:
        """CURRENT names a version whose folder was deleted: the daemon exited 1 at every start;
        it now serves the version CURRENT replaced, DEGRADED."""
        cfg = make_config()
        store = cfg.model_store
        gone = publish_tiny(store, promote=True)
        shutil.rmtree(store / gone)
        d = Daemon(cfg)
        try:
            d.wait_event("watching")
            (fallback,) = d.events("model_fallback")
            assert (gone, "v0001") == (fallback["current"], fallback["serving"])
            wait_for(
                lambda: "DEGRADED: CURRENT cannot be used" in str(_status(cfg)["summary"]), 30, "DEGRADED"
            )
            assert 1 == len(d.events("model_pointer_unreadable"))
        finally:
            assert 0 == d.stop()

    def test_no_version_that_loads_is_still_an_error(self, make_config: Callable[..., Config]) -> None:
        cfg = make_config()
        store = cfg.model_store
        for version in model_store.list_versions(store):
            _edit_metadata(store, version, threshold=7)
        done = subprocess.run(
            [sys.executable, "-m", "watcher", "run", "--once", "--config", str(cfg.source)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert 1 == done.returncode
        assert "threshold 7.0 must be in (0, 1)" in done.stderr
        assert "Traceback" not in done.stderr + done.stdout


class TestStoredDriftReferenceOfAnotherShape:
    def test_is_turned_off_not_fatal(self, make_config: Callable[..., Config]) -> None:
        """A version whose metadata carries a 5-bin validation_reference (another release, an
        edit) is served with the drift monitor off; the daemon does not die on the swap."""
        cfg = make_config()
        store = cfg.model_store
        d = Daemon(cfg)
        try:
            d.wait_event("watching")
            other = publish_tiny(store, promote=False)
            five = [1, 2, 3, 4, 5]
            _edit_metadata(
                store, other, validation_reference={"normal_counts": five, "pneumonia_counts": five}
            )
            model_store.set_current(store, other, reason="test")
            wait_for(lambda: bool(d.events("model_swapped")), 30, "the swap")
            off = [e for e in d.events("drift_monitor_off") if e["model_version"] == other]
            assert off and "validation_reference is unusable" in str(off[0]["reason"])
            _drop(cfg, "y.jpeg")
            wait_for(lambda: len(_rows(cfg)) == 1, 30, "the row")
            assert other == _rows(cfg)[0]["model_version"]
            assert d.proc.poll() is None
        finally:
            assert 0 == d.stop()


class TestPointerThatNamesNothing:
    def test_logged_once_not_at_every_poll(self, make_config: Callable[..., Config]) -> None:
        cfg = make_config()  # model_poll_s 0.3
        store = cfg.model_store
        d = Daemon(cfg)
        try:
            d.wait_event("watching")
            atomic_write_text(store / model_store.CURRENT_FILE, "v0099\n")
            wait_for(lambda: bool(d.events("model_pointer_unreadable")), 30, "model_pointer_unreadable")
            time.sleep(2.0)  # several more polls
            assert 1 == len(d.events("model_pointer_unreadable"))
            atomic_write_text(store / model_store.CURRENT_FILE, "v0098\n")  # another error: logged
            wait_for(lambda: len(d.events("model_pointer_unreadable")) == 2, 30, "the second error")
            assert "v0098" in str(d.events("model_pointer_unreadable")[1]["error"])
            wait_for(lambda: "DEGRADED" in str(_status(cfg)["summary"]), 30, "status to say degraded")
            atomic_write_text(store / model_store.CURRENT_FILE, "v0001\n")
            wait_for(lambda: bool(d.events("model_pointer_readable")), 30, "model_pointer_readable")
            wait_for(lambda: bool(_status(cfg)["healthy"]), 30, "status healthy again")
        finally:
            assert 0 == d.stop()


def test_a_damaged_model_file_is_named_without_loading_tensorflow(tmp_path: Path) -> None:
    """The shipped version with model.keras cut short: loading it says the file is damaged (Keras
    itself said "File not found" for a file that is there), in a process that never imports
    TensorFlow."""
    repo = Path(__file__).resolve().parent.parent
    shipped = repo / "model_store"
    version = (shipped / "CURRENT").read_text().strip()
    store = tmp_path / "store"
    shutil.copytree(shipped / version, store / version, ignore=shutil.ignore_patterns("*.png"))
    (store / "CURRENT").write_text(version + "\n")
    model = store / version / "model.keras"
    model.write_bytes(model.read_bytes()[:400_000])
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from watcher.errors import ModelStoreError\n"
        "from watcher.inference import serving_predictor\n"
        "try:\n"
        f"    serving_predictor(Path({str(store)!r}))\n"
        "except ModelStoreError as exc:\n"
        "    print(exc)\n"
        "print('tensorflow' in sys.modules)\n"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=repo
    )
    message, tf_loaded = done.stdout.strip().splitlines()
    assert "model.keras is damaged or not a .keras file" in message
    assert "File not found" not in message
    assert "False" == tf_loaded
