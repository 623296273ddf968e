"""coreupdate's storage on SQLite and on a real PostgreSQL server: migrations, catalog, grants under
concurrency, statuses from events, automatic pause, retention and tokens."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from coreupdate import COREOS_APP_ID
from coreupdate.model import Group, GroupPolicy, InstanceStatus, Package
from coreupdate.policy import Grant, Refusal, Refuse
from coreupdate.storage import engine as db_engine
from coreupdate.storage.store import CheckIn, Conflict, EventRecord, InstanceFilter, NotFound, Store, token_matches
from update_engine.omaha import RequestEvent

SHA256 = "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
SHA1 = "2jmj7l5rSw0yVb/vlWAYkK/YBwk="


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_780_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return db_engine.sqlite_url(tmp_path)
    server = request.getfixturevalue("postgres_server")
    return str(server.create_database("t" + uuid.uuid4().hex[:12]))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(database_url: str, clock: FakeClock) -> Iterator[Store]:
    engine = db_engine.create(database_url)
    s = Store(engine, clock=clock)
    s.migrate()
    try:
        yield s
    finally:
        engine.dispose()


def add_release(store: Store, version: str = "2.0.0", channel: str = "stable") -> None:
    store.add_package(Package(COREOS_APP_ID, version, 1000, SHA256, SHA1, "update.gz"))
    store.set_channel(COREOS_APP_ID, channel, version)


def make_group(store: Store, **policy: Any) -> Group:
    return store.create_group(Group("", COREOS_APP_ID, "canary", "stable", GroupPolicy(**policy)))


def checkin(clock: FakeClock, machine: str, group: Group, version: str = "1.0.0") -> CheckIn:
    return CheckIn(COREOS_APP_ID, machine, version, group.name, group.id, clock.now)


def test_migrations_create_the_defaults_once(store: Store) -> None:
    assert store.migrate() == 0
    catalog = store.load_catalog()
    assert set(catalog.apps) == {COREOS_APP_ID}
    assert {name for (_app, name) in catalog.channels} == {"stable", "beta", "alpha"}
    stable = catalog.group_for_track(COREOS_APP_ID, "stable")
    assert stable is not None and stable.channel == "stable"
    assert catalog.group_for_track(COREOS_APP_ID, stable.id) == stable
    assert catalog.package_for(stable) is None


def test_catalog_changes_bump_the_version_and_refuse_contradictions(store: Store) -> None:
    before = store.catalog_version()
    add_release(store)
    assert store.catalog_version() > before
    with pytest.raises(Conflict, match="already has a package"):
        store.add_package(Package(COREOS_APP_ID, "2.0.0", 1, SHA256, SHA1, "update.gz"))
    with pytest.raises(NotFound, match=r"no package 9\.9\.9"):
        store.set_channel(COREOS_APP_ID, "stable", "9.9.9")
    with pytest.raises(Conflict, match="is on channel"):
        store.delete_package(COREOS_APP_ID, "2.0.0")
    with pytest.raises(Conflict, match="followed by group"):
        store.delete_channel(COREOS_APP_ID, "stable")
    group = make_group(store, update_count=3)
    with pytest.raises(Conflict, match="already has a group named canary"):
        make_group(store)
    paused = store.update_group(COREOS_APP_ID, "canary", lambda g: replace(
        g, pause_reason="change freeze", policy=replace(g.policy, updates_paused=True)))
    assert paused.policy.updates_paused and paused.pause_reason == "change freeze"
    kinds = [a["kind"] for a in store.list_activity(COREOS_APP_ID)]
    assert kinds[:2] == ["group-paused", "channel-updated"]
    assert store.load_catalog().groups[group.id].policy.updates_paused


def test_grants_follow_the_period_and_in_progress_limits(store: Store, clock: FakeClock) -> None:
    add_release(store)
    group = make_group(store, update_count=2, update_interval=timedelta(minutes=10))
    outcomes = [store.try_grant(checkin(clock, f"m{i}", group), group.id).decision for i in range(3)]
    assert outcomes[0] == Grant("2.0.0", first_of_rollout=True) and outcomes[1] == Grant("2.0.0")
    assert isinstance(outcomes[2], Refuse) and outcomes[2].reason == Refusal.PERIOD_LIMIT
    assert store.get_instance(COREOS_APP_ID, "m2")["status"] == "OnHold"
    # The same instance asking again gets its grant again; it does not count twice.
    assert store.try_grant(checkin(clock, "m0", group), group.id).decision == Grant("2.0.0", regrant=True)
    clock.now += 601
    refused = store.try_grant(checkin(clock, "m2", group), group.id).decision
    assert isinstance(refused, Refuse) and refused.reason == Refusal.IN_PROGRESS_LIMIT
    # m0 comes back on the new version: Complete, and m2 may go.
    store.record([checkin(clock, "m0", group, "2.0.0")], [])
    assert store.get_instance(COREOS_APP_ID, "m0")["status"] == "Complete"
    assert isinstance(store.try_grant(checkin(clock, "m2", group), group.id).decision, Grant)
    assert store.rollout(group.id, "2.0.0") == {"version": "2.0.0", "started_at": clock.now - 601, "granted": 3,
                                                 "failed": 0, "completed": 1, "outcome": None, "ended_at": None}
    assert [a["kind"] for a in store.list_activity(group_id=group.id)] == ["rollout-started"]


def test_check_ins_held_back_by_a_remembered_limit_are_marked_on_hold_in_bulk(store: Store, clock: FakeClock) -> None:
    """More held-back check-ins than one read takes, in one batch: each instance becomes OnHold unless an update
    is in flight for it; a second batch changes nothing."""
    add_release(store)
    group = make_group(store)
    machines = [f"m{i:04d}" for i in range(1234)]
    store.record([checkin(clock, m, group) for m in machines], [])
    store.record([], [EventRecord(COREOS_APP_ID, "m0007", group.id, "1.0.0", RequestEvent(13, 1), clock.now)])
    assert store.get_instance(COREOS_APP_ID, "m0007")["status"] == "Downloading"
    clock.now += 60
    held = [replace(checkin(clock, m, group), held_back_from="2.0.0") for m in machines]
    store.record(held, [])
    statuses = {m: store.get_instance(COREOS_APP_ID, m)["status"] for m in machines}
    assert statuses.pop("m0007") == "Downloading"
    assert set(statuses.values()) == {"OnHold"}
    assert store.get_instance(COREOS_APP_ID, "m1233")["status_at"] == clock.now
    clock.now += 60
    store.record(held, [])
    assert store.get_instance(COREOS_APP_ID, "m1233")["status_at"] == clock.now - 60


def test_events_move_statuses_and_failures_pause_the_rollout(store: Store, clock: FakeClock) -> None:
    add_release(store)
    group = make_group(store, failure_pause_count=2)
    for i in range(3):
        assert isinstance(store.try_grant(checkin(clock, f"m{i}", group), group.id).decision, Grant)

    def report(machine: str, *evs: RequestEvent) -> Any:
        return store.record([], [EventRecord(COREOS_APP_ID, machine, group.id, "1.0.0", e, clock.now) for e in evs])

    report("m0", RequestEvent(13, 1), RequestEvent(14, 1))
    assert store.get_instance(COREOS_APP_ID, "m0")["status"] == "Downloaded"
    report("m0", RequestEvent(3, 1))
    assert store.get_instance(COREOS_APP_ID, "m0")["status"] == "Installed"
    outcome = report("m1", RequestEvent(3, 0, 10))
    assert outcome.paused_groups == ()
    assert store.get_instance(COREOS_APP_ID, "m1")["error_code"] == 10
    outcome = report("m2", RequestEvent(3, 0, 44))
    assert outcome.paused_groups == (group.id,)
    assert store.get_instance(COREOS_APP_ID, "m2")["status"] == "RolledBack"
    paused = store.get_group(COREOS_APP_ID, group.id)
    assert paused.policy.updates_paused
    assert paused.pause_reason == "2 instance(s) failed version 2.0.0, at or over the threshold of 2"
    assert store.list_activity(group_id=group.id)[0]["kind"] == "rollout-paused"
    assert [e["status"] for e in store.instance_events(COREOS_APP_ID, "m0")] == ["Installed", "Downloaded",
                                                                                 "Downloading"]
    counts = {(c["version"], c["status"]): c["instances"] for c in store.version_counts(COREOS_APP_ID, group.id)}
    assert counts == {("1.0.0", "Installed"): 1, ("1.0.0", "Error"): 1, ("1.0.0", "RolledBack"): 1}


def test_concurrent_check_ins_never_exceed_the_period_count(database_url: str, clock: FakeClock) -> None:
    """240 check-ins at once from 24 threads and two engines (as two server processes would): exactly 7 grants."""
    engines = [db_engine.create(database_url) for _ in range(2)]
    try:
        stores = [Store(e, clock=clock) for e in engines]
        stores[0].migrate()
        add_release(stores[0])
        group = make_group(stores[0], update_count=7, update_interval=timedelta(hours=1))
        start = threading.Barrier(24)

        def check(i: int) -> bool:
            if i < 24:
                start.wait(timeout=30)
            decision = stores[i % 2].try_grant(checkin(clock, f"machine-{i:03d}", group), group.id).decision
            return isinstance(decision, Grant)

        with ThreadPoolExecutor(max_workers=24) as pool:
            granted = sum(pool.map(check, range(240)))
        assert granted == 7
        page = stores[1].list_instances(COREOS_APP_ID, InstanceFilter(status=InstanceStatus.UPDATE_GRANTED))
        assert page.total == 7
    finally:
        for e in engines:
            e.dispose()


def activity_of(store: Store, group: Group, kind: str) -> list[dict[str, Any]]:
    return [a for a in store.list_activity(group_id=group.id, limit=1000) if a["kind"] == kind]


def test_a_rollout_completes_once_when_every_instance_seen_in_the_last_day_runs_it(
    store: Store, clock: FakeClock
) -> None:
    add_release(store)
    group = make_group(store, update_count=10)
    # A machine that stopped checking in two days ago, and one that came up on the new version by itself.
    store.record([replace(checkin(clock, "gone", group), at=clock.now - 2 * 86400),
                  checkin(clock, "fresh", group, "2.0.0")], [])
    for machine in ("m0", "m1", "m2"):
        assert isinstance(store.try_grant(checkin(clock, machine, group), group.id).decision, Grant)
    clock.now += 600
    outcome = store.record([checkin(clock, "m0", group, "2.0.0"), checkin(clock, "m1", group, "2.0.0")], [])
    assert outcome.completed_rollouts == () and activity_of(store, group, "rollout-completed") == []
    # The last one checks in from 2.0.0 with its "up after reboot" event; later check-ins change nothing more.
    outcome = store.record([checkin(clock, "m2", group, "2.0.0")], [EventRecord(
        COREOS_APP_ID, "m2", group.id, "2.0.0", RequestEvent(3, 2, previous_version="1.0.0"), clock.now)])
    message = ("rollout of 2.0.0 to group canary completed: all 4 instance(s) seen in the last day run 2.0.0 "
               "(3 granted, 3 complete, 0 failed)")
    assert outcome.completed_rollouts == (message,)
    clock.now += 60
    assert store.record([checkin(clock, f"m{i}", group, "2.0.0") for i in range(3)], []).completed_rollouts == ()
    completed = activity_of(store, group, "rollout-completed")
    assert [(a["version"], a["message"]) for a in completed] == [("2.0.0", message)]
    rollout = store.rollout(group.id, "2.0.0")
    assert rollout is not None and rollout["outcome"] == "completed" and rollout["ended_at"] == clock.now - 60
    # A completed rollout stays completed: the channel moving on does not supersede it.
    add_release(store, "2.1.0")
    assert activity_of(store, group, "rollout-superseded") == []


def test_a_channel_that_moves_on_supersedes_the_rollout_in_progress(store: Store, clock: FakeClock) -> None:
    add_release(store)
    group = make_group(store, update_count=10)
    other = store.create_group(Group("", COREOS_APP_ID, "idle", "stable", GroupPolicy()))
    for machine in ("m0", "m1"):
        store.try_grant(checkin(clock, machine, group), group.id)
    store.record([checkin(clock, "m0", group, "2.0.0")], [])
    add_release(store, "2.1.0")
    superseded = activity_of(store, group, "rollout-superseded")
    assert [(a["version"], a["message"]) for a in superseded] == [(
        "2.0.0", "rollout of 2.0.0 to group canary superseded: channel stable now offers 2.1.0 "
                 "(2 granted, 1 complete, 0 failed)")]
    assert activity_of(store, other, "rollout-superseded") == []  # nothing was granted there
    assert store.rollout(group.id, "2.0.0")["outcome"] == "superseded"  # type: ignore[index]
    # Back to 2.0.0: the rollout is open again, and completes like any other.
    store.set_channel(COREOS_APP_ID, "stable", "2.0.0")
    assert store.rollout(group.id, "2.0.0")["outcome"] is None  # type: ignore[index]
    store.record([checkin(clock, "m1", group, "2.0.0")], [])
    assert len(activity_of(store, group, "rollout-completed")) == 1
    # A group moved to a channel with another version supersedes its open rollout as well.
    store.set_channel(COREOS_APP_ID, "stable", "2.1.0")
    assert isinstance(store.try_grant(checkin(clock, "m0", group, "2.0.0"), group.id).decision, Grant)
    store.update_group(COREOS_APP_ID, group.id, lambda g: replace(g, channel="alpha"))
    assert activity_of(store, group, "rollout-superseded")[0]["message"] == (
        "rollout of 2.1.0 to group canary superseded: the group now follows channel alpha, which offers nothing "
        "(1 granted, 0 complete, 0 failed)")


def test_two_servers_record_a_completion_once(database_url: str, clock: FakeClock) -> None:
    """Two engines (two server processes) flush at once the check-ins of the last two instances behind in each
    group, machines reinstalled on the new version without a grant (so nothing else serialises the batches):
    whichever commits second sees both and records the completion; neither misses it, neither repeats it."""
    engines = [db_engine.create(database_url) for _ in range(2)]
    try:
        stores = [Store(e, clock=clock) for e in engines]
        stores[0].migrate()
        add_release(stores[0])
        created = [stores[0].create_group(Group("", COREOS_APP_ID, f"g{i}", "stable", GroupPolicy()))
                   for i in range(24)]
        for group in created:
            stores[0].record([checkin(clock, f"{group.name}-{half}", group) for half in range(2)], [])
            stores[0].try_grant(checkin(clock, f"{group.name}-granted", group), group.id)
            stores[0].record([checkin(clock, f"{group.name}-granted", group, "2.0.0")], [])
        start = threading.Barrier(2)

        def flush(half: int) -> None:
            start.wait(timeout=30)
            stores[half].record([checkin(clock, f"{g.name}-{half}", g, "2.0.0") for g in created], [])

        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(flush, range(2)))
        for group in created:
            assert len(activity_of(stores[1], group, "rollout-completed")) == 1, group.name
    finally:
        for e in engines:
            e.dispose()


def test_history_snapshots_retention_and_instance_listing(store: Store, clock: FakeClock) -> None:
    group = make_group(store)
    store.record([checkin(clock, f"m{i}", group, "1.0.0" if i % 3 else "2.0.0") for i in range(9)],
                 [EventRecord(COREOS_APP_ID, "m1", group.id, "1.0.0", RequestEvent(3, 0, 9), clock.now)])
    assert store.snapshot_versions() == 2
    hour = clock.now - clock.now % 3600
    timeline = store.version_timeline(group.id, hour - 1, hour + 1)
    assert timeline == [{"at": hour, "version": "1.0.0", "instances": 6}, {"at": hour, "version": "2.0.0",
                                                                           "instances": 3}]
    page = store.list_instances(COREOS_APP_ID, InstanceFilter(group_id=group.id, version="2.0.0", limit=2))
    assert page.total == 3 and [i["machine_id"] for i in page.instances] == ["m0", "m3"]
    clock.now += 10 * 86400
    store.record([checkin(clock, "m0", group)], [])
    pruned = store.prune(events_older_than=86400, history_older_than=5 * 86400, instances_older_than=7 * 86400)
    assert pruned == {"events": 1, "grants": 0, "web_sessions": 0, "activity": 0, "version_snapshots": 2,
                      "instances": 8}
    assert store.list_instances(COREOS_APP_ID, InstanceFilter()).total == 1


def test_tokens_are_stored_hashed_and_can_be_revoked(store: Store, database_url: str) -> None:
    token = store.create_token("ci")
    assert token.startswith("cu_") and len(token) > 40
    hashes = store.load_catalog().token_hashes
    assert token_matches(token, hashes) and not token_matches(token + "x", hashes)
    engine = db_engine.create(database_url)
    with engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT token_sha256 FROM api_tokens")).scalars().all()
    engine.dispose()
    assert token not in stored
    assert store.revoke_token("ci") == 1
    assert not token_matches(token, store.load_catalog().token_hashes)
    with pytest.raises(NotFound):
        store.revoke_token("ci")


def test_grants_and_failure_batches_at_once_never_deadlock(postgres_server: Any, clock: FakeClock) -> None:
    """A grant locks its group, then counts in the rollout's row; a batch of events counts failures in the
    rollout's row and may pause the group. Both at once, round after round, from two engines (two servers) on
    PostgreSQL: neither is aborted as a deadlock, and the counts, the statuses and the pause add up. Each
    batch also carries events of other instances, so that it is still open when the grant asks for its locks."""
    rounds, filler = 12, 40
    url = str(postgres_server.create_database("t" + uuid.uuid4().hex[:12]))
    engines = [db_engine.create(url) for _ in range(2)]
    try:
        stores = [Store(e, clock=clock) for e in engines]
        stores[0].migrate()
        add_release(stores[0])
        group = make_group(stores[0], update_count=10_000, failure_pause_count=rounds)
        for r in range(rounds):
            assert isinstance(stores[0].try_grant(checkin(clock, f"fail-{r}", group), group.id).decision, Grant)
        stores[0].record([checkin(clock, f"busy-{i}", group) for i in range(filler)], [])
        start = threading.Barrier(2)

        def grant(r: int) -> Any:
            start.wait(timeout=30)
            return stores[0].try_grant(checkin(clock, f"new-{r}", group), group.id).decision

        def fail(r: int) -> Any:
            reported = [EventRecord(COREOS_APP_ID, f"fail-{r}", group.id, "1.0.0", RequestEvent(3, 0, 10), clock.now)]
            reported += [EventRecord(COREOS_APP_ID, f"busy-{i}", group.id, "1.0.0", RequestEvent(13, 1), clock.now)
                         for i in range(filler)]
            start.wait(timeout=30)
            return stores[1].record([], reported)

        granted = 0
        with ThreadPoolExecutor(max_workers=2) as pool:
            for r in range(rounds):
                decision, batch = pool.submit(grant, r), pool.submit(fail, r)
                granted += isinstance(decision.result(), Grant)  # a deadlock would raise here or below
                batch.result()
        assert granted >= rounds - 1  # only the last round's grant may meet the pause
        rollout = stores[1].rollout(group.id, "2.0.0")
        assert rollout is not None and (rollout["granted"], rollout["failed"]) == (rounds + granted, rounds)
        assert {stores[1].get_instance(COREOS_APP_ID, f"fail-{r}")["status"] for r in range(rounds)} == {"Error"}
        assert stores[1].get_group(COREOS_APP_ID, group.id).policy.updates_paused
        assert len(activity_of(stores[1], group, "rollout-paused")) == 1
    finally:
        for e in engines:
            e.dispose()


def test_a_failed_pause_leaves_the_batch_written_once_and_the_next_grant_pauses(
    store: Store, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pause runs after the batch committed: when it fails, ``record`` must not raise (the writer would
    write the batch again); the next grant meets the threshold and pauses the group itself."""
    add_release(store)
    group = make_group(store, failure_pause_count=1)
    assert isinstance(store.try_grant(checkin(clock, "m0", group), group.id).decision, Grant)

    def refuse(*_: Any) -> list[str]:
        raise sa.exc.OperationalError("UPDATE groups", {}, Exception("server closed the connection"))

    monkeypatch.setattr(store, "_failure_pauses", refuse)
    outcome = store.record([], [EventRecord(COREOS_APP_ID, "m0", group.id, "1.0.0", RequestEvent(3, 0, 10),
                                            clock.now)])
    assert outcome.paused_groups == () and outcome.failures == 1
    assert store.rollout(group.id, "2.0.0")["failed"] == 1  # type: ignore[index]
    assert not store.get_group(COREOS_APP_ID, group.id).policy.updates_paused
    monkeypatch.undo()
    refused = store.try_grant(checkin(clock, "m1", group), group.id)
    assert isinstance(refused.decision, Refuse) and refused.decision.reason == Refusal.FAILURE_THRESHOLD
    assert refused.paused_group and store.get_group(COREOS_APP_ID, group.id).policy.updates_paused
    assert len(activity_of(store, group, "rollout-paused")) == 1
