"""``off``: locksmithd does not coordinate reboots on this node; the daemon says so and exits with status 0.

Exit status 0 matters: the unit restarts locksmithd only on failure, so ``off`` stays off.
"""

from __future__ import annotations

from locksmithd.strategies.base import StrategySpec

LABEL = "off"

SPEC = StrategySpec(LABEL, "do not reboot: locksmithd exits at start", None)
