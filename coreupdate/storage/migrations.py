"""Schema migrations, applied at start-up: a numbered list of steps and a ``schema_version`` table.

Why not Alembic: the schema is small, every step is SQLAlchemy Core DDL or data that runs unchanged on SQLite
and PostgreSQL, and the server must migrate itself at start-up with no tool or configuration file beside it.
Each step runs in its own transaction (DDL is transactional on both databases) together with the version
bump, so a failed step leaves the previous version intact.  Two servers starting together on one PostgreSQL
serialise on an advisory lock; on SQLite the write transaction (``BEGIN IMMEDIATE``) does the same.

Rules: a step is never edited once released; a new step goes at the end.  Step 1 creates the tables of
``schema.py`` that existed when it was written (a later step's new tables are left to that step): a later step
that changes a table's columns must give step 1 a frozen copy of that table's old definition.  A step that
only adds an index creates it with ``checkfirst`` (step 1 makes the table with its current indexes on a new
database, the later step adds them to an old one).  A database newer than this server (a version above the
last step) is refused rather than used.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from coreupdate import COREOS_APP_ID, DEFAULT_CHANNELS
from coreupdate.storage import schema

log = logging.getLogger(__name__)

schema_version = sa.Table(
    "schema_version",
    sa.MetaData(),
    sa.Column("version", sa.Integer, nullable=False),
)

# Any 64-bit number that names "coreupdate migrations" among the advisory locks of the database.
_PG_ADVISORY_LOCK_ID = 0x636F726575706474

# The stock groups' policy (Nebraska's migration 0006): every instance, as fast as it asks, 1 h timeout.
STOCK_UPDATE_COUNT = 999_999
STOCK_UPDATE_INTERVAL_S = 60
STOCK_UPDATE_TIMEOUT_S = 3600


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer server."""


_STEP_1_TABLES = (
    schema.applications, schema.packages, schema.channels, schema.groups, schema.instances, schema.events,
    schema.version_snapshots, schema.activity, schema.api_tokens, schema.meta,
)

# ``rollouts`` as step 1 made it; step 4 adds ``outcome`` and ``ended_at``.
_STEP_1_ROLLOUTS = sa.Table(
    "rollouts",
    sa.MetaData(),
    sa.Column("group_id", sa.String(64), primary_key=True),
    sa.Column("version", sa.String(64), primary_key=True),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("granted", sa.Integer, nullable=False, default=0),
    sa.Column("failed", sa.Integer, nullable=False, default=0),
    sa.Column("completed", sa.Integer, nullable=False, default=0),
)


def _step_1_initial(conn: Connection) -> None:
    schema.metadata.create_all(conn, tables=list(_STEP_1_TABLES))
    _STEP_1_ROLLOUTS.create(conn)
    now = time.time()
    conn.execute(
        sa.insert(schema.applications).values(
            id=COREOS_APP_ID, label="CoreOS", description="Container Linux / Flatcar", created_at=now
        )
    )
    for channel in DEFAULT_CHANNELS:
        conn.execute(sa.insert(schema.channels).values(app_id=COREOS_APP_ID, name=channel, version=None,
                                                       updated_at=now))
        conn.execute(
            sa.insert(schema.groups).values(
                id=str(uuid.uuid4()), app_id=COREOS_APP_ID, name=channel, description="", channel=channel,
                updates_paused=False, pause_reason="", update_count=STOCK_UPDATE_COUNT,
                update_interval_s=STOCK_UPDATE_INTERVAL_S, update_timeout_s=STOCK_UPDATE_TIMEOUT_S,
                safe_mode=False, office_hours="", timezone="UTC", created_at=now, updated_at=now,
            )
        )
    conn.execute(sa.insert(schema.meta).values(key="catalog_version", value=1))


_STEP_2_INDEXES = (
    "instances_group_versions", "instances_group_last_check", "events_status_at", "activity_group_at",
)


def _step_2_dashboard(conn: Connection) -> None:
    schema.metadata.create_all(conn, tables=[schema.grants, schema.users, schema.web_sessions])
    for table in (schema.instances, schema.events, schema.activity):
        for index in table.indexes:
            if index.name in _STEP_2_INDEXES:
                index.create(conn, checkfirst=True)


_STEP_3_DROPPED = ("instances_group_versions", "instances_group_last_check")
_STEP_3_INDEXES = (
    "instances_group_version_order", "instances_group_check_order", "instances_group_status_order",
    "instances_group_machine",
)


def _step_3_instance_orders(conn: Connection) -> None:
    for name in _STEP_3_DROPPED:  # step 2 made them on databases that had step 1 before this step existed
        conn.execute(sa.text(f"DROP INDEX IF EXISTS {name}"))
    for index in schema.instances.indexes:
        if index.name in _STEP_3_INDEXES:
            index.create(conn, checkfirst=True)


def _step_4_rollout_ends(conn: Connection) -> None:
    # FLOAT is double precision on PostgreSQL, as sa.Float makes it; both databases add a nullable column in place.
    conn.execute(sa.text("ALTER TABLE rollouts ADD COLUMN outcome VARCHAR(16)"))
    conn.execute(sa.text("ALTER TABLE rollouts ADD COLUMN ended_at FLOAT"))


MIGRATIONS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "tables, the CoreOS application, channels and groups stable/beta/alpha", _step_1_initial),
    (2, "grants history, dashboard users and sessions, indexes for the dashboard's aggregates", _step_2_dashboard),
    (3, "instance indexes ending with machine_id: dashboard pages from the index alone", _step_3_instance_orders),
    (4, "how and when each rollout ended (completed or superseded); open rollouts that are already complete are "
        "recorded at their group's next check-in", _step_4_rollout_ends),
]
LATEST = MIGRATIONS[-1][0]


def _lock(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": _PG_ADVISORY_LOCK_ID})


def current_version(conn: Connection) -> int:
    if not sa.inspect(conn).has_table("schema_version"):
        return 0
    value = conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar()
    return int(value or 0)


def migrate(engine: Engine) -> int:
    """Bring the database to the latest version; returns the number of steps applied."""
    applied = 0
    while True:
        with engine.begin() as conn:
            _lock(conn)
            version = current_version(conn)
            if version > LATEST:
                raise SchemaTooNew(
                    f"the database has schema version {version}, newer than this server's {LATEST}: "
                    "run a newer coreupdate or restore a backup"
                )
            if version == LATEST:
                return applied
            if version == 0:
                schema_version.create(conn)
            number, description, step = next(m for m in MIGRATIONS if m[0] == version + 1)
            step(conn)
            conn.execute(sa.delete(schema_version))
            conn.execute(sa.insert(schema_version).values(version=number))
            log.info("Database schema migrated to version %d: %s", number, description)
            applied += 1
