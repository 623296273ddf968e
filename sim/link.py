"""A slow network link: an HTTP hop in front of a server that paces answer bodies at a fixed rate.

On loopback a download of a few MiB is over before anyone can watch it; the link makes its progress visible (the
demo) and makes "the middle of a download" last long enough to act in. Requests and answers pass unchanged
otherwise: the Host header too, so that the server's payload URLs point back through the link, and Range requests
with their 206 answers.

Rules: it listens on 127.0.0.1 on a free port and forwards to ``upstream`` only; no redirect is followed; it is an
async context manager (or ``start``/``stop``) whose exit closes the listener and its client session.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

import aiohttp
from aiohttp import web

from sim.ports import free_port


class SlowLink:
    """Forwards to ``upstream``, answer bodies at ``rate`` bytes/s."""

    REQUEST_HEADERS = ("Host", "Range", "If-Range", "Content-Type", "User-Agent", "Accept")
    ANSWER_HEADERS = ("Content-Type", "Content-Length", "Content-Range", "Content-Encoding", "Accept-Ranges",
                      "Last-Modified", "ETag")  # fmt: skip
    CHUNK = 64 << 10

    def __init__(self, upstream: str, rate: int) -> None:
        self.upstream = upstream.rstrip("/")
        self.rate = rate
        self.port = free_port()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> SlowLink:
        timeout = aiohttp.ClientTimeout(total=None)
        self._session = aiohttp.ClientSession(auto_decompress=False, timeout=timeout)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        headers = {k: request.headers[k] for k in self.REQUEST_HEADERS if k in request.headers}
        body = await request.read()
        async with self._session.request(
            request.method, f"{self.upstream}{request.rel_url}", headers=headers, data=body or None,
            allow_redirects=False,
        ) as upstream:  # fmt: skip
            answer = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name in self.ANSWER_HEADERS:
                if name in upstream.headers:
                    answer.headers[name] = upstream.headers[name]
            await answer.prepare(request)
            async for chunk in upstream.content.iter_chunked(self.CHUNK):
                await answer.write(chunk)
                await asyncio.sleep(len(chunk) / self.rate)
            await answer.write_eof()
            return answer

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> SlowLink:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
