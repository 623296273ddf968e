"""What the dashboard says about a group, a rollout and an event, in words: pure functions of stored values.

Rules:

* a group's rollout is, in this order: **paused** (with the operator's or the rule's reason), **complete**
  (``policy.rollout_complete``, the rule the activity log's "rollout completed" follows: never decided here),
  **idle** (no package on its channel, or nothing granted yet), else **in progress**;
* progress is the instances seen in the last day that run the channel's version, over all instances seen in the
  last day (an instance that stopped checking in does not hold the bar back forever);
* the policy reads as one line, most important first: the rate, the office hours, safe mode, the automatic
  pause threshold, the update timeout;
* times are shown as UTC ISO text on the server (pages work without JavaScript); the browser rewrites them into
  the viewer's zone and keeps UTC in the element's title.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from coreos_common.goduration import format_short_duration
from coreupdate import policy
from coreupdate.model import GroupPolicy, InstanceStatus, RolloutOutcome
from coreupdate.storage.dashboard import GroupCounts
from update_engine.errors import describe
from update_engine.omaha import EventResult, EventType

UNLIMITED_COUNT = 999_999  # the stock groups' "as fast as they ask"


class RolloutPhase(enum.StrEnum):
    IDLE = "idle"
    IN_PROGRESS = "in progress"
    PAUSED = "paused"
    COMPLETE = "complete"


@dataclass(frozen=True)
class RolloutState:
    phase: RolloutPhase
    detail: str  # why paused, what it waits for, …


@dataclass(frozen=True)
class Progress:
    on_version: int
    seen: int

    @property
    def percent(self) -> int:
        return 0 if self.seen == 0 else int(100 * self.on_version / self.seen)

    @property
    def text(self) -> str:
        return f"{self.on_version} of {self.seen} ({self.percent} %)"


def progress(counts: GroupCounts | None, version: str | None) -> Progress:
    if counts is None or version is None:
        return Progress(0, 0 if counts is None else counts.seen_day)
    return Progress(counts.seen_day_on(version), counts.seen_day)


def rollout_view(row: dict[str, Any] | None, version: str | None) -> policy.RolloutView | None:
    """The policy's view of the rollout of ``version`` from its stored counters (``DashboardQueries.rollouts``)."""
    if row is None or version is None:
        return None
    outcome = row.get("outcome")
    return policy.RolloutView(version, int(row["granted"]), RolloutOutcome(outcome) if outcome else None)


def rollout_state(*, paused: bool, pause_reason: str, channel: str, version: str | None,
                  rollout: policy.RolloutView | None, progress: Progress) -> RolloutState:
    """The phase of a group's rollout, by the rules of the module docstring."""
    if paused:
        return RolloutState(RolloutPhase.PAUSED, pause_reason or "paused by an operator")
    if version is None:
        return RolloutState(RolloutPhase.IDLE, f"channel {channel} offers no package")
    behind = progress.seen - progress.on_version
    if policy.rollout_complete(rollout, version, policy.Population(progress.seen, behind)):
        if behind:
            return RolloutState(RolloutPhase.COMPLETE, f"completed; {behind} instance(s) seen in the last day do "
                                                       f"not run {version}")
        return RolloutState(RolloutPhase.COMPLETE, f"every instance seen in the last day runs {version}")
    granted = rollout.granted if rollout is not None else 0
    if granted == 0:
        if not progress.seen:
            return RolloutState(RolloutPhase.IDLE, "no instance checked in during the last day")
        if not behind:
            return RolloutState(RolloutPhase.IDLE, f"every instance seen in the last day runs {version}, none "
                                                   "needed a grant")
        return RolloutState(RolloutPhase.IDLE, f"no instance was granted {version} yet")
    return RolloutState(RolloutPhase.IN_PROGRESS, f"{granted} instance(s) granted {version}")


def policy_summary(policy: GroupPolicy) -> str:
    """``1 every 90 min, office hours Mon-Fri 09:00 8h Europe/Berlin, safe mode, …`` in a few words."""
    if policy.update_count >= UNLIMITED_COUNT:
        parts = ["no rate limit"]
    else:
        parts = [f"{policy.update_count} every {format_short_duration(policy.update_interval)}"]
    if policy.office_hours:
        parts.append(f"office hours {policy.office_hours} {policy.timezone}")
    if policy.safe_mode:
        parts.append("safe mode")
    if policy.failure_pause_count is not None:
        parts.append(f"pause after {policy.failure_pause_count} failure(s)")
    if policy.failure_pause_fraction is not None:
        parts.append(f"pause at {policy.failure_pause_fraction:.0%} failed")
    parts.append(f"timeout {format_short_duration(policy.update_timeout)}")
    return ", ".join(parts)


def utc_iso(epoch: float | None) -> str:
    if epoch is None:
        return ""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def utc_text(epoch: float | None) -> str:
    if epoch is None:
        return "never"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def error_name(code: int | None) -> str:
    """``10 DOWNLOAD_HASH_MISMATCH``; empty for no code."""
    return "" if code is None else f"{code} {describe(code)}"


def _enum_name(kind: type[enum.IntEnum], value: int) -> str:
    try:
        return kind(value).name.replace("_", " ").lower()
    except ValueError:
        return f"unknown ({value})"


def event_text(event_type: int, result: int) -> str:
    """``update download started: success`` for 13/1; the numbers stay visible next to it on the page."""
    return f"{_enum_name(EventType, event_type)}: {_enum_name(EventResult, result)}"


# Statuses in the order a rollout moves through them, for tables and charts.
STATUS_ORDER = (
    InstanceStatus.UNDEFINED, InstanceStatus.ON_HOLD, InstanceStatus.UPDATE_GRANTED, InstanceStatus.DOWNLOADING,
    InstanceStatus.DOWNLOADED, InstanceStatus.INSTALLED, InstanceStatus.COMPLETE, InstanceStatus.ERROR,
    InstanceStatus.ROLLED_BACK,
)
