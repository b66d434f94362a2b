"""results.csv: one row per inbox file, fixed columns, appended as whole lines.

The header is written once. Each batch's rows go out in one ``write`` on an ``O_APPEND``
descriptor under an exclusive ``flock`` (several instances may share one file), followed by
``fsync``. If the previous run died mid-write, the torn last line is cut off on open; and
since another instance sharing the file may die mid-write while this one runs, each append
first checks the bytes added since its own last append and cuts a torn tail there too.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import io
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import structlog

from watcher import failpoints
from watcher.errors import ReportError

log = structlog.get_logger()


@dataclass(frozen=True)
class ResultRow:
    """One results.csv row."""

    processed_at: str
    file: str
    sha256: str
    status: str  # "ok" or "failed"
    label: str
    probability: str
    threshold: str
    model_version: str
    destination: str
    error: str
    width: str
    height: str
    bytes: str
    instance: str
    claim: str  # the claim id; recovery after a crash finds a file's row by it


COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(ResultRow))


def utc_now() -> str:
    """ISO 8601 UTC timestamp with milliseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _encode(rows: Iterable[ResultRow]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_ALL)  # "\r" in names too
    for row in rows:
        writer.writerow([getattr(row, c) for c in COLUMNS])
    return buf.getvalue().encode("utf-8", errors="surrogateescape")


def _header() -> bytes:
    return (",".join(COLUMNS) + "\n").encode()


def _last_complete_end(data: bytes) -> int:
    """Offset just past the last complete CSV record (quoted fields may hold newlines)."""
    arr = np.frombuffer(data, dtype=np.uint8)
    quotes_before = np.cumsum(arr == 0x22)
    ends = np.flatnonzero((arr == 0x0A) & (quotes_before % 2 == 0))
    return int(ends[-1]) + 1 if len(ends) else 0


class ResultsWriter:
    """Appends rows to results.csv; create with ``open()``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows_written = 0
        self._good_end = 0  # a record boundary: the file size after our last open or append

    def _check_and_repair(self, fd: int) -> None:
        size = os.fstat(fd).st_size
        if size == 0:
            os.write(fd, _header())
            os.fsync(fd)
            self._good_end = os.fstat(fd).st_size
            return
        head = os.pread(fd, min(size, 4096), 0)
        first = head.split(b"\n", 1)[0].decode("utf-8", errors="replace").strip()
        if first != ",".join(COLUMNS):
            raise ReportError(
                f"{self.path} has header {first[:200]!r}, expected {','.join(COLUMNS)!r}: it was not "
                "written by this version; move it aside or point 'results' at a new file"
            )
        self._good_end = 0
        self._cut_torn_tail(fd, size)

    def _cut_torn_tail(self, fd: int, size: int) -> int:
        """Cut an incomplete last record (a writer died mid-write); returns the new size.

        Only the bytes after ``_good_end`` (a record boundary) are read, so an append costs
        what other instances wrote since, not the whole file.
        """
        start = self._good_end if self._good_end <= size else 0
        data = os.pread(fd, size - start, start)
        end = start + _last_complete_end(data)
        if end < size:
            torn = data[end - start :]
            os.ftruncate(fd, end)
            os.fsync(fd)
            log.warning(
                "results_torn_line_removed",
                path=str(self.path),
                removed_bytes=len(torn),
                removed=torn[:200].decode("utf-8", errors="replace"),
            )
        self._good_end = end
        return end

    def open(self) -> ResultsWriter:
        """Create the file with its header, or check and repair an existing one."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            raise ReportError(f"cannot open {self.path} for appending: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._check_and_repair(fd)
        except OSError as exc:
            raise ReportError(f"cannot prepare {self.path}: {exc.strerror or exc}") from exc
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        return self

    def append(self, rows: list[ResultRow]) -> None:
        """Append rows durably (one write, then fsync); raises ReportError on failure."""
        if not rows:
            return
        payload = _encode(rows)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ReportError(f"cannot open {self.path}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            before = os.fstat(fd).st_size
            if before > 0:
                before = self._cut_torn_tail(fd, before)  # another instance died mid-write?
            try:
                if before == 0:
                    os.write(fd, _header())
                failpoints.torn_write(fd, payload)
                written = os.write(fd, payload)
                if written != len(payload):
                    # a regular file takes fewer bytes than asked only when the disk (or quota) is full
                    short = f"short write, {written} of {len(payload)} bytes"
                    raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({short})")
                os.fsync(fd)
                self._good_end = os.fstat(fd).st_size
            except OSError:
                os.ftruncate(fd, before)  # never leave a partial row for the next append
                raise
        except OSError as exc:
            raise ReportError(f"cannot append to {self.path}: {exc.strerror or exc}") from exc
        finally:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
        self.rows_written += len(rows)


def read_rows(path: Path) -> list[Mapping[str, str]]:
    """All rows of a results file (the csv module; tolerant of a torn last line)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    data = data[: _last_complete_end(data)]
    text = data.decode("utf-8", errors="surrogateescape")
    return list(csv.DictReader(io.StringIO(text, newline="")))
