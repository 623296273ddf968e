"""Reboot windows: ``REBOOT_WINDOW_START`` (``[Ddd ]H:MM``) plus ``REBOOT_WINDOW_LENGTH`` (a Go duration).

A window without a day opens every day, one with a day every week; it spans ``[start, start + length]`` with
an inclusive end and may run past midnight or past Saturday into Sunday.  Everything here is pure: the caller
passes an aware ``now`` and the window is evaluated in ``now.tzinfo``, which the daemon sets to the local time
zone.

Time-zone transitions: the start is a wall-clock time on a calendar day, turned into an instant the way PEP
495 does (``fold=0``): on the day the clocks go forward a start inside the skipped hour opens one gap later
(``02:30`` opens at ``03:30`` after a one-hour jump), and on the day they go back a repeated start opens at
its first occurrence.  The length is elapsed time, so a ``1h`` window always lasts one real hour.  Give
``now`` a ``zoneinfo.ZoneInfo`` to get this; with a fixed-offset tzinfo there are simply no transitions.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from coreos_common.goduration import DurationError, format_go_duration, parse_go_duration

DAY_NAMES: tuple[str, ...] = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")

DAILY_PERIOD = timedelta(hours=24)
WEEKLY_PERIOD = timedelta(days=7)

_CLOCK_TIME = re.compile(r"([0-9]+):([0-9]+)")


class WindowError(ValueError):
    """A reboot-window setting cannot be parsed or is out of range; the message names the input."""


@dataclass(frozen=True)
class WindowStart:
    """When a window opens: ``weekday`` is 0 (Sunday) … 6 (Saturday), or None for every day."""

    weekday: int | None
    hour: int
    minute: int

    def __str__(self) -> str:
        clock = f"{self.hour:02d}:{self.minute:02d}"
        if self.weekday is None:
            return clock
        return f"{DAY_NAMES[self.weekday].capitalize()} {clock}"


def parse_window_start(text: str) -> WindowStart:
    """Parse ``H:MM`` or ``Ddd H:MM`` (``sun``…``sat`` in any case; hour 0-23, minute 0-59, seconds always 0).

    Hour and minute are plain decimal numbers of any width (``4:00``, ``04:5``); unlike a C ``%d:%d`` scan,
    trailing text is an error rather than silently dropped.
    """
    fields = text.split()
    if len(fields) not in (1, 2):
        raise WindowError(f"reboot window start {text!r}: expected 'H:MM' or 'Ddd H:MM' (e.g. 'Thu 04:00')")
    weekday: int | None = None
    if len(fields) == 2:
        day = fields[0].lower()
        if day not in DAY_NAMES:
            raise WindowError(
                f"reboot window start {text!r}: unknown day {fields[0]!r}, "
                f"expected one of {', '.join(DAY_NAMES)}"
            )
        weekday = DAY_NAMES.index(day)
    clock = _CLOCK_TIME.fullmatch(fields[-1])
    if clock is None:
        raise WindowError(f"reboot window start {text!r}: time {fields[-1]!r} is not H:MM")
    hour, minute = int(clock.group(1)), int(clock.group(2))
    if hour > 23:
        raise WindowError(f"reboot window start {text!r}: hour {hour} is not between 0 and 23")
    if minute > 59:
        raise WindowError(f"reboot window start {text!r}: minute {minute} is not between 0 and 59")
    return WindowStart(weekday, hour, minute)


@dataclass(frozen=True)
class RebootWindow:
    """A daily or weekly window; ``start_text``/``length_text`` keep the operator's spelling for log lines."""

    start: WindowStart
    length: timedelta
    start_text: str = ""
    length_text: str = ""

    @property
    def period(self) -> timedelta:
        return DAILY_PERIOD if self.start.weekday is None else WEEKLY_PERIOD

    def _openings_around(self, now: datetime) -> Iterator[tuple[datetime, datetime]]:
        """Every occurrence starting from a week before ``now``'s calendar day to a week after, in order."""
        tz = now.tzinfo
        today = now.date()
        for offset in range(-8, 9):
            day: date = today + timedelta(days=offset)
            # date.weekday() is Monday=0; ours is Sunday=0.
            if self.start.weekday is not None and (day.weekday() + 1) % 7 != self.start.weekday:
                continue
            wall = datetime(day.year, day.month, day.day, self.start.hour, self.start.minute, tzinfo=tz)
            opens = wall.astimezone(UTC)
            yield opens, opens + self.length

    def current(self, now: datetime) -> tuple[datetime, datetime] | None:
        """The occurrence that contains ``now`` (start ≤ now ≤ end), or None; times in ``now``'s zone."""
        _require_aware(now)
        instant = now.astimezone(UTC)
        found = None
        for opens, closes in self._openings_around(now):
            if opens <= instant <= closes:
                found = (opens, closes)  # the latest one wins when a zero-gap overlap touches two
        if found is None:
            return None
        return found[0].astimezone(now.tzinfo), found[1].astimezone(now.tzinfo)

    def contains(self, now: datetime) -> bool:
        """True when ``now`` is inside a window (the end is inclusive)."""
        return self.current(now) is not None

    def next_opening(self, now: datetime) -> tuple[datetime, datetime]:
        """The earliest occurrence that opens at or after ``now``, as (start, end) in ``now``'s zone."""
        _require_aware(now)
        instant = now.astimezone(UTC)
        for opens, closes in self._openings_around(now):
            if opens >= instant:
                return opens.astimezone(now.tzinfo), closes.astimezone(now.tzinfo)
        raise AssertionError("a daily or weekly window always opens within eight days")  # pragma: no cover

    def describe(self) -> str:
        start = self.start_text or str(self.start)
        length = self.length_text or format_go_duration(self.length)
        return f'Reboot window start is "{start}" and length is "{length}"'


def _require_aware(now: datetime) -> None:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("reboot windows are evaluated on aware datetimes (local time with a tzinfo)")


def parse_reboot_window(start: str | None, length: str | None) -> RebootWindow | None:
    """Build the window from the two settings; None when neither is set, an error when only one is.

    Empty strings count as not set, as empty environment variables do.
    """
    if not start and not length:
        return None
    if not start or not length:
        raise WindowError("Either both or neither $REBOOT_WINDOW_START and $REBOOT_WINDOW_LENGTH must be set")
    begin = parse_window_start(start)
    try:
        duration = parse_go_duration(length.strip())
    except DurationError as exc:
        raise WindowError(f"reboot window length {length!r}: {exc}") from None
    if duration < timedelta(0):
        raise WindowError(f"reboot window length {length!r}: must not be negative")
    period = DAILY_PERIOD if begin.weekday is None else WEEKLY_PERIOD
    if duration >= period:
        kind = "daily" if begin.weekday is None else "weekly"
        raise WindowError(
            f"reboot window length {length!r}: a {kind} window (start {start!r}) must be shorter than "
            f"{format_go_duration(period)}"
        )
    return RebootWindow(begin, duration, start_text=start.strip(), length_text=length.strip())
