"""``update-engine-devserver``: a small Omaha v3 server for tests, the demo and labs.

It offers one payload per track to every client whose version is older, serves the payload with Range support,
logs each event a client reports and exposes them at ``GET /events`` as JSON, so a test or an operator can see
what the fleet did.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from aiohttp import web

from coreos_common import logs
from update_engine import omaha
from update_engine.errors import describe
from update_engine.payload.files import payload_digests

log = logging.getLogger("update-engine-devserver")

OMAHA_BODY_LIMIT = 1 << 20


@dataclass(frozen=True)
class Release:
    """One payload offered on one track."""

    track: str | None  # None: every track
    version: str
    path: Path
    size: int
    sha256_b64: str
    sha1_b64: str

    @property
    def name(self) -> str:
        return self.path.name

    @classmethod
    def from_file(cls, path: Path, version: str, track: str | None) -> Release:
        digests = payload_digests(path)
        return cls(track, version, path, digests.size, digests.sha256_b64, digests.sha1_b64)


@dataclass(frozen=True)
class RecordedEvent:
    """An event as a client reported it, with who and when."""

    time: float
    machine_id: str
    app_version: str
    track: str
    event_type: int
    event_result: int
    error_code: int | None
    error_name: str | None
    previous_version: str | None


def event_name(event_type: int, event_result: int) -> str:
    """``UPDATE_DOWNLOAD_STARTED/SUCCESS``: the names of an event's type and result (numbers the codec does not know
    stay numbers)."""

    def name(kind: type[omaha.EventType] | type[omaha.EventResult], value: int) -> str:
        try:
            return kind(value).name
        except ValueError:
            return str(value)

    return f"{name(omaha.EventType, event_type)}/{name(omaha.EventResult, event_result)}"


class DevServer:
    """The request handlers; state is the list of releases and the events received."""

    def __init__(self, releases: list[Release], *, base_url: str | None = None, payload_backoff: bool = False) -> None:
        self.releases = releases
        self.base_url = base_url
        # Like go-omaha's trivial server, offers say DisablePayloadBackoff="true" unless asked otherwise.
        self.payload_backoff = payload_backoff
        self.events: list[RecordedEvent] = []
        self.checks = 0

    def release_for(self, track: str) -> Release | None:
        exact = [r for r in self.releases if r.track == track]
        if exact:
            return exact[0]
        anytrack = [r for r in self.releases if r.track is None]
        return anytrack[0] if anytrack else None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=OMAHA_BODY_LIMIT)
        app.router.add_post("/v1/update", self.handle_update)
        app.router.add_post("/v1/update/", self.handle_update)
        app.router.add_get("/events", self.handle_events)
        app.router.add_get("/packages/{name}", self.handle_package)
        return app

    async def handle_update(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            parsed = omaha.parse_request(body)
        except omaha.OmahaError as exc:
            log.warning("Bad Omaha request from %s: %s", request.remote, exc)
            return web.Response(status=400, text="Bad Omaha Request\n")
        base = self.base_url or f"{request.scheme}://{request.host}/packages/"
        apps = []
        for app in parsed.apps:
            for ev in app.events:
                self._record(app, ev)
            update: omaha.PayloadOffer | str | None = None
            if app.update_check:
                self.checks += 1
                update = self._answer(app, base)
            apps.append(
                omaha.AppResponse(app_id=app.app_id, ping=app.ping, events=len(app.events), updatecheck=update)
            )
        return web.Response(body=omaha.build_response(apps), content_type="text/xml", charset="utf-8")

    def _answer(self, app: omaha.RequestApp, base: str) -> omaha.PayloadOffer | str:
        release = self.release_for(app.track)
        try:
            older = release is not None and omaha.version_less(app.version, release.version)
        except ValueError:
            older = False
        if release is None or not older:
            log.info("Update check from %s: version %s track %s → noupdate", app.machine_id or "?", app.version,
                     app.track)
            return omaha.NOUPDATE
        log.info("Update check from %s: version %s track %s → offer %s (%d bytes)", app.machine_id or "?",
                 app.version, app.track, release.version, release.size)
        return omaha.PayloadOffer(
            version=release.version, codebases=(base,), package_name=release.name, size=release.size,
            sha256_b64=release.sha256_b64, sha1_b64=release.sha1_b64, disable_payload_backoff=not self.payload_backoff,
        )

    def _record(self, app: omaha.RequestApp, ev: omaha.RequestEvent) -> None:
        name = describe(ev.error_code) if ev.error_code is not None else None
        rec = RecordedEvent(
            time=time.time(), machine_id=app.machine_id, app_version=app.version, track=app.track,
            event_type=ev.type, event_result=ev.result, error_code=ev.error_code, error_name=name,
            previous_version=ev.previous_version,
        )
        self.events.append(rec)
        extra = f" errorcode={ev.error_code} ({name})" if ev.error_code is not None else ""
        log.info("Event from %s (version %s): %d/%d %s%s", app.machine_id or "?", app.version, ev.type,
                 ev.result, event_name(ev.type, ev.result), extra)

    async def handle_events(self, request: web.Request) -> web.Response:
        return web.json_response([asdict(e) for e in self.events])

    async def handle_package(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        for release in self.releases:
            if release.name == name:
                # FileResponse implements Range (206) and HEAD.
                return web.FileResponse(release.path, headers={"Content-Type": "application/octet-stream"})
        raise web.HTTPNotFound(text=f"no payload named {name}\n")


def parse_releases(argv_releases: list[tuple[str, str, str | None]]) -> list[Release]:
    out = []
    for payload, version, track in argv_releases:
        path = Path(payload)
        if not path.is_file():
            raise SystemExit(f"update-engine-devserver: payload {payload} does not exist")
        omaha.version_less(version, version)  # validates the version string
        out.append(Release.from_file(path, version, track))
    return out


def _parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[tuple[str, str, str | None]]]:
    parser = argparse.ArgumentParser(
        prog="update-engine-devserver",
        description="Serve update payloads over Omaha v3. Repeat --payload/--version/--track for several tracks.",
    )
    parser.add_argument("--payload", action="append", default=[], help="payload file (CrAU)")
    parser.add_argument("--version", action="append", default=[], help="version of the preceding payload")
    parser.add_argument("--track", action="append", default=[], help="track (group) of the preceding payload")
    parser.add_argument("--listen", default="127.0.0.1:8000", help="HOST:PORT (default 127.0.0.1:8000)")
    parser.add_argument("--base-url", help="codebase URL for payloads (default http://<Host header>/packages/)")
    parser.add_argument(
        "--payload-backoff",
        action="store_true",
        help='leave out DisablePayloadBackoff="true", so that clients back off a payload that keeps failing',
    )
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if not args.payload:
        parser.error("at least one --payload is required")
    if len(args.version) != len(args.payload):
        parser.error("give exactly one --version per --payload")
    if args.track and len(args.track) != len(args.payload):
        parser.error("give either no --track or one per --payload")
    tracks: list[str | None] = list(args.track) if args.track else [None] * len(args.payload)
    return args, list(zip(args.payload, args.version, tracks, strict=True))


async def serve(server: DevServer, host: str, port: int, ready: asyncio.Event | None = None) -> None:
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    log.info("Serving %d payload(s) on http://%s:%d/v1/update/", len(server.releases), host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    args, entries = _parse_args(argv)
    logs.setup("update-engine-devserver", verbose=args.verbose)
    host, _, port_text = args.listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        print(f"update-engine-devserver: --listen {args.listen!r} is not HOST:PORT", file=sys.stderr)
        return 2
    try:
        releases = parse_releases(entries)
    except ValueError as exc:
        print(f"update-engine-devserver: {exc}", file=sys.stderr)
        return 2
    for r in releases:
        log.info("Release %s on track %s: %s, %d bytes, sha256 %s", r.version, r.track or "*", r.path, r.size,
                 r.sha256_b64)
    asyncio.run(serve(DevServer(releases, base_url=args.base_url, payload_backoff=args.payload_backoff), host, port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
