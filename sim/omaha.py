"""The Omaha stub: an Omaha server and payload host in the caller's event loop, honest by default, hostile on demand.

By default it answers every update check with ``offer`` (when the client's version is older) and serves
``payload`` with Range support. Hooks make it misbehave the way the fault tests need: ``omaha`` and ``package``
replace the two handlers (any status, body, pace or redirect), an :class:`Offer` can lie about the payload it
announces (size, hash, codebase), ``throttle`` paces the payload so a test can act in the middle of a download,
and ``on_sent`` is called after every payload write. ``checks``, ``requests``, ``events`` and ``bytes_sent`` say
what clients did. With ``tls`` the same routes are also served over https on a second port.

Rules: it listens on 127.0.0.1 on ports the kernel picks; start it with ``async with OmahaStub(...) as stub`` (or
``await stub.start()`` / ``await stub.stop()`` in a ``finally``); stopping closes open connections after at most
half a second. The stub only stands in for a server under a test's control; the product's own dev server, which
labs use, is :mod:`sim.devserver`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType

from aiohttp import web

from sim.tls import ServerTls
from update_engine import omaha

KIB = 1024
MIB = 1024 * KIB
APP_ID = "{e96281a6-d1af-4bde-9a0a-97b76e56dc57}"
DEFAULT_CLIENT_VERSION = "1.0.0"  # assumed for a request the stub cannot parse

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Offer:
    """What the Omaha answer announces; every field can lie about the payload actually served."""

    version: str
    size: int
    sha256_b64: str
    codebase: str | None = None  # default: this server's /packages/
    package_name: str = "update.gz"


@dataclass
class OmahaStub:
    """An Omaha server and payload host on 127.0.0.1, running in the caller's event loop (see the module)."""

    payload: bytes = field(default=b"", repr=False)
    offer: Offer | None = None
    omaha: Handler | None = None
    package: Handler | None = None
    throttle: int | None = None  # bytes per 10 ms
    tls: ServerTls | None = None
    checks: int = 0
    requests: int = 0
    events: list[tuple[int, int, int | None]] = field(default_factory=list)
    bytes_sent: int = 0
    on_sent: Callable[[int], None] | None = None  # called with bytes_sent after every payload write
    port: int = 0
    tls_port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base}/v1/update/"

    @property
    def https_base(self) -> str:
        if not self.tls_port:
            raise RuntimeError("this Omaha stub serves no https (start it with tls=…)")
        return f"https://127.0.0.1:{self.tls_port}"

    @property
    def https_url(self) -> str:
        return f"{self.https_base}/v1/update/"

    async def start(self) -> OmahaStub:
        app = web.Application(client_max_size=4 * MIB)
        app.router.add_post("/v1/update/", self._omaha)
        app.router.add_get("/packages/{name}", self._package)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        try:
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            self.port = int(self._runner.addresses[0][1])
            if self.tls is not None:
                tls_site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.tls.server_context())
                await tls_site.start()
                self.tls_port = int(self._runner.addresses[1][1])
        except BaseException:
            await self.stop()
            raise
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> OmahaStub:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def answer(self, version: str) -> bytes:
        """The honest Omaha answer to a client at ``version``."""
        offer = self.offer
        if offer is None or not omaha.version_less(version, offer.version):
            app = omaha.AppResponse(app_id=APP_ID, updatecheck=omaha.NOUPDATE)
        else:
            app = omaha.AppResponse(
                app_id=APP_ID,
                updatecheck=omaha.PayloadOffer(
                    version=offer.version, codebases=(offer.codebase or f"{self.base}/packages/",),
                    package_name=offer.package_name, size=offer.size, sha256_b64=offer.sha256_b64,
                    disable_payload_backoff=True,
                ),
            )
        return omaha.build_response([app])

    async def _omaha(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        body = await request.read()
        version = DEFAULT_CLIENT_VERSION
        with contextlib.suppress(omaha.OmahaError):
            parsed = omaha.parse_request(body)
            for app in parsed.apps:
                version = app.version or version
                self.checks += int(app.update_check)
                self.events.extend((e.type, e.result, e.error_code) for e in app.events)
        if self.omaha is not None:
            return await self.omaha(request)
        return web.Response(body=self.answer(version), content_type="text/xml")

    async def _package(self, request: web.Request) -> web.StreamResponse:
        if self.package is not None:
            return await self.package(request)
        return await serve_bytes(request, self.payload, self)


async def serve_bytes(request: web.Request, data: bytes, stub: OmahaStub | None = None) -> web.StreamResponse:
    """``data`` with Range support, paced by ``stub.throttle`` and counted in ``stub.bytes_sent``."""
    start = 0
    status = 200
    if request.http_range.start is not None:
        start = request.http_range.start
        status = 206
    body = data[start:]
    resp = web.StreamResponse(status=status, headers={"Content-Type": "application/octet-stream"})
    resp.content_length = len(body)
    if status == 206:
        resp.headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
    await resp.prepare(request)
    step = stub.throttle if stub is not None and stub.throttle else 256 * KIB
    try:
        for pos in range(0, len(body), step):
            await resp.write(body[pos : pos + step])
            if stub is not None:
                stub.bytes_sent += len(body[pos : pos + step])
                if stub.on_sent is not None:
                    stub.on_sent(stub.bytes_sent)
                if stub.throttle:
                    await asyncio.sleep(0.01)
        await resp.write_eof()
    except (ConnectionError, asyncio.CancelledError):
        pass
    return resp
