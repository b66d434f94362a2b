"""Finding inbox files that are complete and ours to take. No TensorFlow here.

Sources of candidates: a startup scan, watchdog events, and a periodic rescan (which also
covers inotify queue overflows and a dead observer thread). The observer never watches a
hidden folder: neither inotify watches nor polling snapshots enter names with a leading dot,
so the daemon's own work folder ``inbox/.xray-watcher/`` (claims, lock, state) raises no
events and costs no watches, however many claim folders come and go. A candidate becomes *ready*
once it is fully written: after its close-write event, or when its size and mtime have
not changed for ``settle_ms``. Hidden files (leading dot, which also hides our own work
folder ``.xray-watcher``) and ``*.part``/``*.tmp`` files are never candidates, so writers
can use the "write under a temporary name, then rename" convention. Candidates are files with
a listed extension, files with no extension, and files with any other extension whose first
bytes are DICOM.
"""

from __future__ import annotations

import os
import queue
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog
from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
    FileSystemMovedEvent,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper, PathedInotifyEvent
from watchdog.observers.polling import PollingObserverVFS

from watcher.config import Config
from watcher.dicom import looks_like_dicom

log = structlog.get_logger()

PARTIAL_SUFFIXES = (".part", ".tmp", ".partial", ".crdownload")
CLOSE_GRACE_S = 0.2
_SNIFF_BYTES = 4096
# The events the handler acts on. watchdog then asks inotify for these only, and drops the
# rest before dispatch: every move also raises a DirModifiedEvent for each folder it touches,
# and opens, reads, closes without writing and deletions concern no file we could take.
EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileClosedEvent,
    FileMovedEvent,
    DirCreatedEvent,
    DirMovedEvent,
]


def _is_hidden_below(root: bytes, path: bytes) -> bool:
    """Whether a part of ``path`` below ``root`` starts with a dot."""
    prefix = root.rstrip(b"/") + b"/"
    if not path.startswith(prefix):
        return False
    return any(part.startswith(b".") for part in path[len(prefix) :].split(b"/"))


def _visible_scandir(path: str | None) -> Iterator[os.DirEntry[str]]:
    """``os.scandir`` without hidden entries: polling snapshots never enter hidden folders."""
    with os.scandir(path) as entries:
        for entry in entries:
            if not entry.name.startswith("."):
                yield entry


MOVE_MEMORY_S = 2.0  # how long a move's source is remembered, to follow a renamed folder's watches


class PromptMoveGrouper(InotifyMoveEventGrouper):
    """watchdog's inotify move grouper, without its hold-back and its linear searches.

    watchdog holds every IN_MOVED_FROM for 0.5 s at the head of its event queue, hoping for
    its IN_MOVED_TO, and finds that partner by scanning the whole queue for every
    IN_MOVED_TO. Each claim renames a file out of the inbox into a hidden folder that is not
    watched, so its IN_MOVED_FROM never finds a partner, and every event behind it waited:
    files arriving at 5 a second got their rows after 267 ms at p50 (29 ms at 2 a second);
    and 1,600 files renamed in at once cost the event thread 0.35 ms of CPU per file in those
    scans.

    This grouper queues every event at once and unpaired (the handler takes a move's
    destination either way). It remembers each IN_MOVED_FROM's path by cookie for
    ``MOVE_MEMORY_S``, so a folder renamed inside the inbox still takes its watches along
    (``InotifyWatchGroup._source_for_move``), found in O(1). Only the event thread calls it
    for writing, under its watch group's lock.
    """

    def __init__(self) -> None:
        super().__init__()
        self._sources: OrderedDict[int, tuple[float, PathedInotifyEvent]] = OrderedDict()

    def put_event(self, event: PathedInotifyEvent) -> None:
        now = time.monotonic()
        while self._sources and next(iter(self._sources.values()))[0] < now - MOVE_MEMORY_S:
            self._sources.popitem(last=False)
        if event.ev.is_moved_from:
            self._sources[event.ev.cookie] = (now, event)
        elif event.ev.is_moved_to:
            self._sources.pop(event.ev.cookie, None)
        self._queue.put(event, delay=False)

    def get_queued_moved_from_event(self, cookie: int) -> PathedInotifyEvent | None:
        found = self._sources.get(cookie)
        return found[1] if found is not None else None

    def discard_pending_events(self) -> None:
        super().discard_pending_events()
        self._sources.clear()


def _make_native_observer() -> BaseObserver:
    """watchdog's inotify observer, with no watch ever placed in a hidden folder.

    watchdog watches every folder below the root, its own bookkeeping racing with folders
    that come and go quickly (the claim folders of ``.xray-watcher/``). watchdog has no
    public way to exclude folders from its watches, so this subclasses its watch group
    (watchdog 7.x; pinned in pyproject.toml, and tests check the watch table). Where the
    inotify observer is not available (not Linux), the platform's default is used.
    """
    try:
        from watchdog.observers.inotify import InotifyFullEmitter, InotifyObserver, InotifyWatchGroup
    except ImportError:  # pragma: no cover - not Linux
        return Observer()

    class VisibleWatchGroup(InotifyWatchGroup):
        def __post_init__(self) -> None:
            self._move_event_grouper = PromptMoveGrouper()
            super().__post_init__()

        def _add_callback(self, path: bytes) -> None:
            if _is_hidden_below(self.path, path):
                return
            super()._add_callback(path)

        def _add_all_callbacks(self, path: bytes) -> None:
            if _is_hidden_below(self.path, path):
                return
            self._add_callback(path)
            if not (self.is_recursive and os.path.isdir(path)):
                return
            for root, dirnames, _ in os.walk(path, followlinks=False):
                dirnames[:] = [d for d in dirnames if not d.startswith(b".")]
                for dirname in dirnames:
                    full_path = os.path.join(root, dirname)
                    if not os.path.islink(full_path):
                        self._add_callback(full_path)

    class VisibleEmitter(InotifyFullEmitter):  # a file moved in from outside is a move, not a create
        def on_thread_start(self) -> None:
            self._inotify = VisibleWatchGroup(
                self._inotify_fd,
                os.fsencode(self.watch.path),
                is_recursive=self.watch.is_recursive,
                event_mask=self.get_event_mask_from_filter(),
                follow_symlink=self.watch.follow_symlink,
            )

    observer = InotifyObserver()
    observer._emitter_class = VisibleEmitter
    return observer


def is_candidate(inbox: Path, path: Path, extensions: tuple[str, ...]) -> bool:
    """Whether ``path`` (inside ``inbox``) is a file name we may take at all."""
    try:
        rel = path.relative_to(inbox)
    except ValueError:
        return False
    if any(part.startswith(".") for part in rel.parts):
        return False
    name = path.name.lower()
    if name.endswith(PARTIAL_SUFFIXES):
        return False
    if name.endswith(extensions):
        return True
    if "." not in name:  # DICOM files often have no extension: any regular file without one
        try:
            return stat.S_ISREG(os.lstat(path).st_mode)
        except OSError:
            return False
    return _is_dicom_file(path)


def _is_dicom_file(path: Path) -> bool:
    """Whether a file with some other extension holds DICOM (its first bytes; links not followed)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        return looks_like_dicom(os.read(fd, _SNIFF_BYTES))
    except OSError:
        return False
    finally:
        os.close(fd)


def scan_inbox(inbox: Path, extensions: tuple[str, ...]) -> Iterator[Path]:
    """Every candidate file under the inbox, hidden folders pruned, links not followed.

    A link to a folder is a candidate like any other link (never entered): its name decides.
    """
    for root, dirs, files in os.walk(inbox, followlinks=False):
        root_path = Path(root)
        links, folders = [], []
        for d in dirs:
            try:
                is_link = (root_path / d).is_symlink()
            except OSError as exc:  # e.g. a path longer than the system takes: nothing there opens
                log.warning("inbox_entry_unreachable", path=str(root_path / d)[:300], error=str(exc)[:200])
                continue
            if is_link:
                links.append(d)
            elif not d.startswith("."):
                folders.append(d)
        dirs[:] = sorted(folders)
        for name in sorted(files + links):
            path = root_path / name
            try:
                candidate = is_candidate(inbox, path, extensions)
            except OSError as exc:
                log.warning("inbox_entry_unreachable", path=str(path)[:300], error=str(exc)[:200])
                continue
            if candidate:
                yield path


@dataclass
class _Pending:
    size: int
    mtime_ns: int
    last_change: float
    closed: bool


def _stat_key(path: Path) -> tuple[int, int] | None:
    try:
        st = path.lstat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _put_all(q: queue.Queue[Path], items: list[Path]) -> None:
    """Put ``items`` on ``q`` in one step, so a batcher waking on the first sees them all.

    Files that settle together (a folder moved in, a rescan) then form one batch instead of a
    lone first file followed by the rest. ``queue.Queue`` documents no bulk put; this takes its
    lock and does what ``put`` does for each item, on an unbounded queue.
    """
    if not items:
        return
    with q.mutex:
        q.queue.extend(items)
        q.unfinished_tasks += len(items)
        q.not_empty.notify(len(items))


class Ingest:
    """Tracks candidates until they are settled, then puts them on ``ready``."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.inbox = cfg.inbox
        self.ready: queue.Queue[Path] = queue.Queue()
        self._pending: dict[Path, _Pending] = {}
        self._queued: set[Path] = set()
        self._lock = threading.Lock()
        self._observer: BaseObserver | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_rescan = 0.0

    @property
    def settle_s(self) -> float:
        """How long a file without a close-write event must stay unchanged (from the live config)."""
        return self.cfg.ingest.settle_ms / 1000.0

    # ------------------------------------------------------------ noticing

    def notice(self, path: Path, closed: bool = False, complete: bool = False) -> None:
        """Something happened to ``path``; consider it (thread-safe, never raises).

        ``complete``: the file was renamed into place, so it is whole already (the writer's
        "write under a temporary name, then rename" convention) and is ready at once.
        """
        try:
            if not is_candidate(self.inbox, path, self.cfg.ingest.extensions):
                return
            key = _stat_key(path)
            now = time.monotonic()
            with self._lock:
                if path in self._queued:
                    return
                if key is None:
                    self._pending.pop(path, None)
                    return
                if complete:
                    self._pending.pop(path, None)
                    self._queued.add(path)
                    self.ready.put(path)
                    return
                entry = self._pending.get(path)
                if entry is None:
                    self._pending[path] = _Pending(key[0], key[1], now, closed)
                else:
                    if (entry.size, entry.mtime_ns) != key:
                        entry.size, entry.mtime_ns, entry.last_change = key[0], key[1], now
                    entry.closed = entry.closed or closed
        except Exception:  # an event handler must never kill the observer thread
            log.exception("ingest_notice_failed", path=str(path))

    def notice_all(self, paths: list[Path], complete: bool = False) -> None:
        """``notice`` each path; complete ones go onto ``ready`` together, in one step."""
        if not complete:
            for path in paths:
                self.notice(path)
            return
        taken = []
        with self._lock:
            for path in paths:
                if path in self._queued or not is_candidate(self.inbox, path, self.cfg.ingest.extensions):
                    continue
                if _stat_key(path) is None:
                    continue
                self._pending.pop(path, None)
                self._queued.add(path)
                taken.append(path)
            _put_all(self.ready, taken)

    def rescan(self) -> int:
        """Notice every candidate in the inbox; returns how many were seen."""
        n = 0
        for path in scan_inbox(self.inbox, self.cfg.ingest.extensions):
            self.notice(path)
            n += 1
        self._last_rescan = time.monotonic()
        return n

    def done(self, path: Path) -> None:
        """The service has taken ``path`` off the ready queue for good."""
        with self._lock:
            self._queued.discard(path)

    def settle(self) -> int:
        """Move settled candidates to ``ready``; returns how many were moved."""
        now = time.monotonic()
        settled: list[Path] = []
        with self._lock:
            for path, entry in list(self._pending.items()):
                key = _stat_key(path)
                if key is None:
                    del self._pending[path]
                    continue
                if (entry.size, entry.mtime_ns) != key:
                    entry.size, entry.mtime_ns, entry.last_change = key[0], key[1], now
                    entry.closed = False
                    continue
                quiet = now - entry.last_change
                # a file may be touched again after its close (some copiers re-open to set
                # times), so even a closed file must be quiet for a short grace period
                if quiet >= self.settle_s or (entry.closed and quiet >= min(CLOSE_GRACE_S, self.settle_s)):
                    del self._pending[path]
                    self._queued.add(path)
                    settled.append(path)
            _put_all(self.ready, settled)
        return len(settled)

    def pending_count(self) -> int:
        """Candidates seen but not yet settled."""
        with self._lock:
            return len(self._pending)

    # ------------------------------------------------------------ threads

    def start(self) -> None:
        """Start the observer and the settle/rescan thread."""
        self._observer = self._make_observer()
        self._observer.start()
        self.rescan()
        self._thread = threading.Thread(target=self._loop, name="ingest-settle", daemon=True)
        self._thread.start()

    def _make_observer(self) -> BaseObserver:
        if self.cfg.ingest.observer == "polling":
            observer: BaseObserver = PollingObserverVFS(
                os.stat, _visible_scandir, polling_interval=self.cfg.ingest.poll_interval_ms / 1000.0
            )
        else:
            observer = _make_native_observer()
        observer.schedule(_Handler(self), str(self.inbox), recursive=True, event_filter=EVENTS)
        return observer

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.settle()
                observer_dead = self._observer is not None and not self._observer.is_alive()
                if observer_dead:
                    log.error("observer_died_restarting")
                    self._observer = self._make_observer()
                    self._observer.start()
                if observer_dead or time.monotonic() - self._last_rescan >= self.cfg.ingest.rescan_interval_s:
                    self.rescan()
            except Exception:
                log.exception("ingest_loop_error")
                self._stop.wait(1.0)

    def stop(self) -> None:
        """Stop watching (files already ready stay on the queue)."""
        self._stop.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=5)


class _Handler(FileSystemEventHandler):
    def __init__(self, ingest: Ingest) -> None:
        self.ingest = ingest

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            target = event.dest_path if isinstance(event, FileSystemMovedEvent) else event.src_path
            if not target:
                return  # moved out of the inbox (claims included): nothing to take
            if _is_hidden_below(os.fsencode(self.ingest.inbox), os.fsencode(target)):
                return  # e.g. the work folder's first creation, or a file renamed to a hidden name
            if event.is_directory:
                if event.event_type in ("created", "moved"):
                    # a folder moved in whole brings files that raise no events of their own; moved
                    # in by one rename, they are complete and arrive together (one batch)
                    folder = Path(os.fsdecode(target))
                    paths = list(scan_inbox(folder, self.ingest.cfg.ingest.extensions))
                    self.ingest.notice_all(paths, complete=isinstance(event, FileSystemMovedEvent))
                return
            if isinstance(event, FileSystemMovedEvent):
                self.ingest.notice(Path(os.fsdecode(event.dest_path)), complete=True)
                return
            if event.event_type in ("created", "modified"):
                self.ingest.notice(Path(os.fsdecode(event.src_path)))
            elif isinstance(event, FileClosedEvent):
                self.ingest.notice(Path(os.fsdecode(event.src_path)), closed=True)
        except Exception:
            log.exception("event_handler_error", fs_event=repr(event))
