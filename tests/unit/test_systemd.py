"""systemd's unit state and the wait for boot-complete.target, shared by both daemons: one error rule, asked of
a real private dbus-daemon with the systemd stand-in (PID 1 cannot run here)."""

from __future__ import annotations

import asyncio
import itertools
import logging

import pytest
from dbus_fast.aio import MessageBus

from coreos_common.dbus import DBusCallError
from coreos_common.systemd import (
    BOOT_COMPLETE_TARGET,
    BootComplete,
    SystemdUnavailable,
    unit_state,
    wait_for_boot_complete,
)
from sim.standins.systemd import BootCompleteUnit

WAIT = 10.0  # bound on any single wait; passing runs take a fraction of it
ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"


async def test_state_and_queued_job_are_read_from_systemd(bus_client: MessageBus, systemd: BootCompleteUnit) -> None:
    state = await unit_state(bus_client, BOOT_COMPLETE_TARGET)
    assert state is not None and (state.active_state, state.job_pending) == ("inactive", True)
    systemd.state = "active"
    state = await unit_state(bus_client, BOOT_COMPLETE_TARGET)
    assert state is not None and (state.active_state, state.job_pending) == ("active", False)


async def test_a_unit_systemd_does_not_have_is_none(bus_client: MessageBus, systemd: BootCompleteUnit) -> None:
    assert await unit_state(bus_client, "no-such.target") is None


async def test_no_systemd_on_the_bus_is_its_own_error_not_a_missing_unit(bus_client: MessageBus) -> None:
    with pytest.raises(SystemdUnavailable, match="ServiceUnknown"):
        await unit_state(bus_client, BOOT_COMPLETE_TARGET)


async def test_any_other_error_is_raised_not_turned_into_a_state(
    bus_client: MessageBus, systemd: BootCompleteUnit
) -> None:
    systemd.error = ACCESS_DENIED
    with pytest.raises(DBusCallError) as info:
        await unit_state(bus_client, BOOT_COMPLETE_TARGET)
    assert info.value.name == ACCESS_DENIED


async def test_wait_returns_at_once_when_the_target_is_active(
    bus_client: MessageBus, systemd: BootCompleteUnit
) -> None:
    systemd.state = "active"
    result = await asyncio.wait_for(
        wait_for_boot_complete(bus_client, delays=itertools.repeat(3600.0), purpose="p"), WAIT
    )
    assert result is BootComplete.ACTIVE


async def test_wait_returns_at_once_when_nothing_will_start_the_target(
    bus_client: MessageBus, systemd: BootCompleteUnit
) -> None:
    systemd.state, systemd.queued = "failed", False
    result = await asyncio.wait_for(
        wait_for_boot_complete(bus_client, delays=itertools.repeat(3600.0), purpose="p"), WAIT
    )
    assert result is BootComplete.NOT_STARTING


async def test_wait_without_systemd_or_without_the_target(bus_client: MessageBus) -> None:
    result = await asyncio.wait_for(
        wait_for_boot_complete(bus_client, delays=itertools.repeat(3600.0), purpose="p"), WAIT
    )
    assert result is BootComplete.NO_SYSTEMD


async def test_wait_follows_the_target_until_it_is_active_and_retries_errors(
    bus_client: MessageBus, systemd: BootCompleteUnit, caplog: pytest.LogCaptureFixture
) -> None:
    asked: list[float] = []

    async def sleep(delay: float) -> None:
        asked.append(delay)
        if len(asked) == 2:
            systemd.error = ACCESS_DENIED
        if len(asked) == 4:
            systemd.error = None
            systemd.state = "active"
        await asyncio.sleep(0)

    with caplog.at_level(logging.INFO):
        result = await asyncio.wait_for(
            wait_for_boot_complete(
                bus_client, delays=iter([1.0, 2.0, 4.0, 8.0, 16.0]), sleep=sleep, purpose="before testing"
            ),
            WAIT,
        )
    assert result is BootComplete.ACTIVE
    assert asked == [1.0, 2.0, 4.0, 8.0]
    assert caplog.text.count("Waiting for boot-complete.target (now inactive) before testing") == 1
    assert caplog.text.count(f"Cannot ask systemd about boot-complete.target: {ACCESS_DENIED}") == 2
