"""``configure_logging()``: structlog to stdout, console on a TTY, JSON lines otherwise.

``capture_library_warnings()`` and ``capture_thread_crashes()`` turn what libraries say in
the daemon's threads into structlog events: a warning (watchdog, TensorFlow, ...) becomes
one ``library_warning`` event instead of a raw traceback on stderr, and never an exception
that kills a thread, even under ``PYTHONWARNINGS=error`` or pytest's ``-W error``; an
exception escaping a thread becomes one ``thread_crashed`` event; records of the standard
``logging`` module become ``library_log`` events.
"""

from __future__ import annotations

import logging
import sys
import threading
import warnings
from types import TracebackType
from typing import Any, TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
# warnings raised from our own package keep whatever filters apply (pytest: errors)
_LIBRARY_MODULES = r"^(?!watcher(\.|$))"


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Configure structlog once, in the CLI. ``fmt``: auto, json or console.

    The daemon logs to stdout (journald); commands whose stdout is their output log to stderr.
    """
    out = stream if stream is not None else sys.stdout
    use_console = out.isatty() if fmt == "auto" else fmt == "console"
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if use_console:
        processors.append(structlog.dev.ConsoleRenderer())
    else:
        processors += [structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _StructlogHandler):
            root.removeHandler(handler)
    root.addHandler(_StructlogHandler())
    root.setLevel(logging.DEBUG if level == "debug" else logging.WARNING)


class _StructlogHandler(logging.Handler):
    """Standard-library log records (watchdog, absl, ...) as structlog events."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = record.levelname.lower()
            method = level if level in ("debug", "info", "warning", "error", "critical") else "info"
            getattr(structlog.get_logger(), method)(
                "library_log", logger=record.name, message=record.getMessage()
            )
        except Exception:  # logging must never raise into the caller
            self.handleError(record)


def _log_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    structlog.get_logger().warning(
        "library_warning",
        category=category.__name__,
        message=str(message),
        source=f"{filename}:{lineno}",
        thread=threading.current_thread().name,
    )


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    exc_info: tuple[type[BaseException], BaseException, TracebackType | None] | Any = (
        (args.exc_type, args.exc_value, args.exc_traceback) if args.exc_value is not None else True
    )
    structlog.get_logger().error(
        "thread_crashed",
        thread=args.thread.name if args.thread is not None else "?",
        error=f"{args.exc_type.__name__}: {args.exc_value}",
        exc_info=exc_info,
    )


def capture_library_warnings() -> None:
    """Library warnings become log events and never exceptions (the service calls this)."""
    warnings.filterwarnings("default", module=_LIBRARY_MODULES)
    warnings.showwarning = _log_warning


def capture_thread_crashes() -> None:
    """An exception escaping any thread becomes one log event (the daemon's CLI calls this)."""
    threading.excepthook = _log_thread_exception
