"""``updateservicectl``: the command-line client of coreupdate's API, with the original's vocabulary.

``updateservicectl [--server URL] [--key TOKEN] [--json] COMMAND SUBCOMMAND [flags]``; the server and key also
come from ``UPDATECTL_SERVER`` and ``UPDATECTL_KEY``.  The original's ``--user``/``UPDATECTL_USER`` (a token names
its owner here) and ``package create --meta`` (nodes get no metadata signature from this server; the payload's
own signature covers its metadata) are refused with a message saying so, never ignored: a script that relies on
them learns at once that they do nothing here.  Tables are aligned columns with a header; ``--json`` prints the
API's JSON instead.  Exit codes (``cliutil``): 0 done; 1 refused (not found, conflict, invalid input, a payload
that does not verify); 2 bad command line; 3 server unreachable or failing (5xx); 4 no token or token refused.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from coreos_common.boolean import parse_bool
from coreos_common.http1 import HttpError, RequestBodyError, StreamedBody
from coreos_common.http_sync import SyncHttpClient, file_body
from coreupdate import COREOS_APP_ID
from coreupdate.cliutil import EXIT_AUTH, EXIT_FAILED, EXIT_UNREACHABLE, EXIT_USAGE, CliError, run_cli
from coreupdate.validation import ValidationError, canonical_app_id
from update_engine import omaha
from update_engine.errors import UpdateEngineError
from update_engine.payload.files import payload_digests, verify_payload_file

PROG = "updateservicectl"
DEFAULT_SERVER = "http://127.0.0.1:8080"
MAX_ANSWER = 64 << 20


class Client:
    """The API over HTTP; every failure is a CliError with the right exit code."""

    def __init__(self, server: str, key: str) -> None:
        self.server = server.rstrip("/")
        self.key = key
        self.http = SyncHttpClient(user_agent=f"{PROG}/1")

    def call(self, method: str, path: str, body: Any = None, *, raw: StreamedBody | None = None,
             timeout: float = 60.0) -> Any:
        """One API call; ``raw`` is an octet-stream body sent a piece at a time (a payload upload)."""
        if not self.key:
            raise CliError("no API key: give --key or set UPDATECTL_KEY (make one with 'coreupdate token create')",
                           EXIT_AUTH)
        headers = [("Authorization", f"Bearer {self.key}"), ("Accept", "application/json")]
        data: bytes | StreamedBody | None = raw
        if raw is not None:
            headers.append(("Content-Type", "application/octet-stream"))
        elif body is not None:
            headers.append(("Content-Type", "application/json"))
            data = json.dumps(body).encode()
        url = f"{self.server}/api/v1{path}"
        try:
            response = self.http.request(method, url, headers=headers, body=data, timeout=timeout,
                                         max_body=MAX_ANSWER)
        except RequestBodyError:
            raise  # the caller names the file
        except HttpError as exc:
            raise CliError(f"cannot reach {self.server}: {exc}", EXIT_UNREACHABLE) from None
        except ValueError as exc:
            raise CliError(f"--server {self.server!r}: {exc}", EXIT_USAGE) from None
        try:
            answer = json.loads(response.body) if response.body else None
        except ValueError:
            answer = None
        if response.status < 300:
            return answer
        message = answer.get("error") if isinstance(answer, dict) else response.body[:200].decode(errors="replace")
        status = response.status
        code = EXIT_AUTH if status in (401, 403) else EXIT_UNREACHABLE if status >= 500 else EXIT_FAILED
        raise CliError(f"{method} {path}: {status}: {message}", code)


# -- output ------------------------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [list(headers)] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def when(epoch: float | None) -> str:
    return "-" if epoch is None else datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def emit(args: argparse.Namespace, data: Any, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        table(headers, rows)


def app_path(args: argparse.Namespace) -> str:
    try:
        return f"/apps/{canonical_app_id(args.app_id, '--app-id')}"
    except ValidationError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


def quote(value: str) -> str:
    return urllib.parse.quote(value, safe="")


# -- app -----------------------------------------------------------------------------------------------------


def app_create(c: Client, args: argparse.Namespace) -> None:
    app = c.call("POST", "/apps", {"id": args.app_id, "label": args.label, "description": args.description})
    emit(args, app, ("Id", "Label", "Description"), [(app["id"], app["label"], app["description"])])


def app_update(c: Client, args: argparse.Namespace) -> None:
    body = {k: v for k, v in (("label", args.label), ("description", args.description)) if v is not None}
    app = c.call("PATCH", app_path(args), body)
    emit(args, app, ("Id", "Label", "Description"), [(app["id"], app["label"], app["description"])])


def app_list(c: Client, args: argparse.Namespace) -> None:
    apps = c.call("GET", "/apps")
    emit(args, apps, ("Id", "Label", "Description"), [(a["id"], a["label"], a["description"]) for a in apps])


def app_delete(c: Client, args: argparse.Namespace) -> None:
    c.call("DELETE", app_path(args))
    print(f"deleted application {args.app_id}")


# -- channel ---------------------------------------------------------------------------------------------------


def channel_update(c: Client, args: argparse.Namespace) -> None:
    ch = c.call("PUT", f"{app_path(args)}/channels/{quote(args.channel)}", {"version": args.version})
    emit(args, ch, ("Label", "Version"), [(ch["name"], ch["version"])])


def channel_list(c: Client, args: argparse.Namespace) -> None:
    chans = c.call("GET", f"{app_path(args)}/channels")
    emit(args, chans, ("Label", "Version"), [(ch["name"], ch["version"]) for ch in chans])


def channel_delete(c: Client, args: argparse.Namespace) -> None:
    c.call("DELETE", f"{app_path(args)}/channels/{quote(args.channel)}")
    print(f"deleted channel {args.channel}")


# -- package --------------------------------------------------------------------------------------------------

PACKAGE_HEADERS = ("Version", "Size", "Sha256", "Url")


def _package_row(p: dict[str, Any]) -> tuple[object, ...]:
    return (p["version"], p["size"], p["sha256"], p["url"])


def package_create(c: Client, args: argparse.Namespace) -> None:
    path = Path(args.file)
    try:
        digests = payload_digests(path)
    except OSError as exc:
        raise CliError(f"cannot read --file {path}: {exc.strerror or exc}") from None
    if args.public_key:
        try:
            key = Path(args.public_key).read_bytes()
        except OSError as exc:
            raise CliError(f"cannot read --public-key {args.public_key}: {exc.strerror or exc}") from None
        try:
            verify_payload_file(path, key)
        except UpdateEngineError as exc:
            raise CliError(f"--file {path} is not a valid payload signed by --public-key: {exc}") from None
        except OSError as exc:
            raise CliError(f"cannot read --file {path}: {exc.strerror or exc}") from None
    elif not args.no_verify:
        raise CliError("give --public-key PEM to check the payload's signature before it is offered "
                       "(or --no-verify to skip that check)", EXIT_USAGE)
    if args.url:
        package = c.call("POST", f"{app_path(args)}/packages", {
            "version": args.version, "url": args.url, "size": digests.size, "sha256": digests.sha256_b64,
            "sha1": digests.sha1_b64,
        })
    else:
        name = quote(path.name)
        try:
            payload = path.open("rb")
        except OSError as exc:
            raise CliError(f"cannot read --file {path}: {exc.strerror or exc}") from None
        with payload:  # sent a piece at a time: memory stays flat whatever the payload's size
            try:
                package = c.call("PUT", f"{app_path(args)}/packages/{quote(args.version)}/payload?file_name={name}",
                                 raw=file_body(payload), timeout=3600)
            except RequestBodyError as exc:
                raise CliError(f"--file {path} was not uploaded: {exc}") from None
        if package.get("sha256") != digests.sha256_b64:
            raise CliError(f"the server stored a payload with SHA-256 {package.get('sha256')}, not the file's "
                           f"{digests.sha256_b64}: the upload was damaged; delete the package and retry")
    emit(args, package, PACKAGE_HEADERS, [_package_row(package)])


def package_list(c: Client, args: argparse.Namespace) -> None:
    packages = c.call("GET", f"{app_path(args)}/packages")
    emit(args, packages, PACKAGE_HEADERS, [_package_row(p) for p in packages])


def package_delete(c: Client, args: argparse.Namespace) -> None:
    c.call("DELETE", f"{app_path(args)}/packages/{quote(args.version)}")
    print(f"deleted package {args.version}")


# -- group ----------------------------------------------------------------------------------------------------

GROUP_HEADERS = ("Label", "App", "Channel", "Id", "UpdatesPaused", "UpdateCount", "UpdateInterval", "Rollout")


def _group_row(g: dict[str, Any]) -> tuple[object, ...]:
    rollout = g.get("rollout")
    shown = "-"
    if rollout:
        shown = f"{rollout['version']}: {rollout['granted']} granted, {rollout['completed']} complete, " \
                f"{rollout['failed']} failed"
        if rollout.get("outcome"):
            shown += f", {rollout['outcome']} {when(rollout.get('ended_at'))}"
    paused = "true" if g["updates_paused"] else "false"
    if g["updates_paused"] and g["pause_reason"]:
        paused += f" ({g['pause_reason']})"
    return (g["name"], g["app_id"], g["channel"], g["id"], paused, g["update_count"], g["update_interval"], shown)


def _policy_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for flag in ("update_count", "update_interval", "update_timeout", "office_hours", "timezone",
                 "failure_pause_count", "failure_pause_fraction", "channel"):
        value = getattr(args, flag, None)
        if value is not None:
            body[flag] = value
    if args.safe_mode is not None:
        body["safe_mode"] = args.safe_mode
    if getattr(args, "no_failure_pause", False):
        body["failure_pause_count"] = None
        body["failure_pause_fraction"] = None
    return body


def group_create(c: Client, args: argparse.Namespace) -> None:
    body = _policy_body(args)
    body.update(id=args.group_id, name=args.label or args.group_id)
    group = c.call("POST", f"{app_path(args)}/groups", body)
    emit(args, group, GROUP_HEADERS, [_group_row(group)])


def group_update(c: Client, args: argparse.Namespace) -> None:
    body = _policy_body(args)
    if args.label:
        body["name"] = args.label
    if not body:
        raise CliError("nothing to change: give --channel, --update-count, --update-interval, … (see --help)",
                       EXIT_USAGE)
    group = c.call("PATCH", f"{app_path(args)}/groups/{quote(args.group_id)}", body)
    emit(args, group, GROUP_HEADERS, [_group_row(group)])


def group_pause(c: Client, args: argparse.Namespace) -> None:
    group = c.call("POST", f"{app_path(args)}/groups/{quote(args.group_id)}/pause", {"reason": args.reason or ""})
    emit(args, group, GROUP_HEADERS, [_group_row(group)])


def group_unpause(c: Client, args: argparse.Namespace) -> None:
    group = c.call("POST", f"{app_path(args)}/groups/{quote(args.group_id)}/unpause")
    emit(args, group, GROUP_HEADERS, [_group_row(group)])


def group_list(c: Client, args: argparse.Namespace) -> None:
    groups = c.call("GET", f"{app_path(args)}/groups")
    emit(args, groups, GROUP_HEADERS, [_group_row(g) for g in groups])


def group_delete(c: Client, args: argparse.Namespace) -> None:
    c.call("DELETE", f"{app_path(args)}/groups/{quote(args.group_id)}")
    print(f"deleted group {args.group_id}")


def group_versions(c: Client, args: argparse.Namespace) -> None:
    query = _query(start=args.start, end=args.end, resolution=args.resolution)
    data = c.call("GET", f"{app_path(args)}/groups/{quote(args.group_id)}/versions{query}")
    emit(args, data, ("Time", "Version", "Instances"),
         [(when(p["at"]), p["version"], p["instances"]) for p in data["points"]])


# -- instance ---------------------------------------------------------------------------------------------------

INSTANCE_HEADERS = ("MachineId", "Alias", "Ip", "Version", "Group", "Status", "LastCheck", "Granted")


def instance_list(c: Client, args: argparse.Namespace) -> None:
    query: dict[str, str] = {"limit": str(args.limit)}
    if args.group_id:
        query["group"] = args.group_id
    if args.status:
        query["status"] = args.status
    if args.version:
        query["version"] = args.version
    page = c.call("GET", f"{app_path(args)}/instances?{urllib.parse.urlencode(query)}")
    names = {g["id"]: g["name"] for g in c.call("GET", f"{app_path(args)}/groups")} if not args.json else {}
    emit(args, page, INSTANCE_HEADERS, [
        (i["machine_id"], i["alias"] or "-", i["ip"], i["version"], names.get(i["group_id"], i["group_id"]),
         i["status"], when(i["last_check_at"]), i["granted_version"])
        for i in page["instances"]
    ])
    if not args.json and page["total"] > len(page["instances"]):
        print(f"({page['total']} instances, {len(page['instances'])} shown; use --limit)", file=sys.stderr)


def _query(**values: object) -> str:
    """``?a=1&b=x`` of the values that are not None ('' when none is)."""
    given = {k: str(v) for k, v in values.items() if v is not None}
    return f"?{urllib.parse.urlencode(given)}" if given else ""


def instance_versions(c: Client, args: argparse.Namespace) -> None:
    counts = c.call("GET", f"{app_path(args)}/versions{_query(group=args.group_id, start=args.start, end=args.end)}")
    totals: dict[str, int] = {}
    for row in counts:
        totals[row["version"]] = totals.get(row["version"], 0) + row["instances"]
    rows = sorted(totals.items(), key=lambda kv: _version_sort_key(kv[0]), reverse=True)
    emit(args, counts, ("Version", "Instances"), rows)


UPDATE_HEADERS = ("AppID", "ClientID", "Version", "LastSeen", "Group", "Status", "OEM", "Granted")


def instance_updates(c: Client, args: argparse.Namespace) -> None:
    """The original's ``instance list-updates``: each instance whose latest update was granted in the window, with
    the version granted and where it stands; its columns, then when the grant was made."""
    query = _query(group=args.group_id, start=args.start, end=args.end, limit=args.limit)
    page = c.call("GET", f"{app_path(args)}/updates{query}")
    names = {g["id"]: g["name"] for g in c.call("GET", f"{app_path(args)}/groups")} if not args.json else {}
    emit(args, page, UPDATE_HEADERS, [
        (u["app_id"], u["machine_id"], u["granted_version"], when(u["last_check_at"]),
         names.get(u["group_id"], u["group_id"]), u["status"], u["oem"] or "-", when(u["granted_at"]))
        for u in page["updates"]
    ])
    if not args.json and page["total"] > len(page["updates"]):
        print(f"({page['total']} updates, {len(page['updates'])} shown; use --limit)", file=sys.stderr)


def _version_sort_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) if p.isdigit() else -1 for p in version.replace("-", ".").split("."))


def instance_show(c: Client, args: argparse.Namespace) -> None:
    inst = c.call("GET", f"{app_path(args)}/instances/{quote(args.machine_id)}")
    if args.json:
        print(json.dumps(inst, indent=2))
        return
    for key in ("machine_id", "alias", "ip", "version", "track", "group_id", "status", "error_code",
                "granted_version"):
        print(f"{key}: {inst[key] if inst[key] not in (None, '') else '-'}")
    for key in ("granted_at", "status_at", "first_seen_at", "last_check_at"):
        print(f"{key}: {when(inst[key])}")
    table(("Time", "Event", "ErrorCode", "Status"), [
        (when(e["at"]), f"{e['type']}/{e['result']}", e["error_code"], e["status"]) for e in inst["events"]
    ])


def instance_fake(c: Client, args: argparse.Namespace) -> None:
    """Simulated clients, as the original had: each checks in, takes an offered update at once, and reports
    download, install and the first check from the new version, printing one line per client and round."""
    omaha_url = f"{c.server}/v1/update/"
    rng = random.Random(args.seed)
    versions = {f"{{fake-client-{i:03d}}}": args.version for i in range(args.clients_per_app)}
    app_id = canonical_app_id(args.app_id, "--app-id")
    for round_number in range(args.rounds):
        for client, version in list(versions.items()):
            machine = client.strip("{}")
            answer = _omaha(c, omaha_url, machine, app_id, args.group_id, version,
                            "<ping active=\"1\"></ping><updatecheck></updatecheck>")
            try:
                parsed = omaha.parse_response(answer)
            except omaha.OmahaError as exc:
                raise CliError(f"{client}: the server's answer is not usable: {exc.message}",
                               EXIT_UNREACHABLE) from None
            if isinstance(parsed, omaha.NoUpdate):
                print(f"{client}: noupdate")
                continue
            for event in ('eventtype="13" eventresult="1"', 'eventtype="14" eventresult="1"',
                          'eventtype="3" eventresult="1"'):
                _omaha(c, omaha_url, machine, app_id, args.group_id, version, f"<event {event}></event>")
            _omaha(c, omaha_url, machine, app_id, args.group_id, parsed.version,
                   f'<updatecheck></updatecheck><event eventtype="3" eventresult="2" previousversion="{version}">'
                   "</event>")
            versions[client] = parsed.version
            print(f"{client}: updated from {version} to {parsed.version}")
        if round_number + 1 < args.rounds:
            time.sleep(rng.uniform(args.min_sleep, args.max_sleep))


def _omaha(c: Client, url: str, machine: str, app_id: str, group: str, version: str, body: str) -> bytes:
    request = (
        '<?xml version="1.0" encoding="UTF-8"?>\n<request protocol="3.0" version="updateservicectl-fake" '
        'updaterversion="updateservicectl-fake" installsource="scheduler" ismachine="1">'
        f'<app appid="{{{omaha.xml_escape(app_id)}}}" version="{omaha.xml_escape(version)}" '
        f'track="{omaha.xml_escape(group)}" machineid="{omaha.xml_escape(machine)}">{body}</app></request>\n'
    ).encode()
    try:
        response = c.http.request("POST", url, headers=[("Content-Type", "text/xml")], body=request, timeout=60)
    except HttpError as exc:
        raise CliError(f"cannot reach {url}: {exc}", EXIT_UNREACHABLE) from None
    if response.status != 200:
        raise CliError(f"{url}: {response.status}: {response.body[:200].decode(errors='replace')}",
                       EXIT_UNREACHABLE if response.status >= 500 else EXIT_FAILED)
    return response.body


# -- activity, watch --------------------------------------------------------------------------------------------


def activity_list(c: Client, args: argparse.Namespace) -> None:
    query = {"limit": str(args.limit)}
    if args.app_id:
        query["app"] = args.app_id
    if args.group_id:
        query["group"] = args.group_id
    entries = c.call("GET", f"/activity?{urllib.parse.urlencode(query)}")
    emit(args, entries, ("Time", "Kind", "Version", "Message"),
         [(when(a["at"]), a["kind"], a["version"], a["message"]) for a in entries])


def watch(c: Client, args: argparse.Namespace) -> None:
    """Run PROGRAM with UPDATE_SERVICE_* variables now and whenever the group's channel moves."""
    if not args.program:
        raise CliError("give the PROGRAM to run when the group's version changes", EXIT_USAGE)
    seen: str | None = None
    runs = 0
    while args.max_runs is None or runs < args.max_runs:
        group = c.call("GET", f"{app_path(args)}/groups/{quote(args.group_id)}")
        channels = {ch["name"]: ch["version"] for ch in c.call("GET", f"{app_path(args)}/channels")}
        version = channels.get(group["channel"]) or ""
        if version != seen:
            seen = version
            env = dict(os.environ, UPDATE_SERVICE_APP_ID=group["app_id"], UPDATE_SERVICE_GROUP_ID=group["id"],
                       UPDATE_SERVICE_GROUP=group["name"], UPDATE_SERVICE_CHANNEL=group["channel"],
                       UPDATE_SERVICE_VERSION=version)
            try:
                result = subprocess.run(args.program, env=env, check=False)
            except OSError as exc:
                raise CliError(f"cannot run {args.program[0]}: {exc.strerror or exc}") from None
            runs += 1
            if result.returncode != 0:
                print(f"{PROG}: {args.program[0]} exited {result.returncode} for version {version}", file=sys.stderr)
        if args.max_runs is not None and runs >= args.max_runs:
            break
        time.sleep(args.interval)


# -- command line ----------------------------------------------------------------------------------------------


def _time(text: str) -> float:
    """A time on the command line: seconds since the epoch (the original's), or UTC ISO 8601 (2024-05-01T04:00Z)."""
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            raise argparse.ArgumentTypeError(f"{text!r} is not a time")
        return seconds
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither seconds since the epoch nor an ISO 8601 time such as 2024-05-01T04:00:00Z"
        ) from None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


def _time_flags(sp: argparse.ArgumentParser, start: str, end: str) -> None:
    sp.add_argument("--start", type=_time, metavar="TIME", help=f"epoch seconds or ISO 8601 UTC (default {start})")
    sp.add_argument("--end", type=_time, metavar="TIME", help=f"epoch seconds or ISO 8601 UTC (default {end})")


def _bool(text: str) -> bool:
    try:
        return parse_bool(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not true or false") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Manage a coreupdate server: applications, channels, "
                                "packages, groups and instances.")
    p.add_argument("--server", default=os.environ.get("UPDATECTL_SERVER") or DEFAULT_SERVER,
                   help=f"server URL (UPDATECTL_SERVER; default {DEFAULT_SERVER})")
    p.add_argument("--key", default=os.environ.get("UPDATECTL_KEY", ""), help="API token (UPDATECTL_KEY)")
    p.add_argument("--user", help="the original's user name: not supported (a token names its owner), refused")
    p.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")
    top = p.add_subparsers(dest="noun", required=True)

    def noun(name: str, help_text: str) -> argparse._SubParsersAction[argparse.ArgumentParser]:
        return top.add_parser(name, help=help_text).add_subparsers(dest="verb", required=True)

    def verb(parent: argparse._SubParsersAction[argparse.ArgumentParser], name: str, fn: Any, help_text: str,
             *, app: bool = True, app_required: bool = True) -> argparse.ArgumentParser:
        sp = parent.add_parser(name, help=help_text)
        sp.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
        if app:
            sp.add_argument("--app-id", required=app_required, help="application id, with or without braces")
        sp.set_defaults(fn=fn)
        return sp

    app = noun("app", "applications")
    sp = verb(app, "create", app_create, "create an application")
    sp.add_argument("--label", default="")
    sp.add_argument("--description", default="")
    sp = verb(app, "update", app_update, "change an application's label or description")
    sp.add_argument("--label")
    sp.add_argument("--description")
    verb(app, "list", app_list, "list applications", app=False)
    verb(app, "delete", app_delete, "delete an application with its packages, channels and groups")

    ch = noun("channel", "channels")
    for name in ("create", "update"):
        sp = verb(ch, name, channel_update, f"{name} a channel pointing at a package version")
        sp.add_argument("--channel", required=True)
        sp.add_argument("--version", required=True)
    verb(ch, "list", channel_list, "list channels")
    verb(ch, "delete", channel_delete, "delete a channel").add_argument("--channel", required=True)

    pk = noun("package", "packages")
    sp = verb(pk, "create", package_create, "add a package from a payload file (size and hashes read from it)")
    sp.add_argument("--version", required=True)
    sp.add_argument("--file", required=True, help="the payload (update.gz)")
    sp.add_argument("--url", help="where nodes download it; without it the file is uploaded to the server")
    sp.add_argument("--public-key", help="PEM key the payload's signature must verify with")
    sp.add_argument("--no-verify", action="store_true", help="do not check the signature here")
    sp.add_argument("--meta", help="the original's metadata file: not supported (the payload's signature covers "
                                   "its metadata), refused")
    verb(pk, "list", package_list, "list packages")
    verb(pk, "delete", package_delete, "delete a package").add_argument("--version", required=True)

    gr = noun("group", "groups")

    def policy_flags(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--update-count", type=int, help="grants per interval (and in flight at once)")
        sp.add_argument("--update-interval", type=int, help="the interval, in seconds")
        sp.add_argument("--update-timeout", type=int, help="seconds before a grant in flight counts as timed out")
        sp.add_argument("--safe-mode", type=_bool, metavar="true|false")
        sp.add_argument("--office-hours", help="windows, e.g. 'Mon-Fri 09:00 8h; Sat 10:00 2h' ('' for always)")
        sp.add_argument("--timezone", help="IANA zone of the office hours, e.g. Europe/Berlin")
        sp.add_argument("--failure-pause-count", type=int, help="pause the rollout after this many failures")
        sp.add_argument("--failure-pause-fraction", type=float, help="… or when this fraction of grants failed")

    sp = verb(gr, "create", group_create, "create a group")
    sp.add_argument("--group-id", required=True)
    sp.add_argument("--label")
    sp.add_argument("--channel", required=True)
    policy_flags(sp)
    sp = verb(gr, "update", group_update, "change a group's channel or rollout policy")
    sp.add_argument("--group-id", required=True)
    sp.add_argument("--label")
    sp.add_argument("--channel")
    sp.add_argument("--no-failure-pause", action="store_true", help="remove the failure thresholds")
    policy_flags(sp)
    sp = verb(gr, "pause", group_pause, "pause the group's updates")
    sp.add_argument("--group-id", required=True)
    sp.add_argument("--reason", help="shown with the group and in the activity log")
    verb(gr, "unpause", group_unpause, "resume the group's updates").add_argument("--group-id", required=True)
    verb(gr, "list", group_list, "list groups")
    verb(gr, "delete", group_delete, "delete a group").add_argument("--group-id", required=True)
    sp = verb(gr, "versions", group_versions, "instances per version over time")
    sp.add_argument("--group-id", required=True)
    _time_flags(sp, "a week before --end", "now")
    sp.add_argument("--resolution", type=int, choices=(3600, 86400), help="seconds per row (default 3600)")

    ins = noun("instance", "instances")
    sp = verb(ins, "list", instance_list, "list instances")
    sp.add_argument("--group-id")
    sp.add_argument("--status", help="Undefined, UpdateGranted, Error, Complete, Installed, Downloaded, "
                                     "Downloading, OnHold, RolledBack")
    sp.add_argument("--version")
    sp.add_argument("--limit", type=int, default=1000)
    sp = verb(ins, "list-app-versions", instance_versions, "instances per version")
    sp.add_argument("--group-id")
    _time_flags(sp, "any: only instances last seen from then on", "any: … up to then")
    sp = verb(ins, "list-updates", instance_updates,
              "instances whose latest update was granted in a time window, with where each stands")
    sp.add_argument("--group-id")
    _time_flags(sp, "a week before --end", "now")
    sp.add_argument("--limit", type=int, default=1000)
    sp = verb(ins, "show", instance_show, "one instance with its latest events")
    sp.add_argument("--machine-id", required=True)
    sp = verb(ins, "fake", instance_fake, "simulated clients that check in and update")
    sp.add_argument("--group-id", required=True)
    sp.add_argument("--version", required=True, help="the version the clients start from")
    sp.add_argument("--clients-per-app", type=int, default=10)
    sp.add_argument("--min-sleep", type=float, default=1.0)
    sp.add_argument("--max-sleep", type=float, default=5.0)
    sp.add_argument("--rounds", type=int, default=1, help="check-ins per client (default 1)")
    sp.add_argument("--seed", type=int)

    act = noun("activity", "the activity log")
    sp = verb(act, "list", activity_list, "rollout decisions, newest first", app_required=False)
    sp.add_argument("--group-id")
    sp.add_argument("--limit", type=int, default=50)

    sp = top.add_parser("watch", help="run PROGRAM whenever a group's version changes")
    sp.add_argument("--app-id", default=COREOS_APP_ID)
    sp.add_argument("--group-id", required=True)
    sp.add_argument("--interval", type=float, default=10.0, help="seconds between polls (default 10)")
    sp.add_argument("--max-runs", type=int, help="exit after running PROGRAM this many times")
    sp.add_argument("program", nargs=argparse.REMAINDER)
    sp.set_defaults(fn=watch)
    return p


def refuse_unsupported(args: argparse.Namespace) -> None:
    """The original's options this server has no use for: a CliError saying why, rather than doing nothing."""
    token_hint = "give the API token alone with --key or UPDATECTL_KEY (coreupdate token create --name NAME)"
    if args.user is not None:
        raise CliError(f"--user is not supported: coreupdate's API tokens name their owner; drop it and {token_hint}",
                       EXIT_USAGE)
    if os.environ.get("UPDATECTL_USER"):
        raise CliError("UPDATECTL_USER is set, but a user name is not supported: coreupdate's API tokens name their "
                       f"owner; unset it and {token_hint}", EXIT_USAGE)
    if getattr(args, "meta", None) is not None:
        raise CliError("--meta is not supported: this server sends nodes no MetadataSize or MetadataSignatureRsa; "
                       "the payload's own signature, checked here with --public-key and by every node, covers its "
                       "metadata; drop --meta", EXIT_USAGE)


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        try:
            args = _parser().parse_args(argv)
        except SystemExit as exc:
            return int(exc.code or 0) if exc.code in (0, None) else EXIT_USAGE
        refuse_unsupported(args)
        client = Client(args.server, args.key)
        try:
            args.fn(client, args)
        finally:
            client.http.close()
        return 0

    return run_cli(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
