"""Reboot windows across daylight-saving changes, in two zones, with a fake clock: the reboot happens when the
window really opens, and a window's length is elapsed time."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from locksmithd.config import DaemonSettings, resolve_settings
from locksmithd.reboot_path import clear_to_reboot
from tests.unit.test_strategies import FakeBackend, FakeClock, etcd_lock


class ZoneClock(FakeClock):
    """The fake clock, answering in a zone as the system clock does."""

    def __init__(self, now: datetime, zone: ZoneInfo) -> None:
        super().__init__(now)
        self.zone = zone

    def now(self) -> datetime:
        return self.current.astimezone(self.zone)


def windows(text: str, zone: str) -> DaemonSettings:
    return resolve_settings({"reboot-windows": text, "reboot-window-timezone": zone}, {}, {})


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
    zone: str, saturday_noon_utc: datetime, opens_utc: datetime, shown: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    settings = windows("Sun 02:30 1h", zone)
    clock = ZoneClock(saturday_noon_utc, ZoneInfo(zone))
    backend = FakeBackend(clock)
    await clear_to_reboot(etcd_lock(backend, clock), settings.windows, settings.describe_windows(), clock, "1.2.3")
    assert clock.current == opens_utc
    assert backend.calls == ["acquire"]
    assert f"Next window begins at {shown} and ends at" in caplog.text


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
    clock = ZoneClock(first_occurrence_utc - timedelta(hours=6), ZoneInfo(zone))
    backend = FakeBackend(clock)
    backend.acquire_plan = [89 * 60.0]  # granted 89 minutes into the window: still inside
    await clear_to_reboot(etcd_lock(backend, clock), settings.windows, settings.describe_windows(), clock, "1.2.3")
    assert backend.calls == ["acquire"]
    assert clock.current == first_occurrence_utc + timedelta(minutes=89)

    # Granted 91 minutes into it: the wall clock shows less than 90 minutes since the start (the hour was
    # repeated), but 91 minutes have passed: the lock is given back and the node waits a week.
    clock = ZoneClock(first_occurrence_utc - timedelta(hours=6), ZoneInfo(zone))
    backend = FakeBackend(clock)
    backend.acquire_plan = [91 * 60.0, 0.0]
    await clear_to_reboot(etcd_lock(backend, clock), settings.windows, settings.describe_windows(), clock, "1.2.3")
    assert backend.calls == ["acquire", "release", "acquire"]
    assert clock.current.astimezone(ZoneInfo(zone)).date() == (first_occurrence_utc + timedelta(days=7)).date()
