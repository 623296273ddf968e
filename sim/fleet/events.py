"""What a simulated fleet reports while it runs, one value per happening, in the order they happen.

Rules: every event is a frozen dataclass naming the node it concerns by name (``"fleet"`` when it is no node's or
the node is unknown) and carrying the values that led to it. The fleet hands each one to its observer on the event
loop, synchronously, after updating its own records (:class:`sim.fleet.node.NodeHistory`, the fleet's violations),
so an observer may read them; an observer must not block.
"""

from __future__ import annotations

from dataclasses import dataclass

from coreos_common.status import StatusSnapshot
from sim.fleet.omaha import OmahaEventRecord, ServerInstance, ServerStep
from sim.standins.bootloader import BootChoice
from update_engine.gpt import PartitionFlags


@dataclass(frozen=True)
class Booted:
    """The bootloader chose ``choice`` (before the kernel either panics or comes up)."""

    node: str
    choice: BootChoice


@dataclass(frozen=True)
class NothingBootable:
    node: str


@dataclass(frozen=True)
class KernelPanic:
    """The simulated boot of ``choice`` failed: no daemon starts; the watchdog resets the node."""

    node: str
    choice: BootChoice


@dataclass(frozen=True)
class WatchdogReset:
    node: str


@dataclass(frozen=True)
class NoReleaseFile:
    """The chosen partition holds no release line: nothing to boot."""

    node: str
    choice: BootChoice


@dataclass(frozen=True)
class BootCompleted:
    """``boot-complete.target`` became active; ``after_reboot``: the node had been down."""

    node: str
    after_reboot: bool


@dataclass(frozen=True)
class MarkedGood:
    """update-engine marked the running partition good (successful, no tries, above the other)."""

    node: str
    label: str
    flags: PartitionFlags
    after_reboot: bool


@dataclass(frozen=True)
class DaemonDied:
    """A daemon exited by itself (not killed by a power cut or the shutdown)."""

    node: str
    daemon: str
    code: int
    log_tail: tuple[str, ...]


@dataclass(frozen=True)
class RebootIgnored:
    """logind was asked again while the node was already going down."""

    node: str
    member: str


@dataclass(frozen=True)
class TooManyDown:
    """Invariant broken: ``node`` went down while ``down`` already were, at ``max`` or more."""

    node: str
    down: tuple[str, ...]


@dataclass(frozen=True)
class RebootRequested:
    """logind accepted ``member`` (Reboot or PowerOff); the node goes down."""

    node: str
    member: str


@dataclass(frozen=True)
class PowerCut:
    """Both daemons were SIGKILLed: the node is off."""

    node: str


@dataclass(frozen=True)
class StatusChanged:
    """update-engine signalled ``snapshot``; ``previous`` is the operation before it (None: first since boot)."""

    node: str
    snapshot: StatusSnapshot
    previous: str | None


@dataclass(frozen=True)
class LockTaken:
    """``node`` appeared among the semaphore's holders; ``holders`` are all of them now, by node name."""

    node: str
    holders: tuple[str, ...]
    maximum: int


@dataclass(frozen=True)
class LockReleased:
    node: str
    holders: tuple[str, ...]
    maximum: int


@dataclass(frozen=True)
class TooManyHolders:
    """Invariant broken: a revision of the semaphore had more holders than its max."""

    revision: int
    count: int
    maximum: int


@dataclass(frozen=True)
class OmahaEventSeen:
    """The Omaha side received ``record`` from ``node``."""

    node: str
    record: OmahaEventRecord


@dataclass(frozen=True)
class ServerStatusChanged:
    """The update server's view of ``node`` took ``step`` (a grant, on hold, an event's status, complete…);
    ``instance`` is the server's record of the node as last read."""

    node: str
    step: ServerStep
    instance: ServerInstance


FleetEvent = (
    Booted | NothingBootable | KernelPanic | WatchdogReset | NoReleaseFile | BootCompleted | MarkedGood
    | DaemonDied | RebootIgnored | TooManyDown | RebootRequested | PowerCut | StatusChanged | LockTaken
    | LockReleased | TooManyHolders | OmahaEventSeen | ServerStatusChanged
)
