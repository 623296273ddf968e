"""One simulated machine of a fleet, and its power cycle.

A node is a directory holding a node root (:mod:`sim.node`: update.conf, release file, machine id, state and run
directories), a GPT image whose USR-A holds the initial version, a private system bus with the project's D-Bus
policy, and on that bus the logind stand-in (an accepted ``Reboot``/``PowerOff`` takes the node down) and the
systemd stand-in (``boot-complete.target``); the real ``update_engine`` and ``locksmithd`` run against all of it
(:mod:`sim.fleet.daemons`). The node follows update-engine's ``StatusUpdate`` signals on its bus.

Theory of operation: the node's :class:`Phase` and every transition of it live in this file::

    BOOTING --boot-complete.target--> UP --logind accepts Reboot/PowerOff--> DOWN --boot-complete.target--> UP

A boot: the gptprio bootloader stand-in (:mod:`sim.standins.bootloader`) chooses a partition and decrements its
tries. If the node was told to fail the next boot of that slot (``fail_next_boot_of``) the kernel "panics": no
daemon starts, and ``failed_boot_time`` later the watchdog resets the node to the bootloader. Otherwise the release
file becomes the chosen slot's version, the boot id changes, ``/run`` is emptied (a tmpfs), the target is inactive
with a start job queued, both daemons start, and the target becomes active ``boot_complete_after`` later. A
reboot: logind answers, ``shutdown_after_reboot_call`` later the power goes (both daemons SIGKILLed: nothing is
shut down cleanly), ``power_off_time`` later the bootloader runs; after ``PowerOff`` the node stays off.

Rules: a node records what happened in its :class:`NodeHistory` before it reports it (:mod:`sim.fleet.events`);
time is the fleet's clock; every wait is a fixed simulated duration or a poll at ``poll_interval``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import shutil
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from coreos_common.dbus import DBusCallError, add_match
from coreos_common.status import INTERFACE, StatusSnapshot, UpdateStatus
from sim.bus import PrivateBus, start_private_bus
from sim.disks import make_usr_disk, usr_flags
from sim.fleet.daemons import NodeDaemons
from sim.fleet.events import (
    BootCompleted,
    Booted,
    DaemonDied,
    FleetEvent,
    KernelPanic,
    MarkedGood,
    NoReleaseFile,
    NothingBootable,
    PowerCut,
    RebootIgnored,
    RebootRequested,
    StatusChanged,
    WatchdogReset,
)
from sim.fleet.omaha import OmahaEventRecord, ServerInstance
from sim.node import NodeRoot, make_node_root, update_engine_args
from sim.standins.bootloader import BootChoice, gptprio_next, stamp_version
from sim.standins.login1 import Login1Manager, start_login1
from sim.standins.systemd import BootCompleteUnit, start_systemd_standin
from sim.tools import UPDATE_ENGINE_POLICY, VENV_BIN
from update_engine import gpt


class Phase(enum.Enum):
    BOOTING = "booting"  # the fleet's first boot of the node, not counted as down
    UP = "up"  # since boot-complete.target
    DOWN = "down"  # from logind's accepted Reboot/PowerOff to boot-complete.target of the next boot


@dataclass(frozen=True)
class NodeTiming:
    """Simulated durations, in seconds."""

    boot_complete_after: float = 2.0  # daemons started → boot-complete.target active
    shutdown_after_reboot_call: float = 0.2  # logind answers the call, then the power goes
    power_off_time: float = 1.0  # power cut → bootloader
    failed_boot_time: float = 2.0  # kernel panic → reset
    first_check_delay: int = 2  # update_engine --first-check-delay
    check_interval: int = 3600  # update_engine --check-interval
    poll_interval: float = 0.25  # GPT flags while waiting for the healthy-boot marking; update_engine's target poll


@dataclass
class BootRecord:
    at: float
    choice: BootChoice
    failed: bool = False
    complete_at: float | None = None
    marked_good_at: float | None = None


@dataclass
class NodeHistory:
    """What happened to a node, as the fleet saw it; times are the fleet's clock."""

    initial_version: str
    boots: list[BootRecord] = field(default_factory=list)
    reboot_calls: list[float] = field(default_factory=list)
    operation: str | None = None  # update-engine's status; None: not heard from since the boot
    first_check_at: float | None = None
    installed_at: float | None = None
    lock_taken_at: float | None = None
    lock_released_at: float | None = None
    holding: bool = False
    omaha_events: list[OmahaEventRecord] = field(default_factory=list)
    server: ServerInstance | None = None  # the update server's record of the node, as last read
    server_status: str | None = None  # the server's status of the node, as last told (ServerStatusChanged)
    granted_at: float | None = None  # when the server's (first) grant was seen
    problems: list[str] = field(default_factory=list)

    @property
    def current_boot(self) -> BootRecord | None:
        return self.boots[-1] if self.boots else None

    @property
    def version(self) -> str:
        """The version running now (the initial one before the first boot)."""
        boot = self.current_boot
        return self.initial_version if boot is None or boot.choice.version is None else boot.choice.version


def is_marked_good(flags: Mapping[str, gpt.PartitionFlags], label: str) -> bool:
    """What update-engine's healthy-boot marking leaves: successful, no tries, above the other slot."""
    own = flags[label]
    others = [f.priority for name, f in flags.items() if name != label]
    return own.successful and own.tries == 0 and all(own.priority > p for p in others)


class NodeHost(Protocol):
    """The fleet, as a node sees it."""

    def now(self) -> float: ...

    def emit(self, event: FleetEvent) -> None: ...

    def spawn(self, coro: Coroutine[Any, Any, None], owner: FleetNode | None) -> None: ...

    def going_down(self, node: FleetNode) -> None:
        """``node`` is about to go down (checks how many are down already)."""
        ...

    async def catch_up(self) -> None:
        """Bring the fleet's view of the semaphore up to date (the lock is taken before logind is called)."""
        ...


class _RebootingLogind(Login1Manager):
    """The logind stand-in: records ``Reboot``/``PowerOff`` as the tests' one does, then the node goes down."""

    def __init__(self, node: FleetNode) -> None:
        super().__init__()
        self._node = node

    def _record(self, member: str, interactive: bool) -> None:
        super()._record(member, interactive)
        self._node.logind_accepted(member)


class FleetNode:
    """One simulated machine (see the module); made by :meth:`create`, driven by :meth:`boot`."""

    def __init__(self, host: NodeHost, index: int, workdir: Path, root: NodeRoot, disk: Path, bus: PrivateBus,
                 public_key: Path, timing: NodeTiming, initial_version: str) -> None:  # fmt: skip
        self.host = host
        self.index = index
        self.workdir = workdir
        self.root = root
        self.disk = disk
        self.bus = bus
        self.public_key = public_key
        self.timing = timing
        self.phase = Phase.BOOTING
        self.fail_next_boot_of: str | None = None  # a slot label: its next boot panics
        self.history = NodeHistory(initial_version)
        self.daemons = NodeDaemons(workdir, self._daemon_died)
        self.unit: BootCompleteUnit | None = None
        self.connections: list[MessageBus] = []

    @property
    def name(self) -> str:
        return f"node-{self.index}"

    @property
    def machine_id(self) -> str:
        return self.root.machine_id

    @classmethod
    async def create(cls, host: NodeHost, index: int, workdir: Path, *, version: str, usr_mib: int,
                     update_conf: Mapping[str, str], public_key: Path, timing: NodeTiming) -> FleetNode:  # fmt: skip
        """A node running ``version`` from USR-A, configured by ``update_conf``, with its bus and stand-ins."""
        root = make_node_root(workdir / "root", version=version)
        root.set_update_conf(**update_conf)
        root.state_dir.mkdir(parents=True, exist_ok=True)
        disk = await asyncio.to_thread(make_usr_disk, workdir / "disk.img", usr_mib=usr_mib)
        await asyncio.to_thread(stamp_version, disk, "USR-A", version)
        bus = await asyncio.to_thread(start_private_bus, workdir / "dbus", [UPDATE_ENGINE_POLICY])
        node = cls(host, index, workdir, root, disk, bus, public_key, timing, version)
        try:
            node.connections.append((await start_login1(bus.address, manager=_RebootingLogind(node))).bus)
            systemd = await start_systemd_standin(bus.address)
            node.connections.append(systemd.bus)
            node.unit = systemd.unit
            node.connections.append(await node._follow_status())
        except BaseException:
            await node.close()
            raise
        return node

    async def _follow_status(self) -> MessageBus:
        """Subscribe to update-engine's StatusUpdate signals on the node's bus."""
        bus = await MessageBus(bus_address=self.bus.address, bus_type=BusType.SYSTEM).connect()

        def handler(message: Message) -> None:
            if (message.message_type is MessageType.SIGNAL and message.interface == INTERFACE
                    and message.member == "StatusUpdate"):  # fmt: skip
                try:
                    snapshot = StatusSnapshot.from_values(message.body)
                except ValueError:
                    return
                self._status(snapshot)

        bus.add_message_handler(handler)
        try:
            await add_match(bus, f"type='signal',interface='{INTERFACE}',member='StatusUpdate'")
        except DBusCallError as exc:
            bus.disconnect()
            raise RuntimeError(f"AddMatch on {self.name}'s bus failed: {exc}") from exc
        return bus

    # -- booting -------------------------------------------------------------------------------------------------

    async def boot(self) -> None:
        """The bootloader, then the boot: release file, boot id, an empty /run, the daemons."""
        host, history = self.host, self.history
        while True:
            choice = await asyncio.to_thread(gptprio_next, self.disk)
            if choice is None:
                history.problems.append("no bootable USR partition")
                host.emit(NothingBootable(self.name))
                return
            record = BootRecord(host.now(), choice)
            history.boots.append(record)
            host.emit(Booted(self.name, choice))
            if self.fail_next_boot_of == choice.label:
                self.fail_next_boot_of = None
                record.failed = True
                host.emit(KernelPanic(self.name, choice))
                await asyncio.sleep(self.timing.failed_boot_time)
                host.emit(WatchdogReset(self.name))
                continue
            if choice.version is None:
                history.problems.append(f"{choice.label} has no release file")
                host.emit(NoReleaseFile(self.name, choice))
                return
            break
        self.root.set_version(choice.version)
        self.root.new_boot()
        shutil.rmtree(self.root.run_dir, ignore_errors=True)
        self.root.run_dir.mkdir(parents=True)
        assert self.unit is not None
        self.unit.state = "inactive"  # with a start job queued (see BootCompleteUnit.Job): both daemons wait
        history.operation = None
        banner = f"--- boot {len(history.boots)}: {choice.label} {choice.version} at {host.now():.1f}s ---\n"
        await self.daemons.start(self._commands(choice.label), banner)
        host.spawn(self._complete_boot(record), self)

    def _commands(self, booted: str) -> dict[str, list[str]]:
        t = self.timing
        return {
            "update_engine": update_engine_args(
                self.root, self.disk, booted, self.public_key, "--bus-address", self.bus.address,
                "--first-check-delay", str(t.first_check_delay), "--check-interval", str(t.check_interval),
                "--boot-complete-poll", str(t.poll_interval),
            ),
            "locksmithd": [
                str(VENV_BIN / "locksmithd"), "--bus-address", self.bus.address, "--config-root", str(self.root.root),
            ],
        }  # fmt: skip

    async def _complete_boot(self, record: BootRecord) -> None:
        """boot-complete.target a moment after the daemons start; then wait for the slot to be marked good."""
        await asyncio.sleep(self.timing.boot_complete_after)
        assert self.unit is not None
        self.unit.state = "active"
        record.complete_at = self.host.now()
        was_down = self.phase is Phase.DOWN
        self.phase = Phase.UP
        self.host.emit(BootCompleted(self.name, after_reboot=was_down))
        label = record.choice.label
        while True:
            flags = await asyncio.to_thread(usr_flags, self.disk)
            if is_marked_good(flags, label):
                record.marked_good_at = self.host.now()
                self.host.emit(MarkedGood(self.name, label, flags[label], len(self.history.boots) > 1))
                return
            await asyncio.sleep(self.timing.poll_interval)

    # -- what the daemons do -------------------------------------------------------------------------------------

    def _status(self, snapshot: StatusSnapshot) -> None:
        op = snapshot.current_operation
        history = self.history
        previous, history.operation = history.operation, op
        if previous is not None and op != previous:
            if op == UpdateStatus.CHECKING_FOR_UPDATE.value and history.first_check_at is None:
                history.first_check_at = self.host.now()
            elif op == UpdateStatus.UPDATED_NEED_REBOOT.value and history.installed_at is None:
                history.installed_at = self.host.now()
        self.host.emit(StatusChanged(self.name, snapshot, previous))

    def _daemon_died(self, daemon: str, code: int, log_tail: tuple[str, ...]) -> None:
        self.history.problems.append(f"{daemon} exited with status {code}")
        self.host.emit(DaemonDied(self.name, daemon, code, log_tail))

    # -- going down ----------------------------------------------------------------------------------------------

    def logind_accepted(self, member: str) -> None:
        """logind accepted Reboot (or PowerOff): the node goes down, unless it is already."""
        self.history.reboot_calls.append(self.host.now())
        if self.phase is Phase.DOWN:
            self.history.problems.append(f"{member} requested twice for one reboot")
            self.host.emit(RebootIgnored(self.name, member))
            return
        self.host.going_down(self)
        self.phase = Phase.DOWN
        self.host.spawn(self._go_down(member), self)

    async def _go_down(self, member: str) -> None:
        await self.host.catch_up()
        self.host.emit(RebootRequested(self.name, member))
        await asyncio.sleep(self.timing.shutdown_after_reboot_call)
        assert self.unit is not None
        self.unit.state = "inactive"
        await self.daemons.kill()
        self.host.emit(PowerCut(self.name))
        if member == "Reboot":
            await asyncio.sleep(self.timing.power_off_time)
            await self.boot()

    # -- the end -------------------------------------------------------------------------------------------------

    async def close(self) -> None:
        """Disconnect the stand-ins and the status follower, stop the bus (the daemons are stopped before)."""
        for connection in self.connections:
            connection.disconnect()
        for connection in self.connections:
            # Awaited, so that how the connection ended (often EOFError) is taken, not reported at exit.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.wait_for_disconnect(), 5)  # type: ignore[no-untyped-call]
        self.connections.clear()
        await asyncio.to_thread(self.bus.stop)

