"""results.csv: one row per inbox file, fixed columns, appended as whole lines; rotated.

The header is written once per file. Each batch's rows go out in one ``write`` on an
``O_APPEND`` descriptor under an exclusive ``flock`` (several instances may share one file),
followed by ``fsync``. If a writer died mid-write, the torn last line is cut off, on open and
before each append (another instance sharing the file may die while this one runs); the bytes
cut are kept in a side file (``results.csv.torn-<UTC time>``). A last row that is whole but lacks
its newline (an editor dropped it) gets the newline back instead.

Cost does not grow with history: opening reads the header and the tail, an append reads what
other instances wrote since our last one, and crash recovery (``find_rows``) reads backwards
from the end only as far as the claims it looks for can be. A record start is recognised
without counting quotes from the top of the file: with every field quoted, ``\\n"`` followed
by a byte that is not ``"``, ``,`` or ``\\n`` can only be the end of one record and the start
of the next (inside a quoted field a lone ``"`` closes it and must be followed by ``,`` or
``\\n``), and our first field is always a timestamp.

Rotation (``report.rotate``: never, daily, monthly, size) happens at the start of an append,
under the same lock: the current file is renamed to ``results-YYYY-MM.csv`` (monthly),
``results-YYYY-MM-DD.csv`` (daily) or ``results-NNNN.csv`` (size) and a new file, header
included, is linked into place (never an empty or half-written file under the current name).
A file with an older version's header is renamed aside the same way (``-upgraded``), never
rewritten. ``results*.csv``, sorted by name, reads oldest first with the current file last. The
service itself orders rotated files by their first row's ``processed_at`` (retention, recovery):
a file touched, re-saved or copied without ``-p`` gets a new mtime, never new rows.

A file re-saved by Excel as "CSV UTF-8" starts with a byte order mark: every reader skips it.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import io
import itertools
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, fields
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from watcher import failpoints
from watcher.config import ReportConfig
from watcher.errors import ReportError
from watcher.fsutil import fsync_dir

log = structlog.get_logger()

_BLOCK = 64 << 10  # bytes read per step when scanning backwards
_REREAD_LIMIT = 1 << 20  # read since our last append only if others wrote less than this
_ROW_START = re.compile(rb'\n"[^",\n]')  # the end of one record and the start of the next
_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}[T ]")  # a space: a spreadsheet re-saved the file
_STALE_TMP_S = 3600.0
_HEAD = 4096  # bytes read for a header line (and, when ordering rotated files, the first row)
_BOM = "\ufeff"  # a UTF-8 byte order mark, decoded: Excel's "CSV UTF-8" starts the file with one


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
    study_instance_uid: str = ""  # DICOM inputs
    series_instance_uid: str = ""
    sop_instance_uid: str = ""
    warning: str = ""  # scored, but with a caveat (plain words)
    heatmap: str = ""  # path of the explanation image, when one was made


COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(ResultRow))

# headers of earlier versions: such a file is rotated aside unchanged, never refused
KNOWN_OLD_HEADERS: tuple[str, ...] = (
    "processed_at,file,sha256,status,label,probability,threshold,model_version,destination,"
    "error,width,height,bytes,instance,claim",
)


def format_utc(when: datetime) -> str:
    """``when`` as ISO 8601 UTC with milliseconds and a Z, like ``processed_at`` (naive: UTC)."""
    if when.tzinfo is not None:
        when = when.astimezone(timezone.utc).replace(tzinfo=None)
    return when.isoformat(timespec="milliseconds") + "Z"


def utc_now() -> str:
    """ISO 8601 UTC timestamp with milliseconds."""
    return format_utc(datetime.now(timezone.utc))


def _utc_datetime() -> datetime:
    return datetime.now(timezone.utc)


def _parse_utc(text: str) -> datetime | None:
    """A ``processed_at`` value as an aware UTC datetime; None if it is not one."""
    if not _TIMESTAMP.match(text):
        return None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when.astimezone(timezone.utc)


def _period(when: datetime | None, mode: str) -> str | None:
    if when is None:
        return None
    if when.tzinfo is not None:
        when = when.astimezone(timezone.utc)
    return when.strftime("%Y-%m-%d" if mode == "daily" else "%Y-%m")


def _encode(rows: list[ResultRow]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_ALL)  # "\r" in names too
    for row in rows:
        writer.writerow([getattr(row, c) for c in COLUMNS])
    return buf.getvalue().encode("utf-8", errors="surrogateescape")


def _header() -> bytes:
    return (",".join(COLUMNS) + "\n").encode()


def _last_complete_end(data: bytes) -> int:
    """Offset just past the last complete CSV record (quoted fields may hold newlines).

    ``data`` must start at a record boundary.
    """
    arr = np.frombuffer(data, dtype=np.uint8)
    quotes_before = np.cumsum(arr == 0x22)
    ends = np.flatnonzero((arr == 0x0A) & (quotes_before % 2 == 0))
    return int(ends[-1]) + 1 if len(ends) else 0


def _first_complete_end(data: bytes) -> int:
    """Offset just past the first complete record of ``data`` (which starts at one); 0: none."""
    arr = np.frombuffer(data, dtype=np.uint8)
    quotes_before = np.cumsum(arr == 0x22)
    ends = np.flatnonzero((arr == 0x0A) & (quotes_before % 2 == 0))
    return int(ends[0]) + 1 if len(ends) else 0


def _parse(data: bytes) -> list[list[str]]:
    text = data.decode("utf-8", errors="surrogateescape")
    return list(csv.reader(io.StringIO(text, newline="")))


def _split_header(head: bytes) -> tuple[str, int] | None:
    """The first line of ``head`` (stripped, without a leading BOM) and the offset after it.

    None if ``head`` holds no whole line. The BOM is dropped so that a file Excel re-saved as
    "CSV UTF-8" keeps matching our header; the offset still counts its bytes.
    """
    nl = head.find(b"\n")
    if nl < 0:
        return None
    return head[:nl].decode("utf-8", errors="replace").removeprefix(_BOM).strip(), nl + 1


def _header_line(fd: int) -> tuple[str, int] | None:
    """The first line of the file (stripped, BOM dropped) and the offset after it; None if none."""
    return _split_header(os.pread(fd, _HEAD, 0))


def _first_row_time(fd: int) -> datetime | None:
    """The ``processed_at`` of the file's first complete row; None if there is no parsable one.

    Reads the head of the file only: 4 KiB (header and a typical row), more only for a first
    row longer than that, up to 1 MiB.
    """
    n = _HEAD
    while True:
        head = os.pread(fd, n, 0)
        line = _split_header(head)
        end = _first_complete_end(head[line[1] :]) if line else 0
        if line and end:
            columns = next(csv.reader([line[0]]), [])
            records = _parse(head[line[1] : line[1] + end])
            if "processed_at" not in columns or not records or len(records[0]) != len(columns):
                return None
            return _parse_utc(records[0][columns.index("processed_at")])
        if len(head) < n or n >= _REREAD_LIMIT:
            return None  # the whole file read, or a first row too long to bother
        n = min(n * 16, _REREAD_LIMIT)


def _record_start_before(fd: int, end: int, floor: int) -> int:
    """A record start in ``[floor, end]``, found by reading backwards from ``end``.

    ``floor`` (just after the header) is one; the search reads blocks back from ``end`` until
    it meets ``\\n"`` + a byte other than ``"``, ``,`` or ``\\n`` (see the module docstring).
    """
    pos = end
    after = b""  # the two bytes following the block: a match may straddle blocks
    while pos > floor:
        lo = max(floor, pos - _BLOCK)
        buf = os.pread(fd, pos - lo, lo) + after
        starts = [m.start() for m in _ROW_START.finditer(buf)]
        if starts:
            return lo + starts[-1] + 1
        after = buf[:2]
        pos = lo
    return floor


# ---------------------------------------------------------------- the set of files


def _rotated_pattern(path: Path) -> re.Pattern[str]:
    tag = r"(?:\d{4}-\d{2}-\d{2}|\d{4}-\d{2}|(?P<n>\d{4,}))"
    return re.compile(rf"{re.escape(path.stem)}-{tag}(?:-upgraded)?(?:_\d+)?{re.escape(path.suffix)}")


def _written_at(entry: os.DirEntry[str]) -> datetime | None:
    """When a rotated file's rows began: its first row's ``processed_at``, else its mtime.

    The mtime is only a fallback (a file without a parsable row): touching, re-saving or
    copying a file changes it, its rows never. None: the file is gone (retention by another
    instance).
    """
    when = None
    try:
        fd = os.open(entry.path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO of that name: no hang
    except FileNotFoundError:
        return None
    except OSError:
        fd = -1  # unreadable (permissions, a folder): order it by its mtime
    if fd >= 0:
        try:
            when = _first_row_time(fd)
        except OSError:
            when = None
        finally:
            os.close(fd)
    if when is None:
        try:
            when = datetime.fromtimestamp(entry.stat(follow_symlinks=False).st_mtime, timezone.utc)
        except FileNotFoundError:
            return None
    return when


def _rotated_entries(path: Path) -> list[os.DirEntry[str]]:
    """The directory entries of ``path``'s rotated files, in no order."""
    pattern = _rotated_pattern(path)
    try:
        return [e for e in os.scandir(path.parent) if pattern.fullmatch(e.name)]
    except FileNotFoundError:
        return []


def rotated_files(path: Path) -> list[Path]:
    """The rotated files of ``path`` (``results-….csv``), oldest first.

    Ordered by the ``processed_at`` of each file's first row (its mtime when it has none), then
    by name: retention deletes, and recovery reads last, the file whose rows are oldest, not
    the one touched longest ago. Costs one small read of each file's head.
    """
    found = []
    for entry in _rotated_entries(path):
        when = _written_at(entry)
        if when is not None:
            found.append((when, entry.name))
    return [path.parent / name for _, name in sorted(found)]


def results_files(path: Path) -> list[Path]:
    """Every file of the results set, oldest first, the current one (if any) last."""
    files = rotated_files(path)
    return [*files, path] if path.exists() else files


# ---------------------------------------------------------------- writing


def _link_new_file(path: Path, data: bytes, names: Iterable[Path]) -> Path | None:
    """Write ``data`` to the first of ``names`` not taken, whole or not at all; None: all taken.

    Written under a hidden temporary name beside ``path`` (``_remove_stale_tmp`` clears one a
    crash left), fsynced, then linked: nobody sees the new name empty or half-written, and a
    file already there (another instance's) is never replaced.
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    linked = None
    try:
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (short write to {tmp})")
            os.fsync(fd)
        finally:
            os.close(fd)
        for name in names:
            try:
                os.link(tmp, name)
            except FileExistsError:
                continue
            linked = name
            break
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return linked


def _create_with_header(path: Path) -> None:
    """Put a file holding just the header at ``path``, unless one is there already.

    Readers never see the current name empty or half-written, and a file another instance
    created meanwhile stays (see ``_link_new_file``).
    """
    _link_new_file(path, _header(), [path])


def _whole_record(tail: bytes) -> bool:
    """True if ``tail`` (the bytes after the file's last newline) is a whole row bar its newline.

    That is: one record of exactly ``len(COLUMNS)`` fields, not inside a quoted field, and
    closed by a quote when it opens with one (our writer quotes every field, so a row of ours
    cut just after a comma, with an empty last field, is refused). An editor's row with fields
    quoted only where needed is accepted on its field count (we never write such rows, so none
    is torn by us). A row of ours cut exactly between the two quotes of a ``""`` inside its last
    field cannot be told from a whole one.
    """
    body = tail.removesuffix(b"\r")
    if not body or body.count(b'"') % 2:
        return False
    if body.startswith(b'"') and not body.endswith(b'"'):
        return False
    records = _parse(body)
    return len(records) == 1 and len(records[0]) == len(COLUMNS)


class ResultsWriter:
    """Appends rows to results.csv and rotates it; create with ``open()``.

    Args:
        path: the current results file (its name stays; rotated files sit beside it).
        report_cfg: rotation (``rotate``, ``max_mb``) and retention (``keep``).
        now: the clock (UTC); tests inject one.
    """

    def __init__(
        self,
        path: Path,
        report_cfg: ReportConfig | None = None,
        now: Callable[[], datetime] = _utc_datetime,
    ) -> None:
        self.path = path
        self.cfg = report_cfg if report_cfg is not None else ReportConfig()
        self.now = now
        self.rows_written = 0
        self._fd: int | None = None  # the current file, held open (see ``_locked``)
        self._prepared = False  # its header checked
        self._data_start = 0  # offset after its header
        self._good_end = 0  # a record boundary: its size after our last open or append
        self._first_period: dict[str, str | None] = {}  # of that file's first row, by mode

    # ------------------------------------------------------------ locking the current file

    @contextmanager
    def _locked(self) -> Iterator[int]:
        """The file now named ``path``, locked, header checked (or upgraded), torn tail cut.

        The descriptor stays open between appends: it pins the file we checked, so its
        identity (device, inode) cannot be taken by a new file after a rotation and deletion.
        """
        for _ in range(100):
            if self._fd is None:
                try:
                    self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
                except FileNotFoundError:
                    _create_with_header(self.path)  # first start, or a crash right after a rotation
                    continue
                self._prepared = False
            fd = self._fd
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                st = os.fstat(fd)
                try:
                    current = os.stat(self.path)
                except FileNotFoundError:
                    current = None
                if current is None or not os.path.samestat(st, current):
                    self.close()  # rotated by another instance (or us): take the new one
                    continue
                if not self._prepared and not self._prepare(fd, st):
                    self.close()  # an older version's file, rotated aside: take the new one
                    continue
                self._cut_torn_tail(fd, os.fstat(fd).st_size)  # _prepare may have written the header
                yield fd
                return
            finally:
                if self._fd == fd:
                    fcntl.flock(fd, fcntl.LOCK_UN)
        raise ReportError(f"{self.path} kept changing under us (rotated 100 times while we waited)")

    def close(self) -> None:
        """Close the descriptor held on the current file (``append`` opens it again)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # also drops our lock, if held

    def __del__(self) -> None:
        with suppress(OSError):
            self.close()

    def _prepare(self, fd: int, st: os.stat_result) -> bool:
        """Check a file we have not seen yet; False if it was an old version's, rotated aside."""
        if st.st_size == 0:  # created empty by someone else (or an older version's crash)
            os.write(fd, _header())
            os.fsync(fd)
        line = _header_line(fd)
        first = line[0] if line else ""
        if first in KNOWN_OLD_HEADERS:
            self._rotate_aside_old(fd, first)
            return False
        if line is None or first != ",".join(COLUMNS):
            raise ReportError(
                f"{self.path} has header {first[:200]!r}, expected {','.join(COLUMNS)!r}: it was not "
                "written by this version (nor an older one); move it aside or point 'results' at a new file"
            )
        self._prepared = True
        self._data_start = line[1]
        self._good_end = -1  # unknown: find a record start from the tail
        self._first_period = {}
        return True

    def _cut_torn_tail(self, fd: int, size: int) -> int:
        """Cut an incomplete last record (a writer died mid-write); returns the new size.

        A last row that is whole and lacks only its newline (an editor saved the file) is a
        record, not a torn line: it gets its newline back. Bytes that are cut are first kept in
        a side file (``_keep_torn``): results.csv is the clinical record, nothing leaves it
        unseen. Reads what was appended since our last append when that is little, else from a
        record start found near the end: never the whole file.
        """
        good = self._good_end
        if 0 <= good <= size and size - good <= _REREAD_LIMIT:
            start = good
        else:
            start = _record_start_before(fd, size, self._data_start)
        data = os.pread(fd, size - start, start)
        end = start + _last_complete_end(data)
        if end < size:
            tail = data[end - start :]
            if _whole_record(tail):
                if os.write(fd, b"\n") != 1:  # O_APPEND: at the end, under our lock
                    raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (adding a newline)")
                os.fsync(fd)
                end = size + 1
                log.warning("results_newline_added", path=str(self.path), row_bytes=len(tail))
            else:
                kept = self._keep_torn(tail)
                os.ftruncate(fd, end)
                os.fsync(fd)
                log.warning(
                    "results_torn_line_removed",
                    path=str(self.path),
                    removed_bytes=len(tail),
                    kept_in=str(kept),
                    removed=tail[:200].decode("utf-8", errors="replace"),
                )
        self._good_end = end
        return end

    def _keep_torn(self, torn: bytes) -> Path:
        """Save bytes about to be cut to a new ``<results>.torn-<UTC time>[_N]`` file; its path.

        Never overwrites (a second cut in the same second gets ``_2``), and the name does not end
        in ``.csv``, so the ``results*.csv`` set stays whole rows. If the bytes cannot be kept,
        nothing is cut: ReportError.
        """
        when = self.now()
        if when.tzinfo is not None:
            when = when.astimezone(timezone.utc)
        base = f"{self.path.name}.torn-{when.strftime('%Y%m%dT%H%M%SZ')}"
        names = (self.path.with_name(base if n == 1 else f"{base}_{n}") for n in itertools.count(1))
        try:
            kept = _link_new_file(self.path, torn, names)
        except OSError as exc:
            raise ReportError(
                f"cannot keep the torn last line of {self.path} ({len(torn)} bytes) in a side file, "
                f"so it was not cut: {exc.strerror or exc}"
            ) from exc
        assert kept is not None  # the names never run out
        return kept

    # ------------------------------------------------------------ rotation

    def _first_row_period(self, fd: int, mode: str) -> str | None:
        """The rotation period of the current file's first row (cached: it never changes)."""
        if mode in self._first_period:
            return self._first_period[mode]
        start, n = self._data_start, _BLOCK
        size = self._good_end
        row: list[str] | None = None
        while start < size:
            data = os.pread(fd, min(n, size - start), start)
            end = _first_complete_end(data)
            if end:
                row = _parse(data[:end])[0]
                break
            if len(data) >= size - start:
                break
            n *= 4
        if row is None:
            return None  # no rows yet: nothing to rotate, and not cached
        # processed_at is the first column in every version's rows (an instance not yet upgraded
        # may share the file)
        when = _parse_utc(row[0]) if row else None
        period = _period(when, mode)
        if period is None:
            log.warning(
                "results_rotation_skipped",
                path=str(self.path),
                reason=f"the first row's processed_at {row[0][:40] if row else ''!r} is not a date and time",
            )
        self._first_period[mode] = period
        return period

    def _rotation_tag(self, fd: int, payload: bytes, rows: list[ResultRow]) -> str | None:
        """The name tag of the rotation due before appending ``payload``; None: none due."""
        mode = self.cfg.rotate
        size = self._good_end
        if mode == "never" or size <= self._data_start:
            return None  # never rotate a file without rows
        if mode == "size":
            if size + len(payload) <= self.cfg.max_mb << 20:
                return None
            return f"{self._next_counter():04d}"
        first = self._first_row_period(fd, mode)
        if first is None:
            return None
        # rows stay with the period they were made in: a batch made just before midnight and
        # written just after still joins its day's file
        batch = _period(_parse_utc(rows[0].processed_at), mode) or _period(self.now(), mode)
        now = _period(self.now(), mode)
        assert batch is not None and now is not None
        return first if first < now and first < batch else None

    def _next_counter(self) -> int:
        pattern = _rotated_pattern(self.path)
        numbers = [0]
        for entry in _rotated_entries(self.path):  # names only: no need to read the files
            m = pattern.fullmatch(entry.name)
            if m and m.group("n"):
                numbers.append(int(m.group("n")))
        return max(numbers) + 1

    def _free_name(self, tag: str) -> Path:
        stem, suffix = self.path.stem, self.path.suffix
        target = self.path.with_name(f"{stem}-{tag}{suffix}")
        n = 2
        while os.path.lexists(target):
            target = self.path.with_name(f"{stem}-{tag}_{n}{suffix}")
            n += 1
        return target

    def _rename_current(self, tag: str) -> Path:
        """Rename the current file (locked by us) to a free rotated name; durable; returns it.

        Only the holder of the current file's lock renames it, and it picks a name not taken,
        so the rename replaces nothing.
        """
        target = self._free_name(tag)
        os.rename(self.path, target)
        fsync_dir(self.path.parent)
        failpoints.hit("rotated")
        return target

    def _rotate(self, tag: str, reason: str) -> Path:
        target = self._rename_current(tag)
        _create_with_header(self.path)
        failpoints.hit("rotation_created")
        log.info("results_rotated", path=str(self.path), rotated_to=str(target), reason=reason)
        self._apply_retention()
        return target

    def _rotate_aside_old(self, fd: int, header: str) -> None:
        """An older version's file: rename it aside unchanged, start a new one."""
        mode = self.cfg.rotate
        line = _header_line(fd)
        start = line[1] if line else 0
        data = os.pread(fd, _BLOCK, start)
        end = _first_complete_end(data)
        row = dict(zip(header.split(","), _parse(data[:end])[0], strict=False)) if end else {}
        when = _parse_utc(row.get("processed_at", "")) or self.now()
        if mode == "size":
            tag = f"{self._next_counter():04d}"
        else:
            tag = _period(when, "monthly" if mode == "monthly" else "daily") or "old"
        target = self._rename_current(f"{tag}-upgraded")
        _create_with_header(self.path)
        log.warning(
            "results_rotated_for_upgrade",
            path=str(self.path),
            rotated_to=str(target),
            old_columns=len(header.split(",")),
            new_columns=len(COLUMNS),
        )
        self._apply_retention()

    def _apply_retention(self) -> None:
        """Delete all but the ``keep`` newest rotated files, newest by their rows (``rotated_files``)."""
        keep = self.cfg.keep
        if keep <= 0:
            return
        rotated = rotated_files(self.path)
        for old in rotated[: max(0, len(rotated) - keep)]:
            try:
                old.unlink()
            except FileNotFoundError:
                continue  # another instance deleted it
            log.info("results_rotated_deleted", path=str(old), keep=keep)

    # ------------------------------------------------------------ public

    def open(self) -> ResultsWriter:
        """Create the file with its header, or check (upgrade) and repair an existing one."""
        _remove_stale_tmp(self.path)
        try:
            with self._locked():
                pass
        except OSError as exc:
            raise ReportError(f"cannot open {self.path} for appending: {exc.strerror or exc}") from exc
        return self

    def append(self, rows: list[ResultRow]) -> None:
        """Append rows durably (one write, then fsync), rotating first if due; ReportError on failure."""
        if not rows:
            return
        payload = _encode(rows)
        try:
            for _ in range(100):
                with self._locked() as fd:
                    tag = self._rotation_tag(fd, payload, rows)
                    if tag is not None:
                        self._rotate(tag, reason=self.cfg.rotate)
                        continue  # append to the new file, under its own lock
                    self._write(fd, payload)
                    break
        except OSError as exc:
            raise ReportError(f"cannot open {self.path}: {exc.strerror or exc}") from exc
        self.rows_written += len(rows)

    def _write(self, fd: int, payload: bytes) -> None:
        before = self._good_end
        try:
            failpoints.torn_write(fd, payload)
            written = os.write(fd, payload)
            if written != len(payload):
                # a regular file takes fewer bytes than asked only when the disk (or quota) is full
                short = f"short write, {written} of {len(payload)} bytes"
                raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({short})")
            os.fsync(fd)
            self._good_end = before + written
        except OSError as exc:
            os.ftruncate(fd, before)  # never leave a partial row for the next append
            raise ReportError(f"cannot append to {self.path}: {exc.strerror or exc}") from exc


def _remove_stale_tmp(path: Path) -> None:
    """Remove temporary files an old crash left in ``_create_with_header``."""
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    prefix = f".{path.name}."
    cutoff = time.time() - _STALE_TMP_S
    for entry in entries:
        if entry.name.startswith(prefix) and entry.name.endswith(".tmp"):
            try:
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
            except OSError:
                continue


# ---------------------------------------------------------------- reading


def read_rows(path: Path) -> list[Mapping[str, str]]:
    """All rows of one results file (reads it whole: for small files and tests)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    data = data[: _last_complete_end(data)]
    text = data.decode("utf-8", errors="surrogateescape").removeprefix(_BOM)
    return list(csv.DictReader(io.StringIO(text, newline="")))


def find_rows(
    path: Path,
    claims: set[str],
    instance: str,
    not_before: str | None,
    *,
    others_slack_s: float = 86400.0,
) -> dict[tuple[str, str], str]:
    """``(claim, file) -> destination`` of this instance's rows for ``claims``, read from the end.

    Reads ``path`` backwards in blocks, then the rotated files, newest first (by their first
    row, ``rotated_files``: a touched old file is not read first), and stops at
    the first row that shows older rows cannot matter: a row of ``instance`` whose claim is
    not in ``claims`` and whose ``processed_at`` is before ``not_before`` (an instance writes
    its batches in order), or any instance's row more than ``others_slack_s`` before
    ``not_before``. ``not_before`` is an ISO 8601 time (``format_utc``); None reads everything.
    """
    found: dict[tuple[str, str], str] = {}
    if not claims:
        return found
    cutoff = _parse_utc(not_before) if not_before else None
    own_before = format_utc(cutoff) if cutoff else None
    any_before = format_utc(cutoff - timedelta(seconds=others_slack_s)) if cutoff else None
    candidates = [path, *rotated_files(path)[::-1]]
    for file in candidates:
        try:
            fd = os.open(file, os.O_RDONLY)
        except (FileNotFoundError, IsADirectoryError):
            continue
        try:
            if _scan_back(fd, claims, instance, own_before, any_before, found):
                break
        finally:
            os.close(fd)
    return found


def _blocks_backwards(fd: int, data_start: int, size: int) -> Iterator[list[list[str]]]:
    """The file's complete records from the end backwards, a block of whole records at a time.

    A torn last line is not a record. Each block is parsed from a record start (see the module
    docstring), so quoted newlines never split a record; a record longer than a block is read
    with the block before it.
    """
    start = _record_start_before(fd, size, data_start)
    pos = start + _last_complete_end(os.pread(fd, size - start, start))
    carry: list[bytes] = []  # bytes after ``pos`` not yet parsed, in file order, kept as pieces
    while pos > data_start:
        lo = max(data_start, pos - _BLOCK)
        new = os.pread(fd, pos - lo, lo)
        pos = lo
        if lo == data_start:
            first = 0
        else:
            # only the new block (and 2 bytes into what follows it) can hold a record start not
            # searched yet: a file without one (a spreadsheet's save, no quotes) costs linear time
            m = _ROW_START.search(new + (carry[0][:2] if carry else b""))
            if m is None:
                carry.insert(0, new)  # one record longer than a block: read further back
                continue
            first = m.start() + 1
        buf = b"".join([new, *carry])
        carry = [buf[:first]] if first else []
        yield _parse(buf[first:])


def _scan_back(
    fd: int,
    claims: set[str],
    instance: str,
    own_before: str | None,
    any_before: str | None,
    found: dict[tuple[str, str], str],
) -> bool:
    """Collect matching rows of one file, newest first; True once older rows cannot matter."""
    size = os.fstat(fd).st_size
    line = _header_line(fd)
    if line is None:
        return False
    columns = next(csv.reader([line[0]]))
    try:
        i_ts, i_file, i_dest = (columns.index(c) for c in ("processed_at", "file", "destination"))
        i_inst, i_claim = columns.index("instance"), columns.index("claim")
    except ValueError:
        return False  # no claim column: no recovery rows in it
    for records in _blocks_backwards(fd, line[1], size):
        stop = False
        for rec in reversed(records):
            if len(rec) != len(columns):
                continue
            ts, inst, claim = rec[i_ts], rec[i_inst], rec[i_claim]
            if inst == instance and claim in claims:
                found.setdefault((claim, rec[i_file]), rec[i_dest])
            elif _TIMESTAMP.match(ts):
                own_old = own_before is not None and inst == instance and ts < own_before
                stop = stop or own_old or (any_before is not None and ts < any_before)
        if stop:  # the whole block is read first: rows of one batch are never split
            return True
    return False


# ---------------------------------------------------------------- disk use


def _free_mb(folder: Path) -> float:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize / (1 << 20)


def _filesystems(results: Path, processed: Path, failed: Path) -> dict[str, Path]:
    """One folder per filesystem among the three, named by the first role found on it."""
    out: dict[str, Path] = {}
    seen: set[int] = set()
    for role, folder in (("results", results.parent), ("processed", processed), ("failed", failed)):
        try:
            dev = os.stat(folder).st_dev
        except OSError:
            continue
        if dev not in seen:
            seen.add(dev)
            out[role] = folder
    return out


def low_disk_warning(results: Path, processed: Path, failed: Path, min_free_mb: int) -> str | None:
    """A plain-words warning when a filesystem the service writes to has < ``min_free_mb`` free."""
    if min_free_mb <= 0:
        return None
    low = []
    for role, folder in _filesystems(results, processed, failed).items():
        free = _free_mb(folder)
        if free < min_free_mb:
            low.append(f"{folder} ({role}) has {free:,.0f} MB free")
    if not low:
        return None
    return f"low disk space: {'; '.join(low)}, less than report.min_free_mb ({min_free_mb:,} MB)"


def disk_report(results: Path, processed: Path, failed: Path, min_free_mb: int) -> dict[str, Any]:
    """Sizes of the results set and free space of each filesystem written to (cheap: no walk).

    The size of processed/ needs a walk of every file: ``watcher.filing.folder_size`` does it
    within a time budget.
    """
    files = []
    for p in results_files(results):
        try:
            files.append({"path": str(p), "bytes": p.stat().st_size})
        except FileNotFoundError:
            continue
    free = {}
    for role, folder in _filesystems(results, processed, failed).items():
        total_mb = shutil.disk_usage(folder).total >> 20
        free[role] = {"folder": str(folder), "free_mb": round(_free_mb(folder), 1), "total_mb": total_mb}
    return {
        "results_files": files,
        "results_bytes": sum(f["bytes"] for f in files),
        "free": free,
        "min_free_mb": min_free_mb,
        "warning": low_disk_warning(results, processed, failed, min_free_mb),
    }


def tail_rows(path: Path, n: int) -> list[dict[str, str]]:
    """The last ``n`` complete rows of one results file, oldest first, reading only its tail."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (FileNotFoundError, IsADirectoryError):
        return []
    try:
        size = os.fstat(fd).st_size
        line = _header_line(fd)
        if line is None or n <= 0:
            return []
        columns = next(csv.reader([line[0]]))
        out: list[dict[str, str]] = []
        for records in _blocks_backwards(fd, line[1], size):
            out = [dict(zip(columns, r, strict=True)) for r in records if len(r) == len(columns)] + out
            if len(out) >= n:
                break
        return out[-n:]
    finally:
        os.close(fd)
