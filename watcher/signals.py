"""Signals for the daemon and the listener: the handler only queues them, the main thread acts.

Python runs a signal handler in the main thread between any two steps of what that thread is
doing, perhaps while it holds the log's write lock (structlog's ``PrintLogger`` prints under a
non-reentrant lock) or an ``Event``'s lock: a handler that logged or set an Event there could
deadlock the process. So the handler puts the signal on a ``queue.SimpleQueue`` (its ``put``
is reentrant, documented as safe in signal handlers), and the main thread's loop calls
``take()`` at each turn, which logs each signal and returns them for the caller to act on.
"""

from __future__ import annotations

import faulthandler
import queue
import signal
from collections.abc import Iterable
from types import FrameType
from typing import Any

import structlog

log = structlog.get_logger()


class SignalQueue:
    """Signals caught since the last ``take()``."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[int] = queue.SimpleQueue()

    def install(self, signums: Iterable[signal.Signals]) -> dict[int, Any]:
        """Catch ``signums`` into this queue (main thread only); returns the previous handlers."""

        def on_signal(signum: int, frame: FrameType | None) -> None:
            self._queue.put(signum)

        return {sig: signal.signal(sig, on_signal) for sig in signums}

    def take(self) -> list[signal.Signals]:
        """The signals queued since the last call, each logged as ``signal_received``."""
        taken: list[signal.Signals] = []
        while True:
            try:
                sig = signal.Signals(self._queue.get_nowait())
            except queue.Empty:
                return taken
            log.info("signal_received", signal=sig.name)
            taken.append(sig)


def restore(previous: dict[int, Any]) -> None:
    """Put back the handlers ``SignalQueue.install`` replaced."""
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def dump_stacks_on_fatal_signals() -> None:
    """On SIGABRT, SIGSEGV, SIGFPE, SIGBUS or SIGILL, write every thread's Python stack to stderr
    before the process dies.

    systemd's watchdog (``WatchdogSec=``) kills a daemon that stopped pinging with SIGABRT, and a
    crash in native code (TensorFlow, OpenCV, a pixel plugin) raises the others: without this,
    the journal shows only that the process died, not where each thread was.
    """
    faulthandler.enable(all_threads=True)


def arm_exit_deadline(seconds: float) -> None:
    """If the process is still alive ``seconds`` from now, dump every thread's stack to stderr
    and exit with status 1.

    For a stop that does not end: faulthandler's timer is a C thread, so it fires while Python
    is wedged, and also during interpreter teardown after ``main`` has returned, where
    TensorFlow's exit hangs are known. Set below systemd's ``TimeoutStopSec``, whose SIGKILL
    leaves no trace of where the process waited. Replaces a timer armed before.
    """
    faulthandler.dump_traceback_later(seconds, exit=True)
