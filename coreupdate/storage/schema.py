"""The database schema (SQLAlchemy Core tables), the same on SQLite and PostgreSQL.

Conventions, for everything that reads these tables (the API, the dashboard):

* times are UTC epoch seconds (``FLOAT``, double precision on PostgreSQL); NULL means never;
* app ids are canonical: lower case, no braces (``e96281a6-d1af-4bde-9a0a-97b76e56dc57``);
* ``instances.status`` holds ``model.InstanceStatus`` numbers (Nebraska's 1-8, 9 = RolledBack);
* ``version_snapshots`` holds, per group and hour, how many instances that checked in during the hour ran each
  version (written hourly by the server, pruned by retention): the "versions over time" chart;
* ``rollouts`` counts per group and version how many instances were granted it, failed it and completed it,
  and says how and when the rollout ended (``outcome`` ``completed`` or ``superseded``, ``ended_at``; NULL while
  it is open; the rules are in ``policy.py``);
* ``meta`` row ``catalog_version`` grows with every change to apps, packages, channels or groups, so several
  server processes sharing one database notice each other's changes;
* ``grants`` keeps every grant (instance, group, version, time) for the instances' histories, pruned with the
  events;
* ``users`` are the dashboard's accounts (``role`` ``admin`` or ``viewer``; ``password_hash`` is the
  self-describing scrypt text of ``coreupdate/accounts.py``) and ``web_sessions`` their signed-in browsers (only the
  SHA-256 of the session cookie is stored, with the session's CSRF token and its expiry).

Indexes serve the dashboard's aggregates (see ``storage/dashboard.py``): ``instances_group_version_order`` covers
the per-group counts by version and status and the "seen in the last day" sums without reading the table, and
with the other ``instances_group_*_order`` indexes gives the instance table's pages from the index alone.

Migrations (``migrations.py``) create and change these tables; a change here comes with a migration there.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

applications = sa.Table(
    "applications",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("label", sa.String(200), nullable=False),
    sa.Column("description", sa.Text, nullable=False, default=""),
    sa.Column("created_at", sa.Float, nullable=False),
)

packages = sa.Table(
    "packages",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("app_id", sa.String(64), sa.ForeignKey("applications.id", ondelete="CASCADE"), nullable=False),
    sa.Column("version", sa.String(64), nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("sha256_b64", sa.String(64), nullable=False),
    sa.Column("sha1_b64", sa.String(64), nullable=False),
    sa.Column("file_name", sa.String(128), nullable=False),
    # NULL: the server stores the payload (under its data directory) and serves it itself.
    sa.Column("url", sa.Text, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.UniqueConstraint("app_id", "version", name="packages_app_version"),
)

channels = sa.Table(
    "channels",
    metadata,
    sa.Column("app_id", sa.String(64), sa.ForeignKey("applications.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("version", sa.String(64), nullable=True),  # the package (app_id, version); NULL: none yet
    sa.Column("updated_at", sa.Float, nullable=False),
)

groups = sa.Table(
    "groups",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("app_id", sa.String(64), sa.ForeignKey("applications.id", ondelete="CASCADE"), nullable=False),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("description", sa.Text, nullable=False, default=""),
    sa.Column("channel", sa.String(64), nullable=False),
    sa.Column("updates_paused", sa.Boolean, nullable=False, default=False),
    sa.Column("pause_reason", sa.Text, nullable=False, default=""),
    sa.Column("update_count", sa.Integer, nullable=False),
    sa.Column("update_interval_s", sa.Integer, nullable=False),
    sa.Column("update_timeout_s", sa.Integer, nullable=False),
    sa.Column("safe_mode", sa.Boolean, nullable=False, default=False),
    sa.Column("office_hours", sa.Text, nullable=False, default=""),
    sa.Column("timezone", sa.String(64), nullable=False, default="UTC"),
    sa.Column("failure_pause_count", sa.Integer, nullable=True),
    sa.Column("failure_pause_fraction", sa.Float, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.UniqueConstraint("app_id", "name", name="groups_app_name"),
)

instances = sa.Table(
    "instances",
    metadata,
    sa.Column("app_id", sa.String(64), primary_key=True),
    sa.Column("machine_id", sa.String(128), primary_key=True),
    sa.Column("alias", sa.String(200), nullable=False, default=""),
    sa.Column("ip", sa.String(64), nullable=False, default=""),
    sa.Column("version", sa.String(64), nullable=False, default=""),
    sa.Column("track", sa.String(200), nullable=False, default=""),
    sa.Column("group_id", sa.String(64), nullable=True),
    sa.Column("oem", sa.String(64), nullable=False, default=""),
    sa.Column("board", sa.String(64), nullable=False, default=""),
    sa.Column("status", sa.Integer, nullable=False, default=1),
    sa.Column("status_at", sa.Float, nullable=True),
    sa.Column("error_code", sa.Integer, nullable=True),
    sa.Column("granted_version", sa.String(64), nullable=True),
    sa.Column("granted_at", sa.Float, nullable=True),
    sa.Column("first_seen_at", sa.Float, nullable=False),
    sa.Column("last_check_at", sa.Float, nullable=True),
    sa.Index("instances_group_granted", "group_id", "granted_at"),
    sa.Index("instances_group_status", "group_id", "status"),
    sa.Index("instances_last_check", "last_check_at"),
    sa.Index("instances_status", "status"),
    # Migration 3: the dashboard's aggregates and its instance table's sort orders, each ending with machine_id
    # so a page is read from the index alone, in a total order, however deep (see storage/dashboard.py).
    sa.Index("instances_group_version_order", "group_id", "version", "status", "last_check_at", "machine_id"),
    sa.Index("instances_group_check_order", "group_id", "last_check_at", "machine_id"),
    sa.Index("instances_group_status_order", "group_id", "status", "machine_id"),
    sa.Index("instances_group_machine", "group_id", "machine_id"),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("app_id", sa.String(64), nullable=False),
    sa.Column("machine_id", sa.String(128), nullable=False),
    sa.Column("group_id", sa.String(64), nullable=True),
    sa.Column("version", sa.String(64), nullable=False),
    sa.Column("type", sa.Integer, nullable=False),
    sa.Column("result", sa.Integer, nullable=False),
    sa.Column("error_code", sa.BigInteger, nullable=True),
    sa.Column("previous_version", sa.String(64), nullable=True),
    sa.Column("status", sa.Integer, nullable=True),  # the status the event moved the instance to, if any
    sa.Index("events_instance", "app_id", "machine_id", "at"),
    sa.Index("events_at", "at"),
    sa.Index("events_status_at", "status", "at"),  # migration 2: errors of the last day
)

rollouts = sa.Table(
    "rollouts",
    metadata,
    sa.Column("group_id", sa.String(64), primary_key=True),
    sa.Column("version", sa.String(64), primary_key=True),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("granted", sa.Integer, nullable=False, default=0),
    sa.Column("failed", sa.Integer, nullable=False, default=0),
    sa.Column("completed", sa.Integer, nullable=False, default=0),
    # Migration 4: how the rollout ended (model.RolloutOutcome), and when; NULL while it is open.
    sa.Column("outcome", sa.String(16), nullable=True),
    sa.Column("ended_at", sa.Float, nullable=True),
)

version_snapshots = sa.Table(
    "version_snapshots",
    metadata,
    sa.Column("group_id", sa.String(64), primary_key=True),
    sa.Column("at", sa.Float, primary_key=True),  # the start of the hour
    sa.Column("version", sa.String(64), primary_key=True),
    sa.Column("instances", sa.Integer, nullable=False),
)

activity = sa.Table(
    "activity",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("app_id", sa.String(64), nullable=False),
    sa.Column("group_id", sa.String(64), nullable=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("version", sa.String(64), nullable=True),
    sa.Column("message", sa.Text, nullable=False),
    sa.Index("activity_at", "at"),
    sa.Index("activity_group_at", "group_id", "at"),  # migration 2: a group's activity log
)

api_tokens = sa.Table(
    "api_tokens",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("token_sha256", sa.String(64), nullable=False, unique=True),  # hex SHA-256 of the token
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float, nullable=True),
)

grants = sa.Table(
    "grants",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("app_id", sa.String(64), nullable=False),
    sa.Column("machine_id", sa.String(128), nullable=False),
    sa.Column("group_id", sa.String(64), nullable=False),
    sa.Column("version", sa.String(64), nullable=False),
    sa.Index("grants_instance", "app_id", "machine_id", "at"),
    sa.Index("grants_at", "at"),
)

users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(64), nullable=False, unique=True),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("password_hash", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("password_changed_at", sa.Float, nullable=False),
)

web_sessions = sa.Table(
    "web_sessions",
    metadata,
    sa.Column("token_sha256", sa.String(64), primary_key=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("csrf_token", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Index("web_sessions_user", "user_id"),
    sa.Index("web_sessions_expiry", "expires_at"),
)

meta = sa.Table(
    "meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.BigInteger, nullable=False),
)
