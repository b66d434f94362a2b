"""The systemd notify protocol (``Type=notify``, ``WatchdogSec=``) without a dependency.

``notify("READY=1")`` sends one datagram to ``$NOTIFY_SOCKET``; outside systemd it does nothing.
"""

from __future__ import annotations

import os
import socket

import structlog

log = structlog.get_logger()

SEND_TIMEOUT_S = 0.5


def notify(message: str, timeout_s: float = SEND_TIMEOUT_S) -> bool:
    """Send ``message`` to systemd; returns whether it was taken.

    Never waits longer than ``timeout_s``. A datagram to a Unix socket whose receive queue is
    full blocks until the receiver reads (``net.unix.max_dgram_qlen``: 10 unless systemd's
    sysctl raised it), so a service manager that stops reading would otherwise wedge the
    daemon's main loop, its stop included. A message not taken is logged and dropped:
    STATUS= and WATCHDOG=1 are sent again within seconds.
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
            log.warning(
                "systemd_notify_failed",
                message=message.partition("\n")[0],
                socket=os.environ.get("NOTIFY_SOCKET"),
                error=exc.strerror or type(exc).__name__,
            )
            return False
    return True


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
