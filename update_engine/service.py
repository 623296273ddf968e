"""The long-running update-engine: D-Bus service, check timer, healthy-boot marking, metrics, systemd notification.

One asyncio loop, no polling while idle: the loop sleeps until the next scheduled check, an ``AttemptUpdate`` call
or a signal. A check in flight runs as a task; SIGTERM cancels it between GPT writes (those are synchronous and
atomic per call), so the passive partition is left disarmed and the running one untouched. Metrics are served on a
Unix socket (and written to a textfile when asked) from the same loop; an output that cannot be set up is logged
and left out, never a reason to stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dbus_fast import BusType
from dbus_fast.aio import MessageBus

from coreos_common.backoff import BackoffPolicy
from coreos_common.notify import SystemdNotifier
from coreos_common.status import StatusSnapshot, UpdateStatus
from coreos_common.updateconf import SettingsFileError
from update_engine.config import startup_refusal
from update_engine.dbus_service import NameNotAcquired, connect_bus, serve
from update_engine.engine.attempter import CheckOutcome, EngineOptions, UpdateAttempter
from update_engine.healthy_boot import mark_boot_healthy
from update_engine.metrics import EngineMetrics, exporter
from update_engine.scheduler import CheckScheduler, ScheduleConfig

log = logging.getLogger("update_engine")


@dataclass(frozen=True)
class DaemonTiming:
    """Durations of the daemon shell (seconds); tests shrink them."""

    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    healthy_boot_delay: float = 45.0
    boot_complete_poll: float = 5.0
    healthy_hook_timeout: float = 300.0
    healthy_hook_retry: BackoffPolicy = field(default_factory=lambda: BackoffPolicy(10.0, 300.0))


@dataclass(frozen=True)
class DaemonOutputs:
    """Where the daemon publishes besides D-Bus, and the operator's healthy-boot hooks; None: not at all."""

    metrics_socket: Path | None = None
    metrics_textfile: Path | None = None
    healthy_boot_dir: Path | None = None


def status_line(snapshot: StatusSnapshot) -> str:
    """What ``systemctl status`` shows: the status string, with the percentage while downloading."""
    text = snapshot.current_operation
    if snapshot.current_operation == UpdateStatus.DOWNLOADING.value:
        text += f" {int(snapshot.progress * 100)}%"
    return text


async def scheduler_loop(
    attempter: UpdateAttempter, scheduler: CheckScheduler,
    on_outcome: Callable[[CheckOutcome], None] = lambda outcome: None,
) -> None:
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
            on_outcome(outcome)
        elif status is UpdateStatus.UPDATED_NEED_REBOOT:
            attempter.check_requested.clear()
            await attempter.ping()
        if outcome is None:
            delay = scheduler.next_interval(None, None, False)
        else:
            delay = scheduler.next_interval(outcome.poll_interval, outcome.http_status, outcome.network_error)


async def run_daemon(
    options: EngineOptions, *, bus_address: str | None, timing: DaemonTiming | None = None,
    outputs: DaemonOutputs | None = None,
) -> int:
    timing = timing or DaemonTiming()
    outputs = outputs or DaemonOutputs()
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
    # Metrics before the bus name: whoever sees update-engine on the bus can scrape it.
    metrics = EngineMetrics(attempter, booted_slot=attempter.booted_slot())
    published = exporter(metrics, socket_path=outputs.metrics_socket, textfile=outputs.metrics_textfile)
    await published.start()
    attempter.add_status_listener(lambda snapshot: published.changed())
    try:
        bus = await connect_bus(bus_address) if bus_address else await MessageBus(bus_type=BusType.SYSTEM).connect()
    except Exception as exc:
        log.error("Cannot connect to the D-Bus %s: %s", bus_address or "system bus", exc)
        await published.close()
        return 1
    try:
        service = await serve(bus, attempter)
    except NameNotAcquired as exc:
        log.error("%s", exc)
        bus.disconnect()
        await published.close()
        return 1

    def observe(outcome: CheckOutcome) -> None:
        metrics.observe(outcome)
        published.changed()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    notifier.ready(status_line(attempter.snapshot()))
    log.info("update-engine started: status %s", attempter.machine.status.value)
    tasks = [
        loop.create_task(notifier.run_watchdog(), name="watchdog"),
        loop.create_task(mark_boot_healthy(attempter, bus, timing, hook_dir=outputs.healthy_boot_dir),
                         name="healthy-boot"),
        loop.create_task(scheduler_loop(attempter, CheckScheduler(random.Random(), timing.schedule), observe),
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
        await published.close()
        bus.disconnect()
    return 0
