"""``etcd-lock``: take a slot of the etcd semaphore before rebooting, give it back once the node is steady."""

from __future__ import annotations

from coreos_common.backoff import BackoffPolicy
from locksmithd.backends import LockBackend
from locksmithd.strategies import Clock
from locksmithd.strategies.locking import LockingStrategy

NAME = "etcd-lock"


class EtcdLockStrategy(LockingStrategy):
    def __init__(self, backend: LockBackend, machine_id: str, backoff: BackoffPolicy, clock: Clock) -> None:
        super().__init__(NAME, backend, machine_id, backoff, clock)
