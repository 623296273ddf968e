"""Reboot strategies, and the path every one of them follows from "update installed" to "reboot now".

Every strategy answers the same questions, so the daemon never branches on which one it runs:

* ``can_finalize()`` — return once this node may reboot (for the lock strategies: once it holds a lock slot;
  failures are logged and retried with a doubling delay inside);
* ``abandon()`` — give back what ``can_finalize`` took, when the reboot is put off;
* ``report_steady(wait_until_steady)`` — after start-up, once the node is back and steady, release the lock
  this node may still hold from before its reboot (retried with a doubling delay; the daemon cancels it when a
  new update needs a reboot).

``clear_to_reboot`` is the path itself: wait for the reboot window, ``can_finalize``, then check the window
again.  If waiting for the lock carried the node past the window's end (coreos/bugs#1886: the original
rebooted anyway, hours outside the window), the lock is released and the node waits for the next window and
starts over. The wait for the lock is never cancelled half-way, because a lock request cut off in flight may
still have been granted; it runs to its end and the lock is then given back.  A window's end gets
``WINDOW_END_SLACK`` of grace so that a zero-length window (allowed, as in the original) still means "at that
minute".
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from coreos_common.goduration import format_go_duration
from coreos_common.window import RebootWindow

log = logging.getLogger(__name__)

WINDOW_END_SLACK = timedelta(minutes=1)
# Long sleeps are cut into pieces so that a wall-clock step (NTP at boot, a suspend) is noticed.
MAX_SLEEP_PIECE = 300.0

SteadyWait = Callable[[], Awaitable[None]]


class Clock(Protocol):
    """Wall-clock time in the local zone and a sleep; replaced by a fake in tests."""

    def now(self) -> datetime: ...

    async def sleep(self, seconds: float) -> None: ...


class Strategy(Protocol):
    name: str
    # False for ``off``: the daemon has nothing to do and exits at start-up.
    keeps_running: bool

    async def can_finalize(self) -> None: ...

    async def abandon(self) -> None: ...

    async def report_steady(self, wait_until_steady: SteadyWait) -> None: ...

    async def close(self) -> None: ...


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


def show_time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S %z %Z").rstrip()


def show_delay(seconds: float) -> str:
    return format_go_duration(seconds)


async def sleep_until(clock: Clock, when: datetime) -> None:
    """Sleep until the wall clock reaches ``when``, in pieces so that clock steps are corrected."""
    while True:
        remaining = (utc(when) - utc(clock.now())).total_seconds()
        if remaining <= 0:
            return
        await clock.sleep(min(remaining, MAX_SLEEP_PIECE))


async def wait_for_window(window: RebootWindow | None, clock: Clock) -> tuple[datetime, datetime] | None:
    """The window occurrence to reboot in, after sleeping until it opens; None when no window is set."""
    if window is None:
        log.info("No configured reboot window")
        return None
    now = clock.now()
    current = window.current(now)
    if current is not None:
        return current
    start, end = window.next_opening(now)
    log.info("%s", window.describe())
    log.info("Next window begins at %s and ends at %s", show_time(start), show_time(end))
    log.info("Waiting for %s to reboot.", show_delay(round((utc(start) - utc(now)).total_seconds())))
    await sleep_until(clock, start)
    return start, end


async def clear_to_reboot(strategy: Strategy, window: RebootWindow | None, clock: Clock) -> None:
    """Window → ``can_finalize`` → window again; returns when this node may reboot right now."""
    while True:
        occurrence = await wait_for_window(window, clock)
        await strategy.can_finalize()
        if occurrence is None:
            return
        now = clock.now()
        end = occurrence[1]
        if utc(now) <= utc(end) + WINDOW_END_SLACK:
            return
        log.info(
            "The reboot window ended at %s while this node waited for permission to reboot (now %s): "
            "giving the lock back and waiting for the next window",
            show_time(end),
            show_time(now),
        )
        await strategy.abandon()
