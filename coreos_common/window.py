"""Reboot windows and office hours: when something may happen, as lists of weekly or daily windows in a time zone.

Two spellings, one meaning:

* locksmith's pair ``REBOOT_WINDOW_START`` (``[Ddd ]H:MM``) plus ``REBOOT_WINDOW_LENGTH`` (a Go duration):
  :func:`parse_reboot_window` makes it one window-list entry. A start without a day opens every day, one with a
  day every week; the length must be shorter than the period (24 h or 168 h), as locksmith required.
* a window list (``"Mon,Wed 04:00 1h; Sat 22:00 3h"``, the update server's office hours, locksmithd's
  ``REBOOT_WINDOWS``): :func:`parse_window_list`, syntax below.

Every window lasts at least one second: a zero-length window (which locksmith accepted) opens for no time at
all, so no reboot could ever happen in it. Everything here is pure: the caller passes an aware ``now``; a
:class:`WindowList` is evaluated in its own zone, whatever ``now``'s zone is, and answers in its zone.
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
MINIMUM_LENGTH = timedelta(seconds=1)

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


# ------------------------------------------------------------------------------------------------------------
# Window lists: several windows in one IANA time zone (the update server's office hours; reboot windows).
#
# Syntax: entries separated by ";", each "[DAYS ]H:MM LENGTH".  DAYS is a comma-separated list of day names
# or ranges ("Mon-Fri", "Sat,Sun", "Fri-Mon" wraps past Sunday); no DAYS means every day.  LENGTH is a Go
# duration, at least one second and at most a week.  The window opens at H:MM local time on each listed day and
# stays open for LENGTH of elapsed time (end inclusive).
#
# Transitions: a start inside the hour the clocks skip opens at the first instant after the gap (the moment
# the clocks jump: 02:30 on a 02:00→03:00 night opens at 03:00); a start inside the repeated hour opens at its
# first occurrence.

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
    if length < MINIMUM_LENGTH or length > WEEKLY_PERIOD:
        raise WindowError(f"window {entry!r}: length {fields[-1]!r} must be at least 1s and at most 168h")
    return ListedWindow(days, hour, minute, length, " ".join(fields))


def _require_aware(now: datetime) -> None:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("windows are evaluated on aware datetimes (a time with a tzinfo)")


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
        zone = zone_named(zone)
    entries = [part.strip() for part in text.split(";")]
    if not any(entries):
        raise WindowError(f"window list {text!r} has no windows")
    windows = tuple(parse_listed_window(entry) for entry in entries if entry)
    return WindowList(windows, zone, "; ".join(w.text for w in windows))


def parse_reboot_window(start: str | None, length: str | None) -> ListedWindow | None:
    """locksmith's ``REBOOT_WINDOW_START``/``_LENGTH`` pair as one window-list entry; None when neither is set.

    Empty strings count as not set, as empty environment variables do; only one of the two is an error.
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
    if duration < MINIMUM_LENGTH:
        raise WindowError(f"reboot window length {length!r}: must be at least 1s (a shorter window never opens)")
    period = DAILY_PERIOD if begin.weekday is None else WEEKLY_PERIOD
    if duration >= period:
        kind = "daily" if begin.weekday is None else "weekly"
        raise WindowError(
            f"reboot window length {length!r}: a {kind} window (start {start!r}) must be shorter than "
            f"{format_go_duration(period)}"
        )
    days = None if begin.weekday is None else frozenset({begin.weekday})
    return ListedWindow(days, begin.hour, begin.minute, duration, f"{start.strip()} {length.strip()}")


def zone_named(name: str) -> tzinfo:
    """The IANA time zone ``name`` (``Europe/Berlin``, ``UTC``); WindowError naming it when it is unknown."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise WindowError(f"time zone {name!r} is not a known IANA time zone") from None
