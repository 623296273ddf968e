"""A slot of a lock service, held by this machine: taken before a reboot, given back once the node is steady.

The strategies that coordinate through a lock service (``etcd-lock``, ``best-effort``, ``fleet-lock``) each keep
one ``SlotKeeper`` around their backend. Rules: the backend waits while the lock is full and raises
LockBackendError when it fails (``locksmithd.backends``); the keeper decides when to ask again, with the
settings' one backoff policy (10 s doubling to 5 min by default, the original's lock retry), logging each failure
with the delay and reporting it to the observer. A retry sequence starts again from the first delay after a
success.
"""

from __future__ import annotations

import logging

from coreos_common.backoff import BackoffPolicy
from locksmithd.backends import LockBackend, LockBackendError, SlotHolding
from locksmithd.clock import Clock, show_delay
from locksmithd.strategies.base import StrategyObserver

log = logging.getLogger(__name__)


class SlotKeeper:
    """Takes and gives back ``machine_id``'s slot through ``backend``, retrying the backend's failures."""

    def __init__(
        self, backend: LockBackend, machine_id: str, backoff: BackoffPolicy, clock: Clock, observer: StrategyObserver
    ) -> None:
        self.backend = backend
        self.machine_id = machine_id
        self.backoff = backoff
        self.clock = clock
        self.observer = observer

    async def take(self, version: str) -> None:
        """Return once this machine holds a slot; the backend waits while the lock is full."""
        for delay in self.backoff.delays():
            try:
                await self.backend.acquire(self.machine_id, version=version, on_progress=self.observer.lock_progress)
            except LockBackendError as exc:
                self.observer.backend_failed("acquire", exc)
                log.error("Failed to acquire lock: %s. Retrying in %s.", exc, show_delay(delay))
                await self.clock.sleep(delay)
                continue
            self.observer.lock_held(True)
            return

    async def give_back(self) -> None:
        """Release this machine's slot if it holds one, retrying until the backend answers."""
        for delay in self.backoff.delays():
            try:
                released = await self.backend.release(self.machine_id)
            except LockBackendError as exc:
                self.observer.backend_failed("release", exc)
                log.error("Unlocking old locks failed: %s. Retrying in %s.", exc, show_delay(delay))
                await self.clock.sleep(delay)
                continue
            self.observer.lock_held(False)
            if not released:
                log.info("This machine (%s) holds no reboot lock: nothing to release", self.machine_id)
            return

    async def holding(self) -> SlotHolding | None:
        """One read of this machine's slot (not retried: the caller decides)."""
        return await self.backend.holding(self.machine_id)

    async def close(self) -> None:
        await self.backend.close()


class SlotStrategy:
    """A strategy under which every reboot holds a slot of one lock service (``etcd-lock``, ``fleet-lock``).

    Its module chooses the label, the service (the backend in ``slots``) and the group; the behaviour is the
    same: take a slot before rebooting, give it back when the reboot is put off or the node is steady.
    """

    def __init__(self, label: str, slots: SlotKeeper, group: str) -> None:
        self.label = label
        self.slots = slots
        self.group = group

    async def can_finalize(self, version: str) -> None:
        await self.slots.take(version)

    async def abandon(self) -> None:
        await self.slots.give_back()

    async def report_steady(self) -> None:
        await self.slots.give_back()

    async def holding(self) -> SlotHolding | None:
        return await self.slots.holding()

    async def close(self) -> None:
        await self.slots.close()
