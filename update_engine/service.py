"""The long-running update-engine: D-Bus service, check timer, healthy-boot marking, systemd notification.

One asyncio loop, no polling while idle: the loop sleeps until the next scheduled check, an ``AttemptUpdate`` call
or a signal. A check in flight runs as a task; SIGTERM cancels it between GPT writes (those are synchronous and
atomic per call), so the passive partition is left disarmed and the running one untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dbus_fast import BusType
from dbus_fast.aio import MessageBus

from coreos_common.notify import SystemdNotifier
from coreos_common.status import StatusSnapshot, UpdateStatus
from coreos_common.systemd import BOOT_COMPLETE_TARGET, BootComplete, wait_for_boot_complete
from coreos_common.updateconf import SettingsFileError
from update_engine.config import startup_refusal
from update_engine.dbus_service import NameNotAcquired, connect_bus, serve
from update_engine.engine.attempter import CheckOutcome, EngineOptions, UpdateAttempter
from update_engine.scheduler import CheckScheduler, ScheduleConfig

log = logging.getLogger("update_engine")

BOOT_MARKED_NAME = "update_engine_boot_marked_good"
BOOT_COMPLETE = BOOT_COMPLETE_TARGET


@dataclass(frozen=True)
class DaemonTiming:
    """Durations of the daemon shell (seconds); tests shrink them."""

    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    healthy_boot_delay: float = 45.0
    boot_complete_poll: float = 5.0


def status_line(snapshot: StatusSnapshot) -> str:
    """What ``systemctl status`` shows: the status string, with the percentage while downloading."""
    text = snapshot.current_operation
    if snapshot.current_operation == UpdateStatus.DOWNLOADING.value:
        text += f" {int(snapshot.progress * 100)}%"
    return text


def read_uptime(root: Path) -> float | None:
    """The machine's uptime in seconds, from ``proc/uptime`` under ``root``; None when it cannot be read."""
    try:
        return float((root / "proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


async def wait_for_healthy_boot(
    bus: MessageBus, timing: DaemonTiming, uptime: Callable[[], float | None] = lambda: None
) -> str:
    """Wait until the boot counts as healthy; returns why it does (for the log line).

    Without ``boot-complete.target`` in this boot, the machine must have been up ``healthy_boot_delay`` seconds
    (``uptime``); when its uptime cannot be read, update-engine must have been up that long instead.
    """
    result = await wait_for_boot_complete(
        bus,
        delays=itertools.repeat(timing.boot_complete_poll),
        purpose="before marking the running partition good",
    )
    if result is BootComplete.ACTIVE:
        return f"{BOOT_COMPLETE} is active"
    delay = timing.healthy_boot_delay
    up = uptime()
    if up is None:
        log.info("%s is not part of this boot and the machine's uptime cannot be read; marking the boot good "
                 "once update-engine has been up %.0f s", BOOT_COMPLETE, delay)
        await asyncio.sleep(delay)
        return f"no {BOOT_COMPLETE}; update-engine up for {delay:.0f} s"
    log.info("%s is not part of this boot; marking the boot good once the machine has been up %.0f s (up %.0f s "
             "now)", BOOT_COMPLETE, delay, up)
    await asyncio.sleep(max(0.0, delay - up))
    return f"no {BOOT_COMPLETE}; machine up for {max(up, delay):.0f} s"


async def mark_boot_healthy(attempter: UpdateAttempter, bus: MessageBus, timing: DaemonTiming) -> None:
    """Once per boot, after a healthy boot, make the running USR partition successful=1 tries=0 and top priority.

    Healthy means ``boot-complete.target`` is active when this boot has that unit (loaded and being started),
    else that the machine has been up for ``healthy_boot_delay`` seconds. Skipped while a reboot is pending:
    prioritising the running partition would undo the armed update.
    """
    marker = attempter.options.run_dir / BOOT_MARKED_NAME
    if marker.exists():
        log.info("Running partition already marked good during this boot (%s)", marker)
        return
    reason = await wait_for_healthy_boot(bus, timing, lambda: read_uptime(attempter.options.config_root))
    if attempter.machine.status is UpdateStatus.UPDATED_NEED_REBOOT:
        log.info("Not marking the running partition good: a reboot into the other partition is pending")
        return
    try:
        label, flags = attempter.mark_running_good()
    except Exception as exc:
        log.error("Could not mark the running partition good: %s; will try again at the next start", exc)
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"{label}\n")
    log.info("Boot is healthy (%s): %s marked good (priority=%d tries=%d successful=%d)", reason, label,
             flags.priority, flags.tries, int(flags.successful))


async def scheduler_loop(attempter: UpdateAttempter, scheduler: CheckScheduler) -> None:
    """Sleep until the next check (or an AttemptUpdate), run it, ask the scheduler for the next delay."""
    delay: float = scheduler.first_delay()
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(attempter.check_requested.wait(), timeout=delay)
        outcome: CheckOutcome | None = None
        interactive = attempter.take_interactive_request()
        status = attempter.machine.status
        if status in (UpdateStatus.IDLE, UpdateStatus.CHECKING_FOR_UPDATE):
            outcome = await attempter.check_and_update(interactive=interactive)
        elif status is UpdateStatus.UPDATED_NEED_REBOOT:
            attempter.check_requested.clear()
            await attempter.ping()
        if outcome is None:
            delay = scheduler.next_interval(None, None, False)
        else:
            delay = scheduler.next_interval(outcome.poll_interval, outcome.http_status, outcome.network_error)


async def run_daemon(
    options: EngineOptions, *, bus_address: str | None, timing: DaemonTiming | None = None
) -> int:
    timing = timing or DaemonTiming()
    notifier = SystemdNotifier()
    attempter = UpdateAttempter(options)
    try:
        attempter.load_settings()
    except SettingsFileError as exc:
        log.critical("%s", startup_refusal(exc))
        return 1
    attempter.log_setup()
    attempter.add_status_listener(lambda snapshot: notifier.status(status_line(snapshot)))
    attempter.restore_reboot_pending()
    try:
        bus = await connect_bus(bus_address) if bus_address else await MessageBus(bus_type=BusType.SYSTEM).connect()
    except Exception as exc:
        log.error("Cannot connect to the D-Bus %s: %s", bus_address or "system bus", exc)
        return 1
    try:
        service = await serve(bus, attempter)
    except NameNotAcquired as exc:
        log.error("%s", exc)
        bus.disconnect()
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    notifier.ready(status_line(attempter.snapshot()))
    log.info("update-engine started: status %s", attempter.machine.status.value)
    tasks = [
        loop.create_task(notifier.run_watchdog(), name="watchdog"),
        loop.create_task(mark_boot_healthy(attempter, bus, timing), name="healthy-boot"),
        loop.create_task(scheduler_loop(attempter, CheckScheduler(random.Random(), timing.schedule)),
                         name="scheduler"),
    ]
    stopper = loop.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait([stopper, tasks[2]], return_when=asyncio.FIRST_COMPLETED)
        if tasks[2] in done and tasks[2].exception() is not None:
            log.error("Scheduler stopped: %r", tasks[2].exception())
            return 1
    finally:
        log.info("Stopping: status %s", attempter.machine.status.value)
        notifier.stopping()
        for t in [*tasks, stopper]:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        with contextlib.suppress(Exception):
            await service.close()
        bus.disconnect()
    return 0
