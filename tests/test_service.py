"""End to end: real files in a temp inbox, a tiny real model, ``run --once`` and a real daemon."""

from __future__ import annotations

import contextlib
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from structlog.testing import capture_logs

from tests.conftest import FULLRES, fixture_images, publish_tiny
from tests.harness import Daemon, log_output_held, notify_address, returns_within, wait_for
from watcher.config import Config
from watcher.errors import WatcherError
from watcher.report import ResultRow, ResultsWriter, read_rows, utc_now
from watcher.service import Service, thumbnail


def rows_of(cfg: Config) -> list[dict[str, str]]:
    return [dict(r) for r in read_rows(cfg.results)]


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink())


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ((750, 1000), (192, 256)),  # two halvings, then bilinear
        ((1001, 777), (256, 199)),  # odd sizes: the last row and column dropped at each halving
        ((512, 512), (256, 256)),  # exactly twice: one halving, nothing else
        ((300, 200), (256, 171)),  # under twice: bilinear only
        ((100, 60), (100, 60)),  # small: a copy, never enlarged
        ((4000, 3), (256, 1)),  # a sliver keeps at least one pixel
    ],
)
def test_thumbnail_size_and_content(shape: tuple[int, int], expected: tuple[int, int]) -> None:
    """The longest side is at most 256, the aspect kept, the grey levels too; never a view."""
    import numpy as np

    rng = np.random.default_rng(0)
    image = np.clip(rng.normal(120, 30, shape), 0, 255).astype(np.uint8)
    thumb = thumbnail(image)
    assert expected == thumb.shape
    assert np.uint8 == thumb.dtype
    assert abs(float(thumb.mean()) - float(image.mean())) < 2.0
    thumb[...] = 0
    assert image.any()  # writing to the thumbnail leaves the radiograph alone


class TestRunOnce:
    def test_end_to_end(self, make_config: Callable[..., Config]) -> None:
        """Every file gets one row and ends in processed/<LABEL>/ or failed/; others stay."""
        cfg = make_config()
        images = fixture_images()[:6]
        for img in images[:4]:
            shutil.copy(img, cfg.inbox / img.name)
        (cfg.inbox / "ward 3" / "day,1").mkdir(parents=True)
        for img in images[4:]:
            shutil.copy(img, cfg.inbox / "ward 3" / "day,1" / img.name)
        shutil.copy(FULLRES[0], cfg.inbox / "FULL.JPEG")
        (cfg.inbox / "empty.png").write_bytes(b"")
        (cfg.inbox / "cut.jpg").write_bytes(FULLRES[0].read_bytes()[:5000])
        (cfg.inbox / ".hidden.jpg").write_bytes(images[0].read_bytes())
        (cfg.inbox / "upload.jpg.part").write_bytes(images[0].read_bytes())
        (cfg.inbox / "notes.txt").write_text("not an image extension")

        assert 0 == Service(cfg).run(once=True)

        rows = rows_of(cfg)
        assert 9 == len(rows)
        by_file = {r["file"]: r for r in rows}
        assert {"ward 3/day,1/" + i.name for i in images[4:]} <= set(by_file)
        ok = [r for r in rows if r["status"] == "ok"]
        assert 7 == len(ok)
        for r in ok:
            p = float(r["probability"])
            assert 0.0 <= p <= 1.0
            assert r["label"] == ("PNEUMONIA" if p >= float(r["threshold"]) else "NORMAL")
            assert "v0001" == r["model_version"]
            assert Path(r["destination"]).is_file()
            assert Path(r["destination"]).is_relative_to(cfg.processed / r["label"])
            assert 64 == len(r["sha256"])
        assert "empty" in by_file["empty.png"]["error"]
        assert "truncated" in by_file["cut.jpg"]["error"]
        assert "" == by_file["cut.jpg"]["label"]
        assert {cfg.failed / "empty.png", cfg.failed / "cut.jpg"} == set(files_under(cfg.failed))
        nested = [Path(by_file["ward 3/day,1/" + i.name]["destination"]) for i in images[4:]]
        assert all("ward 3/day,1" in str(p.parent) for p in nested)
        left = {p.name for p in files_under(cfg.inbox) if ".xray-watcher" not in p.parts}
        assert (
            {".hidden.jpg", "upload.jpg.part", "notes.txt", ".gitkeep"}
            >= left
            >= {".hidden.jpg", "upload.jpg.part", "notes.txt"}
        )
        assert [] == [p for p in files_under(cfg.work_dir / "claimed")]
        frame = pd.read_csv(cfg.results)
        assert 9 == len(frame)

    def test_same_name_twice_never_overwrites(self, make_config: Callable[..., Config]) -> None:
        """A second file with a taken name is kept under a hash-tagged name."""
        cfg = make_config()
        first = fixture_images()[0].read_bytes()
        second = first + b"\x00\x00"  # same picture (same label), other bytes
        (cfg.inbox / "x.jpeg").write_bytes(first)
        Service(cfg).run(once=True)
        (cfg.inbox / "x.jpeg").write_bytes(second)
        Service(cfg).run(once=True)
        rows = rows_of(cfg)
        dests = [Path(r["destination"]) for r in rows]
        assert dests[0].parent == dests[1].parent
        assert "x.jpeg" == dests[0].name
        assert first == dests[0].read_bytes()
        assert second == dests[1].read_bytes()
        assert rows[1]["sha256"][:8] in dests[1].name

    def test_batches_respect_max_size(self, make_config: Callable[..., Config]) -> None:
        """Ten files with max_size 4 are scored in batches of at most 4."""
        from structlog.testing import capture_logs

        cfg = make_config(batch={"max_size": 4, "max_wait_ms": 50})
        for i, img in enumerate(fixture_images()[:10]):
            shutil.copy(img, cfg.inbox / f"{i}.jpeg")
        with capture_logs() as logs:
            Service(cfg).run(once=True)
        sizes = [e["n_files"] for e in logs if e["event"] == "batch_done"]
        assert 10 == sum(sizes)
        assert max(sizes) <= 4
        assert 10 == len(rows_of(cfg))

    def test_recovers_claimed_file_without_row(self, make_config: Callable[..., Config]) -> None:
        """A file left claimed by a crash before its row is processed at the next start."""
        cfg = make_config()
        claim = cfg.work_dir / "claimed" / "abc" / "sub"
        claim.mkdir(parents=True)
        shutil.copy(fixture_images()[0], claim / "a.jpeg")
        Service(cfg).run(once=True)
        rows = rows_of(cfg)
        assert ["sub/a.jpeg"] == [r["file"] for r in rows]
        assert Path(rows[0]["destination"]).is_file()
        assert [] == files_under(cfg.work_dir / "claimed")

    def test_recovers_claimed_file_with_row(self, make_config: Callable[..., Config]) -> None:
        """A crash between row and move: the file goes where its row says; no second row."""
        import hashlib

        cfg = make_config()
        img = fixture_images()[0]
        claim = cfg.work_dir / "claimed" / "abc"
        claim.mkdir(parents=True)
        shutil.copy(img, claim / "a.jpeg")
        dest = cfg.processed / "NORMAL" / "a.jpeg"
        sha = hashlib.sha256(img.read_bytes()).hexdigest()
        ResultsWriter(cfg.results).open().append(
            [
                ResultRow(
                    processed_at=utc_now(),
                    file="a.jpeg",
                    sha256=sha,
                    status="ok",
                    label="NORMAL",
                    probability="0.1",
                    threshold="0.5",
                    model_version="v0001",
                    destination=str(dest),
                    error="",
                    width="224",
                    height="224",
                    bytes="1",
                    instance=cfg.instance_id,
                    claim="abc",
                )
            ]
        )
        Service(cfg).run(once=True)
        assert 1 == len(rows_of(cfg))
        assert img.read_bytes() == dest.read_bytes()
        assert [] == files_under(cfg.work_dir / "claimed")

    def test_reporter_failure_stops_the_run_and_loses_nothing(
        self, make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An unexpected error in the reporting stage (rows, moves) ends the run with that error
        instead of hanging the scoring stage; the files stay claimed and the next start files
        every one of them, once."""
        import watcher.service as service_module

        cfg = make_config(batch={"max_size": 2, "max_wait_ms": 1})
        names = [f"{i}.jpeg" for i in range(8)]
        for name, img in zip(names, fixture_images()[:8], strict=True):
            shutil.copy(img, cfg.inbox / name)
        real = service_module.population_warning
        calls = []

        def failing(*args: object) -> str:
            calls.append(args)
            if len(calls) == 3:  # in the second batch's rows
                raise RuntimeError("bug in the reporter")
            return real(*args)  # type: ignore[arg-type]

        monkeypatch.setattr(service_module, "population_warning", failing)
        outcome: list[BaseException | int] = []

        def run() -> None:
            try:
                outcome.append(Service(cfg).run(once=True))
            except BaseException as exc:  # the test inspects it
                outcome.append(exc)

        t = threading.Thread(target=run)
        t.start()
        t.join(120)
        assert not t.is_alive(), "the run hung after the reporter failed"
        assert 1 == len(outcome) and isinstance(outcome[0], RuntimeError), outcome
        first = [r["file"] for r in rows_of(cfg)]
        assert 2 == len(first)  # the first batch only; the second failed before its append
        left = [p for p in files_under(cfg.work_dir / "claimed")]
        assert 6 == len(left)  # still claimed: nothing lost, nothing filed without a row

        monkeypatch.setattr(service_module, "population_warning", real)
        assert 0 == Service(cfg).run(once=True)
        rows = rows_of(cfg)
        assert sorted(names) == sorted(r["file"] for r in rows)  # each once
        assert all(Path(r["destination"]).is_file() for r in rows)
        assert [] == files_under(cfg.work_dir / "claimed")

    def test_second_instance_with_same_id_refused(self, make_config: Callable[..., Config]) -> None:
        """Two daemons with one instance id on one inbox: the second refuses to start."""
        cfg = make_config()
        first = Service(cfg)
        t = threading.Thread(target=first.run)
        t.start()
        try:
            deadline = time.monotonic() + 30
            while not (cfg.work_dir / "lock").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)
            with pytest.raises(WatcherError, match="same instance_id"):
                Service(cfg).run(once=True)
        finally:
            first.request_stop()
            t.join(30)
        assert not t.is_alive()

    def test_the_decoder_hands_a_batch_on_before_its_decodes_finish(
        self, tmp_path: Path, make_config: Callable[..., Config]
    ) -> None:
        """The decoder queues a batch as soon as its decodes are submitted and goes on to claim
        the next, so the pool never idles at a batch boundary; inference waits for the decodes,
        feeding the watchdog, and logs ``decode_slow`` with the files when they take too long."""
        from concurrent.futures import ThreadPoolExecutor
        from pathlib import PurePosixPath

        from watcher.inference import Predictor
        from watcher.service import Item

        cfg = make_config()
        svc = Service(cfg, predictor=Predictor(cfg.model_store))
        items = []
        for path in fixture_images()[:3]:
            shutil.copy(path, tmp_path / path.name)
            items.append(Item(rel=PurePosixPath(path.name), path=tmp_path / path.name))
        gate = threading.Event()
        with ThreadPoolExecutor(1) as pool:
            pool.submit(gate.wait, 30)  # the only worker is busy: no decode can finish yet
            assert returns_within(svc._decode_batch, (pool, items, 1 << 20), timeout=10)
            assert 3 == svc.queue_depth()  # queued for inference, not yet decoded
            decoding = svc._decoded.get_nowait()
            assert not any(f.done() for f in decoding.decodes)
            waits: list[float] = []
            threading.Timer(1.0, gate.set).start()
            with capture_logs() as logs:
                got = decoding.result(keep_alive=lambda: waits.append(time.monotonic()), slow_after=0.4)
        assert got is items
        assert waits, "inference waited for the decodes without keeping the watchdog fed"
        assert all(i.model_input is not None and not i.error for i in items)
        slow = [e for e in logs if e["event"] == "decode_slow"]
        assert slow and "warning" == slow[0]["log_level"]  # the wait is named, with its files
        assert sorted(p.name for p in fixture_images()[:3]) == slow[0]["files"]
        assert len(slow) <= 3  # once per period, not every 0.2 s poll

    def test_broken_model_keeps_previous_serving(self, make_config: Callable[..., Config]) -> None:
        """A newly promoted version that fails to load leaves the old one serving."""
        from watcher import model_store

        cfg = make_config(model_poll_s=0.1)
        v2 = publish_tiny(cfg.model_store, promote=False)
        (cfg.model_store / v2 / "model.keras").write_bytes(b"garbage")
        model_store.set_current(cfg.model_store, v2, reason="test")
        svc = Service(cfg, predictor=None)
        from watcher.inference import Predictor

        svc.predictor = Predictor(cfg.model_store, "v0001")
        shutil.copy(fixture_images()[0], cfg.inbox / "a.jpeg")
        time.sleep(0.2)
        svc.run(once=True)
        assert ["v0001"] == [r["model_version"] for r in rows_of(cfg)]


class TestSignals:
    def test_the_handler_only_queues_the_signal(self, make_config: Callable[..., Config]) -> None:
        """The signal handler logs nothing and takes no lock: Python runs it between any two
        steps of the main thread, perhaps while that thread holds the log's write lock, so a
        handler that logged there would deadlock the daemon. The main thread then logs it
        and acts on it."""
        svc = Service(make_config())
        saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        try:
            svc.install_signal_handlers()
            handler = signal.getsignal(signal.SIGHUP)
            assert callable(handler)
            with log_output_held():
                for sig in (signal.SIGHUP, signal.SIGTERM):
                    assert returns_within(handler, (sig, None), 2.0), f"{sig.name}: blocked on the log"
            assert not svc._reload_now.is_set() and not svc._stop_taking.is_set()  # not yet: queued
        finally:
            for sig, previous in saved.items():
                signal.signal(sig, previous)
        with capture_logs() as logs:
            svc._take_signals()  # what the main thread does at each turn of its loops
        assert ["SIGHUP", "SIGTERM"] == [e["signal"] for e in logs if e["event"] == "signal_received"]
        assert svc._reload_now.is_set() and svc._stop_taking.is_set()

    def test_a_storm_of_sighups_while_files_flow_then_sigterm(
        self, make_config: Callable[..., Config]
    ) -> None:
        """Fifty SIGHUPs while 40 files are scored: every file gets its row, each signal is
        logged by the main thread, and SIGTERM still stops the daemon cleanly."""
        cfg = make_config(batch={"max_size": 4, "max_wait_ms": 20}, ingest={"settle_ms": 100})
        d = Daemon(cfg)
        try:
            wait_for(lambda: bool(d.events("watching")), 120, "the daemon to start watching")
            stage = cfg.inbox.parent / "stage"
            stage.mkdir()
            images = fixture_images()
            for i in range(40):
                shutil.copy(images[i % len(images)], stage / f"f{i:02d}.jpeg")
            for i in range(40):
                (stage / f"f{i:02d}.jpeg").rename(cfg.inbox / f"f{i:02d}.jpeg")
                if i % 4 == 0:
                    for _ in range(5):
                        d.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: len(rows_of(cfg)) == 40, 60, "a row for every file")
            wait_for(lambda: len(d.events("signal_received")) >= 1, 30, "the signals to be logged")
        finally:
            rc = d.stop()
        assert 0 == rc
        got = [e["signal"] for e in d.events("signal_received")]
        assert "SIGTERM" == got[-1]
        assert 1 <= got.count("SIGHUP") <= 50  # signals that arrive together may be delivered once
        assert d.events("stopped")

    def test_sigabrt_from_the_systemd_watchdog_leaves_every_threads_stack(
        self, make_config: Callable[..., Config]
    ) -> None:
        """systemd kills a daemon that stopped pinging its watchdog with SIGABRT: the process
        still dies of it, but first writes each thread's Python stack to stderr (the journal)."""
        cfg = make_config()
        d = Daemon(cfg)
        d.wait_event("watching")
        # the first state file is written just before the main thread enters its loop: "watching"
        # alone came a moment too early on a loaded machine (the dump then showed it in run())
        wait_for(cfg.status_file.exists, 30, "the first state file")
        time.sleep(1.0)
        rc = d.stop(signal.SIGABRT)
        assert -signal.SIGABRT == rc
        dump = "".join(str(e["text"]) for e in d.events("raw"))
        assert "Fatal Python error: Aborted" in dump
        assert "most recent call first" in dump
        for where in ("service.py", "_infer_loop", "_decode_loop"):  # the main loop and the decoder
            assert where in dump, where

    def test_a_stop_that_never_ends_dumps_the_threads_and_exits_1(
        self, make_config: Callable[..., Config]
    ) -> None:
        """A daemon wedged after SIGTERM (here at the very end of its stop, where a library's
        exit could hang) writes every thread's stack to stderr and exits 1 once stop_timeout_s
        has passed, instead of waiting for systemd's SIGKILL, which leaves no trace."""
        cfg = make_config(stop_timeout_s=2)
        d = Daemon(cfg, env={"XRAY_WATCHER_HANG_AT": "stopped"})
        d.wait_event("watching")
        t0 = time.monotonic()
        rc = d.stop()  # waits at most 60 s
        elapsed = time.monotonic() - t0
        assert 1 == rc
        assert 2.0 <= elapsed < 30
        assert [2] == [e["stop_timeout_s"] for e in d.events("stop_deadline_armed")]
        assert d.events("stopped")  # the work was done; only the exit hung
        dump = "".join(str(e["text"]) for e in d.events("raw"))
        assert "Timeout (0:00:02)!" in dump
        assert "most recent call first" in dump and "failpoints.py" in dump  # where it waited


class TestDaemon:
    def test_picks_up_dropped_file_swaps_model_and_stops_on_sigterm(
        self, make_config: Callable[..., Config]
    ) -> None:
        """A file dropped after start is processed; a promoted model is picked up; SIGTERM exits 0."""
        cfg = make_config()
        d = Daemon(cfg)
        try:
            wait_for(lambda: bool(d.events("watching")), 120, "the daemon to start watching")
            img = fixture_images()[0]
            tmp = cfg.inbox / ".incoming.jpeg"
            tmp.write_bytes(img.read_bytes())
            tmp.rename(cfg.inbox / "dropped.jpeg")  # the write-then-rename convention
            wait_for(lambda: len(rows_of(cfg)) == 1, 30, "the first row")
            assert "v0001" == rows_of(cfg)[0]["model_version"]

            v2 = publish_tiny(cfg.model_store, bias=-5.0, threshold=0.7)
            wait_for(lambda: bool(d.events("model_swapped")), 30, "the model swap")
            shutil.copy(img, cfg.inbox / "second.jpeg")
            wait_for(lambda: len(rows_of(cfg)) == 2, 30, "the second row")
            assert v2 == rows_of(cfg)[1]["model_version"]
            assert "0.700000" == rows_of(cfg)[1]["threshold"]
        finally:
            rc = d.stop()
        assert 0 == rc
        assert d.events("stopped")
        assert d.events("batch_done")
        assert 2 == len(files_under(cfg.processed))

    def test_slow_writer_is_not_read_early(self, make_config: Callable[..., Config]) -> None:
        """A file written in chunks over a few seconds is read only when complete."""
        cfg = make_config(ingest={"settle_ms": 1000})
        d = Daemon(cfg)
        try:
            wait_for(lambda: bool(d.events("watching")), 120, "the daemon to start watching")
            data = FULLRES[0].read_bytes()
            chunks = [data[i : i + len(data) // 6 + 1] for i in range(0, len(data), len(data) // 6 + 1)]
            with (cfg.inbox / "slow.jpeg").open("wb") as fh:
                for chunk in chunks:
                    fh.write(chunk)
                    fh.flush()
                    time.sleep(0.5)
                    assert [] == rows_of(cfg), "read before the writer finished"
            wait_for(lambda: len(rows_of(cfg)) == 1, 30, "the row of the slow file")
            row = rows_of(cfg)[0]
            assert "ok" == row["status"], row["error"]
        finally:
            assert 0 == d.stop(signal.SIGINT)


class TestSystemdNotify:
    def test_ready_watchdog_and_stopping_are_sent(
        self, make_config: Callable[..., Config], tmp_path: Path
    ) -> None:
        """Under Type=notify the daemon reports READY, feeds the watchdog and says STOPPING."""
        import socket

        sock_path, sock_env = notify_address()  # abstract: no path-length limit
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(sock_path)
        sock.settimeout(0.5)
        messages: list[str] = []
        cfg = make_config()
        d = Daemon(cfg, env={"NOTIFY_SOCKET": sock_env, "WATCHDOG_USEC": "400000"})
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and sum("WATCHDOG=1" in m for m in messages) < 2:
                with contextlib.suppress(TimeoutError):
                    messages.append(sock.recv(4096).decode())
        finally:
            assert 0 == d.stop()
        try:
            while True:
                messages.append(sock.recv(4096).decode())
        except TimeoutError:
            pass
        sock.close()
        assert messages[0].startswith("READY=1")
        assert "v0001" in messages[0]
        assert sum("WATCHDOG=1" in m for m in messages) >= 2
        assert "STOPPING=1" == messages[-1]

    def test_a_service_manager_that_stops_reading_never_wedges_the_daemon(
        self, make_config: Callable[..., Config], tmp_path: Path
    ) -> None:
        """A notify socket whose queue is full (its reader wedged: a datagram send would block
        until it reads) costs at most 0.5 s per message: the daemon starts, scores a file,
        reports that systemd did not take its messages, and stops on SIGTERM with exit 0."""
        import socket

        sock_path, sock_env = notify_address()  # abstract: no path-length limit
        reader = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        reader.bind(sock_path)  # bound, never read
        filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        filler.connect(sock_path)
        filler.setblocking(False)
        queued = 0
        with contextlib.suppress(BlockingIOError):
            while queued < 100_000:
                filler.send(b"STATUS=filler")
                queued += 1
        filler.close()
        assert queued < 100_000  # the queue is full: the next send would block
        cfg = make_config(ingest={"settle_ms": 100})
        d = Daemon(cfg, env={"NOTIFY_SOCKET": sock_env, "WATCHDOG_USEC": "400000"})
        try:
            d.wait_event("watching")
            shutil.copy(fixture_images()[0], cfg.inbox / "one.jpeg")
            wait_for(lambda: len(rows_of(cfg)) == 1, 60, "the file's row")
        finally:
            t0 = time.monotonic()
            try:
                rc = d.stop()  # a daemon still wedged after 60 s is killed
            finally:
                reader.close()
            stop_s = time.monotonic() - t0
        assert 0 == rc
        assert stop_s < 20
        failed = d.events("systemd_notify_failed")
        assert failed and failed[0]["message"] == "READY=1"
        assert "STOPPING=1" == failed[-1]["message"]

    def test_notify_waits_at_most_half_a_second_and_logs_a_run_of_failures_once(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Against a full queue each send gives up after 0.5 s; failed STATUS= sends are logged
        once per 5 minutes with how many were dropped, READY=/STOPPING= always; once systemd
        reads again, messages are taken."""
        import socket

        from watcher import systemd

        sock_path, sock_env = notify_address()  # abstract: no path-length limit
        reader = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        reader.bind(sock_path)
        monkeypatch.setenv("NOTIFY_SOCKET", sock_env)
        monkeypatch.setitem(systemd._failures, "since_log", 0)
        monkeypatch.setitem(systemd._failures, "logged_at", float("-inf"))
        try:
            queued = 0
            with capture_logs() as logs:
                while systemd.notify("STATUS=filler", timeout_s=0.05):  # until the queue is full
                    queued += 1
                assert 0 < queued < 10_000
                for i in range(4):
                    t0 = time.monotonic()
                    assert not systemd.notify(f"STATUS=busy {i}")
                    assert time.monotonic() - t0 < 2.0
                assert not systemd.notify("STOPPING=1")
            failed = [(e["message"], e["dropped"]) for e in logs if e["event"] == "systemd_notify_failed"]
            assert [("STATUS=filler", 1), ("STOPPING=1", 5)] == failed  # 4 STATUS= dropped unlogged
            reader.settimeout(1.0)
            for _ in range(queued):
                reader.recv(4096)
            assert systemd.notify("STATUS=back")
            assert "STATUS=back" == reader.recv(4096).decode()
        finally:
            reader.close()

    def test_a_wedged_reporter_stops_the_watchdog_pings(
        self, make_config: Callable[..., Config], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The inference thread feeds the watchdog only while the reporter (rows, moves) makes
        progress: with the reporter stuck inside a batch no WATCHDOG=1 goes out, so systemd
        would restart the service; once it moves again the pings resume and the row lands."""
        import os
        import socket

        import watcher.service as service_module

        sock_path, sock_env = notify_address()  # abstract: no path-length limit
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(sock_path)
        sock.settimeout(0.05)
        monkeypatch.setenv("NOTIFY_SOCKET", sock_env)
        monkeypatch.setenv("WATCHDOG_USEC", "400000")  # a ping every 0.2 s
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
        entered, release = threading.Event(), threading.Event()
        real = service_module.population_warning

        def stuck(*args: object) -> str:  # stands for a write that hangs (a dead NFS server)
            entered.set()
            release.wait(30)
            return real(*args)  # type: ignore[arg-type]

        monkeypatch.setattr(service_module, "population_warning", stuck)
        cfg = make_config()
        svc = Service(cfg)
        t = threading.Thread(target=svc.run)
        t.start()

        def pings_during(seconds: float) -> int:
            n, end = 0, time.monotonic() + seconds
            while time.monotonic() < end:
                with contextlib.suppress(TimeoutError):
                    n += "WATCHDOG=1" in sock.recv(4096).decode()
            return n

        try:
            # count from READY=1, sent just before the loop that pings starts: the lock file
            # appears before the model is loaded, and counting from it raced with start-up
            deadline, ready = time.monotonic() + 120, False
            while not ready and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    ready = "READY=1" in sock.recv(4096).decode()
            assert pings_during(1.0) >= 3  # idle: pinged every 0.2 s
            shutil.copy(fixture_images()[0], cfg.inbox / "a.jpeg")
            assert entered.wait(30), "the reporter never reached the row"
            pings_during(0.5)  # the last pings before the reporter's beat goes stale
            assert 0 == pings_during(1.5)
            release.set()
            assert pings_during(1.0) >= 2
            wait_for(lambda: len(rows_of(cfg)) == 1, 30, "the row after the reporter moved again")
        finally:
            release.set()
            svc.request_stop()
            t.join(60)
            sock.close()
        assert not t.is_alive()
