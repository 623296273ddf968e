"""The etcd v3 semaphore on real etcd: CAS, groups, corrupt values, watch hand-off, the waiting line, failover,
load, faults."""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from locksmithd.backends import LockBackendError, LockBackendUnavailable, LockPhase, LockProgress
from locksmithd.backends import etcd as etcd_module
from locksmithd.backends.etcd import (
    SEMAPHORE,
    EtcdLockBackend,
    EtcdSemaphoreStore,
    EtcdTransientError,
    _b64,
)
from locksmithd.backends.etcd_settings import EtcdSettings
from locksmithd.semaphore import Semaphore, key_for_group
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


def watch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("etcd-watch")]


# -- store ---------------------------------------------------------------------------------------------------


def test_ensure_exists_creates_the_key_once(shared_etcd: EtcdCluster, group: str) -> None:
    store = EtcdSemaphoreStore(settings_for(shared_etcd, group))
    assert store.ensure_exists() is True
    assert store.ensure_exists() is False
    assert shared_etcd.get(store.key) == b'{"semaphore":1,"max":1,"holders":[]}'
    assert len(shared_etcd.key_history(store.key)) == 1
    store.close()


def test_ensure_exists_and_get_creates_and_reads_in_one_request(shared_etcd: EtcdCluster, group: str) -> None:
    store = EtcdSemaphoreStore(settings_for(shared_etcd, group))
    sent = store.requests_sent
    sem, revision = store.ensure_exists_and_get()
    assert store.requests_sent == sent + 1
    assert sem == Semaphore.default()
    assert (sem, revision) == store.get()
    assert store.try_acquire("a", (sem, revision)).acquired
    assert store.ensure_exists_and_get() == store.get()  # an existing key is read, not overwritten
    assert store.get()[0].holders == ("a",)
    assert len(shared_etcd.key_history(store.key)) == 2
    store.close()


async def test_a_free_slot_takes_two_round_trips(shared_etcd: EtcdCluster, group: str) -> None:
    """Create-or-read, then compare-and-swap: a fleet starting at once sends no separate read per node."""
    backend = EtcdLockBackend(settings_for(shared_etcd, group))
    await backend.acquire("a")
    assert backend.store.requests_sent == 2
    assert shared_etcd.get(backend.store.key) == b'{"semaphore":0,"max":1,"holders":["a"]}'
    await backend.close()


async def test_a_node_finding_no_free_slot_starts_waiting_in_four_requests(
    shared_etcd: EtcdCluster, group: str
) -> None:
    """Create-or-read, a lease, the line key put together with the read of its place in the line, and the
    watch: no separate read of the place per waiting node."""
    settings = settings_for(shared_etcd, group)
    store = EtcdSemaphoreStore(settings)
    assert store.try_acquire("a").acquired
    waiter = EtcdLockBackend(settings, first_backoff=3600)
    task = asyncio.create_task(waiter.acquire("w"))
    await until_true(lambda: waiter.waiting_on == SEMAPHORE, "the waiter following the semaphore")
    assert waiter.store.requests_sent == 4
    assert waiter.store.semaphore_watches == 1
    assert store.release("a")
    await asyncio.wait_for(task, SETTLE)
    await waiter.close()
    store.close()


async def test_acquire_reports_its_progress(shared_etcd: EtcdCluster, group: str) -> None:
    """Asking, then waiting at the front of the line with the holder in view, then holding."""
    settings = settings_for(shared_etcd, group)
    store = EtcdSemaphoreStore(settings)
    assert store.try_acquire("a").acquired
    waiter = EtcdLockBackend(settings, first_backoff=3600)
    progress: list[LockProgress] = []
    task = asyncio.create_task(waiter.acquire("w", version="9.9.9", on_progress=progress.append))
    await until_true(lambda: waiter.waiting_on == SEMAPHORE, "the waiter following the semaphore")
    assert progress[0].phase is LockPhase.ASKING
    waiting = progress[-1]
    assert (waiting.phase, waiting.position, waiting.position_is_lower_bound) == (LockPhase.WAITING, 1, False)
    assert (waiting.holders, waiting.slots) == (("a",), 1)
    assert store.release("a")
    await asyncio.wait_for(task, SETTLE)
    assert progress[-1].phase is LockPhase.HELD and progress[-1].holders == ("w",)
    await waiter.close()
    store.close()


def test_transient_errors_are_the_seams_unavailable_error() -> None:
    assert issubclass(EtcdTransientError, LockBackendUnavailable)


def test_joining_the_line_reads_the_waiters_ahead(shared_etcd: EtcdCluster, group: str) -> None:
    """A new line key learns its place in the join; a key that kept an older place (a second join of the
    same machine with a newer one behind it) does not, and is read separately."""
    store = EtcdSemaphoreStore(settings_for(shared_etcd, group))
    lease = store.grant_lease(60)
    for name in ("w0", "w1"):
        store.join_line(name, lease)
    created, position = store.join_line_and_look("w2", lease, 5)
    assert position is not None
    assert position.ahead == (store.line_key("w1"), store.line_key("w0"))
    assert position.present and position.semaphore == Semaphore.default()
    assert created == store.line_position("w2", created, 5).read_revision
    again, kept = store.join_line_and_look("w0", lease, 5)
    assert kept is None
    assert store.line_position("w0", again, 5).ahead == ()
    assert store.line_keys() == [store.line_key(n) for n in ("w0", "w1", "w2")]
    store.revoke_lease(lease)
    assert store.line_keys() == []
    store.close()


def test_lock_unlock_and_idempotent_lock(shared_etcd: EtcdCluster, group: str) -> None:
    store = EtcdSemaphoreStore(settings_for(shared_etcd, group))
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
    grouped = EtcdSemaphoreStore(settings_for(shared_etcd, name))
    assert grouped.key == f"coreos.com/updateengine/rebootlock/groups/{group}+prod%2Fdatabase/semaphore"
    grouped.update(lambda sem: sem.set_max(2))
    assert grouped.try_acquire("a").acquired
    assert grouped.try_acquire("b").acquired
    assert not grouped.try_acquire("c").acquired
    other = EtcdSemaphoreStore(settings_for(shared_etcd, f"{group}-other"))
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
    store = EtcdSemaphoreStore(settings)
    for action in (store.get, lambda: store.try_acquire("a"), lambda: store.release("a")):
        with pytest.raises(LockBackendError) as info:
            action()
        assert settings.key in str(info.value)
        assert repr(corrupt.decode()) in str(info.value)
    backend = EtcdLockBackend(settings, first_backoff=3600)
    with pytest.raises(LockBackendError, match="corrupt"):
        await asyncio.wait_for(backend.acquire("a"), SETTLE)
    await backend.close()
    assert shared_etcd.get(settings.key) == corrupt
    assert len(shared_etcd.key_history(settings.key)) == 1
    store.close()


def test_endpoint_failover_and_all_down(shared_etcd: EtcdCluster, group: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    store = EtcdSemaphoreStore(EtcdSettings(endpoints=(dead, *shared_etcd.endpoints), group=group))
    assert store.try_acquire("a").acquired
    assert store.current_endpoint == shared_etcd.endpoints[0]
    store.close()

    other_dead = f"http://127.0.0.1:{free_port()}"
    down = EtcdSemaphoreStore(EtcdSettings(endpoints=(dead, other_dead), group=group))
    with pytest.raises(EtcdTransientError) as info:
        down.get()
    assert dead in str(info.value) and other_dead in str(info.value)
    assert "connection refused" in str(info.value)
    assert down.ping(timeout=1) is False


async def test_reachable(shared_etcd: EtcdCluster, group: str) -> None:
    backend = EtcdLockBackend(settings_for(shared_etcd, group))
    assert await backend.reachable() is True
    await backend.close()
    gone = EtcdLockBackend(EtcdSettings(endpoints=(f"http://127.0.0.1:{free_port()}",)))
    assert await gone.reachable() is False
    await gone.close()


# -- waiting -------------------------------------------------------------------------------------------------


async def test_watch_hands_the_slot_over_without_backoff(shared_etcd: EtcdCluster, group: str) -> None:
    """With a one-hour backoff, only the watch can explain the waiter getting the slot."""
    settings = settings_for(shared_etcd, group)
    holder = EtcdLockBackend(settings, first_backoff=3600)
    waiter = EtcdLockBackend(settings, first_backoff=3600)
    await holder.acquire("node-a")
    task = asyncio.create_task(waiter.acquire("node-b"))
    await asyncio.sleep(0.3)
    assert not task.done()
    assert await holder.release("node-a") is True
    await asyncio.wait_for(task, SETTLE)
    assert shared_etcd.get(settings.key) == b'{"semaphore":0,"max":1,"holders":["node-b"]}'
    assert watch_threads() == []
    await holder.close()
    await waiter.close()


async def test_waiter_follows_changes_that_do_not_free_a_slot(shared_etcd: EtcdCluster, group: str) -> None:
    settings = settings_for(shared_etcd, group)
    store = EtcdSemaphoreStore(settings)
    store.update(lambda sem: sem.set_max(1).lock("a"))
    waiter = EtcdLockBackend(settings, first_backoff=3600, handoff_jitter=0.0)
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
    store = EtcdSemaphoreStore(settings)
    assert store.try_acquire("a").acquired
    waiter = EtcdLockBackend(settings, first_backoff=3600)
    task = asyncio.create_task(waiter.acquire("w"))
    await asyncio.sleep(0.3)
    store._post("kv/deleterange", {"key": store._key_b64})
    await asyncio.wait_for(task, SETTLE)
    assert shared_etcd.get(settings.key) == b'{"semaphore":0,"max":1,"holders":["w"]}'
    await waiter.close()
    store.close()


async def test_waiter_sits_out_a_burst_of_changes_without_a_free_slot(shared_etcd: EtcdCluster, group: str) -> None:
    """Changes that pile up while the loop is busy are folded into the newest; none of them frees a slot."""
    settings = settings_for(shared_etcd, group)
    store = EtcdSemaphoreStore(settings)
    store.update(lambda sem: sem.lock("a"))
    waiter = EtcdLockBackend(settings, first_backoff=3600, handoff_jitter=0.0)
    task = asyncio.create_task(waiter.acquire("w"))
    for _ in range(200):
        if waiter.store.watch_events == 0 and watch_threads():
            break
        await asyncio.sleep(0.02)
    # Written from a thread so that the burst reaches the watch while the event loop cannot take it.
    def burst() -> None:
        for i in range(30):
            store.update(lambda sem, i=i: sem.set_max(2).lock(f"b{i}"))
            store.update(lambda sem, i=i: sem.unlock(f"b{i}").set_max(1))

    await asyncio.to_thread(burst)
    await asyncio.sleep(0.3)
    assert not task.done()  # every value of the burst leaves no free slot
    assert waiter.store.watch_events == 60
    store.update(lambda sem: sem.unlock("a"))
    await asyncio.wait_for(task, SETTLE)
    assert store.get()[0].holders == ("w",)
    await waiter.close()
    store.close()


async def test_polling_only_mode_retries_with_backoff(
    shared_etcd: EtcdCluster, group: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(shared_etcd, group)
    holder = EtcdLockBackend(settings)
    await holder.acquire("a")
    poller = EtcdLockBackend(settings, use_watch=False, first_backoff=0.05, max_backoff=0.2)
    with caplog.at_level(logging.WARNING, logger="locksmithd.backends.etcd"):
        task = asyncio.create_task(poller.acquire("b"))
        await asyncio.sleep(0.5)
        assert not task.done()
        await holder.release("a")
        await asyncio.wait_for(task, SETTLE)
    assert "Failed to acquire lock: semaphore is at 0. Retrying in 50ms." in caplog.text
    assert watch_threads() == []
    await holder.close()
    await poller.close()


async def test_cancelled_acquire_stops_its_watch(shared_etcd: EtcdCluster, group: str) -> None:
    settings = settings_for(shared_etcd, group)
    holder = EtcdLockBackend(settings)
    await holder.acquire("a")
    waiter = EtcdLockBackend(settings, first_backoff=3600)
    task = asyncio.create_task(waiter.acquire("b"))
    for _ in range(100):
        if watch_threads():
            break
        await asyncio.sleep(0.02)
    assert len(watch_threads()) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert watch_threads() == []
    assert EtcdSemaphoreStore(settings).get()[0].holders == ("a",)  # the waiter took nothing
    assert waiter.store.line_keys() == []  # and left the line
    await holder.close()
    await waiter.close()


# -- the waiting line ----------------------------------------------------------------------------------------


async def until_true(condition: Callable[[], bool], what: str) -> None:
    for _ in range(int(SETTLE / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never happened: {what}")


def semaphore_watch_threads(key: str) -> list[threading.Thread]:
    return [t for t in watch_threads() if t.name == f"etcd-watch {key}"]


async def test_waiters_queue_and_only_the_head_watches_the_semaphore(shared_etcd: EtcdCluster, group: str) -> None:
    """max=1: the first waiter follows the semaphore, each other one the line key ahead of it; the slot
    passes down the line in order, and the line is empty at the end."""
    settings = settings_for(shared_etcd, group)
    holder = EtcdLockBackend(settings, first_backoff=3600)
    await holder.acquire("a")
    store = holder.store
    names = [f"w{i}" for i in range(4)]
    waiters = {name: EtcdLockBackend(settings, first_backoff=3600) for name in names}
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
    await until_true(lambda: all(w.waiting_on is not None for w in waiters.values()), "everyone waiting")
    assert [waiters[n].waiting_on for n in names] == [SEMAPHORE, *line[:-1]]
    assert len(semaphore_watch_threads(store.key)) == 1
    assert sum(w.store.semaphore_watches for w in waiters.values()) == 1
    assert shared_etcd.get(store.key) == b'{"semaphore":0,"max":1,"holders":["a"]}'  # the value is locksmith's

    await holder.release("a")
    await asyncio.wait_for(asyncio.gather(*tasks), SETTLE)
    assert order == names
    assert store.line_keys() == []
    assert store.get()[0] == Semaphore.default()
    assert watch_threads() == []
    for backend in (holder, *waiters.values()):
        await backend.close()


async def queue_up(
    settings: EtcdSettings,
    store: EtcdSemaphoreStore,
    names: list[str],
    make: Callable[[EtcdSettings], EtcdLockBackend] = lambda s: EtcdLockBackend(s, first_backoff=3600),
) -> tuple[dict[str, EtcdLockBackend], list[asyncio.Task[None]]]:
    """A waiter for each name, each started once the one before is in the line; returns when all wait."""
    waiters = {name: make(settings) for name in names}
    tasks = []
    for i, name in enumerate(names):
        tasks.append(asyncio.create_task(waiters[name].acquire(name)))
        await until_true(lambda i=i: len(store.line_keys()) == i + 1, f"{name} in the line")
    await until_true(lambda: all(w.waiting_on is not None for w in waiters.values()), "everyone waiting")
    return waiters, tasks


async def all_served(
    store: EtcdSemaphoreStore, waiters: dict[str, EtcdLockBackend], tasks: list[asyncio.Task[None]]
) -> None:
    """Every queued waiter gets a slot and holds it, the line is empty; then everything is closed."""
    await asyncio.wait_for(asyncio.gather(*tasks), SETTLE)
    assert sorted(store.get()[0].holders) == sorted(waiters)
    assert store.line_keys() == []
    for backend in waiters.values():
        await backend.close()
    store.close()


async def test_with_max_two_the_first_two_waiters_watch_the_semaphore(shared_etcd: EtcdCluster, group: str) -> None:
    settings = settings_for(shared_etcd, group)
    store = EtcdSemaphoreStore(settings)
    store.update(lambda sem: sem.set_max(2).lock("a").lock("b"))
    names = [f"w{i}" for i in range(5)]
    waiters, tasks = await queue_up(settings, store, names)
    line = [store.line_key(name) for name in names]
    # Each one behind the first two waits for the key two places ahead of it.
    assert [waiters[n].waiting_on for n in names] == [SEMAPHORE, SEMAPHORE, line[0], line[1], line[2]]
    assert len(semaphore_watch_threads(store.key)) == 2

    async def hold_briefly(task: asyncio.Task[None], name: str) -> None:
        await task
        await waiters[name].release(name)

    store.update(lambda sem: sem.unlock("a").unlock("b"))
    await asyncio.wait_for(asyncio.gather(*(hold_briefly(t, n) for t, n in zip(tasks, names, strict=True))), SETTLE)
    assert store.line_keys() == []
    history = values_of(shared_etcd, store.key)
    assert max(len(sem.holders) for sem in history) == 2
    assert {h for sem in history for h in sem.holders} == {"a", "b", *names}
    assert watch_threads() == []
    for backend in waiters.values():
        await backend.close()
    store.close()


async def test_with_a_large_max_only_the_front_waiters_watch_the_semaphore(
    shared_etcd: EtcdCluster, group: str
) -> None:
    """max=5, all held, five waiters: the first three follow the semaphore, the others the key three places
    ahead; five releases at once still reach all of them."""
    assert etcd_module.FRONT_WAITERS == 3
    settings = settings_for(shared_etcd, group)
    store = EtcdSemaphoreStore(settings)
    holders = [f"h{i}" for i in range(5)]
    store.update(lambda sem: functools.reduce(Semaphore.lock, holders, sem.set_max(5)))
    names = [f"w{i}" for i in range(5)]
    waiters, tasks = await queue_up(settings, store, names)
    line = [store.line_key(name) for name in names]
    assert [waiters[n].waiting_on for n in names] == [SEMAPHORE] * 3 + line[:2]
    assert len(semaphore_watch_threads(store.key)) == 3

    store.update(lambda sem: functools.reduce(Semaphore.unlock, holders, sem))
    await all_served(store, waiters, tasks)


def patient_waiter(settings: EtcdSettings) -> EtcdLockBackend:
    """A waiter whose hand-off delays would last ten minutes: it only gets a slot promptly without them."""
    return EtcdLockBackend(settings, first_backoff=3600, handoff_jitter=600, max_handoff_jitter=600)


async def test_a_freed_slot_goes_at_once_to_the_first_waiter_and_nobody_races_it(
    shared_etcd: EtcdCluster, group: str
) -> None:
    """max=2, both held, two waiters following the semaphore: each release is taken by the oldest waiter
    without a hand-off delay, and the one behind does not try for a slot that is not its own."""
    settings = settings_for(shared_etcd, group)
    store = EtcdSemaphoreStore(settings)
    store.update(lambda sem: sem.set_max(2).lock("a").lock("b"))
    first, second = patient_waiter(settings), patient_waiter(settings)
    first_task = asyncio.create_task(first.acquire("w0"))
    await until_true(lambda: first.waiting_on == SEMAPHORE, "w0 waiting")
    second_task = asyncio.create_task(second.acquire("w1"))
    await until_true(lambda: second.waiting_on == SEMAPHORE, "w1 waiting")

    assert store.release("a")
    await asyncio.wait_for(first_task, SETTLE)
    assert store.get()[0].holders == ("b", "w0")
    assert not second_task.done()
    assert store.release("b")
    await asyncio.wait_for(second_task, SETTLE)
    assert store.get()[0].holders == ("w0", "w1")
    assert first.store.conflicts == second.store.conflicts == 0
    for backend in (first, second):
        await backend.close()
    store.close()


async def test_waiters_entitled_to_slots_freed_together_all_get_one(shared_etcd: EtcdCluster, group: str) -> None:
    """Three slots freed in one write, three waiters: each is entitled to one, so a waiter that loses the race
    to another tries again at once instead of waiting for a hand-off delay."""
    settings = settings_for(shared_etcd, group)
    store = EtcdSemaphoreStore(settings)
    store.update(lambda sem: sem.set_max(3).lock("a").lock("b").lock("c"))
    names = ["w0", "w1", "w2"]
    waiters, tasks = await queue_up(settings, store, names, patient_waiter)
    assert all(w.waiting_on == SEMAPHORE for w in waiters.values())

    store.update(lambda sem: sem.unlock("a").unlock("b").unlock("c"))
    await all_served(store, waiters, tasks)


async def test_a_dead_waiter_does_not_block_the_one_behind_it(shared_etcd: EtcdCluster, group: str) -> None:
    """A waiter that died after joining (no keepalive) leaves when its lease expires; the next one moves up."""
    settings = settings_for(shared_etcd, group)
    store = EtcdSemaphoreStore(settings)
    assert store.try_acquire("a").acquired
    dead_lease = store.grant_lease(2)
    store.join_line("dead", dead_lease)
    waiter = EtcdLockBackend(settings, first_backoff=3600)
    task = asyncio.create_task(waiter.acquire("w"))
    await until_true(lambda: waiter.waiting_on is not None, "the waiter waiting")
    assert waiter.waiting_on == store.line_key("dead")  # behind the dead one, not on the semaphore
    assert store.release("a")
    await asyncio.wait_for(task, SETTLE)
    assert store.get()[0].holders == ("w",)
    assert store.line_keys() == []
    await waiter.close()
    store.close()


async def test_a_waiter_whose_lease_is_revoked_joins_again(shared_etcd: EtcdCluster, group: str) -> None:
    """Its key gone (as after an etcd outage longer than the TTL), a waiter queues again instead of hiding."""
    settings = settings_for(shared_etcd, group)
    store = EtcdSemaphoreStore(settings)
    assert store.try_acquire("a").acquired
    first = EtcdLockBackend(settings, first_backoff=3600, line_ttl=3)
    second = EtcdLockBackend(settings, first_backoff=3600, line_ttl=3)
    t1 = asyncio.create_task(first.acquire("w1"))
    await until_true(lambda: store.line_keys() == [store.line_key("w1")], "w1 in the line")
    t2 = asyncio.create_task(second.acquire("w2"))
    await until_true(lambda: second.waiting_on == store.line_key("w1"), "w2 behind w1")
    store.revoke_lease(second_lease := _lease_of(store, "w2"))
    # w2 was woken by nothing; its keepalive finds the lease gone and puts its key back.
    await until_true(lambda: store.line_key("w2") in store.line_keys(), "w2 back in the line")
    assert _lease_of(store, "w2") != second_lease
    assert store.release("a")
    await asyncio.wait_for(t1, SETTLE)
    assert first.store.release("w1")
    await asyncio.wait_for(t2, SETTLE)
    assert store.get()[0].holders == ("w2",)
    assert store.line_keys() == []
    for backend in (first, second):
        await backend.close()
    store.close()


def _lease_of(store: EtcdSemaphoreStore, machine_id: str) -> int:
    doc = store._post("kv/range", {"key": _b64(store.line_key(machine_id))})
    return int(doc["kvs"][0]["lease"])


async def test_without_the_lease_api_every_waiter_watches_and_still_gets_the_lock(
    shared_etcd: EtcdCluster, group: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(etcd_module, "LEASE_GRANT_PATH", "lease/no-such-call")
    settings = settings_for(shared_etcd, group)
    holder = EtcdLockBackend(settings, first_backoff=3600)
    await holder.acquire("a")
    waiters = [EtcdLockBackend(settings, first_backoff=3600) for _ in range(2)]
    with caplog.at_level(logging.WARNING, logger="locksmithd.backends.etcd"):
        tasks = [asyncio.create_task(w.acquire(f"w{i}")) for i, w in enumerate(waiters)]
        await until_true(lambda: all(w.waiting_on == SEMAPHORE for w in waiters), "both on the semaphore")
    refusals = [r for r in caplog.records if "refuses the waiting line" in r.getMessage()]
    assert len(refusals) == 2  # one line per node
    assert "lease/no-such-call" in refusals[0].getMessage()
    assert holder.store.line_keys() == []
    await holder.release("a")
    done, _ = await asyncio.wait(tasks, timeout=SETTLE, return_when=asyncio.FIRST_COMPLETED)
    assert len(done) == 1
    (winner,) = holder.store.get()[0].holders
    await holder.release(winner)
    await asyncio.wait_for(asyncio.gather(*tasks), SETTLE)
    assert len(holder.store.get()[0].holders) == 1
    assert watch_threads() == []
    for w in waiters:
        await w.close()
    await holder.close()


async def test_unreachable_etcd_falls_back_to_backoff_then_recovers(
    etcd_single: EtcdCluster, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(etcd_single, "recover", request_timeout=1.0)
    etcd_single.stop(0)
    backend = EtcdLockBackend(settings, first_backoff=0.05, max_backoff=0.2)
    with caplog.at_level(logging.WARNING, logger="locksmithd.backends.etcd"):
        task = asyncio.create_task(backend.acquire("a"))
        for _ in range(200):
            if "Failed to acquire lock: no etcd endpoint answered" in caplog.text:
                break
            await asyncio.sleep(0.02)
        assert "Retrying in 50ms." in caplog.text
        etcd_single.start(0)
        await asyncio.wait_for(task, SETTLE)
    assert etcd_single.get(settings.key) == b'{"semaphore":0,"max":1,"holders":["a"]}'
    await backend.close()


# -- load and faults -----------------------------------------------------------------------------------------


async def _fleet(
    endpoint_orders: list[tuple[str, ...]], group: str, clients: int, hold: float, **backend_kw: object
) -> int:
    """``clients`` nodes each acquire, hold, release once; returns the most holders the nodes saw at once."""
    inside = 0
    most = 0

    async def node(i: int) -> None:
        nonlocal inside, most
        endpoints = endpoint_orders[i % len(endpoint_orders)]
        backend = EtcdLockBackend(
            EtcdSettings(endpoints=endpoints, group=group, request_timeout=2.0),
            **backend_kw,  # type: ignore[arg-type]
        )
        try:
            await backend.acquire(f"node-{i:02d}")
            inside += 1
            most = max(most, inside)
            await asyncio.sleep(hold)
            inside -= 1
            while True:  # a release may meet a member going down; retry it like the daemon's unlock loop
                try:
                    await backend.release(f"node-{i:02d}")
                    break
                except EtcdTransientError:
                    await asyncio.sleep(0.1)
        finally:
            await backend.close()

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
    store = EtcdSemaphoreStore(settings_for(shared_etcd, group))
    store.update(lambda sem: sem.set_max(3))
    store.close()
    most = await _fleet(
        [tuple(shared_etcd.endpoints)],
        group,
        50,
        0.02,
        first_backoff=0.2,
        max_backoff=1.0,
        handoff_jitter=0.05,
    )
    assert most <= 3
    assert_never_over(shared_etcd, key_for_group(group), 3, 50)
    assert watch_threads() == []


async def test_member_killed_and_restarted_mid_traffic(etcd_cluster3: EtcdCluster) -> None:
    cluster = etcd_cluster3
    group = "faults"
    store = EtcdSemaphoreStore(EtcdSettings(endpoints=tuple(cluster.endpoints), group=group))
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
    most = await _fleet(orders, group, 24, 0.1, first_backoff=0.1, max_backoff=0.5, handoff_jitter=0.05)
    await fault_task
    assert most <= 2
    assert cluster.running(victim)
    assert_never_over(cluster, key_for_group(group), 2, 24)
    assert watch_threads() == []


# -- TLS and authentication ----------------------------------------------------------------------------------


def test_ca_only_tls(tmp_path: Path) -> None:
    """A CA file alone is enough to reach an https etcd (locksmith also wanted a client cert, Flatcar#948)."""
    tls = make_server_tls(tmp_path / "pki", "test etcd CA")
    cluster = start_cluster(1, tmp_path / "etcd-tls", tls=tls)
    try:
        assert cluster.endpoints[0].startswith("https://")
        store = EtcdSemaphoreStore(EtcdSettings(endpoints=tuple(cluster.endpoints), ca_file=str(tls.ca_file)))
        assert store.try_acquire("tls-node").acquired
        assert cluster.get(store.key) == b'{"semaphore":0,"max":1,"holders":["tls-node"]}'
        store.close()
        untrusted = EtcdSemaphoreStore(EtcdSettings(endpoints=tuple(cluster.endpoints)))
        with pytest.raises(EtcdTransientError, match="TLS certificate verification failed"):
            untrusted.get()
    finally:
        cluster.stop_all()


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

    store = EtcdSemaphoreStore(EtcdSettings(endpoints=(endpoint,), username="node", password="nodepw"))
    assert store.try_acquire("authed").acquired
    store.close()
    with pytest.raises(LockBackendError, match=r"refused user 'node': .*authentication failed"):
        EtcdSemaphoreStore(EtcdSettings(endpoints=(endpoint,), username="node", password="wrong")).get()
    with pytest.raises(LockBackendError, match="user name is empty"):
        EtcdSemaphoreStore(EtcdSettings(endpoints=(endpoint,))).get()
