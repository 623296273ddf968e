"""locksmithd: once update-engine has installed an update, reboot the node when the strategy allows it.

Theory of operation: check every setting, take the coordinator file, connect to the system bus and ask
update-engine for its status (``READY=1`` is sent after that first answer). From there the reboot path's state
machine (``locksmithd.reboot_path``) decides every step and this module performs it: wait until the node is
steady and release the lock it may hold from before its reboot (after the post-reboot hooks), wait for an
update, wait for the window, take the lock, check the window again, warn logged-in users, run the pre-reboot
hooks, ask logind to reboot. Each new phase is published at once: the STATUS= line of ``systemctl status``,
``STATE=`` in ``/run/update-engine/coordinator.conf`` (the original's values) and ``/run/locksmithd/state.json``
(what ``locksmithctl status --json`` shows for this node). The daemon never exits on its own after asking for
the reboot.

Whether this node holds a slot is read from the lock service at start-up, in the background (a slot taken
before the reboot is held until the release after it), and then follows what the strategy takes and gives
back; a take or release reported before that read answers wins over it.

SIGTERM/SIGINT end the daemon with status 0 at any point, leaving the lock as it is: a node stopped half-way
through a reboot keeps its slot, and the next start releases it once the node is steady.

Settings only used by tests and impatient operators: ``--backoff-initial``/``--backoff-max`` (retry delays,
default 10s and 5m0s), ``--session-grace`` (default 5m0s) and ``--reboot-retry-interval`` (default 1h0m0s),
each also as ``LOCKSMITHD_<FLAG>`` (e.g. ``LOCKSMITHD_BACKOFF_INITIAL=200ms``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from datetime import timedelta

from dbus_fast import BusType
from dbus_fast.aio import MessageBus

from coreos_common import logs
from coreos_common.cli import EXIT_BROKEN_PIPE, discard_stdout
from coreos_common.dbus import DBusCallError
from coreos_common.hooks import run_hooks
from coreos_common.metrics import MetricsExporter
from coreos_common.notify import SystemdNotifier
from coreos_common.status import StatusSnapshot
from coreos_common.systemd import wait_for_boot_complete
from locksmithd import __version__
from locksmithd.backends import LockBackendError, LockProgress
from locksmithd.clock import Clock, SystemClock, local_timezone, show_delay, show_time, sleep_until
from locksmithd.config import DaemonSettings, SettingsError, build_parser, flags_from_args, load_settings
from locksmithd.coordinator import Coordinator, CoordinatorError
from locksmithd.login1 import logged_in_ttys, notify_sessions, reboot_problem, request_reboot, wall_message
from locksmithd.metrics import DaemonMetrics
from locksmithd.reboot_path import (
    Action,
    AskLogind,
    AwaitNeedReboot,
    Event,
    HookKind,
    HooksDone,
    LockReleased,
    LockTaken,
    LogindProbed,
    NeedReboot,
    Phase,
    PhaseName,
    ProbeLogind,
    RebootAccepted,
    RebootPath,
    RebootRefused,
    ReleaseLock,
    RunHooks,
    SleepUntil,
    Started,
    Steady,
    TakeLock,
    TimeReached,
    UsersWarned,
    WaitUntilSteady,
    WarnUsers,
    phase_document,
)
from locksmithd.state import remove_state, state_path, write_state
from locksmithd.strategies import STRATEGIES, NullObserver, RebootStrategy, StrategyContext, StrategyObserver
from locksmithd.updateengine import UpdateEngineWatcher, is_idle, is_need_reboot

log = logging.getLogger("locksmithd")


def build_strategy(
    settings: DaemonSettings, clock: Clock, observer: StrategyObserver | None = None
) -> RebootStrategy | None:
    """The strategy the settings name, None when it leaves nothing to do (``off``); LockBackendError when its
    backend cannot be set up."""
    spec = STRATEGIES[settings.strategy]
    if spec.build is None:
        return None
    return spec.build(StrategyContext(settings, clock, observer or NullObserver()))


class Daemon:
    """The shell around the reboot path: performs its actions, feeds back events, publishes its phases.

    It is also the strategy's observer: where the lock request stands goes into the current phase.
    """

    def __init__(
        self, settings: DaemonSettings, coordinator: Coordinator, notifier: SystemdNotifier, clock: Clock
    ) -> None:
        self.settings = settings
        self.coordinator = coordinator
        self.notifier = notifier
        self.clock = clock
        strategy = build_strategy(settings, clock, self)
        assert strategy is not None, "the daemon runs only for strategies that do something"
        self.strategy = strategy
        self.path = RebootPath(settings.path, clock.now())
        self.state_file = state_path(settings.config_root)
        self.bus: MessageBus | None = None
        self.watcher: UpdateEngineWatcher | None = None
        self._published: Phase | None = None
        self._state_file_failing = False
        self._operation = ""
        self._lock_reports = 0  # lock_held calls so far: a start-up read older than one of them is stale
        self.metrics = DaemonMetrics(
            strategy=strategy.label, group=strategy.group, windows=settings.windows, now=clock.now,
            ignored_signals=lambda: self.watcher.ignored_signals if self.watcher is not None else {},
        )
        self.exporter = MetricsExporter(
            self.metrics.registry, socket_path=settings.metrics_socket, textfile=settings.metrics_textfile
        )

    # -- StrategyObserver ------------------------------------------------------------------------------------

    def lock_progress(self, progress: LockProgress) -> None:
        if self.path.lock_progress(progress):
            self._publish()

    def lock_held(self, held: bool) -> None:
        self._lock_reports += 1
        self.metrics.note_lock_held(held, self.clock.now())
        self.exporter.changed()

    def backend_failed(self, operation: str, error: LockBackendError) -> None:
        self.metrics.note_backend_error(operation)
        self.exporter.changed()

    # -- running ---------------------------------------------------------------------------------------------

    async def run(self) -> int:
        """Connect and follow the reboot path; returns the exit status (1 when the bus connection is lost)."""
        try:
            bus = await MessageBus(bus_address=self.settings.bus_address, bus_type=BusType.SYSTEM).connect()
        except Exception as exc:  # dbus-fast reports connection failures with several exception types
            where = self.settings.bus_address or "the system bus"
            log.critical("Error connecting to %s: %s", where, exc)
            return 1
        self.bus = bus
        await self.exporter.start()  # an output that cannot be set up is logged and left out
        watchdog = asyncio.create_task(self.notifier.run_watchdog())
        slot = asyncio.create_task(self._read_slot())
        flow = asyncio.create_task(self._flow(bus))
        disconnect = asyncio.create_task(bus.wait_for_disconnect())  # type: ignore[no-untyped-call]
        try:
            done, _ = await asyncio.wait({flow, disconnect}, return_when=asyncio.FIRST_COMPLETED)
            if flow in done:
                return flow.result()
            log.critical("Lost the connection to the system bus: exiting so that systemd restarts locksmithd")
            return 1
        finally:
            for task in (flow, disconnect, watchdog, slot):
                if not task.done():
                    task.cancel()
            await asyncio.gather(flow, disconnect, slot, return_exceptions=True)
            if self.watcher is not None:
                self.watcher.close()
            with contextlib.suppress(Exception):
                await self.strategy.close()
            await self.exporter.close()
            remove_state(self.state_file)
            bus.disconnect()

    async def _read_slot(self) -> None:
        """Set ``locksmithd_lock_held`` from the lock service: a node that took its slot before rebooting holds
        it until its release after the boot (post-reboot hooks, a failing release), and must not show 0 then.

        Retried with the backoff policy while the service fails, until it answers or the strategy reports a
        take or release (which then says more than this read could)."""
        reports = self._lock_reports
        for delay in self.settings.backoff.delays():
            try:
                slot = await self.strategy.holding()
            except LockBackendError as exc:
                if self._lock_reports != reports:
                    return
                log.warning("Cannot read whether this machine holds a reboot lock slot: %s. Retrying in %s.", exc,
                            show_delay(delay))  # fmt: skip
                await self.clock.sleep(delay)
                if self._lock_reports != reports:
                    return
                continue
            if slot is None or self._lock_reports != reports:
                return
            if slot.held:
                log.info("This machine (%s) holds a slot of the reboot lock, taken before this start",
                         self.settings.machine_id)  # fmt: skip
            self.metrics.note_slot_read(slot.held, slot.since)
            self.exporter.changed()
            return

    async def _flow(self, bus: MessageBus) -> int:
        watcher = UpdateEngineWatcher(
            bus, accept_any_sender=self.settings.accept_any_sender, retry_delay=self.settings.backoff.initial
        )
        self.watcher = watcher
        watcher.add_listener(self._on_status)
        self._publish()
        status = await watcher.start()
        log.info(
            'locksmithd starting currentOperation="%s" strategy="%s"',
            status.current_operation,
            self.strategy.label,
        )
        self._log_windows()
        action = self._handle(Started(is_need_reboot(status), status.new_version))
        self.notifier.ready()
        while True:
            action = self._handle(await self._perform(action))

    def _handle(self, event: Event) -> Action:
        action = self.path.handle(event, self.clock.now())
        self._publish()
        for level, text in self.path.take_notes():
            log.log(level, "%s", text)
        return action

    async def _perform(self, action: Action) -> Event:
        """Do ``action``; an interruptible one ends early (cancelled) when an update needs a reboot."""
        if not action.interruptible:
            return await self._do(action)
        assert self.watcher is not None
        work = asyncio.ensure_future(self._do(action))
        update = asyncio.ensure_future(self.watcher.wait_for(is_need_reboot))
        try:
            done, _ = await asyncio.wait({work, update}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (work, update):
                if not task.done():
                    task.cancel()
            await asyncio.gather(work, update, return_exceptions=True)
        if work in done and not work.cancelled():
            return work.result()
        status = update.result()
        log.info("An update to %s needs a reboot: %s no longer", status.new_version,
                 self.path.phase.describe().lower())
        return NeedReboot(status.new_version)

    async def _do(self, action: Action) -> Event:
        assert self.bus is not None and self.watcher is not None
        match action:
            case AwaitNeedReboot():
                return NeedReboot((await self.watcher.wait_for(is_need_reboot)).new_version)
            case WaitUntilSteady():
                await self.watcher.wait_for(is_idle)
                await wait_for_boot_complete(
                    self.bus, delays=self.settings.backoff.delays(), sleep=self.clock.sleep,
                    purpose="before releasing the reboot lock",
                )
                return Steady()
            case RunHooks(kind=kind, reason=reason):
                return await self._run_hooks(kind, reason)
            case ReleaseLock(after_boot=after_boot):
                await (self.strategy.report_steady() if after_boot else self.strategy.abandon())
                return LockReleased()
            case SleepUntil(when=when):
                await sleep_until(self.clock, when)
                return TimeReached()
            case TakeLock(version=version):
                await self.strategy.can_finalize(version)
                return LockTaken()
            case WarnUsers(grace=grace):
                return UsersWarned(self._warn_logged_in_users(grace))
            case AskLogind():
                try:
                    await request_reboot(self.bus)
                except (DBusCallError, OSError, EOFError) as exc:
                    self.metrics.note_reboot_request(accepted=False)
                    return RebootRefused(str(exc))
                self.metrics.note_reboot_request(accepted=True)
                return RebootAccepted()
            case ProbeLogind():
                return LogindProbed(await reboot_problem(self.bus))
        raise AssertionError(f"no way to perform {action}")

    async def _run_hooks(self, kind: HookKind, reason: str) -> HooksDone:
        settings = self.settings
        directory = settings.pre_reboot_hooks if kind is HookKind.PRE_REBOOT else settings.post_reboot_hooks
        context = {
            "LOCKSMITHD_HOOK": kind.value,
            "LOCKSMITHD_HOOK_REASON": reason,
            "LOCKSMITHD_HOOK_STRATEGY": self.strategy.label,
            "LOCKSMITHD_HOOK_GROUP": self.strategy.group,
            "LOCKSMITHD_HOOK_NEW_VERSION": self.path.version,
            "LOCKSMITHD_HOOK_MACHINE_ID": settings.machine_id,
        }
        result = await run_hooks(directory, context=context, timeout=settings.hook_timeout.total_seconds())
        log.log(logging.INFO if result.passed else logging.ERROR, "%s hooks in %s: %s", kind.value, directory,
                result.describe())
        self.metrics.note_hooks(kind.value, result.passed)
        return HooksDone(result.passed, result.describe())

    def _warn_logged_in_users(self, grace: timedelta) -> tuple[str, ...]:
        lines = logged_in_ttys(self.settings.config_root)
        if not lines:
            return ()
        reached = notify_sessions(self.settings.config_root, lines, wall_message(self.clock.now(), grace))
        if reached:
            log.info("Logins detected on %s, delaying reboot for %s.", ", ".join(reached), show_delay(grace))
        return tuple(reached)

    # -- publishing ------------------------------------------------------------------------------------------

    def _publish(self) -> None:
        """Publish the current phase where operators look (only what changed)."""
        phase = self.path.phase
        if phase is self._published:
            return
        previous, self._published = self._published, phase
        if previous is not None and previous.name is not phase.name:
            log.info("%s", phase.describe())
        if phase.coordinator is not self.coordinator.state:
            self.coordinator.set_state(phase.coordinator)
        self.notifier.status(self._status_line())
        self._write_state_file()
        latest = self.watcher.latest if self.watcher is not None else None
        self.metrics.note_phase(phase, latest is not None and is_need_reboot(latest))
        self.exporter.changed()

    def _status_line(self) -> str:
        line = self.path.phase.describe()
        latest = self.watcher.latest if self.watcher is not None else None
        if latest is not None and self.path.phase.name in (PhaseName.IDLE, PhaseName.AFTER_BOOT):
            line += f" (update-engine: {latest.current_operation})"
        return line

    def _write_state_file(self) -> None:
        document = phase_document(self.path.phase)
        latest = self.watcher.latest if self.watcher is not None else None
        document.update(
            strategy=self.strategy.label,
            group=self.strategy.group,
            machine_id=self.settings.machine_id,
            version=self.path.version or None,
            update_engine=latest.current_operation if latest is not None else None,
        )
        try:
            write_state(self.state_file, document)
        except OSError as exc:
            if not self._state_file_failing:  # once per outage
                log.error("Cannot write the state file %s: %s; locksmithctl status cannot show this node's state",
                          self.state_file, exc.strerror or exc)
            self._state_file_failing = True
        else:
            self._state_file_failing = False

    def _on_status(self, status: StatusSnapshot) -> None:
        # The status line shows update-engine's operation in some phases; progress alone changes nothing here.
        if status.current_operation == self._operation:
            return
        self._operation = status.current_operation
        self._published = None
        self._publish()

    def _log_windows(self) -> None:
        """The reboot windows and when the next one opens, once at start-up."""
        windows = self.settings.windows
        if windows is None:
            log.info("No configured reboot window: rebooting at any time")
            return
        now = self.clock.now()
        current = windows.current(now)
        if current is not None:
            log.info("%s; a window is open now, until %s", self.settings.describe_windows(), show_time(current[1]))
            return
        opening = windows.next_opening(now)
        assert opening is not None
        log.info("%s; the next one opens at %s", self.settings.describe_windows(), show_time(opening[0]))


async def _run_daemon(daemon: Daemon) -> int:
    """Run until the daemon returns or SIGTERM/SIGINT arrives (exit 0, lock state left as it is)."""
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    received: list[str] = []

    def on_signal(name: str) -> None:
        received.append(name)
        main_task.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    try:
        return await daemon.run()
    except asyncio.CancelledError:
        if not received:
            raise
        log.info("Received %s - locksmithd is exiting.", received[0])
        return 0
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.version:
            print(f"locksmithd version {__version__}", flush=True)
            return 0
    except BrokenPipeError:  # ``locksmithd --help | head -0``: the reader went away
        discard_stdout()
        return EXIT_BROKEN_PIPE
    logs.setup("locksmithd", verbose=args.debug)
    environ = dict(os.environ)
    try:
        settings = load_settings(flags_from_args(args), environ, local_timezone())
    except SettingsError as exc:
        log.critical("Invalid configuration: %s", exc)
        return 1
    if not STRATEGIES[settings.strategy].runs:
        log.info('Reboot strategy is "%s" - locksmithd is exiting.', settings.strategy)
        # Under Type=notify a clean exit before READY=1 counts as a failure and Restart= would loop.
        SystemdNotifier().ready(f"Reboot strategy is {settings.strategy}")
        return 0
    coordinator = Coordinator(settings.config_root, settings.strategy)
    try:
        coordinator.acquire()
    except CoordinatorError as exc:
        log.critical("%s", exc)
        return 1
    try:
        try:
            daemon = Daemon(settings, coordinator, SystemdNotifier(), SystemClock())
        except LockBackendError as exc:
            log.critical("Invalid configuration for the %s strategy: %s", settings.strategy, exc)
            return 1
        return asyncio.run(_run_daemon(daemon))
    except Exception:
        log.exception("locksmithd failed unexpectedly")
        return 1
    finally:
        coordinator.release()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
