"""The rollout policy: may this instance have the group's version now?  A pure function of the group's policy,
the instance, the rollout's counters and the clock.

Rules, in order (Nebraska's and CoreUpdate's, then ours); the first that applies decides:

1. no package on the group's channel                    → refuse, NO_PACKAGE
2. the instance runs that version or a newer one         → refuse, UP_TO_DATE
3. the instance was already granted that version:
   still granted/downloading/downloaded                  → grant again (already counted; no limit applies)
   installed, waiting for its reboot                     → refuse, IN_FLIGHT
   rolled back from it (it failed to boot there)         → refuse, ROLLED_BACK (the node would not install it
                                                           again, and a grant would hold a slot until it timed out)
4. the group is paused                                   → refuse, PAUSED
5. outside the group's office hours (windows in a zone)  → refuse, OUTSIDE_OFFICE_HOURS
6. the rollout's failures passed the group's threshold   → refuse and pause the group, FAILURE_THRESHOLD
7. limit = update_count, or 1 in safe mode until one instance has attempted the version
8. grants in the last update_interval ≥ limit            → refuse, PERIOD_LIMIT (instance OnHold)
9. grants in flight younger than update_timeout ≥ limit  → refuse, IN_PROGRESS_LIMIT (instance OnHold)
10. safe mode and timed-out grants ≥ limit                → refuse and pause the group, TIMED_OUT_LIMIT
11. grant.

The caller counts (``RolloutCounters``) and applies the decision in one database transaction, under a lock
on the group, so concurrent check-ins can never exceed the limits.

The end of a rollout.  A rollout is a group and a version; its first grant starts it.  It ends once, in one of
two ways, each recorded in the activity log:

* **completed** (``rollout_completed``): the group's channel still offers the version, and every instance of
  the group that checked in during the last day (``SEEN_WINDOW``: the population of the dashboard's progress
  bar) runs it, at least one instance being seen.  An instance that was already on the version counts as done;
  one that stopped checking in drops out of the population a day after its last check-in;
* **superseded** (``rollout_superseded``): before that, the group's channel moved to another version (or to
  none), or the group was switched to a channel offering another version.

A superseded rollout whose version is offered to the group again is open again (``rollout_reopens``) and may
still complete; a completed one stays completed.  The caller evaluates completion in the transaction that
writes the check-ins and events, under a lock on the rollout's row, and ends a rollout only with a conditional
write (``still open``), so it is recorded once even when several servers share the database.

Whether a group's rollout is complete (``rollout_complete``: it ended completed, or it is open and complete
now) is decided here only, and the dashboard shows that, so it never disagrees with the activity log: a group
whose instances all came to the version without a grant has no rollout to complete, and a completed rollout
stays complete on the dashboard as in the log.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from coreupdate.model import IN_FLIGHT_STATUSES, GroupPolicy, InstanceStatus, RolloutOutcome
from update_engine.omaha import version_less

_REGRANTABLE = frozenset(
    {InstanceStatus.UPDATE_GRANTED, InstanceStatus.DOWNLOADING, InstanceStatus.DOWNLOADED}
)


class OfficeHours(Protocol):
    """Anything that says whether an instant is inside the group's windows (``coreos_common.window``)."""

    def contains(self, now: datetime) -> bool: ...


class Refusal(enum.StrEnum):
    """Why an instance gets no update; the API and logs show these strings."""

    NO_PACKAGE = "no-package"
    UP_TO_DATE = "up-to-date"
    INVALID_VERSION = "invalid-version"
    IN_FLIGHT = "update-in-flight"
    ROLLED_BACK = "rolled-back"
    PAUSED = "updates-paused"
    OUTSIDE_OFFICE_HOURS = "outside-office-hours"
    FAILURE_THRESHOLD = "failure-threshold"
    PERIOD_LIMIT = "period-limit"
    IN_PROGRESS_LIMIT = "in-progress-limit"
    TIMED_OUT_LIMIT = "timed-out-limit"


# Refusals that depend only on the group (not on the instance): the server may remember them for a moment.
GROUP_WIDE_REFUSALS = frozenset(
    {
        Refusal.NO_PACKAGE,
        Refusal.PAUSED,
        Refusal.OUTSIDE_OFFICE_HOURS,
        Refusal.FAILURE_THRESHOLD,
        Refusal.PERIOD_LIMIT,
        Refusal.IN_PROGRESS_LIMIT,
        Refusal.TIMED_OUT_LIMIT,
    }
)


@dataclass(frozen=True)
class RolloutCounters:
    """What the rules count, for the group and the version on offer.

    ``granted_in_period``: grants made after ``now - update_interval``; ``in_progress``: grants in flight made
    after ``now - update_timeout``; ``timed_out``: grants of this version still in flight and older than that;
    ``attempted``: instances granted this version so far; ``failed``: of those, how many reported a failure or
    a rollback.
    """

    granted_in_period: int = 0
    in_progress: int = 0
    timed_out: int = 0
    attempted: int = 0
    failed: int = 0


@dataclass(frozen=True)
class InstanceView:
    """The instance as the rules see it."""

    version: str
    status: InstanceStatus = InstanceStatus.UNDEFINED
    granted_version: str | None = None


@dataclass(frozen=True)
class Grant:
    """Offer ``version``; ``regrant``: the instance already had this grant (nothing to count or record)."""

    version: str
    regrant: bool = False
    first_of_rollout: bool = False


@dataclass(frozen=True)
class Refuse:
    """No update.  ``on_hold``: mark the instance OnHold; ``pause_reason``: pause the group, with this text."""

    reason: Refusal
    detail: str = ""
    on_hold: bool = False
    pause_reason: str | None = None


Decision = Grant | Refuse


def marks_on_hold(instance: InstanceView, target_version: str) -> bool:
    """Whether a refusal that holds instances back (``Refuse.on_hold``) makes this instance OnHold: not while an
    update is in flight, and not when it rolled back from that very version (rule 3 refuses it for that reason,
    which a group-wide refusal remembered by the server must not hide)."""
    if instance.status in IN_FLIGHT_STATUSES or instance.status == InstanceStatus.ON_HOLD:
        return False
    return not (instance.status == InstanceStatus.ROLLED_BACK and instance.granted_version == target_version)


def failure_pause_reason(policy: GroupPolicy, version: str, counters: RolloutCounters) -> str | None:
    """The text of the automatic pause when the rollout's failures passed the group's threshold, else None."""
    if counters.failed <= 0:
        return None
    if policy.failure_pause_count is not None and counters.failed >= policy.failure_pause_count:
        return (
            f"{counters.failed} instance(s) failed version {version}, "
            f"at or over the threshold of {policy.failure_pause_count}"
        )
    fraction = policy.failure_pause_fraction
    if fraction is not None and counters.attempted > 0 and counters.failed / counters.attempted >= fraction:
        return (
            f"{counters.failed} of {counters.attempted} instance(s) granted version {version} failed, "
            f"at or over the threshold of {fraction:.0%}"
        )
    return None


def effective_limit(policy: GroupPolicy, counters: RolloutCounters) -> int:
    """Rule 7: safe mode lets one instance try a version before the group's own count applies."""
    if policy.safe_mode and counters.attempted == 0:
        return 1
    return policy.update_count


def decide_grant(
    policy: GroupPolicy,
    *,
    target_version: str | None,
    instance: InstanceView,
    counters: RolloutCounters,
    now: datetime,
    office_hours: OfficeHours | None = None,
) -> Decision:
    """Apply the rules of the module docstring, in order."""
    if target_version is None:
        return Refuse(Refusal.NO_PACKAGE, "the group's channel has no package")
    try:
        older = version_less(instance.version, target_version)
    except ValueError as exc:
        return Refuse(Refusal.INVALID_VERSION, str(exc))
    if not older:
        return Refuse(Refusal.UP_TO_DATE)
    if instance.granted_version == target_version:
        if instance.status in _REGRANTABLE:
            return Grant(target_version, regrant=True)
        if instance.status == InstanceStatus.INSTALLED:
            return Refuse(Refusal.IN_FLIGHT, "installed, waiting for its reboot")
        if instance.status == InstanceStatus.ROLLED_BACK:
            return Refuse(Refusal.ROLLED_BACK, f"{target_version} failed to boot on it; a newer one will be offered")
    if policy.updates_paused:
        return Refuse(Refusal.PAUSED)
    if office_hours is not None and not office_hours.contains(now):
        return Refuse(Refusal.OUTSIDE_OFFICE_HOURS, f"office hours {policy.office_hours} ({policy.timezone})")
    pause = failure_pause_reason(policy, target_version, counters)
    if pause is not None:
        return Refuse(Refusal.FAILURE_THRESHOLD, pause, pause_reason=pause)
    limit = effective_limit(policy, counters)
    if counters.granted_in_period >= limit:
        return Refuse(
            Refusal.PERIOD_LIMIT,
            f"{counters.granted_in_period} grant(s) in the last {_seconds(policy.update_interval)}, limit {limit}",
            on_hold=True,
        )
    if counters.in_progress >= limit:
        return Refuse(
            Refusal.IN_PROGRESS_LIMIT, f"{counters.in_progress} update(s) in progress, limit {limit}", on_hold=True
        )
    if policy.safe_mode and counters.timed_out >= limit:
        reason = (
            f"safe mode: {counters.timed_out} update(s) of version {target_version} timed out "
            f"(no success or failure within {_seconds(policy.update_timeout)})"
        )
        return Refuse(Refusal.TIMED_OUT_LIMIT, reason, on_hold=True, pause_reason=reason)
    return Grant(target_version, first_of_rollout=counters.attempted == 0)


def _seconds(value: timedelta) -> str:
    return f"{int(value.total_seconds())} s"


# The instances a rollout waits for: those seen this recently (the dashboard's progress bar counts the same).
SEEN_WINDOW = timedelta(days=1)


@dataclass(frozen=True)
class RolloutView:
    """A rollout as its end rules see it: its version, how many instances were granted it, how it ended."""

    version: str
    granted: int
    outcome: RolloutOutcome | None = None


@dataclass(frozen=True)
class Population:
    """The group's instances seen within ``SEEN_WINDOW``, and of those how many do not run the rollout's version
    (a caller that only needs to know whether there is one may stop counting at one)."""

    seen: int
    behind: int


def rollout_completed(rollout: RolloutView, channel_version: str | None, population: Population) -> bool:
    """Whether the open rollout ``rollout`` is complete now (see the module docstring)."""
    return (
        rollout.outcome is None
        and rollout.granted > 0
        and channel_version == rollout.version
        and population.seen > 0
        and population.behind == 0
    )


def rollout_complete(rollout: RolloutView | None, offered_version: str | None, population: Population) -> bool:
    """Whether the group's rollout of ``offered_version`` (``rollout``: its row, None when nothing was granted)
    is complete, as the activity log has or is about to record it: ended completed, or open and complete now."""
    if rollout is None or offered_version is None or rollout.version != offered_version:
        return False
    return rollout.outcome == RolloutOutcome.COMPLETED or rollout_completed(rollout, offered_version, population)


def rollout_superseded(rollout: RolloutView, offered_version: str | None) -> bool:
    """Whether the group, now offered ``offered_version``, leaves the open rollout ``rollout`` unfinished."""
    return rollout.outcome is None and rollout.granted > 0 and offered_version != rollout.version


def rollout_reopens(rollout: RolloutView, offered_version: str | None) -> bool:
    """Whether a superseded rollout is open again because its version is offered to the group again."""
    return rollout.outcome == RolloutOutcome.SUPERSEDED and offered_version == rollout.version
