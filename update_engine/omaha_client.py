"""The Omaha POST: update checks, pings and events to the update server, over ``coreos_common.http_async``.

Rules of this file:

* Follows ``http_rules``: an http(s) URL with a host, at most ``MAX_REDIRECTS`` redirects that never leave http(s)
  nor downgrade https, an answer of at most 1 MiB (refused unread when it announces more), everything within
  ``omaha_total_timeout``, connecting within ``connect_timeout``.
* Only a 2xx answer has a body worth parsing; any other status is an ``HttpError`` with code 2000 + status (the
  original's). No answer at all is code 2000 with the reason in words ("connection refused", "timed out").
* Proxy variables of the environment are not used, as for the payload download (``http``).
* It does not use aiohttp: a node spends its life between update checks, and the check itself needs no more than
  a small HTTP/1.1 client (aiohttp costs ~13 MiB of RSS; it is loaded only to download a payload).
"""

from __future__ import annotations

from types import TracebackType

from coreos_common.http1 import HttpUnreachable, ResponseTooLarge
from coreos_common.http_async import HttpClient
from update_engine.errors import ErrorCode, http_error_code
from update_engine.http_rules import (
    MAX_REDIRECTS,
    OMAHA_BODY_LIMIT,
    REDIRECT_STATUSES,
    HttpError,
    HttpLimits,
    check_url,
    host_of,
    redirect_target,
)


class OmahaClient:
    """One update server conversation (a check, its events); ``async with`` closes its connections."""

    def __init__(self, limits: HttpLimits) -> None:
        self._limits = limits
        self._http = HttpClient(connect_timeout=limits.connect_timeout, environ={}, max_idle=1)

    async def __aenter__(self) -> OmahaClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._http.close()

    async def post(self, url: str, body: bytes) -> bytes:
        """POST an Omaha request; the body (≤ 1 MiB) of a 2xx answer, else HttpError."""
        check_url(url, what="Omaha server URL")
        current = url
        for _ in range(MAX_REDIRECTS + 1):
            try:
                response = await self._http.request(
                    "POST", current, headers=[("Content-Type", "text/xml")], body=body,
                    timeout=self._limits.omaha_total_timeout, max_body=OMAHA_BODY_LIMIT,
                )
            except ResponseTooLarge:
                raise HttpError(
                    ErrorCode.OMAHA_REQUEST_XML_PARSE_ERROR,
                    f"Omaha response from {host_of(current)} exceeds the 1 MiB limit",
                ) from None
            except HttpUnreachable as exc:
                raise HttpError(http_error_code(None), f"Omaha server {host_of(current)} unreachable: {exc}") from None
            except (OSError, ValueError) as exc:  # a URL the client cannot use (a port out of range, …)
                raise HttpError(http_error_code(None), f"Omaha server {host_of(current)} unreachable: {exc}") from None
            status = response.status
            if status in REDIRECT_STATUSES:
                current = redirect_target(current, response.head.header("location"))
                continue
            if not 200 <= status < 300:
                raise HttpError(
                    http_error_code(status), f"Omaha server {host_of(current)} answered HTTP {status}", status=status
                )
            return response.body
        raise HttpError(ErrorCode.OMAHA_REQUEST_ERROR, f"more than {MAX_REDIRECTS} redirects from {url}")
