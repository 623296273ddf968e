"""Write-behind of check-ins and events: the Omaha answer never waits for these writes.

Theory of operation: handlers ``add`` check-ins (coalesced per instance: only the latest one of a batch is
written) and events (kept in order) to the pending batch.  A single flusher task writes the batch in one
transaction (``Store.record``) every ``interval`` seconds, or at once when ``batch_size`` entries are
waiting.  The batch is bounded: past ``max_pending`` a handler awaits room (``wait_room``), so a slow database
slows the answers down instead of growing memory.  When a write fails (database down) the batch is kept and
retried at the next interval; if the database stays away and the batch is full, the oldest check-ins are
dropped (they only say "last seen"), counted, and logged once.  ``close`` flushes what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from coreupdate.storage.store import CheckIn, EventRecord, RecordOutcome

log = logging.getLogger(__name__)

Flush = Callable[[list[CheckIn], list[EventRecord]], Awaitable[RecordOutcome]]


class WriteBehind:
    def __init__(
        self, flush: Flush, *, interval: float = 0.25, batch_size: int = 5000, max_pending: int = 10_000,
        on_outcome: Callable[[RecordOutcome], Any] | None = None,
    ) -> None:
        self._flush = flush
        self.interval = interval
        self.batch_size = batch_size
        self.max_pending = max_pending
        self._on_outcome = on_outcome
        self._checkins: dict[tuple[str, str], CheckIn] = {}
        self._events: list[EventRecord] = []
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self.dropped = 0
        self.written = 0

    @property
    def pending(self) -> int:
        return len(self._checkins) + len(self._events)

    def add(self, checkin: CheckIn | None, events: list[EventRecord]) -> None:
        if checkin is not None:
            key = (checkin.app_id, checkin.machine_id)
            self._checkins.pop(key, None)  # re-insert: the dict keeps arrival order, oldest first
            self._checkins[key] = checkin
        self._events.extend(events)
        if self.pending >= self.batch_size:
            self._wake.set()
        if self.pending >= self.max_pending:
            self._room.clear()

    async def wait_room(self) -> None:
        if not self._room.is_set():
            await self._room.wait()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="write-behind")

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            await self.flush()

    async def flush(self) -> bool:
        """Write what is pending; False when the database refused it (the batch stays pending)."""
        if not self.pending:
            return True
        checkins = list(self._checkins.values())
        events = self._events
        self._checkins = {}
        self._events = []
        try:
            outcome = await self._flush(checkins, events)
        except Exception as exc:  # the database is down or refused the batch: keep it for the next try
            self._requeue(checkins, events)
            if not self._failing:
                log.warning(
                    "Cannot write %d check-in(s) and %d event(s) to the database (%s); keeping them and retrying "
                    "every %.2f s. Check that the database is up.", len(checkins), len(events),
                    str(exc).splitlines()[0], self.interval,
                )
            self._failing = True
            return False
        if self._failing:
            log.info("Database writes work again; %d check-in(s) and %d event(s) written", len(checkins), len(events))
        self._failing = False
        self.written += len(checkins) + len(events)
        if self.pending < self.max_pending:
            self._room.set()
        if self._on_outcome is not None:
            self._on_outcome(outcome)
        return True

    def _requeue(self, checkins: list[CheckIn], events: list[EventRecord]) -> None:
        newer = self._checkins
        self._checkins = {(c.app_id, c.machine_id): c for c in checkins}
        self._checkins.update(newer)
        self._events = events + self._events
        overflow = self.pending - self.max_pending
        if overflow > 0:
            for key in list(self._checkins)[:overflow]:
                del self._checkins[key]
            overflow = self.pending - self.max_pending
            if overflow > 0:
                del self._events[:overflow]
            self.dropped += overflow if overflow > 0 else 0
            log.warning("Write-behind queue full while the database is away: dropped the oldest entries")
        # Handlers waiting for room would wait for the database: let them answer; the queue stays bounded.
        self._room.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if not await self.flush():
            log.error("Shutting down with %d check-in(s)/event(s) not written: the database is unreachable",
                      self.pending)
