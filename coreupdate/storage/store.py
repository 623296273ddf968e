"""All reads and writes of the server's state, as methods of ``Store``: synchronous, one transaction each.

Theory of operation: the server answers update checks from the in-memory catalog (``load_catalog``) and sends
the database only (1) grant decisions, one short transaction each that locks the group's row
(``SELECT … FOR UPDATE`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite) before it counts, so concurrent
check-ins — in one process or several — can never exceed a group's limits, and (2) batches of check-ins and
events (``record``), written behind the answers in one transaction per batch.  Everything else is the API's
reads and catalog changes; each catalog change bumps ``meta.catalog_version``.

Rollouts end (``policy``'s rules) where what ends them is written: a batch of check-ins and events completes
them (the rollout's row locked, then the group's population counted, so two servers' batches never both miss
the last instance nor both record it), a channel change supersedes them.  Both end a rollout with an update
that only applies while it is open, so its "rollout completed" or "rollout superseded" is recorded once.

Row locks (PostgreSQL; SQLite takes the whole database at ``BEGIN IMMEDIATE``) are taken in one order, so two
transactions never wait for each other in a circle (PostgreSQL would abort one with "deadlock detected"):
**groups → instances → rollouts → meta** (``catalog_version``).  A transaction may skip any of them but never
goes back to an earlier one.  So a grant locks the group, then writes the instance, then counts in the rollout;
a batch writes its instances, then its rollout counts and completions in ascending (group, version) order, and
commits before the automatic pause its failures may call for, which is a transaction of its own that locks
the groups (ascending id) and only reads the rollouts; a group or channel change locks the group (or channel),
then ends or reopens rollouts, then bumps the catalog.  Within the instances a batch writes its check-ins in
ascending (app, machine) order but its events in the order they came, as they must be applied; two batches
sharing an instance in opposite orders could still wait on each other (an instance talks to one server at a
time, so that is not expected).

Times come from the ``clock`` given to the store (epoch seconds), so tests can move time.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection, Engine, Row

from coreupdate import policy
from coreupdate.catalog import Catalog
from coreupdate.instance_status import status_after_checkin, status_after_event
from coreupdate.model import (
    FAILED_STATUSES,
    HOUR,
    IN_FLIGHT_STATUSES,
    ActivityKind,
    Application,
    Channel,
    Group,
    GroupPolicy,
    InstanceStatus,
    Package,
    RolloutOutcome,
)
from coreupdate.storage import migrations
from coreupdate.storage.schema import (
    activity,
    api_tokens,
    applications,
    channels,
    events,
    grants,
    groups,
    instances,
    meta,
    packages,
    rollouts,
    version_snapshots,
    web_sessions,
)
from update_engine.omaha import RequestEvent

log = logging.getLogger(__name__)

Clock = Callable[[], float]
# Instances read per statement when a batch of held-back check-ins is marked OnHold (well under the parameter
# limits of SQLite and PostgreSQL).
_HOLD_READ_BATCH = 500


class NotFound(LookupError):
    """The named application, package, channel, group or token does not exist."""


class Conflict(ValueError):
    """The change contradicts the state (a duplicate, or something still in use)."""


@dataclass(frozen=True)
class CheckIn:
    """What an update check or ping tells about an instance."""

    app_id: str
    machine_id: str
    version: str
    track: str
    group_id: str | None
    at: float
    alias: str = ""
    ip: str = ""
    oem: str = ""
    board: str = ""
    # A limit the server remembered (without asking the database) held the instance back from this version: it
    # becomes OnHold when it is written, as a refusal decided in the database makes it at once.
    held_back_from: str | None = None


@dataclass(frozen=True)
class EventRecord:
    """One reported event with who sent it."""

    app_id: str
    machine_id: str
    group_id: str | None
    version: str
    event: RequestEvent
    at: float


@dataclass(frozen=True)
class GrantOutcome:
    decision: policy.Decision
    paused_group: bool = False  # the decision paused the group (catalog changed)


@dataclass(frozen=True)
class RecordOutcome:
    """What a batch changed that the server must know: groups paused by the failure threshold, and the rollouts
    it completed (the activity log's messages)."""

    paused_groups: tuple[str, ...] = ()
    failures: int = 0
    completions: int = 0
    completed_rollouts: tuple[str, ...] = ()


@dataclass(frozen=True)
class TokenInfo:
    id: int
    name: str
    created_at: float
    revoked_at: float | None


@dataclass
class InstanceFilter:
    group_id: str | None = None
    status: InstanceStatus | None = None
    version: str | None = None
    limit: int = 100
    offset: int = 0


@dataclass(frozen=True)
class TimeWindow:
    """From ``start`` to ``end`` (epoch seconds, both included); None: unbounded on that side."""

    start: float | None = None
    end: float | None = None

    def conditions(self, column: sa.ColumnElement[Any]) -> list[sa.ColumnElement[bool]]:
        found = []
        if self.start is not None:
            found.append(column >= self.start)
        if self.end is not None:
            found.append(column <= self.end)
        return found


@dataclass
class InstancePage:
    total: int
    instances: list[dict[str, Any]] = field(default_factory=list)


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_matches(token: str, hashes: Iterable[str]) -> bool:
    """Constant time in the token: every stored hash is compared, with ``hmac.compare_digest``."""
    candidate = token_sha256(token)
    found = False
    for stored in hashes:
        found |= hmac.compare_digest(candidate, stored)
    return found


@dataclass
class _RolloutCounts:
    """What a batch adds to one rollout's counters, written once its instances are (the lock order)."""

    first_at: float
    failed: int = 0
    completed: int = 0


def _add_count(
    counts: dict[tuple[str, str], _RolloutCounts], group_id: str, version: str, at: float, *, failed: int = 0,
    completed: int = 0,
) -> None:
    entry = counts.setdefault((group_id, version), _RolloutCounts(at))
    entry.first_at = min(entry.first_at, at)
    entry.failed += failed
    entry.completed += completed


def _dt(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def group_from_row(row: Row[Any] | Mapping[str, Any]) -> Group:
    m = cast(Mapping[str, Any], row._mapping if isinstance(row, Row) else row)
    return Group(
        id=m["id"],
        app_id=m["app_id"],
        name=m["name"],
        description=m["description"],
        channel=m["channel"],
        pause_reason=m["pause_reason"],
        policy=GroupPolicy(
            updates_paused=bool(m["updates_paused"]),
            update_count=int(m["update_count"]),
            update_interval=timedelta(seconds=int(m["update_interval_s"])),
            update_timeout=timedelta(seconds=int(m["update_timeout_s"])),
            safe_mode=bool(m["safe_mode"]),
            office_hours=m["office_hours"],
            timezone=m["timezone"],
            failure_pause_count=m["failure_pause_count"],
            failure_pause_fraction=m["failure_pause_fraction"],
        ),
    )


def _group_values(group: Group) -> dict[str, Any]:
    p = group.policy
    return {
        "name": group.name,
        "description": group.description,
        "channel": group.channel,
        "updates_paused": p.updates_paused,
        "pause_reason": group.pause_reason,
        "update_count": p.update_count,
        "update_interval_s": int(p.update_interval.total_seconds()),
        "update_timeout_s": int(p.update_timeout.total_seconds()),
        "safe_mode": p.safe_mode,
        "office_hours": p.office_hours,
        "timezone": p.timezone,
        "failure_pause_count": p.failure_pause_count,
        "failure_pause_fraction": p.failure_pause_fraction,
    }


def package_from_row(row: Row[Any]) -> Package:
    m = row._mapping
    return Package(
        id=m["id"], app_id=m["app_id"], version=m["version"], size=m["size"], sha256_b64=m["sha256_b64"],
        sha1_b64=m["sha1_b64"], file_name=m["file_name"], url=m["url"], created_at=_dt(m["created_at"]),
    )


def _outcome(text: str | None) -> RolloutOutcome | None:
    return None if text is None else RolloutOutcome(text)


def rollout_json(row: Row[Any]) -> dict[str, Any]:
    """A ``rollouts`` row as the API shows it: counters, and ``outcome``/``ended_at`` (null while open)."""
    m = row._mapping
    return {"version": m["version"], "started_at": m["started_at"], "granted": m["granted"], "failed": m["failed"],
            "completed": m["completed"], "outcome": m["outcome"], "ended_at": m["ended_at"]}


def instance_json(row: Row[Any]) -> dict[str, Any]:
    m = row._mapping
    return {
        "app_id": m["app_id"],
        "machine_id": m["machine_id"],
        "alias": m["alias"],
        "ip": m["ip"],
        "version": m["version"],
        "track": m["track"],
        "group_id": m["group_id"],
        "oem": m["oem"],
        "board": m["board"],
        "status": InstanceStatus(m["status"]).label,
        "status_at": m["status_at"],
        "error_code": m["error_code"],
        "granted_version": m["granted_version"],
        "granted_at": m["granted_at"],
        "first_seen_at": m["first_seen_at"],
        "last_check_at": m["last_check_at"],
    }


class Store:
    """The server's database; see the module docstring."""

    def __init__(self, engine: Engine, *, clock: Clock = time.time) -> None:
        self.engine = engine
        self.clock = clock
        self.dialect = engine.dialect.name

    # -- set-up ------------------------------------------------------------------------------------------

    def migrate(self) -> int:
        return migrations.migrate(self.engine)

    def _insert(self, table: sa.Table) -> Any:
        if self.dialect == "postgresql":
            return pg_dialect.insert(table)
        return sqlite_dialect.insert(table)

    def _bump_catalog(self, conn: Connection) -> None:
        conn.execute(sa.update(meta).where(meta.c.key == "catalog_version").values(value=meta.c.value + 1))

    def _activity(
        self, conn: Connection, kind: ActivityKind, app_id: str, message: str, *, group_id: str | None = None,
        version: str | None = None, at: float | None = None,
    ) -> None:
        conn.execute(
            sa.insert(activity).values(
                at=self.clock() if at is None else at, app_id=app_id, group_id=group_id, kind=str(kind),
                version=version, message=message,
            )
        )

    # -- catalog -----------------------------------------------------------------------------------------

    def catalog_version(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(meta.c.value).where(meta.c.key == "catalog_version")).scalar_one())

    def load_catalog(self) -> Catalog:
        with self.engine.begin() as conn:
            version = int(conn.execute(sa.select(meta.c.value).where(meta.c.key == "catalog_version")).scalar_one())
            apps = {
                r.id: Application(r.id, r.label, r.description) for r in conn.execute(sa.select(applications))
            }
            pkgs = {(p.app_id, p.version): p for p in map(package_from_row, conn.execute(sa.select(packages)))}
            chans = {
                (r.app_id, r.name): Channel(r.app_id, r.name, r.version) for r in conn.execute(sa.select(channels))
            }
            grps = {g.id: g for g in map(group_from_row, conn.execute(sa.select(groups)))}
            hashes = tuple(
                conn.execute(sa.select(api_tokens.c.token_sha256).where(api_tokens.c.revoked_at.is_(None))).scalars()
            )
        return Catalog(version=version, apps=apps, packages=pkgs, channels=chans, groups=grps, token_hashes=hashes)

    def create_app(self, app: Application) -> Application:
        with self.engine.begin() as conn:
            if conn.execute(sa.select(applications.c.id).where(applications.c.id == app.id)).first():
                raise Conflict(f"application {app.id} already exists")
            conn.execute(
                sa.insert(applications).values(
                    id=app.id, label=app.label, description=app.description, created_at=self.clock()
                )
            )
            self._bump_catalog(conn)
        return app

    def update_app(self, app_id: str, *, label: str | None, description: str | None) -> None:
        values = {k: v for k, v in (("label", label), ("description", description)) if v is not None}
        with self.engine.begin() as conn:
            self._require_app(conn, app_id)
            if values:
                conn.execute(sa.update(applications).where(applications.c.id == app_id).values(**values))
                self._bump_catalog(conn)

    def delete_app(self, app_id: str) -> None:
        with self.engine.begin() as conn:
            self._require_app(conn, app_id)
            for table in (groups, channels, packages):
                conn.execute(sa.delete(table).where(table.c.app_id == app_id))
            conn.execute(sa.delete(applications).where(applications.c.id == app_id))
            self._bump_catalog(conn)

    def _require_app(self, conn: Connection, app_id: str) -> None:
        if not conn.execute(sa.select(applications.c.id).where(applications.c.id == app_id)).first():
            raise NotFound(f"application {app_id} does not exist")

    def add_package(self, package: Package) -> Package:
        with self.engine.begin() as conn:
            self._require_app(conn, package.app_id)
            exists = conn.execute(
                sa.select(packages.c.id).where(
                    packages.c.app_id == package.app_id, packages.c.version == package.version
                )
            ).first()
            if exists:
                raise Conflict(f"application {package.app_id} already has a package for version {package.version}")
            now = self.clock()
            result = conn.execute(
                sa.insert(packages).values(
                    app_id=package.app_id, version=package.version, size=package.size,
                    sha256_b64=package.sha256_b64, sha1_b64=package.sha1_b64, file_name=package.file_name,
                    url=package.url, created_at=now,
                )
            )
            self._activity(
                conn, ActivityKind.PACKAGE_CREATED, package.app_id,
                f"package {package.version} created ({package.size} bytes)", version=package.version,
            )
            self._bump_catalog(conn)
            key = result.inserted_primary_key
            return replace(package, id=int(key[0]) if key else 0, created_at=_dt(now))

    def delete_package(self, app_id: str, version: str) -> Package:
        with self.engine.begin() as conn:
            row = conn.execute(
                sa.select(packages).where(packages.c.app_id == app_id, packages.c.version == version)
            ).first()
            if row is None:
                raise NotFound(f"application {app_id} has no package {version}")
            used = conn.execute(
                sa.select(channels.c.name).where(channels.c.app_id == app_id, channels.c.version == version)
            ).scalars().all()
            if used:
                raise Conflict(f"package {version} is on channel(s) {', '.join(used)}; move them first")
            conn.execute(sa.delete(packages).where(packages.c.id == row.id))
            self._bump_catalog(conn)
            return package_from_row(row)

    def list_packages(self, app_id: str) -> list[Package]:
        with self.engine.connect() as conn:
            self._require_app(conn, app_id)
            rows = conn.execute(sa.select(packages).where(packages.c.app_id == app_id).order_by(packages.c.id))
            return [package_from_row(r) for r in rows]

    def set_channel(self, app_id: str, name: str, version: str | None, *, create: bool = True) -> Channel:
        with self.engine.begin() as conn:
            self._require_app(conn, app_id)
            if version is not None and not conn.execute(
                sa.select(packages.c.id).where(packages.c.app_id == app_id, packages.c.version == version)
            ).first():
                raise NotFound(f"application {app_id} has no package {version}; create it first")
            row = conn.execute(
                sa.select(channels).where(channels.c.app_id == app_id, channels.c.name == name)
            ).first()
            now = self.clock()
            if row is None:
                if not create:
                    raise NotFound(f"application {app_id} has no channel {name}")
                conn.execute(sa.insert(channels).values(app_id=app_id, name=name, version=version, updated_at=now))
            else:
                conn.execute(
                    sa.update(channels)
                    .where(channels.c.app_id == app_id, channels.c.name == name)
                    .values(version=version, updated_at=now)
                )
            ended: list[str] = []
            if row is None or row.version != version:
                following = conn.execute(
                    sa.select(groups.c.id, groups.c.name).where(groups.c.app_id == app_id, groups.c.channel == name)
                ).all()
                names = ", ".join(g.name for g in following) or "no group"
                self._activity(
                    conn, ActivityKind.CHANNEL_UPDATED, app_id,
                    f"channel {name} now offers {version or 'nothing'} (was {row.version if row else 'new'}); "
                    f"followed by {names}",
                    version=version,
                )
                if row is not None:
                    for g in following:
                        ended += self._offer_changed(conn, app_id, g.id, g.name, row.version, version, now,
                                                     f"channel {name} now offers {version or 'nothing'}")
            self._bump_catalog(conn)
        for message in ended:
            log.info("Activity: %s", message)
        return Channel(app_id, name, version)

    def delete_channel(self, app_id: str, name: str) -> None:
        with self.engine.begin() as conn:
            users = conn.execute(
                sa.select(groups.c.name).where(groups.c.app_id == app_id, groups.c.channel == name)
            ).scalars().all()
            if users:
                raise Conflict(f"channel {name} is followed by group(s) {', '.join(users)}")
            result = conn.execute(sa.delete(channels).where(channels.c.app_id == app_id, channels.c.name == name))
            if result.rowcount == 0:
                raise NotFound(f"application {app_id} has no channel {name}")
            self._bump_catalog(conn)

    def list_channels(self, app_id: str) -> list[Channel]:
        with self.engine.connect() as conn:
            self._require_app(conn, app_id)
            rows = conn.execute(sa.select(channels).where(channels.c.app_id == app_id).order_by(channels.c.name))
            return [Channel(r.app_id, r.name, r.version) for r in rows]

    def _require_channel(self, conn: Connection, app_id: str, name: str) -> None:
        if not conn.execute(
            sa.select(channels.c.name).where(channels.c.app_id == app_id, channels.c.name == name)
        ).first():
            raise NotFound(f"application {app_id} has no channel {name}")

    def create_group(self, group: Group) -> Group:
        group_id = group.id or str(uuid.uuid4())
        with self.engine.begin() as conn:
            self._require_app(conn, group.app_id)
            self._require_channel(conn, group.app_id, group.channel)
            if conn.execute(sa.select(groups.c.id).where(groups.c.id == group_id)).first():
                raise Conflict(f"group id {group_id} is taken")
            if conn.execute(
                sa.select(groups.c.id).where(groups.c.app_id == group.app_id, groups.c.name == group.name)
            ).first():
                raise Conflict(f"application {group.app_id} already has a group named {group.name}")
            now = self.clock()
            conn.execute(
                sa.insert(groups).values(
                    id=group_id, app_id=group.app_id, created_at=now, updated_at=now, **_group_values(group)
                )
            )
            self._bump_catalog(conn)
        return replace(group, id=group_id)

    def get_group(self, app_id: str, group_ref: str) -> Group:
        """A group by id, or by name within the application."""
        with self.engine.connect() as conn:
            return group_from_row(self._group_row(conn, app_id, group_ref))

    def _group_row(self, conn: Connection, app_id: str, group_ref: str, *, lock: bool = False) -> Row[Any]:
        for condition in (groups.c.id == group_ref, groups.c.name == group_ref):
            query = sa.select(groups).where(groups.c.app_id == app_id, condition)
            if lock:
                query = query.with_for_update()
            row = conn.execute(query).first()
            if row is not None:
                return row
        raise NotFound(f"application {app_id} has no group {group_ref}")

    def update_group(self, app_id: str, group_ref: str, change: Callable[[Group], Group]) -> Group:
        """Apply ``change`` to the group under its row lock; records pause/unpause in the activity log."""
        with self.engine.begin() as conn:
            old = group_from_row(self._group_row(conn, app_id, group_ref, lock=True))
            new = change(old)
            if new.channel != old.channel:
                self._require_channel(conn, app_id, new.channel)
            if new.name != old.name and conn.execute(
                sa.select(groups.c.id).where(groups.c.app_id == app_id, groups.c.name == new.name)
            ).first():
                raise Conflict(f"application {app_id} already has a group named {new.name}")
            if not new.policy.updates_paused:
                new = replace(new, pause_reason="")
            now = self.clock()
            conn.execute(
                sa.update(groups).where(groups.c.id == old.id).values(updated_at=now, **_group_values(new))
            )
            ended: list[str] = []
            if new.channel != old.channel:
                offered: dict[str, str | None] = {
                    r.name: r.version for r in conn.execute(
                        sa.select(channels.c.name, channels.c.version).where(
                            channels.c.app_id == app_id, channels.c.name.in_([old.channel, new.channel])
                        )
                    )
                }
                now_offered = offered.get(new.channel)
                ended = self._offer_changed(
                    conn, app_id, old.id, new.name, offered.get(old.channel), now_offered, now,
                    f"the group now follows channel {new.channel}, which offers {now_offered or 'nothing'}",
                )
            if new.policy.updates_paused != old.policy.updates_paused:
                kind = ActivityKind.GROUP_PAUSED if new.policy.updates_paused else ActivityKind.GROUP_UNPAUSED
                what = "paused" if new.policy.updates_paused else "unpaused"
                note = f": {new.pause_reason}" if new.policy.updates_paused and new.pause_reason else ""
                self._activity(conn, kind, app_id, f"group {new.name} {what} by an operator{note}", group_id=old.id)
            self._bump_catalog(conn)
        for message in ended:
            log.info("Activity: %s", message)
        return new

    def delete_group(self, app_id: str, group_ref: str) -> None:
        with self.engine.begin() as conn:
            row = self._group_row(conn, app_id, group_ref, lock=True)
            conn.execute(sa.delete(groups).where(groups.c.id == row.id))
            conn.execute(sa.update(instances).where(instances.c.group_id == row.id).values(group_id=None))
            self._bump_catalog(conn)

    def list_groups(self, app_id: str) -> list[Group]:
        with self.engine.connect() as conn:
            self._require_app(conn, app_id)
            rows = conn.execute(sa.select(groups).where(groups.c.app_id == app_id).order_by(groups.c.name))
            return [group_from_row(r) for r in rows]

    def list_apps(self) -> list[Application]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(applications).order_by(applications.c.label))
            return [Application(r.id, r.label, r.description) for r in rows]

    # -- grants ------------------------------------------------------------------------------------------

    def _counters(self, conn: Connection, group: Group, target: str, now: float) -> policy.RolloutCounters:
        p = group.policy
        period_start = now - p.update_interval.total_seconds()
        timeout_start = now - p.update_timeout.total_seconds()
        granted_in_period = conn.execute(
            sa.select(sa.func.count()).select_from(instances).where(
                instances.c.group_id == group.id, instances.c.granted_at > period_start
            )
        ).scalar_one()
        in_progress = timed_out = 0
        for row in conn.execute(
            sa.select(instances.c.granted_at, instances.c.granted_version).where(
                instances.c.group_id == group.id, instances.c.status.in_([int(s) for s in IN_FLIGHT_STATUSES])
            )
        ):
            if row.granted_at is not None and row.granted_at > timeout_start:
                in_progress += 1
            elif row.granted_version == target:
                timed_out += 1
        rollout = conn.execute(
            sa.select(rollouts.c.granted, rollouts.c.failed).where(
                rollouts.c.group_id == group.id, rollouts.c.version == target
            )
        ).first()
        return policy.RolloutCounters(
            granted_in_period=int(granted_in_period),
            in_progress=in_progress,
            timed_out=timed_out,
            attempted=int(rollout.granted) if rollout else 0,
            failed=int(rollout.failed) if rollout else 0,
        )

    def try_grant(
        self, checkin: CheckIn, group_id: str, *, office_hours: policy.OfficeHours | None = None
    ) -> GrantOutcome:
        """Decide (``policy.decide_grant``) and record a grant for the instance of ``checkin``, atomically."""
        with self.engine.begin() as conn:
            group_row = conn.execute(sa.select(groups).where(groups.c.id == group_id).with_for_update()).first()
            if group_row is None:
                return GrantOutcome(policy.Refuse(policy.Refusal.NO_PACKAGE, f"group {group_id} was deleted"))
            group = group_from_row(group_row)
            target = conn.execute(
                sa.select(channels.c.version).where(
                    channels.c.app_id == group.app_id, channels.c.name == group.channel
                )
            ).scalar()
            inst = conn.execute(
                sa.select(instances.c.status, instances.c.granted_version).where(
                    instances.c.app_id == checkin.app_id, instances.c.machine_id == checkin.machine_id
                )
            ).first()
            view = policy.InstanceView(
                version=checkin.version,
                status=InstanceStatus(inst.status) if inst else InstanceStatus.UNDEFINED,
                granted_version=inst.granted_version if inst else None,
            )
            now = checkin.at
            counters = self._counters(conn, group, target, now) if target else policy.RolloutCounters()
            decision = policy.decide_grant(
                group.policy, target_version=target, instance=view, counters=counters, now=_dt(now),
                office_hours=office_hours,
            )
            paused = False
            if isinstance(decision, policy.Grant):
                if not decision.regrant:
                    self._upsert_instance(conn, checkin, status=InstanceStatus.UPDATE_GRANTED,
                                          granted_version=decision.version, granted_at=now)
                    self._count_rollout(conn, group.id, decision.version, now, granted=1)
                    conn.execute(sa.insert(grants).values(
                        at=now, app_id=checkin.app_id, machine_id=checkin.machine_id, group_id=group.id,
                        version=decision.version,
                    ))
                    if decision.first_of_rollout:
                        self._activity(
                            conn, ActivityKind.ROLLOUT_STARTED, group.app_id,
                            f"rollout of {decision.version} to group {group.name} started", group_id=group.id,
                            version=decision.version, at=now,
                        )
                return GrantOutcome(decision)
            if decision.on_hold and target and policy.marks_on_hold(view, target):
                self._upsert_instance(conn, checkin, status=InstanceStatus.ON_HOLD)
            if decision.pause_reason is not None and not group.policy.updates_paused:
                conn.execute(
                    sa.update(groups).where(groups.c.id == group.id).values(
                        updates_paused=True, pause_reason=decision.pause_reason, updated_at=now
                    )
                )
                self._activity(
                    conn, ActivityKind.ROLLOUT_PAUSED, group.app_id,
                    f"group {group.name} paused: {decision.pause_reason}", group_id=group.id, version=target, at=now,
                )
                self._bump_catalog(conn)
                paused = True
            return GrantOutcome(decision, paused_group=paused)

    def _checkin_values(self, checkin: CheckIn) -> dict[str, Any]:
        return {
            "app_id": checkin.app_id, "machine_id": checkin.machine_id, "alias": checkin.alias, "ip": checkin.ip,
            "version": checkin.version, "track": checkin.track, "group_id": checkin.group_id, "oem": checkin.oem,
            "board": checkin.board, "last_check_at": checkin.at,
        }

    def _upsert_instance(
        self, conn: Connection, checkin: CheckIn, *, status: InstanceStatus, granted_version: str | None = None,
        granted_at: float | None = None,
    ) -> None:
        values = self._checkin_values(checkin)
        values.update(status=int(status), status_at=checkin.at, first_seen_at=checkin.at)
        update = {k: v for k, v in values.items() if k not in ("app_id", "machine_id", "first_seen_at")}
        if granted_version is not None:
            values.update(granted_version=granted_version, granted_at=granted_at, error_code=None)
            update.update(granted_version=granted_version, granted_at=granted_at, error_code=None)
        stmt = self._insert(instances).values(**values)
        conn.execute(stmt.on_conflict_do_update(index_elements=["app_id", "machine_id"], set_=update))

    def _count_rollout(
        self, conn: Connection, group_id: str, version: str, now: float, *, granted: int = 0, failed: int = 0,
        completed: int = 0,
    ) -> None:
        stmt = self._insert(rollouts).values(
            group_id=group_id, version=version, started_at=now, granted=granted, failed=failed, completed=completed
        )
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=["group_id", "version"],
                set_={
                    "granted": rollouts.c.granted + granted,
                    "failed": rollouts.c.failed + failed,
                    "completed": rollouts.c.completed + completed,
                },
            )
        )

    # -- check-ins and events (written behind) ----------------------------------------------------------

    def record(self, checkins: Sequence[CheckIn], reported: Sequence[EventRecord]) -> RecordOutcome:
        """Write a batch in one transaction: instances' check-ins, then events in order, then status rules."""
        if not checkins and not reported:
            return RecordOutcome()
        now = self.clock()
        failures: dict[tuple[str, str], int] = defaultdict(int)
        counts: dict[tuple[str, str], _RolloutCounts] = {}
        completions = 0
        touched = {c.group_id for c in checkins} | {r.group_id for r in reported}
        with self.engine.begin() as conn:
            # Instances first, rollouts after, never a group: see the lock order in the module's docstring.
            if checkins:
                rows = [dict(self._checkin_values(c), first_seen_at=c.at, status=int(InstanceStatus.UNDEFINED))
                        for c in sorted(checkins, key=lambda c: (c.app_id, c.machine_id))]
                stmt = self._insert(instances)
                update_cols = ("alias", "ip", "version", "track", "group_id", "oem", "board", "last_check_at")
                conn.execute(
                    stmt.on_conflict_do_update(
                        index_elements=["app_id", "machine_id"], set_={c: stmt.excluded[c] for c in update_cols}
                    ),
                    rows,
                )
            self._hold([c for c in checkins if c.held_back_from is not None], conn)
            for rec in reported:
                completions += self._apply_event(conn, rec, failures, counts)
            completions += self._complete_checked_in(conn, now, touched, counts)
            completed = self._settle_rollouts(conn, counts, {g for g in touched if g is not None}, now)
        try:
            paused = self._failure_pauses(failures, now)
        except sa.exc.SQLAlchemyError as exc:
            # The batch is written: raising would have the writer write it again. The next grant in the group
            # meets the same threshold and pauses it (``policy.decide_grant``).
            log.warning("Cannot pause the groups whose failures passed their threshold (%s); the next grant in "
                        "each pauses it", str(exc).splitlines()[0])
            paused = []
        return RecordOutcome(paused_groups=tuple(paused), failures=sum(failures.values()), completions=completions,
                             completed_rollouts=tuple(completed))

    def _hold(self, held: Sequence[CheckIn], conn: Connection) -> None:
        """OnHold for the instances a remembered limit held back (``policy.marks_on_hold``).

        In a fleet waiting for its turn most check-ins of a batch are held back: their instances are read a few
        hundred at a time and only those the rule changes are written, not two statements per check-in."""
        by_app: dict[str, dict[str, CheckIn]] = defaultdict(dict)
        for checkin in held:
            by_app[checkin.app_id][checkin.machine_id] = checkin
        changes = []
        for app_id, checkins in by_app.items():
            machine_ids = list(checkins)
            for start in range(0, len(machine_ids), _HOLD_READ_BATCH):
                rows = conn.execute(
                    sa.select(instances.c.machine_id, instances.c.status, instances.c.granted_version).where(
                        instances.c.app_id == app_id,
                        instances.c.machine_id.in_(machine_ids[start : start + _HOLD_READ_BATCH]),
                    )
                ).all()
                for row in rows:
                    checkin = checkins[row.machine_id]
                    assert checkin.held_back_from is not None
                    view = policy.InstanceView(checkin.version, InstanceStatus(row.status), row.granted_version)
                    if policy.marks_on_hold(view, checkin.held_back_from):
                        changes.append({"key_app": app_id, "key_machine": row.machine_id, "key_at": checkin.at})
        if changes:
            conn.execute(
                sa.update(instances)
                .where(instances.c.app_id == sa.bindparam("key_app"),
                       instances.c.machine_id == sa.bindparam("key_machine"))
                .values(status=int(InstanceStatus.ON_HOLD), status_at=sa.bindparam("key_at")),
                changes,
            )

    def _apply_event(
        self, conn: Connection, rec: EventRecord, failures: dict[tuple[str, str], int],
        counts: dict[tuple[str, str], _RolloutCounts],
    ) -> int:
        change = status_after_event(rec.event)
        inst = conn.execute(
            sa.select(instances.c.status, instances.c.granted_version, instances.c.group_id, instances.c.alias).where(
                instances.c.app_id == rec.app_id, instances.c.machine_id == rec.machine_id
            )
        ).first()
        conn.execute(
            sa.insert(events).values(
                at=rec.at, app_id=rec.app_id, machine_id=rec.machine_id, group_id=rec.group_id, version=rec.version,
                type=rec.event.type, result=rec.event.result, error_code=rec.event.error_code,
                previous_version=rec.event.previous_version, status=int(change.status) if change else None,
            )
        )
        if change is None or inst is None:
            return 0
        old = InstanceStatus(inst.status)
        if old == change.status:
            return 0
        conn.execute(
            sa.update(instances)
            .where(instances.c.app_id == rec.app_id, instances.c.machine_id == rec.machine_id)
            .values(status=int(change.status), status_at=rec.at, error_code=change.error_code)
        )
        group_id = inst.group_id or rec.group_id
        if group_id is None or inst.granted_version is None:
            return 0
        if change.status in FAILED_STATUSES and old not in FAILED_STATUSES:
            _add_count(counts, group_id, inst.granted_version, rec.at, failed=1)
            failures[(group_id, inst.granted_version)] += 1
            kind = (ActivityKind.INSTANCE_ROLLED_BACK if change.status == InstanceStatus.ROLLED_BACK
                    else ActivityKind.INSTANCE_FAILED)
            what = ("rolled back: the new version failed to boot" if change.status == InstanceStatus.ROLLED_BACK
                    else f"failed with error {change.error_code}")
            self._activity(
                conn, kind, rec.app_id, f"instance {inst.alias or rec.machine_id} {what}",
                group_id=group_id, version=inst.granted_version, at=rec.at,
            )
        elif change.status == InstanceStatus.COMPLETE:
            _add_count(counts, group_id, inst.granted_version, rec.at, completed=1)
            return 1
        return 0

    def _complete_checked_in(
        self, conn: Connection, now: float, touched: set[str | None], counts: dict[tuple[str, str], _RolloutCounts]
    ) -> int:
        """Instances in flight that now report their granted version are Complete (``status_after_checkin``;
        the query only narrows the rows down to the candidates, through the status index); their groups are
        added to ``touched`` and their completions to ``counts``."""
        candidates = conn.execute(
            sa.select(instances.c.app_id, instances.c.machine_id, instances.c.group_id, instances.c.granted_version,
                      instances.c.status, instances.c.version)
            .where(
                instances.c.status.in_([int(s) for s in IN_FLIGHT_STATUSES]),
                instances.c.version == instances.c.granted_version,
            )
        ).all()
        # In the instances' key order, so two servers' batches lock the same rows in the same order.
        done = sorted(
            (row for row in candidates
             if status_after_checkin(InstanceStatus(row.status), row.granted_version, row.version)
             == InstanceStatus.COMPLETE),
            key=lambda row: (row.app_id, row.machine_id),
        )
        for row in done:
            conn.execute(
                sa.update(instances)
                .where(instances.c.app_id == row.app_id, instances.c.machine_id == row.machine_id)
                .values(status=int(InstanceStatus.COMPLETE), status_at=now, error_code=None)
            )
            if row.group_id is not None and row.granted_version is not None:
                _add_count(counts, row.group_id, row.granted_version, now, completed=1)
                touched.add(row.group_id)
        return len(done)

    def _settle_rollouts(
        self, conn: Connection, counts: Mapping[tuple[str, str], _RolloutCounts], group_ids: set[str], now: float
    ) -> list[str]:
        """Add the batch's failures and completions to the rollouts' counters and end the open rollouts of
        ``group_ids`` that are complete now (``policy.rollout_completed``), one rollout at a time in ascending
        (group, version) order, so that every row is locked in the module's order; returns the activity log's
        messages.  Each candidate's row is locked before its group is counted, so a second server's batch waits
        and then counts with this one's instances committed."""
        candidates: dict[tuple[str, str], tuple[str, str, str | None]] = {}
        if group_ids:
            offered = (channels.c.app_id == groups.c.app_id) & (channels.c.name == groups.c.channel)
            for group_id, version, app_id, name, channel_version in conn.execute(
                sa.select(rollouts.c.group_id, rollouts.c.version, groups.c.app_id, groups.c.name, channels.c.version)
                .select_from(rollouts.join(groups, groups.c.id == rollouts.c.group_id).join(channels, offered))
                .where(rollouts.c.group_id.in_(sorted(group_ids)), rollouts.c.outcome.is_(None),
                       rollouts.c.version == channels.c.version, rollouts.c.granted > 0)
            ):
                candidates[(group_id, version)] = (app_id, name, channel_version)
        messages = []
        for key in sorted(set(counts) | set(candidates)):
            if key in counts:
                c = counts[key]
                self._count_rollout(conn, key[0], key[1], c.first_at, failed=c.failed, completed=c.completed)
            if key in candidates:
                message = self._complete_rollout(conn, key[0], key[1], *candidates[key], now)
                if message is not None:
                    messages.append(message)
        return messages

    def _complete_rollout(
        self, conn: Connection, group_id: str, version: str, app_id: str, name: str, channel_version: str | None,
        now: float,
    ) -> str | None:
        """End this open rollout if it is complete now; the activity log's message when it did."""
        cutoff = now - policy.SEEN_WINDOW.total_seconds()
        row = conn.execute(
            sa.select(rollouts).where(rollouts.c.group_id == group_id, rollouts.c.version == version)
            .with_for_update()
        ).first()
        if row is None:
            return None
        view = policy.RolloutView(version, int(row.granted), _outcome(row.outcome))
        seen_recently = (instances.c.group_id == group_id, instances.c.last_check_at > cutoff)
        # One instance behind is enough to know it is not complete: look for one before counting them all.
        behind = len(conn.execute(
            sa.select(instances.c.machine_id).where(*seen_recently, instances.c.version != version).limit(1)
        ).all())
        seen = 0 if behind else int(conn.execute(
            sa.select(sa.func.count()).select_from(instances).where(*seen_recently)).scalar_one())
        if not policy.rollout_completed(view, channel_version, policy.Population(seen, behind)):
            return None
        message = (
            f"rollout of {version} to group {name} completed: all {seen} instance(s) seen in the last day run "
            f"{version} ({row.granted} granted, {row.completed} complete, {row.failed} failed)"
        )
        if not self._end_rollout(conn, group_id, version, RolloutOutcome.COMPLETED, now):
            return None
        self._activity(conn, ActivityKind.ROLLOUT_COMPLETED, app_id, message, group_id=group_id, version=version,
                       at=now)
        return message

    def _end_rollout(self, conn: Connection, group_id: str, version: str, outcome: RolloutOutcome,
                     now: float) -> bool:
        """Record how an open rollout ended; False when it had already ended (another transaction was first)."""
        result = conn.execute(
            sa.update(rollouts)
            .where(rollouts.c.group_id == group_id, rollouts.c.version == version, rollouts.c.outcome.is_(None))
            .values(outcome=str(outcome), ended_at=now)
        )
        return bool(result.rowcount)

    def _offer_changed(
        self, conn: Connection, app_id: str, group_id: str, group_name: str, old: str | None, new: str | None,
        now: float, cause: str,
    ) -> list[str]:
        """The group is offered ``new`` instead of ``old``: supersede the open rollout of ``old``
        (``policy.rollout_superseded``) and reopen a superseded one of ``new`` (``policy.rollout_reopens``);
        returns the activity log's messages."""
        if old == new:
            return []
        wanted = [v for v in (old, new) if v is not None]
        rows = {r.version: r for r in conn.execute(
            sa.select(rollouts).where(rollouts.c.group_id == group_id, rollouts.c.version.in_(wanted))
        )}
        messages = []
        previous = rows.get(old) if old is not None else None
        if previous is not None and policy.rollout_superseded(
            policy.RolloutView(previous.version, int(previous.granted), _outcome(previous.outcome)), new
        ):
            message = (
                f"rollout of {old} to group {group_name} superseded: {cause} "
                f"({previous.granted} granted, {previous.completed} complete, {previous.failed} failed)"
            )
            if self._end_rollout(conn, group_id, previous.version, RolloutOutcome.SUPERSEDED, now):
                self._activity(conn, ActivityKind.ROLLOUT_SUPERSEDED, app_id, message, group_id=group_id,
                               version=old, at=now)
                messages.append(message)
        following = rows.get(new) if new is not None else None
        if following is not None and policy.rollout_reopens(
            policy.RolloutView(following.version, int(following.granted), _outcome(following.outcome)), new
        ):
            conn.execute(
                sa.update(rollouts)
                .where(rollouts.c.group_id == group_id, rollouts.c.version == following.version,
                       rollouts.c.outcome == str(RolloutOutcome.SUPERSEDED))
                .values(outcome=None, ended_at=None)
            )
        return messages

    def _failure_pauses(self, failures: Mapping[tuple[str, str], int], now: float) -> list[str]:
        """Pause the groups whose rollout's failures passed the threshold (``policy.failure_pause_reason``), in a
        transaction of its own after the batch's, so that group locks come before rollout locks (the module's
        order); the counts read are committed ones. Until it commits, a grant in the group meets the same
        threshold (``decide_grant``) and pauses the group itself; whichever comes second finds it paused."""
        paused: list[str] = []
        if not failures:
            return paused
        with self.engine.begin() as conn:
            for group_id, version in sorted(failures):
                row = conn.execute(sa.select(groups).where(groups.c.id == group_id).with_for_update()).first()
                if row is None or row.updates_paused:
                    continue
                group = group_from_row(row)
                counts = conn.execute(
                    sa.select(rollouts.c.granted, rollouts.c.failed).where(
                        rollouts.c.group_id == group_id, rollouts.c.version == version
                    )
                ).first()
                if counts is None:
                    continue
                counters = policy.RolloutCounters(attempted=int(counts.granted), failed=int(counts.failed))
                reason = policy.failure_pause_reason(group.policy, version, counters)
                if reason is None:
                    continue
                conn.execute(
                    sa.update(groups).where(groups.c.id == group_id).values(
                        updates_paused=True, pause_reason=reason, updated_at=now
                    )
                )
                self._activity(
                    conn, ActivityKind.ROLLOUT_PAUSED, group.app_id, f"group {group.name} paused: {reason}",
                    group_id=group_id, version=version, at=now,
                )
                self._bump_catalog(conn)
                paused.append(group_id)
        return paused

    # -- instances, history, activity ------------------------------------------------------------------

    def list_instances(self, app_id: str, flt: InstanceFilter) -> InstancePage:
        conditions = [instances.c.app_id == app_id]
        if flt.group_id is not None:
            conditions.append(instances.c.group_id == flt.group_id)
        if flt.status is not None:
            conditions.append(instances.c.status == int(flt.status))
        if flt.version is not None:
            conditions.append(instances.c.version == flt.version)
        with self.engine.connect() as conn:
            total = conn.execute(sa.select(sa.func.count()).select_from(instances).where(*conditions)).scalar_one()
            rows = conn.execute(
                sa.select(instances).where(*conditions).order_by(instances.c.machine_id)
                .limit(flt.limit).offset(flt.offset)
            )
            return InstancePage(total=int(total), instances=[instance_json(r) for r in rows])

    def get_instance(self, app_id: str, machine_id: str) -> dict[str, Any]:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(instances).where(instances.c.app_id == app_id, instances.c.machine_id == machine_id)
            ).first()
            if row is None:
                raise NotFound(f"application {app_id} has no instance {machine_id}")
            return instance_json(row)

    def instance_events(self, app_id: str, machine_id: str, limit: int = 100) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(events).where(events.c.app_id == app_id, events.c.machine_id == machine_id)
                .order_by(events.c.at.desc(), events.c.id.desc()).limit(limit)
            )
            return [
                {
                    "at": r.at, "version": r.version, "type": r.type, "result": r.result, "error_code": r.error_code,
                    "previous_version": r.previous_version,
                    "status": InstanceStatus(r.status).label if r.status is not None else None,
                }
                for r in rows
            ]

    def list_updates(self, app_id: str, window: TimeWindow, *, group_id: str | None = None, limit: int = 100,
                     offset: int = 0) -> InstancePage:
        """``instance list-updates``: the instances whose latest update was granted within ``window``, newest grant
        first, each with where it stands (its status, the version it runs, when it was last seen)."""
        conditions = [instances.c.app_id == app_id, instances.c.granted_at.is_not(None),
                      *window.conditions(instances.c.granted_at)]
        if group_id is not None:
            conditions.append(instances.c.group_id == group_id)
        with self.engine.connect() as conn:
            total = conn.execute(sa.select(sa.func.count()).select_from(instances).where(*conditions)).scalar_one()
            rows = conn.execute(
                sa.select(instances).where(*conditions)
                .order_by(instances.c.granted_at.desc(), instances.c.machine_id).limit(limit).offset(offset)
            )
            return InstancePage(total=int(total), instances=[instance_json(r) for r in rows])

    def version_counts(self, app_id: str, group_id: str | None = None,
                       seen: TimeWindow | None = None) -> list[dict[str, Any]]:
        """Instances per version and status (``instance list-app-versions``; the dashboard's breakdown); with
        ``seen``, only the instances whose last check-in lies within it."""
        conditions = [instances.c.app_id == app_id]
        if group_id is not None:
            conditions.append(instances.c.group_id == group_id)
        if seen is not None:
            conditions += seen.conditions(instances.c.last_check_at)
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(instances.c.group_id, instances.c.version, instances.c.status, sa.func.count())
                .where(*conditions)
                .group_by(instances.c.group_id, instances.c.version, instances.c.status)
            ).all()
        return [
            {"group_id": r[0], "version": r[1], "status": InstanceStatus(r[2]).label, "instances": int(r[3])}
            for r in rows
        ]

    def rollout(self, group_id: str, version: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(rollouts).where(rollouts.c.group_id == group_id, rollouts.c.version == version)
            ).first()
        return None if row is None else rollout_json(row)

    def snapshot_versions(self, resolution: float = HOUR) -> int:
        """Record, for the current period of ``resolution`` seconds (an hour unless the server was told
        otherwise), how many instances of each group run each version (checked in within the last hour).
        Repeating it within the period overwrites the period's figures."""
        now = self.clock()
        hour = now - now % resolution
        with self.engine.begin() as conn:
            rows = conn.execute(
                sa.select(instances.c.group_id, instances.c.version, sa.func.count())
                .where(instances.c.last_check_at > now - HOUR, instances.c.group_id.is_not(None))
                .group_by(instances.c.group_id, instances.c.version)
            ).all()
            conn.execute(sa.delete(version_snapshots).where(version_snapshots.c.at == hour))
            if rows:
                conn.execute(
                    sa.insert(version_snapshots),
                    [{"group_id": r[0], "at": hour, "version": r[1], "instances": int(r[2])} for r in rows],
                )
        return len(rows)

    def version_timeline(self, group_id: str, start: float, end: float) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(version_snapshots)
                .where(version_snapshots.c.group_id == group_id, version_snapshots.c.at >= start,
                       version_snapshots.c.at <= end)
                .order_by(version_snapshots.c.at, version_snapshots.c.version)
            )
            return [{"at": r.at, "version": r.version, "instances": r.instances} for r in rows]

    def list_activity(
        self, app_id: str | None = None, group_id: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        conditions = []
        if app_id is not None:
            conditions.append(activity.c.app_id == app_id)
        if group_id is not None:
            conditions.append(activity.c.group_id == group_id)
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(activity).where(*conditions).order_by(activity.c.at.desc(), activity.c.id.desc())
                .limit(limit)
            )
            return [
                {"at": r.at, "app_id": r.app_id, "group_id": r.group_id, "kind": r.kind, "version": r.version,
                 "message": r.message}
                for r in rows
            ]

    def prune(self, *, events_older_than: float, history_older_than: float, instances_older_than: float) -> dict[
        str, int
    ]:
        """Delete events, grants and activity, version history, and instances not seen, older than the given
        ages (s), and expired dashboard sessions."""
        now = self.clock()
        with self.engine.begin() as conn:
            counts = {
                "events": conn.execute(sa.delete(events).where(events.c.at < now - events_older_than)).rowcount,
                "grants": conn.execute(sa.delete(grants).where(grants.c.at < now - events_older_than)).rowcount,
                "web_sessions": conn.execute(sa.delete(web_sessions).where(web_sessions.c.expires_at < now)).rowcount,
                "activity": conn.execute(sa.delete(activity).where(activity.c.at < now - events_older_than)).rowcount,
                "version_snapshots": conn.execute(
                    sa.delete(version_snapshots).where(version_snapshots.c.at < now - history_older_than)
                ).rowcount,
                "instances": conn.execute(
                    sa.delete(instances).where(instances.c.last_check_at < now - instances_older_than)
                ).rowcount,
            }
        return {k: int(v) for k, v in counts.items()}

    # -- API tokens -----------------------------------------------------------------------------------

    def create_token(self, name: str) -> str:
        """A new token (``cu_`` + 43 random URL-safe characters); only its SHA-256 is stored."""
        token = "cu_" + secrets.token_urlsafe(32)
        with self.engine.begin() as conn:
            conn.execute(
                sa.insert(api_tokens).values(name=name, token_sha256=token_sha256(token), created_at=self.clock())
            )
            self._bump_catalog(conn)
        return token

    def list_tokens(self) -> list[TokenInfo]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(api_tokens).order_by(api_tokens.c.id))
            return [TokenInfo(r.id, r.name, r.created_at, r.revoked_at) for r in rows]

    def revoke_token(self, ref: str) -> int:
        """Revoke the token with id ``ref``, or every active token named ``ref``; returns how many."""
        with self.engine.begin() as conn:
            condition = api_tokens.c.name == ref
            if ref.isdigit():
                condition = sa.or_(condition, api_tokens.c.id == int(ref))
            result = conn.execute(
                sa.update(api_tokens)
                .where(condition, api_tokens.c.revoked_at.is_(None))
                .values(revoked_at=self.clock())
            )
            if result.rowcount == 0:
                raise NotFound(f"no active token with id or name {ref!r}")
            self._bump_catalog(conn)
            return int(result.rowcount)
