"""What every reboot strategy is: the two questions it answers, what it is built from, how it is described.

Zincati's model: every strategy answers *may this node reboot now?* (``can_finalize``, which returns once it
may) and *this node is back and steady* (``report_steady``), so the daemon never branches on which strategy it
runs. ``abandon`` gives back what ``can_finalize`` took when the reboot is put off (window passed, a pre-reboot
hook failed, logind kept refusing), and ``holding`` reads whether this node holds a slot now (at start-up: one
taken before the reboot), for metrics only, no decision depends on it. A strategy that uses a lock service
decides itself when to ask again after that service failed (one backoff policy, ``DaemonSettings.backoff``),
and tells the daemon through its ``StrategyObserver`` where the request stands and what failed, for the status
line, the state file and metrics.

A ``StrategySpec`` is a strategy's entry in the table (``locksmithd.strategies.STRATEGIES``): its label (the
``REBOOT_STRATEGY`` value, spelled once, in its module), a summary, the checks of the settings it uses and the
factory that builds it. ``build`` is None for a strategy that leaves nothing to do (``off``: the daemon exits).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from locksmithd.backends import LockBackendError, LockProgress, SlotHolding
from locksmithd.clock import Clock

if TYPE_CHECKING:
    from locksmithd.config import DaemonSettings


class StrategySettingsError(ValueError):
    """A setting the strategy needs is missing or unusable; the message names it."""


class StrategyObserver(Protocol):
    """Where a strategy reports what the daemon publishes (status line, state file, metrics)."""

    def lock_progress(self, progress: LockProgress) -> None:
        """Where the request for a slot stands (asking, waiting and where in line, held)."""

    def lock_held(self, held: bool) -> None:
        """This node took (True) or gave back (False) its slot."""

    def backend_failed(self, operation: str, error: LockBackendError) -> None:
        """The lock service failed during ``operation`` (``acquire`` or ``release``); it will be asked again."""


class NullObserver:
    """An observer that publishes nothing (tests, tools)."""

    def lock_progress(self, progress: LockProgress) -> None:
        return None

    def lock_held(self, held: bool) -> None:
        return None

    def backend_failed(self, operation: str, error: LockBackendError) -> None:
        return None


class RebootStrategy(Protocol):
    """A built strategy: ``label`` is its REBOOT_STRATEGY value, ``group`` the lock group it uses ("" if none)."""

    label: str
    group: str

    async def can_finalize(self, version: str) -> None:
        """Return once this node may reboot into ``version``; retries its lock service's failures itself."""
        ...

    async def abandon(self) -> None:
        """Give back what ``can_finalize`` took: the reboot is put off."""
        ...

    async def report_steady(self) -> None:
        """The node is back and steady: give back a slot it may still hold from before its reboot."""
        ...

    async def holding(self) -> SlotHolding | None:
        """What the lock service says of this node's slot now, one read; None when there is no lock service or
        it cannot tell (or, for best-effort, does not answer). Raises LockBackendError."""
        ...

    async def close(self) -> None:
        ...


@dataclass(frozen=True)
class StrategyContext:
    """What a factory builds a strategy from."""

    settings: DaemonSettings
    clock: Clock
    observer: StrategyObserver


def _no_check(settings: DaemonSettings) -> None:
    return None


@dataclass(frozen=True)
class StrategySpec:
    """One strategy's entry in the table.

    ``check`` runs when the settings are resolved (pure: raises StrategySettingsError naming the setting);
    ``check_files`` runs once at start-up and may read the files the strategy will need (TLS keys).
    """

    label: str
    summary: str
    build: Callable[[StrategyContext], RebootStrategy] | None
    check: Callable[[DaemonSettings], None] = _no_check
    check_files: Callable[[DaemonSettings], None] = _no_check

    @property
    def runs(self) -> bool:
        """False for a strategy under which locksmithd has nothing to do and exits at start-up."""
        return self.build is not None
