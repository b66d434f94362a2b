"""Model store: publish, current pointer, promote, rollback."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import publish_tiny
from watcher import model_store
from watcher.errors import ModelStoreError
from watcher.inference import Predictor


class TestModelStore:
    def test_publish_numbers_versions(self, tmp_path: Path) -> None:
        """Versions are numbered in order; build folders disappear."""
        assert "v0001" == publish_tiny(tmp_path)
        assert "v0002" == publish_tiny(tmp_path, promote=False)
        assert ["v0001", "v0002"] == model_store.list_versions(tmp_path)
        assert [] == list(tmp_path.glob(".build-*"))
        assert "v0002" == model_store.read_metadata(tmp_path, "v0002")["version"]

    def test_no_current_is_a_clear_error(self, tmp_path: Path) -> None:
        """An empty store says how to get a model."""
        with pytest.raises(ModelStoreError, match="train a model first"):
            model_store.current_version(tmp_path)

    def test_incomplete_build_not_published(self, tmp_path: Path) -> None:
        """A build without model or metadata is refused."""
        build = model_store.new_build_dir(tmp_path)
        with pytest.raises(ModelStoreError, match="lacks"):
            model_store.publish(tmp_path, build)
        assert [] == model_store.list_versions(tmp_path)

    def test_promote_and_rollback_switch_what_loads(self, tmp_path: Path) -> None:
        """Promote moves CURRENT forward; rollback returns through the promotion history."""
        publish_tiny(tmp_path, threshold=0.3)
        publish_tiny(tmp_path, threshold=0.4)
        publish_tiny(tmp_path, threshold=0.6, promote=False)
        assert "v0002" == Predictor(tmp_path).version
        model_store.set_current(tmp_path, "v0003", reason="test")
        assert 0.6 == Predictor(tmp_path).threshold
        assert "v0002" == model_store.rollback(tmp_path)
        assert "v0001" == model_store.rollback(tmp_path)
        assert 0.3 == Predictor(tmp_path).threshold
        with pytest.raises(ModelStoreError, match="no earlier promoted version"):
            model_store.rollback(tmp_path)

    def test_unknown_version_refused(self, tmp_path: Path) -> None:
        """Promoting a version that does not exist changes nothing."""
        publish_tiny(tmp_path)
        with pytest.raises(ModelStoreError, match="no published version"):
            model_store.set_current(tmp_path, "v0042", reason="test")
        assert "v0001" == model_store.current_version(tmp_path)


def bare_store(tmp_path: Path, n_versions: int, history: list[dict[str, object]], current: str) -> Path:
    """A store of empty version folders (promote and rollback only need them to exist) with a
    hand-written history.jsonl and CURRENT."""
    store = tmp_path / "store"
    store.mkdir(parents=True)
    for i in range(1, n_versions + 1):
        (store / f"v{i:04d}").mkdir()
    lines = [json.dumps({"at": "2026-01-01T00:00:00Z", "reason": "test", **e}) + "\n" for e in history]
    (store / model_store.HISTORY_FILE).write_text("".join(lines))
    (store / model_store.CURRENT_FILE).write_text(current + "\n")
    return store


def history_of(store: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (store / model_store.HISTORY_FILE).read_text().splitlines()]


PROMOTER = """
import sys
from pathlib import Path

import structlog

from watcher import model_store

structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
print("ready", flush=True)
for line in sys.stdin:  # one store per line: promote argv[1] there as soon as it comes
    model_store.set_current(Path(line.strip()), sys.argv[1], reason="race")
    print("done", flush=True)
"""


class TestPromotionRecord:
    def test_two_promotions_at_once_leave_current_and_history_in_step(self, tmp_path: Path) -> None:
        """Two processes promoting at the same moment, 20 times: each time one waits for the
        other, so history.jsonl is a chain (each entry starts where the one before ended), its
        last entry names CURRENT, and rollback goes back through both."""
        stores = []
        for trial in range(20):
            store = tmp_path / f"s{trial}"
            store.mkdir()
            for v in ("v0001", "v0002", "v0003"):
                (store / v).mkdir()
            model_store.set_current(store, "v0001", reason="start")
            stores.append(store)
        with contextlib.ExitStack() as running:
            procs = [
                running.enter_context(
                    subprocess.Popen(
                        [sys.executable, "-c", PROMOTER, version],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        text=True,
                        cwd=Path(__file__).parents[1],
                    )
                )
                for version in ("v0002", "v0003")
            ]
            for p in procs:
                assert p.stdout is not None and "ready\n" == p.stdout.readline()
            for store in stores:
                for p in procs:  # both woken together
                    assert p.stdin is not None
                    p.stdin.write(f"{store}\n")
                    p.stdin.flush()
                for p in procs:
                    assert p.stdout is not None and "done\n" == p.stdout.readline()
            for p in procs:
                assert p.stdin is not None
                p.stdin.close()
                assert 0 == p.wait(timeout=30)
        for store in stores:
            entries = history_of(store)
            assert [None, "v0001", entries[1]["to"]] == [e["from"] for e in entries], entries
            current = model_store.current_version(store)
            assert entries[-1]["to"] == current
            assert ["v0001", entries[1]["to"], current] == model_store.promotion_stack(store)
            assert entries[1]["to"] == model_store.rollback(store)
            assert "v0001" == model_store.rollback(store)

    def test_current_and_lock_readable_by_all_whatever_the_umask(self, tmp_path: Path) -> None:
        """CURRENT is written 0644 (the daemon's user must read a pointer that root wrote), and
        so is the lock file."""
        store = bare_store(tmp_path, 1, [], "v0001")
        (store / model_store.CURRENT_FILE).unlink()
        old = os.umask(0o077)
        try:
            model_store.set_current(store, "v0001", reason="test")
        finally:
            os.umask(old)
        assert 0o644 == stat.S_IMODE((store / model_store.CURRENT_FILE).stat().st_mode)
        assert 0o644 == stat.S_IMODE((store / model_store.LOCK_FILE).stat().st_mode)

    def test_torn_history_line_does_not_swallow_the_next_entry(self, tmp_path: Path) -> None:
        """A promotion that died on a full disk mid-line (CURRENT not written) leaves a line
        without its newline; the next promotion's entry starts on a line of its own."""
        store = bare_store(
            tmp_path, 3, [{"from": None, "to": "v0001"}, {"from": "v0001", "to": "v0002"}], "v0002"
        )
        with (store / model_store.HISTORY_FILE).open("a") as fh:
            fh.write('{"at": "2026-01-01T00:01:00Z", "from": "v0002", "to')
        model_store.set_current(store, "v0003", reason="test")
        last = json.loads((store / model_store.HISTORY_FILE).read_text().splitlines()[-1])
        assert ("v0002", "v0003") == (last["from"], last["to"])
        assert ["v0001", "v0002", "v0003"] == model_store.promotion_stack(store)
        assert "v0002" == model_store.rollback(store)

    def test_a_recorded_promotion_that_never_happened_is_skipped(self, tmp_path: Path) -> None:
        """history.jsonl records v0002 -> v0003, but CURRENT could not be written (a full disk,
        a crash): CURRENT is the truth, so rollback goes to v0001, and a later promotion from
        v0002 does not make v0003, never served, the way back."""
        history = [
            {"from": None, "to": "v0001"},
            {"from": "v0001", "to": "v0002"},
            {"from": "v0002", "to": "v0003"},
        ]
        store = bare_store(tmp_path, 4, history, "v0002")
        assert ["v0001", "v0002"] == model_store.promotion_stack(store)
        model_store.set_current(store, "v0004", reason="test")
        assert ["v0001", "v0002", "v0004"] == model_store.promotion_stack(store)
        assert "v0002" == model_store.rollback(store)
        assert "v0001" == model_store.rollback(store)

    def test_refusal_names_the_end_of_history_and_current(self, tmp_path: Path) -> None:
        """Two promotions raced before the lock: history ends with v0002, CURRENT says v0003.
        The refusal says both, not only "no earlier version"."""
        history = [
            {"from": None, "to": "v0001"},
            {"from": "v0001", "to": "v0003"},
            {"from": "v0001", "to": "v0002"},
        ]
        store = bare_store(tmp_path, 3, history, "v0003")
        with pytest.raises(ModelStoreError) as refused:
            model_store.rollback(store)
        assert "ends with a promotion to v0002, CURRENT is v0003" in str(refused.value)
        assert "v0003" == model_store.current_version(store)

    def test_promoting_the_current_version_changes_nothing(self, tmp_path: Path) -> None:
        """Promoting what is current records nothing, so rollback still goes back one version;
        an old history with such an entry replays as if it were not there."""
        store = bare_store(
            tmp_path, 2, [{"from": None, "to": "v0001"}, {"from": "v0001", "to": "v0002"}], "v0002"
        )
        before = (store / model_store.HISTORY_FILE).read_bytes()
        changed = model_store.set_current(store, "v0002", reason="test")
        assert before == (store / model_store.HISTORY_FILE).read_bytes()
        assert "v0001" == model_store.rollback(store)
        assert changed is False
        old = bare_store(
            tmp_path / "old",
            2,
            [
                {"from": None, "to": "v0001"},
                {"from": "v0001", "to": "v0002"},
                {"from": "v0002", "to": "v0002"},
            ],
            "v0002",
        )
        assert "v0001" == model_store.rollback(old)

    def test_unreadable_current_is_a_store_error(self, tmp_path: Path) -> None:
        """A CURRENT that cannot be read (EIO, permissions; here a folder in its place) is a
        ModelStoreError naming the file, not an OSError."""
        store = bare_store(tmp_path, 1, [], "v0001")
        (store / model_store.CURRENT_FILE).unlink()
        (store / model_store.CURRENT_FILE).mkdir()
        with pytest.raises(ModelStoreError, match=f"cannot read {store / model_store.CURRENT_FILE}"):
            model_store.current_version(store)


class TestVersionNames:
    @staticmethod
    def publish_files(store: Path, at_least: int = 1) -> str:
        build = model_store.new_build_dir(store)
        (build / model_store.MODEL_FILE).write_bytes(b"weights")
        (build / model_store.METADATA_FILE).write_text("{}")
        return model_store.publish(store, build, at_least=at_least)

    def test_a_deleted_versions_name_is_never_given_again(self, tmp_path: Path) -> None:
        """A version promoted, rolled back and deleted keeps its name: the next publish is one
        past every version history.jsonl names, not only past the folders left."""
        store = tmp_path / "store"
        store.mkdir()
        assert "v0001" == self.publish_files(store)
        model_store.set_current(store, "v0001", reason="test")
        assert "v0002" == self.publish_files(store)
        model_store.set_current(store, "v0002", reason="test")
        model_store.rollback(store)
        shutil.rmtree(store / "v0002")
        assert "v0003" == self.publish_files(store)
        assert "v0009" == self.publish_files(store, at_least=9)  # init's bundled name still kept


def test_an_interrupted_rollback_does_not_stop_the_next(tmp_path: Path) -> None:
    """A rollback whose history line was written but whose CURRENT was not (a full disk, a kill
    between the two) left the replay one version short: the next rollback was refused, saying
    the history did not record CURRENT as promoted. The last entry, whose "from" is still
    CURRENT, is now taken as never applied."""
    store = tmp_path / "store"
    for v in ("v0001", "v0002"):
        (store / v).mkdir(parents=True)
    history = [
        {"at": "2026-11-01T00:00:00Z", "from": None, "to": "v0001", "reason": "t", "rollback": False},
        {"at": "2026-11-02T00:00:00Z", "from": "v0001", "to": "v0002", "reason": "t", "rollback": False},
        {"at": "2026-11-03T00:00:00Z", "from": "v0002", "to": "v0001", "reason": "r", "rollback": True},
    ]
    (store / model_store.HISTORY_FILE).write_text("".join(json.dumps(e) + "\n" for e in history))
    (store / model_store.CURRENT_FILE).write_text("v0002\n")  # the rollback's CURRENT never written
    assert ["v0001", "v0002"] == model_store.promotion_stack(store)
    assert "v0001" == model_store.rollback(store)
    assert "v0001" == model_store.current_version(store)
