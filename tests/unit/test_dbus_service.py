"""The D-Bus service's pure pieces: the StatusUpdate rate rule, the message body, introspection names, errors."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import cast

import pytest
from dbus_fast import DBusError
from dbus_fast.aio import MessageBus

from coreos_common.status import StatusDetails, StatusSnapshot, UpdateStatus
from update_engine.dbus_service import (
    ERROR_RESET_NOT_ALLOWED,
    ManagerInterface,
    StatusEmitter,
    status_body,
)
from update_engine.engine.errors import ResetNotAllowed

DOWNLOADING = UpdateStatus.DOWNLOADING.value


class FakeClock:
    """Monotonic seconds that only move when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def downloading(progress: float) -> StatusSnapshot:
    return StatusSnapshot(1700000000, progress, DOWNLOADING, "3815.2.0", 500_000_000)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_first_snapshot_is_always_signalled(clock: FakeClock) -> None:
    assert StatusEmitter(clock).should_signal(StatusSnapshot())


def test_identical_snapshot_is_not_signalled_twice(clock: FakeClock) -> None:
    emitter = StatusEmitter(clock)
    emitter.should_signal(StatusSnapshot())
    clock.now += 3600
    assert not emitter.should_signal(StatusSnapshot())


def test_every_status_change_is_signalled_even_at_once(clock: FakeClock) -> None:
    emitter = StatusEmitter(clock)
    sequence = [
        StatusSnapshot(),
        StatusSnapshot(current_operation=UpdateStatus.CHECKING_FOR_UPDATE.value),
        StatusSnapshot(1700000000, 0.0, UpdateStatus.UPDATE_AVAILABLE.value, "3815.2.0", 500_000_000),
        downloading(0.0),
        StatusSnapshot(1700000000, 0.0, UpdateStatus.FINALIZING.value, "3815.2.0", 500_000_000),
        StatusSnapshot(1700000000, 0.0, UpdateStatus.UPDATED_NEED_REBOOT.value, "3815.2.0", 500_000_000),
    ]
    assert [emitter.should_signal(s) for s in sequence] == [True] * len(sequence)


def test_download_progress_is_signalled_per_percent(clock: FakeClock) -> None:
    emitter = StatusEmitter(clock)
    emitter.should_signal(downloading(0.0))
    signalled = []
    for thousandth in range(1, 1001):
        progress = thousandth / 1000
        if emitter.should_signal(downloading(progress)):
            signalled.append(round(progress, 3))
    # One signal per 1 % step (floating-point 0.03 - 0.02 < 0.01 must still count), none in between.
    assert signalled == [round(p / 100, 3) for p in range(1, 101)]


def test_progress_reaching_one_is_signalled_even_after_a_small_step(clock: FakeClock) -> None:
    emitter = StatusEmitter(clock)
    emitter.should_signal(downloading(0.995))
    assert emitter.should_signal(downloading(1.0))
    assert not emitter.should_signal(downloading(1.0))


def test_small_progress_is_signalled_after_ten_quiet_seconds(clock: FakeClock) -> None:
    emitter = StatusEmitter(clock)
    emitter.should_signal(downloading(0.100))
    clock.now += 9.9
    assert not emitter.should_signal(downloading(0.101))
    clock.now += 0.1
    assert emitter.should_signal(downloading(0.102))
    # The 10 s count restarts at the signal just sent.
    clock.now += 5
    assert not emitter.should_signal(downloading(0.103))


def test_suppressed_progress_does_not_reset_the_percent_baseline(clock: FakeClock) -> None:
    emitter = StatusEmitter(clock)
    emitter.should_signal(downloading(0.200))
    assert not emitter.should_signal(downloading(0.205))
    assert emitter.should_signal(downloading(0.210))


def test_restarted_download_is_signalled(clock: FakeClock) -> None:
    emitter = StatusEmitter(clock)
    emitter.should_signal(downloading(0.5))
    assert emitter.should_signal(downloading(0.0))


def test_other_field_changes_are_signalled_without_rate_limit(clock: FakeClock) -> None:
    emitter = StatusEmitter(clock)
    emitter.should_signal(downloading(0.5))
    assert emitter.should_signal(StatusSnapshot(1700000000, 0.5, DOWNLOADING, "3815.2.1", 500_000_000))
    idle = StatusSnapshot(1700000000)
    emitter.should_signal(idle)
    assert emitter.should_signal(StatusSnapshot(1700003600))


class OneStateManager:
    """Minimal manager for calling interface methods directly (no bus)."""

    def __init__(self, snapshot: StatusSnapshot, reset_error: str | None = None) -> None:
        self._snapshot = snapshot
        self._reset_error = reset_error
        self.attempts = 0

    def snapshot(self) -> StatusSnapshot:
        return self._snapshot

    def attempt_update(self) -> None:
        self.attempts += 1

    def reset_status(self) -> None:
        if self._reset_error is not None:
            raise ResetNotAllowed(self._reset_error)

    def rollback(self) -> str:
        return "USR-A"

    def add_status_listener(self, listener: Callable[[StatusSnapshot], None]) -> None:
        pass

    def details(self) -> StatusDetails:
        return StatusDetails(status=self._snapshot)


def test_status_body_marshals_an_integer_progress_as_a_double() -> None:
    body = status_body(StatusSnapshot(5, 1, "UPDATE_STATUS_IDLE", "0.0.0", 0))
    assert body == [5, 1.0, "UPDATE_STATUS_IDLE", "0.0.0", 0]
    assert isinstance(body[1], float)


async def test_reset_status_refusal_becomes_the_named_dbus_error() -> None:
    manager = OneStateManager(downloading(0.3), reset_error="not while UPDATE_STATUS_DOWNLOADING")
    interface = ManagerInterface(manager, cast(MessageBus, None))
    with pytest.raises(DBusError) as raised:
        # The method is a coroutine (it looks the caller up on the bus); dbus-fast's wrapper hides its result.
        await ManagerInterface.ResetStatus.__wrapped__(interface)  # type: ignore[attr-defined]
    assert raised.value.type == ERROR_RESET_NOT_ALLOWED
    assert raised.value.text == "not while UPDATE_STATUS_DOWNLOADING"


def test_introspection_names_the_status_arguments_like_the_original() -> None:
    interface = ManagerInterface(OneStateManager(StatusSnapshot()), cast(MessageBus, None))
    xml = ET.fromstring(ET.tostring(interface.introspect().to_xml()))
    assert xml.get("name") == "com.coreos.update1.Manager"
    methods = {m.get("name"): m for m in xml.findall("method")}
    assert set(methods) == {"AttemptUpdate", "ResetStatus", "GetStatus", "GetStatusDetails", "Rollback"}
    assert [(a.get("name"), a.get("type"), a.get("direction")) for a in methods["GetStatusDetails"].findall("arg")] == [
        ("details", "a{sv}", "out")
    ]
    get_status = [(a.get("name"), a.get("type"), a.get("direction")) for a in methods["GetStatus"].findall("arg")]
    assert get_status == [
        ("last_checked_time", "x", "out"),
        ("progress", "d", "out"),
        ("current_operation", "s", "out"),
        ("new_version", "s", "out"),
        ("new_size", "x", "out"),
    ]
    assert [(a.get("type"), a.get("direction")) for a in methods["Rollback"].findall("arg")] == [("s", "out")]
    assert methods["AttemptUpdate"].findall("arg") == []
    (status_update,) = xml.findall("signal")
    assert status_update.get("name") == "StatusUpdate"
    assert [(a.get("name"), a.get("type")) for a in status_update.findall("arg")] == [
        ("last_checked_time", "x"),
        ("progress", "d"),
        ("current_operation", "s"),
        ("new_version", "s"),
        ("new_size", "x"),
    ]
