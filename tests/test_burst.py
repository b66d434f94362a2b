"""Bursts and missed events: 10,000 files at once with bounded memory; the rescan finds what the
observer misses; a dead observer is restarted; an exception in the event handler is survived."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from structlog.testing import capture_logs

from tests.harness import Daemon, check_exactly_once, inotify_watches, png_bytes, sha, wait_for
from watcher.config import Config
from watcher.inference import Predictor
from watcher.ingest import Ingest
from watcher.report import read_rows
from watcher.service import Service

N_BURST = 10_000
SIDE = 128  # decoded: 16 KiB each, so holding the whole burst would take 10,000 x 16 KiB = 156 MiB


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak resident set) of a process, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


class TestBurst:
    def test_ten_thousand_files_at_once(self, make_config: Callable[..., Config], tmp_path: Path) -> None:
        """10,000 files dropped at once: one row each, all filed, peak memory far below the burst's size,
        and not one inotify watch added or dropped while they pass through the claim folders."""
        cfg = make_config(batch={"max_size": 64, "max_wait_ms": 100}, ingest={"settle_ms": 300})
        stage = tmp_path / "stage"
        stage.mkdir()
        originals = {}
        for i in range(N_BURST):
            data = png_bytes(i, size=SIDE, level=40 + i % 150)  # flat grey with the index in 4 pixels
            (stage / f"b{i:05d}.png").write_bytes(data)
            originals[sha(data)] = data
        assert N_BURST == len(originals)
        d = Daemon(cfg)
        try:
            wait_for(lambda: bool(d.events("watching")), 120, "the daemon to start watching")
            time.sleep(0.5)
            before = proc_status(d.proc.pid)
            watches_before = inotify_watches(d.proc.pid)
            seen_watches: set[int] = set()
            sampling = threading.Event()

            def sample() -> None:
                while not sampling.wait(0.02):
                    seen_watches.add(inotify_watches(d.proc.pid))

            sampler = threading.Thread(target=sample)
            sampler.start()
            t0 = time.monotonic()
            try:
                for path in sorted(stage.iterdir()):
                    path.rename(cfg.inbox / path.name)  # all dropped within a fraction of a second
                wait_for(lambda: len(read_rows(cfg.results)) >= N_BURST, 240, "a row for every file")
            finally:
                sampling.set()
                sampler.join()
            elapsed = time.monotonic() - t0
            after = proc_status(d.proc.pid)
            watches_after = inotify_watches(d.proc.pid)
        finally:
            assert 0 == d.stop()
        assert 1 == watches_before, "the inbox alone should be watched (its work folder is hidden)"
        assert {watches_before} == seen_watches | {watches_after}, "watches came and went during the burst"
        assert not d.events("observer_died_restarting")
        growth_mib = (after["VmHWM"] - before["VmHWM"]) / 1024
        peak = f"{before['VmHWM'] / 1024:.0f} -> {after['VmHWM'] / 1024:.0f} MiB (+{growth_mib:.0f} MiB)"
        print(f"burst of {N_BURST} files: {elapsed:.1f} s, {N_BURST / elapsed:.0f} files/s; peak RSS {peak}")
        check_exactly_once(cfg, originals)
        # A pipeline that decoded ahead of the model would hold 156 MiB of images (plus 40 MiB of
        # model inputs); ours holds at most ~4 batches of 64 (4 MiB). 64 MiB leaves room for the
        # paths queued, TensorFlow's per-batch buffers and allocator slack, and still fails if
        # decoded images pile up.
        assert growth_mib < 64, f"peak RSS grew by {growth_mib:.0f} MiB during the burst"


class TestBigImages:
    def test_large_images_are_not_held_after_preprocessing(
        self, make_config: Callable[..., Config], tmp_path: Path
    ) -> None:
        """24 valid 4000x4000 X-ray-sized images: peak memory stays near a couple of decodes, not a batch."""
        cfg = make_config(batch={"max_size": 8, "max_wait_ms": 200}, ingest={"settle_ms": 200})
        big = np.add.outer(np.arange(4000) // 16, np.arange(4000) // 16).astype(np.uint8)
        ok, buf = cv2.imencode(".jpg", big)
        assert ok
        stage = tmp_path / "stage"
        stage.mkdir()
        originals = {}
        for i in range(24):
            data = bytes(buf.tobytes()) + i.to_bytes(2, "big")  # distinct bytes after the end marker
            (stage / f"big{i:02d}.jpeg").write_bytes(data)
            originals[sha(data)] = data
        d = Daemon(cfg)
        try:
            wait_for(lambda: bool(d.events("watching")), 120, "the daemon to start watching")
            time.sleep(0.5)
            before = proc_status(d.proc.pid)
            for path in sorted(stage.iterdir()):
                path.rename(cfg.inbox / path.name)
            wait_for(lambda: len(read_rows(cfg.results)) >= 24, 120, "a row for every file")
            after = proc_status(d.proc.pid)
        finally:
            assert 0 == d.stop()
        growth_mib = (after["VmHWM"] - before["VmHWM"]) / 1024
        print(f"24 images of 4000x4000: peak RSS +{growth_mib:.0f} MiB")
        rows = check_exactly_once(cfg, originals)
        assert {("4000", "4000")} == {(r["width"], r["height"]) for r in rows}
        # each decoded image is 15 MiB: a batch of 8 is 122 MiB, and up to 3 batches wait in the
        # pipeline (366 MiB; 196 MiB measured before the fix). Two decoding workers need ~2 x 15 MiB
        # plus the decoder's buffers and per-thread allocator arenas (74 MiB measured).
        assert growth_mib < 125, f"peak RSS grew by {growth_mib:.0f} MiB"


@pytest.fixture(scope="module")
def predictor(tiny_store_template: Path) -> Predictor:
    return Predictor(tiny_store_template)


@pytest.fixture
def running(make_config: Callable[..., Config], predictor: Predictor) -> Iterator[Callable[..., Service]]:
    """Start a Service in a thread of this process (to reach its observer); stop it after the test."""
    started: list[tuple[Service, threading.Thread]] = []

    def start(**overrides: object) -> Service:
        svc = Service(make_config(**overrides), predictor=predictor)
        ready = threading.Event()
        t = threading.Thread(target=svc.run, kwargs={"on_ready": ready.set}, daemon=True)
        t.start()
        assert ready.wait(30)
        started.append((svc, t))
        return svc

    yield start
    for svc, t in started:
        svc.request_stop()
        t.join(30)
        assert not t.is_alive()


def drop(cfg: Config, name: str, seed: int) -> None:
    tmp = cfg.inbox / f".{name}.tmp"
    tmp.write_bytes(png_bytes(seed))
    tmp.rename(cfg.inbox / name)


class TestMissedEvents:
    def test_files_the_observer_never_reports_are_found_by_the_rescan(
        self, make_config: Callable[..., Config]
    ) -> None:
        """With an observer that never looks again, the periodic rescan still finds new files."""
        # a polling observer that takes one snapshot, then sleeps an hour: it reports nothing,
        # as an overflowed inotify queue or a network share would
        cfg = make_config(
            ingest={"observer": "polling", "poll_interval_ms": 3_600_000, "rescan_interval_s": 1}
        )
        d = Daemon(cfg)
        try:
            wait_for(lambda: bool(d.events("watching")), 120, "the daemon to start watching")
            for i in range(5):
                drop(cfg, f"missed{i}.png", i)
            wait_for(lambda: len(read_rows(cfg.results)) == 5, 20, "the rescan to find the files")
        finally:
            assert 0 == d.stop()
        assert 5 == len(list(cfg.processed.rglob("*.png")))

    def test_dead_observer_is_restarted_and_the_gap_rescanned(self, running: Callable[..., Service]) -> None:
        """The observer thread dies; files dropped meanwhile are found and new events are seen again."""
        with capture_logs() as logs:
            svc = running(ingest={"rescan_interval_s": 3600, "settle_ms": 100})
            observer = svc.ingest._observer
            assert observer is not None
            observer.stop()
            observer.join(5)
            drop(svc.cfg, "during.png", 1)
            wait_for(lambda: len(read_rows(svc.cfg.results)) == 1, 20, "the file dropped while it was dead")
            assert svc.ingest._observer is not observer and svc.ingest._observer.is_alive()
            drop(svc.cfg, "after.png", 2)  # seen by the new observer (the next rescan is an hour away)
            wait_for(lambda: len(read_rows(svc.cfg.results)) == 2, 20, "the file dropped after the restart")
        assert 1 == sum(e["event"] == "observer_died_restarting" for e in logs)

    def test_exception_in_event_handling_does_not_kill_the_observer(
        self, running: Callable[..., Service], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An event whose handling raises is logged; the same observer goes on reporting files."""
        real_notice = Ingest.notice

        def notice(self: Ingest, path: Path, closed: bool = False, complete: bool = False) -> None:
            if path.name.startswith("boom"):
                raise RuntimeError(f"simulated failure while handling {path.name}")
            real_notice(self, path, closed, complete)

        monkeypatch.setattr(Ingest, "notice", notice)
        with capture_logs() as logs:
            svc = running(ingest={"rescan_interval_s": 3600, "settle_ms": 100})
            observer = svc.ingest._observer
            drop(svc.cfg, "boom.png", 1)
            drop(svc.cfg, "fine.png", 2)
            wait_for(lambda: len(read_rows(svc.cfg.results)) == 1, 20, "the file after the failing event")
            assert observer is svc.ingest._observer and observer is not None and observer.is_alive()
        assert any(e["event"] == "event_handler_error" for e in logs)
        assert not any(e["event"] == "observer_died_restarting" for e in logs)
        assert ["fine.png"] == [r["file"] for r in read_rows(svc.cfg.results)]
