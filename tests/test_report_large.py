"""A results.csv with 200,000 rows of history: open, append and recovery read only its two ends.

The assertion counts the bytes results.py reads (every read goes through ``os.pread``), so
it is exact and cannot flake; ``benchmarks/large_report.py`` measures time and memory at
1,000,000 rows.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from watcher.config import ReportConfig
from watcher.report import (
    COLUMNS,
    ResultRow,
    ResultsWriter,
    _encode,
    _header,
    find_rows,
    format_utc,
    rotated_files,
)

N_ROWS = 200_000
BLOCK_ROWS = 1_000
READ_LIMIT = 1 << 20  # bytes: the file is ~60 MB


def make_row(i: int, at: str, claim: str, instance: str = "me") -> ResultRow:
    base = dict.fromkeys(COLUMNS, "")
    base.update(
        processed_at=at,
        file=f"ward {i % 7}/IM-{i:06d}-0001.jpeg",
        sha256=f"{i:064x}",
        status="ok",
        label="NORMAL",
        probability="0.123456",
        threshold="0.578000",
        model_version="v0002",
        destination=f"/srv/xray/processed/NORMAL/ward {i % 7}/IM-{i:06d}-0001.jpeg",
        width="2048",
        height="2500",
        bytes="1834512",
        instance=instance,
        claim=claim,
    )
    return ResultRow(**base)


def write_history(path: Path, n_rows: int, last: list[ResultRow]) -> None:
    """``n_rows`` rows from 2025 (one encoded block written again and again), then ``last``."""
    block = _encode([make_row(i, "2025-06-01T08:00:00.000Z", f"old{i // 16}") for i in range(BLOCK_ROWS)])
    with path.open("wb") as fh:
        fh.write(_header())
        for _ in range(n_rows // BLOCK_ROWS):
            fh.write(block)
        fh.write(_encode(last))


@pytest.fixture
def count_reads(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """Count the bytes read through ``os.pread``; reading a whole file another way fails."""
    total = [0]
    real_pread = os.pread

    def pread(fd: int, n: int, offset: int) -> bytes:
        data = real_pread(fd, n, offset)
        total[0] += len(data)
        return data

    def forbidden(*args: object, **kw: object) -> bytes:
        raise AssertionError("a whole-file read")

    monkeypatch.setattr(os, "pread", pread)
    monkeypatch.setattr(Path, "read_bytes", forbidden)
    return lambda: total[0]


NOW = datetime(2026, 1, 20, 12, 0, tzinfo=timezone.utc)


class TestLargeReport:
    def test_open_append_recover_read_the_ends_only(
        self, tmp_path: Path, count_reads: Callable[[], int]
    ) -> None:
        """open + append + find_rows on 200,000 rows read less than 1 MiB, and find the right rows."""
        path = tmp_path / "results.csv"
        recent = format_utc(NOW - timedelta(minutes=5))
        write_history(path, N_ROWS, [make_row(i, recent, "c-crashed") for i in range(4)])
        size = path.stat().st_size
        w = ResultsWriter(path, ReportConfig(rotate="never"), now=lambda: NOW).open()
        w.append([make_row(10, format_utc(NOW), "c-new")])
        found = find_rows(path, {"c-crashed", "old3"}, "me", format_utc(NOW - timedelta(hours=1)))
        read = count_reads()
        assert {("c-crashed", f"ward {i}/IM-{i:06d}-0001.jpeg") for i in range(4)} == set(found)
        assert read < READ_LIMIT, f"read {read:,} bytes of a {size:,}-byte file"
        assert size > 50 * READ_LIMIT

    def test_monthly_rotation_of_a_large_file(self, tmp_path: Path, count_reads: Callable[[], int]) -> None:
        """The first append of a new month renames the big file; recovery then looks into it."""
        path = tmp_path / "results.csv"
        last_month = format_utc(NOW - timedelta(days=30))
        write_history(path, N_ROWS, [make_row(i, last_month, "c-crashed") for i in range(2)])
        w = ResultsWriter(path, now=lambda: NOW).open()
        w.append([make_row(10, format_utc(NOW), "c-new")])
        assert ["results-2025-06.csv"] == [p.name for p in rotated_files(path)]
        found = find_rows(path, {"c-crashed", "c-new"}, "me", format_utc(NOW - timedelta(days=31)))
        read = count_reads()
        assert {"c-crashed", "c-new"} == {claim for claim, _ in found}
        assert read < READ_LIMIT, f"read {read:,} bytes"

    def test_another_instance_appended_a_lot(self, tmp_path: Path, count_reads: Callable[[], int]) -> None:
        """After others appended many MB, the torn-tail check reads from the tail, not from our last row."""
        path = tmp_path / "results.csv"
        write_history(path, 2_000, [])
        w = ResultsWriter(path, ReportConfig(rotate="never"), now=lambda: NOW).open()
        w.append([make_row(1, format_utc(NOW), "mine")])
        with path.open("ab") as fh:  # another instance, 200,000 rows later
            block = _encode([make_row(i, format_utc(NOW), "theirs", "other") for i in range(BLOCK_ROWS)])
            for _ in range(N_ROWS // BLOCK_ROWS):
                fh.write(block)
        before = count_reads()
        w.append([make_row(2, format_utc(NOW), "mine")])
        assert count_reads() - before < READ_LIMIT
