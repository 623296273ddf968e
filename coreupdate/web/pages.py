"""The dashboard's pages (GET): overview, group, instance, packages and channels.

Rules: a page reads the catalog from memory and asks the database only for aggregates
(``storage/dashboard.py``) and bounded lists (a page of instances, the last events, the last activity), in
worker threads; no page loads all instances.  A group is named by its id or its name.  Query parameters are
checked (an unknown status or sort is a 400 page that says which value is wrong).
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from coreupdate import validation
from coreupdate.model import DAY, Group, InstanceStatus
from coreupdate.storage.dashboard import GroupCounts, InstanceQuery, InstanceRows, InstanceSort
from coreupdate.storage.store import NotFound
from coreupdate.validation import ValidationError
from coreupdate.web import charts, forms, present
from coreupdate.web.common import Ctx, Dashboard, measured

PAGE_SIZE = 50
TIMELINE_DAYS = 7
ACTIVITY_ROWS = 50


class BadQuery(ValueError):
    """A query parameter the page cannot use."""


@dataclass
class GroupRow:
    """One group as the overview and the group page show it."""

    group: Group
    version: str | None
    state: present.RolloutState
    progress: present.Progress
    statuses: list[tuple[InstanceStatus, int]]
    errors_day: int
    policy: str
    total: int
    rollout: dict[str, Any] | None = None


@dataclass
class AppSection:
    app_id: str
    label: str
    groups: list[GroupRow] = field(default_factory=list)


class Pages:
    def __init__(self, dash: Dashboard) -> None:
        self.dash = dash
        self.server = dash.server

    # -- shared pieces -----------------------------------------------------------------------------------

    def app_id(self, request: web.Request) -> str:
        try:
            app_id = validation.canonical_app_id(request.match_info["app_id"])
        except ValidationError:
            raise web.HTTPNotFound() from None
        if app_id not in self.server.catalog.apps:
            raise web.HTTPNotFound()
        return app_id

    def group(self, request: web.Request) -> Group:
        app_id = self.app_id(request)
        group = self.server.catalog.group_for_track(app_id, request.match_info["group"])
        if group is None:
            raise web.HTTPNotFound()
        return group

    def group_row(self, group: Group, counts: GroupCounts | None, errors: int,
                  rollouts: dict[tuple[str, str], dict[str, Any]]) -> GroupRow:
        channel = self.server.catalog.channels.get((group.app_id, group.channel))
        version = channel.version if channel else None
        rollout = rollouts.get((group.id, version)) if version else None
        progress = present.progress(counts, version)
        state = present.rollout_state(
            paused=group.policy.updates_paused, pause_reason=group.pause_reason, channel=group.channel,
            version=version, rollout=present.rollout_view(rollout, version), progress=progress,
        )
        by_status = counts.by_status() if counts else {}
        statuses = [(s, by_status[s]) for s in present.STATUS_ORDER if by_status.get(s)]
        return GroupRow(group, version, state, progress, statuses, errors, present.policy_summary(group.policy),
                        counts.total if counts else 0, rollout)

    # -- overview ----------------------------------------------------------------------------------------

    async def overview(self, request: web.Request, ctx: Ctx) -> web.StreamResponse:
        catalog = self.server.catalog
        db, q = self.server.db, self.dash.queries
        counts, errors, rollouts = await asyncio.gather(
            self.dash.fleet_counts(request, None), db(q.errors_since, q.clock() - DAY),
            db(q.rollouts, list(catalog.groups)))
        sections = []
        for app in sorted(catalog.apps.values(), key=lambda a: (a.label.lower(), a.id)):
            section = AppSection(app.id, app.label)
            for group in sorted((g for g in catalog.groups.values() if g.app_id == app.id),
                                key=lambda g: g.name.lower()):
                section.groups.append(self.group_row(group, counts.get(group.id), errors.get(group.id, 0), rollouts))
            sections.append(section)
        return self.dash.render("overview.html", session=ctx.session, sections=sections)

    # -- group ---------------------------------------------------------------------------------------------

    def _instance_query(self, request: web.Request, group: Group) -> tuple[InstanceQuery, int]:
        query = request.query
        version = query.get("version") or None
        status = None
        if query.get("status"):
            try:
                status = InstanceStatus.from_label(query["status"])
            except ValueError as exc:
                raise BadQuery(f"status: {exc}") from None
        try:
            sort = InstanceSort(query.get("sort", InstanceSort.LAST_CHECK))
        except ValueError:
            raise BadQuery(f"sort: {query.get('sort')!r} is not one of "
                           f"{', '.join(s.value for s in InstanceSort)}") from None
        order = query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise BadQuery(f"order: {order!r} is not asc or desc")
        page_text = query.get("page", "1")
        if not page_text.isdigit() or not 1 <= int(page_text) <= 1_000_000:
            raise BadQuery(f"page: {page_text!r} is not a page number")
        page = int(page_text)
        return InstanceQuery(group.id, version, status, sort, order == "desc", PAGE_SIZE, (page - 1) * PAGE_SIZE), page

    async def group_page(self, request: web.Request, ctx: Ctx, *, form_values: dict[str, str] | None = None,
                         form_errors: dict[str, str] | None = None, status: int = 200) -> web.StreamResponse:
        group = self.group(request)
        try:
            iq, page = self._instance_query(request, group)
        except BadQuery as exc:
            return self.dash.message(400, "Bad address", str(exc), ctx.session)
        db, q = self.server.db, self.dash.queries
        now = q.clock()

        async def instance_rows() -> InstanceRows:
            started = time.perf_counter()
            rows = await db(q.instance_page, iq, count=False)  # the total comes from the counts
            measured(request, "instances", started)
            return rows

        # Independent reads, side by side in the worker threads.
        all_counts, all_errors, rollouts, timeline, page_rows, activity = await asyncio.gather(
            self.dash.fleet_counts(request, [group.id]), db(q.errors_since, now - DAY, [group.id]),
            db(q.rollouts, [group.id]),
            db(self.server.store.version_timeline, group.id, now - TIMELINE_DAYS * DAY, now), instance_rows(),
            db(self.server.store.list_activity, group.app_id, group.id, ACTIVITY_ROWS),
        )
        counts = all_counts.get(group.id)
        instances = InstanceRows(counts.matching(iq.version, iq.status) if counts else 0, page_rows.rows)
        row = self.group_row(group, counts, all_errors.get(group.id, 0), rollouts)
        points = _timeline_points(timeline)
        live = counts.versions_seen_hour() if counts else {}
        points.append(charts.TimePoint(now, live))
        series = charts.fold_versions(points)
        channels = sorted(name for (app, name) in self.server.catalog.channels if app == group.app_id)
        versions = sorted({r.version for r in counts.rows}) if counts else []
        pages = max(1, math.ceil(instances.total / PAGE_SIZE))
        filters = {k: v for k, v in (("version", iq.version or ""),
                                     ("status", iq.status.label if iq.status else ""),
                                     ("sort", iq.sort.value), ("order", "desc" if iq.descending else "asc")) if v}
        return self.dash.render(
            "group.html", status, session=ctx.session, row=row, group=group,
            versions_chart=charts.versions_chart(series), series=series,
            status_chart=charts.status_chart(counts.by_status() if counts else {}, present.STATUS_ORDER),
            instances=instances, page=page, pages=pages, filters=filters, versions=versions,
            statuses=[s.label for s in present.STATUS_ORDER], sorts=[s.value for s in InstanceSort],
            page_url=lambda n: "?" + urlencode({**filters, "page": n}),
            sort_url=lambda s: "?" + urlencode({**filters, "sort": s, "order": _next_order(iq, s), "page": 1}),
            activity=activity, channels=channels, form=form_values or forms.policy_values(group.policy),
            errors=form_errors or {}, done=request.query.get("done", ""),
        )

    # -- instance ------------------------------------------------------------------------------------------

    async def instance_page(self, request: web.Request, ctx: Ctx) -> web.StreamResponse:
        app_id = self.app_id(request)
        machine = request.match_info["machine_id"]
        store = self.server.store
        try:
            instance = await self.server.db(store.get_instance, app_id, machine)
        except NotFound:
            raise web.HTTPNotFound() from None
        events = await self.server.db(store.instance_events, app_id, machine, 200)
        for e in events:
            e["text"] = present.event_text(e["type"], e["result"])
        grants = await self.server.db(self.dash.queries.instance_grants, app_id, machine)
        group = self.server.catalog.groups.get(instance["group_id"] or "")
        return self.dash.render("instance.html", session=ctx.session, instance=instance, events=events,
                                grants=grants, group=group, groups=self.server.catalog.groups, app_id=app_id)

    # -- packages and channels ---------------------------------------------------------------------------

    async def packages_page(self, request: web.Request, ctx: Ctx, *, status: int = 200, error: str = "",
                            uploaded: Any = None) -> web.StreamResponse:
        app_id = self.app_id(request)
        catalog = self.server.catalog
        packages = sorted((p for (a, _v), p in catalog.packages.items() if a == app_id),
                          key=lambda p: p.created_at.timestamp() if p.created_at else 0, reverse=True)
        channels = sorted((c for (a, _n), c in catalog.channels.items() if a == app_id), key=lambda c: c.name)
        followers = {c.name: sorted(g.name for g in catalog.groups.values()
                                    if g.app_id == app_id and g.channel == c.name) for c in channels}
        return self.dash.render("packages.html", status, session=ctx.session, app=catalog.apps[app_id],
                                packages=packages, channels=channels, followers=followers, error=error,
                                uploaded=uploaded, has_key=self.server.config.payload_public_key is not None,
                                done=request.query.get("done", ""))


def _timeline_points(rows: list[dict[str, Any]]) -> list[charts.TimePoint]:
    by_time: dict[float, dict[str, int]] = {}
    for r in rows:
        by_time.setdefault(r["at"], {})[r["version"]] = int(r["instances"])
    return [charts.TimePoint(at, versions) for at, versions in sorted(by_time.items())]


def _next_order(q: InstanceQuery, sort: str) -> str:
    if q.sort.value == sort:
        return "asc" if q.descending else "desc"
    return "desc" if sort == InstanceSort.LAST_CHECK.value else "asc"
