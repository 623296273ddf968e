"""locksmith's reboot window pair: parsing start and length, then membership and the next opening of the one-entry
window list it becomes, across midnight, week and DST."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coreos_common.window import (
    WindowError,
    WindowList,
    WindowStart,
    parse_reboot_window,
    parse_window_start,
)

NEW_YORK = ZoneInfo("America/New_York")
BERLIN = ZoneInfo("Europe/Berlin")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4:00", WindowStart(None, 4, 0)),
        ("04:05", WindowStart(None, 4, 5)),
        ("23:59", WindowStart(None, 23, 59)),
        ("0:0", WindowStart(None, 0, 0)),
        ("Thu 04:00", WindowStart(4, 4, 0)),
        ("sun 1:30", WindowStart(0, 1, 30)),
        ("SAT 22:00", WindowStart(6, 22, 0)),
        ("  Mon   7:15 ", WindowStart(1, 7, 15)),
    ],
)
def test_window_start(text: str, expected: WindowStart) -> None:
    assert parse_window_start(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("14", "is not H:MM"),
        ("24:00", "hour 24"),
        ("4:60", "minute 60"),
        ("Thursday 4:00", "unknown day 'Thursday'"),
        ("Thu", "is not H:MM"),
        ("Thu 4:00 extra", "expected 'H:MM' or 'Ddd H:MM'"),
        ("4:00pm", "is not H:MM"),
        ("-1:00", "is not H:MM"),
        ("", "expected 'H:MM'"),
    ],
)
def test_window_start_errors_name_the_input(text: str, message: str) -> None:
    with pytest.raises(WindowError) as info:
        parse_window_start(text)
    assert message in str(info.value)
    assert repr(text) in str(info.value)


def test_both_or_neither() -> None:
    assert parse_reboot_window(None, None) is None
    assert parse_reboot_window("", "") is None
    for start, length in (("4:00", None), (None, "1h"), ("4:00", "")):
        with pytest.raises(WindowError, match="Either both or neither"):
            parse_reboot_window(start, length)


@pytest.mark.parametrize(
    ("start", "length", "message"),
    [
        ("4:00", "24h", "daily window"),
        ("Mon 4:00", "168h", "weekly window"),
        ("4:00", "-1m", "must not be negative"),
        ("4:00", "1d", "reboot window length '1d'"),
        ("4:00", "0", "must be at least 1s"),
        ("4:00", "0s", "must be at least 1s"),
        ("Thu 4:00", "999ms", "must be at least 1s"),
    ],
)
def test_length_limits(start: str, length: str, message: str) -> None:
    with pytest.raises(WindowError, match=message):
        parse_reboot_window(start, length)


def test_longest_and_shortest_lengths_are_accepted() -> None:
    assert _window("4:00", "23h59m59s").windows[0].length == timedelta(hours=24) - timedelta(seconds=1)
    assert _window("Mon 4:00", "167h59m").windows[0].days == frozenset({1})
    one_second = _window("4:00", "1s")
    assert one_second.contains(datetime(2024, 5, 1, 4, 0, 1, tzinfo=UTC))
    assert not one_second.contains(datetime(2024, 5, 1, 4, 0, 1, 1, tzinfo=UTC))


def _window(start: str, length: str, zone: ZoneInfo | timezone = UTC) -> WindowList:
    entry = parse_reboot_window(start, length)
    assert entry is not None
    return WindowList((entry,), zone, entry.text)


def test_daily_window_end_is_inclusive() -> None:
    window = _window("4:00", "1h")
    day = datetime(2024, 5, 2, tzinfo=UTC)
    assert not window.contains(day.replace(hour=3, minute=59, second=59))
    assert window.contains(day.replace(hour=4))
    assert window.contains(day.replace(hour=5))
    assert not window.contains(day.replace(hour=5, microsecond=1))


def test_daily_window_across_midnight() -> None:
    window = _window("23:30", "1h")
    assert window.contains(datetime(2024, 5, 2, 0, 15, tzinfo=UTC))
    assert window.current(datetime(2024, 5, 2, 0, 15, tzinfo=UTC)) == (
        datetime(2024, 5, 1, 23, 30, tzinfo=UTC),
        datetime(2024, 5, 2, 0, 30, tzinfo=UTC),
    )
    assert window.next_opening(datetime(2024, 5, 2, 0, 31, tzinfo=UTC))[0] == datetime(
        2024, 5, 2, 23, 30, tzinfo=UTC
    )


def test_weekly_window_wraps_from_saturday_to_sunday() -> None:
    window = _window("Sat 23:00", "3h")
    saturday = datetime(2024, 5, 4, 23, 0, tzinfo=UTC)  # 2024-05-04 is a Saturday
    assert window.contains(saturday)
    assert window.contains(datetime(2024, 5, 5, 1, 59, tzinfo=UTC))
    assert not window.contains(datetime(2024, 5, 5, 2, 1, tzinfo=UTC))
    assert not window.contains(datetime(2024, 5, 3, 23, 30, tzinfo=UTC))  # Friday
    assert window.next_opening(datetime(2024, 5, 5, 2, 1, tzinfo=UTC)) == (
        datetime(2024, 5, 11, 23, 0, tzinfo=UTC),
        datetime(2024, 5, 12, 2, 0, tzinfo=UTC),
    )


def test_weekday_and_time_are_taken_in_the_windows_zone() -> None:
    thursday_0430_berlin = datetime(2024, 5, 2, 4, 30, tzinfo=BERLIN)  # Thursday 02:30 UTC
    assert _window("Thu 04:00", "1h", BERLIN).contains(thursday_0430_berlin)
    # The same instant seen from New York is Wednesday 22:30 there: whatever zone ``now`` is given in.
    assert _window("Thu 04:00", "1h", BERLIN).contains(thursday_0430_berlin.astimezone(NEW_YORK))
    assert not _window("Thu 04:00", "1h", NEW_YORK).contains(thursday_0430_berlin)


def test_next_opening_is_returned_in_the_windows_zone() -> None:
    opening = _window("4:00", "30m", BERLIN).next_opening(datetime(2024, 5, 2, 12, 0, tzinfo=UTC))
    assert opening is not None
    start, end = opening
    assert start == datetime(2024, 5, 3, 4, 0, tzinfo=BERLIN)
    assert start.tzinfo is BERLIN and end - start == timedelta(minutes=30)


def test_spring_forward_start_in_the_gap_opens_when_the_clocks_jump() -> None:
    opening = _window("2:30", "30m", NEW_YORK).next_opening(datetime(2024, 3, 10, 0, 0, tzinfo=NEW_YORK))
    assert opening is not None
    start, end = opening
    assert (start.hour, start.minute, start.utcoffset()) == (3, 0, timedelta(hours=-4))
    assert end.astimezone(UTC) - start.astimezone(UTC) == timedelta(minutes=30)


def test_fall_back_length_is_elapsed_time() -> None:
    window = _window("0:30", "2h", NEW_YORK)
    opening = window.next_opening(datetime(2024, 11, 3, 0, 0, tzinfo=NEW_YORK))
    assert opening is not None
    start, end = opening
    # 00:30 EDT + 2 real hours = 01:30 EST (the clock showed 01:30 twice that night).
    assert end.astimezone(UTC) - start.astimezone(UTC) == timedelta(hours=2)
    assert (end.hour, end.minute, end.utcoffset()) == (1, 30, timedelta(hours=-5))
    assert window.contains(datetime(2024, 11, 3, 1, 45, tzinfo=NEW_YORK))  # first 01:45, EDT
    assert not window.contains(datetime(2024, 11, 3, 1, 45, fold=1, tzinfo=NEW_YORK))  # second, EST


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        _window("4:00", "1h").contains(datetime(2024, 5, 2, 4, 30))


def test_the_entry_keeps_the_operators_spelling() -> None:
    assert _window("thu 4:00", " 60m").text == "thu 4:00 60m"


ZONES = [UTC, NEW_YORK, BERLIN, ZoneInfo("Australia/Lord_Howe"), timezone(timedelta(hours=5, minutes=45))]
DAYS = st.sampled_from(["", "Sun ", "mon ", "TUE ", "Wed ", "thu ", "Fri ", "sat "])


@settings(max_examples=200, deadline=None)
@given(
    day=DAYS,
    hour=st.integers(0, 23),
    minute=st.integers(0, 59),
    length_minutes=st.integers(0, 168 * 60),
    zone=st.sampled_from(ZONES),
    instant=st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2037, 12, 31), timezones=st.just(UTC)
    ),
)
def test_next_opening_properties(
    day: str, hour: int, minute: int, length_minutes: int, zone: object, instant: datetime
) -> None:
    limit = 24 * 60 if not day else 168 * 60
    length = length_minutes % (limit - 1) + 1
    window = _window(f"{day}{hour}:{minute:02d}", f"{length}m", zone)  # type: ignore[arg-type]
    now = instant.astimezone(zone)  # type: ignore[arg-type]
    opening = window.next_opening(now)
    assert opening is not None
    start, end = opening
    assert start.astimezone(UTC) >= now.astimezone(UTC)
    assert end.astimezone(UTC) - start.astimezone(UTC) == timedelta(minutes=length)
    assert window.contains(start)
    assert window.contains(end)
    assert start.astimezone(UTC) - now.astimezone(UTC) <= timedelta(days=7, hours=3)
    # Nothing opens between now and the next opening.
    just_before = (start.astimezone(UTC) - timedelta(microseconds=1)).astimezone(zone)  # type: ignore[arg-type]
    if just_before.astimezone(UTC) >= now.astimezone(UTC):
        assert window.next_opening(just_before) == opening
    current = window.current(now)
    if current is not None:
        assert current[0].astimezone(UTC) <= now.astimezone(UTC) <= current[1].astimezone(UTC)
