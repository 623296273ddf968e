"""The simulated fleet: nodes, one etcd member holding the reboot semaphore, and the Omaha side, composed.

Theory of operation, in the order a caller drives it: :meth:`Fleet.start_etcd` starts one real etcd member, sets the
semaphore's max with ``locksmithctl set-max`` and follows the key revision by revision; :meth:`Fleet.start_omaha`
starts the pluggable Omaha side (:mod:`sim.fleet.omaha`) and polls what it records (the events it receives, and the
server's view of each node when it keeps one); :meth:`Fleet.add_node` makes a node configured for both
(``REBOOT_STRATEGY=etcd-lock``, short lock backoffs); :meth:`Fleet.boot_all` boots them. From then on the run is the
caller's: it reads the nodes' histories and waits for what it expects. :meth:`Fleet.shutdown` stops everything, each
step even when an earlier one failed.

Rules: what no run may break is checked here as it happens and recorded in ``violations`` (and reported as an
event): a node going down while ``max`` nodes are down already, a revision of the semaphore with more holders than
its max, an invalid semaphore value. An exception in a background task is recorded as a problem of the node it
ran for (or as a fleet violation), never lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from locksmithd.backends.etcd import ops
from locksmithd.backends.etcd.client import EtcdClient
from locksmithd.backends.etcd_settings import EtcdSettings
from locksmithd.semaphore import SEMAPHORE_KEY, SemaphoreError
from sim.etcd import EtcdCluster
from sim.fleet.events import (
    FleetEvent,
    LockReleased,
    LockTaken,
    OmahaEventSeen,
    ServerStatusChanged,
    TooManyDown,
    TooManyHolders,
)
from sim.fleet.node import FleetNode, NodeTiming, Phase
from sim.fleet.omaha import GRANTED, OmahaEventRecord, OmahaSide, ServerInstance, ServerSnapshot, server_steps
from sim.fleet.semaphore import KeyChange, SemaphoreView, SemaphoreWatch
from sim.tools import VENV_BIN

log = logging.getLogger(__name__)

Step = Callable[[], Coroutine[Any, Any, None]]


class Fleet:
    """Nodes, etcd and the Omaha side on this machine (see the module); ``observer`` hears every event."""

    def __init__(self, workdir: Path, omaha: OmahaSide, public_key: Path, observer: Callable[[FleetEvent], None],
                 clock: Callable[[], float], *, semaphore_max: int = 1, group: str = "stable", usr_mib: int = 8,
                 timing: NodeTiming | None = None) -> None:  # fmt: skip
        self.workdir = workdir
        self.omaha = omaha
        self.public_key = public_key
        self.observer = observer
        self.clock = clock
        self.semaphore_max = semaphore_max
        self.group = group
        self.usr_mib = usr_mib
        self.timing = timing or NodeTiming()
        self.nodes: list[FleetNode] = []
        self.by_machine_id: dict[str, FleetNode] = {}
        self.etcd: EtcdCluster | None = None
        self.store: EtcdClient | None = None
        self.view: SemaphoreView | None = None
        self.watch: SemaphoreWatch | None = None
        self.omaha_started = False
        self.omaha_events_seen = 0
        self.violations: list[str] = []
        self.too_many_down = False
        self.too_many_holders = False
        self.max_down = 0
        self.tasks: set[asyncio.Task[None]] = set()

    # -- what nodes ask of the fleet (NodeHost) ------------------------------------------------------------------

    def now(self) -> float:
        return self.clock()

    def emit(self, event: FleetEvent) -> None:
        self.observer(event)

    def spawn(self, coro: Coroutine[Any, Any, None], owner: FleetNode | None = None) -> None:
        """Run ``coro`` in the background; an exception in it is a problem of ``owner`` (or of the fleet)."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self.tasks.discard(t)
            if t.cancelled() or t.exception() is None:
                return
            exc = t.exception()
            log.error("background task failed", exc_info=exc)
            (owner.history.problems if owner is not None else self.violations).append(f"internal error: {exc!r}")

        task.add_done_callback(done)

    def going_down(self, node: FleetNode) -> None:
        down = [n for n in self.nodes if n.phase is Phase.DOWN]
        if len(down) >= self.semaphore_max:
            names = ", ".join(n.name for n in down)
            self.too_many_down = True
            self.violations.append(f"{node.name} went down at {self.now():.1f}s while {names} was down "
                                   f"(max {self.semaphore_max})")  # fmt: skip
            self.emit(TooManyDown(node.name, tuple(n.name for n in down)))
        self.max_down = max(self.max_down, len(down) + 1)

    async def catch_up(self) -> None:
        """Read the semaphore directly: locksmithd wrote the lock before it called logind, and the watch may be
        a moment late."""
        if self.store is None:
            return
        try:
            snapshot = await self.store.run(ops.read(self.store.session, self.store.keys))
            semaphore, revision = snapshot.semaphore, snapshot.revision
        except Exception as exc:
            log.warning("reading the semaphore: %s", exc)
            return
        self._semaphore_changed(KeyChange(revision, semaphore.encode().encode()))

    # -- names -------------------------------------------------------------------------------------------------

    def node_of(self, machine_id: str) -> FleetNode | None:
        return self.by_machine_id.get(machine_id.lower())

    def node_name(self, machine_id: str) -> str:
        node = self.node_of(machine_id)
        return node.name if node is not None else machine_id[:12]

    # -- set-up ------------------------------------------------------------------------------------------------

    @property
    def etcd_endpoint(self) -> str:
        if self.etcd is None:
            raise RuntimeError("etcd is not started")
        return self.etcd.endpoint(0)

    async def start_etcd(self) -> str:
        """One etcd member, the semaphore's max set with locksmithctl (whose answer is returned), followed."""
        self.etcd = EtcdCluster(1, self.workdir / "etcd")
        await asyncio.to_thread(self.etcd.start_all)
        proc = await asyncio.create_subprocess_exec(
            str(VENV_BIN / "locksmithctl"), "-endpoint", self.etcd_endpoint, "set-max", str(self.semaphore_max),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        text = " ".join(out.decode(errors="replace").split("\n")).strip()
        if proc.returncode != 0:
            raise RuntimeError(f"locksmithctl set-max {self.semaphore_max} failed: {text}")
        self.store = EtcdClient(EtcdSettings(endpoints=(self.etcd_endpoint,)))
        snapshot = await self.store.run(ops.read(self.store.session, self.store.keys))
        semaphore, revision = snapshot.semaphore, snapshot.revision
        self.view = SemaphoreView(semaphore, revision)
        self.watch = SemaphoreWatch(self.store, revision, self._semaphore_changed)
        self.watch.start()
        return text

    async def start_omaha(self) -> None:
        """The Omaha side, and a task following what it records."""
        self.omaha_started = True
        await self.omaha.start(self.workdir / "omaha")
        self.spawn(self._follow_omaha_side())

    async def add_node(self, index: int, *, version: str) -> FleetNode:
        """Node ``index`` running ``version``, asking the Omaha side for updates and locking through etcd."""
        update_conf = {
            "SERVER": self.omaha.node_url, "GROUP": self.group, "REBOOT_STRATEGY": "etcd-lock",
            "LOCKSMITHD_ENDPOINT": self.etcd_endpoint, "LOCKSMITHD_BACKOFF_INITIAL": "250ms",
            "LOCKSMITHD_BACKOFF_MAX": "1s",
        }  # fmt: skip
        node = await FleetNode.create(
            self, index, self.workdir / f"node-{index}", version=version, usr_mib=self.usr_mib,
            update_conf=update_conf, public_key=self.public_key, timing=self.timing,
        )  # fmt: skip
        self.nodes.append(node)
        self.by_machine_id[node.machine_id.lower()] = node
        return node

    async def boot_all(self) -> None:
        await asyncio.gather(*(node.boot() for node in self.nodes))

    # -- following -------------------------------------------------------------------------------------------------

    def _semaphore_changed(self, change: KeyChange) -> None:
        """A revision of the semaphore key (from the watch or read directly; each is handled once)."""
        if self.view is None:
            return
        try:
            step = self.view.apply(change)
        except SemaphoreError as exc:
            self.violations.append(f"semaphore revision {change.revision} is invalid: {exc}")
            return
        if step is None:
            return
        names = tuple(sorted(self.node_name(h) for h in step.holders))
        for holder in step.taken:
            node = self.node_of(holder)
            if node is not None:
                node.history.lock_taken_at, node.history.holding = self.now(), True
            self.emit(LockTaken(node.name if node else "fleet", names, step.maximum))
        for holder in step.released:
            node = self.node_of(holder)
            if node is not None:
                node.history.lock_released_at, node.history.holding = self.now(), False
            self.emit(LockReleased(node.name if node else "fleet", names, step.maximum))
        if step.holders and len(step.holders) > step.maximum:
            self.too_many_holders = True
            self.violations.append(f"semaphore revision {step.revision} has {len(step.holders)} holders, "
                                   f"max {step.maximum}")  # fmt: skip
            self.emit(TooManyHolders(step.revision, len(step.holders), step.maximum))

    async def _follow_omaha_side(self) -> None:
        """Poll what the Omaha side recorded: hand each new event to its node, then (when the server keeps a view
        of each instance) the steps that view took (:func:`sim.fleet.omaha.server_steps`)."""
        while True:
            snapshot = await self.omaha.snapshot()
            if snapshot is not None:
                self._server_snapshot(snapshot)
            await asyncio.sleep(self.timing.poll_interval)

    def _server_snapshot(self, snapshot: ServerSnapshot) -> None:
        new_events: dict[str, list[OmahaEventRecord]] = {}
        for record in snapshot.events[self.omaha_events_seen :]:
            node = self.node_of(record.machine_id)
            if node is not None:
                node.history.omaha_events.append(record)
                new_events.setdefault(node.name, []).append(record)
            self.emit(OmahaEventSeen(node.name if node else "fleet", record))
        self.omaha_events_seen = max(self.omaha_events_seen, len(snapshot.events))
        for instance in snapshot.instances or []:
            node = self.node_of(instance.machine_id)
            if node is None:
                continue
            history = node.history
            steps = server_steps(history.server_status, history.server, instance, new_events.get(node.name, []))
            history.server = instance
            for step in steps:
                history.server_status = step.status
                if step.status == GRANTED and history.granted_at is None:
                    history.granted_at = self.now()
                self.emit(ServerStatusChanged(node.name, step, instance))

    async def server_view(self) -> list[ServerInstance] | None:
        """The server's record of every instance, read now (None: it keeps none, or the read failed)."""
        snapshot = await self.omaha.snapshot()
        if snapshot is None:
            return None
        self._server_snapshot(snapshot)
        return snapshot.instances

    async def semaphore_history(self, timeout: float = 10.0) -> list[tuple[int, bytes | None]]:
        """Every (revision, value) the semaphore key had, oldest first, from etcd's history."""
        if self.etcd is None:
            return []
        return await asyncio.to_thread(self.etcd.key_history, SEMAPHORE_KEY, timeout)

    # -- the end -----------------------------------------------------------------------------------------------

    async def shutdown(self) -> list[str]:
        """Stop background tasks, the semaphore watch, daemons, stand-ins, buses, the Omaha side and etcd, each
        step even when an earlier one failed; returns what could not be stopped, as messages."""
        for node in self.nodes:
            node.daemons.expect_exit()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        steps: list[tuple[str, Step]] = []
        if self.watch is not None:
            steps.append(("semaphore watch", self.watch.stop))
        steps += [(f"{node.name}'s daemons", node.daemons.stop) for node in self.nodes]
        steps += [(f"{node.name}'s bus", node.close) for node in self.nodes]
        if self.store is not None:
            steps.append(("etcd client", self.store.close))
        if self.omaha_started:
            steps.append(("Omaha side", self.omaha.stop))
        if self.etcd is not None:
            steps.append(("etcd", _in_thread(self.etcd.stop_all)))
        failures = []
        for what, step in steps:
            try:
                await step()
            except Exception as exc:
                log.exception("stopping the %s failed", what)
                failures.append(f"could not stop the {what}: {exc}")
        return failures


def _in_thread(fn: Callable[[], object]) -> Step:
    async def step() -> None:
        await asyncio.to_thread(fn)

    return step
