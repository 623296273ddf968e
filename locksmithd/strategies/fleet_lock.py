"""``fleet-lock``: ask a FleetLock server (airlock, poseidon/fleetlock) before rebooting; report steady after.

Unlike Zincati, the reboot window still applies: the node waits for the window, then for the lock, and checks
the window again before rebooting (zincati#1014 cannot combine its periodic strategy with fleet_lock). The
server's URL must be set; the group must be one the protocol allows (letters, digits, ``.`` and ``-``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from locksmithd.strategies.base import StrategyContext, StrategySettingsError, StrategySpec
from locksmithd.strategies.slots import SlotKeeper, SlotStrategy

if TYPE_CHECKING:
    from locksmithd.config import DaemonSettings

LABEL = "fleet-lock"


def check(settings: DaemonSettings) -> None:
    from locksmithd.backends.fleetlock import GROUP_PATTERN

    if settings.fleetlock_url is None:
        raise StrategySettingsError(
            "the fleet-lock strategy needs the FleetLock server's base URL: set --fleetlock-url or "
            "LOCKSMITHD_FLEETLOCK_URL"
        )
    if not GROUP_PATTERN.fullmatch(settings.fleetlock_group):
        raise StrategySettingsError(
            f"{settings.source('fleetlock-group')}: FleetLock group {settings.fleetlock_group!r} is invalid: use "
            "letters, digits, '.' and '-'"
        )


def build(context: StrategyContext) -> SlotStrategy:
    from locksmithd.backends.fleetlock import FleetLockBackend

    settings, backoff = context.settings, context.settings.backoff
    assert settings.fleetlock_url is not None  # checked by check()
    backend = FleetLockBackend(
        settings.fleetlock_url,
        settings.fleetlock_group,
        backoff_initial=backoff.initial,
        backoff_max=backoff.maximum,
        sleep=context.clock.sleep,
    )
    slots = SlotKeeper(backend, settings.machine_id, backoff, context.clock, context.observer)
    return SlotStrategy(LABEL, slots, settings.fleetlock_group)


SPEC = StrategySpec(
    LABEL,
    "reboot only with permission from a FleetLock server (LOCKSMITHD_FLEETLOCK_URL, LOCKSMITHD_FLEETLOCK_GROUP)",
    build,
    check=check,
)
