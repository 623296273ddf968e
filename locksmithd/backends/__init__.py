"""Reboot-lock backends: where a node asks for permission to reboot and says it is back.

Every backend answers the same two questions so the strategies never branch on which one they have:
*may this node reboot now?* (``acquire``, which waits until it may) and *this node is back and steady*
(``release``). Locks are owned by a machine id and recursive: acquiring a lock already held succeeds.

Rules of the seam:

* **Waiting is the backend's, retrying is the strategy's.** ``acquire`` waits as long as the lock is full,
  in whatever way its protocol waits (an etcd watch and waiting line, a FleetLock server polled while it
  answers "held"). When the backend itself fails (unreachable, refused, corrupt state) it raises
  LockBackendError, LockBackendUnavailable when asking again later may help; it never sleeps and retries on
  its own. The strategy decides when to ask again, with one backoff policy.
* **Progress is reported, not logged for someone else.** ``acquire`` calls ``on_progress`` with a
  LockProgress each time where the request stands changes (asking, waiting and where in line, held), so the
  daemon can show "waiting for the lock since T, position N" without knowing the backend.
* **What the holder is doing travels with the lock.** ``version`` is the version the node is about to
  reboot into; backends that keep details about holders store it with the slot.
* **What is held can be read back where the service can tell.** ``holding`` reads (never changes) whether a
  machine holds a slot now, so a daemon started after a reboot knows the slot it took before; a backend whose
  protocol has no read (FleetLock) answers None.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


class LockBackendError(Exception):
    """The backend could not answer (unreachable, refused, corrupt state); the message says which and why."""


class LockBackendUnavailable(LockBackendError):
    """No answer right now (service down, timed out, overloaded): asking again later may succeed."""


class LockPhase(enum.Enum):
    """Where one ``acquire`` call stands; the values are what status lines and JSON show."""

    # A request for a slot is on its way (or being retried after a lost race).
    ASKING = "asking"
    # No slot is free for this node: it waits for a holder to release one.
    WAITING = "waiting"
    # This node holds a slot; ``acquire`` returns next.
    HELD = "held"


@dataclass(frozen=True)
class LockProgress:
    """One report of ``acquire``'s progress.

    ``position`` is this node's place in the waiting line (1: next to be served) when the backend keeps a
    line, else None; when ``position_is_lower_bound`` is set the node only knows that it is at least that far
    back (a node behind the front of the line counts only the waiters it needs to). ``waiting`` is how many
    nodes wait in the line in total, when known. ``holders`` and ``slots`` are the lock as last seen (empty and
    None when the backend cannot tell, as with FleetLock).
    """

    phase: LockPhase
    position: int | None = None
    position_is_lower_bound: bool = False
    waiting: int | None = None
    holders: tuple[str, ...] = ()
    slots: int | None = None


ProgressCallback = Callable[[LockProgress], None]


@dataclass(frozen=True)
class SlotHolding:
    """What the lock service says of one machine's slot: held or not, and since when (Unix seconds) when the
    service keeps that (etcd's holder records), else None."""

    held: bool
    since: float | None = None


class LockBackend(Protocol):
    """What ``etcd-lock``/``best-effort`` (etcd semaphore) and ``fleet-lock`` (FleetLock server) provide."""

    name: str

    async def reachable(self) -> bool:
        """True when the lock service answers right now (best-effort uses this to choose)."""
        ...

    async def acquire(
        self, machine_id: str, *, version: str = "", on_progress: ProgressCallback | None = None
    ) -> None:
        """Return once ``machine_id`` holds a slot; waits while the lock is full.

        ``version`` is the version being installed (kept with the slot where the backend can);
        ``on_progress`` receives where the request stands. Raises LockBackendError (LockBackendUnavailable
        when trying again later may help).
        """
        ...

    async def holding(self, machine_id: str) -> SlotHolding | None:
        """Whether ``machine_id`` holds a slot now, read without changing anything; None when the service cannot
        tell. Raises LockBackendError."""
        ...

    async def release(self, machine_id: str) -> bool:
        """Release ``machine_id``'s slot if it holds one; True if something was released. Raises LockBackendError."""
        ...

    async def close(self) -> None:
        ...
