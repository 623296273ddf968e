"""The update attempter: one state machine whose states are the D-Bus status strings.

Theory of operation
-------------------
Every status change of update-engine happens through ``AttemptMachine.fire`` and the ``TRANSITIONS`` table below;
nothing else assigns a status. A check runs:

    IDLE --check--> CHECKING_FOR_UPDATE --no_update--> IDLE
                                        --update_found--> UPDATE_AVAILABLE   (passive USR disarmed: priority 0)
    UPDATE_AVAILABLE --download_started--> DOWNLOADING      (first payload byte; op hashes checked, data written)
    DOWNLOADING --download_finished--> VERIFYING            (size, SHA-256, signature, partition hash)
    VERIFYING --verified--> FINALIZING                      (flags armed: successful=0 tries=1, prioritised)
    FINALIZING --finalized--> UPDATED_NEED_REBOOT            (marker written; only pings from now on)

Any failure before UPDATED_NEED_REBOOT goes to REPORTING_ERROR_EVENT (the passive partition stays disarmed, the
running one is never touched), the 3/0 event is sent, and the machine returns to IDLE. ResetStatus leaves
UPDATED_NEED_REBOOT for IDLE and undoes what was armed; a restart finding the reboot marker goes straight from IDLE to
UPDATED_NEED_REBOOT. A manual rollback, allowed only from IDLE, also ends in UPDATED_NEED_REBOOT so that the reboot
coordinator (locksmithd) reboots the node the same way it would for an update.

A version that was installed and then rolled back by the bootloader (the next check finds ``previous-version``
equal to the running version) is remembered and not installed again until the server offers another version: a
node does not loop through download, reboot, failed boot and rollback.

A payload that keeps failing is not downloaded again at every scheduled check: ``payload_state`` keeps the
attempts at the offered response (URL, failures per URL, backoff expiry) in the prefs, and a scheduled check
offered that same response before the expiry ends deferred (code 40, event 3/9) without downloading.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import platform
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import aiohttp

from coreos_common.identity import IdentityError, read_boot_id, read_machine_id
from coreos_common.status import StatusSnapshot, UpdateStatus
from coreos_common.updateconf import SettingsFileError, load_update_conf
from update_engine import config as ue_config
from update_engine import omaha
from update_engine import payload_state as attempts
from update_engine.errors import (
    DEFERRED_CODES,
    FLAG_RESUMED,
    FLAG_TEST_OMAHA_URL,
    ErrorCode,
    ResetNotAllowed,
    RollbackRefused,
    UpdateEngineError,
    describe,
)
from update_engine.gpt import GptDisk, PartitionFlags
from update_engine.http import HttpError, HttpLimits, download, host_of, make_session, post_omaha
from update_engine.partitions import UsrSlot, ensure_not_running, find_boot_disk, resolve_slots
from update_engine.prefs import (
    BACKOFF_EXPIRY_TIME,
    CURRENT_RESPONSE_SIGNATURE,
    CURRENT_URL_FAILURE_COUNT,
    CURRENT_URL_INDEX,
    PAYLOAD_ATTEMPT_NUMBER,
    Prefs,
    PrefsError,
)

log = logging.getLogger(__name__)

PRODUCTION_SERVER = "https://public.update.flatcar-linux.net/v1/update/"
DEFAULT_PUBLIC_KEY = Path("usr/share/update_engine/update-payload-key.pub.pem")
REBOOT_MARKER_NAME = "update_engine_autoupdate_completed"


class Trigger(enum.Enum):
    """What happened; the table decides the next status."""

    CHECK = "check"
    NO_UPDATE = "no_update"
    UPDATE_FOUND = "update_found"
    DOWNLOAD_STARTED = "download_started"
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
    S.CHECKING_FOR_UPDATE: {Trigger.NO_UPDATE: S.IDLE, Trigger.UPDATE_FOUND: S.UPDATE_AVAILABLE},
    S.UPDATE_AVAILABLE: {Trigger.DOWNLOAD_STARTED: S.DOWNLOADING},
    S.DOWNLOADING: {Trigger.DOWNLOAD_FINISHED: S.VERIFYING},
    S.VERIFYING: {Trigger.VERIFIED: S.FINALIZING},
    S.FINALIZING: {Trigger.FINALIZED: S.UPDATED_NEED_REBOOT},
    S.UPDATED_NEED_REBOOT: {Trigger.RESET: S.IDLE},
    S.REPORTING_ERROR_EVENT: {Trigger.ERROR_REPORTED: S.IDLE},
}
for _state in _IN_FLIGHT:
    TRANSITIONS[_state][Trigger.FAILED] = S.REPORTING_ERROR_EVENT


class InvalidTransition(Exception):
    """A trigger that the current status does not accept (a programming error or a refused request)."""


@dataclass
class AttemptMachine:
    """Pure state: the status and the fields published with it. No I/O, no clock."""

    status: UpdateStatus = UpdateStatus.IDLE
    last_checked_time: int = 0
    progress: float = 0.0
    new_version: str = "0.0.0"
    new_size: int = 0

    def can(self, trigger: Trigger) -> bool:
        return trigger in TRANSITIONS[self.status]

    def fire(self, trigger: Trigger) -> UpdateStatus:
        try:
            nxt = TRANSITIONS[self.status][trigger]
        except KeyError:
            raise InvalidTransition(f"{trigger.value} is not allowed in {self.status.value}") from None
        self.status = nxt
        if nxt in (S.FINALIZING, S.IDLE, S.UPDATED_NEED_REBOOT, S.VERIFYING):
            self.progress = 0.0 if nxt is not S.VERIFYING else 1.0
        if nxt is S.IDLE:
            self.new_version, self.new_size = "0.0.0", 0
        return nxt

    def snapshot(self) -> StatusSnapshot:
        return StatusSnapshot(
            self.last_checked_time, self.progress, self.status.value, self.new_version, self.new_size
        )


@dataclass(frozen=True)
class EngineOptions:
    """Where everything is; every system path sits under ``config_root`` so tests run against a temp root."""

    config_root: Path = Path("/")
    state_dir: Path = Path("/var/lib/update_engine")
    run_dir: Path = Path("/run")
    disk: Path | None = None
    booted: str | None = None
    server: str | None = None
    public_key: Path | None = None
    kernel_dir: Path | None = None
    postinstall_hook: Path | None = None
    arch: str = field(default_factory=platform.machine)
    http: HttpLimits = field(default_factory=HttpLimits)

    @property
    def reboot_marker(self) -> Path:
        return self.run_dir / REBOOT_MARKER_NAME

    @property
    def public_key_path(self) -> Path:
        return self.public_key if self.public_key is not None else self.config_root / DEFAULT_PUBLIC_KEY

    def resolved_kernel_dir(self) -> Path:
        if self.kernel_dir is not None:
            return self.kernel_dir
        for name in ("boot/flatcar", "boot/coreos"):
            candidate = self.config_root / name
            if candidate.is_dir():
                return candidate
        return self.config_root / "boot/flatcar"


@dataclass(frozen=True)
class CheckOutcome:
    """How one check ended, for ``--once`` and the scheduler."""

    status: UpdateStatus
    error_code: int | None = None
    error_message: str | None = None
    poll_interval: int | None = None
    http_status: int | None = None
    network_error: bool = False


StatusListener = Callable[[StatusSnapshot], None]


class UpdateAttempter:
    """Runs checks and updates, driving ``AttemptMachine``; the D-Bus service's ``UpdateManager``."""

    def __init__(self, options: EngineOptions, *, clock: Callable[[], float] = time.time) -> None:
        self.options = options
        self.machine = AttemptMachine()
        self.prefs = Prefs(options.state_dir / "prefs")
        self._clock = clock
        self._listeners: list[StatusListener] = []
        self._lock = threading.Lock()
        self._settings: ue_config.UpdateSettings | None = None
        self.interactive_requested = False
        self._pending_target: int | None = None  # GPT index armed for the next boot (update or rollback)
        self._pending_kind: str = ""
        self.check_requested = asyncio.Event()

    # --- UpdateManager (D-Bus face) -------------------------------------------------------------------------

    def snapshot(self) -> StatusSnapshot:
        with self._lock:
            return self.machine.snapshot()

    def add_status_listener(self, listener: StatusListener) -> None:
        self._listeners.append(listener)

    def attempt_update(self) -> None:
        """Start an interactive check now when IDLE; otherwise do nothing (as the original)."""
        if self.machine.status is not UpdateStatus.IDLE or self.check_requested.is_set():
            log.info("AttemptUpdate ignored: status is %s", self.machine.status.value)
            return
        log.info("AttemptUpdate: starting an update check now")
        self.interactive_requested = True
        # As the original, the caller sees CHECKING_FOR_UPDATE as soon as the call returns.
        self._fire(Trigger.CHECK)
        self.check_requested.set()

    def take_interactive_request(self) -> bool:
        """True once after AttemptUpdate asked for the check that is about to run."""
        requested, self.interactive_requested = self.interactive_requested, False
        return requested

    def reset_status(self) -> None:
        """UPDATED_NEED_REBOOT → IDLE, undoing what was armed for the next boot; IDLE is a no-op."""
        status = self.machine.status
        if status is UpdateStatus.IDLE:
            failed = self.prefs.get_str(PREF_FAILED_BOOT_VERSION)
            if failed:
                self.prefs.delete(PREF_FAILED_BOOT_VERSION)
                log.info("ResetStatus: version %s, which failed to boot earlier, may be installed again", failed)
            if self._load_payload_state().attempt_number:
                log.info("ResetStatus: earlier attempts at the offered payload forgotten; no backoff")
            for key in _PAYLOAD_STATE_PREFS:
                self.prefs.delete(key)
            return
        if status is not UpdateStatus.UPDATED_NEED_REBOOT:
            raise ResetNotAllowed(f"ResetStatus is only allowed in IDLE or UPDATED_NEED_REBOOT, not {status.value}")
        try:
            with self._open_disk() as disk:
                running, target = self._slots(disk)
                if self._pending_kind == "rollback":
                    disk.mark_good(running.index)
                    log.info("ResetStatus: rollback cancelled, %s stays the next boot", running.label)
                else:
                    disk.disarm(target.index)
                    log.info("ResetStatus: update abandoned, %s disarmed (priority 0), %s stays the next boot",
                             target.label, running.label)
        except UpdateEngineError as exc:
            log.error("ResetStatus: cannot undo what was armed: %s", exc)
            raise ResetNotAllowed(f"cannot undo what was armed for the next boot: {exc}") from exc
        with contextlib.suppress(FileNotFoundError):
            self.options.reboot_marker.unlink()
        self.prefs.set_str(PREF_PREVIOUS_VERSION, "")
        self._pending_target, self._pending_kind = None, ""
        self._fire(Trigger.RESET)

    def rollback(self) -> str:
        """Arm the other USR partition for the next boot if it holds a known-good system."""
        if self.machine.status is not UpdateStatus.IDLE:
            raise RollbackRefused(f"rollback is only possible while idle, status is {self.machine.status.value}")
        try:
            with self._open_disk() as disk:
                running, other = self._slots(disk)
                flags = disk.flags(other.index)
                if not flags.successful:
                    raise RollbackRefused(
                        f"{other.label} has never booted successfully (successful=0, priority={flags.priority}, "
                        f"tries={flags.tries}); it may hold a partial or failed update, refusing to roll back to it"
                    )
                disk.mark_good(other.index)
        except UpdateEngineError as exc:
            raise RollbackRefused(str(exc)) from exc
        self._pending_target, self._pending_kind = other.index, "rollback"
        self._write_marker(f"rollback {other.label}\n")
        self._fire(Trigger.ROLLBACK_ARMED)
        message = f"{other.label} will boot next (rollback from {running.label}); reboot to apply"
        log.info("Rollback armed: %s", message)
        return message

    def mark_running_good(self) -> tuple[str, PartitionFlags]:
        """Healthy boot: the running USR partition becomes successful=1, tries=0, highest priority."""
        with self._open_disk() as disk:
            running, _ = self._slots(disk)
            disk.mark_good(running.index)
            return running.label, disk.flags(running.index)

    # --- start-up ----------------------------------------------------------------------------------------------

    def restore_reboot_pending(self) -> bool:
        """After a daemon restart: the /run marker means an update is installed and waits for the reboot."""
        marker = self.options.reboot_marker
        if not marker.exists():
            return False
        try:
            kind = marker.read_text().split()[0]
        except (OSError, IndexError):
            kind = "update"
        self._pending_kind = kind
        self._fire(Trigger.REBOOT_PENDING_FOUND)
        log.info("Reboot marker %s found: %s %s is pending, status restored to %s", marker,
                 "an" if kind[:1] in "aeiou" else "a", kind,
                 UpdateStatus.UPDATED_NEED_REBOOT.value)
        return True

    # --- the pipeline ------------------------------------------------------------------------------------------

    def load_settings(self) -> ue_config.UpdateSettings:
        """Re-read update.conf (at every check, so GROUP/SERVER changes apply without a restart).

        Fails closed: when a settings file exists but cannot be read whole, the settings last read are kept
        (with an error in the log naming the file), never the defaults, which could undo a SERVER=disabled.
        Before any settings were read (start-up) that raises SettingsFileError: the caller refuses to start.
        """
        try:
            merged = load_update_conf(self.options.config_root)
        except SettingsFileError as exc:
            if self._settings is None:
                raise
            log.error("Cannot read the update settings: %s. Keeping the settings read before (SERVER=%s, GROUP=%s) "
                      "until the file is fixed or removed", exc, self._settings.server, self._settings.group)
            return self._settings
        settings = ue_config.settings_from_config(merged)
        if self.options.server:
            settings = replace(settings, server=self.options.server)
        if self._settings is not None:
            for change in ue_config.diff_settings(self._settings, settings):
                log.info("Configuration changed: %s", change)
        self._settings = settings
        return settings

    async def ping(self) -> None:
        """The only request sent while a reboot is pending: a ping, never another download."""
        settings = self.load_settings()
        if settings.updates_disabled:
            return
        params = self._request_params(settings, interactive=False)
        async with make_session(self.options.http) as session:
            try:
                await post_omaha(session, settings.server, omaha.build_ping(params), self.options.http)
                log.info("Reboot pending: pinged %s", host_of(settings.server))
            except HttpError as exc:
                log.warning("Ping to %s failed: %s", host_of(settings.server), exc)

    async def check_and_update(self, *, interactive: bool = False) -> CheckOutcome:
        """One check; if an update is offered, download, verify, write and arm it. Never raises."""
        self.check_requested.clear()
        if self.machine.status is not UpdateStatus.CHECKING_FOR_UPDATE:  # AttemptUpdate already moved there
            self._fire(Trigger.CHECK)
        touched_target: int | None = None
        offer: omaha.UpdateOffer | None = None
        resumed = False
        http_status: int | None = None
        settings: ue_config.UpdateSettings | None = None
        try:
            settings = self.load_settings()
            if settings.updates_disabled:
                log.info("Updates are disabled (SERVER=disabled); no check sent")
                self._fire(Trigger.NO_UPDATE)
                return CheckOutcome(UpdateStatus.IDLE)
            async with make_session(self.options.http) as session:
                params = self._request_params(settings, interactive=interactive)
                response = await self._update_check(session, settings, params)
                with self._lock:
                    self.machine.last_checked_time = int(self._clock())
                if isinstance(response, omaha.NoUpdate):
                    log.info("No update available for %s %s on track %s (server %s)", params.app_id,
                             params.version, params.track, host_of(settings.server))
                    self._fire(Trigger.NO_UPDATE)
                    return CheckOutcome(UpdateStatus.IDLE, poll_interval=response.poll_interval)
                offer = response
                state = attempts.for_offer(self._load_payload_state(), offer)
                self._store_payload_state(state)
                url = offer.urls[state.url_index]
                if settings.server.startswith("https:") and not url.startswith("https:"):
                    raise UpdateEngineError(
                        ErrorCode.OMAHA_RESPONSE_INVALID,
                        f"Omaha server {host_of(settings.server)} is https but offered the payload over plain http "
                        f"({host_of(url)}); refusing the downgrade",
                    )
                failed_version = self.prefs.get_str(PREF_FAILED_BOOT_VERSION)
                if failed_version and offer.version == failed_version:
                    raise UpdateEngineError(
                        ErrorCode.OMAHA_UPDATE_DEFERRED_PER_POLICY,
                        f"version {offer.version} was installed on this node before and failed to boot (rolled "
                        f"back to {params.version}); not installing it again until a newer version is offered "
                        "(update_engine_client -reset_status clears this)",
                    )
                until = attempts.deferred_until(state, offer, self._clock(), interactive=interactive)
                if until is not None:
                    raise UpdateEngineError(
                        ErrorCode.OMAHA_UPDATE_DEFERRED_FOR_BACKOFF,
                        f"the payload of {offer.version} failed {state.attempt_number} earlier attempt(s); scheduled "
                        f"checks wait until {_utc(until)} before downloading it again (an interactive check, "
                        "update_engine_client -check_for_update, tries now; the server can send "
                        "DisablePayloadBackoff=\"true\")",
                    )
                with self._lock:
                    self.machine.new_version, self.machine.new_size = offer.version, offer.size
                log.info("Update available: %s → %s, %d bytes, from %s", params.version, offer.version,
                         offer.size, host_of(url))
                self._fire(Trigger.UPDATE_FOUND)

                with self._open_disk() as disk:
                    running, target = self._slots(disk)
                    ensure_not_running(target, running)
                    disk.disarm(target.index)
                touched_target = target.index
                log.info("Writing %s (running %s); %s disarmed until the payload is verified",
                         target.label, running.label, target.label)
                await self._send_event(session, settings, params, omaha.OmahaEvent.download_started())
                resumed = await self._download_and_apply(session, offer, url, target)
                await self._send_event(session, settings, params, omaha.OmahaEvent.download_finished())
                self._fire(Trigger.VERIFIED)

                with self._open_disk() as disk:
                    # The table is read (and validated) again: arm only the partition that was written.
                    now = disk.byte_range(target.index), disk.entry(target.index).name
                    if now != ((target.offset, target.size), target.label):
                        raise UpdateEngineError(
                            ErrorCode.INSTALL_DEVICE_OPEN_ERROR,
                            f"partition {target.index} of {disk.name} changed while the payload was written "
                            f"(was {target.label} at byte {target.offset}, {target.size} bytes; now {now[1]!r} at "
                            f"byte {now[0][0]}, {now[0][1]} bytes); not arming it",
                        )
                    disk.arm_for_next_boot(target.index)
                    flags = disk.flags(target.index)
                log.info("%s armed for the next boot: priority=%d tries=%d successful=%d", target.label,
                         flags.priority, flags.tries, int(flags.successful))
                await self._run_postinstall(target)
                # The boot id first: previous-version alone, left by a crash before the reboot marker, would
                # read as a rollback at the next check although the node never rebooted.
                self.prefs.set_str(PREF_INSTALLED_BOOT_ID, params.boot_id)
                self.prefs.set_str(PREF_PREVIOUS_VERSION, params.version)
                self.prefs.set_str(PREF_INSTALLED_VERSION, offer.version)
                # Installed: nothing to back off from, should the same offer come again (a crash before the
                # reboot marker, or ResetStatus).
                self._store_payload_state(attempts.PayloadState(response_signature=state.response_signature))
                self._pending_target, self._pending_kind = target.index, "update"
                self._write_marker(f"update {target.label}\n")
                await self._send_event(session, settings, params, omaha.OmahaEvent.update_complete())
                self._fire(Trigger.FINALIZED)
                log.info("Update to %s installed on %s; reboot needed", offer.version, target.label)
                return CheckOutcome(UpdateStatus.UPDATED_NEED_REBOOT, poll_interval=offer.poll_interval)
        except UpdateEngineError as exc:
            if isinstance(exc, HttpError):
                http_status = exc.status
            return await self._fail(exc.code, exc.message, settings, touched_target, resumed, http_status, offer)
        except Exception as exc:  # a bug must not kill the daemon nor leave the target armed
            log.exception("Unexpected error during the update attempt")
            return await self._fail(ErrorCode.ERROR, f"internal error: {exc!r}", settings, touched_target, resumed,
                                    None, offer)

    async def _update_check(
        self, session: aiohttp.ClientSession, settings: ue_config.UpdateSettings, params: omaha.OmahaRequestParams
    ) -> omaha.NoUpdate | omaha.UpdateOffer:
        previous = self.prefs.get_str(PREF_PREVIOUS_VERSION)
        rollback_detected = bool(previous) and previous == params.version
        installed_boot = self.prefs.get_str(PREF_INSTALLED_BOOT_ID)
        if rollback_detected and installed_boot == params.boot_id:
            # Installed during this very boot and the reboot marker is gone: the daemon stopped (a crash, a kill)
            # between arming and writing the marker. Nothing failed to boot; install again.
            log.info("Update installed earlier in this boot (%s) was not finished; not a rollback", params.boot_id)
            rollback_detected = False
            previous = ""
        if rollback_detected:
            failed = self.prefs.get_str(PREF_INSTALLED_VERSION) or ""
            log.warning("Rollback detected: the update to %s did not boot, %s is running again; %s will not be "
                        "installed again until a newer version is offered", failed or "?", params.version,
                        failed or "it")
            if failed:
                self.prefs.set_str(PREF_FAILED_BOOT_VERSION, failed)
        self.prefs.set_str(PREF_PREVIOUS_VERSION, "")
        if self.prefs.get_str(PREF_ALEPH_VERSION) is None:
            self.prefs.set_str(PREF_ALEPH_VERSION, params.version)
        body = omaha.build_update_check(
            params, previous_version="0.0.0.0" if previous is None else previous, rollback_detected=rollback_detected
        )
        log.info("Checking for update at %s: app %s version %s track %s", host_of(settings.server), params.app_id,
                 params.version, params.track)
        raw = await post_omaha(session, settings.server, body, self.options.http)
        self.prefs.set_str(PREF_FULL_RESPONSE, raw.decode("utf-8", "replace"))
        return omaha.parse_response(raw)

    async def _download_and_apply(
        self, session: aiohttp.ClientSession, offer: omaha.UpdateOffer, url: str, target: UsrSlot
    ) -> bool:
        key_path = self.options.public_key_path
        try:
            public_key = key_path.read_bytes()
        except OSError as exc:
            raise UpdateEngineError(
                ErrorCode.DOWNLOAD_PAYLOAD_PUBKEY_VERIFICATION_ERROR,
                f"cannot read the payload public key {key_path}: {exc.strerror}; no update without a key "
                "(install the key or pass --public-key)",
            ) from exc
        kernel_dir = self.options.resolved_kernel_dir()
        kernel_path = kernel_dir / target.kernel_name if kernel_dir.is_dir() else None
        if kernel_path is None:
            log.warning("Kernel directory %s does not exist; a kernel in the payload will not be installed",
                        kernel_dir)
        # Imported here: the signature and protobuf code cost ~9 MiB that an idle daemon should not carry.
        from update_engine.payload.sink import PayloadSink
        from update_engine.payload.target import WriteTarget, remove_partial_kernels

        if kernel_path is not None:
            remove_partial_kernels(kernel_path)
        self.prefs.set_str(PREF_RESPONSE_HASH, offer.sha256_b64)
        sink = PayloadSink(
            WriteTarget(path=self._disk_path(), offset=target.offset, size=target.size),
            public_key_pem=public_key,
            expected_size=offer.size,
            expected_sha256_b64=offer.sha256_b64,
            kernel_path=kernel_path,
        )
        delivered = 0
        total = max(offer.size, 1)

        def first_byte() -> None:
            self._fire(Trigger.DOWNLOAD_STARTED)
            log.info("Downloading %d bytes from %s", offer.size, host_of(url))

        notified = 0
        notify_step = 1 << 20  # progress listeners hear at most once per MiB (chunks are a few hundred KiB)

        async def deliver(chunk: bytes) -> None:
            # The sink's workers hash and write; this only queues the chunk (awaiting room when they lag behind).
            nonlocal delivered, notified
            await sink.write_async(chunk)
            delivered += len(chunk)
            if delivered - notified >= notify_step or delivered >= total:
                notified = delivered
                with self._lock:
                    self.machine.progress = min(delivered / total, 1.0)
                self._notify()

        auth = None
        if self._settings and self._settings.download_user:
            auth = aiohttp.BasicAuth(self._settings.download_user, self._settings.download_password or "")
        resumes = 0
        try:
            resumes = await download(
                session, url, deliver, expected_size=offer.size, limits=self.options.http, auth=auth,
                on_first_byte=first_byte,
            )
            if self.machine.status is UpdateStatus.UPDATE_AVAILABLE:
                first_byte()
            self._fire(Trigger.DOWNLOAD_FINISHED)
            log.info("Download complete (%d bytes, %d resumes); verifying size, SHA-256, signature and %s",
                     delivered, resumes, target.label)
            await asyncio.to_thread(sink.close)
        except BaseException:
            sink.abort()
            raise
        # A payload downloaded and verified is an attempt at it, whatever happens to the update from here on.
        self._store_payload_state(
            attempts.after_download(self._load_payload_state(), self._clock(), attempts.backoff_fuzz())
        )
        return resumes > 0

    async def _run_postinstall(self, target: UsrSlot) -> None:
        hook = self.options.postinstall_hook
        if hook is None:
            return
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "LD_LIBRARY_PATH", "ALL_PROXY", "HTTP_PROXY",
                                                            "HTTPS_PROXY")}
        args = [str(hook), str(self.options.disk or ""), target.label]
        proc = await asyncio.to_thread(subprocess.run, args, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            code = ErrorCode.POSTINSTALL_BOOTED_FROM_FIRMWARE_B if proc.returncode == 3 else \
                ErrorCode.POSTINSTALL_RUNNER_ERROR
            raise UpdateEngineError(code, f"postinstall hook {hook} exited {proc.returncode}: "
                                          f"{proc.stderr.strip()[-500:]}")
        log.info("Postinstall hook %s succeeded", hook)

    async def _fail(
        self,
        code: int,
        message: str,
        settings: ue_config.UpdateSettings | None,
        touched_target: int | None,
        resumed: bool,
        http_status: int | None,
        offer: omaha.UpdateOffer | None = None,
    ) -> CheckOutcome:
        if code in DEFERRED_CODES:
            log.warning("Update deferred: %s (code %d %s)", message, code, describe(code))
        else:
            log.error("Update attempt failed: %s (error %d %s). The running system is unchanged; the next check "
                      "will try again.", message, code, describe(code))
        if offer is not None and code not in DEFERRED_CODES:
            self._count_failed_attempt(offer, code)
        if self.machine.can(Trigger.FAILED):
            self._fire(Trigger.FAILED)
        if touched_target is not None:
            try:
                with self._open_disk() as disk:
                    disk.disarm(touched_target)
            except Exception as exc:
                log.error("Could not disarm partition %d after the failure: %s", touched_target, exc)
        flags = 0
        if settings is not None and settings.server.rstrip("/") != PRODUCTION_SERVER.rstrip("/"):
            flags |= FLAG_TEST_OMAHA_URL
        if resumed:
            flags |= FLAG_RESUMED
        full_code = int(code) | flags
        if settings is not None and not settings.updates_disabled:
            try:
                async with make_session(self.options.http) as session:
                    params = self._request_params(settings, interactive=False)
                    await self._send_event(session, settings, params, omaha.OmahaEvent.failure(full_code))
            except Exception as exc:
                log.warning("Could not report the failure to Omaha: %s", exc)
        if self.machine.can(Trigger.ERROR_REPORTED):
            self._fire(Trigger.ERROR_REPORTED)
        return CheckOutcome(
            UpdateStatus.IDLE, error_code=int(code), error_message=message, http_status=http_status,
            network_error=http_status is None and int(code) == int(ErrorCode.OMAHA_REQUEST_HTTP_RESPONSE_BASE),
        )

    def _load_payload_state(self) -> attempts.PayloadState:
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

    def _store_payload_state(self, state: attempts.PayloadState) -> None:
        if state == self._load_payload_state():
            return
        self.prefs.set_str(CURRENT_RESPONSE_SIGNATURE, state.response_signature)
        self.prefs.set_int(PAYLOAD_ATTEMPT_NUMBER, state.attempt_number)
        self.prefs.set_int(CURRENT_URL_INDEX, state.url_index)
        self.prefs.set_int(CURRENT_URL_FAILURE_COUNT, state.url_failure_count)
        self.prefs.set_int(BACKOFF_EXPIRY_TIME, state.backoff_expiry)

    def _count_failed_attempt(self, offer: omaha.UpdateOffer, code: int) -> None:
        """Move to the next URL or count the failure; say when scheduled checks will try the payload again."""
        try:
            before = self._load_payload_state()
            after = attempts.after_failure(before, code, offer, self._clock(), attempts.backoff_fuzz())
            self._store_payload_state(after)
        except PrefsError as exc:
            log.warning("Could not record the failed attempt: %s", exc)
            return
        if after.url_index != before.url_index:
            log.info("The next attempt at %s downloads from %s", offer.version, host_of(offer.urls[after.url_index]))
        wait_until = attempts.deferred_until(after, offer, self._clock(), interactive=False)
        if wait_until is not None:
            log.warning("The payload of %s failed %d attempt(s); scheduled checks will not download it again "
                        "before %s", offer.version, after.attempt_number, _utc(wait_until))

    async def _send_event(
        self,
        session: aiohttp.ClientSession,
        settings: ue_config.UpdateSettings,
        params: omaha.OmahaRequestParams,
        event: omaha.OmahaEvent,
    ) -> None:
        """Events are best-effort: a lost event must not fail an update that succeeded."""
        try:
            await post_omaha(session, settings.server, omaha.build_event(params, event), self.options.http)
        except HttpError as exc:
            log.warning("Omaha event %d/%d not delivered to %s: %s", event.type, event.result,
                        host_of(settings.server), exc)

    # --- helpers ------------------------------------------------------------------------------------------------

    def _request_params(self, settings: ue_config.UpdateSettings, *, interactive: bool) -> omaha.OmahaRequestParams:
        root = self.options.config_root
        try:
            machine_id, boot_id = read_machine_id(root), read_boot_id(root)
        except IdentityError as exc:
            raise ue_config.ConfigError(f"cannot read the node's identity: {exc.message}") from exc
        try:
            oem = ue_config.load_oem_release(root)
        except SettingsFileError as exc:
            raise ue_config.ConfigError(f"cannot read the OEM release: {exc}") from exc
        return omaha.OmahaRequestParams.from_settings(
            settings,
            oem,
            machine_id=machine_id,
            boot_id=boot_id,
            aleph_version=self.prefs.get_str(PREF_ALEPH_VERSION) or "",
            arch=self.options.arch,
            interactive=interactive,
        )

    def _disk_path(self) -> Path:
        if self.options.disk is not None:
            return self.options.disk
        return find_boot_disk(self.options.config_root)

    def _open_disk(self) -> GptDisk:
        return GptDisk.open(self._disk_path())

    def _slots(self, disk: GptDisk) -> tuple[UsrSlot, UsrSlot]:
        root = self.options.config_root
        cmdline = _read_optional(root / "proc/cmdline")
        mountinfo = _read_optional(root / "proc/self/mountinfo") if self.options.booted is None else None
        return resolve_slots(disk, booted=self.options.booted, cmdline=cmdline, mountinfo=mountinfo)

    def _write_marker(self, content: str) -> None:
        marker = self.options.reboot_marker
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_name(marker.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, content.encode())
        finally:
            os.close(fd)
        os.replace(tmp, marker)

    def _fire(self, trigger: Trigger) -> None:
        with self._lock:
            before = self.machine.status
            after = self.machine.fire(trigger)
        if after is not before or trigger is Trigger.RESET:
            log.info("Status %s → %s (%s)", before.value, after.value, trigger.value)
        self._notify()

    def _notify(self) -> None:
        snap = self.snapshot()
        for listener in self._listeners:
            try:
                listener(snap)
            except Exception:
                log.exception("Status listener failed")


_PAYLOAD_STATE_PREFS = (
    CURRENT_RESPONSE_SIGNATURE,
    PAYLOAD_ATTEMPT_NUMBER,
    CURRENT_URL_INDEX,
    CURRENT_URL_FAILURE_COUNT,
    BACKOFF_EXPIRY_TIME,
)


def _utc(timestamp: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


def _read_optional(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


PREF_PREVIOUS_VERSION = "previous-version"
PREF_ALEPH_VERSION = "aleph-version"
PREF_FULL_RESPONSE = "full-response"
PREF_RESPONSE_HASH = "update-check-response-hash"
# The version written to the passive partition by the last successful attempt, and a version that was installed,
# failed to boot and was rolled back from: offering it again is refused until a newer one comes.
PREF_INSTALLED_VERSION = "installed-version"
PREF_FAILED_BOOT_VERSION = "failed-boot-version"
# The boot id of the boot that installed previous-version's successor: the same id at the next check means no reboot.
PREF_INSTALLED_BOOT_ID = "installed-boot-id"


def describe_outcome(outcome: CheckOutcome) -> str:
    if outcome.error_code is not None:
        return f"error {outcome.error_code} {describe(outcome.error_code)}: {outcome.error_message}"
    return outcome.status.value
