"""Batching by size and by time."""

from __future__ import annotations

import queue
import threading
import time

from watcher.batching import collect_batch


class TestCollectBatch:
    def test_full_batch_returns_at_max_size(self) -> None:
        """With more items queued than max_size, a batch is exactly max_size, in order."""
        q: queue.Queue[int] = queue.Queue()
        for i in range(10):
            q.put(i)
        assert [0, 1, 2, 3] == collect_batch(q, 4, 5.0)
        assert [4, 5, 6, 7] == collect_batch(q, 4, 5.0)
        assert [8, 9] == collect_batch(q, 4, 0.05)

    def test_partial_batch_after_timeout(self) -> None:
        """A lone item goes out after max_wait, not later."""
        q: queue.Queue[int] = queue.Queue()
        q.put(1)
        t0 = time.monotonic()
        assert [1] == collect_batch(q, 8, 0.3)
        elapsed = time.monotonic() - t0
        assert 0.25 <= elapsed < 2.0

    def test_late_items_join_within_the_window(self) -> None:
        """Items arriving within max_wait of the first join its batch."""
        q: queue.Queue[int] = queue.Queue()
        q.put(1)
        threading.Timer(0.1, q.put, args=(2,)).start()
        assert [1, 2] == collect_batch(q, 8, 1.0)

    def test_waits_for_first_item(self) -> None:
        """The wait window starts at the first item, not at the call."""
        q: queue.Queue[int] = queue.Queue()
        threading.Timer(0.4, q.put, args=(7,)).start()
        assert [7] == collect_batch(q, 8, 0.05)

    def test_stop_returns_empty(self) -> None:
        """A set stop event with an empty queue ends the wait with an empty batch."""
        q: queue.Queue[int] = queue.Queue()
        stop = threading.Event()
        threading.Timer(0.2, stop.set).start()
        assert [] == collect_batch(q, 8, 1.0, stop=stop)


class TestIdleModel:
    def test_lone_item_goes_at_once_when_the_model_is_idle(self) -> None:
        """Nothing else queued and the model idle: no wait at all, whatever max_wait is."""
        q: queue.Queue[int] = queue.Queue()
        idle = threading.Event()
        idle.set()
        q.put(1)
        t0 = time.monotonic()
        assert [1] == collect_batch(q, 8, 5.0, send_now=idle.is_set)
        assert time.monotonic() - t0 < 0.5

    def test_items_pile_up_while_the_model_is_busy(self) -> None:
        """While the model is busy, arrivals join the batch; it goes when the model is idle again."""
        q: queue.Queue[int] = queue.Queue()
        idle = threading.Event()
        q.put(1)
        for i, delay in enumerate((0.05, 0.1, 0.15)):
            threading.Timer(delay, q.put, args=(i + 2,)).start()
        threading.Timer(0.4, idle.set).start()
        t0 = time.monotonic()
        assert [1, 2, 3, 4] == collect_batch(q, 8, 5.0, send_now=idle.is_set)
        assert 0.35 <= time.monotonic() - t0 < 2.0

    def test_busy_model_still_bounded_by_max_wait_and_size(self) -> None:
        """A model that stays busy: the batch goes at max_size, or at max_wait after its first item."""
        q: queue.Queue[int] = queue.Queue()
        idle = threading.Event()
        for i in range(5):
            q.put(i)
        assert [0, 1, 2] == collect_batch(q, 3, 5.0, send_now=idle.is_set)
        t0 = time.monotonic()
        assert [3, 4] == collect_batch(q, 3, 0.3, send_now=idle.is_set)
        assert 0.25 <= time.monotonic() - t0 < 2.0
