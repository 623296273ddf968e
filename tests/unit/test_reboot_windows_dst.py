"""Reboot windows across daylight-saving changes, in two zones, with a fake clock: the reboot happens when the
window really opens, and a window's length is elapsed time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from locksmithd.config import resolve_settings
from locksmithd.reboot_path import PathSettings
from tests.unit.reboot_fakes import BACKOFF, Driver, FakeBackend, FakeClock, etcd_lock


def windows(text: str, zone: str) -> PathSettings:
    path = resolve_settings({"reboot-windows": text, "reboot-window-timezone": zone}, {}, {}).path
    return PathSettings(**{**path.__dict__, "backoff": BACKOFF, "session_grace": timedelta(0)})


async def reboot(settings: PathSettings, clock: FakeClock, backend: FakeBackend) -> list[str]:
    driver = Driver(settings, clock, etcd_lock(backend, clock))
    await driver.run()
    return driver.notes


@pytest.mark.parametrize(
    ("zone", "saturday_noon_utc", "opens_utc", "shown"),
    [
        # 2026-03-29 02:00 CET → 03:00 CEST at 01:00 UTC; 02:30 does not exist that night.
        ("Europe/Berlin", datetime(2026, 3, 28, 11, 0, tzinfo=UTC), datetime(2026, 3, 29, 1, 0, tzinfo=UTC),
         "2026-03-29 03:00:00 +0200 CEST"),
        # 2026-03-08 02:00 EST → 03:00 EDT at 07:00 UTC.
        ("America/New_York", datetime(2026, 3, 7, 17, 0, tzinfo=UTC), datetime(2026, 3, 8, 7, 0, tzinfo=UTC),
         "2026-03-08 03:00:00 -0400 EDT"),
    ],
)
async def test_spring_forward_a_window_in_the_gap_opens_at_the_first_instant_after_it(
    zone: str, saturday_noon_utc: datetime, opens_utc: datetime, shown: str
) -> None:
    clock = FakeClock(saturday_noon_utc, ZoneInfo(zone))
    backend = FakeBackend(clock)
    notes = await reboot(windows("Sun 02:30 1h", zone), clock, backend)
    assert clock.current == opens_utc
    assert backend.calls == ["acquire"]
    assert any(note.startswith(f"Next window begins at {shown} and ends at") for note in notes)


@pytest.mark.parametrize(
    ("zone", "start", "first_occurrence_utc"),
    [
        # 2026-10-25 03:00 CEST → 02:00 CET: 02:30 happens at 00:30 and again at 01:30 UTC.
        ("Europe/Berlin", "02:30", datetime(2026, 10, 25, 0, 30, tzinfo=UTC)),
        # 2026-11-01 02:00 EDT → 01:00 EST: 01:30 happens at 05:30 and again at 06:30 UTC.
        ("America/New_York", "01:30", datetime(2026, 11, 1, 5, 30, tzinfo=UTC)),
    ],
)
async def test_fall_back_a_repeated_start_opens_at_its_first_occurrence_and_lasts_elapsed_time(
    zone: str, start: str, first_occurrence_utc: datetime
) -> None:
    settings = windows(f"Sun {start} 90m", zone)
    clock = FakeClock(first_occurrence_utc - timedelta(hours=6), ZoneInfo(zone))
    backend = FakeBackend(clock)
    backend.acquire_plan = [89 * 60.0]  # granted 89 minutes into the window: still inside
    await reboot(settings, clock, backend)
    assert backend.calls == ["acquire"]
    assert clock.current == first_occurrence_utc + timedelta(minutes=89)

    # Granted 91 minutes into it: the wall clock shows less than 90 minutes since the start (the hour was
    # repeated), but 91 minutes have passed: the lock is given back and the node waits a week.
    clock = FakeClock(first_occurrence_utc - timedelta(hours=6), ZoneInfo(zone))
    backend = FakeBackend(clock)
    backend.acquire_plan = [91 * 60.0, 0.0]
    await reboot(settings, clock, backend)
    assert backend.calls == ["acquire", "release", "acquire"]
    assert clock.current.astimezone(ZoneInfo(zone)).date() == (first_occurrence_utc + timedelta(days=7)).date()
