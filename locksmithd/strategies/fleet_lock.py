"""``fleet-lock``: ask a FleetLock server (airlock, poseidon/fleetlock) before rebooting; report steady after.

Unlike Zincati, the reboot window still applies: the node waits for the window, then for the lock, and checks
the window again before rebooting (zincati#1014 cannot combine its periodic strategy with fleet_lock).
"""

from __future__ import annotations

from coreos_common.backoff import BackoffPolicy
from locksmithd.backends import LockBackend
from locksmithd.strategies import Clock
from locksmithd.strategies.locking import LockingStrategy

NAME = "fleet-lock"


class FleetLockStrategy(LockingStrategy):
    def __init__(self, backend: LockBackend, machine_id: str, backoff: BackoffPolicy, clock: Clock) -> None:
        super().__init__(NAME, backend, machine_id, backoff, clock)
