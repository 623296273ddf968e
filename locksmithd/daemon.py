"""locksmithd: once update-engine has installed an update, reboot the node when the strategy allows it.

Theory of operation: check every setting, take the coordinator file, connect to the system bus and ask
update-engine for its status (``READY=1`` is sent after that first answer).  Meanwhile, in the background, the
strategy releases a reboot lock this node may still hold from before its last reboot, once the node is steady
(update-engine idle and, where the system has it, ``boot-complete.target`` active).  When the status is, or
becomes, ``UPDATE_STATUS_UPDATED_NEED_REBOOT``, that background release is cancelled and the reboot path runs:
reboot window → permission (lock) → window re-checked → logged-in users warned and given a grace period →
logind ``Reboot(false)``, retried until logind accepts.  The grace period for logged-in users comes after the
last window check, as in the original: users were told the reboot comes in five minutes, and it does.  The
daemon then waits for the reboot and never exits on its own; if it is still alive after
``--reboot-retry-interval`` it asks again.

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

from dbus_fast import BusType
from dbus_fast.aio import MessageBus

from coreos_common import logs
from coreos_common.notify import SystemdNotifier
from coreos_common.status import StatusSnapshot
from coreos_common.systemd import wait_for_boot_complete
from locksmithd import __version__
from locksmithd.backends import LockBackendError
from locksmithd.clock import Clock, SystemClock, local_timezone, show_delay, show_time
from locksmithd.config import DaemonSettings, SettingsError, build_parser, flags_from_args, load_settings
from locksmithd.coordinator import Coordinator, CoordinatorError, CoordinatorState
from locksmithd.login1 import logged_in_ttys, notify_sessions, reboot_until_accepted, wall_message
from locksmithd.reboot_path import clear_to_reboot
from locksmithd.strategies import STRATEGIES, NullObserver, RebootStrategy, StrategyContext
from locksmithd.updateengine import UpdateEngineWatcher, is_idle, is_need_reboot

log = logging.getLogger("locksmithd")


def build_strategy(settings: DaemonSettings, clock: Clock) -> RebootStrategy | None:
    """The strategy the settings name, None when it leaves nothing to do (``off``); LockBackendError when its
    backend cannot be set up."""
    spec = STRATEGIES[settings.strategy]
    if spec.build is None:
        return None
    return spec.build(StrategyContext(settings, clock, NullObserver()))


class Daemon:
    def __init__(
        self,
        settings: DaemonSettings,
        strategy: RebootStrategy,
        coordinator: Coordinator,
        notifier: SystemdNotifier,
        clock: Clock,
    ) -> None:
        self.settings = settings
        self.strategy = strategy
        self.coordinator = coordinator
        self.notifier = notifier
        self.clock = clock
        self.bus: MessageBus | None = None
        self.watcher: UpdateEngineWatcher | None = None

    def _set_state(self, state: CoordinatorState, status: str) -> None:
        self.coordinator.set_state(state)
        self.notifier.status(status)

    async def run(self) -> int:
        """Connect and follow the flow; returns the exit status (1 when the bus connection is lost)."""
        try:
            bus = await MessageBus(bus_address=self.settings.bus_address, bus_type=BusType.SYSTEM).connect()
        except Exception as exc:  # dbus-fast reports connection failures with several exception types
            where = self.settings.bus_address or "the system bus"
            log.critical("Error connecting to %s: %s", where, exc)
            return 1
        self.bus = bus
        watchdog = asyncio.create_task(self.notifier.run_watchdog())
        flow = asyncio.create_task(self._flow(bus))
        disconnect = asyncio.create_task(bus.wait_for_disconnect())  # type: ignore[no-untyped-call]
        try:
            done, _ = await asyncio.wait({flow, disconnect}, return_when=asyncio.FIRST_COMPLETED)
            if flow in done:
                return flow.result()
            log.critical("Lost the connection to the system bus: exiting so that systemd restarts locksmithd")
            return 1
        finally:
            for task in (flow, disconnect, watchdog):
                if not task.done():
                    task.cancel()
            await asyncio.gather(flow, disconnect, return_exceptions=True)
            if self.watcher is not None:
                self.watcher.close()
            with contextlib.suppress(Exception):
                await self.strategy.close()
            bus.disconnect()

    async def _flow(self, bus: MessageBus) -> int:
        watcher = UpdateEngineWatcher(
            bus, accept_any_sender=self.settings.accept_any_sender, retry_delay=self.settings.backoff.initial
        )
        self.watcher = watcher
        watcher.add_listener(self._on_status)
        status = await watcher.start()
        log.info(
            'locksmithd starting currentOperation="%s" strategy="%s"',
            status.current_operation,
            self.strategy.label,
        )
        self._log_windows()
        self.coordinator.set_state(CoordinatorState.RUNNING)
        self.notifier.ready()
        self._on_status(status)

        steady = asyncio.create_task(self._report_steady())
        await watcher.wait_for(is_need_reboot)
        if not steady.done():
            log.debug("An update needs a reboot: no longer waiting to release an earlier reboot lock")
            steady.cancel()
        results = await asyncio.gather(steady, return_exceptions=True)
        if isinstance(results[0], Exception):
            log.error("Releasing an earlier reboot lock failed: %s", results[0])

        self._set_state(
            CoordinatorState.REBOOT_PLANNED, "Reboot planned: waiting for the window and permission"
        )
        need_reboot = watcher.latest
        version = need_reboot.new_version if need_reboot is not None else ""
        settings = self.settings
        await clear_to_reboot(self.strategy, settings.windows, settings.describe_windows(), self.clock, version)
        await self._warn_logged_in_users()
        await self._reboot()
        self._set_state(CoordinatorState.REBOOTING, "Rebooting")
        retry = self.settings.reboot_retry_interval.total_seconds()
        while True:
            await self.clock.sleep(retry)
            log.error(
                "Tried to reboot but did not! Still running %s later; asking logind again", show_delay(retry)
            )
            await self._reboot()

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

    def _on_status(self, status: StatusSnapshot) -> None:
        if self.coordinator.state is CoordinatorState.RUNNING:
            self.notifier.status(
                f"Waiting for an update to be installed (update-engine: {status.current_operation})"
            )

    async def _reboot(self) -> None:
        assert self.bus is not None
        await reboot_until_accepted(self.bus, backoff=self.settings.backoff, sleep=self.clock.sleep)

    async def _warn_logged_in_users(self) -> None:
        grace = self.settings.session_grace
        lines = logged_in_ttys(self.settings.config_root)
        if not lines:
            return
        reached = notify_sessions(self.settings.config_root, lines, wall_message(self.clock.now(), grace))
        if reached:
            self.notifier.status(f"Rebooting in {show_delay(grace.total_seconds())}: users are logged in")
            log.info(
                "Logins detected on %s, delaying reboot for %s.",
                ", ".join(reached),
                show_delay(grace.total_seconds()),
            )
            await self.clock.sleep(grace.total_seconds())

    async def _report_steady(self) -> None:
        await self._wait_until_steady()
        await self.strategy.report_steady()

    async def _wait_until_steady(self) -> None:
        """The node is back and steady: update-engine idle since start-up, boot-complete.target reached."""
        assert self.watcher is not None
        await self.watcher.wait_for(is_idle)
        await self._wait_for_boot_complete()

    async def _wait_for_boot_complete(self) -> None:
        assert self.bus is not None
        await wait_for_boot_complete(
            self.bus,
            delays=self.settings.backoff.delays(),
            sleep=self.clock.sleep,
            purpose="before releasing the reboot lock",
        )


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
    args = build_parser().parse_args(argv)
    if args.version:
        print(f"locksmithd version {__version__}")
        return 0
    logs.setup("locksmithd", verbose=args.debug)
    environ = dict(os.environ)
    try:
        settings = load_settings(flags_from_args(args), environ, local_timezone())
    except SettingsError as exc:
        log.critical("Invalid configuration: %s", exc)
        return 1
    clock = SystemClock()
    try:
        strategy = build_strategy(settings, clock)
    except LockBackendError as exc:
        log.critical("Invalid configuration for the %s strategy: %s", settings.strategy, exc)
        return 1
    if strategy is None:
        log.info('Reboot strategy is "%s" - locksmithd is exiting.', settings.strategy)
        # Under Type=notify a clean exit before READY=1 counts as a failure and Restart= would loop.
        SystemdNotifier().ready(f"Reboot strategy is {settings.strategy}")
        return 0
    coordinator = Coordinator(settings.config_root, strategy.label)
    try:
        coordinator.acquire()
    except CoordinatorError as exc:
        log.critical("%s", exc)
        return 1
    try:
        daemon = Daemon(settings, strategy, coordinator, SystemdNotifier(), clock)
        return asyncio.run(_run_daemon(daemon))
    except Exception:
        log.exception("locksmithd failed unexpectedly")
        return 1
    finally:
        coordinator.release()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
