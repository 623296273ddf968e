"""The hand-offs between the payload pipeline's threads: one bounded fan-out queue and one buffer pool.

Rules
-----
* Both are bounded by bytes, never by a count of items: memory stays flat whatever the payload's chunk sizes.
  One item larger than the bound is still let through when nothing else is held, so a big unit cannot stall.
* Each guards its own state with one lock, and is the only state the pipeline's threads share besides the
  sink's single failure slot.
* :meth:`stop` is final: it wakes every waiter, drops what is held, and from then on ``put`` answers False,
  ``get`` and ``acquire`` raise :class:`Stopped`. That is how one failing thread ends all the others.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Stopped(Exception):
    """The pipeline was stopped (by abort() or by another thread's failure) while this thread waited."""


class _End:
    """Queued after the last item: consumers see the end of the stream."""


_END = _End()


class FanOut(Generic[T]):
    """One producer, a fixed number of consumers that each get every item in order; bounded by bytes in flight.

    An item leaves the queue (and stops counting) once every consumer has taken it, so the bound holds between
    the producer and the slowest consumer, and each item is shared, not copied per consumer. A producer on an
    event loop uses :meth:`try_put` and :meth:`call_when_room` instead of the blocking :meth:`put`.
    """

    def __init__(self, limit: int, consumers: int = 1) -> None:
        self._limit = limit
        self._low_water = limit // 2
        self._items: deque[tuple[T | _End, int]] = deque()
        self._first = 0  # sequence number of _items[0]
        self._cursors = [0] * consumers
        self._bytes = 0
        self._stopped = False
        self._room_callback: Callable[[], None] | None = None
        self._room_for = 0
        lock = threading.Lock()
        self._not_full = threading.Condition(lock)
        self._not_empty = threading.Condition(lock)

    def _fits(self, size: int) -> bool:
        return not self._bytes or self._bytes + size <= self._limit

    def _append(self, item: T | _End, size: int) -> None:
        self._items.append((item, size))
        self._bytes += size
        self._not_empty.notify_all()

    def put(self, item: T, size: int) -> bool:
        """Queue ``item``, waiting while the queue is full; False when the queue was stopped."""
        with self._not_full:
            while not self._stopped and not self._fits(size):
                self._not_full.wait()
            if self._stopped:
                return False
            self._append(item, size)
            return True

    def try_put(self, item: T, size: int) -> bool | None:
        """Queue ``item`` if it fits now: True; False when full; None when the queue was stopped."""
        with self._not_full:
            if self._stopped:
                return None
            if not self._fits(size):
                return False
            self._append(item, size)
            return True

    def finish(self) -> bool:
        """Mark the end of the stream (after the last item); False when the queue was stopped."""
        with self._not_full:
            if self._stopped:
                return False
            self._append(_END, 0)
            return True

    def _has_room(self, size: int) -> bool:
        return self._bytes <= self._low_water and self._fits(size)

    def call_when_room(self, size: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` once (from a consumer's thread, or now) when half the queue is free and ``size``
        bytes fit, or when the queue stopped."""
        with self._not_full:
            ready = self._stopped or self._has_room(size)
            if not ready:
                self._room_callback, self._room_for = callback, size
        if ready:
            callback()

    def get(self, consumer: int = 0) -> T | None:
        """The next item for ``consumer``, waiting for one; None at the end of the stream; raises Stopped."""
        callback = None
        with self._not_empty:
            while not self._stopped and self._cursors[consumer] - self._first >= len(self._items):
                self._not_empty.wait()
            if self._stopped:
                raise Stopped()
            item = self._items[self._cursors[consumer] - self._first][0]
            self._cursors[consumer] += 1
            freed = False
            while self._items and min(self._cursors) > self._first:
                self._bytes -= self._items.popleft()[1]
                self._first += 1
                freed = True
            if freed:
                self._not_full.notify()
                if self._room_callback is not None and self._has_room(self._room_for):
                    callback, self._room_callback = self._room_callback, None
        if callback is not None:
            callback()
        return None if isinstance(item, _End) else item

    def stop(self) -> None:
        with self._not_full:
            self._stopped = True
            self._items.clear()
            self._bytes = 0
            callback, self._room_callback = self._room_callback, None
            self._not_full.notify_all()
            self._not_empty.notify_all()
        if callback is not None:
            callback()


class BufferPool:
    """Reused buffers for assembling operation blobs, bounded by their total size.

    A fresh buffer per blob would cost an allocation that the C library often returns to the kernel on release,
    and so a page fault per 4 KiB on the next one: more CPU than the copy itself.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._free: list[bytearray] = []
        self._in_use = 0
        self._stopped = False
        self._cond = threading.Condition(threading.Lock())

    def acquire(self, size: int) -> bytearray:
        """A buffer of at least ``size`` bytes, waiting while the pool is exhausted; raises Stopped."""
        with self._cond:
            while not self._stopped and self._in_use and self._in_use + size > self._limit:
                self._cond.wait()
            if self._stopped:
                raise Stopped()
            buffer = next((b for b in self._free if len(b) >= size), None)
            if buffer is not None:
                self._free.remove(buffer)
            else:
                cached = sum(len(b) for b in self._free)
                while self._free and self._in_use + cached + size > self._limit:
                    cached -= len(self._free.pop(0))
                buffer = bytearray(size)
            self._in_use += len(buffer)
            return buffer

    def release(self, buffer: bytearray) -> None:
        with self._cond:
            if self._stopped:
                return
            self._in_use -= len(buffer)
            self._free.append(buffer)
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._free.clear()
            self._cond.notify_all()
