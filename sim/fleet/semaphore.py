"""The etcd reboot semaphore as a fleet sees it: every revision, in order, with who took and who released the lock.

:class:`SemaphoreWatch` follows the key with locksmithd's own etcd watch (:mod:`locksmithd.backends.etcd`) in a
thread and hands each change to the event loop; after a broken stream it watches again from the last revision
seen. :class:`SemaphoreView` is the pure part: it takes changes (from the watch or from a direct read, possibly
twice) and answers, once per revision, which holders appeared and which left.

Rules: a revision at or below the last one applied is ignored (so a direct read racing the watch is harmless); an
undecodable value is reported, not applied; the watch thread stops within 5 s of ``stop``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from locksmithd.backends.etcd import EtcdSemaphoreStore, KeyChange, KeyWatch
from locksmithd.semaphore import Semaphore, SemaphoreError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SemaphoreStep:
    """One new revision: its holders and max, who appeared and who left (machine ids, sorted)."""

    revision: int
    holders: frozenset[str]
    maximum: int
    taken: tuple[str, ...]
    released: tuple[str, ...]


class SemaphoreView:
    """The holders as of the last revision applied."""

    def __init__(self, semaphore: Semaphore, revision: int) -> None:
        self.revision = revision
        self.holders: frozenset[str] = frozenset(semaphore.holders)

    def apply(self, change: KeyChange) -> SemaphoreStep | None:
        """The step ``change`` makes, or None when it is not newer. SemaphoreError: an invalid value (the
        revision counts as seen)."""
        if change.revision <= self.revision:
            return None
        self.revision = change.revision
        semaphore = Semaphore.decode(change.value) if change.value is not None else None
        holders = frozenset(semaphore.holders) if semaphore else frozenset()
        step = SemaphoreStep(
            change.revision, holders, semaphore.max if semaphore else 0,
            tuple(sorted(holders - self.holders)), tuple(sorted(self.holders - holders)),
        )  # fmt: skip
        self.holders = holders
        return step


class SemaphoreWatch:
    """Hands every change of the semaphore key after ``after_revision`` to ``deliver`` on the event loop."""

    def __init__(
        self, store: EtcdSemaphoreStore, after_revision: int, deliver: Callable[[KeyChange], None]
    ) -> None:
        self._store = store
        self._revision = after_revision
        self._deliver = deliver
        self._loop = asyncio.get_running_loop()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._watch: KeyWatch | None = None
        self._thread = threading.Thread(target=self._run, name="semaphore-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.is_set():
            watch = self._store.watch(self._revision, idle_timeout=30.0)
            with self._lock:
                self._watch = watch
            if self._stopping.is_set():
                return
            try:
                for change in watch.changes():
                    self._revision = change.revision
                    with contextlib.suppress(RuntimeError):  # the loop is closed: the run is over
                        self._loop.call_soon_threadsafe(self._deliver, change)
            except Exception as exc:  # a broken stream: watch again from the last revision seen
                if self._stopping.is_set():
                    return
                log.warning("semaphore watch: %s; watching again", exc)
                time.sleep(0.2)

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            watch = self._watch
        if watch is not None:
            watch.stop()
        self._thread.join(timeout=5)


__all__ = ["SemaphoreError", "SemaphoreStep", "SemaphoreView", "SemaphoreWatch"]
