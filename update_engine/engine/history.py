"""Install history: what update-engine remembers between checks, restarts and boots, with typed values.

Rules of this file:

* **The only place that names pref keys.** The prefs directory (``update_engine.prefs``: one file per key under
  ``/var/lib/update_engine/prefs``) keeps the original's key names and formats, so a node's state survives a
  switch of implementation and ``flatcar-postinst`` still finds ``full-response``. Everyone else reads and writes
  through the typed methods here.
* **Values are typed at the boundary.** Numbers are ints, what is pending is a :class:`PendingKind`, the attempts
  at a payload are a :class:`~update_engine.attempts.PayloadState`; a value that does not parse reads as
  missing (with a warning), as on a new node.
* **Two lifetimes.** Prefs survive reboots. The reboot marker (``update_engine_autoupdate_completed`` in the run
  directory, a tmpfs) lives exactly as long as the boot that installed the update: it says an update (or a
  rollback) is armed for the next boot. Its first word names what is pending (``update USR-B``); the original's
  empty marker reads as an update.

Order matters where a crash can fall between two writes: :meth:`InstallHistory.record_install` writes the boot
id before ``previous-version``, so that a crash before the reboot marker is not taken for a failed boot at the
next check.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from coreos_common.files import replace_file
from update_engine import payload_state as attempts
from update_engine.engine.machine import PendingKind
from update_engine.prefs import Prefs, PrefsError

log = logging.getLogger(__name__)

# --- pref keys (reference update-engine §5, and ours) -----------------------------------------------------------
ALEPH_VERSION = "aleph-version"
PREVIOUS_VERSION = "previous-version"
FULL_RESPONSE = "full-response"
UPDATE_CHECK_RESPONSE_HASH = "update-check-response-hash"
# The original's resume point; not written by this implementation (a download starts over), kept for the layout.
UPDATE_STATE_NEXT_OPERATION = "update-state-next-operation"
UPDATE_STATE_NEXT_DATA_OFFSET = "update-state-next-data-offset"
UPDATE_STATE_SHA256_CONTEXT = "update-state-sha-256-context"
UPDATE_STATE_SIGNED_SHA256_CONTEXT = "update-state-signed-sha-256-context"
UPDATE_STATE_SIGNATURE_BLOB = "update-state-signature-blob"
MANIFEST_METADATA_SIZE = "manifest-metadata-size"
RESUMED_UPDATE_FAILURES = "resumed-update-failures"
DELTA_UPDATE_FAILURES = "delta-update-failures"
# Attempts at the offered payload (payload_state).
PAYLOAD_ATTEMPT_NUMBER = "payload-attempt-number"
CURRENT_URL_INDEX = "current-url-index"
CURRENT_URL_FAILURE_COUNT = "current-url-failure-count"
BACKOFF_EXPIRY_TIME = "backoff-expiry-time"
CURRENT_RESPONSE_SIGNATURE = "current-response-signature"
# Ours. The version and size of the last update written to the passive partition and when it was installed, and the
# time of the last answered update check (restored with the reboot marker after a restart: GetStatus shows the
# pending update, not 0.0.0). A version that was installed, failed to boot and was rolled back from: offering it
# again is refused until a newer one comes.
INSTALLED_VERSION = "installed-version"
INSTALLED_SIZE = "installed-size"
INSTALLED_TIME = "installed-time"
LAST_CHECK_TIME = "last-check-time"
FAILED_BOOT_VERSION = "failed-boot-version"
# The boot id of the boot that installed previous-version's successor: the same id at the next check means no reboot.
INSTALLED_BOOT_ID = "installed-boot-id"

_PAYLOAD_STATE_KEYS = (
    CURRENT_RESPONSE_SIGNATURE,
    PAYLOAD_ATTEMPT_NUMBER,
    CURRENT_URL_INDEX,
    CURRENT_URL_FAILURE_COUNT,
    BACKOFF_EXPIRY_TIME,
)


@dataclass(frozen=True)
class PendingReboot:
    """What the reboot marker says: an update or a rollback is armed, and on which partition."""

    kind: PendingKind
    target_label: str = ""


@dataclass(frozen=True)
class InstalledUpdate:
    """An update written and armed: what ``-status`` shows until the reboot, and what the next check reports."""

    version: str
    size: int
    install_time: int


class InstallHistory:
    """Typed access to the prefs and the reboot marker of one node."""

    def __init__(self, prefs: Prefs, reboot_marker: Path) -> None:
        self.prefs = prefs
        self.reboot_marker = reboot_marker

    # --- versions and the post-reboot report ---------------------------------------------------------------------

    def previous_version(self) -> str | None:
        """The version that ran when the last update was installed; "" once reported; None on a fresh node."""
        return self.prefs.get_str(PREVIOUS_VERSION)

    def clear_previous_version(self) -> None:
        self.prefs.set_str(PREVIOUS_VERSION, "")

    def aleph_version(self) -> str:
        return self.prefs.get_str(ALEPH_VERSION) or ""

    def remember_aleph_version(self, version: str) -> None:
        """The first version this node ran; written once."""
        if self.prefs.get_str(ALEPH_VERSION) is None:
            self.prefs.set_str(ALEPH_VERSION, version)

    def installed_boot_id(self) -> str | None:
        return self.prefs.get_str(INSTALLED_BOOT_ID)

    def installed_version(self) -> str:
        return self.prefs.get_str(INSTALLED_VERSION) or ""

    def installed_update(self) -> InstalledUpdate | None:
        """The last update installed, if any (its size and times are 0 when they were not recorded)."""
        version = self.prefs.get_str(INSTALLED_VERSION)
        if not version:
            return None
        return InstalledUpdate(version=version, size=self._int(INSTALLED_SIZE), install_time=self._int(INSTALLED_TIME))

    def last_check_time(self) -> int:
        """When the server last answered an update check (Unix s; 0 if never recorded)."""
        return self._int(LAST_CHECK_TIME)

    def record_check_time(self, time: int) -> None:
        self.prefs.set_int(LAST_CHECK_TIME, time)

    def record_response(self, body: bytes) -> None:
        """The raw body of the last update-check answer (``flatcar-postinst`` reads it)."""
        self.prefs.set_str(FULL_RESPONSE, body.decode("utf-8", "replace"))

    def record_response_hash(self, sha256_b64: str) -> None:
        self.prefs.set_str(UPDATE_CHECK_RESPONSE_HASH, sha256_b64)

    def record_install(self, update: InstalledUpdate, *, running_version: str, boot_id: str,
                       response_signature: str) -> None:
        """An update was written and armed: remember it, and forget the attempts at its payload."""
        # The boot id first: previous-version alone, left by a crash before the reboot marker, would read as a
        # rollback at the next check although the node never rebooted.
        self.prefs.set_str(INSTALLED_BOOT_ID, boot_id)
        self.prefs.set_str(PREVIOUS_VERSION, running_version)
        self.prefs.set_str(INSTALLED_VERSION, update.version)
        self.prefs.set_int(INSTALLED_SIZE, update.size)
        self.prefs.set_int(INSTALLED_TIME, update.install_time)
        # Installed: nothing to back off from, should the same offer come again (a crash before the reboot
        # marker, or ResetStatus).
        self.store_payload_state(attempts.PayloadState(response_signature=response_signature))

    # --- a version that failed to boot --------------------------------------------------------------------------

    def failed_boot_version(self) -> str | None:
        return self.prefs.get_str(FAILED_BOOT_VERSION) or None

    def remember_failed_boot(self, version: str) -> None:
        self.prefs.set_str(FAILED_BOOT_VERSION, version)

    def forget_failed_boot(self) -> str | None:
        """Allow the version that failed to boot again; returns it (None if there was none)."""
        failed = self.failed_boot_version()
        if failed is not None:
            self.prefs.delete(FAILED_BOOT_VERSION)
        return failed

    # --- attempts at the offered payload --------------------------------------------------------------------------

    def payload_state(self) -> attempts.PayloadState:
        try:
            return attempts.PayloadState(
                response_signature=self.prefs.get_str(CURRENT_RESPONSE_SIGNATURE) or "",
                attempt_number=self.prefs.get_int(PAYLOAD_ATTEMPT_NUMBER) or 0,
                url_index=self.prefs.get_int(CURRENT_URL_INDEX) or 0,
                url_failure_count=self.prefs.get_int(CURRENT_URL_FAILURE_COUNT) or 0,
                backoff_expiry=self.prefs.get_int(BACKOFF_EXPIRY_TIME) or 0,
            )
        except (PrefsError, ValueError) as exc:
            log.warning("Payload attempt prefs unreadable (%s); starting the count again", exc)
            return attempts.PayloadState()

    def store_payload_state(self, state: attempts.PayloadState) -> None:
        if state == self.payload_state():
            return
        self.prefs.set_str(CURRENT_RESPONSE_SIGNATURE, state.response_signature)
        self.prefs.set_int(PAYLOAD_ATTEMPT_NUMBER, state.attempt_number)
        self.prefs.set_int(CURRENT_URL_INDEX, state.url_index)
        self.prefs.set_int(CURRENT_URL_FAILURE_COUNT, state.url_failure_count)
        self.prefs.set_int(BACKOFF_EXPIRY_TIME, state.backoff_expiry)

    def forget_payload_state(self) -> None:
        for key in _PAYLOAD_STATE_KEYS:
            self.prefs.delete(key)

    # --- the reboot marker ------------------------------------------------------------------------------------------

    def pending_reboot(self) -> PendingReboot | None:
        """What the reboot marker says, or None when there is no marker (nothing armed in this boot)."""
        try:
            text = self.reboot_marker.read_text(errors="replace")
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("Cannot read the reboot marker %s (%s); taking it for an installed update",
                        self.reboot_marker, exc.strerror)
            return PendingReboot(PendingKind.UPDATE)
        words = text.split()
        if not words:
            return PendingReboot(PendingKind.UPDATE)  # the original's marker is empty
        try:
            kind = PendingKind(words[0])
        except ValueError:
            log.warning("Reboot marker %s names %r, neither update nor rollback; taking it for an update",
                        self.reboot_marker, words[0])
            kind = PendingKind.UPDATE
        return PendingReboot(kind, words[1] if len(words) > 1 else "")

    def write_pending_reboot(self, pending: PendingReboot) -> None:
        """Atomically (temp file, rename), mode 0600 as the original's."""
        self.reboot_marker.parent.mkdir(parents=True, exist_ok=True)
        replace_file(self.reboot_marker, f"{pending.kind.value} {pending.target_label}\n".encode(), 0o600)

    def clear_pending_reboot(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.reboot_marker.unlink()

    # --- helpers ----------------------------------------------------------------------------------------------------

    def _int(self, key: str) -> int:
        try:
            return self.prefs.get_int(key) or 0
        except PrefsError as exc:
            log.warning("%s; taken as 0", exc)
            return 0

