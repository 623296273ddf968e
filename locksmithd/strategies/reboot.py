"""``reboot``: reboot as soon as the reboot window allows, with no cluster lock at all."""

from __future__ import annotations

from locksmithd.strategies import SteadyWait

NAME = "reboot"


class RebootStrategy:
    name = NAME
    keeps_running = True

    async def can_finalize(self) -> None:
        return None

    async def abandon(self) -> None:
        return None

    async def report_steady(self, wait_until_steady: SteadyWait) -> None:
        # No lock was taken, so there is nothing to give back.
        return None

    async def close(self) -> None:
        return None
