"""``best-effort`` (the default): use the etcd lock when etcd answers, otherwise reboot without one.

The original decided by asking systemd whether ``etcd.service``/``etcd2.service`` were active, so a node using
a remote etcd (``LOCKSMITHD_ENDPOINT``) never took the lock (coreos/bugs#1062).  Here the configured endpoints
themselves are asked, at each decision, and the log says which way it went and why.
"""

from __future__ import annotations

import logging

from coreos_common.backoff import BackoffPolicy
from locksmithd.backends import LockBackend
from locksmithd.strategies import Clock, SteadyWait
from locksmithd.strategies.locking import LockingStrategy

log = logging.getLogger(__name__)

NAME = "best-effort"


class BestEffortStrategy:
    name = NAME
    keeps_running = True

    def __init__(
        self, backend: LockBackend, machine_id: str, backoff: BackoffPolicy, clock: Clock, where: str
    ) -> None:
        self._lock = LockingStrategy(NAME, backend, machine_id, backoff, clock)
        self._backend = backend
        self._where = where
        self._locking = False

    async def can_finalize(self) -> None:
        if await self._backend.reachable():
            log.info("best-effort: etcd answers at %s: taking the reboot lock", self._where)
            self._locking = True
            await self._lock.can_finalize()
        else:
            log.info("best-effort: etcd does not answer at %s: rebooting without a lock", self._where)
            self._locking = False

    async def abandon(self) -> None:
        if self._locking:
            await self._lock.abandon()
            self._locking = False

    async def report_steady(self, wait_until_steady: SteadyWait) -> None:
        await wait_until_steady()
        if await self._backend.reachable():
            await self._lock.release()
        else:
            log.info("best-effort: etcd does not answer at %s: no reboot lock to release", self._where)

    async def close(self) -> None:
        await self._backend.close()
