"""The waiter state machine with plain values: every path a waiting node takes, no etcd, no clock."""

from __future__ import annotations

import pytest

from locksmithd.backends import LockPhase
from locksmithd.backends.etcd.line import LinePosition
from locksmithd.backends.etcd.ops import Snapshot
from locksmithd.backends.etcd.waiter import (
    AtFront,
    AwaitLeaving,
    Done,
    Following,
    FollowKey,
    Held,
    InLine,
    Joining,
    JoinLine,
    KeyChanged,
    KeyRead,
    LeaseLost,
    Left,
    LineJoined,
    LineRefused,
    PlaceRead,
    Placing,
    ProtocolViolation,
    Quiet,
    ReadKey,
    ReadPlace,
    TakeResult,
    TakeSlot,
    Taking,
    Tuning,
    Waiter,
    WatchEnded,
)
from locksmithd.semaphore import Semaphore

ME = "me"


def sem(max_: int, *holders: str) -> Semaphore:
    return Semaphore(max_ - len(holders), max_, holders)


def snap(max_: int, *holders: str, revision: int = 10) -> Snapshot:
    return Snapshot(sem(max_, *holders), revision)


def take_at_front(start: Snapshot, *ahead: str) -> TakeSlot:
    return TakeSlot(start, leave_line=True, tries=50, entitled_among=frozenset(ahead))


def waiter(**tuning: float | bool) -> Waiter:
    """Random draws are always half the range, so delays are exact."""
    return Waiter(ME, Tuning(**tuning), lambda: 0.5)  # type: ignore[arg-type]


def position(now: Snapshot, *ahead: str, waiting: int | None = None, present: bool = True) -> LinePosition:
    return LinePosition(now, present, ahead, waiting if waiting is not None else len(ahead) + 1, now.revision + 1)


def test_a_free_slot_is_taken_after_one_read() -> None:
    w = waiter()
    assert w.start() == ReadKey()
    free = snap(1)
    # The take also deletes a line key an earlier, interrupted wait may have left.
    assert w.handle(KeyRead(free), 0.0) == TakeSlot(free, leave_line=True, tries=1)
    taken = snap(1, ME, revision=11)
    assert w.handle(TakeResult(True, taken), 0.0) == Done(taken, 0)
    assert isinstance(w.phase, Held) and w.progress().phase is LockPhase.HELD


def test_a_holder_asking_again_is_done_without_a_write() -> None:
    w = waiter()
    w.start()
    assert w.handle(KeyRead(snap(1, ME)), 0.0) == Done(snap(1, ME), 0)


def test_a_full_semaphore_sends_the_node_into_the_line_reading_the_front() -> None:
    w = waiter()
    w.start()
    full = snap(5, "a", "b", "c", "d", "e")
    assert w.handle(KeyRead(full), 0.0) == JoinLine(read_ahead=3)
    assert isinstance(w.phase, Joining) and w.progress().phase is LockPhase.WAITING


def test_a_lost_first_race_joins_the_line() -> None:
    w = waiter()
    w.start()
    w.handle(KeyRead(snap(1)), 0.0)
    assert w.handle(TakeResult(False, snap(1, "other", revision=11)), 0.0) == JoinLine(read_ahead=1)


def test_the_front_waiter_follows_the_semaphore_and_takes_its_slot_at_once() -> None:
    w = waiter()
    w.start()
    full = snap(1, "a")
    w.handle(KeyRead(full), 0.0)
    action = w.handle(LineJoined(7, position(full)), 0.0)
    assert action == FollowKey(full.revision, None)
    assert isinstance(w.phase, AtFront) and w.phase.ahead == frozenset()
    progress = w.progress()
    assert (progress.position, progress.position_is_lower_bound, progress.holders) == (1, False, ("a",))
    freed = snap(1, revision=20)
    assert w.handle(KeyChanged(20, freed), 1.0) == take_at_front(freed)


def test_a_waiter_behind_the_front_watches_the_key_front_places_ahead() -> None:
    w = waiter()
    w.start()
    full = snap(2, "a", "b")
    w.handle(KeyRead(full), 0.0)
    pos = position(full, "w3", "w2", "w1", waiting=4)
    action = w.handle(LineJoined(9, pos), 0.0)
    assert action == AwaitLeaving("w2", pos.read_revision)  # two follow the semaphore (max 2): w2 is second
    assert isinstance(w.phase, InLine)
    progress = w.progress()
    assert (progress.position, progress.position_is_lower_bound, progress.waiting) == (3, True, 4)
    assert w.handle(Left(), 0.0) == ReadPlace(9, 2)
    assert isinstance(w.phase, Placing)
    nearer = position(full, "w3", waiting=3)
    assert w.handle(PlaceRead(nearer), 0.0) == FollowKey(full.revision, None)
    assert isinstance(w.phase, AtFront) and w.phase.ahead == {"w3"}


def test_a_join_that_cannot_tell_the_place_reads_it() -> None:
    w = waiter()
    w.start()
    w.handle(KeyRead(snap(1, "a")), 0.0)
    assert w.handle(LineJoined(9, None), 0.0) == ReadPlace(9, 1)


def test_a_larger_max_than_assumed_reads_more_of_the_line() -> None:
    w = waiter()
    w.start()
    w.handle(KeyRead(snap(1, "a")), 0.0)  # read_ahead 1
    grown = snap(4, "a", "b", "c", "d")
    assert w.handle(LineJoined(9, position(grown, "x")), 0.0) == ReadPlace(9, 3)


def test_a_slot_left_for_the_waiters_ahead_is_waited_for_in_turn() -> None:
    """Two ahead, one slot freed: this node is served third, so it waits two hand-off delays plus the random
    part; when the waiters ahead are seen holding, it is entitled and takes at once."""
    w = waiter(handoff_jitter=0.2)
    w.start()
    full = snap(3, "a", "b", "c")
    w.handle(KeyRead(full), 0.0)
    w.handle(LineJoined(9, position(full, "w2", "w1")), 0.0)
    one_free = snap(3, "a", "b", revision=20)
    action = w.handle(KeyChanged(20, one_free), 100.0)
    assert action == FollowKey(20, pytest.approx(100.0 + 2 * 0.2 + 0.5 * 0.2))
    assert isinstance(w.phase, AtFront) and w.phase.candidate == one_free
    served = snap(3, "a", "w1", revision=21)  # w1 took it; w2 is still ahead, one slot is free
    action = w.handle(KeyChanged(21, served), 100.1)
    # One ahead now: one delay from now, earlier than the deadline set when two were ahead.
    assert isinstance(action, FollowKey) and action.until == pytest.approx(100.1 + 0.2 + 0.1)
    both = snap(3, "w1", "w2", revision=22)
    assert w.handle(KeyChanged(22, both), 100.2) == take_at_front(both)


def test_the_delay_running_out_takes_the_candidate() -> None:
    """A waiter ahead may be gone: once its turn has passed, the slot is taken anyway."""
    w = waiter()
    w.start()
    full = snap(2, "a", "b")
    w.handle(KeyRead(full), 0.0)
    w.handle(LineJoined(9, position(full, "w1")), 0.0)
    free = snap(2, "b", revision=20)
    w.handle(KeyChanged(20, free), 0.0)
    assert w.handle(Quiet(), 1.0) == take_at_front(free, "w1")
    assert isinstance(w.phase, Taking)


def test_a_lost_race_at_the_front_keeps_following_with_a_longer_delay() -> None:
    w = waiter(handoff_jitter=0.2, max_handoff_jitter=0.3)
    w.start()
    full = snap(1, "a")
    w.handle(KeyRead(full), 0.0)
    w.handle(LineJoined(9, position(full)), 0.0)
    w.handle(KeyChanged(20, snap(1, revision=20)), 0.0)
    lost = snap(2, "x", revision=21)  # a slot is still free (max grew), but not after "x"
    action = w.handle(TakeResult(False, lost), 0.0)
    assert isinstance(action, TakeSlot)  # entitled still: no one is ahead
    assert isinstance(w.phase, Taking) and w.phase.jitter == pytest.approx(0.3)  # doubled, capped


def test_a_deleted_or_unreadable_key_at_the_front_reads_the_place_again() -> None:
    w = waiter()
    w.start()
    full = snap(1, "a")
    w.handle(KeyRead(full), 0.0)
    w.handle(LineJoined(9, position(full)), 0.0)
    assert w.handle(KeyChanged(30, None), 0.0) == ReadPlace(9, 1)
    missing = Snapshot(Semaphore.default(), 0)  # taking it creates the key again
    assert w.handle(PlaceRead(position(missing)), 0.0) == take_at_front(missing)


def test_a_lost_lease_joins_the_line_again() -> None:
    w = waiter()
    w.start()
    full = snap(1, "a")
    w.handle(KeyRead(full), 0.0)
    w.handle(LineJoined(9, position(full, "w2", "w1")), 0.0)
    assert w.handle(LeaseLost(), 0.0) == JoinLine(1)
    gone = position(full, "w1", present=False)
    w.handle(LineJoined(12, None), 0.0)
    assert w.handle(PlaceRead(gone), 0.0) == JoinLine(1)


def test_without_the_line_every_waiter_follows_with_a_random_delay() -> None:
    w = waiter(line=False, handoff_jitter=0.4)
    w.start()
    full = snap(1, "a")
    assert w.handle(KeyRead(full), 0.0) == FollowKey(full.revision, None)
    assert isinstance(w.phase, Following) and w.progress().position is None
    free = snap(1, revision=20)
    assert w.handle(KeyChanged(20, free), 5.0) == FollowKey(20, pytest.approx(5.2))
    assert w.handle(Quiet(), 5.2) == TakeSlot(free, leave_line=False, tries=1)
    lost = snap(1, "b", revision=21)
    assert w.handle(TakeResult(False, lost), 5.3) == FollowKey(21, None)
    assert w.handle(WatchEnded(), 6.0) == ReadKey()


def test_without_the_line_a_take_deletes_no_line_key() -> None:
    """A node refused the line (no permission on its prefix) must not name the prefix in its take."""
    w = waiter(line=False)
    w.start()
    free = snap(1)
    assert w.handle(KeyRead(free), 0.0) == TakeSlot(free, leave_line=False, tries=1)


def test_a_refused_line_falls_back_to_following() -> None:
    w = waiter()
    w.start()
    full = snap(1, "a")
    w.handle(KeyRead(full), 0.0)
    assert w.handle(LineRefused("permission denied"), 0.0) == FollowKey(full.revision, None)
    assert isinstance(w.phase, Following) and not w.line_allowed


def test_events_that_cannot_happen_are_reported_as_bugs() -> None:
    w = waiter()
    w.start()
    with pytest.raises(ProtocolViolation, match="Left cannot happen while reading"):
        w.handle(Left(), 0.0)


def test_a_lease_lost_while_joining_joins_with_a_new_one() -> None:
    """The lease expired between its grant and the line put (a node starved of CPU for a whole TTL)."""
    w = waiter()
    w.start()
    full = snap(1, "a")
    assert w.handle(KeyRead(full), 0.0) == JoinLine(1)
    assert w.handle(LeaseLost(), 0.0) == JoinLine(1)
    assert isinstance(w.phase, Joining)


def test_a_lease_lost_after_leaving_the_line_changes_nothing() -> None:
    """A node that fell back to following the key has no place to lose: it keeps following."""
    w = waiter()
    w.start()
    full = snap(1, "a")
    w.handle(KeyRead(full), 0.0)
    w.handle(LineRefused("permission denied"), 0.0)
    assert w.handle(LeaseLost(), 1.0) == FollowKey(full.revision, None)
    assert isinstance(w.phase, Following)
