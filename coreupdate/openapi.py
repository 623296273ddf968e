"""The OpenAPI 3 document of the API, served at ``GET /api/v1/openapi.json``.  Pure data.

Kept beside ``api.py``'s route table: a test checks that both list the same operations.
"""

from __future__ import annotations

from typing import Any

from coreupdate import __version__
from coreupdate.model import InstanceStatus, RolloutOutcome

_STR = {"type": "string"}
_INT = {"type": "integer"}
_NUM = {"type": "number"}
_BOOL = {"type": "boolean"}
_TIME = {"type": "number", "description": "UTC seconds since the epoch", "nullable": True}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(props: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        schema["required"] = list(required)
    return schema


_POLICY = {
    "updates_paused": _BOOL,
    "update_count": {**_INT, "description": "grants per update_interval, and at most this many in flight"},
    "update_interval": {**_INT, "description": "seconds"},
    "update_timeout": {**_INT, "description": "seconds until a grant in flight counts as timed out"},
    "safe_mode": {**_BOOL, "description": "one instance first; pause when update_count grants time out"},
    "office_hours": {**_STR, "description": "windows, e.g. 'Mon-Fri 09:00 8h; Sat 10:00 2h'; empty: always"},
    "timezone": {**_STR, "description": "IANA time zone of office_hours"},
    "failure_pause_count": {**_INT, "nullable": True, "description": "pause after this many failures"},
    "failure_pause_fraction": {**_NUM, "nullable": True, "description": "pause when this fraction failed"},
}

SCHEMAS: dict[str, Any] = {
    "Error": _obj({"error": _STR, "field": _STR}, ("error",)),
    "App": _obj({"id": _STR, "label": _STR, "description": _STR}, ("id",)),
    "Package": _obj({"app_id": _STR, "version": _STR, "size": _INT, "sha256": _STR, "sha1": _STR,
                     "file_name": _STR, "url": _STR, "stored": _BOOL, "created_at": _TIME}),
    "PackageByUrl": _obj({"version": _STR, "url": _STR, "size": _INT, "sha256": _STR, "sha1": _STR},
                         ("version", "url", "size", "sha256", "sha1")),
    "Channel": _obj({"app_id": _STR, "name": _STR, "version": {**_STR, "nullable": True}}),
    "ChannelUpdate": _obj({"version": {**_STR, "nullable": True}}),
    "Rollout": _obj({"version": _STR, "started_at": _TIME, "granted": _INT, "failed": _INT, "completed": _INT,
                     "outcome": {"type": "string", "enum": [str(o) for o in RolloutOutcome], "nullable": True,
                                 "description": "how the rollout ended; null while it is open"},
                     "ended_at": _TIME}),
    "Group": _obj({"id": _STR, "app_id": _STR, "name": _STR, "description": _STR, "channel": _STR,
                   "pause_reason": _STR, **_POLICY, "rollout": {**_ref("Rollout"), "nullable": True}}),
    "GroupCreate": _obj({"id": _STR, "name": _STR, "channel": _STR, "description": _STR, **_POLICY}, ("channel",)),
    "GroupUpdate": _obj({"name": _STR, "channel": _STR, "description": _STR, **_POLICY}),
    "Pause": _obj({"reason": _STR}),
    "Instance": _obj({
        "app_id": _STR, "machine_id": _STR, "alias": _STR, "ip": _STR, "version": _STR, "track": _STR,
        "group_id": _STR, "oem": _STR, "board": _STR,
        "status": {"type": "string", "enum": [s.label for s in InstanceStatus]},
        "status_at": _TIME, "error_code": {**_INT, "nullable": True}, "granted_version": _STR,
        "granted_at": _TIME, "first_seen_at": _TIME, "last_check_at": _TIME,
    }),
    "InstancePage": _obj({"total": _INT, "instances": {"type": "array", "items": _ref("Instance")}}),
    "UpdatePage": _obj({"start": _NUM, "end": _NUM, "total": _INT,
                        "updates": {"type": "array", "items": _ref("Instance")}}),
    "VersionCount": _obj({"group_id": _STR, "version": _STR, "status": _STR, "instances": _INT}),
    "VersionTimeline": _obj({
        "group_id": _STR, "start": _NUM, "end": _NUM, "resolution": _INT,
        "points": {"type": "array", "items": _obj({"at": _NUM, "version": _STR, "instances": _INT})},
    }),
    "Activity": _obj({"at": _NUM, "app_id": _STR, "group_id": _STR, "kind": _STR, "version": _STR,
                      "message": _STR}),
}

# (method, path, summary, request body schema or None, response schema, success status)
OPERATIONS: list[tuple[str, str, str, str | None, str, int]] = [
    ("get", "/apps", "List applications", None, "App[]", 200),
    ("post", "/apps", "Create an application", "App", "App", 201),
    ("get", "/apps/{app_id}", "Show an application", None, "App", 200),
    ("patch", "/apps/{app_id}", "Change an application's label or description", "App", "App", 200),
    ("delete", "/apps/{app_id}", "Delete an application with its packages, channels and groups", None, "", 200),
    ("get", "/apps/{app_id}/packages", "List packages", None, "Package[]", 200),
    ("post", "/apps/{app_id}/packages", "Create a package served from its own URL", "PackageByUrl", "Package", 201),
    ("put", "/apps/{app_id}/packages/{version}/payload",
     "Upload a payload (application/octet-stream; query file_name, default update.gz): verified and stored",
     "binary", "Package", 201),
    ("delete", "/apps/{app_id}/packages/{version}", "Delete a package no channel points at", None, "", 200),
    ("get", "/apps/{app_id}/channels", "List channels", None, "Channel[]", 200),
    ("put", "/apps/{app_id}/channels/{channel}", "Create a channel or point it at a version", "ChannelUpdate",
     "Channel", 200),
    ("delete", "/apps/{app_id}/channels/{channel}", "Delete a channel no group follows", None, "", 200),
    ("get", "/apps/{app_id}/groups", "List groups with their policy and current rollout", None, "Group[]", 200),
    ("post", "/apps/{app_id}/groups", "Create a group", "GroupCreate", "Group", 201),
    ("get", "/apps/{app_id}/groups/{group}", "Show a group (by id or name)", None, "Group", 200),
    ("patch", "/apps/{app_id}/groups/{group}", "Change a group's channel or policy", "GroupUpdate", "Group", 200),
    ("delete", "/apps/{app_id}/groups/{group}", "Delete a group", None, "", 200),
    ("post", "/apps/{app_id}/groups/{group}/pause", "Pause the group's updates", "Pause", "Group", 200),
    ("post", "/apps/{app_id}/groups/{group}/unpause", "Resume the group's updates", None, "Group", 200),
    ("get", "/apps/{app_id}/groups/{group}/versions",
     "Instances per version over time (query start, end in epoch seconds; resolution 3600 or 86400)", None,
     "VersionTimeline", 200),
    ("get", "/apps/{app_id}/instances", "List instances (query group, status, version, limit, offset)", None,
     "InstancePage", 200),
    ("get", "/apps/{app_id}/instances/{machine_id}", "Show an instance with its latest events", None, "Instance",
     200),
    ("get", "/apps/{app_id}/versions",
     "Instances per version and status (query group; start, end in epoch seconds: last seen within)", None,
     "VersionCount[]", 200),
    ("get", "/apps/{app_id}/updates",
     "Instances whose latest update was granted within start..end (epoch seconds; default the last 7 days), "
     "newest first, with their status (query group, start, end, limit, offset)", None, "UpdatePage", 200),
    ("get", "/activity", "The activity log, newest first (query app, group, limit)", None, "Activity[]", 200),
]


def _schema(name: str) -> dict[str, Any]:
    if name.endswith("[]"):
        return {"type": "array", "items": _ref(name[:-2])}
    return _ref(name) if name else _obj({"deleted": _BOOL})


def document() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for method, path, summary, request, response, status in OPERATIONS:
        params = [
            {"name": part[1:-1], "in": "path", "required": True, "schema": _STR}
            for part in path.split("/") if part.startswith("{")
        ]
        op: dict[str, Any] = {
            "summary": summary,
            "parameters": params,
            "responses": {
                str(status): {"description": "success", "content": {"application/json": {"schema": _schema(response)}}},
                "400": {"description": "invalid input; field names it",
                        "content": {"application/json": {"schema": _ref("Error")}}},
                "401": {"description": "no valid token"},
                "404": {"description": "not found"},
                "409": {"description": "conflicts with the current state"},
                "503": {"description": "the database is unavailable"},
            },
        }
        if request == "binary":
            op["requestBody"] = {"required": True, "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
        elif request is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(request)}}}
        paths.setdefault(f"/api/v1{path}", {})[method] = op
    paths["/v1/update/"] = {"post": {
        "summary": "Omaha v3 update check, ping and events (text/xml); no token", "security": [],
        "responses": {"200": {"description": "Omaha response"}, "400": {"description": "malformed request"},
                      "503": {"description": "database unavailable for a grant"}},
    }}
    return {
        "openapi": "3.0.3",
        "info": {"title": "coreupdate", "version": __version__,
                 "description": "The fleet's update server: applications, packages, channels, groups, rollouts."},
        "components": {"schemas": SCHEMAS, "securitySchemes": {"token": {"type": "http", "scheme": "bearer"}}},
        "security": [{"token": []}],
        "paths": paths,
    }
