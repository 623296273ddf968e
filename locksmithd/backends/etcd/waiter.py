"""The wait for a slot of the etcd semaphore, as a state machine without I/O.

Rules of this file (after h11's ``_state.py``):

1. Everything that decides what a waiting node does next lives here. The machine is in one phase at a time
   (a Phase value: the phases below, each a frozen dataclass carrying its own data, named by WaitPhase); it
   says what it needs done next as an Action, and learns what came of it from an Event passed to ``handle``.
2. No I/O, no clock, no randomness of its own: the shell (``backend.EtcdLockBackend``) performs the actions,
   events carry the monotonic time ``now``, and random numbers come from the ``random`` given to it. So every
   path below can be tested with plain values.
3. Errors are not events: a corrupt value, a refused request or an unreachable etcd ends the wait in the
   shell (and the strategy decides when to try again); the machine only sees what etcd answered.

Theory of operation. A node first creates the key if it is missing and reads it, in one round trip
(``Reading``). With a free slot it writes at once (``Taking``; a compare-and-swap, so the holders stay bounded
by ``max``). Otherwise it joins the waiting line (``Joining``): a lease, and ``<key>/waiters/<machine id>``
put under it, whose ``create_revision`` is its place; the same round trip reads the semaphore and the keys
just ahead. Only the front of the line (at most FRONT_WAITERS, and no more than ``max``) follows the semaphore
key (``AtFront``); a node further back watches only the line key FRONT_WAITERS places ahead of it and reads
its place again when that key goes (``InLine``, then ``Placing``), so each hand-off wakes about one node in
line and costs etcd O(max) events instead of O(fleet). At the front, the waiters ahead not yet seen holding a
slot are counted: a node with fewer of them than free slots is *entitled* and writes at once (and tries again
at once after losing a race, while the answer still leaves it a slot); one that is not waits a hand-off delay
for each waiter served before it (in case one of them is gone) plus a random part, so the line leaves in
order. The transaction that takes a slot also deletes the taker's line key, which is what the waiter behind
it watches. A node whose lease is lost (etcd out of reach for a whole TTL) joins again at the back. Without
the line (etcd refuses its leases or keys), a node follows the key like every other (``Following``), with a
random delay before using a free slot that doubles each time another node was faster. A waiting node
therefore costs 4 requests (read, lease, line put with the read of its place, watch). A wait that ends because
etcd is out of reach leaves the line key to its lease: the next attempt puts it again (keeping its place), or, if
it finds a free slot at once, deletes it with the take.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import ClassVar

from locksmithd.backends import LockPhase, LockProgress
from locksmithd.backends.etcd.line import LinePosition
from locksmithd.backends.etcd.ops import Snapshot

# At most this many waiters (fewer when ``max`` is smaller) follow the semaphore key; each one behind watches
# the line key this many places ahead of its own.
FRONT_WAITERS = 3
# An entitled waiter's compare-and-swap is tried again this often while the answers leave it a slot.
ENTITLED_TRIES = 50


def front_size(slots: int) -> int:
    """How many waiters follow the semaphore key for a semaphore of ``slots``."""
    return max(1, min(slots, FRONT_WAITERS))


class WaitPhase(enum.Enum):
    """The phases' names, as logs and tests show them."""

    READING = "reading"
    TAKING = "taking"
    JOINING = "joining"
    PLACING = "placing"
    IN_LINE = "in-line"
    AT_FRONT = "at-front"
    FOLLOWING = "following"
    HELD = "held"


# -- phases --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reading:
    """Entered at the start, and after the key was deleted or a watch ended while not in line: the key is
    created if missing and read. Nothing is known yet."""

    name: ClassVar[WaitPhase] = WaitPhase.READING


@dataclass(frozen=True)
class Taking:
    """A compare-and-swap for the free slot that ``seen`` shows is on its way. ``create_revision`` is this
    node's place in line (0: not in line); ``ahead`` the waiters ahead not yet seen holding a slot."""

    seen: Snapshot
    create_revision: int = 0
    ahead: frozenset[str] = frozenset()
    jitter: float = 0.0
    waiting: int = 0
    name: ClassVar[WaitPhase] = WaitPhase.TAKING


@dataclass(frozen=True)
class Joining:
    """No slot for this node: a lease and the line key are being put (again, after the lease was lost),
    reading ``read_ahead`` waiters ahead in the same round trip."""

    seen: Snapshot
    read_ahead: int
    name: ClassVar[WaitPhase] = WaitPhase.JOINING


@dataclass(frozen=True)
class Placing:
    """In line, reading its place again (the key ahead went, a watch ended, or the join could not tell):
    ``limit`` waiters ahead are read."""

    seen: Snapshot
    create_revision: int
    limit: int
    name: ClassVar[WaitPhase] = WaitPhase.PLACING


@dataclass(frozen=True)
class InLine:
    """Behind the front: at least ``ahead_at_least`` waiters ahead; this node waits for the line key of
    ``watching`` (the waiter that many places ahead) to go, from store revision ``read_revision`` on."""

    seen: Snapshot
    create_revision: int
    ahead_at_least: int
    watching: str
    read_revision: int
    waiting: int
    name: ClassVar[WaitPhase] = WaitPhase.IN_LINE


@dataclass(frozen=True)
class AtFront:
    """At the front of the line, following the semaphore key from ``seen`` on. ``ahead`` are the waiters
    ahead not yet seen holding a slot; ``candidate`` a value with a free slot to take at ``deadline`` (None:
    no free slot seen), ``jitter`` the current random part of the hand-off delay."""

    seen: Snapshot
    create_revision: int
    ahead: frozenset[str]
    waiting: int
    jitter: float
    candidate: Snapshot | None = None
    deadline: float | None = None
    name: ClassVar[WaitPhase] = WaitPhase.AT_FRONT


@dataclass(frozen=True)
class Following:
    """Without the line: following the semaphore key from ``seen`` on; ``candidate`` and ``deadline`` as at
    the front, with a delay that is random only."""

    seen: Snapshot
    jitter: float
    candidate: Snapshot | None = None
    deadline: float | None = None
    name: ClassVar[WaitPhase] = WaitPhase.FOLLOWING


@dataclass(frozen=True)
class Held:
    """This node holds a slot (``seen`` shows it); ``create_revision`` is the line key's place, if it had one,
    whose lease the shell lets go."""

    seen: Snapshot
    create_revision: int = 0
    name: ClassVar[WaitPhase] = WaitPhase.HELD


Phase = Reading | Taking | Joining | Placing | InLine | AtFront | Following | Held


# -- actions (what the shell does next) ----------------------------------------------------------------------


@dataclass(frozen=True)
class ReadKey:
    """Create the key if missing and read it (``ops.create_and_read``) → KeyRead."""


@dataclass(frozen=True)
class TakeSlot:
    """``ops.try_take`` from ``start`` → TakeResult. ``leave_line`` deletes the line key with the take;
    while ``entitled_among`` is given, a lost race is tried again (up to ``tries``) as long as the answer
    leaves a slot for this node after those waiters."""

    start: Snapshot
    leave_line: bool
    tries: int
    entitled_among: frozenset[str] | None = None


@dataclass(frozen=True)
class JoinLine:
    """Take a lease (a new one if the last was lost) and put the line key under it (``line.join_line``)
    → LineJoined, or LineRefused."""

    read_ahead: int


@dataclass(frozen=True)
class ReadPlace:
    """``line.line_position`` → PlaceRead, or LineRefused."""

    create_revision: int
    limit: int


@dataclass(frozen=True)
class FollowKey:
    """Watch the semaphore key for the next change after ``after_revision`` → KeyChanged; Quiet once
    ``until`` (monotonic) passes with none; WatchEnded, LeaseLost."""

    after_revision: int
    until: float | None


@dataclass(frozen=True)
class AwaitLeaving:
    """Watch the line key of ``machine_id`` for its deletion after ``after_revision`` → Left; WatchEnded,
    LeaseLost."""

    machine_id: str
    after_revision: int


@dataclass(frozen=True)
class Done:
    """The slot is held: ``acquire`` returns."""

    now: Snapshot
    create_revision: int


Action = ReadKey | TakeSlot | JoinLine | ReadPlace | FollowKey | AwaitLeaving | Done


# -- events (what came of an action) -------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyRead:
    now: Snapshot


@dataclass(frozen=True)
class TakeResult:
    acquired: bool
    now: Snapshot


@dataclass(frozen=True)
class LineJoined:
    create_revision: int
    position: LinePosition | None


@dataclass(frozen=True)
class PlaceRead:
    position: LinePosition


@dataclass(frozen=True)
class LineRefused:
    reason: str


@dataclass(frozen=True)
class KeyChanged:
    """A newer value of the semaphore key; None when it was deleted or does not decode (read it afresh)."""

    revision: int
    now: Snapshot | None


@dataclass(frozen=True)
class Quiet:
    """``until`` passed without a change."""


@dataclass(frozen=True)
class WatchEnded:
    """The watch ended without an error (idle for long, history compacted): read afresh."""


@dataclass(frozen=True)
class Left:
    """The line key being watched was deleted."""


@dataclass(frozen=True)
class LeaseLost:
    """The line key's lease is gone (not renewed for a whole TTL): join again."""


Event = KeyRead | TakeResult | LineJoined | PlaceRead | LineRefused | KeyChanged | Quiet | WatchEnded | Left | LeaseLost


@dataclass(frozen=True)
class Tuning:
    """The waiter's constants. ``handoff_jitter`` is the first random hand-off delay (and a served-first
    waiter's share of it), doubled up to ``max_handoff_jitter`` after each race another node won; ``line``
    False starts without the waiting line (as after etcd refused it)."""

    handoff_jitter: float = 0.2
    max_handoff_jitter: float = 5.0
    line: bool = True


class ProtocolViolation(RuntimeError):
    """An event that cannot happen in the current phase: a bug in the shell."""


class Waiter:
    """One ``acquire``'s wait for ``machine_id``: ``start()`` gives the first action; ``handle(event, now)``
    the next one; ``phase`` is where it stands and ``progress()`` that as the backend seam reports it."""

    def __init__(self, machine_id: str, tuning: Tuning, random: Callable[[], float]) -> None:
        self.machine_id = machine_id
        self.tuning = tuning
        self.line_allowed = tuning.line
        self._random = random
        self.phase: Phase = Reading()

    def start(self) -> Action:
        self.phase = Reading()
        return ReadKey()

    # -- the transitions -------------------------------------------------------------------------------------

    def handle(self, event: Event, now: float) -> Action:
        phase = self.phase
        if isinstance(event, LineRefused) and isinstance(phase, Joining | Placing):
            self.line_allowed = False
            return self._follow(Following(phase.seen, self.tuning.handoff_jitter), phase.seen, now)
        if isinstance(event, LeaseLost) and isinstance(phase, Joining | Placing | InLine | AtFront):
            return self._join(phase.seen)
        if isinstance(event, LeaseLost) and isinstance(phase, Following):
            return FollowKey(phase.seen.revision, phase.deadline)  # no place in line to lose
        match phase, event:
            case Reading(), KeyRead(now=snapshot):
                return self._first_look(snapshot)
            case Taking(), TakeResult(acquired=True, now=snapshot):
                return self._held(snapshot, phase.create_revision)
            case Taking(create_revision=0), TakeResult(now=snapshot) if self.line_allowed:
                return self._join(snapshot)
            case Taking(create_revision=0), TakeResult(now=snapshot):
                jitter = self._after_race(phase.jitter, snapshot)
                return self._follow(Following(snapshot, jitter), snapshot, now)
            case Taking(), TakeResult(now=snapshot):
                jitter = self._after_race(phase.jitter, snapshot)
                front = AtFront(snapshot, phase.create_revision, phase.ahead, phase.waiting, jitter)
                return self._at_front(front, snapshot, now)
            case Joining(), LineJoined(create_revision=created, position=None):
                self.phase = Placing(phase.seen, created, phase.read_ahead)
                return ReadPlace(created, phase.read_ahead)
            case Joining(), LineJoined(create_revision=created, position=position) if position is not None:
                return self._placed(position, created, phase.read_ahead, now)
            case Placing(), PlaceRead(position=position):
                return self._placed(position, phase.create_revision, phase.limit, now)
            case InLine(), Left() | WatchEnded():
                self.phase = Placing(phase.seen, phase.create_revision, phase.ahead_at_least)
                return ReadPlace(phase.create_revision, phase.ahead_at_least)
            case AtFront(), KeyChanged(now=None):
                limit = front_size(phase.seen.semaphore.max)
                self.phase = Placing(phase.seen, phase.create_revision, limit)
                return ReadPlace(phase.create_revision, limit)
            case AtFront(), WatchEnded():
                limit = front_size(phase.seen.semaphore.max)
                self.phase = Placing(phase.seen, phase.create_revision, limit)
                return ReadPlace(phase.create_revision, limit)
            case AtFront(), KeyChanged(now=snapshot) if snapshot is not None:
                return self._at_front(phase, snapshot, now)
            case AtFront(candidate=candidate), Quiet() if candidate is not None:
                return self._take_at_front(phase, candidate)
            case Following(), KeyChanged(now=None) | WatchEnded():
                self.phase = Reading()
                return ReadKey()
            case Following(), KeyChanged(now=snapshot) if snapshot is not None:
                return self._follow(phase, snapshot, now)
            case Following(candidate=candidate), Quiet() if candidate is not None:
                self.phase = Taking(candidate, jitter=phase.jitter)
                return TakeSlot(candidate, leave_line=False, tries=1)
        raise ProtocolViolation(f"{type(event).__name__} cannot happen while {phase.name.value}")

    def _held(self, snapshot: Snapshot, create_revision: int) -> Action:
        self.phase = Held(snapshot, create_revision)
        return Done(snapshot, create_revision)

    def _first_look(self, snapshot: Snapshot) -> Action:
        if snapshot.semaphore.holds(self.machine_id):
            return self._held(snapshot, 0)
        if snapshot.semaphore.semaphore > 0:
            self.phase = Taking(snapshot, jitter=self.tuning.handoff_jitter)
            # Outside the line a lost race is not retried at once: the watch shows what happened. The take
            # still deletes this node's line key, in case an earlier wait cut off from etcd left it there (the
            # waiter behind would wait for it until its lease expired); deleting no key costs nothing.
            return TakeSlot(snapshot, leave_line=self.line_allowed, tries=1)
        if self.line_allowed:
            return self._join(snapshot)
        return self._follow(Following(snapshot, self.tuning.handoff_jitter), snapshot, 0.0)

    def _join(self, seen: Snapshot) -> Action:
        read_ahead = front_size(seen.semaphore.max)
        self.phase = Joining(seen, read_ahead)
        return JoinLine(read_ahead)

    def _after_race(self, jitter: float, snapshot: Snapshot) -> float:
        """A race lost while the value still shows a free slot: more waiters than thought, wait longer."""
        if snapshot.semaphore.semaphore > 0:
            return min(jitter * 2, self.tuning.max_handoff_jitter)
        return jitter

    def _placed(self, position: LinePosition, created: int, limit: int, now: float) -> Action:
        if not position.present:
            return self._join(position.now)  # the lease expired and took the key: queue again
        front = front_size(position.now.semaphore.max)
        if len(position.ahead) >= limit and front > limit:
            self.phase = Placing(position.now, created, front)  # ``max`` is larger than assumed: read more
            return ReadPlace(created, front)
        if len(position.ahead) < front:
            ahead = frozenset(position.ahead)
            phase = AtFront(position.now, created, ahead, position.waiting, self.tuning.handoff_jitter)
            return self._at_front(phase, position.now, now)
        watching = position.ahead[front - 1]
        self.phase = InLine(position.now, created, front, watching, position.read_revision, position.waiting)
        return AwaitLeaving(watching, position.read_revision)

    def _at_front(self, phase: AtFront, snapshot: Snapshot, now: float) -> Action:
        sem = snapshot.semaphore
        if sem.holds(self.machine_id):
            return self._held(snapshot, phase.create_revision)
        ahead = phase.ahead - set(sem.holders)
        if sem.semaphore <= 0:
            self.phase = replace(phase, seen=snapshot, ahead=ahead, candidate=None, deadline=None)
            return FollowKey(snapshot.revision, None)
        if len(ahead) < sem.semaphore:
            return self._take_at_front(replace(phase, ahead=ahead), snapshot)
        # The free slots belong to the waiters ahead: wait one hand-off delay for each served before this
        # node (in case one of them is gone), plus the random part. Fewer ahead now: no need to wait longer.
        served_first = len(ahead) - sem.semaphore + 1
        deadline = now + served_first * self.tuning.handoff_jitter + self._random() * phase.jitter
        if phase.deadline is not None and phase.candidate is not None:
            deadline = min(deadline, phase.deadline)
        self.phase = replace(phase, seen=snapshot, ahead=ahead, candidate=snapshot, deadline=deadline)
        return FollowKey(snapshot.revision, deadline)

    def _take_at_front(self, phase: AtFront, start: Snapshot) -> Action:
        self.phase = Taking(start, phase.create_revision, phase.ahead, phase.jitter, phase.waiting)
        return TakeSlot(start, leave_line=True, tries=ENTITLED_TRIES, entitled_among=phase.ahead)

    def _follow(self, phase: Following, snapshot: Snapshot, now: float) -> Action:
        if snapshot.semaphore.holds(self.machine_id):
            return self._held(snapshot, 0)
        if snapshot.semaphore.semaphore <= 0:
            self.phase = replace(phase, seen=snapshot, candidate=None, deadline=None)
            return FollowKey(snapshot.revision, None)
        deadline = phase.deadline if phase.candidate is not None else now + self._random() * phase.jitter
        self.phase = replace(phase, seen=snapshot, candidate=snapshot, deadline=deadline)
        return FollowKey(snapshot.revision, deadline)

    # -- what the daemon shows -------------------------------------------------------------------------------

    def progress(self) -> LockProgress:
        phase = self.phase
        seen = getattr(phase, "seen", None)
        holders = seen.semaphore.holders if isinstance(seen, Snapshot) else ()
        slots = seen.semaphore.max if isinstance(seen, Snapshot) else None
        match phase:
            case Held():
                return LockProgress(LockPhase.HELD, holders=holders, slots=slots)
            case AtFront(ahead=ahead, waiting=waiting):
                return LockProgress(LockPhase.WAITING, len(ahead) + 1, False, waiting or None, holders, slots)
            case InLine(ahead_at_least=ahead, waiting=waiting):
                return LockProgress(LockPhase.WAITING, ahead + 1, True, waiting or None, holders, slots)
            case Joining() | Placing() | Following():
                return LockProgress(LockPhase.WAITING, holders=holders, slots=slots)
        return LockProgress(LockPhase.ASKING, holders=holders, slots=slots)

