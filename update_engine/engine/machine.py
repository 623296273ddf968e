"""The attempt state machine: update-engine's published status and everything published with it.

Two rules, as h11's ``_state.py`` has for HTTP:

1. **Everything that changes published state lives in this file.** The status (the D-Bus status strings), the
   progress, the new version and size, the last checked time, the result of the last attempt and what kind of
   reboot is pending change only as the effect of an event fired through :data:`TRANSITIONS`; nothing outside
   this file assigns them (they are read-only properties). An event the current status does not accept is
   refused and changes nothing.
2. **The machine is pure.** It knows nothing of D-Bus, files or clocks: the shell observes (a time, a size, a
   fraction downloaded) and passes the values in the event. Whoever publishes (the D-Bus adapter, systemd's
   status line, metrics) reads a :meth:`AttemptMachine.snapshot` or :meth:`AttemptMachine.last_attempt`.

Theory of operation. A check runs::

    IDLE --check--> CHECKING_FOR_UPDATE --checked(t)--> CHECKING_FOR_UPDATE      (an answer arrived at t)
                                        --no_update--> IDLE
                                        --update_found(v, n)--> UPDATE_AVAILABLE  (passive USR disarmed)
    UPDATE_AVAILABLE --download_started--> DOWNLOADING      (first payload byte; op hashes checked, data written)
    DOWNLOADING --progress(f)--> DOWNLOADING
    DOWNLOADING --download_finished--> VERIFYING            (size, SHA-256, signature, partition hash)
    VERIFYING --verified--> FINALIZING                      (flags armed: successful=0 tries=1, prioritised)
    FINALIZING --finalized--> UPDATED_NEED_REBOOT            (marker written; only pings from now on)

Any failure before UPDATED_NEED_REBOOT goes to REPORTING_ERROR_EVENT (the passive partition stays disarmed, the
running one is never touched), the 3/0 event is sent, and the machine returns to IDLE. ResetStatus leaves
UPDATED_NEED_REBOOT for IDLE and undoes what was armed; a restart finding the reboot marker goes straight from IDLE
to UPDATED_NEED_REBOOT with the version, size and check time recorded at the install. A manual rollback, allowed
only from IDLE, also ends in UPDATED_NEED_REBOOT so that locksmithd reboots the node as it would for an update.

Entering a status has fixed effects on the published fields: VERIFYING shows progress 1.0; FINALIZING,
UPDATED_NEED_REBOOT and IDLE show 0.0; IDLE forgets the new version and size (``0.0.0``, 0) and the pending
reboot.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar

from coreos_common.status import StatusSnapshot, UpdateStatus

NO_VERSION = "0.0.0"


class Trigger(enum.Enum):
    """What happened; the table decides the next status."""

    CHECK = "check"
    CHECKED = "checked"
    NO_UPDATE = "no_update"
    UPDATE_FOUND = "update_found"
    DOWNLOAD_STARTED = "download_started"
    PROGRESS = "progress"
    DOWNLOAD_FINISHED = "download_finished"
    VERIFIED = "verified"
    FINALIZED = "finalized"
    FAILED = "failed"
    ERROR_REPORTED = "error_reported"
    RESET = "reset"
    REBOOT_PENDING_FOUND = "reboot_pending_found"
    ROLLBACK_ARMED = "rollback_armed"


S = UpdateStatus
_IN_FLIGHT = (S.CHECKING_FOR_UPDATE, S.UPDATE_AVAILABLE, S.DOWNLOADING, S.VERIFYING, S.FINALIZING)

TRANSITIONS: dict[UpdateStatus, dict[Trigger, UpdateStatus]] = {
    S.IDLE: {
        Trigger.CHECK: S.CHECKING_FOR_UPDATE,
        Trigger.RESET: S.IDLE,
        Trigger.REBOOT_PENDING_FOUND: S.UPDATED_NEED_REBOOT,
        Trigger.ROLLBACK_ARMED: S.UPDATED_NEED_REBOOT,
    },
    S.CHECKING_FOR_UPDATE: {
        Trigger.CHECKED: S.CHECKING_FOR_UPDATE,
        Trigger.NO_UPDATE: S.IDLE,
        Trigger.UPDATE_FOUND: S.UPDATE_AVAILABLE,
    },
    S.UPDATE_AVAILABLE: {Trigger.DOWNLOAD_STARTED: S.DOWNLOADING},
    S.DOWNLOADING: {Trigger.PROGRESS: S.DOWNLOADING, Trigger.DOWNLOAD_FINISHED: S.VERIFYING},
    S.VERIFYING: {Trigger.VERIFIED: S.FINALIZING},
    S.FINALIZING: {Trigger.FINALIZED: S.UPDATED_NEED_REBOOT},
    S.UPDATED_NEED_REBOOT: {Trigger.RESET: S.IDLE},
    S.REPORTING_ERROR_EVENT: {Trigger.ERROR_REPORTED: S.IDLE},
}
for _state in _IN_FLIGHT:
    TRANSITIONS[_state][Trigger.FAILED] = S.REPORTING_ERROR_EVENT


class InvalidTransition(Exception):
    """A trigger that the current status does not accept (a programming error or a refused request)."""


class PendingKind(enum.Enum):
    """What the next boot was armed for; ResetStatus undoes the two differently."""

    UPDATE = "update"
    ROLLBACK = "rollback"


class AttemptKind(enum.Enum):
    """How an attempt ended, as ``update_engine_client -status --json`` and the metrics name it."""

    NO_UPDATE = "no_update"
    UPDATED = "updated"
    FAILED = "failed"
    DEFERRED = "deferred"


@dataclass(frozen=True)
class AttemptResult:
    """The end of one attempt: when (Unix s), how, and for failures the Omaha code and a one-line reason."""

    kind: AttemptKind
    time: int
    code: int = 0
    reason: str = ""


# --- events: a trigger and the values it brings -----------------------------------------------------------------


@dataclass(frozen=True)
class Checked:
    """The server answered the update check at ``time``."""

    trigger: ClassVar[Trigger] = Trigger.CHECKED
    time: int


@dataclass(frozen=True)
class UpdateFound:
    """The server offers ``version``, ``size`` bytes, and the offer passed every check."""

    trigger: ClassVar[Trigger] = Trigger.UPDATE_FOUND
    version: str
    size: int


@dataclass(frozen=True)
class Progress:
    """``fraction`` (0.0–1.0) of the payload has been downloaded."""

    trigger: ClassVar[Trigger] = Trigger.PROGRESS
    fraction: float


@dataclass(frozen=True)
class NoUpdate:
    """The attempt ended without an update (``result`` is None when no request was sent at all)."""

    trigger: ClassVar[Trigger] = Trigger.NO_UPDATE
    result: AttemptResult | None = None


@dataclass(frozen=True)
class Finalized:
    """The update is installed and armed; the node waits for its reboot."""

    trigger: ClassVar[Trigger] = Trigger.FINALIZED
    result: AttemptResult


@dataclass(frozen=True)
class Failed:
    """The attempt failed (or was deferred); the error event is about to be reported."""

    trigger: ClassVar[Trigger] = Trigger.FAILED
    result: AttemptResult


@dataclass(frozen=True)
class RebootPendingFound:
    """After a restart: a reboot marker says ``kind`` is pending; the recorded offer, if it was an update."""

    trigger: ClassVar[Trigger] = Trigger.REBOOT_PENDING_FOUND
    kind: PendingKind = PendingKind.UPDATE
    version: str = NO_VERSION
    size: int = 0
    last_checked_time: int = 0


Event = Trigger | Checked | UpdateFound | Progress | NoUpdate | Finalized | Failed | RebootPendingFound


def trigger_of(event: Event) -> Trigger:
    return event if isinstance(event, Trigger) else event.trigger


class AttemptMachine:
    """Pure state: the status and the fields published with it. No I/O, no clock; read-only from outside."""

    def __init__(
        self,
        status: UpdateStatus = UpdateStatus.IDLE,
        last_checked_time: int = 0,
        progress: float = 0.0,
        new_version: str = NO_VERSION,
        new_size: int = 0,
    ) -> None:
        self._status = status
        self._last_checked_time = last_checked_time
        self._progress = progress
        self._new_version = new_version
        self._new_size = new_size
        self._last_attempt: AttemptResult | None = None
        self._pending: PendingKind | None = PendingKind.UPDATE if status is S.UPDATED_NEED_REBOOT else None

    @property
    def status(self) -> UpdateStatus:
        return self._status

    @property
    def last_attempt(self) -> AttemptResult | None:
        """How the last attempt since start ended (None before the first)."""
        return self._last_attempt

    @property
    def pending(self) -> PendingKind | None:
        """What the next boot is armed for, while UPDATED_NEED_REBOOT."""
        return self._pending

    def can(self, trigger: Trigger) -> bool:
        return trigger in TRANSITIONS[self._status]

    def fire(self, event: Event) -> UpdateStatus:
        """Apply ``event`` through the table; InvalidTransition (and no change) if the status refuses it."""
        trigger = trigger_of(event)
        try:
            nxt = TRANSITIONS[self._status][trigger]
        except KeyError:
            raise InvalidTransition(f"{trigger.value} is not allowed in {self._status.value}") from None
        self._status = nxt
        self._take_values(event)
        if nxt in (S.FINALIZING, S.IDLE, S.UPDATED_NEED_REBOOT, S.VERIFYING):
            self._progress = 0.0 if nxt is not S.VERIFYING else 1.0
        if nxt is S.IDLE:
            self._new_version, self._new_size, self._pending = NO_VERSION, 0, None
        return nxt

    def _take_values(self, event: Event) -> None:
        if isinstance(event, Checked):
            self._last_checked_time = event.time
        elif isinstance(event, UpdateFound):
            self._new_version, self._new_size = event.version, event.size
        elif isinstance(event, Progress):
            self._progress = min(max(event.fraction, 0.0), 1.0)
        elif isinstance(event, NoUpdate | Finalized | Failed) and event.result is not None:
            self._last_attempt = event.result
        elif isinstance(event, RebootPendingFound):
            self._pending = event.kind
            self._new_version, self._new_size = event.version, event.size
            self._last_checked_time = event.last_checked_time
        trigger = trigger_of(event)
        if trigger is Trigger.FINALIZED or (trigger is Trigger.REBOOT_PENDING_FOUND and self._pending is None):
            self._pending = PendingKind.UPDATE
        elif trigger is Trigger.ROLLBACK_ARMED:
            self._pending = PendingKind.ROLLBACK

    def snapshot(self) -> StatusSnapshot:
        return StatusSnapshot(
            self._last_checked_time, self._progress, self._status.value, self._new_version, self._new_size
        )
