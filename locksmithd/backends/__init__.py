"""Reboot-lock backends: where a node asks for permission to reboot and says it is back.

Every backend answers the same two questions so the strategies never branch on which one they have:
*may this node reboot now?* (``acquire``, which waits until it may) and *this node is back and steady*
(``release``). Locks are owned by a machine id and recursive: acquiring a lock already held succeeds.
"""

from __future__ import annotations

from typing import Protocol


class LockBackendError(Exception):
    """The backend could not answer (unreachable, refused, corrupt state); the message says which and why."""


class LockBackend(Protocol):
    """What ``etcd-lock``/``best-effort`` (etcd semaphore) and ``fleet-lock`` (FleetLock server) provide."""

    name: str

    async def reachable(self) -> bool:
        """True when the lock service answers right now (best-effort uses this to choose)."""
        ...

    async def acquire(self, machine_id: str) -> None:
        """Return once ``machine_id`` holds a slot; waits while the lock is full. Raises LockBackendError."""
        ...

    async def release(self, machine_id: str) -> bool:
        """Release ``machine_id``'s slot if it holds one; True if something was released. Raises LockBackendError."""
        ...

    async def close(self) -> None:
        ...
