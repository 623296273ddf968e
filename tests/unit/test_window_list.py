"""Window lists in an IANA time zone, with a fake clock, across both DST transitions in two zones."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from coreos_common.window import WindowError, parse_window_list

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def test_days_ranges_and_entries() -> None:
    windows = parse_window_list("Mon-Fri 09:00 8h; Sat,Sun 10:00 2h", "Europe/Berlin")
    assert windows.text == "Mon-Fri 09:00 8h; Sat,Sun 10:00 2h"
    wednesday_noon = datetime(2026, 6, 3, 12, 0, tzinfo=BERLIN)
    assert windows.contains(wednesday_noon)
    assert not windows.contains(wednesday_noon.replace(hour=17, minute=1))
    assert windows.contains(wednesday_noon.replace(hour=17, minute=0))  # the end is inclusive
    saturday = datetime(2026, 6, 6, 11, 0, tzinfo=BERLIN)
    assert windows.contains(saturday) and not windows.contains(saturday.replace(hour=9))
    assert windows.next_opening(saturday.replace(hour=13)) == (
        datetime(2026, 6, 7, 10, 0, tzinfo=BERLIN), datetime(2026, 6, 7, 12, 0, tzinfo=BERLIN)
    )


def test_a_range_wraps_past_sunday_and_no_days_means_every_day() -> None:
    weekend = parse_window_list("Fri-Mon 22:00 4h", "UTC")
    assert weekend.contains(utc(2026, 6, 8, 23, 0))  # Monday
    assert not weekend.contains(utc(2026, 6, 9, 23, 0))  # Tuesday
    assert weekend.contains(utc(2026, 6, 10, 1, 0)) is False
    daily = parse_window_list("3:30 30m", "UTC")
    assert all(daily.contains(utc(2026, 6, d, 3, 45)) for d in range(1, 8))


@pytest.mark.parametrize(
    "text",
    ["", ";", "Mon 9:00", "Mon-Fri 25:00 1h", "Mon 9:00 0s", "Mon 9:00 169h", "Funday 9:00 1h", "Mon 9:00 1d",
     "Mon-Fri-Sat 9:00 1h", "Mon,,Tue 9:00 1h"],
)
def test_bad_lists_name_the_problem(text: str) -> None:
    with pytest.raises(WindowError, match="window"):
        parse_window_list(text, "UTC")


def test_unknown_time_zone() -> None:
    with pytest.raises(WindowError, match="Mars/Olympus"):
        parse_window_list("9:00 1h", "Mars/Olympus")


@pytest.mark.parametrize(
    ("zone", "day", "gap_start_utc"),
    [
        # Berlin: 2026-03-29 02:00 CET → 03:00 CEST (01:00 UTC); New York: 2026-03-08 02:00 EST → 03:00 EDT.
        ("Europe/Berlin", datetime(2026, 3, 29), utc(2026, 3, 29, 1, 0)),
        ("America/New_York", datetime(2026, 3, 8), utc(2026, 3, 8, 7, 0)),
    ],
)
def test_spring_forward_a_start_in_the_gap_opens_when_the_clocks_jump(
    zone: str, day: datetime, gap_start_utc: datetime
) -> None:
    windows = parse_window_list("02:30 1h", zone)
    tz = ZoneInfo(zone)
    opening = windows.next_opening(datetime(day.year, day.month, day.day, 0, 0, tzinfo=tz))
    assert opening is not None
    opens, closes = opening
    assert opens.astimezone(UTC) == gap_start_utc  # 03:00 local, the first instant after the gap
    assert opens.hour == 3 and opens.minute == 0
    assert closes - opens == timedelta(hours=1)  # elapsed time
    assert not windows.contains(gap_start_utc - timedelta(seconds=1))
    assert windows.contains(gap_start_utc + timedelta(minutes=59))


@pytest.mark.parametrize(
    ("zone", "first_occurrence_utc"),
    [
        # Berlin: 2026-10-25 03:00 CEST → 02:00 CET; 02:30 happens at 00:30 and 01:30 UTC.
        ("Europe/Berlin", utc(2026, 10, 25, 0, 30)),
        # New York: 2026-11-01 02:00 EDT → 01:00 EST; 01:30 happens at 05:30 and 06:30 UTC.
        ("America/New_York", utc(2026, 11, 1, 5, 30)),
    ],
)
def test_fall_back_a_repeated_start_opens_at_its_first_occurrence(zone: str, first_occurrence_utc: datetime) -> None:
    start = "02:30" if zone == "Europe/Berlin" else "01:30"
    windows = parse_window_list(f"Sun {start} 90m", zone)
    opening = windows.next_opening(first_occurrence_utc - timedelta(hours=3))
    assert opening is not None
    assert opening[0].astimezone(UTC) == first_occurrence_utc
    # 90 minutes of elapsed time, though the wall clock shows only 30 minutes more.
    assert opening[1].astimezone(UTC) == first_occurrence_utc + timedelta(minutes=90)
    assert windows.contains(first_occurrence_utc + timedelta(minutes=89))
    assert not windows.contains(first_occurrence_utc + timedelta(minutes=91))


def test_a_window_across_the_spring_gap_lasts_its_elapsed_length() -> None:
    windows = parse_window_list("Sun 01:00 2h", "Europe/Berlin")
    opens, closes = windows.next_opening(datetime(2026, 3, 28, 12, 0, tzinfo=BERLIN)) or (None, None)
    assert opens is not None and closes is not None
    assert (opens.hour, closes.hour) == (1, 4)  # 01:00 CET + 2 h = 04:00 CEST
    assert closes.astimezone(UTC) - opens.astimezone(UTC) == timedelta(hours=2)
