"""The etcd v3 semaphore on real etcd: CAS, groups, corrupt values, watch hand-off, the waiting line, failover,
load, faults."""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from locksmithd import ctl
from locksmithd.backends import LockBackendError, LockBackendUnavailable, LockPhase, LockProgress
from locksmithd.backends.etcd import line, ops, waiter
from locksmithd.backends.etcd.backend import EtcdLockBackend
from locksmithd.backends.etcd.client import LeaseKeeper
from locksmithd.backends.etcd.gateway import EtcdUnavailable, range_request
from locksmithd.backends.etcd.sync import SyncEtcdClient
from locksmithd.backends.etcd.waiter import AtFront, Following, InLine, Tuning
from locksmithd.backends.etcd_settings import EtcdSettings
from locksmithd.semaphore import HolderRecord, Semaphore, key_for_group
from sim.etcd import EtcdCluster
from sim.ports import free_port
from sim.tls import make_server_tls
from tests.conftest import require_tool
from tests.fixtures.etcd import start_cluster

pytestmark = pytest.mark.integration


# Bounds on waiting for something that should happen promptly; exceeding one is a failure, not a measurement.
SETTLE = 30.0
_groups = itertools.count()


@pytest.fixture(scope="module")
def shared_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One member for the tests that only read and write their own group's key."""
    cluster = start_cluster(1, tmp_path_factory.mktemp("etcd-shared"))
    try:
        yield cluster
    finally:
        cluster.stop_all()


@pytest.fixture
def group() -> str:
    """A group of its own for each test on the shared member."""
    return f"test-{next(_groups)}"


def settings_for(cluster: EtcdCluster, group: str = "", **kw: object) -> EtcdSettings:
    return EtcdSettings(endpoints=tuple(cluster.endpoints), group=group, **kw)  # type: ignore[arg-type]


def values_of(cluster: EtcdCluster, key: str) -> list[Semaphore]:
    """Every value the key ever had, decoded (each must be a valid semaphore)."""
    return [Semaphore.decode(raw) for _, raw in cluster.key_history(key) if raw is not None]


def backend(settings: EtcdSettings, **tuning: float) -> EtcdLockBackend:
    return EtcdLockBackend(settings, tuning=Tuning(**tuning))


def open_watches(*backends: EtcdLockBackend) -> int:
    return sum(b.client.open_watches for b in backends)


def following(b: EtcdLockBackend) -> bool:
    """The backend's wait follows the semaphore key (at the front of the line, or without one)."""
    return isinstance(b.phase, AtFront | Following)


@dataclass(frozen=True)
class Taken:
    acquired: bool
    semaphore: Semaphore
    revision: int


class Store:
    """Another writer of the semaphore (an operator, another node): the blocking client and the procedures."""

    def __init__(self, settings: EtcdSettings) -> None:
        self.client = SyncEtcdClient(settings)
        self.keys = self.client.keys
        self.key = self.keys.semaphore
        self.session = self.client.session

    @property
    def requests_sent(self) -> int:
        return self.session.stats.requests

    def create_and_read(self) -> tuple[Semaphore, int]:
        snapshot = self.client.run(ops.create_and_read(self.session, self.keys))
        return snapshot.semaphore, snapshot.revision

    def get(self) -> tuple[Semaphore, int]:
        snapshot = self.client.run(ops.read(self.session, self.keys))
        return snapshot.semaphore, snapshot.revision

    def try_acquire(self, holder: str, start: tuple[Semaphore, int] | None = None) -> Taken:
        first = ops.Snapshot(*start) if start is not None else self.client.run(ops.read(self.session, self.keys))
        attempt = self.client.run(ops.try_take(self.session, self.keys, holder, first, tries=50))
        return Taken(attempt.acquired, attempt.now.semaphore, attempt.now.revision)

    def release(self, holder: str) -> bool:
        return self.client.run(ops.release(self.session, self.keys, holder))

    def update(self, change: Callable[[Semaphore], Semaphore]) -> Semaphore:
        return self.client.run(ops.apply(self.session, self.keys, change)).after.semaphore

    def line_key(self, machine_id: str) -> str:
        return self.keys.line_key(machine_id)

    def line_keys(self) -> list[str]:
        return [self.keys.line_key(m) for m in self.client.run(line.line_members(self.session, self.keys))]

    def grant_lease(self, ttl: float) -> int:
        return self.client.run(line.grant_lease(self.session, ttl))

    def revoke_lease(self, lease: int) -> None:
        self.client.run(line.revoke_lease(self.session, lease))

    def join_line(self, machine_id: str, lease: int) -> int:
        return self.client.run(line.join_line(self.session, self.keys, machine_id, lease, 0))[0]

    def lease_of(self, machine_id: str) -> int:
        doc = self.client.run(self.session.call("kv/range", range_request(self.line_key(machine_id))))
        return int(doc["kvs"][0]["lease"])

    def delete(self) -> None:
        from locksmithd.backends.etcd.gateway import b64

        self.client.run(self.session.call("kv/deleterange", {"key": b64(self.key)}))

    def close(self) -> None:
        self.client.close()


async def until_true(condition: Callable[[], bool], what: str) -> None:
    for _ in range(int(SETTLE / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never happened: {what}")


def where(b: EtcdLockBackend) -> str | None:
    """What the backend's wait follows: "semaphore", the machine id of the waiter ahead, or None."""
    phase = b.phase
    if isinstance(phase, AtFront | Following):
        return "semaphore"
    if isinstance(phase, InLine):
        return phase.watching
    return None


async def acquire_retrying(b: EtcdLockBackend, machine_id: str, delay: float = 0.1) -> None:
    """What the strategy does around ``acquire``: try again after a failure that waiting may cure."""
    while True:
        try:
            await b.acquire(machine_id)
            return
        except LockBackendUnavailable:
            await asyncio.sleep(delay)


# -- store ---------------------------------------------------------------------------------------------------


def test_create_and_read_creates_the_key_once_in_one_request(shared_etcd: EtcdCluster, group: str) -> None:
    store = Store(settings_for(shared_etcd, group))
    sent = store.requests_sent
    sem, revision = store.create_and_read()
    assert store.requests_sent == sent + 1
    assert sem == Semaphore.default()
    assert shared_etcd.get(store.key) == b'{"semaphore":1,"max":1,"holders":[]}'
    assert (sem, revision) == store.get()
    assert store.try_acquire("a", (sem, revision)).acquired
    assert store.create_and_read() == store.get()  # an existing key is read, not overwritten
    assert store.get()[0].holders == ("a",)
    assert len(shared_etcd.key_history(store.key)) == 2
    store.close()


async def test_a_free_slot_takes_two_round_trips(shared_etcd: EtcdCluster, group: str) -> None:
    """Create-or-read, then compare-and-swap: a fleet starting at once sends no separate read per node."""
    node = backend(settings_for(shared_etcd, group))
    await node.acquire("a")
    assert node.client.stats.requests == 2
    assert shared_etcd.get(node.client.keys.semaphore) == b'{"semaphore":0,"max":1,"holders":["a"]}'
    await node.close()


async def test_a_node_finding_no_free_slot_starts_waiting_in_four_requests(
    shared_etcd: EtcdCluster, group: str
) -> None:
    """Create-or-read, a lease, the line key put together with the read of its place in the line, and the
    watch: no separate read of the place per waiting node."""
    settings = settings_for(shared_etcd, group)
    store = Store(settings)
    assert store.try_acquire("a").acquired
    waiter = backend(settings)
    task = asyncio.create_task(waiter.acquire("w"))
    await until_true(lambda: following(waiter), "the waiter following the semaphore")
    assert waiter.client.stats.requests == 4
    assert waiter.client.stats.semaphore_watches == 1
    assert store.release("a")
    await asyncio.wait_for(task, SETTLE)
    await waiter.close()
    store.close()


async def test_acquire_reports_its_progress(shared_etcd: EtcdCluster, group: str) -> None:
    """Asking, then waiting at the front of the line with the holder in view, then holding."""
    settings = settings_for(shared_etcd, group)
    store = Store(settings)
    assert store.try_acquire("a").acquired
    waiter = backend(settings)
    progress: list[LockProgress] = []
    task = asyncio.create_task(waiter.acquire("w", version="9.9.9", on_progress=progress.append))
    await until_true(lambda: following(waiter), "the waiter following the semaphore")
    assert progress[0].phase is LockPhase.ASKING
    waiting = progress[-1]
    assert (waiting.phase, waiting.position, waiting.position_is_lower_bound) == (LockPhase.WAITING, 1, False)
    assert (waiting.holders, waiting.slots) == (("a",), 1)
    assert store.release("a")
    await asyncio.wait_for(task, SETTLE)
    assert progress[-1].phase is LockPhase.HELD and progress[-1].holders == ("w",)
    await waiter.close()
    store.close()


async def test_the_slot_is_taken_and_released_with_its_holders_record(shared_etcd: EtcdCluster, group: str) -> None:
    """The record beside the semaphore (time, host, group, version) is written by the transaction that takes
    the slot and deleted by the one that releases it; the semaphore's own value stays locksmith's."""
    settings = settings_for(shared_etcd, group)
    node = EtcdLockBackend(settings, hostname="node-a.example")
    await node.acquire("a", version="3975.2.1")
    keys = node.client.keys
    record = HolderRecord.decode(shared_etcd.get(keys.holder_key("a")) or b"")
    assert record is not None
    assert (record.hostname, record.group, record.version) == ("node-a.example", group, "3975.2.1")
    assert record.age(time.time()) is not None and record.age(time.time()) < 600  # type: ignore[operator]
    assert shared_etcd.get(keys.semaphore) == b'{"semaphore":0,"max":1,"holders":["a"]}'
    taken = shared_etcd.key_history(keys.semaphore)[-1][0]
    assert shared_etcd.key_history(keys.holder_key("a"))[-1][0] == taken
    assert await node.release("a")
    history = shared_etcd.key_history(keys.holder_key("a"))
    assert history[-1] == (shared_etcd.key_history(keys.semaphore)[-1][0], None)
    await node.close()


async def test_without_permission_on_the_records_slots_are_still_taken(
    etcd_single: EtcdCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """An etcd user allowed only the semaphore key and the line (locksmith's permissions plus the line):
    one warning, and the lock works without records."""
    etcdctl = require_tool("etcdctl")
    endpoint = etcd_single.endpoints[0]

    def ctl(*args: str) -> None:
        subprocess.run(
            [etcdctl, f"--endpoints={endpoint}", *args], check=True, capture_output=True,
            env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"}, timeout=30,
        )  # fmt: skip

    key = key_for_group("")
    ctl("user", "add", "root:rootpw")
    ctl("user", "add", "node:nodepw")
    ctl("role", "add", "locksmith")
    ctl("role", "grant-permission", "locksmith", "readwrite", key)
    ctl("role", "grant-permission", "locksmith", "--prefix=true", "readwrite", key + "/waiters/")
    ctl("user", "grant-role", "node", "locksmith")
    ctl("auth", "enable")
    node = EtcdLockBackend(EtcdSettings(endpoints=(endpoint,), username="node", password="nodepw"))
    with caplog.at_level(logging.WARNING):
        await node.acquire("a", version="1.0")
        assert await node.release("a")
        await node.acquire("a", version="1.0")
    warnings = [r for r in caplog.records if "refuses the holder records" in r.getMessage()]
    assert len(warnings) == 1
    await node.close()


def test_transient_errors_are_the_seams_unavailable_error() -> None:
    assert issubclass(EtcdUnavailable, LockBackendUnavailable)


def test_joining_the_line_reads_the_waiters_ahead(shared_etcd: EtcdCluster, group: str) -> None:
    """A new line key learns its place in the join; a key that kept an older place (a second join of the
    same machine with a newer one behind it) does not, and is read separately."""
    store = Store(settings_for(shared_etcd, group))
    lease = store.grant_lease(60)
    for name in ("w0", "w1"):
        store.join_line(name, lease)
    created, position = store.client.run(line.join_line(store.session, store.keys, "w2", lease, 5))
    assert position is not None
    assert position.ahead == ("w1", "w0")
    assert position.present and position.now.semaphore == Semaphore.default() and position.waiting == 3
    read = store.client.run(line.line_position(store.session, store.keys, "w2", created, 5))
    assert created == read.read_revision and read.ahead == ("w1", "w0") and read.waiting == 3
    again, kept = store.client.run(line.join_line(store.session, store.keys, "w0", lease, 5))
    assert kept is None
    assert store.client.run(line.line_position(store.session, store.keys, "w0", again, 5)).ahead == ()
    assert store.line_keys() == [store.line_key(n) for n in ("w0", "w1", "w2")]
    store.revoke_lease(lease)
    assert store.line_keys() == []
    store.close()


def test_lock_unlock_and_idempotent_lock(shared_etcd: EtcdCluster, group: str) -> None:
    store = Store(settings_for(shared_etcd, group))
    first = store.try_acquire("node-a")
    assert first.acquired
    assert shared_etcd.get(store.key) == b'{"semaphore":0,"max":1,"holders":["node-a"]}'
    writes = len(shared_etcd.key_history(store.key))
    again = store.try_acquire("node-a")  # a holder asking again succeeds and writes nothing
    assert again.acquired and again.revision == first.revision
    assert len(shared_etcd.key_history(store.key)) == writes
    other = store.try_acquire("node-b")
    assert not other.acquired
    assert other.semaphore.holders == ("node-a",)
    assert store.release("node-a") is True
    assert store.release("node-a") is False
    assert store.get()[0] == Semaphore.default()
    store.close()


def test_groups_have_their_own_key_and_max(shared_etcd: EtcdCluster, group: str) -> None:
    name = f"{group} prod/database"
    grouped = Store(settings_for(shared_etcd, name))
    assert grouped.key == f"coreos.com/updateengine/rebootlock/groups/{group}+prod%2Fdatabase/semaphore"
    grouped.update(lambda sem: sem.set_max(2))
    assert grouped.try_acquire("a").acquired
    assert grouped.try_acquire("b").acquired
    assert not grouped.try_acquire("c").acquired
    other = Store(settings_for(shared_etcd, f"{group}-other"))
    assert other.try_acquire("c").acquired  # another group's slots are untouched
    assert shared_etcd.get(grouped.key) == b'{"semaphore":0,"max":2,"holders":["a","b"]}'
    assert shared_etcd.get(other.key) == b'{"semaphore":0,"max":1,"holders":["c"]}'
    grouped.close()
    other.close()


@pytest.mark.parametrize(
    "corrupt",
    [b"{not json", b'{"semaphore":1,"max":1,"holders":["a"]}', b'{"semaphore":-2,"max":-2}'],
)
async def test_corrupt_value_is_reported_and_left_as_it_was(
    shared_etcd: EtcdCluster, group: str, corrupt: bytes
) -> None:
    settings = settings_for(shared_etcd, group)
    shared_etcd.put(settings.key, corrupt)
    store = Store(settings)
    for action in (store.get, lambda: store.try_acquire("a"), lambda: store.release("a")):
        with pytest.raises(LockBackendError) as info:
            action()
        assert settings.key in str(info.value)
        assert repr(corrupt.decode()) in str(info.value)
    node = backend(settings)
    with pytest.raises(LockBackendError, match="corrupt"):
        await asyncio.wait_for(node.acquire("a"), SETTLE)
    await node.close()
    assert shared_etcd.get(settings.key) == corrupt
    assert len(shared_etcd.key_history(settings.key)) == 1
    store.close()


@pytest.mark.parametrize(
    "corrupt",
    [b"[" * 100_000 + b"]" * 100_000, b'{"semaphore":1,"max":1,"holders":[],"pad":"' + b"x" * 1_200_000 + b'"}'],
    ids=["nested", "huge"],
)
async def test_any_undecodable_value_is_a_corrupt_semaphore(
    shared_etcd: EtcdCluster, group: str, corrupt: bytes
) -> None:
    """A value json.loads cannot even finish (RecursionError) or far beyond any semaphore: the daemon gets
    the backend's error for a corrupt semaphore, so it keeps running and retries, and the value stays."""
    settings = settings_for(shared_etcd, group)
    shared_etcd.put(settings.key, corrupt)
    node = backend(settings)
    for action in (lambda: node.acquire("a"), lambda: node.release("a")):
        with pytest.raises(LockBackendError, match="corrupt") as info:
            await asyncio.wait_for(action(), SETTLE)
        assert settings.key in str(info.value) and len(str(info.value)) < 1000
    await node.close()
    assert shared_etcd.get(settings.key) == corrupt


def test_endpoint_failover_and_all_down(shared_etcd: EtcdCluster, group: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    store = Store(EtcdSettings(endpoints=(dead, *shared_etcd.endpoints), group=group))
    assert store.try_acquire("a").acquired
    assert store.session.current_endpoint == shared_etcd.endpoints[0]
    store.close()

    other_dead = f"http://127.0.0.1:{free_port()}"
    down = Store(EtcdSettings(endpoints=(dead, other_dead), group=group))
    with pytest.raises(EtcdUnavailable) as info:
        down.get()
    assert dead in str(info.value) and other_dead in str(info.value)
    assert "connection refused" in str(info.value)
    assert down.client.run(ops.ping(down.session, down.keys, 1.0)) is False


async def test_reachable(shared_etcd: EtcdCluster, group: str) -> None:
    node = backend(settings_for(shared_etcd, group))
    assert await node.reachable() is True
    await node.close()
    gone = EtcdLockBackend(EtcdSettings(endpoints=(f"http://127.0.0.1:{free_port()}",)))
    assert await gone.reachable() is False
    await gone.close()


# -- waiting -------------------------------------------------------------------------------------------------


async def test_watch_hands_the_slot_over_without_backoff(shared_etcd: EtcdCluster, group: str) -> None:
    """With a one-hour backoff, only the watch can explain the waiter getting the slot."""
    settings = settings_for(shared_etcd, group)
    holder = backend(settings)
    waiter = backend(settings)
    await holder.acquire("node-a")
    task = asyncio.create_task(waiter.acquire("node-b"))
    await asyncio.sleep(0.3)
    assert not task.done()
    assert await holder.release("node-a") is True
    await asyncio.wait_for(task, SETTLE)
    assert shared_etcd.get(settings.key) == b'{"semaphore":0,"max":1,"holders":["node-b"]}'
    assert open_watches(holder, waiter) == 0
    await holder.close()
    await waiter.close()


async def test_waiter_follows_changes_that_do_not_free_a_slot(shared_etcd: EtcdCluster, group: str) -> None:
    settings = settings_for(shared_etcd, group)
    store = Store(settings)
    store.update(lambda sem: sem.set_max(1).lock("a"))
    waiter = backend(settings, handoff_jitter=0.0)
    task = asyncio.create_task(waiter.acquire("w"))
    await asyncio.sleep(0.3)
    store.update(lambda sem: sem.set_max(2).lock("b"))  # a slot appears and is taken in the same write
    await asyncio.sleep(0.3)
    assert not task.done()
    store.update(lambda sem: sem.unlock("a"))
    await asyncio.wait_for(task, SETTLE)
    assert store.get()[0].holders == ("b", "w")
    await waiter.close()
    store.close()


async def test_deleted_key_is_recreated_by_a_waiter(shared_etcd: EtcdCluster, group: str) -> None:
    settings = settings_for(shared_etcd, group)
    store = Store(settings)
    assert store.try_acquire("a").acquired
    waiter = backend(settings)
    task = asyncio.create_task(waiter.acquire("w"))
    await asyncio.sleep(0.3)
    store.delete()
    await asyncio.wait_for(task, SETTLE)
    assert shared_etcd.get(settings.key) == b'{"semaphore":0,"max":1,"holders":["w"]}'
    await waiter.close()
    store.close()


async def test_waiter_sits_out_a_burst_of_changes_without_a_free_slot(shared_etcd: EtcdCluster, group: str) -> None:
    """Changes that pile up while the loop is busy are folded into the newest; none of them frees a slot."""
    settings = settings_for(shared_etcd, group)
    store = Store(settings)
    store.update(lambda sem: sem.lock("a"))
    waiter = backend(settings, handoff_jitter=0.0)
    task = asyncio.create_task(waiter.acquire("w"))
    await until_true(lambda: following(waiter), "the waiter following the semaphore")

    def burst() -> None:
        for i in range(30):
            store.update(lambda sem, i=i: sem.set_max(2).lock(f"b{i}"))
            store.update(lambda sem, i=i: sem.unlock(f"b{i}").set_max(1))

    await asyncio.to_thread(burst)
    await asyncio.sleep(0.3)
    assert not task.done()  # every value of the burst leaves no free slot
    assert waiter.client.stats.watch_events == 60
    store.update(lambda sem: sem.unlock("a"))
    await asyncio.wait_for(task, SETTLE)
    assert store.get()[0].holders == ("w",)
    await waiter.close()
    store.close()


async def test_cancelled_acquire_stops_its_watch(shared_etcd: EtcdCluster, group: str) -> None:
    settings = settings_for(shared_etcd, group)
    holder = backend(settings)
    await holder.acquire("a")
    waiter = backend(settings)
    task = asyncio.create_task(waiter.acquire("b"))
    await until_true(lambda: open_watches(waiter) == 1, "the waiter watching")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert open_watches(waiter) == 0
    store = Store(settings)
    assert store.get()[0].holders == ("a",)  # the waiter took nothing
    assert store.line_keys() == []  # and left the line
    store.close()
    await holder.close()
    await waiter.close()


# -- the waiting line ----------------------------------------------------------------------------------------


async def test_waiters_queue_and_only_the_head_watches_the_semaphore(shared_etcd: EtcdCluster, group: str) -> None:
    """max=1: the first waiter follows the semaphore, each other one the line key ahead of it; the slot
    passes down the line in order, and the line is empty at the end."""
    settings = settings_for(shared_etcd, group)
    holder = backend(settings)
    await holder.acquire("a")
    store = Store(settings)
    names = [f"w{i}" for i in range(4)]
    waiters = {name: backend(settings) for name in names}
    order: list[str] = []

    async def wait_and_pass_on(name: str) -> None:
        await waiters[name].acquire(name)
        order.append(name)
        assert store.get()[0].holders == (name,)
        await waiters[name].release(name)

    tasks = []
    for i, name in enumerate(names):
        tasks.append(asyncio.create_task(wait_and_pass_on(name)))
        await until_true(lambda i=i: len(store.line_keys()) == i + 1, f"{name} in the line")
    line = [store.line_key(name) for name in names]
    assert store.line_keys() == line
    await until_true(lambda: all(where(w) is not None for w in waiters.values()), "everyone waiting")
    assert [where(waiters[n]) for n in names] == ["semaphore", *names[:-1]]
    assert sum(w.client.stats.semaphore_watches for w in waiters.values()) == 1
    assert shared_etcd.get(store.key) == b'{"semaphore":0,"max":1,"holders":["a"]}'  # the value is locksmith's

    await holder.release("a")
    await asyncio.wait_for(asyncio.gather(*tasks), SETTLE)
    assert order == names
    assert store.line_keys() == []
    assert store.get()[0] == Semaphore.default()
    assert open_watches(holder, *waiters.values()) == 0
    for node in (holder, *waiters.values()):
        await node.close()
    store.close()


async def queue_up(
    settings: EtcdSettings,
    store: Store,
    names: list[str],
    make: Callable[[EtcdSettings], EtcdLockBackend] = backend,
) -> tuple[dict[str, EtcdLockBackend], list[asyncio.Task[None]]]:
    """A waiter for each name, each started once the one before is in the line; returns when all wait."""
    waiters = {name: make(settings) for name in names}
    tasks = []
    for i, name in enumerate(names):
        tasks.append(asyncio.create_task(waiters[name].acquire(name)))
        await until_true(lambda i=i: len(store.line_keys()) == i + 1, f"{name} in the line")
    await until_true(lambda: all(where(w) is not None for w in waiters.values()), "everyone waiting")
    return waiters, tasks


async def all_served(
    store: Store, waiters: dict[str, EtcdLockBackend], tasks: list[asyncio.Task[None]]
) -> None:
    """Every queued waiter gets a slot and holds it, the line is empty; then everything is closed."""
    await asyncio.wait_for(asyncio.gather(*tasks), SETTLE)
    assert sorted(store.get()[0].holders) == sorted(waiters)
    assert store.line_keys() == []
    for node in waiters.values():
        await node.close()
    store.close()


async def test_with_max_two_the_first_two_waiters_watch_the_semaphore(shared_etcd: EtcdCluster, group: str) -> None:
    settings = settings_for(shared_etcd, group)
    store = Store(settings)
    store.update(lambda sem: sem.set_max(2).lock("a").lock("b"))
    names = [f"w{i}" for i in range(5)]
    waiters, tasks = await queue_up(settings, store, names)
    # Each one behind the first two waits for the key two places ahead of it.
    assert [where(waiters[n]) for n in names] == ["semaphore", "semaphore", *names[:3]]
    assert open_watches(*waiters.values()) == 5

    async def hold_briefly(task: asyncio.Task[None], name: str) -> None:
        await task
        await waiters[name].release(name)

    store.update(lambda sem: sem.unlock("a").unlock("b"))
    await asyncio.wait_for(asyncio.gather(*(hold_briefly(t, n) for t, n in zip(tasks, names, strict=True))), SETTLE)
    assert store.line_keys() == []
    history = values_of(shared_etcd, store.key)
    assert max(len(sem.holders) for sem in history) == 2
    assert {h for sem in history for h in sem.holders} == {"a", "b", *names}
    assert open_watches(*waiters.values()) == 0
    for node in waiters.values():
        await node.close()
    store.close()


async def test_with_a_large_max_only_the_front_waiters_watch_the_semaphore(
    shared_etcd: EtcdCluster, group: str
) -> None:
    """max=5, all held, five waiters: the first three follow the semaphore, the others the key three places
    ahead; five releases at once still reach all of them."""
    assert waiter.FRONT_WAITERS == 3
    settings = settings_for(shared_etcd, group)
    store = Store(settings)
    holders = [f"h{i}" for i in range(5)]
    store.update(lambda sem: functools.reduce(Semaphore.lock, holders, sem.set_max(5)))
    names = [f"w{i}" for i in range(5)]
    waiters, tasks = await queue_up(settings, store, names)
    assert [where(waiters[n]) for n in names] == ["semaphore"] * 3 + names[:2]
    assert sum(w.client.stats.semaphore_watches for w in waiters.values()) == 3

    store.update(lambda sem: functools.reduce(Semaphore.unlock, holders, sem))
    await all_served(store, waiters, tasks)


def patient_waiter(settings: EtcdSettings) -> EtcdLockBackend:
    """A waiter whose hand-off delays would last ten minutes: it only gets a slot promptly without them."""
    return backend(settings, handoff_jitter=600, max_handoff_jitter=600)


async def test_a_freed_slot_goes_at_once_to_the_first_waiter_and_nobody_races_it(
    shared_etcd: EtcdCluster, group: str
) -> None:
    """max=2, both held, two waiters following the semaphore: each release is taken by the oldest waiter
    without a hand-off delay, and the one behind does not try for a slot that is not its own."""
    settings = settings_for(shared_etcd, group)
    store = Store(settings)
    store.update(lambda sem: sem.set_max(2).lock("a").lock("b"))
    first, second = patient_waiter(settings), patient_waiter(settings)
    first_task = asyncio.create_task(first.acquire("w0"))
    await until_true(lambda: following(first), "w0 waiting")
    second_task = asyncio.create_task(second.acquire("w1"))
    await until_true(lambda: following(second), "w1 waiting")

    assert store.release("a")
    await asyncio.wait_for(first_task, SETTLE)
    assert store.get()[0].holders == ("b", "w0")
    assert not second_task.done()
    assert store.release("b")
    await asyncio.wait_for(second_task, SETTLE)
    assert store.get()[0].holders == ("w0", "w1")
    assert first.client.stats.conflicts == second.client.stats.conflicts == 0
    for node in (first, second):
        await node.close()
    store.close()


async def test_waiters_entitled_to_slots_freed_together_all_get_one(shared_etcd: EtcdCluster, group: str) -> None:
    """Three slots freed in one write, three waiters: each is entitled to one, so a waiter that loses the race
    to another tries again at once instead of waiting for a hand-off delay."""
    settings = settings_for(shared_etcd, group)
    store = Store(settings)
    store.update(lambda sem: sem.set_max(3).lock("a").lock("b").lock("c"))
    names = ["w0", "w1", "w2"]
    waiters, tasks = await queue_up(settings, store, names, patient_waiter)
    assert all(following(w) for w in waiters.values())

    store.update(lambda sem: sem.unlock("a").unlock("b").unlock("c"))
    await all_served(store, waiters, tasks)


async def test_a_dead_waiter_does_not_block_the_one_behind_it(shared_etcd: EtcdCluster, group: str) -> None:
    """A waiter that died after joining (no keepalive) leaves when its lease expires; the next one moves up."""
    settings = settings_for(shared_etcd, group)
    store = Store(settings)
    assert store.try_acquire("a").acquired
    dead_lease = store.grant_lease(2)
    store.join_line("dead", dead_lease)
    waiter = backend(settings)
    task = asyncio.create_task(waiter.acquire("w"))
    await until_true(lambda: where(waiter) is not None, "the waiter waiting")
    assert where(waiter) == "dead"  # behind the dead one, not on the semaphore
    assert store.release("a")
    await asyncio.wait_for(task, SETTLE)
    assert store.get()[0].holders == ("w",)
    assert store.line_keys() == []
    await waiter.close()
    store.close()


async def test_a_waiter_whose_lease_is_revoked_joins_again(shared_etcd: EtcdCluster, group: str) -> None:
    """Its key gone (as after an etcd outage longer than the TTL), a waiter queues again instead of hiding."""
    settings = settings_for(shared_etcd, group)
    store = Store(settings)
    assert store.try_acquire("a").acquired
    first = EtcdLockBackend(settings, line_ttl=3)
    second = EtcdLockBackend(settings, line_ttl=3)
    t1 = asyncio.create_task(first.acquire("w1"))
    await until_true(lambda: store.line_keys() == [store.line_key("w1")], "w1 in the line")
    t2 = asyncio.create_task(second.acquire("w2"))
    await until_true(lambda: where(second) == "w1", "w2 behind w1")
    store.revoke_lease(second_lease := store.lease_of("w2"))
    # w2 was woken by nothing; its keepalive finds the lease gone and puts its key back.
    await until_true(lambda: store.line_key("w2") in store.line_keys(), "w2 back in the line")
    assert store.lease_of("w2") != second_lease
    assert store.release("a")
    await asyncio.wait_for(t1, SETTLE)
    assert await first.release("w1")
    await asyncio.wait_for(t2, SETTLE)
    assert store.get()[0].holders == ("w2",)
    assert store.line_keys() == []
    for node in (first, second):
        await node.close()
    store.close()


async def test_a_slot_taken_on_a_retry_leaves_the_line_behind(shared_etcd: EtcdCluster, group: str) -> None:
    """A waiter cut off from etcd keeps its line key for its lease's lifetime; when its next attempt finds a
    free slot at once, the take must delete that key too, or the waiter behind it watches a key nobody will
    delete until the lease expires."""
    settings = settings_for(shared_etcd, group)
    store = Store(settings)
    assert store.try_acquire("a").acquired
    cable = Cable(shared_etcd.endpoints[0])
    await cable.mend()
    first = backend(EtcdSettings(endpoints=(cable.endpoint,), group=group, request_timeout=2.0))
    second = backend(settings)
    t1 = asyncio.create_task(first.acquire("w1"))
    await until_true(lambda: following(first), "w1 waiting")
    t2 = asyncio.create_task(second.acquire("w2"))
    await until_true(lambda: where(second) == "w1", "w2 behind w1")
    await cable.cut()
    with pytest.raises(LockBackendUnavailable):
        await asyncio.wait_for(t1, SETTLE)
    assert store.release("a")
    await cable.mend()
    await asyncio.wait_for(first.acquire("w1"), SETTLE)  # the slot is free: taken on the first look
    assert store.get()[0].holders == ("w1",)
    assert store.line_keys() == [store.line_key("w2")]  # w1's place went with the take
    assert await first.release("w1")
    await asyncio.wait_for(t2, SETTLE)
    for node in (first, second):
        await node.close()
    await cable.cut()
    store.close()


async def test_a_lease_that_expired_before_the_line_put_is_replaced(
    shared_etcd: EtcdCluster, group: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A node starved for a whole TTL puts its line key under a lease etcd no longer has: it takes a new lease
    and queues, instead of taking the refusal for a line etcd does not allow."""
    settings = settings_for(shared_etcd, group)
    store = Store(settings)
    assert store.try_acquire("a").acquired
    expired = store.grant_lease(60)
    store.revoke_lease(expired)
    original = LeaseKeeper.fresh
    handed_out: list[int] = []

    async def stale_first(keeper: LeaseKeeper) -> int:
        if not handed_out:
            keeper.lease = expired
            handed_out.append(expired)
            return expired
        lease = await original(keeper)
        handed_out.append(lease)
        return lease

    monkeypatch.setattr(LeaseKeeper, "fresh", stale_first)
    waiter = backend(settings)
    with caplog.at_level(logging.WARNING):
        task = asyncio.create_task(waiter.acquire("w"))
        await until_true(lambda: isinstance(waiter.phase, AtFront), "w at the front of the line")
    assert "refuses the waiting line" not in caplog.text
    assert len(handed_out) == 2 and store.lease_of("w") == handed_out[1]
    assert store.release("a")
    await asyncio.wait_for(task, SETTLE)
    await waiter.close()
    store.close()


async def test_without_the_lease_api_every_waiter_watches_and_still_gets_the_lock(
    shared_etcd: EtcdCluster, group: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(line, "LEASE_GRANT", "lease/no-such-call")
    settings = settings_for(shared_etcd, group)
    holder = backend(settings)
    await holder.acquire("a")
    waiters = [backend(settings) for _ in range(2)]
    with caplog.at_level(logging.WARNING, logger="locksmithd.backends.etcd"):
        tasks = [asyncio.create_task(w.acquire(f"w{i}")) for i, w in enumerate(waiters)]
        await until_true(lambda: all(following(w) for w in waiters), "both on the semaphore")
    refusals = [r for r in caplog.records if "refuses the waiting line" in r.getMessage()]
    assert len(refusals) == 2  # one line per node
    assert "lease/no-such-call" in refusals[0].getMessage()
    store = Store(settings)
    assert store.line_keys() == []
    await holder.release("a")
    done, _ = await asyncio.wait(tasks, timeout=SETTLE, return_when=asyncio.FIRST_COMPLETED)
    assert len(done) == 1
    (winner,) = store.get()[0].holders
    await holder.release(winner)
    await asyncio.wait_for(asyncio.gather(*tasks), SETTLE)
    assert len(store.get()[0].holders) == 1
    assert open_watches(*waiters) == 0
    store.close()
    for w in waiters:
        await w.close()
    await holder.close()


async def test_unreachable_etcd_is_the_strategys_to_retry(etcd_single: EtcdCluster) -> None:
    """acquire does not sleep and retry by itself: it raises the seam's "try again later" error naming every
    endpoint, and the next acquire after etcd is back takes the slot."""
    settings = settings_for(etcd_single, "recover", request_timeout=1.0)
    etcd_single.stop(0)
    node = backend(settings)
    with pytest.raises(LockBackendUnavailable, match=f"no etcd endpoint answered .*{etcd_single.endpoints[0]}"):
        await asyncio.wait_for(node.acquire("a"), SETTLE)
    etcd_single.start(0)
    await asyncio.wait_for(node.acquire("a"), SETTLE)
    assert etcd_single.get(settings.key) == b'{"semaphore":0,"max":1,"holders":["a"]}'
    await node.close()


class Cable:
    """A TCP forwarder to etcd on 127.0.0.1 that the test can cut (every connection dropped, new ones
    refused) and mend on the same port: one node's network, without touching etcd."""

    def __init__(self, target: str) -> None:
        self.target_port = int(target.rsplit(":", 1)[1])
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def mend(self) -> None:
        self._server = await asyncio.start_server(self._carry, "127.0.0.1", self.port, reuse_address=True)

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _carry(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}


async def test_a_waiter_cut_off_from_etcd_keeps_its_place(shared_etcd: EtcdCluster, group: str) -> None:
    """A wait that ends because etcd is out of reach leaves its line key to its lease: asked again in time,
    the node is still ahead of one that queued after it and gets the next slot."""
    settings = settings_for(shared_etcd, group)
    store = Store(settings)
    assert store.try_acquire("a").acquired
    cable = Cable(shared_etcd.endpoints[0])
    await cable.mend()
    first = backend(EtcdSettings(endpoints=(cable.endpoint,), group=group, request_timeout=2.0))
    second = backend(settings)
    t1 = asyncio.create_task(first.acquire("w1"))
    await until_true(lambda: following(first), "w1 waiting")
    await cable.cut()
    with pytest.raises(LockBackendUnavailable):
        await asyncio.wait_for(t1, SETTLE)
    t2 = asyncio.create_task(second.acquire("w2"))
    await until_true(lambda: where(second) == "w1", "w2 behind w1")
    await cable.mend()
    t1 = asyncio.create_task(first.acquire("w1"))
    await until_true(lambda: following(first), "w1 waiting again")
    assert store.line_keys() == [store.line_key("w1"), store.line_key("w2")]
    assert store.release("a")
    await asyncio.wait_for(t1, SETTLE)
    assert store.get()[0].holders == ("w1",) and not t2.done()
    assert await first.release("w1")
    await asyncio.wait_for(t2, SETTLE)
    for node in (first, second):
        await node.close()
    await cable.cut()
    store.close()


# -- load and faults -----------------------------------------------------------------------------------------


async def _fleet(
    endpoint_orders: list[tuple[str, ...]], group: str, clients: int, hold: float, handoff_jitter: float
) -> int:
    """``clients`` nodes each acquire, hold, release once, retrying what the backend cannot do now as the
    strategy would; returns the most holders the nodes saw at once."""
    inside = 0
    most = 0

    async def node(i: int) -> None:
        nonlocal inside, most
        endpoints = endpoint_orders[i % len(endpoint_orders)]
        node = backend(
            EtcdSettings(endpoints=endpoints, group=group, request_timeout=2.0), handoff_jitter=handoff_jitter
        )
        try:
            await acquire_retrying(node, f"node-{i:02d}")
            inside += 1
            most = max(most, inside)
            await asyncio.sleep(hold)
            inside -= 1
            while True:  # a release may meet a member going down; retry it like the daemon's unlock loop
                try:
                    await node.release(f"node-{i:02d}")
                    break
                except EtcdUnavailable:
                    await asyncio.sleep(0.1)
        finally:
            await node.close()

    await asyncio.wait_for(asyncio.gather(*(node(i) for i in range(clients))), 120)
    return most


def assert_never_over(cluster: EtcdCluster, key: str, limit: int, clients: int) -> None:
    values = values_of(cluster, key)
    assert values, "the key has no history"
    for sem in values:
        assert len(sem.holders) <= limit, f"{len(sem.holders)} holders in {sem.encode()}"
        assert sem.semaphore == sem.max - len(sem.holders)
    everyone = {h for sem in values for h in sem.holders}
    assert everyone == {f"node-{i:02d}" for i in range(clients)}
    assert values[-1].holders == ()


async def test_fifty_clients_never_exceed_max_three(shared_etcd: EtcdCluster, group: str) -> None:
    store = Store(settings_for(shared_etcd, group))
    store.update(lambda sem: sem.set_max(3))
    store.close()
    most = await _fleet([tuple(shared_etcd.endpoints)], group, 50, 0.02, handoff_jitter=0.05)
    assert most <= 3
    assert_never_over(shared_etcd, key_for_group(group), 3, 50)


async def test_member_killed_and_restarted_mid_traffic(etcd_cluster3: EtcdCluster) -> None:
    cluster = etcd_cluster3
    group = "faults"
    store = Store(EtcdSettings(endpoints=tuple(cluster.endpoints), group=group))
    store.update(lambda sem: sem.set_max(2))
    store.close()
    eps = cluster.endpoints
    orders = [tuple(eps[i:] + eps[:i]) for i in range(3)]  # a third of the nodes start on each member
    victim = cluster.leader_index()
    assert victim is not None

    async def faults() -> None:
        await asyncio.sleep(0.4)
        cluster.kill(victim)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(cluster.start, victim)

    fault_task = asyncio.create_task(faults())
    most = await _fleet(orders, group, 24, 0.1, handoff_jitter=0.05)
    await fault_task
    assert most <= 2
    assert cluster.running(victim)
    assert_never_over(cluster, key_for_group(group), 2, 24)


# -- TLS and authentication ----------------------------------------------------------------------------------


def test_ca_only_tls(tmp_path: Path) -> None:
    """A CA file alone is enough to reach an https etcd (locksmith also wanted a client cert, Flatcar#948)."""
    tls = make_server_tls(tmp_path / "pki", "test etcd CA")
    cluster = start_cluster(1, tmp_path / "etcd-tls", tls=tls)
    try:
        assert cluster.endpoints[0].startswith("https://")
        store = Store(EtcdSettings(endpoints=tuple(cluster.endpoints), ca_file=str(tls.ca_file)))
        assert store.try_acquire("tls-node").acquired
        assert cluster.get(store.key) == b'{"semaphore":0,"max":1,"holders":["tls-node"]}'
        store.close()
        untrusted = Store(EtcdSettings(endpoints=tuple(cluster.endpoints)))
        with pytest.raises(EtcdUnavailable, match="TLS certificate verification failed"):
            untrusted.get()
    finally:
        cluster.stop_all()


async def test_client_certificates_with_both_clients(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """etcd asking every client for a certificate from its CA: the daemon's asyncio client and locksmithctl's
    blocking one present theirs; without one, the refusal names the endpoint."""
    tls = make_server_tls(tmp_path / "pki", "test etcd CA", client=True)
    assert tls.client_cert_file is not None and tls.client_key_file is not None
    with EtcdCluster(
        1, tmp_path / "etcd-mtls", tls=tls, extra_args=["--client-cert-auth", "--trusted-ca-file", str(tls.ca_file)]
    ) as cluster:
        files = {
            "ca_file": str(tls.ca_file), "cert_file": str(tls.client_cert_file), "key_file": str(tls.client_key_file)
        }
        node = EtcdLockBackend(EtcdSettings(endpoints=tuple(cluster.endpoints), **files))
        assert await node.reachable()
        await asyncio.wait_for(node.acquire("mtls-node"), SETTLE)
        await node.close()
        flags = ["-endpoint", cluster.endpoints[0], "-etcd-cafile", files["ca_file"], "-etcd-certfile",
                 files["cert_file"], "-etcd-keyfile", files["key_file"]]  # fmt: skip
        assert ctl.main([*flags, "status"]) == 0
        assert "mtls-node" in capsys.readouterr().out
        anonymous = EtcdLockBackend(EtcdSettings(endpoints=tuple(cluster.endpoints), ca_file=str(tls.ca_file)))
        with pytest.raises(LockBackendUnavailable, match=cluster.endpoints[0]):
            await asyncio.wait_for(anonymous.acquire("x"), SETTLE)
        await anonymous.close()


def test_username_and_password(etcd_single: EtcdCluster) -> None:
    etcdctl = require_tool("etcdctl")
    endpoint = etcd_single.endpoints[0]

    def ctl(*args: str) -> None:
        subprocess.run(
            [etcdctl, f"--endpoints={endpoint}", *args],
            check=True,
            capture_output=True,
            env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"},
            timeout=30,
        )

    ctl("user", "add", "root:rootpw")
    ctl("user", "add", "node:nodepw")
    ctl("role", "add", "locksmith")
    ctl("role", "grant-permission", "locksmith", "--prefix=true", "readwrite", "coreos.com/updateengine/")
    ctl("user", "grant-role", "node", "locksmith")
    ctl("auth", "enable")

    store = Store(EtcdSettings(endpoints=(endpoint,), username="node", password="nodepw"))
    assert store.try_acquire("authed").acquired
    store.close()
    with pytest.raises(LockBackendError, match=r"refused user 'node': .*authentication failed"):
        Store(EtcdSettings(endpoints=(endpoint,), username="node", password="wrong")).get()
    with pytest.raises(LockBackendError, match="user name is empty"):
        Store(EtcdSettings(endpoints=(endpoint,))).get()
