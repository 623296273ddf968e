"""coreupdate's grant rules and status transitions, as pure functions with a fake clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from coreupdate.instance_status import status_after_checkin, status_after_event
from coreupdate.model import GroupPolicy, InstanceStatus, RolloutOutcome
from coreupdate.office_hours import parse_office_hours
from coreupdate.policy import (
    Grant,
    InstanceView,
    Population,
    Refusal,
    Refuse,
    RolloutCounters,
    RolloutView,
    decide_grant,
    failure_pause_reason,
    marks_on_hold,
    rollout_completed,
    rollout_reopens,
    rollout_superseded,
)
from update_engine.omaha import RequestEvent

NOW = datetime(2026, 3, 4, 10, 0, tzinfo=UTC)  # a Wednesday
OLD = InstanceView(version="1.0.0")
DEFAULT_POLICY = GroupPolicy()
NO_COUNTS = RolloutCounters()


def decide(policy: GroupPolicy = DEFAULT_POLICY, *, target: str | None = "2.0.0", instance: InstanceView = OLD,
           counters: RolloutCounters = NO_COUNTS, now: datetime = NOW) -> Grant | Refuse:
    hours = parse_office_hours(policy.office_hours, policy.timezone)
    return decide_grant(policy, target_version=target, instance=instance, counters=counters, now=now,
                        office_hours=hours)


def reason(decision: Grant | Refuse) -> Refusal | None:
    return decision.reason if isinstance(decision, Refuse) else None


def test_grants_an_older_instance_and_marks_the_first_grant_of_a_rollout() -> None:
    assert decide() == Grant("2.0.0", first_of_rollout=True)
    assert decide(counters=RolloutCounters(attempted=3)) == Grant("2.0.0")


def test_no_package_up_to_date_and_newer_instances_get_nothing() -> None:
    assert reason(decide(target=None)) == Refusal.NO_PACKAGE
    assert reason(decide(instance=InstanceView("2.0.0"))) == Refusal.UP_TO_DATE
    assert reason(decide(instance=InstanceView("2.1.0"))) == Refusal.UP_TO_DATE
    assert reason(decide(instance=InstanceView("garbage!"))) == Refusal.INVALID_VERSION


def test_paused_group_refuses_but_a_granted_instance_gets_its_grant_again() -> None:
    paused = GroupPolicy(updates_paused=True)
    assert reason(decide(paused)) == Refusal.PAUSED
    granted = InstanceView("1.0.0", InstanceStatus.DOWNLOADING, "2.0.0")
    assert decide(paused, instance=granted) == Grant("2.0.0", regrant=True)
    installed = InstanceView("1.0.0", InstanceStatus.INSTALLED, "2.0.0")
    assert reason(decide(instance=installed)) == Refusal.IN_FLIGHT


def test_a_version_an_instance_rolled_back_from_is_not_granted_to_it_again() -> None:
    """The node refuses it anyway (errorcode 36); a grant would only hold a slot of the rollout until it timed
    out.  A newer version, and other instances, are granted as usual."""
    rolled_back = InstanceView("1.0.0", InstanceStatus.ROLLED_BACK, "2.0.0")
    refused = decide(GroupPolicy(update_count=1), instance=rolled_back)
    assert isinstance(refused, Refuse) and refused.reason == Refusal.ROLLED_BACK and not refused.on_hold
    assert "2.0.0 failed to boot" in refused.detail
    assert isinstance(decide(target="2.1.0", instance=rolled_back), Grant)
    failed = InstanceView("1.0.0", InstanceStatus.ERROR, "2.0.0")  # a failed download may be tried again
    assert isinstance(decide(instance=failed), Grant)


@pytest.mark.parametrize(
    ("instance", "held"),
    [
        (InstanceView("1.0.0"), True),
        (InstanceView("1.0.0", InstanceStatus.COMPLETE, "1.0.0"), True),
        (InstanceView("1.0.0", InstanceStatus.ERROR, "2.0.0"), True),
        (InstanceView("1.0.0", InstanceStatus.ROLLED_BACK, "1.5.0"), True),
        (InstanceView("1.0.0", InstanceStatus.ROLLED_BACK, "2.0.0"), False),
        (InstanceView("1.0.0", InstanceStatus.DOWNLOADING, "2.0.0"), False),
        (InstanceView("1.0.0", InstanceStatus.ON_HOLD), False),
    ],
)
def test_which_instances_a_limit_marks_on_hold(instance: InstanceView, held: bool) -> None:
    assert marks_on_hold(instance, "2.0.0") is held


def test_period_limit_then_in_progress_limit_put_the_instance_on_hold() -> None:
    policy = GroupPolicy(update_count=2, update_interval=timedelta(minutes=90))
    assert isinstance(decide(policy, counters=RolloutCounters(granted_in_period=1, in_progress=1)), Grant)
    held = decide(policy, counters=RolloutCounters(granted_in_period=2))
    assert isinstance(held, Refuse) and held.reason == Refusal.PERIOD_LIMIT and held.on_hold
    busy = decide(policy, counters=RolloutCounters(granted_in_period=0, in_progress=2))
    assert isinstance(busy, Refuse) and busy.reason == Refusal.IN_PROGRESS_LIMIT and busy.on_hold


def test_safe_mode_allows_one_until_an_attempt_and_pauses_on_timeouts() -> None:
    policy = GroupPolicy(update_count=5, safe_mode=True)
    assert reason(decide(policy, counters=RolloutCounters(granted_in_period=1))) == Refusal.PERIOD_LIMIT
    assert isinstance(decide(policy, counters=RolloutCounters(granted_in_period=1, attempted=1)), Grant)
    timed_out = decide(policy, counters=RolloutCounters(attempted=6, timed_out=5))
    assert isinstance(timed_out, Refuse) and timed_out.reason == Refusal.TIMED_OUT_LIMIT
    assert timed_out.pause_reason and "timed out" in timed_out.pause_reason
    assert isinstance(decide(GroupPolicy(update_count=5), counters=RolloutCounters(attempted=6, timed_out=5)), Grant)


def test_failure_threshold_by_count_and_by_fraction_pauses_the_group() -> None:
    by_count = GroupPolicy(failure_pause_count=2)
    assert failure_pause_reason(by_count, "2.0.0", RolloutCounters(attempted=10, failed=1)) is None
    refused = decide(by_count, counters=RolloutCounters(attempted=10, failed=2))
    assert isinstance(refused, Refuse) and refused.reason == Refusal.FAILURE_THRESHOLD
    assert refused.pause_reason == "2 instance(s) failed version 2.0.0, at or over the threshold of 2"
    by_fraction = GroupPolicy(failure_pause_fraction=0.25)
    assert failure_pause_reason(by_fraction, "2.0.0", RolloutCounters(attempted=10, failed=2)) is None
    assert "3 of 10" in (failure_pause_reason(by_fraction, "2.0.0", RolloutCounters(attempted=10, failed=3)) or "")


def test_office_hours_are_windows_in_the_group_time_zone() -> None:
    policy = GroupPolicy(office_hours="Mon-Fri 09:00 8h", timezone="America/New_York")
    # 10:00 UTC on a Wednesday is 05:00 in New York: closed; 14:00 UTC is 09:00 there: open.
    assert reason(decide(policy)) == Refusal.OUTSIDE_OFFICE_HOURS
    assert isinstance(decide(policy, now=NOW.replace(hour=14)), Grant)
    saturday = NOW + timedelta(days=3, hours=4)
    assert reason(decide(policy, now=saturday)) == Refusal.OUTSIDE_OFFICE_HOURS


@pytest.mark.parametrize(
    ("event", "status"),
    [
        (RequestEvent(13, 1), InstanceStatus.DOWNLOADING),
        (RequestEvent(14, 1), InstanceStatus.DOWNLOADED),
        (RequestEvent(3, 1), InstanceStatus.INSTALLED),
        (RequestEvent(800, 1), InstanceStatus.INSTALLED),
        (RequestEvent(3, 2, previous_version="1.0.0"), InstanceStatus.COMPLETE),
        (RequestEvent(3, 0, 44), InstanceStatus.ROLLED_BACK),
        (RequestEvent(3, 0, 44 | (1 << 28)), InstanceStatus.ROLLED_BACK),
        (RequestEvent(3, 0, 10 | (1 << 30)), InstanceStatus.ERROR),
    ],
)
def test_events_move_the_status(event: RequestEvent, status: InstanceStatus) -> None:
    change = status_after_event(event)
    assert change is not None and change.status == status
    if status == InstanceStatus.ERROR:
        assert change.error_code == 10


def test_routine_and_deferred_events_do_not_move_the_status() -> None:
    assert status_after_event(RequestEvent(3, 2, previous_version="")) is None
    assert status_after_event(RequestEvent(3, 2, previous_version="0.0.0.0")) is None
    assert status_after_event(RequestEvent(3, 9, 40)) is None


def test_a_check_in_from_the_granted_version_completes_the_update() -> None:
    assert status_after_checkin(InstanceStatus.INSTALLED, "2.0.0", "2.0.0") == InstanceStatus.COMPLETE
    assert status_after_checkin(InstanceStatus.INSTALLED, "2.0.0", "1.0.0") is None
    assert status_after_checkin(InstanceStatus.ERROR, "2.0.0", "2.0.0") is None


OPEN = RolloutView("2.0.0", granted=3)


@pytest.mark.parametrize(
    ("rollout", "channel", "population", "completed"),
    [
        (OPEN, "2.0.0", Population(seen=5, behind=0), True),
        (OPEN, "2.0.0", Population(seen=5, behind=1), False),  # one instance seen in the last day is behind
        (OPEN, "2.0.0", Population(seen=0, behind=0), False),  # nobody seen: nothing shows it is done
        (OPEN, "2.1.0", Population(seen=5, behind=0), False),  # the channel moved on meanwhile
        (OPEN, None, Population(seen=5, behind=0), False),
        (RolloutView("2.0.0", granted=0), "2.0.0", Population(5, 0), False),  # never started
        (RolloutView("2.0.0", 3, RolloutOutcome.COMPLETED), "2.0.0", Population(5, 0), False),  # recorded once
        (RolloutView("2.0.0", 3, RolloutOutcome.SUPERSEDED), "2.0.0", Population(5, 0), False),
    ],
)
def test_a_rollout_completes_when_everyone_seen_runs_its_version(
    rollout: RolloutView, channel: str | None, population: Population, completed: bool
) -> None:
    assert rollout_completed(rollout, channel, population) is completed


def test_only_an_open_started_rollout_is_superseded_and_only_a_superseded_one_reopens() -> None:
    assert rollout_superseded(OPEN, "2.1.0") and rollout_superseded(OPEN, None)
    assert not rollout_superseded(OPEN, "2.0.0")
    assert not rollout_superseded(RolloutView("2.0.0", granted=0), "2.1.0")
    assert not rollout_superseded(RolloutView("2.0.0", 3, RolloutOutcome.COMPLETED), "2.1.0")
    superseded = RolloutView("2.0.0", 3, RolloutOutcome.SUPERSEDED)
    assert rollout_reopens(superseded, "2.0.0") and not rollout_reopens(superseded, "2.1.0")
    assert not rollout_reopens(RolloutView("2.0.0", 3, RolloutOutcome.COMPLETED), "2.0.0")
