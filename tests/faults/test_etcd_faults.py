"""etcd faults under lock traffic: a 3-member cluster, 50 lock clients cycling on ``max=3``; one member is killed
and restarted, then the leader, then the whole cluster is stopped for 10 s and started again.

The faults are timed by progress (lock cycles completed), not by the clock. Afterwards every revision the
semaphore key ever had is read back from etcd's history: each must be a valid semaphore with at most 3 holders.
Every client must finish all its cycles within a generous bound (a stuck client fails the test).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from locksmithd.backends import LockBackendUnavailable
from locksmithd.backends.etcd.backend import EtcdLockBackend
from locksmithd.backends.etcd.waiter import Tuning
from locksmithd.backends.etcd_settings import EtcdSettings
from locksmithd.semaphore import Semaphore, key_for_group
from sim.etcd import EtcdCluster
from tests.faults.figures import record
from tests.fixtures.etcd import start_cluster

pytestmark = pytest.mark.faults

CLIENTS = 50
CYCLES = 3
MAX_HOLDERS = 3
HOLD = 0.05
OUTAGE = 10.0
GROUP = ""  # the cluster-wide key
BOUND = 240.0  # everything must be over by then; otherwise a client is stuck
FAULTS = 3  # a follower killed, the leader killed, the whole cluster stopped (each followed by a restart)


@dataclass
class Progress:
    acquired: int = 0
    released: int = 0
    inside: int = 0
    most_inside: int = 0
    finished: int = 0
    events: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def bump(self) -> None:
        self.changed.set()


async def until(progress: Progress, condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + BOUND
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"no progress towards {what}: {progress}")
        progress.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(progress.changed.wait(), 5)


async def lock_client(index: int, endpoints: tuple[str, ...], progress: Progress) -> None:
    """One node: acquire, hold, release, CYCLES times; what meets an outage is retried, as the strategy does."""
    backend = EtcdLockBackend(
        EtcdSettings(endpoints=endpoints, group=GROUP, request_timeout=1.0),
        watch_idle_timeout=5.0, tuning=Tuning(handoff_jitter=0.05, max_handoff_jitter=0.5),
    )
    machine_id = f"node-{index:02d}"
    try:
        for _ in range(CYCLES):
            while True:
                try:
                    await backend.acquire(machine_id)
                    break
                except LockBackendUnavailable:
                    await asyncio.sleep(0.2)
            progress.acquired += 1
            progress.inside += 1
            progress.most_inside = max(progress.most_inside, progress.inside)
            progress.bump()
            await asyncio.sleep(HOLD)
            progress.inside -= 1
            while True:
                try:
                    await backend.release(machine_id)
                    break
                except LockBackendUnavailable:
                    await asyncio.sleep(0.2)
            progress.released += 1
            progress.bump()
        progress.finished += 1
        progress.bump()
    finally:
        await backend.close()


async def fault_schedule(cluster: EtcdCluster, progress: Progress) -> None:
    total = CLIENTS * CYCLES

    async def at(fraction: float) -> None:
        await until(progress, lambda: progress.acquired >= fraction * total, f"{fraction:.0%} of the cycles")

    def note(what: str) -> None:
        progress.events.append(f"{what} after {progress.acquired} cycles")

    await at(0.10)
    leader = await asyncio.to_thread(cluster.leader_index)
    follower = next(i for i in range(3) if i != leader)
    await asyncio.to_thread(cluster.kill, follower)
    note(f"killed member {follower} (follower)")
    await at(0.25)
    await asyncio.to_thread(cluster.start, follower)
    note(f"restarted member {follower}")
    await at(0.40)
    leader = await asyncio.to_thread(cluster.leader_index)
    assert leader is not None
    await asyncio.to_thread(cluster.kill, leader)
    note(f"killed member {leader} (leader)")
    await at(0.55)
    await asyncio.to_thread(cluster.start, leader)
    note(f"restarted member {leader}")
    await at(0.65)
    for member in range(3):
        await asyncio.to_thread(cluster.stop, member)
    note("stopped the whole cluster")
    stopped_at = progress.acquired
    await asyncio.sleep(OUTAGE)
    assert progress.acquired == stopped_at, "a lock was granted while etcd was down"
    await asyncio.to_thread(cluster.start_all)
    note(f"started the whole cluster after {OUTAGE:.0f} s")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    members = start_cluster(3, tmp_path / "etcd")
    try:
        yield members
    finally:
        members.stop_all()


async def test_lock_clients_ride_out_member_leader_and_cluster_outages(cluster: EtcdCluster) -> None:
    key = key_for_group(GROUP)
    cluster.put(key, Semaphore(semaphore=MAX_HOLDERS, max=MAX_HOLDERS).encode())
    endpoints = cluster.endpoints
    orders = [tuple(endpoints[i:] + endpoints[:i]) for i in range(3)]  # a third start on each member
    progress = Progress()
    clients = [asyncio.create_task(lock_client(i, orders[i % 3], progress)) for i in range(CLIENTS)]
    faults = asyncio.create_task(fault_schedule(cluster, progress))
    done, pending = await asyncio.wait([*clients, faults], timeout=BOUND)
    for task in pending:
        task.cancel()
    assert not pending, f"{len(pending)} tasks still running after {BOUND:.0f} s (stuck clients): {progress}"
    for task in done:
        task.result()
    assert progress.finished == CLIENTS and progress.released == CLIENTS * CYCLES

    history = await asyncio.to_thread(cluster.key_history, key)
    values = [Semaphore.decode(raw) for _, raw in history if raw is not None]
    assert len(values) == len(history), "the key was deleted"
    over = [v.encode() for v in values if len(v.holders) > MAX_HOLDERS]
    assert not over, f"revisions with more than {MAX_HOLDERS} holders: {over[:5]}"
    assert all(v.max == MAX_HOLDERS for v in values)
    assert max(len(v.holders) for v in values) == MAX_HOLDERS  # the limit was really contended
    assert values[-1].holders == ()
    assert progress.most_inside <= MAX_HOLDERS
    everyone = {h for v in values for h in v.holders}
    assert everyone == {f"node-{i:02d}" for i in range(CLIENTS)}
    record(
        "etcd faults under lock traffic", trials=FAULTS, survived=FAULTS,
        note=f"{CLIENTS} clients x {CYCLES} cycles on max={MAX_HOLDERS}: " + "; ".join(progress.events)
        + f"; {len(history)} revisions checked, at most {max(len(v.holders) for v in values)} holders",
    )
