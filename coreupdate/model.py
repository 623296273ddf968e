"""The server's vocabulary as values: applications, packages, channels, groups, instances, activity.

Pure data, no I/O.  Times are aware UTC datetimes here; storage keeps them as UTC epoch seconds.  App ids are
kept in one canonical spelling (see ``validation.canonical_app_id``): lower case, without braces.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timedelta

# Spans of time in seconds, as storage keeps times (epoch seconds) and the command line takes retentions.
HOUR = 3600.0
DAY = 86400.0


class InstanceStatus(enum.IntEnum):
    """Where an instance is in its update; the numbers 1-8 are Nebraska's, 9 is ours.

    UNDEFINED      known, nothing granted or nothing in flight
    UPDATE_GRANTED the server offered it the group's version
    ERROR          it reported a failed attempt (3/0 with an error code)
    COMPLETE       it checked in running the granted version (or sent 3/2 with a real previous version)
    INSTALLED      it wrote the update and waits for its reboot (3/1)
    DOWNLOADED     the payload is downloaded and verified (14/1)
    DOWNLOADING    the download started (13/1)
    ON_HOLD        it asked for the update but a rollout limit held it back
    ROLLED_BACK    the new version failed to boot and the node went back (3/0 with error 44)
    """

    UNDEFINED = 1
    UPDATE_GRANTED = 2
    ERROR = 3
    COMPLETE = 4
    INSTALLED = 5
    DOWNLOADED = 6
    DOWNLOADING = 7
    ON_HOLD = 8
    ROLLED_BACK = 9

    @property
    def label(self) -> str:
        """The name shown by the API and CLI (``UpdateGranted``, ``RolledBack``…)."""
        return _STATUS_LABELS[self]

    @classmethod
    def from_label(cls, text: str) -> InstanceStatus:
        for status, label in _STATUS_LABELS.items():
            if label.lower() == text.lower() or status.name.lower() == text.lower():
                return status
        raise ValueError(f"unknown instance status {text!r}; known: {', '.join(_STATUS_LABELS.values())}")


_STATUS_LABELS = {
    InstanceStatus.UNDEFINED: "Undefined",
    InstanceStatus.UPDATE_GRANTED: "UpdateGranted",
    InstanceStatus.ERROR: "Error",
    InstanceStatus.COMPLETE: "Complete",
    InstanceStatus.INSTALLED: "Installed",
    InstanceStatus.DOWNLOADED: "Downloaded",
    InstanceStatus.DOWNLOADING: "Downloading",
    InstanceStatus.ON_HOLD: "OnHold",
    InstanceStatus.ROLLED_BACK: "RolledBack",
}

# Granted and not finished: these count against a group's in-progress bound until the update timeout.
IN_FLIGHT_STATUSES = frozenset(
    {
        InstanceStatus.UPDATE_GRANTED,
        InstanceStatus.DOWNLOADING,
        InstanceStatus.DOWNLOADED,
        InstanceStatus.INSTALLED,
    }
)
# The ends of a failed attempt: these count as failures of the rollout they belong to.
FAILED_STATUSES = frozenset({InstanceStatus.ERROR, InstanceStatus.ROLLED_BACK})


class ActivityKind(enum.StrEnum):
    """Entries of the activity log: the rollout decisions an operator wants to read back."""

    ROLLOUT_STARTED = "rollout-started"
    ROLLOUT_PAUSED = "rollout-paused"  # automatically, by a rule; the message names it
    ROLLOUT_COMPLETED = "rollout-completed"  # every instance seen in the last day runs the version
    ROLLOUT_SUPERSEDED = "rollout-superseded"  # the group's channel moved on before it completed
    GROUP_PAUSED = "group-paused"  # by an operator
    GROUP_UNPAUSED = "group-unpaused"
    CHANNEL_UPDATED = "channel-updated"
    PACKAGE_CREATED = "package-created"
    INSTANCE_FAILED = "instance-failed"
    INSTANCE_ROLLED_BACK = "instance-rolled-back"


class RolloutOutcome(enum.StrEnum):
    """How a rollout (a group and a version) ended; ``policy`` states when each applies.  Stored as text."""

    COMPLETED = "completed"
    SUPERSEDED = "superseded"


@dataclass(frozen=True)
class Application:
    id: str
    label: str
    description: str = ""


@dataclass(frozen=True)
class Package:
    """A payload offered under a version; ``url`` is None when the server stores and serves the file itself."""

    app_id: str
    version: str
    size: int
    sha256_b64: str
    sha1_b64: str
    file_name: str
    url: str | None = None
    id: int = 0
    created_at: datetime | None = None


@dataclass(frozen=True)
class Channel:
    app_id: str
    name: str
    version: str | None  # the package it points at; None: no package yet


@dataclass(frozen=True)
class GroupPolicy:
    """How a group receives its channel's version; the rules are applied by ``policy.decide_grant``.

    ``update_count`` grants per ``update_interval`` (and at most ``update_count`` in flight at once); a grant
    not finished within ``update_timeout`` counts as timed out.  ``office_hours`` is a window list in
    ``timezone`` (``"Mon-Fri 09:00 8h; Sat 10:00 2h"``), empty for always.  The rollout pauses itself when
    ``failure_pause_count`` instances failed the current version, or when the failed fraction of its grants
    reaches ``failure_pause_fraction``.
    """

    updates_paused: bool = False
    update_count: int = 999_999
    update_interval: timedelta = timedelta(seconds=60)
    update_timeout: timedelta = timedelta(hours=1)
    safe_mode: bool = False
    office_hours: str = ""
    timezone: str = "UTC"
    failure_pause_count: int | None = None
    failure_pause_fraction: float | None = None


@dataclass(frozen=True)
class Group:
    id: str
    app_id: str
    name: str
    channel: str
    policy: GroupPolicy = field(default_factory=GroupPolicy)
    pause_reason: str = ""  # why the group is paused: an operator's note or the rule that paused it
    description: str = ""
