"""Group items from a queue into batches: at once when the model has nothing queued, bigger otherwise.

A lone file dropped into an idle daemon must not wait for a batch to fill: when the model has
no batch waiting for it, what is queued goes out immediately. While a decoded batch already
waits for the model, arrivals pile up into the next batch, up to ``max_size``, for at most
``max_wait_s`` after its first item (or until the model's queue runs dry).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

_POLL_S = 0.005  # how often a waiting batch asks send_now()


def collect_batch(
    source: queue.Queue[T],
    max_size: int,
    max_wait_s: float,
    stop: threading.Event | None = None,
    idle_poll_s: float = 0.1,
    send_now: Callable[[], bool] | None = None,
) -> list[T]:
    """Block for the first item, then take what is queued; wait for more only while ``send_now()`` is false.

    Without ``send_now`` the batch waits up to ``max_wait_s`` after its first item for
    ``max_size`` items. With it (the service passes "the model has no decoded batch queued"),
    the wait ends as soon as it returns true. Returns an empty list only when ``stop`` is set
    and nothing is queued.
    """
    first: T | None = None
    while first is None:
        try:
            first = source.get(timeout=idle_poll_s)
        except queue.Empty:
            if stop is not None and stop.is_set():
                return []
    batch = [first]
    _drain(source, batch, max_size)
    deadline = time.monotonic() + max_wait_s
    while len(batch) < max_size:
        if send_now is not None and send_now():
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            wait = remaining if send_now is None else min(remaining, _POLL_S)
            batch.append(source.get(timeout=wait))
        except queue.Empty:
            continue
        _drain(source, batch, max_size)
    return batch


def _drain(source: queue.Queue[T], batch: list[T], max_size: int) -> None:
    """Whatever is already waiting joins without delay."""
    while len(batch) < max_size:
        try:
            batch.append(source.get_nowait())
        except queue.Empty:
            return
