"""Reboot strategies: one module per strategy, one table from its label (the ``REBOOT_STRATEGY`` value) to its spec.

Each module spells its label once (``LABEL``) and exports ``SPEC`` (``base.StrategySpec``: summary, checks,
factory). Everything that lists strategies — the valid values of ``--strategy``, its help, the default — reads
this table, so a new strategy is one new module and one line below. The factories import their lock client
only when called: an idle node loads only the client its strategy uses.
"""

from __future__ import annotations

from collections.abc import Mapping

from locksmithd.strategies import best_effort, etcd_lock, fleet_lock, off, reboot
from locksmithd.strategies.base import (
    NullObserver,
    RebootStrategy,
    StrategyContext,
    StrategyObserver,
    StrategySettingsError,
    StrategySpec,
)

STRATEGIES: Mapping[str, StrategySpec] = {
    spec.label: spec for spec in (best_effort.SPEC, etcd_lock.SPEC, reboot.SPEC, off.SPEC, fleet_lock.SPEC)
}
DEFAULT = best_effort.LABEL

__all__ = [
    "DEFAULT",
    "STRATEGIES",
    "NullObserver",
    "RebootStrategy",
    "StrategyContext",
    "StrategyObserver",
    "StrategySettingsError",
    "StrategySpec",
]
