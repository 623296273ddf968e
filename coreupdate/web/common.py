"""The dashboard's plumbing: templates, sessions, the checks every page and form goes through.

Rules, for every route that ``Dashboard.page`` wraps:

1. the ``coreupdate_session`` cookie must name a live session, else a GET is sent to ``/login?next=…`` and a
   POST is refused (303 to the sign-in page);
2. a POST must carry the session's CSRF token in its ``csrf_token`` field (compared in constant time), else 403;
3. a route that changes something (``change=True``) needs the ``admin`` role, else 403 with a page that says so;
4. something that does not exist is a 404 page; the database being away a 503 page that says to retry; any
   other failure a 500 page (the traceback goes to the journal, never to the browser).

Every answer of a page says how long the server took in a ``Server-Timing`` header (``total``; ``cpu``, the
process's CPU time meanwhile, which is the request's own when nothing else runs; and what the handler measured
itself, such as ``instances``).  Every HTML answer carries a strict Content-Security-Policy
(scripts and styles only from ``/static/``, no inline code), ``X-Frame-Options: DENY``, ``nosniff`` and
``Referrer-Policy: same-origin``.  The session cookie is ``HttpOnly; SameSite=Strict; Path=/``, and ``Secure``
when the request came over TLS or the server was told it is behind a TLS proxy.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import jinja2
from aiohttp import web
from markupsafe import Markup, escape

from coreupdate.storage.accounts import AccountStore, Session
from coreupdate.storage.dashboard import DashboardQueries, GroupCounts
from coreupdate.storage.engine import is_unavailable
from coreupdate.web import present

if TYPE_CHECKING:
    from coreupdate.server import Server

log = logging.getLogger("coreupdate.web")

HERE = Path(__file__).parent
SESSION_COOKIE = "coreupdate_session"
SESSION_LIFETIME_S = 12 * 3600.0
LIVE_REFRESH_S = 5
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                               "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True)
class Ctx:
    """What a page handler gets besides the request: who is signed in, and the posted form."""

    session: Session
    form: Mapping[str, str]


PageHandler = Callable[[web.Request, Ctx], Awaitable[web.StreamResponse]]


# request[TIMINGS]: milliseconds a handler measured (e.g. its instance table's query), sent with the total in a
# Server-Timing header, which the page-speed bench reads.
TIMINGS = "coreupdate.timings"


def measured(request: web.Request, name: str, started: float) -> None:
    request.setdefault(TIMINGS, {})[name] = (time.perf_counter() - started) * 1000


class Forbidden(Exception):
    """Refuse the request with a 403 page that says why."""


def _time(epoch: float | None) -> Markup:
    """A ``<time>`` in UTC; the page's script shows it in the viewer's zone and keeps UTC in the title."""
    if epoch is None:
        return Markup("never")
    text = present.utc_text(epoch)
    return Markup(f'<time datetime="{present.utc_iso(epoch)}" title="{escape(text)}">{escape(text)}</time>')


class Dashboard:
    def __init__(self, server: Server) -> None:
        self.server = server
        engine, clock = server.store.engine, server.store.clock
        self.accounts = AccountStore(engine, clock=clock)
        self.queries = DashboardQueries(engine, clock=clock)
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True, undefined=jinja2.StrictUndefined,
            trim_blocks=True, lstrip_blocks=True,
        )
        self._counts_cache: dict[tuple[str, ...] | None, tuple[float, dict[str, GroupCounts]]] = {}
        self.templates.globals.update(time=_time, error_name=present.error_name, refresh_s=LIVE_REFRESH_S)

    # -- shared reads ------------------------------------------------------------------------------------

    async def fleet_counts(self, request: web.Request, group_ids: list[str] | None) -> dict[str, GroupCounts]:
        """``DashboardQueries.fleet_counts``; a page's live refresh (``X-Live-Refresh: 1``) may share a result
        younger than ``LIVE_REFRESH_S`` with the other viewers' refreshes, a page load always asks the database."""
        key = None if group_ids is None else tuple(sorted(group_ids))
        live = request.headers.get("X-Live-Refresh") == "1"
        cached = self._counts_cache.get(key)
        if live and cached is not None and time.monotonic() - cached[0] < LIVE_REFRESH_S:
            return cached[1]
        counts = await self.server.db(self.queries.fleet_counts, group_ids)
        if len(self._counts_cache) > 1000:
            self._counts_cache.clear()
        self._counts_cache[key] = (time.monotonic(), counts)
        return counts

    # -- answers -----------------------------------------------------------------------------------------

    def render(self, template: str, status: int = 200, **values: Any) -> web.Response:
        values.setdefault("nav_apps", sorted(self.server.catalog.apps.values(), key=lambda a: a.label.lower()))
        body = self.templates.get_template(template).render(**values)
        return web.Response(text=body, status=status, content_type="text/html", charset="utf-8",
                            headers=SECURITY_HEADERS)

    def message(self, status: int, title: str, text: str, session: Session | None = None) -> web.Response:
        return self.render("message.html", status, title=title, text=text, session=session)

    @staticmethod
    def redirect(location: str) -> web.Response:
        return web.Response(status=303, headers={"Location": location, **SECURITY_HEADERS})

    def secure_cookies(self, request: web.Request) -> bool:
        return request.secure or bool(self.server.config.behind_tls_proxy)

    def client_address(self, request: web.Request) -> str:
        """The browser's address; behind a TLS proxy, the last address its X-Forwarded-For added."""
        if self.server.config.behind_tls_proxy:
            forwarded = request.headers.get("X-Forwarded-For", "")
            if forwarded.strip():
                return forwarded.split(",")[-1].strip()
        return request.remote or ""

    # -- the checks of the module docstring ------------------------------------------------------------

    async def session(self, request: web.Request) -> Session | None:
        cookie = request.cookies.get(SESSION_COOKIE)
        if not cookie:
            return None
        return await self.server.db(self.accounts.session, cookie)

    def page(self, handler: PageHandler, *, change: bool = False, form: bool = True
             ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """Wrap a handler with rules 1-4; ``form=False``: the handler reads the body itself (an upload) and
        checks the CSRF token with ``check_csrf``."""

        async def wrapped(request: web.Request) -> web.StreamResponse:
            started, cpu_started = time.perf_counter(), time.process_time()
            session: Session | None = None
            try:
                session = await self.session(request)
                if session is None:
                    if request.method == "GET":
                        return self.redirect(f"/login?next={_quote(request.path_qs)}")
                    return self.redirect("/login")
                posted: Mapping[str, str] = {}
                if request.method == "POST":
                    if change and not session.user.role.can_change:
                        raise Forbidden(f"Your account {session.user.name} is a {session.user.role} account: it may "
                                        "look at everything but change nothing. Ask an admin to make the change.")
                    if form:
                        data = await request.post()
                        posted = {k: v for k, v in data.items() if isinstance(v, str)}
                        self.check_csrf(session, posted.get("csrf_token", ""))
                response = await handler(request, Ctx(session, posted))
            except Forbidden as exc:
                log.warning("%s %s refused for %s: %s", request.method, request.path,
                            session.user.name if session else "nobody", exc)
                return self.message(403, "Not allowed", str(exc), session)
            except web.HTTPNotFound:
                return self.message(404, "Not found", "There is no such application, group, instance or channel "
                                                      "(it may have been deleted).", session)
            except web.HTTPException:
                raise
            except Exception as exc:
                if is_unavailable(exc):
                    log.warning("%s %s: database unavailable (%s)", request.method, request.path,
                                str(exc).splitlines()[0])
                    return self.message(503, "Database unavailable",
                                        "The update server cannot reach its database. Reload the page in a moment.")
                log.exception("%s %s failed", request.method, request.path)
                return self.message(500, "Something went wrong",
                                    f"The server could not show this page ({type(exc).__name__}); the server's "
                                    "journal has the details.", session)
            total_ms = (time.perf_counter() - started) * 1000
            cpu_ms = (time.process_time() - cpu_started) * 1000  # all threads: ~this request's when alone
            timings = {**request.get(TIMINGS, {}), "cpu": cpu_ms, "total": total_ms}
            response.headers["Server-Timing"] = ", ".join(f"{k};dur={v:.1f}" for k, v in timings.items())
            log.debug("%s %s rendered in %.1f ms", request.method, request.path_qs, total_ms)
            return response

        return wrapped

    @staticmethod
    def check_csrf(session: Session, token: str) -> None:
        if not token or not hmac.compare_digest(token.encode(), session.csrf_token.encode()):
            raise Forbidden("The form was refused: its security token is missing or out of date. Reload the page "
                            "and submit it again.")


def _quote(path: str) -> str:
    return quote(path, safe="")


def safe_next(value: str | None) -> str:
    """Where to go after signing in: a path on this server only (no ``//host`` or scheme)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value
