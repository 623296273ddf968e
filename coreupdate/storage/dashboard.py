"""The dashboard's reads: every aggregate is computed by the database (``GROUP BY`` over covering indexes),
never by loading instances into Python.  Synchronous, one connection each; times are epoch seconds.

The shapes of the fleet that matter here:

* ``fleet_counts``: per group, version and status, how many instances there are, how many checked in during
  the last day and during the last hour: one scan of the ``instances_group_version_order`` index gives the overview's
  progress bars and status counts, the group page's status chart and the live point of its versions chart;
* ``errors_since``: failed and rolled-back reports per group since a time (``events_status_at``);
* ``instance_page``: one page of a group's instances, filtered and sorted in the database, with the count of all
  matching rows for the pager: each sort follows an index that starts with ``group_id`` and ends with
  ``machine_id``, so the page's keys come from the index alone however deep the page (a "deferred join"), then
  only those rows are read;
* an instance's history: its events, and its grants (``grants``).
"""

from __future__ import annotations

import enum
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from coreupdate.model import DAY, FAILED_STATUSES, HOUR, InstanceStatus
from coreupdate.storage.schema import events, grants, instances, rollouts
from coreupdate.storage.store import instance_json

Clock = Callable[[], float]


@dataclass(frozen=True)
class VersionStatusCount:
    version: str
    status: InstanceStatus
    instances: int
    seen_day: int  # of those, checked in during the last day
    seen_hour: int  # of those, checked in during the last hour


@dataclass
class GroupCounts:
    """One group's instances by version and status."""

    rows: list[VersionStatusCount] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(r.instances for r in self.rows)

    @property
    def seen_day(self) -> int:
        return sum(r.seen_day for r in self.rows)

    def seen_day_on(self, version: str | None) -> int:
        return sum(r.seen_day for r in self.rows if r.version == version)

    def by_status(self) -> dict[InstanceStatus, int]:
        counts: dict[InstanceStatus, int] = defaultdict(int)
        for r in self.rows:
            counts[r.status] += r.instances
        return dict(counts)

    def matching(self, version: str | None, status: InstanceStatus | None) -> int:
        """How many instances have this version and status (None: any)."""
        return sum(r.instances for r in self.rows
                   if (version is None or r.version == version) and (status is None or r.status == status))

    def versions_seen_hour(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for r in self.rows:
            if r.seen_hour:
                counts[r.version] += r.seen_hour
        return dict(counts)


class InstanceSort(enum.StrEnum):
    """The instance table's sort orders (the query string's ``sort=``)."""

    LAST_CHECK = "last-check"
    MACHINE = "machine"
    VERSION = "version"
    STATUS = "status"


# Each sort is the column order of an index that starts with group_id and ends with machine_id (a total order).
_SORT_COLUMNS = {
    InstanceSort.LAST_CHECK: (instances.c.last_check_at, instances.c.machine_id),
    InstanceSort.MACHINE: (instances.c.machine_id,),
    InstanceSort.VERSION: (instances.c.version, instances.c.status, instances.c.last_check_at, instances.c.machine_id),
    InstanceSort.STATUS: (instances.c.status, instances.c.machine_id),
}


@dataclass(frozen=True)
class InstanceQuery:
    group_id: str
    version: str | None = None
    status: InstanceStatus | None = None
    sort: InstanceSort = InstanceSort.LAST_CHECK
    descending: bool = True
    limit: int = 50
    offset: int = 0


@dataclass(frozen=True)
class InstanceRows:
    total: int
    rows: list[dict[str, Any]]


class DashboardQueries:
    def __init__(self, engine: Engine, *, clock: Clock = time.time) -> None:
        self.engine = engine
        self.clock = clock

    def fleet_counts(self, group_ids: Iterable[str] | None = None) -> dict[str, GroupCounts]:
        """Per group (all groups, or those given): instances by version and status, seen in the last day/hour."""
        now = self.clock()
        seen_day = sa.func.sum(sa.case((instances.c.last_check_at > now - DAY, 1), else_=0))
        seen_hour = sa.func.sum(sa.case((instances.c.last_check_at > now - HOUR, 1), else_=0))
        query = sa.select(
            instances.c.group_id, instances.c.version, instances.c.status, sa.func.count(), seen_day, seen_hour
        ).group_by(instances.c.group_id, instances.c.version, instances.c.status)
        if group_ids is None:
            query = query.where(instances.c.group_id.is_not(None))
        else:
            query = query.where(instances.c.group_id.in_(list(group_ids)))
        result: dict[str, GroupCounts] = defaultdict(GroupCounts)
        with self.engine.connect() as conn:
            for group_id, version, status, count, day, hour in conn.execute(query):
                result[group_id].rows.append(
                    VersionStatusCount(version, InstanceStatus(status), int(count), int(day or 0), int(hour or 0))
                )
        return dict(result)

    def errors_since(self, since: float, group_ids: Iterable[str] | None = None) -> dict[str, int]:
        """Failure and rollback reports per group since ``since``."""
        query = (
            sa.select(events.c.group_id, sa.func.count())
            .where(events.c.status.in_([int(s) for s in FAILED_STATUSES]), events.c.at > since)
            .group_by(events.c.group_id)
        )
        if group_ids is not None:
            query = query.where(events.c.group_id.in_(list(group_ids)))
        with self.engine.connect() as conn:
            return {g: int(n) for g, n in conn.execute(query) if g is not None}

    def rollouts(self, group_ids: Iterable[str]) -> dict[tuple[str, str], dict[str, Any]]:
        """The rollout counters of the given groups and how each ended (None: open), by (group id, version)."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(rollouts).where(rollouts.c.group_id.in_(list(group_ids)))).all()
        return {
            (r.group_id, r.version): {"started_at": r.started_at, "granted": r.granted, "failed": r.failed,
                                      "completed": r.completed, "outcome": r.outcome}
            for r in rows
        }

    def instance_page(self, q: InstanceQuery, *, count: bool = True) -> InstanceRows:
        """A page of instances; ``count=False``: leave ``total`` at -1 (the caller knows it from ``fleet_counts``
        and saves a second pass over the group)."""
        conditions = [instances.c.group_id == q.group_id]
        if q.version is not None:
            conditions.append(instances.c.version == q.version)
        if q.status is not None:
            conditions.append(instances.c.status == int(q.status))
        order = [c.desc() if q.descending else c.asc() for c in _SORT_COLUMNS[q.sort]]
        with self.engine.connect() as conn:
            total = -1
            if count:
                total = conn.execute(sa.select(sa.func.count()).select_from(instances).where(*conditions)
                                     ).scalar_one()
            # The page's keys from the index alone (however deep the offset), then those rows.
            keys = conn.execute(
                sa.select(instances.c.machine_id).where(*conditions).order_by(*order).limit(q.limit).offset(q.offset)
            ).scalars().all()
            rows = conn.execute(sa.select(instances).where(
                instances.c.group_id == q.group_id, instances.c.machine_id.in_(keys))).all() if keys else []
        by_key = {r.machine_id: r for r in rows}
        return InstanceRows(int(total), [instance_json(by_key[k]) for k in keys if k in by_key])

    def instance_grants(self, app_id: str, machine_id: str, limit: int = 100) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(grants.c.at, grants.c.group_id, grants.c.version)
                .where(grants.c.app_id == app_id, grants.c.machine_id == machine_id)
                .order_by(grants.c.at.desc(), grants.c.id.desc()).limit(limit)
            ).all()
        return [{"at": r.at, "group_id": r.group_id, "version": r.version} for r in rows]
