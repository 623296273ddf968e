"""``off``: locksmithd does not coordinate reboots on this node; the daemon says so and exits with status 0.

Exit status 0 matters: the unit restarts locksmithd only on failure, so ``off`` stays off.
"""

from __future__ import annotations

from locksmithd.strategies import SteadyWait

NAME = "off"
EXIT_MESSAGE = 'Reboot strategy is "off" - locksmithd is exiting.'


class OffStrategy:
    name = NAME
    keeps_running = False

    async def can_finalize(self) -> None:
        raise RuntimeError("the off strategy never reboots")

    async def abandon(self) -> None:
        return None

    async def report_steady(self, wait_until_steady: SteadyWait) -> None:
        return None

    async def close(self) -> None:
        return None
