"""The etcd reboot semaphore as a fleet sees it: every revision, in order, with who took and who released the lock.

:class:`SemaphoreWatch` follows the key with locksmithd's own etcd client (:mod:`locksmithd.backends.etcd`) in a
task and hands each change on; after a broken stream it watches again from the last revision seen.
:class:`SemaphoreView` is the pure part: it takes changes (from the watch or from a direct read, possibly twice)
and answers, once per revision, which holders appeared and which left.

Rules: a revision at or below the last one applied is ignored (so a direct read racing the watch is harmless); an
undecodable value is reported, not applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from locksmithd.backends import LockBackendError
from locksmithd.backends.etcd.client import EtcdClient
from locksmithd.semaphore import Semaphore, SemaphoreError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KeyChange:
    """One revision of the semaphore key; ``value`` is None when the key was deleted."""

    revision: int
    value: bytes | None


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
    """Hands every change of the semaphore key after ``after_revision`` to ``deliver``, watching again after a
    broken stream."""

    def __init__(self, client: EtcdClient, after_revision: int, deliver: Callable[[KeyChange], None]) -> None:
        self._client = client
        self._revision = after_revision
        self._deliver = deliver
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="semaphore-watch")

    async def _run(self) -> None:
        while True:
            try:
                async with self._client.watch(self._client.keys.semaphore, self._revision) as watch:
                    while True:
                        for event in await watch.next(timeout=30.0):
                            self._revision = event.kv.mod_revision
                            self._deliver(KeyChange(self._revision, None if event.deleted else event.kv.value))
            except (LockBackendError, TimeoutError) as exc:  # watch again from the last revision seen
                log.debug("semaphore watch: %s; watching again", exc)
                await asyncio.sleep(0.2)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


__all__ = ["KeyChange", "SemaphoreError", "SemaphoreStep", "SemaphoreView", "SemaphoreWatch"]
