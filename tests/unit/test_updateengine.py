"""locksmithd's view of update-engine: the status line it logs, and what GetStatus answers it refuses and why.

The watcher runs against a real private dbus-daemon with the update-engine stand-in, or with a deliberately broken
``com.coreos.update1`` service defined here. Forged and malformed signals, and update-engine appearing late or
restarting, are covered end to end in tests/integration/test_locksmithd.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from dbus_fast import BusType, DBusError, Message, RequestNameReply
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface, method

from coreos_common.status import BUS_NAME, INTERFACE, OBJECT_PATH, StatusSnapshot, UpdateStatus
from locksmithd.updateengine import (
    UpdateEngineUnavailable,
    UpdateEngineWatcher,
    describe,
    is_idle,
    is_need_reboot,
)
from sim.bus import PrivateBus, start_private_bus
from sim.standins.update_engine import (
    UpdateEngineStandIn,
    emit_from_other_connection,
    policy_files,
    status_of,
)

WAIT = 10.0  # bound on any single wait; passing runs take a fraction of it
IDLE = status_of(UpdateStatus.IDLE)
DOWNLOADING = status_of(UpdateStatus.DOWNLOADING, "3975.2.1", 123456)
NEED_REBOOT = status_of(UpdateStatus.UPDATED_NEED_REBOOT, "3975.2.1", 123456)

# --- pure -----------------------------------------------------------------------------------------------------------


def test_status_line_is_the_originals() -> None:
    snap = StatusSnapshot(1700000000, 0.5, "UPDATE_STATUS_DOWNLOADING", "3815.2.0", 461373440)
    assert describe(snap) == (
        'LastCheckedTime=1700000000 Progress=0.5 CurrentOperation="UPDATE_STATUS_DOWNLOADING" '
        "NewVersion=3815.2.0 NewSize=461373440"
    )


@pytest.mark.parametrize("status", list(UpdateStatus))
def test_only_need_reboot_triggers_a_reboot_and_only_idle_counts_as_idle(status: UpdateStatus) -> None:
    snap = status_of(status)
    assert is_need_reboot(snap) is (status is UpdateStatus.UPDATED_NEED_REBOOT)
    assert is_idle(snap) is (status is UpdateStatus.IDLE)


def test_an_unknown_operation_string_is_neither() -> None:
    snap = StatusSnapshot(current_operation="UPDATE_STATUS_REBOOTING")
    assert not is_need_reboot(snap) and not is_idle(snap)


# --- on a private bus -------------------------------------------------------------------------------------------


@pytest.fixture
def private_bus(tmp_path: Path) -> Iterator[PrivateBus]:
    bus = start_private_bus(tmp_path / "dbus", policy_files(tmp_path / "policy"))
    try:
        yield bus
    finally:
        bus.stop()


async def connect(address: str) -> MessageBus:
    return await MessageBus(bus_address=address, bus_type=BusType.SYSTEM).connect()


async def round_trip(bus: MessageBus) -> None:
    """A call to the bus daemon: every signal routed to ``bus`` before it has been delivered when it returns."""
    await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                           interface="org.freedesktop.DBus", member="GetId"))


@pytest.fixture
async def locksmith_bus(private_bus: PrivateBus) -> AsyncIterator[MessageBus]:
    bus = await connect(private_bus.address)
    try:
        yield bus
    finally:
        bus.disconnect()


@pytest.fixture
async def update_engine(private_bus: PrivateBus) -> AsyncIterator[UpdateEngineStandIn]:
    standin = await UpdateEngineStandIn(private_bus.address, IDLE).start()
    try:
        yield standin
    finally:
        await standin.stop()


class WrongSignature(ServiceInterface):
    """An update-engine that answers GetStatus without the new_size field."""

    def __init__(self) -> None:
        super().__init__(INTERFACE)

    @method()
    def GetStatus(self) -> "xdss":  # type: ignore[name-defined]  # noqa: F821, UP037
        return [0, 0.0, UpdateStatus.UPDATED_NEED_REBOOT.value, "1.0"]


class Refusing(ServiceInterface):
    """An update-engine that answers GetStatus with a D-Bus error."""

    def __init__(self) -> None:
        super().__init__(INTERFACE)

    @method()
    def GetStatus(self) -> "xdssx":  # type: ignore[name-defined]  # noqa: F821, UP037
        raise DBusError("com.coreos.update1.Error.Busy", "still starting up")


async def own_update_engine_name(address: str, interface: ServiceInterface) -> MessageBus:
    bus = await connect(address)
    bus.export(OBJECT_PATH, interface)
    assert await bus.request_name(BUS_NAME) == RequestNameReply.PRIMARY_OWNER
    return bus


async def test_getstatus_with_nobody_on_the_bus_says_so(locksmith_bus: MessageBus) -> None:
    with pytest.raises(UpdateEngineUnavailable, match=r"org\.freedesktop\.DBus\.Error\.ServiceUnknown"):
        await UpdateEngineWatcher(locksmith_bus).get_status()


async def test_getstatus_with_the_wrong_signature_is_refused(
    private_bus: PrivateBus, locksmith_bus: MessageBus
) -> None:
    service = await own_update_engine_name(private_bus.address, WrongSignature())
    try:
        with pytest.raises(UpdateEngineUnavailable) as refused:
            await UpdateEngineWatcher(locksmith_bus).get_status()
    finally:
        service.disconnect()
    assert str(refused.value) == "GetStatus answered with signature 'xdss', expected 'xdssx'"


async def test_getstatus_error_carries_the_error_name_and_text(
    private_bus: PrivateBus, locksmith_bus: MessageBus
) -> None:
    service = await own_update_engine_name(private_bus.address, Refusing())
    try:
        with pytest.raises(UpdateEngineUnavailable) as refused:
            await UpdateEngineWatcher(locksmith_bus).get_status()
    finally:
        service.disconnect()
    assert str(refused.value) == "com.coreos.update1.Error.Busy: still starting up"


async def test_start_reports_the_current_status_and_who_owns_the_name(
    locksmith_bus: MessageBus, update_engine: UpdateEngineStandIn, caplog: pytest.LogCaptureFixture
) -> None:
    await update_engine.set_status(DOWNLOADING, emit=False)
    watcher = UpdateEngineWatcher(locksmith_bus)
    heard: list[StatusSnapshot] = []
    watcher.add_listener(heard.append)
    with caplog.at_level(logging.INFO, logger="locksmithd.updateengine"):
        status = await asyncio.wait_for(watcher.start(), WAIT)
    watcher.close()
    assert status == DOWNLOADING == watcher.latest
    assert heard == [DOWNLOADING]
    assert watcher.owner == update_engine.unique_name
    assert f"update-engine is {update_engine.unique_name} on the bus" in caplog.text
    assert f"update-engine status: {describe(DOWNLOADING)}" in caplog.text


async def test_waiting_for_need_reboot_skips_other_statuses(
    locksmith_bus: MessageBus, update_engine: UpdateEngineStandIn
) -> None:
    watcher = UpdateEngineWatcher(locksmith_bus)
    heard: list[str] = []
    watcher.add_listener(lambda s: heard.append(s.current_operation))
    await asyncio.wait_for(watcher.start(), WAIT)
    try:
        waiting = asyncio.create_task(watcher.wait_for(is_need_reboot))
        await update_engine.set_status(DOWNLOADING)
        await update_engine.set_status(IDLE)
        await round_trip(locksmith_bus)
        assert not waiting.done()
        await update_engine.set_status(NEED_REBOOT)
        assert await asyncio.wait_for(waiting, WAIT) == NEED_REBOOT
        assert heard == [
            "UPDATE_STATUS_IDLE",
            "UPDATE_STATUS_DOWNLOADING",
            "UPDATE_STATUS_IDLE",
            "UPDATE_STATUS_UPDATED_NEED_REBOOT",
        ]
    finally:
        watcher.close()


async def test_current_status_counts_unless_only_a_new_one_may(
    locksmith_bus: MessageBus, update_engine: UpdateEngineStandIn
) -> None:
    watcher = UpdateEngineWatcher(locksmith_bus)
    await asyncio.wait_for(watcher.start(), WAIT)
    try:
        assert await asyncio.wait_for(watcher.wait_for(is_idle), WAIT) == IDLE
        fresh = asyncio.create_task(watcher.wait_for(is_idle, include_current=False))
        await update_engine.set_status(DOWNLOADING)
        await round_trip(locksmith_bus)
        assert not fresh.done()
        later_idle = StatusSnapshot(1_700_003_600, 0.0, UpdateStatus.IDLE.value, "0.0.0", 0)
        await update_engine.set_status(later_idle)
        assert await asyncio.wait_for(fresh, WAIT) == later_idle
    finally:
        watcher.close()


async def test_when_update_engine_leaves_no_one_is_trusted(
    private_bus: PrivateBus, locksmith_bus: MessageBus, update_engine: UpdateEngineStandIn,
    caplog: pytest.LogCaptureFixture,
) -> None:
    watcher = UpdateEngineWatcher(locksmith_bus)
    await asyncio.wait_for(watcher.start(), WAIT)
    try:
        with caplog.at_level(logging.INFO, logger="locksmithd.updateengine"):
            await update_engine.stop()
            for _ in range(100):  # the bus announces the departure once it has noticed the disconnect
                if watcher.owner is None:
                    break
                await asyncio.sleep(0.05)
            assert watcher.owner is None
            forger = await emit_from_other_connection(private_bus.address, NEED_REBOOT)
            await round_trip(locksmith_bus)
        assert "update-engine left the bus (com.coreos.update1 has no owner)" in caplog.text
        assert f"ignoring a StatusUpdate signal from {forger}" in caplog.text
        assert "(the owner is nobody)" in caplog.text
        assert watcher.latest == IDLE
    finally:
        watcher.close()


async def test_close_cancels_whoever_waits_and_stops_listening(
    locksmith_bus: MessageBus, update_engine: UpdateEngineStandIn
) -> None:
    watcher = UpdateEngineWatcher(locksmith_bus)
    heard: list[StatusSnapshot] = []
    watcher.add_listener(heard.append)
    await asyncio.wait_for(watcher.start(), WAIT)
    waiting = asyncio.create_task(watcher.wait_for(is_need_reboot))
    await asyncio.sleep(0)
    watcher.close()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiting, WAIT)
    await update_engine.set_status(NEED_REBOOT)
    await round_trip(locksmith_bus)
    assert heard == [IDLE]
    assert watcher.latest == IDLE


async def wait_for_record(caplog: pytest.LogCaptureFixture, text: str) -> str:
    """The first log message containing ``text``, waiting for it up to WAIT seconds."""
    for _ in range(int(WAIT / 0.05)):
        for record in caplog.records:
            if text in record.getMessage():
                return record.getMessage()
        await asyncio.sleep(0.05)
    pytest.fail(f"never logged {text!r}; logged:\n{caplog.text}")


async def test_a_flood_of_forged_signals_is_logged_once_then_summed_up(
    private_bus: PrivateBus, locksmith_bus: MessageBus, update_engine: UpdateEngineStandIn,
    caplog: pytest.LogCaptureFixture,
) -> None:
    watcher = UpdateEngineWatcher(locksmith_bus, summary_interval=0.3)
    await asyncio.wait_for(watcher.start(), WAIT)
    forger = await connect(private_bus.address)
    summary_text = "more StatusUpdate signals from senders that do not own com.coreos.update1 in the last 300ms"
    try:
        with caplog.at_level(logging.DEBUG, logger="locksmithd.updateengine"):
            for _ in range(30):  # in batches with a round trip between: the socket buffers stay small
                for _ in range(10):
                    await forger.send(Message.new_signal(OBJECT_PATH, INTERFACE, "StatusUpdate", "xdssx",
                                                         list(NEED_REBOOT.as_tuple())))
                await round_trip(forger)
            await round_trip(locksmith_bus)
            # The burst ends with a quiet interval; every signal is in the full line or in a summary's count.
            await wait_for_record(caplog, "No more StatusUpdate signals from senders that do not own")
            messages = [r.getMessage() for r in caplog.records]
            full = [m for m in messages if m.startswith("ignoring a StatusUpdate signal")]
            assert len(full) == 1 and forger.unique_name in full[0]
            summaries = [m for m in messages if summary_text in m]
            assert 1 <= len(summaries) < 30
            assert sum(int(m.split()[0]) for m in summaries) == 299
            assert all("; the last: ignoring a StatusUpdate signal from " in m for m in summaries)
            assert watcher.ignored_signals == {"sender": 300, "malformed": 0}
            assert watcher.latest == IDLE

            # After the quiet interval, the next one is logged in full again.
            caplog.clear()
            await forger.send(Message.new_signal(OBJECT_PATH, INTERFACE, "StatusUpdate", "xdssx",
                                                 list(NEED_REBOOT.as_tuple())))
            await round_trip(forger)
            await round_trip(locksmith_bus)
            await wait_for_record(caplog, "ignoring a StatusUpdate signal from")
    finally:
        forger.disconnect()
        watcher.close()
