"""What the lock strategies share: take a slot before rebooting, give it back once the node is steady."""

from __future__ import annotations

import logging

from coreos_common.backoff import BackoffPolicy
from locksmithd.backends import LockBackend, LockBackendError
from locksmithd.strategies import Clock, SteadyWait, show_delay

log = logging.getLogger(__name__)


class LockingStrategy:
    """A strategy backed by a LockBackend; ``name`` is the strategy's, the backend knows where the lock is."""

    keeps_running = True

    def __init__(
        self, name: str, backend: LockBackend, machine_id: str, backoff: BackoffPolicy, clock: Clock
    ) -> None:
        self.name = name
        self.backend = backend
        self.machine_id = machine_id
        self.backoff = backoff
        self.clock = clock

    async def can_finalize(self) -> None:
        """Wait for a slot; the backend waits while the lock is full, errors are retried here."""
        for delay in self.backoff.delays():
            try:
                await self.backend.acquire(self.machine_id)
                return
            except LockBackendError as exc:
                log.error("Failed to acquire lock: %s. Retrying in %s.", exc, show_delay(delay))
                await self.clock.sleep(delay)

    async def abandon(self) -> None:
        await self.release()

    async def report_steady(self, wait_until_steady: SteadyWait) -> None:
        await wait_until_steady()
        await self.release()

    async def release(self) -> None:
        """Release this machine's slot if it holds one, retrying until the backend answers."""
        for delay in self.backoff.delays():
            try:
                released = await self.backend.release(self.machine_id)
            except LockBackendError as exc:
                log.error("Unlocking old locks failed: %s. Retrying in %s.", exc, show_delay(delay))
                await self.clock.sleep(delay)
                continue
            if not released:
                log.info("This machine (%s) holds no reboot lock: nothing to release", self.machine_id)
            return

    async def close(self) -> None:
        await self.backend.close()
