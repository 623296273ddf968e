"""The dashboard's storage on SQLite and a real PostgreSQL: migrating an existing database, users and
sessions, the aggregates of the overview and group pages, the instance table's pages, grants history."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import sqlalchemy as sa

from coreupdate import COREOS_APP_ID
from coreupdate.accounts import Role, hash_password
from coreupdate.model import Group, InstanceStatus
from coreupdate.policy import Grant
from coreupdate.storage import engine as db_engine
from coreupdate.storage import migrations, schema
from coreupdate.storage.accounts import AccountStore
from coreupdate.storage.dashboard import DashboardQueries, InstanceQuery, InstanceSort
from coreupdate.storage.store import Conflict, EventRecord, NotFound, Store
from coreupdate.web import present
from coreupdate.web.pages import Pages
from tests.integration.test_coreupdate_storage import (  # noqa: F401  (fixtures)
    FakeClock,
    activity_of,
    add_release,
    checkin,
    clock,
    database_url,
    make_group,
    store,
)
from update_engine.omaha import RequestEvent

pytestmark = pytest.mark.integration


def test_a_version_1_database_gains_the_dashboard_tables_and_indexes(database_url: str) -> None:  # noqa: F811
    engine = db_engine.create(database_url)
    try:
        with engine.begin() as conn:
            migrations.schema_version.create(conn)
            migrations._step_1_initial(conn)
            conn.execute(sa.insert(migrations.schema_version).values(version=1))
        with engine.connect() as conn:
            assert not sa.inspect(conn).has_table("users")
            # As step 2 left a database before step 3 existed: its first two dashboard indexes.
            conn.execute(sa.text("CREATE INDEX instances_group_versions ON instances (group_id, version, status, "
                                 "last_check_at)"))
            conn.execute(sa.text("CREATE INDEX instances_group_last_check ON instances (group_id, last_check_at)"))
        assert Store(engine).migrate() == migrations.LATEST - 1
        with engine.connect() as conn:
            inspector = sa.inspect(conn)
            assert {"users", "web_sessions", "grants"} <= set(inspector.get_table_names())
            names = {i["name"] for i in inspector.get_indexes("instances")}
            assert {"instances_group_version_order", "instances_group_check_order", "instances_group_status_order",
                    "instances_group_machine"} <= names
            assert not names & {"instances_group_versions", "instances_group_last_check"}
            assert migrations.current_version(conn) == migrations.LATEST
        # A new database gets the same schema in one go.
        assert {t.name for t in schema.metadata.sorted_tables} <= set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_users_and_sessions(store: Store, clock: FakeClock) -> None:  # noqa: F811
    accounts = AccountStore(store.engine, clock=clock)
    alice = accounts.add_user("alice", Role.ADMIN, hash_password("correct horse", n=2**4))
    with pytest.raises(Conflict):
        accounts.add_user("alice", Role.VIEWER, "x")
    cookie, session = accounts.create_session(alice, 3600)
    found = accounts.session(cookie)
    assert found is not None and found.user == alice and found.csrf_token == session.csrf_token
    with store.engine.connect() as conn:
        assert cookie not in conn.execute(sa.select(schema.web_sessions.c.token_sha256)).scalars().all()
    assert accounts.session(cookie + "x") is None
    clock.now += 3601
    assert accounts.session(cookie) is None
    cookie, _ = accounts.create_session(alice, 3600)
    accounts.set_password("alice", hash_password("another one", n=2**4))
    assert accounts.session(cookie) is None  # a new password signs the user out everywhere
    cookie, _ = accounts.create_session(alice, 3600)
    accounts.delete_user("alice")
    assert accounts.session(cookie) is None and accounts.find_user("alice") is None
    with pytest.raises(NotFound):
        accounts.delete_user("alice")


def test_fleet_counts_errors_and_instance_pages(store: Store, clock: FakeClock) -> None:  # noqa: F811
    add_release(store)
    group = make_group(store)
    other = store.create_group(type(group)("", COREOS_APP_ID, "other", "stable"))
    store.record([checkin(clock, f"m{i:02d}", group, "2.0.0" if i < 4 else "1.0.0") for i in range(10)]
                 + [checkin(clock, "x0", other)], [])
    clock.now += 2 * 3600
    store.record([checkin(clock, "m00", group, "2.0.0"), checkin(clock, "m09", group)],
                 [EventRecord(COREOS_APP_ID, "m09", group.id, "1.0.0", RequestEvent(3, 0, 10), clock.now)])
    queries = DashboardQueries(store.engine, clock=clock)
    counts = queries.fleet_counts()
    assert set(counts) == {group.id, other.id}
    mine = counts[group.id]
    assert mine.total == 10 and mine.seen_day == 10 and mine.seen_day_on("2.0.0") == 4
    assert mine.versions_seen_hour() == {"2.0.0": 1, "1.0.0": 1}
    assert mine.by_status() == {InstanceStatus.UNDEFINED: 9, InstanceStatus.ERROR: 1}
    assert queries.fleet_counts([other.id])[other.id].total == 1
    assert queries.errors_since(clock.now - 60) == {group.id: 1}
    grant = store.try_grant(checkin(clock, "m08", group), group.id)
    assert grant.decision.__class__.__name__ == "Grant"
    store.record([], [EventRecord(COREOS_APP_ID, "m08", group.id, "1.0.0", RequestEvent(3, 0, 10), clock.now)])
    assert queries.errors_since(clock.now - 60) == {group.id: 2}
    assert queries.errors_since(clock.now - 60, [other.id]) == {}
    assert queries.instance_grants(COREOS_APP_ID, "m08") == [{"at": clock.now, "group_id": group.id,
                                                              "version": "2.0.0"}]
    page = queries.instance_page(InstanceQuery(group.id, version="1.0.0", sort=InstanceSort.MACHINE,
                                               descending=False, limit=3, offset=3))
    assert page.total == 6 and [r["machine_id"] for r in page.rows] == ["m07", "m08", "m09"]
    page = queries.instance_page(InstanceQuery(group.id, limit=2))
    assert [r["machine_id"] for r in page.rows] == ["m09", "m08"]  # the latest check-ins first, then by id (also desc)
    page = queries.instance_page(InstanceQuery(group.id, status=InstanceStatus.ERROR))
    assert page.total == 2 and [r["machine_id"] for r in page.rows] == ["m09", "m08"]
    assert set(queries.rollouts([group.id])) == {(group.id, "2.0.0")}


def overview_phase(store: Store, group: Group) -> present.RolloutPhase:  # noqa: F811
    """The phase the overview's row shows for ``group``, through the page's own code and the dashboard's reads."""
    queries = DashboardQueries(store.engine, clock=store.clock)
    page = SimpleNamespace(server=SimpleNamespace(catalog=store.load_catalog()))
    row = Pages.group_row(page, group, queries.fleet_counts([group.id]).get(group.id), 0,  # type: ignore[arg-type]
                          queries.rollouts([group.id]))
    return row.state.phase


def test_the_dashboard_shows_a_rollout_complete_exactly_when_the_activity_log_says_so(
    store: Store, clock: FakeClock  # noqa: F811
) -> None:
    add_release(store)
    group = make_group(store, update_count=10)

    def agree() -> bool:
        logged = bool(activity_of(store, group, "rollout-completed"))
        return logged == (overview_phase(store, group) == present.RolloutPhase.COMPLETE)

    # Every instance came to 2.0.0 without a grant: no rollout, nothing completed in the log, nor on the page.
    store.record([checkin(clock, f"fresh-{i}", group, "2.0.0") for i in range(2)], [])
    assert activity_of(store, group, "rollout-completed") == [] and agree()
    # A granted instance arrives: the rollout completes in the log and on the page at once.
    store.record([checkin(clock, "m0", group)], [])
    assert isinstance(store.try_grant(checkin(clock, "m0", group), group.id).decision, Grant)
    assert overview_phase(store, group) == present.RolloutPhase.IN_PROGRESS and agree()
    store.record([checkin(clock, "m0", group, "2.0.0")], [])
    assert len(activity_of(store, group, "rollout-completed")) == 1 and agree()
    # A newcomer on the old version: the log's rollout stays completed, and so does the page's.
    store.record([checkin(clock, "late", group)], [])
    assert len(activity_of(store, group, "rollout-completed")) == 1 and agree()
