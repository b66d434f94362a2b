"""Crash and hang injection for the crash-safety tests: ``XRAY_WATCHER_CRASH_AT=point[:n]``,
``XRAY_WATCHER_HANG_AT=point``.

When the variable names a point, the process kills itself with SIGKILL the n-th time
(default 1st) it reaches that point, exactly as a power cut or ``kill -9`` would. Unset (as
in production), ``hit()`` is a string comparison and nothing else. ``torn_write`` (in the
results append) first writes half of the rows, as a kill in the middle of the write would.
``hang()`` blocks the calling thread for good at its point, as a wedged library would.
"""

from __future__ import annotations

import os
import signal
import threading

_SPEC = os.environ.get("XRAY_WATCHER_CRASH_AT", "")
_HANG_AT = os.environ.get("XRAY_WATCHER_HANG_AT", "")
_POINT, _, _NTH = _SPEC.partition(":")
_COUNT = int(_NTH) if _NTH.isdigit() else 1
_hits = 0
_lock = threading.Lock()

POINTS = (
    "claimed",
    "decoded",
    "torn_write",
    "rows_written",
    "linked",
    "placed",
    "rotated",
    "rotation_created",
)


def hit(point: str) -> None:
    """Mark that ``point`` was reached; SIGKILL ourselves if it is the armed one."""
    global _hits
    if point != _POINT:
        return
    with _lock:
        _hits += 1
        if _hits >= _COUNT:
            os.kill(os.getpid(), signal.SIGKILL)


def hang(point: str) -> None:
    """Block forever if ``point`` is the one ``XRAY_WATCHER_HANG_AT`` names."""
    if point == _HANG_AT:
        threading.Event().wait()


def torn_write(fd: int, data: bytes) -> None:
    """If 'torn_write' is armed: the n-th call writes half of ``data`` to ``fd`` and dies.

    This is what a kill or power cut in the middle of a results.csv append leaves behind.
    """
    global _hits
    if _POINT != "torn_write":
        return
    with _lock:
        _hits += 1
        if _hits >= _COUNT:
            cut = max(1, len(data) // 2)
            if data[cut - 1 : cut] == b"\n":
                cut += 1  # inside a row, not between two
            elif data[cut : cut + 1] == b"\n":
                cut -= 1  # nor a whole row short of its newline only (kept whole on restart)
            os.write(fd, data[:cut])
            os.fsync(fd)
            os.kill(os.getpid(), signal.SIGKILL)
