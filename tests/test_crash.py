"""Exactly once across SIGKILL: every crash point, random kills of a running daemon, torn CSV lines.

Each crash is a real ``python -m watcher run --once`` killed by a real SIGKILL (the
``XRAY_WATCHER_CRASH_AT`` failpoint, or the test's own ``kill``). The restart after a
failpoint crash runs the same ``Service.run(once=True)`` in this process with a preloaded
model (a second TensorFlow start per case would double the run time); the random-kill
test restarts real daemon processes each time.
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from tests.conftest import FULLRES, fixture_images
from tests.harness import Daemon, check_exactly_once, png_bytes, run_once, sha, small_tmpfs, wait_for
from watcher.config import Config
from watcher.inference import Predictor
from watcher.report import read_rows
from watcher.service import Service

# (point, n): die the n-th time the point is reached. 8 files in batches of 4: 5 decode,
# 2 row writes, 8 links and 8 placements, so these hit the first and the second batch.
CRASHES = [
    ("claimed", 1),
    ("claimed", 6),
    ("decoded", 3),
    ("torn_write", 1),
    ("rows_written", 1),
    ("rows_written", 2),
    ("linked", 1),
    ("linked", 7),
    ("placed", 4),
    ("placed", 5),
]


@pytest.fixture(scope="module")
def predictor(tiny_store_template: Path) -> Predictor:
    return Predictor(tiny_store_template)


def fill_inbox(cfg: Config) -> dict[str, bytes]:
    """Five good images (two in a subfolder) and three broken files; returns sha256 -> bytes."""
    originals: dict[str, bytes] = {}

    def put(rel: str, data: bytes) -> None:
        path = cfg.inbox / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        originals[sha(data)] = data

    for i, img in enumerate(fixture_images()[:5]):
        put(f"ward 1/{img.name}" if i % 2 else img.name, img.read_bytes())
    put("empty.png", b"")
    put("cut.jpeg", FULLRES[1].read_bytes()[:4000])
    put("notes.png", b"just some text, not an image\n")
    return originals


def restart(cfg: Config, predictor: Predictor) -> list[dict[str, object]]:
    with capture_logs() as logs:
        assert 0 == Service(cfg, predictor=predictor).run(once=True)
    return logs


class TestCrashPoints:
    @pytest.mark.parametrize(("point", "nth"), CRASHES, ids=[f"{p}:{n}" for p, n in CRASHES])
    def test_killed_at_point_then_restarted(
        self, make_config: Callable[..., Config], predictor: Predictor, point: str, nth: int
    ) -> None:
        """SIGKILL at a point of the pipeline, restart: one row and one place per file."""
        cfg = make_config(batch={"max_size": 4, "max_wait_ms": 100}, ingest={"settle_ms": 0})
        originals = fill_inbox(cfg)
        proc = run_once(cfg, env={"XRAY_WATCHER_CRASH_AT": f"{point}:{nth}"})
        assert -signal.SIGKILL == proc.returncode, proc.stdout[-3000:] + proc.stderr[-3000:]
        claimed = [p for p in (cfg.work_dir / "claimed").rglob("*") if not p.is_dir()]
        assert claimed or len(read_rows(cfg.results)) < len(originals), "the crash came after all the work"
        restart(cfg, predictor)
        check_exactly_once(cfg, originals)


class TestCrashAcrossDisks:
    def test_killed_between_copy_and_unlink_to_another_filesystem(
        self, make_config: Callable[..., Config], predictor: Predictor, tmp_path: Path
    ) -> None:
        """processed/ on another filesystem (copies, not links): a kill after a copy is not copied twice."""
        with small_tmpfs(tmp_path / "disk", "8m") as disk:
            for name in ("processed", "failed"):
                (disk / name).mkdir()
            cfg = make_config(
                processed=str(disk / "processed"),
                failed=str(disk / "failed"),
                batch={"max_size": 4, "max_wait_ms": 100},
                ingest={"settle_ms": 0},
            )
            originals = fill_inbox(cfg)
            proc = run_once(cfg, env={"XRAY_WATCHER_CRASH_AT": "linked:2"})
            assert -signal.SIGKILL == proc.returncode, proc.stderr[-3000:]
            restart(cfg, predictor)
            check_exactly_once(cfg, originals)


class TestTornLine:
    def test_half_written_rows_are_cut_and_written_again(
        self, make_config: Callable[..., Config], predictor: Predictor
    ) -> None:
        """A kill in the middle of the second append leaves a torn line; restart cuts it; rows once."""
        cfg = make_config(batch={"max_size": 4, "max_wait_ms": 100}, ingest={"settle_ms": 0})
        originals = fill_inbox(cfg)
        proc = run_once(cfg, env={"XRAY_WATCHER_CRASH_AT": "torn_write:2"})
        assert -signal.SIGKILL == proc.returncode, proc.stderr[-3000:]
        raw = cfg.results.read_bytes()
        complete = raw[: raw.rindex(b'"\n') + 2]
        assert not raw.endswith(b"\n"), "no torn line was left"
        # the first batch's 4 rows, and whatever whole rows of the second made it before the cut
        assert 4 <= len(read_rows(cfg.results)) < 8
        logs = restart(cfg, predictor)
        (torn,) = [e for e in logs if e["event"] == "results_torn_line_removed"]
        assert len(raw) - len(complete) == torn["removed_bytes"]
        assert cfg.results.read_bytes().startswith(complete)
        check_exactly_once(cfg, originals)


class TestRandomKills:
    def test_daemon_killed_at_random_instants_during_a_stream(
        self, make_config: Callable[..., Config], tmp_path: Path
    ) -> None:
        """A daemon SIGKILLed 4 times mid-work (150 new files each time) loses and doubles nothing."""
        cfg = make_config(
            batch={"max_size": 4, "max_wait_ms": 100}, ingest={"settle_ms": 100, "rescan_interval_s": 1}
        )
        fullres = FULLRES[1].read_bytes()
        stage = tmp_path / "stage"
        stage.mkdir()
        files: list[tuple[str, Path]] = []
        originals: dict[str, bytes] = {}
        for i in range(600):
            if i % 10 == 0:
                data = random.Random(i).randbytes(700)  # garbage with an image name
            elif i % 10 == 1:
                data = fullres + i.to_bytes(4, "big")  # a real X-ray (bytes after its end marker)
            else:
                data = png_bytes(i, size=32)
            (stage / f"{i}").write_bytes(data)
            originals[sha(data)] = data
            files.append(
                (f"{'sub/' if i % 3 == 0 else ''}s{i:03d}.{'jpeg' if i % 10 == 1 else 'png'}", stage / f"{i}")
            )
        (cfg.inbox / "sub").mkdir()

        def rows() -> int:
            return len(read_rows(cfg.results))

        rng = random.Random(20261125)
        claimed_at_kill = []
        for life in range(4):
            d = Daemon(cfg)
            d.wait_event("watching", 120)
            kill_at = rows() + rng.randint(8, 120)  # a random instant in the middle of the work
            for rel, src in files[life * 150 : (life + 1) * 150]:
                src.rename(cfg.inbox / rel)  # 150 files arrive
            deadline = time.monotonic() + 60
            while rows() < kill_at and time.monotonic() < deadline:
                time.sleep(0.002)
            assert -signal.SIGKILL == d.stop(signal.SIGKILL)
            claimed = cfg.work_dir / "claimed"
            claimed_at_kill.append(sum(1 for p in claimed.rglob("*") if not p.is_dir()))
        d = Daemon(cfg)
        try:
            wait_for(lambda: len(read_rows(cfg.results)) >= len(files), 120, "a row for every file")
        finally:
            assert 0 == d.stop()
        print(f"files claimed at each kill: {claimed_at_kill}")
        assert any(claimed_at_kill), "no kill came while files were claimed"
        check_exactly_once(cfg, originals)
