"""``best-effort`` (the default): use the etcd lock when etcd answers, otherwise reboot without one.

The original decided by asking systemd whether ``etcd.service``/``etcd2.service`` were active, so a node using
a remote etcd (``LOCKSMITHD_ENDPOINT``) never took the lock (coreos/bugs#1062).  Here the configured endpoints
themselves are asked, at each decision, and the log says which way it went and why.
"""

from __future__ import annotations

import logging

from locksmithd.backends import LockBackend, SlotHolding
from locksmithd.strategies.base import StrategyContext, StrategySpec
from locksmithd.strategies.etcd_lock import check_etcd_files, etcd_backend
from locksmithd.strategies.slots import SlotKeeper

log = logging.getLogger(__name__)

LABEL = "best-effort"


class BestEffortStrategy:
    label = LABEL

    def __init__(self, backend: LockBackend, slots: SlotKeeper, group: str, where: str) -> None:
        self.backend = backend
        self.slots = slots
        self.group = group
        self.where = where
        self._locking = False

    async def can_finalize(self, version: str) -> None:
        if await self.backend.reachable():
            log.info("best-effort: etcd answers at %s: taking the reboot lock", self.where)
            self._locking = True
            await self.slots.take(version)
        else:
            log.info("best-effort: etcd does not answer at %s: rebooting without a lock", self.where)
            self._locking = False

    async def abandon(self) -> None:
        if self._locking:
            await self.slots.give_back()
            self._locking = False

    async def report_steady(self) -> None:
        if await self.backend.reachable():
            await self.slots.give_back()
        else:
            log.info("best-effort: etcd does not answer at %s: no reboot lock to release", self.where)

    async def holding(self) -> SlotHolding | None:
        if not await self.backend.reachable():
            return None
        return await self.slots.holding()

    async def close(self) -> None:
        await self.slots.close()


def build(context: StrategyContext) -> BestEffortStrategy:
    settings = context.settings
    backend = etcd_backend(settings)
    slots = SlotKeeper(backend, settings.machine_id, settings.backoff, context.clock, context.observer)
    return BestEffortStrategy(backend, slots, settings.group, ",".join(settings.etcd.endpoints))


SPEC = StrategySpec(
    LABEL,
    "like etcd-lock when etcd answers at LOCKSMITHD_ENDPOINT, else reboot without a lock",
    build,
    check_files=check_etcd_files,
)
