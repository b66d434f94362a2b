"""The systemd notify protocol (``Type=notify``, ``WatchdogSec=``) without a dependency.

``notify("READY=1")`` sends one datagram to ``$NOTIFY_SOCKET``; outside systemd it does nothing.
"""

from __future__ import annotations

import os
import socket
import time

import structlog

log = structlog.get_logger()

SEND_TIMEOUT_S = 0.5
REPEAT_LOG_S = 300.0  # a run of failed STATUS=/WATCHDOG=1 sends is logged once per this
_failures = {"since_log": 0, "logged_at": float("-inf")}


def notify(message: str, timeout_s: float = SEND_TIMEOUT_S) -> bool:
    """Send ``message`` to systemd; returns whether it was taken.

    Never waits longer than ``timeout_s``. A datagram to a Unix socket whose receive queue is
    full blocks until the receiver reads (``net.unix.max_dgram_qlen``: 10 unless systemd's
    sysctl raised it), so a service manager that stops reading would otherwise wedge the
    daemon's main loop, its stop included. A message not taken is dropped: STATUS= and
    WATCHDOG=1 are sent again within seconds. Each failed READY=/STOPPING= is logged; the
    periodic ones once per ``REPEAT_LOG_S`` while they keep failing, with how many were dropped.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(address)
            sock.sendall(message.encode())
        except OSError as exc:  # TimeoutError included
            _log_failure(message.partition("\n")[0], exc)
            return False
    _failures["since_log"] = 0
    _failures["logged_at"] = float("-inf")
    return True


def _log_failure(first_line: str, exc: OSError) -> None:
    _failures["since_log"] += 1
    now = time.monotonic()
    periodic = first_line.startswith(("STATUS=", "WATCHDOG="))
    if periodic and now - _failures["logged_at"] < REPEAT_LOG_S:
        return
    log.warning(
        "systemd_notify_failed",
        message=first_line,
        dropped=_failures["since_log"],
        socket=os.environ.get("NOTIFY_SOCKET"),
        error=exc.strerror or type(exc).__name__,
    )
    _failures["since_log"] = 0
    _failures["logged_at"] = now


def watchdog_interval_s() -> float | None:
    """Half the watchdog period systemd asked for (``$WATCHDOG_USEC``), or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None
