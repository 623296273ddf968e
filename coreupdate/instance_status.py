"""An instance's status from the Omaha events and check-ins it sends: a pure transition function.

Rules (Nebraska's, plus our rollback report), applied to one event at a time in the order the node sent them:

* 13/1 download started → Downloading; 14/1 download finished → Downloaded;
* 3/1 update complete (written, reboot pending), or Nebraska's 800/1 → Installed;
* 3/2 "up after boot" with a real ``previousversion`` (not ``""``/``0.0.0.0``) → Complete;
* 3/0 with error 44 (rollback: the new version failed to boot) → RolledBack;
* any other result 0 → Error, with its code (flag bits stripped);
* everything else (3/9 deferred, pings, unknown types) leaves the status alone.

A check-in from the granted version while the update is in flight also means Complete: a node that rebooted
into the new version is done whatever events it lost on the way.
"""

from __future__ import annotations

from dataclasses import dataclass

from coreupdate.model import IN_FLIGHT_STATUSES, InstanceStatus
from update_engine.errors import FLAG_DEV_MODE, FLAG_RESUMED, FLAG_TEST_IMAGE, FLAG_TEST_OMAHA_URL, ErrorCode
from update_engine.omaha import INITIAL_PREVIOUS_VERSION, EventResult, EventType, RequestEvent

_FLAGS = FLAG_DEV_MODE | FLAG_RESUMED | FLAG_TEST_IMAGE | FLAG_TEST_OMAHA_URL
# Nebraska's "installed" event type for some clients.
NEBRASKA_INSTALLED_EVENT_TYPE = 800


@dataclass(frozen=True)
class StatusChange:
    """The new status, and the error code (flags stripped) when the change is a failure."""

    status: InstanceStatus
    error_code: int | None = None


def base_error_code(code: int) -> int:
    """The code without the Resumed/TestImage/TestOmahaUrl/DevMode bits (negative codes read as unsigned)."""
    return (code & 0xFFFFFFFF) & ~_FLAGS


def is_routine(event: RequestEvent) -> bool:
    """The 3/2 event every update check carries with an empty previous version: nothing to record."""
    return (
        event.type == EventType.UPDATE_COMPLETE
        and event.result == EventResult.SUCCESS_REBOOT
        and (event.previous_version or "") in ("", INITIAL_PREVIOUS_VERSION)
    )


def status_after_event(event: RequestEvent) -> StatusChange | None:
    """The status ``event`` moves an instance to, or None when it does not move it."""
    if event.result == EventResult.SUCCESS:
        if event.type == EventType.UPDATE_DOWNLOAD_STARTED:
            return StatusChange(InstanceStatus.DOWNLOADING)
        if event.type == EventType.UPDATE_DOWNLOAD_FINISHED:
            return StatusChange(InstanceStatus.DOWNLOADED)
        if event.type in (EventType.UPDATE_COMPLETE, NEBRASKA_INSTALLED_EVENT_TYPE):
            return StatusChange(InstanceStatus.INSTALLED)
        return None
    if event.result == EventResult.SUCCESS_REBOOT:
        if event.type == EventType.UPDATE_COMPLETE and not is_routine(event):
            return StatusChange(InstanceStatus.COMPLETE)
        return None
    if event.result == EventResult.ERROR:
        code = base_error_code(event.error_code or 0)
        if code == ErrorCode.ROLLBACK_ERROR:
            return StatusChange(InstanceStatus.ROLLED_BACK, code)
        return StatusChange(InstanceStatus.ERROR, code)
    return None


def status_after_checkin(
    status: InstanceStatus, granted_version: str | None, reported_version: str
) -> InstanceStatus | None:
    """Complete when an instance with an update in flight checks in running the granted version, else None."""
    if status in IN_FLIGHT_STATUSES and granted_version is not None and reported_version == granted_version:
        return InstanceStatus.COMPLETE
    return None
