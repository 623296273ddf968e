"""Go durations: Go's ParseDuration syntax, Duration.String() output, and that one reads the other back."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coreos_common.goduration import DurationError, format_go_duration, format_short_duration, parse_go_duration


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1h", timedelta(hours=1)),
        ("1h30m", timedelta(minutes=90)),
        ("90m", timedelta(minutes=90)),
        ("45s", timedelta(seconds=45)),
        ("1.5h", timedelta(minutes=90)),
        (".5h", timedelta(minutes=30)),
        ("1.h", timedelta(hours=1)),
        ("300ms", timedelta(milliseconds=300)),
        ("250us", timedelta(microseconds=250)),
        ("250µs", timedelta(microseconds=250)),
        ("1500ns", timedelta(microseconds=1)),
        ("0", timedelta(0)),
        ("+5s", timedelta(seconds=5)),
        ("-1h", timedelta(hours=-1)),
        ("1h1m1s", timedelta(hours=1, minutes=1, seconds=1)),
    ],
)
def test_go_duration_syntax(text: str, expected: timedelta) -> None:
    assert parse_go_duration(text) == expected


@pytest.mark.parametrize(
    "text", ["", "1", "1d", "h", ".", "1h 30m", "1x", "--1h", "1e3s", "٣s", "9999999999h"]
)
def test_go_duration_rejects(text: str) -> None:
    with pytest.raises(DurationError):
        parse_go_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (10, "10s"),
        (80, "1m20s"),
        (300, "5m0s"),
        (3600, "1h0m0s"),
        (10921, "3h2m1s"),
        (0.25, "250ms"),
        (0, "0s"),
    ],
)
def test_durations_print_like_go(seconds: float, text: str) -> None:
    assert format_go_duration(timedelta(seconds=seconds)) == text


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=10**12))
def test_printed_durations_parse_back(micros: int) -> None:
    value = timedelta(microseconds=micros)
    assert parse_go_duration(format_go_duration(value)) == value


def test_retry_delays_in_seconds_print_like_locksmith_logs_them() -> None:
    durations = [format_go_duration(x) for x in (10, 20, 40, 80, 160, 300, 0.25)]
    assert durations == ["10s", "20s", "40s", "1m20s", "2m40s", "5m0s", "250ms"]


@pytest.mark.parametrize(("seconds", "text"), [
    (45, "45 s"), (60, "1 min"), (5400, "90 min"), (3 * 3600, "3 h"), (86400, "24 h"), (7200, "120 min"),
    (3 * 86400, "3 d"), (90061, "25h1m1s"), (61, "1m1s"), (0.5, "500ms"), (0, "0s"),
])
def test_short_durations_use_one_unit_when_it_fits(seconds: float, text: str) -> None:
    assert format_short_duration(seconds) == text
