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
from datetime import UTC, date, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

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


# ------------------------------------------------------------------------------------------------------------
# Window lists: several windows in one IANA time zone (the update server's office hours; reboot windows).
#
# Syntax: entries separated by ";", each "[DAYS ]H:MM LENGTH".  DAYS is a comma-separated list of day names
# or ranges ("Mon-Fri", "Sat,Sun", "Fri-Mon" wraps past Sunday); no DAYS means every day.  LENGTH is a Go
# duration, longer than zero and at most a week.  The window opens at H:MM local time on each listed day and
# stays open for LENGTH of elapsed time (end inclusive).
#
# Transitions: a start inside the hour the clocks skip opens at the first instant after the gap (the moment
# the clocks jump: 02:30 on a 02:00→03:00 night opens at 03:00); a start inside the repeated hour opens at its
# first occurrence.  (The single window above keeps its own PEP 495 rule for compatibility.)

_WEEK = 7


@dataclass(frozen=True)
class ListedWindow:
    """One entry of a window list: ``days`` (0 = Sunday … 6) or None for every day."""

    days: frozenset[int] | None
    hour: int
    minute: int
    length: timedelta
    text: str


def _parse_days(spec: str, entry: str) -> frozenset[int]:
    days: set[int] = set()
    for part in spec.split(","):
        ends = [p.strip().lower() for p in part.split("-")]
        if len(ends) not in (1, 2) or not all(ends):
            raise WindowError(f"window {entry!r}: day list {spec!r} is not names or ranges like 'Mon-Fri'")
        for name in ends:
            if name[:3] not in DAY_NAMES or name not in (name[:3], _LONG_DAY_NAMES[DAY_NAMES.index(name[:3])]):
                raise WindowError(
                    f"window {entry!r}: unknown day {name!r}, expected one of {', '.join(DAY_NAMES)}"
                )
        first = DAY_NAMES.index(ends[0][:3])
        last = DAY_NAMES.index(ends[-1][:3])
        day = first
        while True:
            days.add(day)
            if day == last:
                break
            day = (day + 1) % _WEEK
    return frozenset(days)


_LONG_DAY_NAMES = ("sunday", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday")


def parse_listed_window(entry: str) -> ListedWindow:
    """One ``[DAYS ]H:MM LENGTH`` entry."""
    fields = entry.split()
    if len(fields) not in (2, 3):
        raise WindowError(f"window {entry!r}: expected '[DAYS ]H:MM LENGTH', e.g. 'Mon-Fri 09:00 8h'")
    days = _parse_days(fields[0], entry) if len(fields) == 3 else None
    clock = _CLOCK_TIME.fullmatch(fields[-2])
    if clock is None:
        raise WindowError(f"window {entry!r}: start {fields[-2]!r} is not H:MM")
    hour, minute = int(clock.group(1)), int(clock.group(2))
    if hour > 23 or minute > 59:
        raise WindowError(f"window {entry!r}: start {fields[-2]!r} is not a time of day (00:00 to 23:59)")
    try:
        length = parse_go_duration(fields[-1])
    except DurationError as exc:
        raise WindowError(f"window {entry!r}: length: {exc}") from None
    if length <= timedelta(0) or length > WEEKLY_PERIOD:
        raise WindowError(f"window {entry!r}: length {fields[-1]!r} must be longer than 0 and at most 168h")
    return ListedWindow(days, hour, minute, length, " ".join(fields))


def _local_start(day: date, hour: int, minute: int, zone: tzinfo) -> datetime:
    """``day`` at ``hour:minute`` in ``zone`` as an instant (UTC), with the gap and fold rules above."""
    first = datetime(day.year, day.month, day.day, hour, minute, tzinfo=zone, fold=0)
    early = first.astimezone(UTC)
    wall = first.replace(tzinfo=None)
    if early.astimezone(zone).replace(tzinfo=None) == wall:
        return early  # exists (and fold=0 is its first occurrence when it is repeated)
    # In the gap: fold=1 reads the wall time with the offset after the jump, which lands before it.
    before = first.replace(fold=1).astimezone(UTC)
    low, high = min(before, early), max(before, early)
    offset_after = early.astimezone(zone).utcoffset()
    while high - low > timedelta(seconds=1):
        middle = low + (high - low) / 2
        if middle.astimezone(zone).utcoffset() == offset_after:
            high = middle
        else:
            low = middle
    return high.replace(microsecond=0) if high.microsecond else high


@dataclass(frozen=True)
class WindowList:
    """Windows in one time zone; an empty list is never open.  ``text`` keeps the operator's spelling."""

    windows: tuple[ListedWindow, ...]
    zone: tzinfo
    text: str = ""

    def _occurrences(self, now: datetime) -> Iterator[tuple[datetime, datetime]]:
        """Every opening from eight days before ``now``'s local day to eight days after (in any order)."""
        today = now.astimezone(self.zone).date()
        for window in self.windows:
            for offset in range(-8, 9):
                day = today + timedelta(days=offset)
                if window.days is not None and (day.weekday() + 1) % _WEEK not in window.days:
                    continue
                opens = _local_start(day, window.hour, window.minute, self.zone)
                yield opens, opens + window.length

    def current(self, now: datetime) -> tuple[datetime, datetime] | None:
        """The occurrence containing ``now`` that closes last (start ≤ now ≤ end), in the list's zone."""
        _require_aware(now)
        instant = now.astimezone(UTC)
        found = [(o, c) for o, c in self._occurrences(now) if o <= instant <= c]
        if not found:
            return None
        opens, closes = max(found, key=lambda pair: pair[1])
        return opens.astimezone(self.zone), closes.astimezone(self.zone)

    def contains(self, now: datetime) -> bool:
        return self.current(now) is not None

    def next_opening(self, now: datetime) -> tuple[datetime, datetime] | None:
        """The earliest occurrence opening at or after ``now``, or None for an empty list."""
        _require_aware(now)
        instant = now.astimezone(UTC)
        later = [(o, c) for o, c in self._occurrences(now) if o >= instant]
        if not later:
            return None
        opens, closes = min(later)
        return opens.astimezone(self.zone), closes.astimezone(self.zone)


def parse_window_list(text: str, zone: str | tzinfo) -> WindowList:
    """Parse ``"Mon-Fri 09:00 8h; Sat,Sun 10:00 2h"`` in ``zone`` (an IANA name such as ``Europe/Berlin``)."""
    if isinstance(zone, str):
        try:
            zone = ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise WindowError(f"time zone {zone!r} is not a known IANA time zone") from None
    entries = [part.strip() for part in text.split(";")]
    if not any(entries):
        raise WindowError(f"window list {text!r} has no windows")
    windows = tuple(parse_listed_window(entry) for entry in entries if entry)
    return WindowList(windows, zone, "; ".join(w.text for w in windows))
