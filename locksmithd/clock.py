"""Time for locksmithd: the wall clock in the local zone and a sleep, behind one protocol tests replace.

Rules: decisions that depend on the time (reboot windows, "since when", backoff deadlines) take the time from a
``Clock`` and never call ``datetime.now()`` or ``asyncio.sleep`` themselves, so a fake clock can walk a test
through a daylight-saving change in milliseconds. Aware datetimes are compared in UTC (``utc``): two datetimes
sharing a ``ZoneInfo`` compare as wall-clock times, which is wrong across a transition.
"""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from coreos_common.goduration import format_go_duration

# Long sleeps are cut into pieces so that a wall-clock step (NTP at boot, a suspend) is noticed.
MAX_SLEEP_PIECE = 300.0


class Clock(Protocol):
    """Wall-clock time in the local zone and a sleep; replaced by a fake in tests."""

    def now(self) -> datetime: ...

    async def sleep(self, seconds: float) -> None: ...


def local_timezone() -> tzinfo:
    """The process's time zone with its transition rules: ``$TZ`` if it names a zone, else /etc/localtime."""
    name = os.environ.get("TZ", "").lstrip(":")
    if name:
        try:
            if name.startswith("/"):
                with open(name, "rb") as handle:
                    return ZoneInfo.from_file(handle, key=name)
            return ZoneInfo(name)
        except (OSError, ValueError, ZoneInfoNotFoundError):
            pass
    try:
        with open("/etc/localtime", "rb") as handle:
            return ZoneInfo.from_file(handle, key="localtime")
    except (OSError, ValueError):
        pass
    fixed = datetime.now().astimezone().tzinfo
    return fixed if fixed is not None else UTC


class SystemClock:
    def __init__(self, zone: tzinfo | None = None) -> None:
        self.zone = zone if zone is not None else local_timezone()

    def now(self) -> datetime:
        return datetime.now(self.zone)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def utc(moment: datetime) -> datetime:
    """Aware datetimes sharing a tzinfo compare as wall-clock times; in UTC they compare as elapsed time."""
    return moment.astimezone(UTC)


def seconds_between(earlier: datetime, later: datetime) -> float:
    """Elapsed seconds from ``earlier`` to ``later`` (negative when ``later`` is before)."""
    return (utc(later) - utc(earlier)).total_seconds()


def show_time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S %z %Z").rstrip()


def show_delay(delay: timedelta | float) -> str:
    """A delay as a Go duration (``1m30s``), as locksmith logged its waits."""
    return format_go_duration(delay)


async def sleep_until(clock: Clock, when: datetime) -> None:
    """Sleep until the wall clock reaches ``when``, in pieces so that clock steps are corrected."""
    while True:
        remaining = seconds_between(clock.now(), when)
        if remaining <= 0:
            return
        await clock.sleep(min(remaining, MAX_SLEEP_PIECE))
