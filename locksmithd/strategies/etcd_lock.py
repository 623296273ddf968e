"""``etcd-lock``: take a slot of the etcd semaphore before rebooting, give it back once the node is steady.

The semaphore is locksmith's (``locksmithd.semaphore``), kept in etcd v3 and waited for in a line with watches
(``locksmithd.backends.etcd``); in v2 compatibility mode locksmith's v2 semaphore is held too. The etcd client is
imported only when this strategy (or ``best-effort``) is built: a node with another strategy never loads it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from locksmithd.backends import LockBackend, LockBackendError
from locksmithd.strategies.base import StrategyContext, StrategySettingsError, StrategySpec
from locksmithd.strategies.slots import SlotKeeper, SlotStrategy

if TYPE_CHECKING:
    from locksmithd.config import DaemonSettings

LABEL = "etcd-lock"


def check_etcd_files(settings: DaemonSettings) -> None:
    """The endpoints parse and the TLS files can be read (the etcd strategies' start-up check)."""
    try:
        settings.etcd.validate()
    except LockBackendError as exc:
        raise StrategySettingsError(f"etcd settings: {exc}") from None


def etcd_backend(settings: DaemonSettings) -> LockBackend:
    from locksmithd.backends.etcd.backend import EtcdLockBackend

    return EtcdLockBackend(settings.etcd)


def build(context: StrategyContext) -> SlotStrategy:
    settings = context.settings
    slots = SlotKeeper(etcd_backend(settings), settings.machine_id, settings.backoff, context.clock, context.observer)
    return SlotStrategy(LABEL, slots, settings.group)


SPEC = StrategySpec(
    LABEL,
    "reboot only while holding a slot of the etcd semaphore (LOCKSMITHD_ENDPOINT, LOCKSMITHD_GROUP)",
    build,
    check_files=check_etcd_files,
)
