"""Signing in and out.

Rules: the sign-in form carries a CSRF token that must match a ``coreupdate_login`` cookie set with the form
(double submit: there is no session yet); failed attempts are counted per user name and per address
(``ratelimit.py``: 5 per user and 30 per address in 15 minutes) and refused with 429 past the limit, before the
password is even checked; an unknown name costs the same scrypt time as a wrong password; a stored hash weaker
than today's parameters is replaced at a successful sign-in.  Each decision is one log line with the user and
the address.  Signing out deletes the session on the server, not only the cookie.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time

from aiohttp import web

from coreupdate import accounts
from coreupdate.web.common import SECURITY_HEADERS, SESSION_COOKIE, SESSION_LIFETIME_S, Ctx, Dashboard, safe_next
from coreupdate.web.ratelimit import FailureLimiter

log = logging.getLogger("coreupdate.web")

LOGIN_COOKIE = "coreupdate_login"
USER_FAILURES, ADDRESS_FAILURES, FAILURE_WINDOW_S = 5, 30, 900.0


class SignIn:
    def __init__(self, dash: Dashboard) -> None:
        self.dash = dash
        self.by_user = FailureLimiter(USER_FAILURES, FAILURE_WINDOW_S, time.monotonic)
        self.by_address = FailureLimiter(ADDRESS_FAILURES, FAILURE_WINDOW_S, time.monotonic)

    def _form(self, request: web.Request, *, status: int = 200, error: str = "", name: str = "") -> web.Response:
        token = secrets.token_urlsafe(24)
        response = self.dash.render("login.html", status, csrf_token=token, error=error, name=name,
                                    next=safe_next(request.query.get("next")), session=None)
        response.set_cookie(LOGIN_COOKIE, token, httponly=True, samesite="Strict", path="/login",
                            secure=self.dash.secure_cookies(request), max_age=3600)
        return response

    async def show(self, request: web.Request) -> web.StreamResponse:
        if await self.dash.session(request) is not None:
            return self.dash.redirect(safe_next(request.query.get("next")))
        return self._form(request)

    async def submit(self, request: web.Request) -> web.StreamResponse:
        data = await request.post()
        form = {k: v for k, v in data.items() if isinstance(v, str)}
        name, password = form.get("name", "").strip(), form.get("password", "")
        address = self.dash.client_address(request)
        cookie = request.cookies.get(LOGIN_COOKIE, "")
        token = form.get("csrf_token", "")
        if not cookie or not token or not hmac.compare_digest(cookie.encode(), token.encode()):
            log.warning("Sign-in form from %s refused: missing or stale security token", address)
            return self._form(request, status=403, name=name,
                              error="The form was refused: its security token is missing or out of date. "
                                    "Submit it again.")
        wait = max(self.by_user.retry_after(name.lower()), self.by_address.retry_after(address))
        if wait > 0:
            log.warning("Sign-in of user %s from %s refused: too many failed attempts; next try in %.0f s",
                        name, address, wait)
            return self._form(request, status=429, name=name,
                              error=f"Too many failed sign-ins for this user or address. Try again in "
                                    f"{max(1, round(wait / 60))} minute(s).")
        record = await self.dash.server.db(self.dash.accounts.find_user, name)
        stored = record.password_hash if record else accounts.dummy_hash()
        ok = await self.dash.server.db(accounts.verify_password, password, stored)
        if record is None or not ok:
            self.by_user.failed(name.lower())
            self.by_address.failed(address)
            log.warning("Sign-in of user %s from %s refused: wrong user name or password", name, address)
            return self._form(request, status=401, name=name, error="Wrong user name or password.")
        self.by_user.succeeded(name.lower())
        if accounts.needs_rehash(record.password_hash):
            new_hash = await self.dash.server.db(accounts.hash_password, password)
            await self.dash.server.db(self.dash.accounts.set_password, record.user.name, new_hash, end_sessions=False)
        cookie_value, _session = await self.dash.server.db(self.dash.accounts.create_session, record.user,
                                                           SESSION_LIFETIME_S)
        log.info("User %s (%s) signed in from %s", record.user.name, record.user.role, address)
        response = self.dash.redirect(safe_next(form.get("next")))
        response.set_cookie(SESSION_COOKIE, cookie_value, httponly=True, samesite="Strict", path="/",
                            secure=self.dash.secure_cookies(request), max_age=int(SESSION_LIFETIME_S))
        response.del_cookie(LOGIN_COOKIE, path="/login")
        return response

    async def sign_out(self, request: web.Request, ctx: Ctx) -> web.StreamResponse:
        cookie = request.cookies.get(SESSION_COOKIE, "")
        await self.dash.server.db(self.dash.accounts.end_session, cookie)
        log.info("User %s signed out", ctx.session.user.name)
        response = web.Response(status=303, headers={"Location": "/login", **SECURITY_HEADERS})
        response.del_cookie(SESSION_COOKIE, path="/")
        return response
