"""The daemon shell's own decisions: what systemd is told, when the running partition is marked good, and how the
check loop reacts to each outcome. The bus parts use a real private dbus-daemon, with the systemd stand-in where
``boot-complete.target`` matters; the disk is a real GPT image."""

from __future__ import annotations

import asyncio
import logging
import random
from pathlib import Path

import pytest
from dbus_fast.aio import MessageBus

from coreos_common.status import StatusSnapshot, UpdateStatus
from sim.disks import cgpt_flags, make_usr_disk
from sim.node import NodeRoot, make_node_root
from sim.ports import free_port
from sim.standins.systemd import BootCompleteUnit
from tests.conftest import require_tool
from update_engine.engine.attempter import REBOOT_MARKER_NAME, EngineOptions, UpdateAttempter
from update_engine.healthy_boot import BOOT_MARKED_NAME, mark_boot_healthy, read_uptime, wait_for_healthy_boot
from update_engine.http_rules import HttpLimits
from update_engine.scheduler import CheckScheduler
from update_engine.service import DaemonTiming, scheduler_loop, status_line

USR_A = 3
WAIT = 10.0  # bound on any single wait; passing runs take a fraction of it
FAST = DaemonTiming(healthy_boot_delay=0.0, boot_complete_poll=0.05)

# --- systemctl status ------------------------------------------------------------------------------------------


def test_systemctl_status_shows_the_update_status_and_download_percentage() -> None:
    lines = [
        status_line(StatusSnapshot()),
        status_line(StatusSnapshot(1, 0.0, UpdateStatus.CHECKING_FOR_UPDATE.value, "0.0.0", 0)),
        status_line(StatusSnapshot(1, 0.426, UpdateStatus.DOWNLOADING.value, "2.0.0", 100)),
        status_line(StatusSnapshot(1, 0.109, UpdateStatus.DOWNLOADING.value, "2.0.0", 100)),
        status_line(StatusSnapshot(1, 1.0, UpdateStatus.VERIFYING.value, "2.0.0", 100)),
    ]
    assert lines == [
        "UPDATE_STATUS_IDLE",
        "UPDATE_STATUS_CHECKING_FOR_UPDATE",
        "UPDATE_STATUS_DOWNLOADING 42%",
        "UPDATE_STATUS_DOWNLOADING 10%",
        "UPDATE_STATUS_VERIFYING",
    ]


# --- healthy boot -------------------------------------------------------------------------------------------------


@pytest.fixture
def client(bus_client: MessageBus) -> MessageBus:
    return bus_client


@pytest.fixture
def node(tmp_path: Path) -> NodeRoot:
    return make_node_root(tmp_path / "root")


def attempter_for(node: NodeRoot, disk: Path, **overrides: object) -> UpdateAttempter:
    values: dict[str, object] = {
        "config_root": node.root, "state_dir": node.state_dir, "run_dir": node.run_dir, "disk": disk,
        "booted": "USR-A", "http": HttpLimits(connect_timeout=5, omaha_total_timeout=10),
    }
    values.update(overrides)
    return UpdateAttempter(EngineOptions(**values))  # type: ignore[arg-type]


async def test_active_boot_complete_counts_at_once(client: MessageBus, systemd: BootCompleteUnit) -> None:
    systemd.state = "active"
    slow = DaemonTiming(healthy_boot_delay=3600.0, boot_complete_poll=3600.0)
    reason = await asyncio.wait_for(wait_for_healthy_boot(client, slow), WAIT)
    assert reason == "boot-complete.target is active"


async def test_without_boot_complete_the_delay_decides(client: MessageBus, caplog: pytest.LogCaptureFixture) -> None:
    timing = DaemonTiming(healthy_boot_delay=0.2, boot_complete_poll=3600.0)
    with caplog.at_level(logging.INFO, logger="update_engine"):
        reason = await asyncio.wait_for(wait_for_healthy_boot(client, timing), WAIT)
    assert reason == "no boot-complete.target; update-engine up for 0 s"
    assert ("boot-complete.target is not part of this boot and the machine's uptime cannot be read; marking the "
            "boot good once update-engine has been up 0 s") in caplog.text


async def test_without_boot_complete_the_machines_uptime_counts(
    client: MessageBus, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, the delay ran from update-engine's start: a daemon restarted on a machine up for an hour waited
    45 s more, and "up for 45 s" was said of the daemon, not of the machine."""
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/uptime").write_text("3600.52 7001.10\n")
    assert read_uptime(tmp_path) == 3600.52
    assert read_uptime(tmp_path / "nowhere") is None
    timing = DaemonTiming(healthy_boot_delay=45.0, boot_complete_poll=3600.0)
    with caplog.at_level(logging.INFO, logger="update_engine"):
        reason = await asyncio.wait_for(wait_for_healthy_boot(client, timing, lambda: read_uptime(tmp_path)), WAIT)
    assert reason == "no boot-complete.target; machine up for 3601 s"
    assert "marking the boot good once the machine has been up 45 s (up 3601 s now)" in caplog.text


async def test_an_error_from_systemd_is_retried_not_taken_for_a_boot_without_boot_complete(
    client: MessageBus, systemd: BootCompleteUnit, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, any error made boot-complete.target "not part of this boot" and the boot was marked good."""
    systemd.error = "org.freedesktop.DBus.Error.AccessDenied"
    timing = DaemonTiming(healthy_boot_delay=0.0, boot_complete_poll=0.01)
    with caplog.at_level(logging.INFO):
        task = asyncio.create_task(wait_for_healthy_boot(client, timing))
        try:
            async with asyncio.timeout(WAIT):
                while caplog.text.count("Cannot ask systemd about boot-complete.target") < 2:
                    assert not task.done(), task.result()
                    await asyncio.sleep(0.01)
            systemd.error = None
            systemd.state = "active"
            reason = await asyncio.wait_for(task, WAIT)
        finally:
            task.cancel()
    assert reason == "boot-complete.target is active"


async def test_healthy_boot_marks_the_running_partition_and_remembers_it(
    tmp_path: Path, node: NodeRoot, client: MessageBus, caplog: pytest.LogCaptureFixture
) -> None:
    require_tool("cgpt")
    disk = make_usr_disk(tmp_path / "disk.img")
    attempter = attempter_for(node, disk)
    with caplog.at_level(logging.INFO, logger="update_engine"):
        await asyncio.wait_for(mark_boot_healthy(attempter, client, FAST), WAIT)
    assert (node.run_dir / BOOT_MARKED_NAME).read_text() == "USR-A\n"
    prio, tries, ok = cgpt_flags(disk, USR_A)
    assert (tries, ok) == (0, 1) and prio > 0
    assert (f"Boot is healthy (no boot-complete.target; update-engine up for 0 s): USR-A marked good "
            f"(priority={prio} tries=0 successful=1)") in caplog.text


async def test_already_marked_during_this_boot_touches_nothing(
    node: NodeRoot, caplog: pytest.LogCaptureFixture
) -> None:
    node.run_dir.mkdir(parents=True, exist_ok=True)
    (node.run_dir / BOOT_MARKED_NAME).write_text("USR-A\n")
    attempter = attempter_for(node, node.root / "no-disk.img")
    bus_never_used: MessageBus = None  # type: ignore[assignment]
    with caplog.at_level(logging.INFO, logger="update_engine"):
        await asyncio.wait_for(mark_boot_healthy(attempter, bus_never_used, FAST), WAIT)
    assert "Running partition already marked good during this boot" in caplog.text
    assert "Could not mark" not in caplog.text


async def test_pending_reboot_is_not_undone_by_marking_the_running_partition(
    tmp_path: Path, node: NodeRoot, client: MessageBus, caplog: pytest.LogCaptureFixture
) -> None:
    require_tool("cgpt")
    disk = make_usr_disk(tmp_path / "disk.img")
    before = cgpt_flags(disk, USR_A), cgpt_flags(disk, USR_A + 1)
    node.run_dir.mkdir(parents=True, exist_ok=True)
    (node.run_dir / REBOOT_MARKER_NAME).write_text("update USR-B\n")
    attempter = attempter_for(node, disk)
    attempter.restore_reboot_pending()
    with caplog.at_level(logging.INFO, logger="update_engine"):
        await asyncio.wait_for(mark_boot_healthy(attempter, client, FAST), WAIT)
    assert "Not marking the running partition good: a reboot into the other partition is pending" in caplog.text
    assert (cgpt_flags(disk, USR_A), cgpt_flags(disk, USR_A + 1)) == before
    # Not remembered as done: the next boot (into the update) still gets marked.
    assert not (node.run_dir / BOOT_MARKED_NAME).exists()


async def test_failure_to_mark_is_logged_and_retried_at_the_next_start(
    node: NodeRoot, client: MessageBus, caplog: pytest.LogCaptureFixture
) -> None:
    missing = node.root / "no-disk.img"
    attempter = attempter_for(node, missing)
    with caplog.at_level(logging.INFO, logger="update_engine"):
        await asyncio.wait_for(mark_boot_healthy(attempter, client, FAST), WAIT)
    line = next(r.getMessage() for r in caplog.records if "Could not mark" in r.getMessage())
    assert line.startswith("Could not mark the running partition good: ")
    assert str(missing) in line and line.endswith("; will try again at the next start")
    assert not (node.run_dir / BOOT_MARKED_NAME).exists()


# --- the check loop -----------------------------------------------------------------------------------------------


class RecordingScheduler(CheckScheduler):
    """The real scheduler, also noting what the loop told it after each attempt; parks the loop afterwards."""

    def __init__(self, first: int) -> None:
        super().__init__(random.Random(0))
        self.first = first
        self.told: list[tuple[int | None, int | None, bool]] = []
        self.told_once = asyncio.Event()

    def first_delay(self) -> int:
        return self.first

    def next_interval(self, poll: int | None, status: int | None, network_error: bool) -> int:
        self.told.append((poll, status, network_error))
        self.told_once.set()
        return 3600


async def run_loop_once(attempter: UpdateAttempter, scheduler: RecordingScheduler) -> None:
    task = asyncio.create_task(scheduler_loop(attempter, scheduler))
    try:
        await asyncio.wait_for(scheduler.told_once.wait(), WAIT)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_attempt_update_wakes_the_loop_long_before_the_timer(
    node: NodeRoot, caplog: pytest.LogCaptureFixture
) -> None:
    node.set_update_conf(SERVER="disabled")
    attempter = attempter_for(node, node.root / "no-disk.img")
    scheduler = RecordingScheduler(first=3600)
    attempter.attempt_update()
    with caplog.at_level(logging.INFO, logger="update_engine"):
        await run_loop_once(attempter, scheduler)
    assert "Updates are disabled" in caplog.text
    assert scheduler.told == [(None, None, False)]
    assert attempter.snapshot().current_operation == "UPDATE_STATUS_IDLE"
    assert not attempter.check_requested.is_set()


async def test_unreachable_server_is_reported_to_the_scheduler_as_a_network_error(node: NodeRoot) -> None:
    node.set_update_conf(SERVER=f"http://127.0.0.1:{free_port()}/v1/update/")
    attempter = attempter_for(node, node.root / "no-disk.img")
    scheduler = RecordingScheduler(first=0)
    await run_loop_once(attempter, scheduler)
    assert scheduler.told == [(None, None, True)]
    assert attempter.snapshot().current_operation == "UPDATE_STATUS_IDLE"


async def test_with_a_reboot_pending_the_loop_only_pings(
    node: NodeRoot, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1/update/"
    node.set_update_conf(SERVER=url)
    node.run_dir.mkdir(parents=True, exist_ok=True)
    (node.run_dir / REBOOT_MARKER_NAME).write_text("update USR-B\n")
    attempter = attempter_for(node, node.root / "no-disk.img")
    attempter.restore_reboot_pending()
    scheduler = RecordingScheduler(first=0)
    with caplog.at_level(logging.INFO, logger="update_engine"):
        await run_loop_once(attempter, scheduler)
    assert f"Ping to {url.split('/')[2]} failed" in caplog.text
    assert "Checking for update" not in caplog.text
    assert scheduler.told == [(None, None, False)]
    assert attempter.snapshot().current_operation == "UPDATE_STATUS_UPDATED_NEED_REBOOT"
