"""Group items from a queue into batches of at most ``max_size``, waiting at most ``max_wait_s``."""

from __future__ import annotations

import queue
import threading
import time
from typing import TypeVar

T = TypeVar("T")


def collect_batch(
    source: queue.Queue[T],
    max_size: int,
    max_wait_s: float,
    stop: threading.Event | None = None,
    idle_poll_s: float = 0.1,
) -> list[T]:
    """Block for the first item, then take more until ``max_size`` or ``max_wait_s`` after it.

    Returns an empty list only when ``stop`` is set and nothing is queued.
    """
    first: T | None = None
    while first is None:
        try:
            first = source.get(timeout=idle_poll_s)
        except queue.Empty:
            if stop is not None and stop.is_set():
                return []
    batch = [first]
    deadline = time.monotonic() + max_wait_s
    while len(batch) < max_size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            batch.append(source.get(timeout=remaining))
        except queue.Empty:
            break
    # whatever is already waiting joins without further delay
    while len(batch) < max_size:
        try:
            batch.append(source.get_nowait())
        except queue.Empty:
            break
    return batch
