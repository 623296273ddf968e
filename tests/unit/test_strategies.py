"""Strategy decisions with fake lock backends and a fake clock: windows, lock retries, release after boot."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import pytest

from coreos_common.backoff import BackoffPolicy
from locksmithd.backends import LockBackendError, ProgressCallback
from locksmithd.config import DaemonSettings, resolve_settings
from locksmithd.reboot_path import clear_to_reboot as clear_with_version
from locksmithd.strategies import NullObserver, RebootStrategy
from locksmithd.strategies.best_effort import BestEffortStrategy
from locksmithd.strategies.reboot import RebootStrategy as NoLockStrategy
from locksmithd.strategies.slots import SlotKeeper, SlotStrategy

MACHINE = "0123456789abcdef0123456789abcdef"
BACKOFF = BackoffPolicy(10.0, 300.0)


class FakeClock:
    """Time moves only when someone sleeps."""

    def __init__(self, now: datetime) -> None:
        self.current = now
        self.sleeps: list[float] = []

    def now(self) -> datetime:
        return self.current

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.current += timedelta(seconds=seconds)


class FakeBackend:
    """Records calls; ``acquire_plan`` lists, per call, how long the lock wait lasts or what it raises."""

    name = "fake"

    def __init__(self, clock: FakeClock, *, reachable: bool = True) -> None:
        self.clock = clock
        self.is_reachable = reachable
        self.calls: list[str] = []
        self.acquire_plan: list[float | Exception] = []
        self.release_plan: list[bool | Exception] = []
        self.held = False

    async def reachable(self) -> bool:
        self.calls.append("reachable")
        return self.is_reachable

    async def acquire(
        self, machine_id: str, *, version: str = "", on_progress: ProgressCallback | None = None
    ) -> None:
        assert machine_id == MACHINE
        self.calls.append("acquire")
        step = self.acquire_plan.pop(0) if self.acquire_plan else 0.0
        if isinstance(step, Exception):
            raise step
        if step:
            await self.clock.sleep(step)
        self.held = True

    async def release(self, machine_id: str) -> bool:
        self.calls.append("release")
        step = self.release_plan.pop(0) if self.release_plan else self.held
        if isinstance(step, Exception):
            raise step
        self.held = False
        return step

    async def close(self) -> None:
        self.calls.append("close")


def etcd_lock(backend: FakeBackend, clock: FakeClock) -> SlotStrategy:
    return SlotStrategy("etcd-lock", SlotKeeper(backend, MACHINE, BACKOFF, clock, NullObserver()), "")


def best_effort(backend: FakeBackend, clock: FakeClock, where: str) -> BestEffortStrategy:
    return BestEffortStrategy(backend, SlotKeeper(backend, MACHINE, BACKOFF, clock, NullObserver()), "", where)


async def clear_to_reboot(strategy: RebootStrategy, settings: DaemonSettings | None, clock: FakeClock) -> None:
    settings = settings or DaemonSettings()
    await clear_with_version(strategy, settings.windows, settings.describe_windows(), clock, "3975.2.1")


def window(start: str, length: str) -> DaemonSettings:
    return resolve_settings({"reboot-window-start": start, "reboot-window-length": length}, {}, {})


async def test_no_window_reboots_at_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    clock = FakeClock(datetime(2024, 5, 2, 12, 0, tzinfo=UTC))
    await clear_to_reboot(NoLockStrategy(), None, clock)
    assert clock.sleeps == []
    assert "No configured reboot window" in caplog.text


async def test_inside_the_window_no_wait_and_no_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    clock = FakeClock(datetime(2024, 5, 2, 4, 30, tzinfo=UTC))
    await clear_to_reboot(NoLockStrategy(), window("4:00", "1h"), clock)
    assert clock.sleeps == []
    assert caplog.text == ""


async def test_closed_window_waits_for_the_next_opening(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    clock = FakeClock(datetime(2024, 5, 2, 0, 57, 59, tzinfo=UTC))  # a Thursday
    await clear_to_reboot(NoLockStrategy(), window("Thu 04:00", "1h"), clock)
    assert clock.current == datetime(2024, 5, 2, 4, 0, tzinfo=UTC)
    assert 'Reboot window start is "Thu 04:00" and length is "1h"' in caplog.text
    assert (
        "Next window begins at 2024-05-02 04:00:00 +0000 UTC and ends at 2024-05-02 05:00:00 +0000 UTC"
        in (caplog.text)
    )
    assert "Waiting for 3h2m1s to reboot." in caplog.text
    assert max(clock.sleeps) <= 300  # long waits are cut into pieces so clock steps are noticed


async def test_a_lock_granted_a_second_after_the_window_closed_waits_for_the_next_one() -> None:
    clock = FakeClock(datetime(2024, 5, 2, 4, 0, tzinfo=UTC))
    backend = FakeBackend(clock)
    backend.acquire_plan = [61.0, 0.0]  # the lock answers a second after the window closed
    strategy = etcd_lock(backend, clock)
    await clear_to_reboot(strategy, window("4:00", "1m"), clock)
    assert backend.calls == ["acquire", "release", "acquire"]
    assert clock.current == datetime(2024, 5, 3, 4, 0, tzinfo=UTC)


async def test_lock_wait_past_the_window_gives_the_lock_back(caplog: pytest.LogCaptureFixture) -> None:
    """coreos/bugs#1886: a long lock wait must not end in a reboot outside the window."""
    caplog.set_level(logging.INFO)
    clock = FakeClock(datetime(2024, 5, 2, 4, 30, tzinfo=UTC))
    backend = FakeBackend(clock)
    backend.acquire_plan = [3 * 3600.0, 60.0]  # first wait ends at 07:30, the next one a minute after 04:00
    strategy = etcd_lock(backend, clock)
    await clear_to_reboot(strategy, window("4:00", "1h"), clock)
    assert backend.calls == ["acquire", "release", "acquire"]
    assert clock.current == datetime(2024, 5, 3, 4, 1, tzinfo=UTC)
    assert "The reboot window ended at 2024-05-02 05:00:00 +0000 UTC" in caplog.text
    assert "giving the lock back and waiting for the next window" in caplog.text


async def test_lock_errors_are_retried_with_doubling_delays(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock(datetime(2024, 5, 2, 12, 0, tzinfo=UTC))
    backend = FakeBackend(clock)
    backend.acquire_plan = [LockBackendError("etcd refused: permission denied")] * 7
    strategy = etcd_lock(backend, clock)
    await strategy.can_finalize("3975.2.1")
    assert backend.calls == ["acquire"] * 8
    assert clock.sleeps == [10, 20, 40, 80, 160, 300, 300]
    assert "Failed to acquire lock: etcd refused: permission denied. Retrying in 10s." in caplog.text
    assert "Retrying in 2m40s." in caplog.text and "Retrying in 5m0s." in caplog.text


async def test_report_steady_releases_with_retries(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock(datetime(2024, 5, 2, 12, 0, tzinfo=UTC))
    backend = FakeBackend(clock)
    backend.release_plan = [LockBackendError("no etcd endpoint answered"), True]
    strategy = etcd_lock(backend, clock)
    await strategy.report_steady()
    assert backend.calls == ["release", "release"]
    assert clock.sleeps == [10]
    assert "Unlocking old locks failed: no etcd endpoint answered. Retrying in 10s." in caplog.text


async def test_best_effort_without_etcd_reboots_without_lock(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    clock = FakeClock(datetime(2024, 5, 2, 12, 0, tzinfo=UTC))
    backend = FakeBackend(clock, reachable=False)
    strategy = best_effort(backend, clock, where="http://127.0.0.1:2379")
    await clear_to_reboot(strategy, None, clock)
    assert backend.calls == ["reachable"]
    assert (
        "best-effort: etcd does not answer at http://127.0.0.1:2379: rebooting without a lock" in caplog.text
    )

    await strategy.report_steady()
    assert "release" not in backend.calls
    assert "no reboot lock to release" in caplog.text


async def test_best_effort_with_etcd_takes_the_lock(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    clock = FakeClock(datetime(2024, 5, 2, 12, 0, tzinfo=UTC))
    backend = FakeBackend(clock)
    strategy = best_effort(backend, clock, where="http://etcd:2379")
    await clear_to_reboot(strategy, None, clock)
    assert backend.calls == ["reachable", "acquire"]
    assert "best-effort: etcd answers at http://etcd:2379: taking the reboot lock" in caplog.text

    await strategy.report_steady()
    assert backend.calls[-2:] == ["reachable", "release"]


async def test_best_effort_abandon_only_releases_a_lock_it_took() -> None:
    clock = FakeClock(datetime(2024, 5, 2, 12, 0, tzinfo=UTC))
    backend = FakeBackend(clock, reachable=False)
    strategy = best_effort(backend, clock, where="x")
    await strategy.can_finalize("3975.2.1")
    await strategy.abandon()
    assert backend.calls == ["reachable"]
