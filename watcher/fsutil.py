"""Small durable-filesystem helpers: atomic writes, directory fsync, a rename that never
replaces, a non-blocking file lock."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import itertools
import os
import secrets
import threading
from pathlib import Path
from typing import Any


def fsync_dir(folder: Path) -> None:
    """Make a rename or create inside ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
# what renameat2 answers where the kernel, the C library or the filesystem lacks the flag, or
# a seccomp filter refuses the call (systemd's SystemCallErrorNumber=EPERM; the shipped units
# allow it, in @system-service): the caller's fallback then gives the real error, if any
_NOREPLACE_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM}


@functools.lru_cache(maxsize=1)
def _renameat2() -> Any:
    """The C library's ``renameat2`` (glibc 2.28+), or None."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def rename_no_replace(src: Path, dst: Path) -> bool:
    """Rename ``src`` to ``dst`` in one step, never replacing an existing ``dst``.

    ``renameat2(RENAME_NOREPLACE)``: FileExistsError if ``dst`` exists. Returns False, and
    leaves ``src`` where it is, where the kernel, the C library or the filesystem cannot do
    it (the caller then links, or checks and renames). Unlike a hard link, a rename tells an
    inotify watcher that the file arrived complete (IN_MOVED_TO, not IN_CREATE).
    """
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NOREPLACE_UNSUPPORTED:
        return False
    if err == errno.EEXIST:
        raise FileExistsError(err, os.strerror(err), str(dst))
    raise OSError(err, os.strerror(err), str(src))


_TMP_TOKEN = secrets.token_hex(4)  # per process: temp names of two writers on a share differ
_TMP_SEQ = itertools.count()  # next() on it is atomic in CPython: threads get distinct numbers


_NO_LINK_LOCK = threading.Lock()  # this process's check-then-rename fallbacks, one at a time


def move_no_replace(src: Path, dst: Path) -> None:
    """Give ``src`` the name ``dst`` (``src`` gone); FileExistsError if ``dst`` exists, never
    replaced (``src`` then kept).

    A rename where the filesystem can refuse to replace (``rename_no_replace``; an inotify
    watcher sees it arrive complete), else a hard link and ``src`` removed (IN_CREATE and no
    close-write: the daemon waits ``ingest.settle_ms`` for such a file), else, on a filesystem
    without hard links (some network shares), check then rename: racy only against another
    process writing the same name.
    """
    if rename_no_replace(src, dst):
        return
    try:
        os.link(src, dst)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        with _NO_LINK_LOCK:
            if os.path.lexists(dst):
                raise FileExistsError(errno.EEXIST, "File exists", str(dst)) from exc
            os.rename(src, dst)
        return
    os.unlink(src)


def write_all(fd: int, data: bytes) -> None:
    """All of ``data`` to ``fd`` (``os.write`` may take less than it is given)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def atomic_write_bytes(
    path: Path, data: bytes, *, mode: int = 0o600, durable: bool = True, exclusive: bool = False
) -> None:
    """Write ``data`` to ``path`` so readers see the old or the new file, never a mix.

    The file gets ``mode`` whatever the umask (0600 by default, as ``mkstemp`` would make it;
    0644 for what others read from a share). ``durable=False`` skips the two fsyncs (file and
    folder): a power cut may then lose the new file, but never leaves half of one. The temp
    name is a random per-process token, the process id (a forked child keeps the token) and a
    counter: unique without ``mkstemp``'s retries, and ``O_EXCL`` refuses a clash rather than
    share a file. ``exclusive=True`` never replaces an existing ``path``, even one made a moment
    before by another thread or process (``move_no_replace``): FileExistsError says the name
    is taken.
    """
    tmp = path.parent / f".{path.name}.{_TMP_TOKEN}-{os.getpid()}.{next(_TMP_SEQ)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            write_all(fd, data)
            os.fchmod(fd, mode)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            move_no_replace(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str, *, mode: int = 0o600) -> None:
    """``atomic_write_bytes`` of ``text`` in UTF-8, durable."""
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def try_lock(path: Path) -> int | None:
    """An exclusive ``flock`` on ``path`` (created if needed): its descriptor, or None if held.

    The lock lasts until the descriptor is closed, or the process dies.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
