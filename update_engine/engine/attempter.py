"""The engine's facade: what the D-Bus adapter and ``update_engine --once`` call, and nothing more.

Theory of operation. :class:`UpdateAttempter` holds the one :class:`~update_engine.engine.machine.AttemptMachine`
(the published state), the :class:`~update_engine.engine.history.InstallHistory` (what is remembered) and the
settings last read. A check is an :class:`~update_engine.engine.check.UpdateCheck` made for it and dropped after
it; D-Bus requests (AttemptUpdate, ResetStatus, Rollback) and the daemon's own steps (restoring a pending reboot
after a restart, marking a healthy boot, the ping while a reboot is pending) are methods here. Every change of
published state is an event fired through the machine; listeners hear each new snapshot, on the event loop's
thread (the engine runs there: downloads are coroutines, payload workers never touch the machine).

Refusals are the engine's own exceptions (``update_engine.engine.errors``); the D-Bus adapter translates them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from coreos_common.identity import IdentityError, read_boot_id, read_machine_id
from coreos_common.logs import escape_control
from coreos_common.status import StatusDetails, StatusSnapshot, UpdateStatus
from coreos_common.updateconf import SettingsFileError, load_update_conf
from update_engine import __version__, omaha
from update_engine import config as ue_config
from update_engine.engine.check import CheckOutcome, UpdateCheck, describe_outcome, request_params
from update_engine.engine.disk import NodeDisk
from update_engine.engine.errors import ResetNotAllowed, RollbackRefused
from update_engine.engine.history import InstallHistory, PendingReboot
from update_engine.engine.machine import (
    NO_VERSION,
    AttemptKind,
    AttemptMachine,
    Event,
    InvalidTransition,
    PendingKind,
    RebootPendingFound,
    Trigger,
    trigger_of,
)
from update_engine.engine.options import REBOOT_MARKER_NAME, EngineOptions
from update_engine.errors import UpdateEngineError, describe
from update_engine.gpt import PartitionFlags
from update_engine.http_rules import HttpError, host_of
from update_engine.omaha_client import OmahaClient
from update_engine.prefs import Prefs

log = logging.getLogger(__name__)

StatusListener = Callable[[StatusSnapshot], None]


class UpdateAttempter:
    """Runs checks and updates, driving the machine; the D-Bus service's ``UpdateManager``."""

    def __init__(self, options: EngineOptions, *, clock: Callable[[], float] = time.time) -> None:
        self.options = options
        self.machine = AttemptMachine()
        self.history = InstallHistory(Prefs(options.prefs_dir), options.reboot_marker)
        self.check_requested = asyncio.Event()
        self._clock = clock
        self._disk = NodeDisk(options)
        self._listeners: list[StatusListener] = []
        self._settings: ue_config.UpdateSettings | None = None
        self._setup: ue_config.SetupReport | None = None
        self._interactive_requested = False

    @property
    def prefs(self) -> Prefs:
        """The prefs store (for tests and tools; the engine itself goes through ``history``)."""
        return self.history.prefs

    # --- UpdateManager (D-Bus face) -----------------------------------------------------------------------------

    def snapshot(self) -> StatusSnapshot:
        return self.machine.snapshot()

    def details(self) -> StatusDetails:
        """GetStatusDetails: the status, how the last attempt ended, what is pending, the set-up's warnings."""
        last = self.machine.last_attempt
        failed = last is not None and last.kind in (AttemptKind.FAILED, AttemptKind.DEFERRED)
        settings = self._settings
        pending = self.machine.pending if self.machine.status is UpdateStatus.UPDATED_NEED_REBOOT else None
        return StatusDetails(
            status=self.snapshot(),
            last_attempt_result=last.kind.value if last is not None else "",
            last_attempt_time=last.time if last is not None else 0,
            last_error_code=last.code if last is not None and failed else 0,
            last_error_name=describe(last.code) if last is not None and failed else "",
            last_error_reason=escape_control(last.reason) if last is not None and failed else "",
            pending_reboot=pending.value if pending is not None else "",
            warnings=self.warnings(),
            server=settings.server if settings is not None else "",
            group=settings.group if settings is not None else "",
            current_version=settings.version if settings is not None else "",
            board=settings.board if settings is not None else "",
            app_id=settings.app_id if settings is not None else "",
            public_key=str(self.options.public_key_path),
        )

    def add_status_listener(self, listener: StatusListener) -> None:
        self._listeners.append(listener)

    def attempt_update(self) -> None:
        """Start an interactive check now when IDLE; otherwise do nothing (as the original)."""
        if self.machine.status is not UpdateStatus.IDLE or self.check_requested.is_set():
            log.info("AttemptUpdate ignored: status is %s", self.machine.status.value)
            return
        log.info("AttemptUpdate: starting an update check now")
        self._interactive_requested = True
        # As the original, the caller sees CHECKING_FOR_UPDATE as soon as the call returns.
        self._fire(Trigger.CHECK)
        self.check_requested.set()

    def take_interactive_request(self) -> bool:
        """True once after AttemptUpdate asked for the check that is about to run."""
        requested, self._interactive_requested = self._interactive_requested, False
        return requested

    def reset_status(self) -> None:
        """UPDATED_NEED_REBOOT → IDLE, undoing what was armed for the next boot; IDLE forgets held-back versions."""
        status = self.machine.status
        if status is UpdateStatus.IDLE:
            failed = self.history.forget_failed_boot()
            if failed:
                log.info("ResetStatus: version %s, which failed to boot earlier, may be installed again", failed)
            if self.history.payload_state().attempt_number:
                log.info("ResetStatus: earlier attempts at the offered payload forgotten; no backoff")
            self.history.forget_payload_state()
            return
        if status is not UpdateStatus.UPDATED_NEED_REBOOT:
            raise ResetNotAllowed(f"ResetStatus is only allowed in IDLE or UPDATED_NEED_REBOOT, not {status.value}")
        try:
            with self._disk.open() as disk:
                running, target = self._disk.slots(disk)
                if self.machine.pending is PendingKind.ROLLBACK:
                    disk.mark_good(running.index)
                    log.info("ResetStatus: rollback cancelled, %s stays the next boot", running.label)
                else:
                    disk.disarm(target.index)
                    log.info("ResetStatus: update abandoned, %s disarmed (priority 0), %s stays the next boot",
                             target.label, running.label)
        except UpdateEngineError as exc:
            log.error("ResetStatus: cannot undo what was armed: %s", exc)
            raise ResetNotAllowed(f"cannot undo what was armed for the next boot: {exc}") from exc
        self.history.clear_pending_reboot()
        self.history.clear_previous_version()
        self._fire(Trigger.RESET)

    def rollback(self) -> str:
        """Arm the other USR partition for the next boot if it holds a known-good system."""
        if self.machine.status is not UpdateStatus.IDLE:
            raise RollbackRefused(f"rollback is only possible while idle, status is {self.machine.status.value}")
        try:
            with self._disk.open() as disk:
                running, other = self._disk.slots(disk)
                flags = disk.flags(other.index)
                if not flags.successful:
                    raise RollbackRefused(
                        f"{other.label} has never booted successfully (successful=0, priority={flags.priority}, "
                        f"tries={flags.tries}); it may hold a partial or failed update, refusing to roll back to it"
                    )
                disk.mark_good(other.index)
        except UpdateEngineError as exc:
            raise RollbackRefused(str(exc)) from exc
        self.history.write_pending_reboot(PendingReboot(PendingKind.ROLLBACK, other.label))
        self._fire(Trigger.ROLLBACK_ARMED)
        message = f"{other.label} will boot next (rollback from {running.label}); reboot to apply"
        log.info("Rollback armed: %s", message)
        return message

    def booted_slot(self) -> str | None:
        """The label of the running USR partition, or None (with the reason in the log) when it cannot be told."""
        try:
            with self._disk.open() as disk:
                running, _ = self._disk.slots(disk)
                return running.label
        except (UpdateEngineError, OSError) as exc:
            log.warning("Cannot tell which USR partition is running: %s", exc)
            return None

    def mark_running_good(self) -> tuple[str, PartitionFlags]:
        """Healthy boot: the running USR partition becomes successful=1, tries=0, highest priority."""
        with self._disk.open() as disk:
            running, _ = self._disk.slots(disk)
            disk.mark_good(running.index)
            return running.label, disk.flags(running.index)

    # --- start-up ------------------------------------------------------------------------------------------------

    def restore_reboot_pending(self) -> bool:
        """After a daemon restart: the reboot marker means an update (or rollback) is armed for the next boot."""
        pending = self.history.pending_reboot()
        if pending is None:
            return False
        installed = self.history.installed_update() if pending.kind is PendingKind.UPDATE else None
        self._fire(RebootPendingFound(
            kind=pending.kind,
            version=installed.version if installed is not None else NO_VERSION,
            size=installed.size if installed is not None else 0,
            last_checked_time=self.history.last_check_time(),
        ))
        log.info("Reboot marker %s found: %s %s is pending, status restored to %s", self.options.reboot_marker,
                 "an" if pending.kind is PendingKind.UPDATE else "a", pending.kind.value,
                 UpdateStatus.UPDATED_NEED_REBOOT.value)
        if installed is not None:
            log.info("Installed and waiting for the reboot: %s, %d bytes", installed.version, installed.size)
        return True

    # --- checks ----------------------------------------------------------------------------------------------------

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
            settings = settings.with_server_flag(self.options.server)
        if self._settings is not None:
            for change in ue_config.diff_settings(self._settings, settings):
                log.info("Configuration changed: %s", change)
        self._settings = settings
        report = ue_config.describe_setup(settings, merged, self._node_facts(), program=f"update-engine {__version__}")
        if self._setup is not None:
            for warning in report.warnings:
                if warning not in self._setup.warnings:
                    log.warning("%s", warning)
        self._setup = report
        return settings

    def log_setup(self) -> None:
        """At start-up: one line saying what will be used, and a warning for each thing missing or defaulted."""
        if self._setup is None:
            self.load_settings()
        assert self._setup is not None
        log.info("%s", self._setup.line)
        for warning in self._setup.warnings:
            log.warning("%s", warning)

    def warnings(self) -> tuple[str, ...]:
        """What the set-up lacks, as of the last reading of the settings."""
        return self._setup.warnings if self._setup is not None else ()

    def _node_facts(self) -> ue_config.NodeFacts:
        root = self.options.config_root
        key = self.options.public_key_path
        try:
            with key.open("rb"):
                key_problem = None
        except OSError as exc:
            key_problem = f"{key}: {exc.strerror or exc}"
        try:
            read_machine_id(root)
            read_boot_id(root)
            identity_problem = None
        except IdentityError as exc:
            identity_problem = exc.message
        return ue_config.NodeFacts(
            update_conf_found=any((root / path).is_file() for path in ue_config.UPDATE_CONF_PATHS),
            public_key=key, public_key_problem=key_problem, identity_problem=identity_problem,
        )

    async def ping(self) -> None:
        """The only request sent while a reboot is pending: a ping, never another download."""
        settings = self.load_settings()
        if settings.updates_disabled:
            return
        params = request_params(self.options, settings, self.history, interactive=False)
        async with OmahaClient(self.options.http) as server:
            try:
                await server.post(settings.server, omaha.build_ping(params))
                log.info("Reboot pending: pinged %s", host_of(settings.server))
            except HttpError as exc:
                log.warning("Ping to %s failed: %s", host_of(settings.server), exc)

    async def check_and_update(self, *, interactive: bool = False) -> CheckOutcome:
        """One check; if an update is offered, download, verify, write and arm it. Never raises."""
        self.check_requested.clear()
        if self.machine.status is not UpdateStatus.CHECKING_FOR_UPDATE:  # AttemptUpdate already moved there
            self._fire(Trigger.CHECK)
        check = UpdateCheck(
            self.options, self.history, self.load_settings, self._fire, self.machine.can,
            interactive=interactive, clock=self._clock,
        )
        return await check.run()

    # --- publishing ------------------------------------------------------------------------------------------------

    def _fire(self, event: Event) -> None:
        before = self.machine.status
        try:
            after = self.machine.fire(event)
        except InvalidTransition:
            log.exception("Refused state change")
            raise
        trigger = trigger_of(event)
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


__all__ = [
    "REBOOT_MARKER_NAME",
    "CheckOutcome",
    "EngineOptions",
    "UpdateAttempter",
    "describe_outcome",
]
