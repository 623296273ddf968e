"""Strategy decisions with fake lock backends and a fake clock: lock retries, release after boot, best-effort."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import pytest

from locksmithd.backends import LockBackendError, LockBackendUnavailable
from locksmithd.strategies import NullObserver
from locksmithd.strategies.best_effort import BestEffortStrategy
from locksmithd.strategies.slots import SlotKeeper
from tests.unit.reboot_fakes import BACKOFF, MACHINE, FakeBackend, FakeClock, etcd_lock


def best_effort(backend: FakeBackend, clock: FakeClock, where: str) -> BestEffortStrategy:
    return BestEffortStrategy(backend, SlotKeeper(backend, MACHINE, BACKOFF, clock, NullObserver()), "", where)


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
    await strategy.can_finalize("3975.2.1")
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
    await strategy.can_finalize("3975.2.1")
    assert backend.calls == ["reachable", "acquire"]
    assert backend.versions == ["3975.2.1"]
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


class RecordingObserver:
    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []

    def lock_progress(self, progress: object) -> None:
        self.events.append(("progress", progress))

    def lock_held(self, held: bool) -> None:
        self.events.append(("held", held))

    def backend_failed(self, operation: str, error: LockBackendError) -> None:
        self.events.append((operation, str(error)))


async def test_the_observer_hears_failures_progress_and_the_slot() -> None:
    clock = FakeClock(datetime(2024, 5, 2, 12, 0, tzinfo=UTC))
    backend = FakeBackend(clock)
    backend.acquire_plan = [LockBackendUnavailable("etcd is down"), 0.0]
    backend.release_plan = [LockBackendError("permission denied"), True]
    observer = RecordingObserver()
    slots = SlotKeeper(backend, MACHINE, BACKOFF, clock, observer)
    await slots.take("1.2.3")
    await slots.give_back()
    kinds = [kind for kind, _ in observer.events]
    assert kinds == ["acquire", "progress", "held", "release", "held"]
    assert observer.events[0] == ("acquire", "etcd is down")
    assert observer.events[2] == ("held", True) and observer.events[-1] == ("held", False)
