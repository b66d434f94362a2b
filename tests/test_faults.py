"""Resource faults: results.csv or a destination folder unusable, the disk full. The daemon logs a
clear error, keeps the files claimed, retries with back-off and, once the fault clears, writes
every row exactly once and files everything."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import FULLRES
from tests.harness import Daemon, check_exactly_once, png_bytes, sha, small_tmpfs, wait_for
from watcher.config import Config
from watcher.report import read_rows


def claimed_files(cfg: Config) -> list[Path]:
    """Files still claimed; the daemon removes claim folders meanwhile, which os.walk tolerates."""
    return [Path(root) / n for root, _dirs, names in os.walk(cfg.work_dir / "claimed") for n in names]


def drop_all(cfg: Config, files: dict[str, bytes]) -> dict[str, bytes]:
    for name, data in files.items():
        tmp = cfg.inbox / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.rename(cfg.inbox / name)
    return {sha(data): data for data in files.values()}


def drop_folder(cfg: Config, files: dict[str, bytes]) -> dict[str, bytes]:
    """The files written into a hidden folder, then moved into the inbox as one folder."""
    stage = cfg.inbox / ".stage"
    stage.mkdir()
    for name, data in files.items():
        (stage / name).write_bytes(data)
    stage.rename(cfg.inbox / "batch")
    return {sha(data): data for data in files.values()}


class TestResultsNotWritable:
    def test_rows_wait_until_results_csv_is_back(self, make_config: Callable[..., Config]) -> None:
        """results.csv replaced by a folder: clear error, files stay claimed, back-off, then rows once."""
        cfg = make_config(ingest={"settle_ms": 100})
        d = Daemon(cfg)
        try:
            wait_for(lambda: bool(d.events("watching")), 120, "the daemon to start watching")
            kept = cfg.results.with_name("results.kept")
            cfg.results.rename(kept)
            cfg.results.mkdir()  # now nothing can be appended to it
            originals = drop_all(cfg, {f"r{i}.png": png_bytes(i) for i in range(3)})
            wait_for(lambda: len(d.events("results_append_failed")) >= 2, 30, "two failed appends")
            first, second = d.events("results_append_failed")[:2]
            assert "cannot open" in str(first["error"]) and "Is a directory" in str(first["error"])
            assert (1.0, 2.0) == (first["retry_in_s"], second["retry_in_s"])  # backing off
            assert 3 == len(claimed_files(cfg))  # nothing lost, nothing filed without its row
            assert [] == list(cfg.processed.rglob("*.png"))
            cfg.results.rmdir()
            kept.rename(cfg.results)
            wait_for(lambda: len(read_rows(cfg.results)) >= 3, 30, "the rows after the fault cleared")
            wait_for(lambda: not claimed_files(cfg), 10, "the files to be filed")
            assert d.proc.poll() is None
        finally:
            assert 0 == d.stop()
        check_exactly_once(cfg, originals)


class TestDestinationNotWritable:
    def test_files_wait_until_the_destination_folder_can_be_made(
        self, make_config: Callable[..., Config]
    ) -> None:
        """processed/NORMAL is a regular file: clear error, files stay claimed, back-off, then filed once."""
        cfg = make_config(ingest={"settle_ms": 100})
        blocker = cfg.processed / "NORMAL"
        blocker.write_text("a file where the folder should be")
        d = Daemon(cfg)
        try:
            wait_for(lambda: bool(d.events("watching")), 120, "the daemon to start watching")
            dark = {f"n{i}.png": png_bytes(i, level=30) for i in range(3)}  # dark: NORMAL
            originals = drop_all(cfg, dark)
            wait_for(lambda: len(d.events("file_move_failed")) >= 2, 30, "two failed moves")
            first, second = d.events("file_move_failed")[:2]
            assert "a file of that name is in the way" in str(first["error"])
            assert (1.0, 2.0) == (first["retry_in_s"], second["retry_in_s"])
            # rows first, then the move: every reported file is still claimed (the files may
            # have come in one batch or several; later batches wait behind the stuck one)
            reported = {r["file"] for r in read_rows(cfg.results)}
            assert reported
            assert reported <= {p.name for p in claimed_files(cfg)}
            assert 3 == len(claimed_files(cfg))
            blocker.unlink()
            wait_for(lambda: not claimed_files(cfg), 30, "the files to be filed after the fault cleared")
            assert d.proc.poll() is None
        finally:
            assert 0 == d.stop()
        rows = check_exactly_once(cfg, originals)
        assert {"NORMAL"} == {r["label"] for r in rows}

    def test_sigterm_ends_run_once_stuck_on_a_move(self, make_config: Callable[..., Config]) -> None:
        """run --once whose files cannot be moved (processed/NORMAL is a file): its main thread
        waits for the reporter's retries, and SIGTERM there still stops it: exit 1, the files
        left claimed for the next start (it used to retry until SIGKILL)."""
        cfg = make_config(ingest={"settle_ms": 100})
        (cfg.processed / "NORMAL").write_text("a file where the folder should be")
        drop_all(cfg, {f"n{i}.png": png_bytes(i, level=30) for i in range(3)})  # dark: NORMAL
        d = Daemon(cfg, once=True)
        try:
            wait_for(lambda: len(d.events("file_move_failed")) >= 2, 120, "two failed moves")
        finally:
            rc = d.stop()
        assert 1 == rc
        assert 3 == len(claimed_files(cfg))


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB tmpfs to fill up."""
    with small_tmpfs(tmp_path / "disk", "2m") as mnt:
        yield mnt


def fill(disk: Path) -> Path:
    """Write a filler file until the disk is full; returns it."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(fd, b"\xff" * 4096)
    except OSError as exc:
        assert errno.ENOSPC == exc.errno
    finally:
        os.close(fd)
    return filler


class TestDiskFull:
    def test_full_disk_delays_rows_and_moves_without_losing_anything(
        self, make_config: Callable[..., Config], small_disk: Path
    ) -> None:
        """results.csv and the destinations on a full disk: ENOSPC retried; once space returns, all once."""
        for name in ("processed", "failed"):
            (small_disk / name).mkdir()
        cfg = make_config(
            results=str(small_disk / "results.csv"),
            processed=str(small_disk / "processed"),
            failed=str(small_disk / "failed"),
            batch={"max_size": 32, "max_wait_ms": 300},
            ingest={"settle_ms": 100},
        )
        d = Daemon(cfg)
        try:
            wait_for(lambda: bool(d.events("watching")), 120, "the daemon to start watching")
            filler = fill(small_disk)
            # 16 rows with long names need more than the header's half-empty block: ENOSPC
            xray = FULLRES[1].read_bytes()
            files = {f"{'long-name-' * 10}{i:02d}.jpeg": xray + i.to_bytes(2, "big") for i in range(16)}
            originals = drop_folder(cfg, files)  # settle together: one batch, one append of 16 rows
            wait_for(lambda: bool(d.events("results_append_failed")), 30, "a failed append")
            assert "No space left on device" in str(d.events("results_append_failed")[0]["error"])
            assert [] == read_rows(cfg.results)
            assert 16 == len(claimed_files(cfg))
            # room for the rows, not for the 31 KB images: now the copies to the other disk fail
            os.truncate(filler, filler.stat().st_size - 24 * 1024)
            wait_for(lambda: bool(d.events("file_move_failed")), 30, "a failed move")
            assert "No space left on device" in str(d.events("file_move_failed")[0]["error"])
            assert 16 == len(read_rows(cfg.results))
            assert claimed_files(cfg)
            filler.unlink()
            wait_for(lambda: not claimed_files(cfg), 30, "the files to be filed once space returned")
            assert d.proc.poll() is None
        finally:
            assert 0 == d.stop()
        check_exactly_once(cfg, originals)
        assert [] == [p for p in small_disk.rglob("*.tmp")]  # no half copies left behind
