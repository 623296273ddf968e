"""``coreupdate serve``: the aiohttp shell around the catalog, the grant rules, the storage and the API.

Theory of operation.  The database is only touched from worker threads (``db``).  The catalog (apps,
packages, channels, groups, token hashes) lives in memory and is reloaded when ``meta.catalog_version``
moves: at once after this server's own changes, within ``catalog_poll`` seconds after another server's.  The
Omaha endpoint answers from it and asks the database only for grants; check-ins and events are written
behind (``writer.py``).  Background tasks: catalog polling, the hourly version snapshot (every ten minutes,
so a restart loses little), retention pruning (hourly).  SIGTERM/SIGINT: stop accepting, flush the
write-behind queue, close the database.

Errors: a database that does not answer gives 503 for the request that needed it (the pool reconnects by
itself when it is back); bad input gives 400 with the field named; nothing else is shown as a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from coreos_common.notify import SystemdNotifier
from coreupdate import api
from coreupdate import web as web_ui
from coreupdate.catalog import Catalog
from coreupdate.metrics import CONTENT_TYPE, Metrics
from coreupdate.model import DAY
from coreupdate.office_hours import parse_office_hours
from coreupdate.omaha_endpoint import DatabaseUnavailable, OmahaService
from coreupdate.policy import OfficeHours
from coreupdate.storage.engine import is_unavailable
from coreupdate.storage.store import CheckIn, EventRecord, GrantOutcome, RecordOutcome, Store
from coreupdate.writer import WriteBehind
from update_engine import omaha

log = logging.getLogger(__name__)

T = TypeVar("T")
OMAHA_BODY_LIMIT = omaha.MAX_MESSAGE_BYTES
SNAPSHOT_EVERY_S = 600.0
PRUNE_EVERY_S = 3600.0
INSTANCE_GAUGE_TTL_S = 30.0


@dataclass
class ServerConfig:
    data_dir: Path
    public_url: str | None = None  # how nodes reach this server; default: from each request's Host header
    payload_public_key: bytes | None = None  # uploads must be signed by this key when given
    max_payload_bytes: int = 4 << 30
    events_retention_s: float = 30 * DAY
    history_retention_s: float = 90 * DAY
    instances_retention_s: float = 180 * DAY
    behind_tls_proxy: bool = False  # browsers reach the dashboard through a TLS proxy: Secure cookies
    history_resolution_s: float = 3600.0  # the period of the versions-over-time snapshots
    catalog_poll_s: float = 1.0
    writer_interval_s: float = 0.25
    db_threads: int = 4
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def package_dir(self) -> Path:
        return self.data_dir / "packages"


class Server:
    def __init__(self, config: ServerConfig, store: Store) -> None:
        self.config = config
        self.store = store
        self.metrics = Metrics()
        self.executor = ThreadPoolExecutor(max_workers=config.db_threads, thread_name_prefix="db")
        self._catalog = Catalog()
        self._office_hours: dict[str, OfficeHours | None] = {}
        self.writer = WriteBehind(
            self._record, interval=config.writer_interval_s, on_outcome=self._recorded,
        )
        self.omaha = OmahaService(
            catalog=lambda: self._catalog, office_hours=lambda: self._office_hours, grant=self._grant,
            writer=self.writer, metrics=self.metrics, on_group_paused=self.catalog_changed,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._reload_lock = asyncio.Lock()
        # (app, version) of the uploads being received: a second one of the same version is refused at once.
        self.uploads_in_progress: set[tuple[str, str]] = set()
        self._instance_rows: tuple[float, list[tuple[str, str, str, str, int]]] = (0.0, [])
        self.metrics.add_instance_collector(self._instance_gauge_rows)

    # -- database access ---------------------------------------------------------------------------------

    async def db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a Store call in a worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(fn, *args, **kwargs))

    async def _grant(self, checkin: CheckIn, group_id: str) -> GrantOutcome:
        return await self.db(self.store.try_grant, checkin, group_id, office_hours=self._office_hours.get(group_id))

    async def _record(self, checkins: list[CheckIn], events: list[EventRecord]) -> RecordOutcome:
        return await self.db(self.store.record, checkins, events)

    def _recorded(self, outcome: RecordOutcome) -> None:
        for message in outcome.completed_rollouts:
            log.info("Activity: %s", message)
        if outcome.paused_groups:
            log.warning("Rollout paused automatically in group(s) %s: failures passed the threshold (see the "
                        "activity log)", ", ".join(outcome.paused_groups))
            self.catalog_changed()

    # -- catalog -----------------------------------------------------------------------------------------

    @property
    def catalog(self) -> Catalog:
        return self._catalog

    async def reload_catalog(self) -> None:
        async with self._reload_lock:
            catalog = await self.db(self.store.load_catalog)
            hours: dict[str, OfficeHours | None] = {}
            for group in catalog.groups.values():
                try:
                    hours[group.id] = parse_office_hours(group.policy.office_hours, group.policy.timezone)
                except ValueError as exc:  # stored before a validation change: treat as closed, say so
                    log.error("Group %s has office hours %r that cannot be used (%s): no grants until they are "
                              "fixed", group.name, group.policy.office_hours, exc)
                    hours[group.id] = _Closed()
            self._catalog = catalog
            self._office_hours = hours
            self.omaha.forget_refusals()

    def catalog_changed(self) -> None:
        """Reload soon (after this server's own change or an automatic pause)."""
        task = asyncio.get_running_loop().create_task(self._reload_quietly())
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    async def _reload_quietly(self) -> None:
        try:
            await self.reload_catalog()
        except Exception as exc:
            log.warning("Cannot reload the catalog: %s", str(exc).splitlines()[0])

    async def _poll_catalog(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.config.catalog_poll_s)
            try:
                version = await self.db(self.store.catalog_version)
                if version != self._catalog.version:
                    await self.reload_catalog()
                if failing:
                    log.info("The database answers again")
                failing = False
            except Exception as exc:
                if not failing:
                    log.warning("Cannot read the database (%s): serving the last known catalog; retrying every "
                                "%.0f s", str(exc).splitlines()[0], self.config.catalog_poll_s)
                failing = True

    async def _every(self, period: float, what: str, job: Callable[[], Awaitable[object]]) -> None:
        while True:
            try:
                await job()
            except Exception as exc:
                log.warning("%s failed (%s); next try in %.0f s", what, str(exc).splitlines()[0], period)
            await asyncio.sleep(period)

    async def _prune(self) -> None:
        counts = await self.db(
            self.store.prune, events_older_than=self.config.events_retention_s,
            history_older_than=self.config.history_retention_s,
            instances_older_than=self.config.instances_retention_s,
        )
        if any(counts.values()):
            log.info("Retention: deleted %s", ", ".join(f"{n} {what}" for what, n in counts.items() if n))

    def _instance_gauge_rows(self) -> list[tuple[str, str, str, str, int]]:
        at, rows = self._instance_rows
        if time.monotonic() - at < INSTANCE_GAUGE_TTL_S:
            return rows
        names = {g.id: g.name for g in self._catalog.groups.values()}
        rows = []
        for app_id in self._catalog.apps:
            for c in self.store.version_counts(app_id):
                group = names.get(c["group_id"], c["group_id"] or "")
                rows.append((app_id, group, c["version"], c["status"], c["instances"]))
        self._instance_rows = (time.monotonic(), rows)
        return rows

    # -- HTTP --------------------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=OMAHA_BODY_LIMIT, middlewares=[self._errors])
        app.router.add_post("/v1/update", self.handle_update)
        app.router.add_post("/v1/update/", self.handle_update)
        app.router.add_get("/v1/packages/{app_id}/{version}/{file_name}", self.handle_package)
        app.router.add_get("/metrics", self.handle_metrics)
        app.router.add_get("/health", self.handle_health)
        api.add_routes(app, self)
        web_ui.add_routes(app, self)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
        started = time.perf_counter()
        endpoint = request.match_info.route.resource.canonical if request.match_info.route.resource else "other"
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except Exception as exc:
            if is_unavailable(exc):
                log.warning("%s %s: database unavailable (%s)", request.method, request.path,
                            str(exc).splitlines()[0])
                return web.json_response({"error": "the database is unavailable; retry later"}, status=503)
            log.exception("%s %s failed", request.method, request.path)
            return web.json_response({"error": f"internal error: {type(exc).__name__}"}, status=500)
        finally:
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)

    def base_url(self, request: web.Request) -> str:
        return self.config.public_url or f"{request.scheme}://{request.host}"

    async def handle_update(self, request: web.Request) -> web.Response:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            self.metrics.omaha_refused.labels("too-large").inc()
            log.warning("Omaha request from %s refused: body over %d bytes", request.remote, OMAHA_BODY_LIMIT)
            raise
        try:
            answer = await self.omaha.answer(body, request.remote or "", self.base_url(request))
        except omaha.OmahaError as exc:
            self.metrics.omaha_refused.labels("malformed").inc()
            log.warning("Omaha request from %s refused: %s", request.remote, exc.message)
            return web.Response(status=400, text=f"Bad Omaha request: {exc.message}\n")
        except DatabaseUnavailable as exc:
            self.metrics.omaha_refused.labels("database-unavailable").inc()
            log.warning("Omaha request from %s: database unavailable for a grant decision (%s); answered 503",
                        request.remote, exc)
            return web.Response(status=503, text="The update server's database is unavailable; retry later\n")
        self.metrics.omaha_requests.labels("answered").inc()
        return web.Response(body=answer, content_type="text/xml", charset="utf-8")

    async def handle_package(self, request: web.Request) -> web.StreamResponse:
        app_id, version, name = (request.match_info[k] for k in ("app_id", "version", "file_name"))
        package = self._catalog.packages.get((app_id, version))
        if package is None or package.url is not None or package.file_name != name:
            raise web.HTTPNotFound(text=f"no stored package {app_id}/{version}/{name}\n")
        path = self.config.package_dir / app_id / version / name
        if not path.is_file():
            log.error("Package %s %s is in the catalog but its file %s is missing", app_id, version, path)
            raise web.HTTPNotFound(text=f"package file {name} is missing on the server\n")
        return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})

    async def handle_metrics(self, request: web.Request) -> web.Response:
        body = await asyncio.get_running_loop().run_in_executor(self.executor, self.metrics.render)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def handle_health(self, request: web.Request) -> web.Response:
        try:
            await self.db(self.store.catalog_version)
        except Exception as exc:
            return web.json_response({"status": "database unavailable", "detail": str(exc).splitlines()[0]},
                                     status=503)
        return web.json_response({"status": "ok", "pending_writes": self.writer.pending})

    # -- life cycle --------------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.reload_catalog()
        self.writer.start()
        loop = asyncio.get_running_loop()
        self._tasks += [
            loop.create_task(self._poll_catalog(), name="catalog-poll"),
            loop.create_task(self._every(min(SNAPSHOT_EVERY_S, self.config.history_resolution_s), "Version snapshot",
                                         lambda: self.db(self.store.snapshot_versions,
                                                         self.config.history_resolution_s)), name="snapshot"),
            loop.create_task(self._every(PRUNE_EVERY_S, "Retention pruning", self._prune), name="prune"),
        ]

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.writer.close()
        self.executor.shutdown(wait=True)
        self.store.engine.dispose()


class _Closed:
    """Office hours that cannot be parsed: never open (fail closed)."""

    def contains(self, now: object) -> bool:
        return False


async def serve(server: Server, host: str, port: int, *, ready: Callable[[str], None] | None = None) -> None:
    """Run until SIGTERM or SIGINT."""
    await server.start()
    runner = web.AppRunner(server.app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    shown = f"[{host}]" if ":" in host else host
    log.info("Serving Omaha on http://%s:%d/v1/update/, the API on /api/v1/ and the dashboard on / "
             "(%d application(s), %d group(s))",
             shown, port, len(server.catalog.apps), len(server.catalog.groups))
    notifier = SystemdNotifier()
    notifier.ready(f"Serving on {shown}:{port}")
    watchdog = loop.create_task(notifier.run_watchdog(), name="watchdog")
    if ready is not None:
        ready(f"http://{shown}:{port}")
    try:
        await stop.wait()
    finally:
        notifier.stopping()
        log.info("Stopping: flushing %d pending write(s)", server.writer.pending)
        watchdog.cancel()
        await runner.cleanup()
        await server.stop()

