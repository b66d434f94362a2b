"""Small durable-filesystem helpers: atomic writes, directory fsync, a non-blocking file lock."""

from __future__ import annotations

import fcntl
import itertools
import os
import secrets
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    """Make a rename or create inside ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_TMP_TOKEN = secrets.token_hex(4)  # per process: temp names of two writers on a share differ
_TMP_SEQ = itertools.count()  # next() on it is atomic in CPython: threads get distinct numbers


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = 0o600, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so readers see the old or the new file, never a mix.

    The file gets ``mode`` whatever the umask (0600 by default, as ``mkstemp`` would make it;
    0644 for what others read from a share). ``durable=False`` skips the two fsyncs (file and
    folder): a power cut may then lose the new file, but never leaves half of one. The temp
    name is a random per-process token, the process id (a forked child keeps the token) and a
    counter: unique without ``mkstemp``'s retries, and ``O_EXCL`` refuses a clash rather than
    share a file.
    """
    tmp = path.parent / f".{path.name}.{_TMP_TOKEN}-{os.getpid()}.{next(_TMP_SEQ)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fchmod(fd, mode)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
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
