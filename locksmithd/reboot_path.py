"""The path every strategy follows from "update installed" to "reboot now".

``clear_to_reboot`` waits for the reboot window, asks the strategy (``can_finalize``), then checks the window
again.  If waiting for the lock carried the node past the window's end (coreos/bugs#1886: the original
rebooted anyway, hours outside the window), the lock is given back and the node waits for the next window and
starts over. The wait for the lock is never cancelled half-way, because a lock request cut off in flight may
still have been granted; it runs to its end and the lock is then given back. The windows are a list in one time
zone (``coreos_common.window``), however they were spelled.
"""

from __future__ import annotations

import logging
from datetime import datetime

from coreos_common.window import WindowList
from locksmithd.clock import Clock, seconds_between, show_delay, show_time, sleep_until, utc
from locksmithd.strategies import RebootStrategy

log = logging.getLogger(__name__)


async def wait_for_window(
    windows: WindowList | None, description: str, clock: Clock
) -> tuple[datetime, datetime] | None:
    """The window occurrence to reboot in, after sleeping until it opens; None when no window is set."""
    if windows is None:
        log.info("No configured reboot window")
        return None
    now = clock.now()
    current = windows.current(now)
    if current is not None:
        return current
    opening = windows.next_opening(now)
    assert opening is not None  # a list from the settings has at least one window
    start, end = opening
    log.info("%s", description)
    log.info("Next window begins at %s and ends at %s", show_time(start), show_time(end))
    log.info("Waiting for %s to reboot.", show_delay(round(seconds_between(now, start))))
    await sleep_until(clock, start)
    return start, end


async def clear_to_reboot(
    strategy: RebootStrategy, windows: WindowList | None, description: str, clock: Clock, version: str
) -> None:
    """Window → ``can_finalize`` → window again; returns when this node may reboot right now."""
    while True:
        occurrence = await wait_for_window(windows, description, clock)
        await strategy.can_finalize(version)
        if occurrence is None:
            return
        now = clock.now()
        end = occurrence[1]
        if utc(now) <= utc(end):
            return
        log.info(
            "The reboot window ended at %s while this node waited for permission to reboot (now %s): "
            "giving the lock back and waiting for the next window",
            show_time(end),
            show_time(now),
        )
        await strategy.abandon()
