"""One update check: from the request to an installed update, or to a failure reported and cleaned up.

Rules of this file:

* **One object per check.** :class:`UpdateCheck` is made for one attempt and thrown away after it. Its progress is
  its :attr:`UpdateCheck.phase`, one of the phase classes below; each carries what the check owns at that point
  (the offer, the disarmed target partition, the payload sink), so nothing about the attempt hides in locals.
* **Whatever the check owns, it releases.** A failure (or a cancellation: SIGTERM) is handled by looking at the
  phase it happened in: from the moment the payload sink exists it is aborted (its threads joined, its files
  closed), from the moment the passive partition was touched it is disarmed again. The running partition is never
  written.
* **Published state changes only through the machine.** The check fires events (``fire``); it never assigns a
  status, a progress or a version (see ``machine.py``).
* ``run`` never raises, except ``CancelledError``: every failure ends in a :class:`CheckOutcome` with its code,
  after the failure was counted against the payload (URL failover, backoff), fired (REPORTING_ERROR_EVENT) and
  reported to Omaha (3/0, or 3/9 when deferred).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from coreos_common.hooks import run_hook
from coreos_common.http1 import basic_authorization
from coreos_common.identity import IdentityError, read_boot_id, read_machine_id
from coreos_common.status import UpdateStatus
from coreos_common.updateconf import SettingsFileError
from update_engine import config as ue_config
from update_engine import omaha
from update_engine import payload_state as attempts
from update_engine.engine import policy
from update_engine.engine.disk import NodeDisk
from update_engine.engine.history import InstalledUpdate, InstallHistory, PendingReboot
from update_engine.engine.machine import (
    AttemptKind,
    AttemptResult,
    Checked,
    Event,
    Failed,
    Finalized,
    NoUpdate,
    PendingKind,
    Progress,
    Trigger,
    UpdateFound,
)
from update_engine.engine.options import EngineOptions
from update_engine.engine.progress import DownloadMeter
from update_engine.errors import DEFERRED_CODES, ErrorCode, UpdateEngineError, describe
from update_engine.http_rules import HttpError, host_of
from update_engine.omaha_client import OmahaClient
from update_engine.partitions import UsrSlot, ensure_not_running

if TYPE_CHECKING:
    from update_engine.payload.sink import PayloadSink

log = logging.getLogger(__name__)

# The post-install hook gets only these variables of the daemon's environment, as the original's children do.
CHILD_ENVIRONMENT = ("PATH", "LD_LIBRARY_PATH", "ALL_PROXY", "HTTP_PROXY", "HTTPS_PROXY")
POSTINSTALL_TIMEOUT_S = 600.0
# Progress listeners hear at most once per MiB (network chunks are a few hundred KiB).
PROGRESS_STEP_BYTES = 1 << 20

Fire = Callable[[Event], None]
Clock = Callable[[], float]


@dataclass(frozen=True)
class CheckOutcome:
    """How one check ended, for ``--once`` and the scheduler."""

    status: UpdateStatus
    error_code: int | None = None
    error_message: str | None = None
    poll_interval: int | None = None
    http_status: int | None = None
    network_error: bool = False
    downloaded_bytes: int = 0  # payload bytes this check downloaded, also when it failed
    apply_seconds: float | None = None  # download, write and verification of the payload, when they completed


def describe_outcome(outcome: CheckOutcome) -> str:
    if outcome.error_code is not None:
        return f"error {outcome.error_code} {describe(outcome.error_code)}: {outcome.error_message}"
    return outcome.status.value


# --- the phases of a check ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Starting:
    """The settings are being read; nothing was sent and nothing on the node was touched."""


@dataclass(frozen=True)
class Request:
    """The settings an update check was made with and the request's attributes."""

    settings: ue_config.UpdateSettings
    params: omaha.OmahaRequestParams


@dataclass(frozen=True)
class Offered:
    """An offer the server made in answer to ``request`` at ``checked_at`` (Unix s)."""

    request: Request
    offer: omaha.UpdateOffer
    response_signature: str
    checked_at: int


@dataclass(frozen=True)
class Asking:
    """The update check is on its way to the server; nothing on the node was touched."""

    request: Request


@dataclass(frozen=True)
class Vetting:
    """An offer arrived and is checked against this node's policy; nothing on the node was touched yet."""

    offered: Offered


@dataclass(frozen=True)
class Preparing:
    """The offer was accepted and ``target`` (the passive partition) disarmed; the payload sink is being set up."""

    offered: Offered
    url: str
    target: UsrSlot


@dataclass(frozen=True)
class Downloading:
    """The payload streams into ``sink``, which writes ``target`` and verifies everything when it is closed."""

    offered: Offered
    url: str
    target: UsrSlot
    sink: PayloadSink


@dataclass(frozen=True)
class Arming:
    """The payload is verified and the sink closed: ``target`` is armed, post-installed, and the install recorded."""

    offered: Offered
    target: UsrSlot
    resumed: bool


@dataclass(frozen=True)
class Finished:
    """The check is over; ``outcome`` says how."""

    outcome: CheckOutcome


CheckPhase = Starting | Asking | Vetting | Preparing | Downloading | Arming | Finished


def request_params(
    options: EngineOptions, settings: ue_config.UpdateSettings, history: InstallHistory, *, interactive: bool
) -> omaha.OmahaRequestParams:
    """The attributes of an Omaha request: settings, the node's identity and OEM, the first version it ran."""
    root = options.config_root
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
        aleph_version=history.aleph_version(),
        arch=options.arch,
        interactive=interactive,
    )


async def send_event(server: OmahaClient, request: Request, event: omaha.OmahaEvent) -> None:
    """Events are best-effort: a lost event must not fail an update that succeeded."""
    settings, params = request.settings, request.params
    try:
        await server.post(settings.server, omaha.build_event(params, event))
    except HttpError as exc:
        log.warning("Omaha event %d/%d not delivered to %s: %s", event.type, event.result, host_of(settings.server),
                    exc)


class UpdateCheck:
    """One check-and-update attempt; ``run`` once."""

    def __init__(
        self,
        options: EngineOptions,
        history: InstallHistory,
        load_settings: Callable[[], ue_config.UpdateSettings],
        fire: Fire,
        can_fire: Callable[[Trigger], bool],
        *,
        interactive: bool,
        clock: Clock,
    ) -> None:
        self.options = options
        self.history = history
        self.phase: CheckPhase = Starting()
        self._load_settings = load_settings
        self._fire = fire
        self._can_fire = can_fire
        self._interactive = interactive
        self._clock = clock
        self._disk = NodeDisk(options)
        # What the check did, for the metrics (not its phase: that is ``phase``).
        self.downloaded_bytes = 0
        self.apply_seconds: float | None = None

    async def run(self) -> CheckOutcome:
        """Check, and install what is offered; the outcome, never an exception (but CancelledError)."""
        try:
            outcome = await self._run()
        except asyncio.CancelledError:
            self._release()
            raise
        except UpdateEngineError as exc:
            status = exc.status if isinstance(exc, HttpError) else None
            outcome = await self._fail(exc.code, exc.message, status)
        except Exception as exc:  # a bug must not kill the daemon nor leave the target armed
            log.exception("Unexpected error during the update attempt")
            outcome = await self._fail(ErrorCode.ERROR, f"internal error: {exc!r}", None)
        outcome = dataclasses.replace(outcome, downloaded_bytes=self.downloaded_bytes,
                                      apply_seconds=self.apply_seconds)
        self.phase = Finished(outcome)
        return outcome

    # --- the way through -----------------------------------------------------------------------------------------

    async def _run(self) -> CheckOutcome:
        settings = self._load_settings()
        if settings.updates_disabled:
            log.info("Updates are disabled (SERVER=disabled); no check sent")
            self._fire(NoUpdate())
            return CheckOutcome(UpdateStatus.IDLE)
        async with OmahaClient(self.options.http) as server:
            request = Request(settings, request_params(self.options, settings, self.history,
                                                       interactive=self._interactive))
            self.phase = Asking(request)
            response = await self._ask(server, request)
            checked_at = int(self._clock())
            self._fire(Checked(checked_at))
            self.history.record_check_time(checked_at)
            params = request.params
            if isinstance(response, omaha.NoUpdate):
                log.info("No update available for %s %s on track %s (server %s)", params.app_id, params.version,
                         params.track, host_of(settings.server))
                self._fire(NoUpdate(AttemptResult(AttemptKind.NO_UPDATE, checked_at)))
                return CheckOutcome(UpdateStatus.IDLE, poll_interval=response.poll_interval)
            state = attempts.for_offer(self.history.payload_state(), response)
            self.history.store_payload_state(state)
            offered = Offered(request, response, state.response_signature, checked_at)
            self.phase = Vetting(offered)
            url = response.urls[state.url_index]
            policy.vet_offer(
                response, server=settings.server, url=url, running_version=params.version,
                failed_boot_version=self.history.failed_boot_version(), state=state, now=self._clock(),
                interactive=self._interactive,
            )
            auth = download_auth(settings)  # before anything is touched: credentials that cannot be sent end here
            return await self._install(server, offered, url, auth)

    async def _ask(self, server: OmahaClient, request: Request) -> omaha.OmahaResponse:
        """The update check with its report on the last install (``previousversion`` or a rollback)."""
        settings, params = request.settings, request.params
        report = policy.report_for_check(
            self.history.previous_version(), params.version, self.history.installed_boot_id(), params.boot_id
        )
        if report.last_install is policy.LastInstall.UNFINISHED:
            # Installed during this very boot and the reboot marker is gone: the daemon stopped (a crash, a kill)
            # between arming and writing the marker. Nothing failed to boot; install again.
            log.info("Update installed earlier in this boot (%s) was not finished; not a rollback", params.boot_id)
        elif report.rollback_detected:
            failed = self.history.installed_version()
            log.warning("Rollback detected: the update to %s did not boot, %s is running again; %s will not be "
                        "installed again until a newer version is offered", failed or "?", params.version,
                        failed or "it")
            if failed:
                self.history.remember_failed_boot(failed)
        self.history.clear_previous_version()
        self.history.remember_aleph_version(params.version)
        body = omaha.build_update_check(
            params, previous_version=report.previous_version, rollback_detected=report.rollback_detected
        )
        log.info("Checking for update at %s: app %s version %s track %s", host_of(settings.server), params.app_id,
                 params.version, params.track)
        raw = await server.post(settings.server, body)
        self.history.record_response(raw)
        return omaha.parse_response(raw)

    async def _install(
        self, server: OmahaClient, offered: Offered, url: str, auth: str | None
    ) -> CheckOutcome:
        offer, request = offered.offer, offered.request
        log.info("Update available: %s → %s, %d bytes, from %s", request.params.version, offer.version, offer.size,
                 host_of(url))
        self._fire(UpdateFound(offer.version, offer.size))
        with self._disk.open() as disk:
            running, target = self._disk.slots(disk)
            ensure_not_running(target, running)
            disk.disarm(target.index)
        preparing = Preparing(offered, url, target)
        self.phase = preparing
        log.info("Writing %s (running %s); %s disarmed until the payload is verified", target.label, running.label,
                 target.label)
        await send_event(server, request, omaha.OmahaEvent.download_started())
        resumed = await self._download(preparing, auth)
        await send_event(server, request, omaha.OmahaEvent.download_finished())
        self._fire(Trigger.VERIFIED)
        arming = Arming(offered, target, resumed)
        self.phase = arming
        return await self._arm(server, arming)

    async def _download(self, preparing: Preparing, auth: str | None) -> bool:
        """Stream, write and verify the payload; True when the download had to resume."""
        offer, target, url = preparing.offered.offer, preparing.target, preparing.url
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
        # Imported here: the signature and protobuf code (~9 MiB) are for downloads only; an idle daemon should not
        # carry them.
        from update_engine.http import download, make_client
        from update_engine.payload.sink import PayloadSink
        from update_engine.payload.target import WriteTarget, remove_partial_kernels

        if kernel_path is not None:
            remove_partial_kernels(kernel_path)
        self.history.record_response_hash(offer.sha256_b64)
        sink = PayloadSink(
            WriteTarget(path=self._disk.path(), offset=target.offset, size=target.size),
            public_key_pem=public_key,
            expected_size=offer.size,
            expected_sha256_b64=offer.sha256_b64,
            kernel_path=kernel_path,
        )
        self.phase = Downloading(preparing.offered, url, target, sink)
        delivered = 0
        notified = 0
        total = max(offer.size, 1)
        clock = asyncio.get_running_loop().time
        started = clock()
        meter = DownloadMeter(offer.size, started)

        def first_byte() -> None:
            self._fire(Trigger.DOWNLOAD_STARTED)
            log.info("Downloading %d bytes from %s", offer.size, host_of(url))

        async def deliver(chunk: bytes) -> None:
            # The sink's workers hash and write; this only queues the chunk (awaiting room when they lag behind).
            nonlocal delivered, notified
            await sink.write_async(chunk)
            delivered += len(chunk)
            self.downloaded_bytes += len(chunk)
            if delivered - notified >= PROGRESS_STEP_BYTES or delivered >= total:
                notified = delivered
                self._fire(Progress(delivered / total))
            line = meter.feed(delivered, clock())
            if line is not None:
                log.info("%s", line)

        async with make_client(self.options.http) as client:
            resumes = await download(
                client, url, deliver, expected_size=offer.size, limits=self.options.http, authorization=auth,
                on_first_byte=first_byte,
            )
        if not self._can_fire(Trigger.DOWNLOAD_FINISHED):
            first_byte()  # an empty body still passes through DOWNLOADING
        self._fire(Trigger.DOWNLOAD_FINISHED)
        log.info("Download complete: %s, %d resumes; verifying size, SHA-256, signature and %s",
                 meter.summary(delivered, clock()), resumes, target.label)
        await _finish_in_thread(sink.close)
        self.apply_seconds = clock() - started
        # A payload downloaded and verified is an attempt at it, whatever happens to the update from here on.
        self.history.store_payload_state(
            attempts.after_download(self.history.payload_state(), self._clock(), attempts.backoff_fuzz())
        )
        return resumes > 0

    async def _arm(self, server: OmahaClient, arming: Arming) -> CheckOutcome:
        target, offered = arming.target, arming.offered
        offer, params = offered.offer, offered.request.params
        with self._disk.open() as disk:
            # The table is read (and validated) again: arm only the partition that was written.
            now = disk.byte_range(target.index), disk.entry(target.index).name
            if now != ((target.offset, target.size), target.label):
                raise UpdateEngineError(
                    ErrorCode.INSTALL_DEVICE_OPEN_ERROR,
                    f"partition {target.index} of {disk.name} changed while the payload was written (was "
                    f"{target.label} at byte {target.offset}, {target.size} bytes; now {now[1]!r} at byte "
                    f"{now[0][0]}, {now[0][1]} bytes); not arming it",
                )
            disk.arm_for_next_boot(target.index)
            flags = disk.flags(target.index)
        log.info("%s armed for the next boot: priority=%d tries=%d successful=%d", target.label, flags.priority,
                 flags.tries, int(flags.successful))
        await self._run_postinstall(target)
        self.history.record_install(
            InstalledUpdate(offer.version, offer.size, install_time=int(self._clock())),
            running_version=params.version, boot_id=params.boot_id, response_signature=offered.response_signature,
        )
        self.history.write_pending_reboot(PendingReboot(PendingKind.UPDATE, target.label))
        await send_event(server, offered.request, omaha.OmahaEvent.update_complete())
        self._fire(Finalized(AttemptResult(AttemptKind.UPDATED, int(self._clock()))))
        log.info("Update to %s installed on %s; reboot needed", offer.version, target.label)
        return CheckOutcome(UpdateStatus.UPDATED_NEED_REBOOT, poll_interval=offer.poll_interval)

    async def _run_postinstall(self, target: UsrSlot) -> None:
        """The operator's post-install hook: ``HOOK DISK TARGET-LABEL``, killed with its group on cancel."""
        hook = self.options.postinstall_hook
        if hook is None:
            return
        env = {name: value for name, value in os.environ.items() if name in CHILD_ENVIRONMENT}
        result = await run_hook(hook, env=env, timeout=POSTINSTALL_TIMEOUT_S,
                                args=(str(self._disk.path()), target.label))
        if result.passed:
            log.info("Postinstall hook %s succeeded", hook)
            return
        code = (ErrorCode.POSTINSTALL_BOOTED_FROM_FIRMWARE_B if result.returncode == 3
                else ErrorCode.POSTINSTALL_RUNNER_ERROR)
        raise UpdateEngineError(code, f"postinstall {result.describe()}")

    # --- failure -------------------------------------------------------------------------------------------------

    def _release(self) -> None:
        """Give back what the current phase owns: abort the sink, disarm the target. Never raises."""
        phase = self.phase
        if isinstance(phase, Downloading):
            phase.sink.abort()
        if isinstance(phase, Preparing | Downloading | Arming):
            try:
                with self._disk.open() as disk:
                    disk.disarm(phase.target.index)
            except Exception as exc:
                log.error("Could not disarm partition %d after the failure: %s", phase.target.index, exc)

    async def _fail(self, code: int, message: str, http_status: int | None) -> CheckOutcome:
        phase = self.phase
        deferred = code in DEFERRED_CODES
        if deferred:
            log.warning("Update deferred: %s (code %d %s)", message, code, describe(code))
        else:
            log.error("Update attempt failed: %s (error %d %s). The running system is unchanged; the next check "
                      "will try again.", message, code, describe(code))
        offered = _offered(phase)
        if offered is not None and not deferred:
            self._count_failed_attempt(offered.offer, code)
        self._release()
        if self._can_fire(Trigger.FAILED):
            kind = AttemptKind.DEFERRED if deferred else AttemptKind.FAILED
            self._fire(Failed(AttemptResult(kind, int(self._clock()), int(code), message)))
        request = phase.request if isinstance(phase, Asking) else offered.request if offered is not None else None
        if request is not None and not request.settings.updates_disabled:
            resumed = isinstance(phase, Arming) and phase.resumed
            full_code = policy.failure_event_code(code, custom_server=request.settings.custom_server,
                                                  resumed=resumed)
            try:
                async with OmahaClient(self.options.http) as server:
                    await send_event(server, request, omaha.OmahaEvent.failure(full_code))
            except Exception as exc:
                log.warning("Could not report the failure to Omaha: %s", exc)
        if self._can_fire(Trigger.ERROR_REPORTED):
            self._fire(Trigger.ERROR_REPORTED)
        return CheckOutcome(
            UpdateStatus.IDLE, error_code=int(code), error_message=message, http_status=http_status,
            network_error=http_status is None and int(code) == int(ErrorCode.OMAHA_REQUEST_HTTP_RESPONSE_BASE),
        )

    def _count_failed_attempt(self, offer: omaha.UpdateOffer, code: int) -> None:
        """Move to the next URL or count the failure; say when scheduled checks will try the payload again."""
        try:
            before = self.history.payload_state()
            after = attempts.after_failure(before, code, offer, self._clock(), attempts.backoff_fuzz())
            self.history.store_payload_state(after)
        except UpdateEngineError as exc:
            log.warning("Could not record the failed attempt: %s", exc)
            return
        if after.url_index != before.url_index:
            log.info("The next attempt at %s downloads from %s", offer.version, host_of(offer.urls[after.url_index]))
        wait_until = attempts.deferred_until(after, offer, self._clock(), interactive=False)
        if wait_until is not None:
            log.warning("The payload of %s failed %d attempt(s); scheduled checks will not download it again "
                        "before %s", offer.version, after.attempt_number, policy.utc(wait_until))


def download_auth(settings: ue_config.UpdateSettings) -> str | None:
    """The ``Authorization`` header of the payload download: HTTP basic authentication from DOWNLOAD_USER and
    DOWNLOAD_PASSWORD, encoded in Latin-1 (what the settings are checked against).

    Settings that cannot be sent are a ConfigError naming the setting, never its value (an encoding error would
    carry the password into the log).
    """
    problem = settings.credential_problem
    if problem is not None:
        raise ue_config.ConfigError(problem)
    if not settings.download_user:
        return None
    return basic_authorization(settings.download_user, settings.download_password or "", encoding="latin-1")


async def _finish_in_thread(close: Callable[[], object]) -> None:
    """Run the sink's final verification in a thread; a cancel waits for it, so no abort races a close."""
    closing = asyncio.ensure_future(asyncio.to_thread(close))
    try:
        await asyncio.shield(closing)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await closing
        raise


def _offered(phase: CheckPhase) -> Offered | None:
    """The offer the check had when it was in ``phase``, if it had one."""
    if isinstance(phase, Vetting | Preparing | Downloading | Arming):
        return phase.offered
    return None
