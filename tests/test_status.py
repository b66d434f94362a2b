"""The state file, its health verdict, and `xray-watcher status` against a real lock holder."""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from watcher import status
from watcher.config import Config, load_config


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    """A real config with real folders (no model needed: status never loads one)."""
    root = tmp_path / "svc"
    for name in ("inbox", "processed", "failed", "model_store", "results"):
        (root / name).mkdir(parents=True)
    raw = {
        "inbox": "inbox",
        "processed": "processed",
        "failed": "failed",
        "results": "results/results.csv",
        "model_store": "model_store",
        "instance_id": "ward-a",
    }
    (root / "config.yaml").write_text(yaml.safe_dump(raw))
    return load_config(root / "config.yaml")


def state_for(cfg: Config, pid: int, tick_age_s: float = 0.0, **extra: object) -> dict[str, object]:
    now = time.time()
    state = status.make_state(
        cfg,
        started_at=now - 3725,
        model_version="v0002",
        files_ok=1234,
        files_failed=5,
        queue_depth=3,
        last_batch_at=now - 40,
        disk={"results_bytes": 2048, "processed_bytes": 5 << 20, "failed_bytes": 0, "free_bytes": 7 << 30},
        now=now - tick_age_s,
    )
    return {**state, "pid": pid, **extra}


def _holding(lock: Path, code: str) -> Iterator[subprocess.Popen[str]]:
    """A separate process running ``code`` (which takes ``lock`` and prints 'held'), until we end it."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert "held\n" == proc.stdout.readline()
    yield proc
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(10)
    proc.stdout.close()


@pytest.fixture
def lock_holder(cfg: Config) -> Iterator[subprocess.Popen[str]]:
    """A separate process holding the instance lock exclusively, as a running daemon does."""
    yield from _holding(
        cfg.work_dir / "lock",
        "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644); "
        "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()",
    )


@pytest.fixture
def daemon_lock(cfg: Config) -> Iterator[subprocess.Popen[str]]:
    """A separate process that takes the instance lock as the daemon does (``fsutil.try_lock``, then
    its pid into the lock file, like ``service.InstanceLock``) and writes no state: a daemon loading
    its model."""
    yield from _holding(
        cfg.work_dir / "lock",
        "import os, sys; from pathlib import Path; from watcher.fsutil import try_lock\n"
        "fd = try_lock(Path(sys.argv[1])); assert fd is not None\n"
        "os.ftruncate(fd, 0); os.write(fd, f'{os.getpid()}\\n'.encode())\n"
        "print('held', flush=True); sys.stdin.read()\n",
    )


def dead_pid() -> int:
    """The pid of a process that has exited (a daemon killed before the restart)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    return int(done.stdout)


class TestStatusWriter:
    def test_round_trip(self, tmp_path: Path) -> None:
        """What is written is what is read; no temp file is left beside it."""
        path = tmp_path / "work" / "status.json"
        writer = status.StatusWriter(path)
        writer.write({"pid": 1, "files_ok": 2})
        writer.write({"pid": 1, "files_ok": 3})
        assert {"pid": 1, "files_ok": 3} == status.read_status(path)
        assert ["status.json"] == sorted(p.name for p in path.parent.iterdir())

    def test_atomic_under_concurrent_reads(self, tmp_path: Path) -> None:
        """A reader polling while another process rewrites never sees a partial file."""
        path = tmp_path / "status.json"
        status.StatusWriter(path).write({"n": -1})
        code = (
            "import sys; from pathlib import Path; from watcher.status import StatusWriter\n"
            "w = StatusWriter(Path(sys.argv[1]))\n"
            "for i in range(500): w.write({'n': i, 'pad': 'x' * 5000})\n"
        )
        proc = subprocess.Popen([sys.executable, "-c", code, str(path)])
        seen = 0
        while proc.poll() is None:
            assert isinstance(status.read_status(path)["n"], int)  # raises on a torn file
            seen += 1
        assert 0 == proc.returncode
        assert 499 == status.read_status(path)["n"]
        assert seen > 0

    def test_remove(self, tmp_path: Path) -> None:
        """remove() deletes the file and tolerates its absence."""
        writer = status.StatusWriter(tmp_path / "status.json")
        writer.write({})
        writer.remove()
        writer.remove()
        assert [] == list(tmp_path.iterdir())

    def test_read_rejects_non_object(self, tmp_path: Path) -> None:
        """A JSON list is not a state."""
        path = tmp_path / "status.json"
        path.write_text("[1, 2]")
        with pytest.raises(ValueError, match="expected a JSON object"):
            status.read_status(path)


class TestMakeState:
    def test_fields(self, cfg: Config) -> None:
        """Every documented field is there, times as ISO UTC, and the state is JSON."""
        state = status.make_state(
            cfg,
            started_at=1_700_000_000.0,
            model_version="v0003",
            files_ok=7,
            files_failed=1,
            queue_depth=0,
            last_batch_at=None,
            now=1_700_000_090.5,
        )
        assert {
            "version",
            "pid",
            "instance",
            "config",
            "started_at",
            "uptime_s",
            "model_version",
            "files_ok",
            "files_failed",
            "queue_depth",
            "last_batch_at",
            "last_tick_at",
            "tick_s",
            "disk",
        } == set(state)
        assert "2023-11-14T22:13:20Z" == state["started_at"]
        assert 90.5 == state["uptime_s"]
        assert None is state["last_batch_at"]
        assert os.getpid() == state["pid"]
        assert "ward-a" == state["instance"]
        assert str(cfg.source) == state["config"]
        assert state == json.loads(json.dumps(state))

    @pytest.mark.parametrize("t", [0.0, 1_700_000_000.0, 1_999_999_999.0])
    def test_time_round_trip(self, t: float) -> None:
        """parse_utc inverts iso_utc (to the second)."""
        assert t == status.parse_utc(status.iso_utc(t))

    @pytest.mark.parametrize("bad", [None, "", "yesterday", 5])
    def test_parse_bad_time(self, bad: object) -> None:
        """Anything not a time parses to None."""
        assert None is status.parse_utc(bad)


class TestSummaryAndEvaluate:
    def test_summary_line(self) -> None:
        """The STATUS= line: version, counts with thousands separators, queue, last batch."""
        state = {
            "model_version": "v0002",
            "files_ok": 1234,
            "files_failed": 5,
            "queue_depth": 0,
            "last_batch_at": "2024-05-01T12:03:04Z",
        }
        expected = "serving v0002 · 1,234 ok · 5 failed · queue 0 · last batch 12:03:04Z"
        assert expected == status.summary_line(state)

    def test_summary_line_before_any_batch(self) -> None:
        """No batch yet is said in words; missing fields do not raise."""
        assert "serving ? · ? ok · ? failed · queue ? · no batch yet" == status.summary_line({})

    def test_fresh_is_healthy(self) -> None:
        """A tick 4 s old with a 15 s limit is healthy; the summary is the STATUS= line."""
        state = {"last_tick_at": status.iso_utc(1000.0), "model_version": "v0001"}
        healthy, summary = status.evaluate(state, now=1004.0, stale_after_s=15)
        assert healthy
        assert summary.startswith("serving v0001")

    def test_stale(self) -> None:
        """A tick older than the limit is stale, with its age and the limit in words."""
        state = {"last_tick_at": status.iso_utc(1000.0)}
        healthy, summary = status.evaluate(state, now=1016.0, stale_after_s=15)
        assert not healthy
        assert summary.startswith("stale: last tick 16 s ago (limit 15 s)")

    def test_no_tick(self) -> None:
        """A state without a tick is not healthy."""
        assert (False, "no tick recorded in the state file") == status.evaluate({}, 0.0, 15)

    @pytest.mark.parametrize(("tick_s", "expected"), [(5.0, 15.0), (2, 6.0), (None, 15.0), (-1, 15.0)])
    def test_stale_after(self, tick_s: object, expected: float) -> None:
        """Three tick intervals, the default interval being 5 s."""
        assert expected == status.stale_after({"tick_s": tick_s})


class TestDiskUsage:
    def test_sizes_and_cache(self, cfg: Config) -> None:
        """Sizes of results (rotated ones too), processed/ and failed/; cached until due."""
        cfg.results.write_bytes(b"x" * 100)
        (cfg.results.parent / "results-2024-04.csv").write_bytes(b"x" * 50)
        (cfg.processed / "NORMAL").mkdir()
        (cfg.processed / "NORMAL" / "a.jpeg").write_bytes(b"x" * 1000)
        (cfg.failed / "b.png").write_bytes(b"x" * 10)
        os.symlink("/etc/passwd", cfg.failed / "link.png")  # a link is not followed or counted
        usage = status.DiskUsage.for_config(cfg, every_s=3600)
        first = usage.current(wait=True)
        assert (150, 1000, 10) == (first["results_bytes"], first["processed_bytes"], first["failed_bytes"])
        assert first["free_bytes"] > 0
        (cfg.processed / "NORMAL" / "c.jpeg").write_bytes(b"x" * 1000)
        assert 1000 == usage.current(wait=True)["processed_bytes"]  # not due: the cached walk
        usage.every_s = 0
        assert 2000 == usage.current(wait=True)["processed_bytes"]

    def test_never_blocks_on_the_walk(self, cfg: Config) -> None:
        """Without wait, the first call returns at once, before any walk has finished."""
        usage = status.DiskUsage.for_config(cfg)
        usage.measure = lambda: time.sleep(0.5) or {"processed_bytes": 1}  # type: ignore[method-assign]
        t0 = time.monotonic()
        first = usage.current()
        assert time.monotonic() - t0 < 0.3
        assert "processed_bytes" not in first
        assert "free_bytes" in first


class TestCli:
    def test_not_running(self, cfg: Config, capsys: pytest.CaptureFixture[str]) -> None:
        """No lock held: exit 1, 'NOT running', even with a fresh-looking state file left behind."""
        status.StatusWriter(cfg.status_file).write(state_for(cfg, os.getpid()))
        assert 1 == status.cli_main(cfg, as_json=False)
        out = capsys.readouterr().out
        assert "xray-watcher instance 'ward-a': NOT running" in out
        assert "not running (the instance lock is free)" in out

    def test_lock_is_released_after_checking(self, cfg: Config) -> None:
        """status takes only a shared lock and drops it: a daemon can still lock exclusively."""
        cfg.work_dir.mkdir(parents=True)
        (cfg.work_dir / "lock").write_text("")
        status.StatusWriter(cfg.status_file).write(state_for(cfg, os.getpid()))
        assert 1 == status.cli_main(cfg, as_json=True)
        fd = os.open(cfg.work_dir / "lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what InstanceLock.acquire does
        finally:
            os.close(fd)

    def test_a_probe_at_the_instant_of_start_does_not_refuse_the_daemon(self, cfg: Config) -> None:
        """`status`'s shared lock, held at the moment a daemon starts, made it exit with "another
        xray-watcher ... already works here". The daemon now asks again for a second; a lock held
        for good is still refused."""
        import threading

        from watcher.errors import WatcherError
        from watcher.service import InstanceLock

        cfg.work_dir.mkdir(parents=True)
        lock = cfg.work_dir / "lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_SH)  # what status.lock_held takes
        threading.Timer(0.3, os.close, (fd,)).start()
        daemon_lock = InstanceLock(cfg.work_dir)
        daemon_lock.acquire()
        daemon_lock.release()
        held = os.open(lock, os.O_RDWR)
        fcntl.flock(held, fcntl.LOCK_EX)
        try:
            with pytest.raises(WatcherError, match="already works on this inbox"):
                InstanceLock(cfg.work_dir).acquire()
        finally:
            os.close(held)

    def test_healthy(
        self, cfg: Config, lock_holder: subprocess.Popen[str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Lock held, pid alive, tick fresh: exit 0 and the daemon's figures."""
        status.StatusWriter(cfg.status_file).write(state_for(cfg, lock_holder.pid, tick_age_s=1))
        assert 0 == status.cli_main(cfg, as_json=False)
        out = capsys.readouterr().out
        assert "xray-watcher instance 'ward-a': healthy" in out
        for text in (
            f"pid        {lock_holder.pid}",
            "uptime     1 h 02 min",
            "model      v0002",
            "files      1,234 ok, 5 failed",
            "queue      3",
            "ago)",
            "results 2.0 KiB, processed 5.0 MiB, failed 0 B; 7.0 GiB free",
        ):
            assert text in out

    def test_healthy_json(
        self, cfg: Config, lock_holder: subprocess.Popen[str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--json: one object with running, healthy, summary and the state itself."""
        status.StatusWriter(cfg.status_file).write(state_for(cfg, lock_holder.pid))
        assert 0 == status.cli_main(cfg, as_json=True)
        report = json.loads(capsys.readouterr().out)
        assert (True, True) == (report["running"], report["healthy"])
        assert report["summary"].startswith("serving v0002 · 1,234 ok · 5 failed · queue 3 · last batch ")
        assert lock_holder.pid == report["state"]["pid"]
        assert str(cfg.status_file) == report["status_file"]

    def test_stale(
        self, cfg: Config, lock_holder: subprocess.Popen[str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Running but no tick for more than 3 intervals: exit 1, 'NOT healthy'."""
        status.StatusWriter(cfg.status_file).write(state_for(cfg, lock_holder.pid, tick_age_s=60))
        assert 1 == status.cli_main(cfg, as_json=False)
        out = capsys.readouterr().out
        assert "running, NOT healthy" in out
        assert re.search(r"stale: last tick 6[01] s ago \(limit 15 s\)", out)

    def test_pid_gone(
        self, cfg: Config, lock_holder: subprocess.Popen[str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The lock is held (no pid in the lock file) but the state names a dead pid: the state is an
        earlier daemon's and the holder is starting: running, not healthy, exit 1."""
        pid = dead_pid()
        status.StatusWriter(cfg.status_file).write(state_for(cfg, pid))
        assert 1 == status.cli_main(cfg, as_json=True)
        report = json.loads(capsys.readouterr().out)
        assert (True, False) == (report["running"], report["healthy"])
        assert report["summary"].startswith("starting: a process holds the instance lock and has not written")
        assert f"the state file is an earlier daemon's (pid {pid}, gone)" in report["summary"]
        assert (None, None, pid) == (report["lock_pid"], report["state"], report["stale_state"]["pid"])

    def test_restarted_daemon_before_its_first_state(
        self, cfg: Config, daemon_lock: subprocess.Popen[str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A daemon killed and restarted: the new one holds the lock (its pid in the lock file) and
        loads its model; the state file is still the killed one's. Starting, not 'not running'."""
        old = dead_pid()
        status.StatusWriter(cfg.status_file).write(state_for(cfg, old, tick_age_s=20))
        assert 1 == status.cli_main(cfg, as_json=True)
        report = json.loads(capsys.readouterr().out)
        assert (True, False) == (report["running"], report["healthy"])
        assert daemon_lock.pid == report["lock_pid"]
        assert re.match(
            rf"starting: pid {daemon_lock.pid} holds the instance lock \(taken \d+ s ago\) and has not "
            rf"written its state yet \(loading the model\?\); the state file is an earlier daemon's "
            rf"\(pid {old}, gone\)$",
            report["summary"],
        ), report["summary"]
        assert None is report["state"] and old == report["stale_state"]["pid"]

        assert 1 == status.cli_main(cfg, as_json=False)
        out = capsys.readouterr().out
        assert "xray-watcher instance 'ward-a': running, NOT healthy" in out
        assert f"  pid        {daemon_lock.pid}\n" in out
        assert "1,234 ok" not in out  # no figures of the killed daemon

    def test_state_pid_reused_by_another_process(
        self, cfg: Config, daemon_lock: subprocess.Popen[str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The killed daemon's pid now belongs to an unrelated live process (here: this test) and its
        last tick looks fresh: the lock file names the real holder, so starting, never healthy."""
        status.StatusWriter(cfg.status_file).write(state_for(cfg, os.getpid(), tick_age_s=1))
        assert 1 == status.cli_main(cfg, as_json=True)
        report = json.loads(capsys.readouterr().out)
        assert (True, False) == (report["running"], report["healthy"])
        assert report["summary"].startswith(f"starting: pid {daemon_lock.pid} holds the instance lock")
        assert f"(pid {os.getpid()}, not the lock holder)" in report["summary"]

    def test_healthy_lock_holder_named_in_lock(
        self, cfg: Config, daemon_lock: subprocess.Popen[str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The state is the lock holder's own (the pids agree) and fresh: healthy, exit 0."""
        status.StatusWriter(cfg.status_file).write(state_for(cfg, daemon_lock.pid, tick_age_s=1))
        assert 0 == status.cli_main(cfg, as_json=True)
        report = json.loads(capsys.readouterr().out)
        assert (True, True, daemon_lock.pid) == (report["running"], report["healthy"], report["lock_pid"])
        assert daemon_lock.pid == report["state"]["pid"]

    def test_starting_names_the_lock_holder(
        self, cfg: Config, daemon_lock: subprocess.Popen[str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """No state file yet: the summary names the holder's pid and how long ago it took the lock."""
        assert 1 == status.cli_main(cfg, as_json=True)
        report = json.loads(capsys.readouterr().out)
        assert (True, False) == (report["running"], report["healthy"])
        expected = rf"starting: pid {daemon_lock.pid} holds the instance lock \(taken \d+ s ago\), no state"
        assert re.match(expected, report["summary"]), report["summary"]

    def test_starting(
        self, cfg: Config, lock_holder: subprocess.Popen[str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Lock held and no state file yet: running, not yet healthy."""
        assert 1 == status.cli_main(cfg, as_json=True)
        report = json.loads(capsys.readouterr().out)
        assert (True, False) == (report["running"], report["healthy"])
        assert report["summary"].startswith("starting")

    def test_corrupt_state_file(
        self, cfg: Config, lock_holder: subprocess.Popen[str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """An unreadable state file is reported, not a traceback."""
        cfg.status_file.write_text("{not json")
        assert 1 == status.cli_main(cfg, as_json=False)
        assert f"cannot read {cfg.status_file}" in capsys.readouterr().out
