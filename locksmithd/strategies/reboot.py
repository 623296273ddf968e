"""``reboot``: reboot as soon as the reboot window allows, with no cluster lock at all."""

from __future__ import annotations

from locksmithd.backends import SlotHolding
from locksmithd.strategies.base import StrategyContext, StrategySpec

LABEL = "reboot"


class RebootStrategy:
    label = LABEL
    group = ""

    async def can_finalize(self, version: str) -> None:
        return None

    async def abandon(self) -> None:
        return None

    async def report_steady(self) -> None:
        # No lock was taken, so there is nothing to give back.
        return None

    async def holding(self) -> SlotHolding | None:
        return None  # no lock service

    async def close(self) -> None:
        return None


def build(context: StrategyContext) -> RebootStrategy:
    return RebootStrategy()


SPEC = StrategySpec(LABEL, "reboot in the reboot window, without a lock", build)
