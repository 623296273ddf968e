"""Offer policy: pure decisions about an update check, free of I/O and clocks (the caller passes ``now``).

* :func:`report_for_check` — what the update check reports about the last install (the original's
  ``previousversion`` / rollback rule, made safe against a crash between arming and the reboot marker).
* :func:`vet_offer` — whether an offered update may be downloaded now: never a downgrade from an https server to a
  plain-http payload (34), never again a version that failed to boot here (36), and not before the backoff of a
  payload that keeps failing expires, unless someone asked for this check (40). Raises :class:`OfferRefused`.
* :func:`failure_event_code` — the code a 3/0 event carries (the original's flag bits).
* The attempts and backoff arithmetic itself is ``update_engine.payload_state``; this module only applies it.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

from update_engine import omaha
from update_engine import payload_state as attempts
from update_engine.errors import FLAG_RESUMED, FLAG_TEST_OMAHA_URL, ErrorCode, UpdateEngineError
from update_engine.http_rules import host_of


class OfferRefused(UpdateEngineError):
    """An offer this node will not download now; the code says why (34, 36 or 40)."""


class LastInstall(enum.Enum):
    """What became of the last installed update, as the next check finds it."""

    NONE = "none"  # nothing installed since the last report (previous-version is empty or missing)
    BOOTED = "booted"  # the node runs another version than it did when the update was installed
    ROLLED_BACK = "rolled back"  # the node runs the version it ran before: the update failed to boot
    UNFINISHED = "unfinished"  # installed in this very boot, but the reboot marker is gone (a crash): not booted


@dataclass(frozen=True)
class CheckReport:
    """What the update check says about the last install: ``previousversion`` and whether it is a rollback."""

    last_install: LastInstall
    previous_version: str  # sent as previousversion (``0.0.0.0`` on a fresh node)

    @property
    def rollback_detected(self) -> bool:
        return self.last_install is LastInstall.ROLLED_BACK


def report_for_check(
    previous_version: str | None, running_version: str, installed_boot_id: str | None, boot_id: str
) -> CheckReport:
    """The original's rule: previous-version equal to the running version means the update did not boot.

    Ours adds: when the update was installed during this very boot (same boot id), nothing failed to boot, the
    daemon merely stopped before it wrote the reboot marker.
    """
    if previous_version is None:
        return CheckReport(LastInstall.NONE, omaha.INITIAL_PREVIOUS_VERSION)
    if not previous_version:
        return CheckReport(LastInstall.NONE, "")
    if previous_version != running_version:
        return CheckReport(LastInstall.BOOTED, previous_version)
    if installed_boot_id == boot_id:
        return CheckReport(LastInstall.UNFINISHED, "")
    return CheckReport(LastInstall.ROLLED_BACK, previous_version)


def vet_offer(
    offer: omaha.UpdateOffer,
    *,
    server: str,
    url: str,
    running_version: str,
    failed_boot_version: str | None,
    state: attempts.PayloadState,
    now: float,
    interactive: bool,
) -> None:
    """Raise OfferRefused when ``offer`` (downloaded from ``url``) must not be installed now."""
    if server.startswith("https:") and not url.startswith("https:"):
        raise OfferRefused(
            ErrorCode.OMAHA_RESPONSE_INVALID,
            f"Omaha server {host_of(server)} is https but offered the payload over plain http ({host_of(url)}); "
            "refusing the downgrade",
        )
    if failed_boot_version and offer.version == failed_boot_version:
        raise OfferRefused(
            ErrorCode.OMAHA_UPDATE_DEFERRED_PER_POLICY,
            f"version {offer.version} was installed on this node before and failed to boot (rolled back to "
            f"{running_version}); not installing it again until a newer version is offered "
            "(update_engine_client -reset_status clears this)",
        )
    until = attempts.deferred_until(state, offer, now, interactive=interactive)
    if until is not None:
        raise OfferRefused(
            ErrorCode.OMAHA_UPDATE_DEFERRED_FOR_BACKOFF,
            f"the payload of {offer.version} failed {state.attempt_number} earlier attempt(s); scheduled checks "
            f"wait until {utc(until)} before downloading it again (an interactive check, update_engine_client "
            "-check_for_update, tries now; the server can send DisablePayloadBackoff=\"true\")",
        )


def failure_event_code(code: int, *, custom_server: bool, resumed: bool) -> int:
    """The error code of the 3/0 event: ``code`` with TestOmahaUrl for a non-production server, Resumed."""
    flags = 0
    if custom_server:
        flags |= FLAG_TEST_OMAHA_URL
    if resumed:
        flags |= FLAG_RESUMED
    return int(code) | flags


def utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))
