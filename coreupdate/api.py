"""The HTTP API (JSON) under ``/api/v1/``: everything ``updateservicectl`` does, described by ``openapi.py``.

Every call except ``GET /api/v1/openapi.json`` needs ``Authorization: Bearer TOKEN`` with a token made by
``coreupdate token create``; the server keeps only the tokens' SHA-256 and compares in constant time.  Input
is validated by ``validation.py``: a bad field gives 400 ``{"error": "...", "field": "..."}``; a missing
thing 404; a contradiction (duplicate, still in use) 409; the database unavailable 503.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from aiohttp import web

from coreupdate import openapi, validation
from coreupdate.model import Application, Group, GroupPolicy, InstanceStatus, Package
from coreupdate.storage.store import Conflict, InstanceFilter, NotFound, TimeWindow, token_matches
from coreupdate.uploads import store_upload
from coreupdate.validation import ValidationError

if TYPE_CHECKING:
    from coreupdate.server import Server

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PREFIX = "/api/v1"
MAX_LIST = 10_000
_CHUNK = 1 << 20


# Buckets of the versions-over-time roll-up, in seconds (the original's --resolution values).
RESOLUTIONS = (3600, 86400)


def roll_up(points: list[dict[str, Any]], resolution: int) -> list[dict[str, Any]]:
    """Hourly snapshots to ``resolution``-second buckets: each bucket shows its latest hour's counts.  Pure."""
    latest: dict[float, float] = {}
    for point in points:
        bucket = point["at"] - point["at"] % resolution
        latest[bucket] = max(latest.get(bucket, point["at"]), point["at"])
    return [
        {"at": point["at"] - point["at"] % resolution, "version": point["version"], "instances": point["instances"]}
        for point in points
        if point["at"] == latest[point["at"] - point["at"] % resolution]
    ]


def error(status: int, message: str, field: str | None = None) -> web.Response:
    body: dict[str, Any] = {"error": message}
    if field is not None:
        body["field"] = field
    return web.json_response(body, status=status)


def package_json(p: Package, base_url: str) -> dict[str, Any]:
    url = p.url or f"{base_url.rstrip('/')}/v1/packages/{p.app_id}/{p.version}/{p.file_name}"
    return {
        "app_id": p.app_id, "version": p.version, "size": p.size, "sha256": p.sha256_b64, "sha1": p.sha1_b64,
        "file_name": p.file_name, "url": url, "stored": p.url is None,
        "created_at": p.created_at.timestamp() if p.created_at else None,
    }


def group_json(g: Group, rollout: dict[str, Any] | None = None) -> dict[str, Any]:
    p = g.policy
    return {
        "id": g.id, "app_id": g.app_id, "name": g.name, "description": g.description, "channel": g.channel,
        "updates_paused": p.updates_paused, "pause_reason": g.pause_reason, "update_count": p.update_count,
        "update_interval": int(p.update_interval.total_seconds()),
        "update_timeout": int(p.update_timeout.total_seconds()), "safe_mode": p.safe_mode,
        "office_hours": p.office_hours, "timezone": p.timezone, "failure_pause_count": p.failure_pause_count,
        "failure_pause_fraction": p.failure_pause_fraction, "rollout": rollout,
    }


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        data = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValidationError("body", "is not JSON") from None
    if not isinstance(data, dict):
        raise ValidationError("body", "must be a JSON object")
    return data


def _int_query(request: web.Request, name: str, default: int, maximum: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    if not text.isdigit() or not 0 <= int(text) <= maximum:
        raise ValidationError(name, f"{text!r} is not an integer between 0 and {maximum}")
    return int(text)


def _epoch_query(request: web.Request, name: str) -> float | None:
    """A time in the query, in seconds since the epoch; None when absent."""
    text = request.query.get(name)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ValidationError(name, f"{text!r} is not a number of seconds since the epoch")
    return value


def _float_query(request: web.Request, name: str, default: float) -> float:
    value = _epoch_query(request, name)
    return default if value is None else value


def _window(request: web.Request, *, start: float | None = None, end: float | None = None) -> TimeWindow:
    """``start`` and ``end`` of the query (the defaults given when absent), in order."""
    given_start, given_end = _epoch_query(request, "start"), _epoch_query(request, "end")
    window = TimeWindow(start if given_start is None else given_start, end if given_end is None else given_end)
    if window.start is not None and window.end is not None and window.start > window.end:
        raise ValidationError("start", f"{window.start:.0f} is after end {window.end:.0f}")
    return window


class Api:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.store = server.store

    # -- plumbing ----------------------------------------------------------------------------------------

    def admin(self, handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            header = request.headers.get("Authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token:
                return error(401, "missing 'Authorization: Bearer TOKEN' (make one with 'coreupdate token create')")
            if not token_matches(token.strip(), self.server.catalog.token_hashes):
                return error(401, "the token is not valid (unknown or revoked)")
            try:
                return await handler(request)
            except ValidationError as exc:
                return error(400, str(exc), exc.field)
            except NotFound as exc:
                return error(404, str(exc))
            except Conflict as exc:
                return error(409, str(exc))

        return guarded

    async def _changed(self) -> None:
        await self.server.reload_catalog()

    def _app_id(self, request: web.Request) -> str:
        app_id = validation.canonical_app_id(request.match_info["app_id"])
        if app_id not in self.server.catalog.apps:
            raise NotFound(f"application {app_id} does not exist")
        return app_id

    # -- applications ------------------------------------------------------------------------------------

    async def list_apps(self, request: web.Request) -> web.Response:
        apps = await self.server.db(self.store.list_apps)
        return web.json_response([{"id": a.id, "label": a.label, "description": a.description} for a in apps])

    async def create_app(self, request: web.Request) -> web.Response:
        data = await _body(request)
        app = Application(
            id=validation.canonical_app_id(data.get("id"), "id"),
            label=validation.label(data.get("label", ""), "label"),
            description=validation.label(data.get("description", ""), "description"),
        )
        await self.server.db(self.store.create_app, app)
        await self._changed()
        return web.json_response({"id": app.id, "label": app.label, "description": app.description}, status=201)

    async def get_app(self, request: web.Request) -> web.Response:
        app = self.server.catalog.apps[self._app_id(request)]
        return web.json_response({"id": app.id, "label": app.label, "description": app.description})

    async def update_app(self, request: web.Request) -> web.Response:
        app_id = self._app_id(request)
        data = await _body(request)
        label = validation.label(data["label"], "label") if "label" in data else None
        description = validation.label(data["description"], "description") if "description" in data else None
        await self.server.db(self.store.update_app, app_id, label=label, description=description)
        await self._changed()
        return await self.get_app(request)

    async def delete_app(self, request: web.Request) -> web.Response:
        await self.server.db(self.store.delete_app, self._app_id(request))
        await self._changed()
        return web.json_response({"deleted": True})

    # -- packages ------------------------------------------------------------------------------------------

    async def list_packages(self, request: web.Request) -> web.Response:
        packages = await self.server.db(self.store.list_packages, self._app_id(request))
        base = self.server.base_url(request)
        return web.json_response([package_json(p, base) for p in packages])

    async def create_package(self, request: web.Request) -> web.Response:
        """A package whose payload lives at its own URL (a mirror)."""
        app_id = self._app_id(request)
        data = await _body(request)
        url = validation.url(data.get("url"), "url")
        package = Package(
            app_id=app_id,
            version=validation.version(data.get("version")),
            size=validation.positive_int(data.get("size"), "size"),
            sha256_b64=validation.hash_b64(data.get("sha256"), "sha256", 32),
            sha1_b64=validation.hash_b64(data.get("sha1"), "sha1", 20),
            file_name=validation.file_name(url.rstrip("/").rpartition("/")[2] or "", "url"),
            url=url,
        )
        created = await self.server.db(self.store.add_package, package)
        await self._changed()
        log.info("Package %s %s created at %s (%d bytes)", app_id, package.version, url, package.size)
        return web.json_response(package_json(created, self.server.base_url(request)), status=201)

    async def upload_package(self, request: web.Request) -> web.Response:
        """PUT the payload itself: verified (structure, hashes and, with a server key, the signature), stored."""
        app_id = self._app_id(request)
        version = validation.version(request.match_info["version"])
        name = validation.file_name(request.query.get("file_name", "update.gz"))
        stored = await store_upload(self.server, app_id, version, name, request.content.iter_chunked(_CHUNK))
        created, verified = stored.package, stored.verified
        await self._changed()
        log.info("Package %s %s stored (%d bytes, sha256 %s, signature %s)", app_id, version, created.size,
                 created.sha256_b64, "verified" if verified.signature_verified else "not checked: no server key")
        body = package_json(created, self.server.base_url(request))
        body["signature_verified"] = verified.signature_verified
        return web.json_response(body, status=201)

    async def delete_package(self, request: web.Request) -> web.Response:
        app_id = self._app_id(request)
        package = await self.server.db(self.store.delete_package, app_id, request.match_info["version"])
        if package.url is None:
            path = self.server.config.package_dir / app_id / package.version / package.file_name
            path.unlink(missing_ok=True)
        await self._changed()
        return web.json_response({"deleted": True})

    # -- channels ------------------------------------------------------------------------------------------

    async def list_channels(self, request: web.Request) -> web.Response:
        channels = await self.server.db(self.store.list_channels, self._app_id(request))
        return web.json_response([{"app_id": c.app_id, "name": c.name, "version": c.version} for c in channels])

    async def put_channel(self, request: web.Request) -> web.Response:
        app_id = self._app_id(request)
        name = validation.name(request.match_info["channel"], "channel")
        data = await _body(request)
        version = None if data.get("version") is None else validation.version(data["version"])
        channel = await self.server.db(self.store.set_channel, app_id, name, version)
        await self._changed()
        return web.json_response({"app_id": app_id, "name": channel.name, "version": channel.version})

    async def delete_channel(self, request: web.Request) -> web.Response:
        await self.server.db(self.store.delete_channel, self._app_id(request), request.match_info["channel"])
        await self._changed()
        return web.json_response({"deleted": True})

    # -- groups ----------------------------------------------------------------------------------------------

    async def _group_json(self, group: Group) -> dict[str, Any]:
        channel = self.server.catalog.channels.get((group.app_id, group.channel))
        rollout = None
        if channel is not None and channel.version is not None:
            rollout = await self.server.db(self.store.rollout, group.id, channel.version)
        return group_json(group, rollout)

    async def list_groups(self, request: web.Request) -> web.Response:
        groups = await self.server.db(self.store.list_groups, self._app_id(request))
        return web.json_response([await self._group_json(g) for g in groups])

    async def create_group(self, request: web.Request) -> web.Response:
        app_id = self._app_id(request)
        data = await _body(request)
        group_id = validation.name(data["id"], "id") if data.get("id") else ""
        name = validation.label(data.get("name") or group_id, "name")
        if not name:
            raise ValidationError("name", "give a name (or an id)")
        group = Group(
            id=group_id, app_id=app_id, name=name, channel=validation.name(data.get("channel"), "channel"),
            description=validation.label(data.get("description", ""), "description"),
            policy=validation.policy_patch(GroupPolicy(), data),
        )
        created = await self.server.db(self.store.create_group, group)
        await self._changed()
        return web.json_response(await self._group_json(created), status=201)

    async def get_group(self, request: web.Request) -> web.Response:
        group = await self.server.db(self.store.get_group, self._app_id(request), request.match_info["group"])
        return web.json_response(await self._group_json(group))

    async def _change_group(self, request: web.Request, change: Callable[[Group], Group]) -> web.Response:
        group = await self.server.db(self.store.update_group, self._app_id(request), request.match_info["group"],
                                     change)
        await self._changed()
        return web.json_response(await self._group_json(group))

    async def update_group(self, request: web.Request) -> web.Response:
        data = await _body(request)
        name = validation.label(data["name"], "name") if "name" in data else None
        if name == "":
            raise ValidationError("name", "must not be empty")
        channel = validation.name(data["channel"], "channel") if "channel" in data else None
        description = validation.label(data["description"], "description") if "description" in data else None

        def change(g: Group) -> Group:
            return replace(
                g, name=name or g.name, channel=channel or g.channel,
                description=g.description if description is None else description,
                policy=validation.policy_patch(g.policy, data),
            )

        return await self._change_group(request, change)

    async def pause_group(self, request: web.Request) -> web.Response:
        data = await _body(request) if request.can_read_body else {}
        reason = validation.label(data.get("reason", ""), "reason")
        return await self._change_group(request, lambda g: replace(
            g, pause_reason=reason, policy=replace(g.policy, updates_paused=True)))

    async def unpause_group(self, request: web.Request) -> web.Response:
        return await self._change_group(request, lambda g: replace(
            g, pause_reason="", policy=replace(g.policy, updates_paused=False)))

    async def delete_group(self, request: web.Request) -> web.Response:
        await self.server.db(self.store.delete_group, self._app_id(request), request.match_info["group"])
        await self._changed()
        return web.json_response({"deleted": True})

    async def group_versions(self, request: web.Request) -> web.Response:
        """Instances per version over time (hourly snapshots), for the dashboard's chart."""
        app_id = self._app_id(request)
        group = await self.server.db(self.store.get_group, app_id, request.match_info["group"])
        end = _float_query(request, "end", time.time())
        start = _float_query(request, "start", end - 7 * 86400)
        resolution = _int_query(request, "resolution", 3600, 7 * 86400)
        if resolution not in RESOLUTIONS:
            raise ValidationError("resolution", f"{resolution} is not one of {', '.join(map(str, RESOLUTIONS))}")
        points = await self.server.db(self.store.version_timeline, group.id, start, end)
        return web.json_response({"group_id": group.id, "start": start, "end": end, "resolution": resolution,
                                  "points": roll_up(points, resolution)})

    # -- instances, versions, activity --------------------------------------------------------------------

    async def list_instances(self, request: web.Request) -> web.Response:
        app_id = self._app_id(request)
        flt = InstanceFilter(limit=_int_query(request, "limit", 100, MAX_LIST),
                             offset=_int_query(request, "offset", 0, 2**31))
        flt.group_id = await self._group_query(request, app_id)
        if "status" in request.query:
            try:
                flt.status = InstanceStatus.from_label(request.query["status"])
            except ValueError as exc:
                raise ValidationError("status", str(exc)) from None
        if "version" in request.query:
            flt.version = validation.version(request.query["version"])
        page = await self.server.db(self.store.list_instances, app_id, flt)
        return web.json_response({"total": page.total, "instances": page.instances})

    async def get_instance(self, request: web.Request) -> web.Response:
        app_id = self._app_id(request)
        machine = request.match_info["machine_id"]
        instance = await self.server.db(self.store.get_instance, app_id, machine)
        instance["events"] = await self.server.db(self.store.instance_events, app_id, machine)
        return web.json_response(instance)

    async def _group_query(self, request: web.Request, app_id: str) -> str | None:
        """The id of the group named (by id or name) in the query's ``group``, if any."""
        if "group" not in request.query:
            return None
        return (await self.server.db(self.store.get_group, app_id, request.query["group"])).id

    async def app_versions(self, request: web.Request) -> web.Response:
        """Instances per version and status; ``start``/``end``: only those last seen within."""
        app_id = self._app_id(request)
        group_id = await self._group_query(request, app_id)
        seen = _window(request)
        return web.json_response(await self.server.db(self.store.version_counts, app_id, group_id, seen))

    async def list_updates(self, request: web.Request) -> web.Response:
        """The instances whose latest update was granted between ``start`` (default a week ago) and ``end``
        (default now), newest first."""
        app_id = self._app_id(request)
        group_id = await self._group_query(request, app_id)
        end = _float_query(request, "end", time.time())
        window = _window(request, start=end - 7 * 86400, end=end)
        page = await self.server.db(
            self.store.list_updates, app_id, window, group_id=group_id,
            limit=_int_query(request, "limit", 100, MAX_LIST), offset=_int_query(request, "offset", 0, 2**31),
        )
        return web.json_response({"start": window.start, "end": window.end, "total": page.total,
                                  "updates": page.instances})

    async def list_activity(self, request: web.Request) -> web.Response:
        app_id = validation.canonical_app_id(request.query["app"]) if "app" in request.query else None
        group_id = None
        if "group" in request.query:
            if app_id is None:
                raise ValidationError("group", "needs app as well")
            group_id = (await self.server.db(self.store.get_group, app_id, request.query["group"])).id
        limit = _int_query(request, "limit", 100, MAX_LIST)
        return web.json_response(await self.server.db(self.store.list_activity, app_id, group_id, limit))

    async def openapi_document(self, request: web.Request) -> web.Response:
        return web.json_response(openapi.document())


def add_routes(app: web.Application, server: Server) -> None:
    api = Api(server)
    a = api.admin
    p = PREFIX
    r = app.router
    r.add_get(f"{p}/openapi.json", api.openapi_document)
    r.add_get(f"{p}/apps", a(api.list_apps))
    r.add_post(f"{p}/apps", a(api.create_app))
    r.add_get(f"{p}/apps/{{app_id}}", a(api.get_app))
    r.add_patch(f"{p}/apps/{{app_id}}", a(api.update_app))
    r.add_delete(f"{p}/apps/{{app_id}}", a(api.delete_app))
    r.add_get(f"{p}/apps/{{app_id}}/packages", a(api.list_packages))
    r.add_post(f"{p}/apps/{{app_id}}/packages", a(api.create_package))
    r.add_put(f"{p}/apps/{{app_id}}/packages/{{version}}/payload", a(api.upload_package))
    r.add_delete(f"{p}/apps/{{app_id}}/packages/{{version}}", a(api.delete_package))
    r.add_get(f"{p}/apps/{{app_id}}/channels", a(api.list_channels))
    r.add_put(f"{p}/apps/{{app_id}}/channels/{{channel}}", a(api.put_channel))
    r.add_delete(f"{p}/apps/{{app_id}}/channels/{{channel}}", a(api.delete_channel))
    r.add_get(f"{p}/apps/{{app_id}}/groups", a(api.list_groups))
    r.add_post(f"{p}/apps/{{app_id}}/groups", a(api.create_group))
    r.add_get(f"{p}/apps/{{app_id}}/groups/{{group}}", a(api.get_group))
    r.add_patch(f"{p}/apps/{{app_id}}/groups/{{group}}", a(api.update_group))
    r.add_delete(f"{p}/apps/{{app_id}}/groups/{{group}}", a(api.delete_group))
    r.add_post(f"{p}/apps/{{app_id}}/groups/{{group}}/pause", a(api.pause_group))
    r.add_post(f"{p}/apps/{{app_id}}/groups/{{group}}/unpause", a(api.unpause_group))
    r.add_get(f"{p}/apps/{{app_id}}/groups/{{group}}/versions", a(api.group_versions))
    r.add_get(f"{p}/apps/{{app_id}}/instances", a(api.list_instances))
    r.add_get(f"{p}/apps/{{app_id}}/instances/{{machine_id}}", a(api.get_instance))
    r.add_get(f"{p}/apps/{{app_id}}/versions", a(api.app_versions))
    r.add_get(f"{p}/apps/{{app_id}}/updates", a(api.list_updates))
    r.add_get(f"{p}/activity", a(api.list_activity))
