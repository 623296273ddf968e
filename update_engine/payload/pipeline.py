"""The hand-offs between the payload pipeline's threads: one bounded fan-out queue, one buffer pool, and the
window that puts out-of-order results back in order; and how many CPUs the pipeline may use.

Rules
-----
* All three are bounded by bytes, never by a count of items: memory stays flat whatever the payload's chunk or
  operation sizes. One item larger than the bound is still let through when nothing else is held, so a big unit
  cannot stall.
* Each guards its own state with one lock, and they are the only state the pipeline's threads share besides the
  sink's single failure slot. Callbacks run outside the locks.
* :meth:`stop` is final: it wakes every waiter, drops what is held, and from then on ``put`` answers False,
  ``get``, ``acquire`` and ``reserve`` raise :class:`Stopped`. That is how one failing thread ends all the others.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")


class Stopped(Exception):
    """The pipeline was stopped (by abort() or by another thread's failure) while this thread waited."""


class FanOut(Generic[T]):
    """One producer, a fixed number of consumers that each get every item in order; bounded by bytes in flight.

    An item leaves the queue (and stops counting) once every consumer has taken it, so the bound holds between
    the producer and the slowest consumer, and each item is shared, not copied per consumer. A producer on an
    event loop uses :meth:`try_put` and :meth:`call_when_room` instead of the blocking :meth:`put`. Several
    threads may share one consumer's place: each item then goes to exactly one of them (a work queue), and every
    one of them sees the end of the stream.
    """

    def __init__(self, limit: int, consumers: int = 1) -> None:
        self._limit = limit
        self._low_water = limit // 2
        self._items: deque[tuple[T, int]] = deque()
        self._first = 0  # sequence number of _items[0]
        self._cursors = [0] * consumers
        self._bytes = 0
        self._stopped = False
        self._finished = False
        self._room_callback: Callable[[], None] | None = None
        self._room_for = 0
        lock = threading.Lock()
        self._not_full = threading.Condition(lock)
        self._not_empty = threading.Condition(lock)

    def _fits(self, size: int) -> bool:
        return not self._bytes or self._bytes + size <= self._limit

    def _append(self, item: T, size: int) -> None:
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
            self._finished = True
            self._not_empty.notify_all()
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
                if self._finished:
                    return None
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
        return item

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


@dataclass
class _Job(Generic[T]):
    size: int
    on_consumed: Callable[[], None] | None
    pieces: deque[T] = field(default_factory=deque)
    done: bool = False


class OrderedWindow(Generic[T]):
    """Pieces from jobs that run in parallel and finish in any order, handed to one consumer in job order.

    The producer :meth:`reserve` s each job's size before the job starts, waiting while the window's ``budget``
    is taken (one job larger than the budget goes alone); workers :meth:`add` pieces and say when the job is
    :meth:`done`, never waiting; the consumer :meth:`get` s the pieces of job 0, then job 1… as they come. A job's
    reservation, and its ``on_consumed`` callback (which may free what its pieces point into), are released once
    the consumer asks for the piece after its last one. So at most ``budget`` bytes of results are held, and the
    oldest job always streams through: nothing waits for a job that cannot start.
    """

    def __init__(self, budget: int) -> None:
        self._budget = budget
        self._reserved = 0
        self._jobs: dict[int, _Job[T]] = {}
        self._next = 0  # sequence number of the next reservation
        self._head = 0  # the job whose pieces the consumer is taking
        self._finished = False
        self._stopped = False
        self._cond = threading.Condition(threading.Lock())

    def reserve(self, size: int, on_consumed: Callable[[], None] | None = None) -> int:
        """A job's sequence number, once ``size`` bytes of the budget are its own; raises Stopped."""
        with self._cond:
            while not self._stopped and self._reserved and self._reserved + size > self._budget:
                self._cond.wait()
            if self._stopped:
                raise Stopped()
            seq = self._next
            self._next += 1
            self._reserved += size
            self._jobs[seq] = _Job(size, on_consumed)
            return seq

    def add(self, seq: int, piece: T) -> None:
        with self._cond:
            if self._stopped:
                raise Stopped()
            self._jobs[seq].pieces.append(piece)
            self._cond.notify_all()

    def done(self, seq: int) -> None:
        with self._cond:
            if self._stopped:
                raise Stopped()
            self._jobs[seq].done = True
            self._cond.notify_all()

    def finish(self) -> None:
        """No job will be reserved any more: the consumer gets None after the last one."""
        with self._cond:
            self._finished = True
            self._cond.notify_all()

    def get(self) -> T | None:
        """The next piece in job order, waiting for it; None after the last job; raises Stopped.

        The ``on_consumed`` callbacks of the jobs it passes run before it waits: the next job may be waiting
        for what they free (a blob's buffer), and it would never come."""
        while True:
            released: list[Callable[[], None]] = []
            try:
                with self._cond:
                    while True:
                        if self._stopped:
                            raise Stopped()
                        job = self._jobs.get(self._head)
                        if job is not None and job.pieces:
                            return job.pieces.popleft()
                        if job is not None and job.done:
                            del self._jobs[self._head]
                            self._head += 1
                            self._reserved -= job.size
                            if job.on_consumed is not None:
                                released.append(job.on_consumed)
                            self._cond.notify_all()
                            continue
                        if job is None and self._finished and self._head == self._next:
                            return None
                        if released:
                            break  # run them outside the lock, then look again
                        self._cond.wait()
            finally:
                for callback in released:
                    callback()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._jobs.clear()
            self._cond.notify_all()


def fix_malloc_mmap_threshold() -> None:
    """Pin glibc's mmap threshold at 8 MiB (glibc only; else nothing).

    By default glibc raises its mmap threshold to the size of any large block freed, up to 32 MiB, and then keeps
    later blocks of that size in each thread's heap for good: with several workers that held 14 MiB of resident
    memory that held nothing. A fixed threshold stops that. At 128 KiB (its default) every bzip2 decompressor's
    3.6 MiB of tables got a mapping of its own, faulted in afresh for each operation: 9 % more CPU than the
    decompression alone. At 8 MiB the tables and the output pieces stay in each worker's heap and are reused
    from one operation to the next. Process-wide, and idempotent.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(ctypes.c_int(_M_MMAP_THRESHOLD), ctypes.c_int(8 * 1024 * 1024))
    except (OSError, AttributeError):  # not glibc: its allocator has its own rules
        pass


_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def cpu_limit(affinity: int, cpu_max: Sequence[str]) -> int:
    """CPUs a process may keep busy: those it may run on, capped by every ``cpu.max`` quota above it.

    ``cpu_max`` holds the contents of the cgroup v2 ``cpu.max`` files from the process's cgroup up to the root
    (``"max 100000"`` when unlimited, ``"150000 100000"`` for ``CPUQuota=150%``); a fractional quota rounds up.
    """
    limit = affinity
    for text in cpu_max:
        quota, _, period = text.strip().partition(" ")
        if quota.isdigit() and period.isdigit() and int(period) > 0:
            limit = min(limit, math.ceil(int(quota) / int(period)))
    return max(1, limit)


def usable_cpus() -> int:
    """:func:`cpu_limit` of this process: its CPU affinity and its cgroup's (v2) quotas."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except OSError:
        affinity = os.cpu_count() or 1
    quotas: list[str] = []
    try:
        cgroup = next(
            (line.split(":", 2)[2].strip() for line in Path("/proc/self/cgroup").read_text().splitlines()
             if line.startswith("0::")),
            None,
        )
    except OSError:
        cgroup = None
    if cgroup is not None:
        directory = Path("/sys/fs/cgroup") / cgroup.lstrip("/")
        for level in (directory, *directory.parents):
            with contextlib.suppress(OSError):
                quotas.append((level / "cpu.max").read_text())
            if level == Path("/sys/fs/cgroup"):
                break
    return cpu_limit(affinity, quotas)
