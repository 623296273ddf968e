"""A small asyncio HTTP/1.1 client: JSON requests with keep-alive, streamed responses, proxies, TLS.

The I/O shell around ``coreos_common.http1`` for the daemons. It is what locksmithd needs to talk to etcd's v3
gateway and to FleetLock servers, and no more, because locksmithd must idle under its unit's ``MemoryHigh=32M``
(aiohttp alone costs ~13 MiB; this costs next to nothing beyond asyncio).

Rules of this file:

* ``request`` sends one request and returns the whole response, bounded by ``max_body`` (1 MiB unless the
  caller needs more) and by ``timeout`` for everything (connecting, proxy tunnel, TLS, sending, receiving).
* ``stream`` is for responses that go on (etcd watches) or are large (a payload download): a connection of its
  own, never pooled, closed when the ``async with`` ends. Reads of it are bounded in time by the caller, and in
  size by ``read_size`` (what the socket is read by, and about what one ``read`` returns).
* Connections are kept alive and reused per origin (and proxy), at most ``max_idle`` of them idle. A request
  on a reused connection that the server had closed meanwhile (nothing at all came back) is sent once more on
  a new connection; nothing else is retried here.
* Every failure is an ``http1.HttpError``: HttpUnreachable for connections (refused, reset, timed out, TLS),
  HttpProtocolError for answers that are not HTTP, ResponseTooLarge past a bound. Non-2xx statuses are answers,
  not errors: the caller decides what they mean.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import AsyncIterator, Callable, Mapping, Sequence

from coreos_common.http1 import (
    BodyPiece,
    EndOfMessage,
    HttpError,
    HttpUnreachable,
    Origin,
    Proxy,
    Response,
    ResponseHead,
    ResponseParser,
    WholeResponseReader,
    check_tunnel,
    describe_os_error,
    prepare_request,
    tunnel_request,
)

DEFAULT_MAX_BODY = 1 << 20
_READ_SIZE = 65536


HttpResponse = Response


class _Connection:
    """One TCP (or TLS) connection and what it has delivered of the current response."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, reused: bool = False,
        read_size: int = _READ_SIZE,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.reused = reused
        self.read_size = read_size

    def usable(self) -> bool:
        return not self.reader.at_eof() and not self.writer.is_closing()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def events(self, parser: ResponseParser) -> list[object]:
        """Read once and feed the parser; the events that completed (an empty list means read again)."""
        data = await self.reader.read(self.read_size)
        return list(parser.feed(data) if data else parser.feed_eof())

    async def read(self) -> bytes:
        return await self.reader.read(self.read_size)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class HttpStream:
    """A response whose body is read piece by piece as it arrives."""

    def __init__(self, head: ResponseHead, connection: _Connection, parser: ResponseParser, first: bytes) -> None:
        self.head = head
        self._connection = connection
        self._parser = parser
        self._pending = first
        self._ended = parser.done

    async def read(self, timeout: float | None = None) -> bytes | None:
        """The body bytes that arrived next (at least one byte), or None once the body has ended.

        Raises TimeoutError when nothing arrives within ``timeout``, HttpError when the connection breaks.
        """
        if self._pending:
            data, self._pending = self._pending, b""
            return data
        while not self._ended:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns a read that completed in the same
            # instant as a cancel, and the cancel is lost (a download went on after SIGTERM).
            try:
                async with asyncio.timeout(timeout):
                    events = await self._connection.events(self._parser)
            except TimeoutError:
                raise  # an OSError too, but the caller's to judge: nothing came within its time
            except (OSError, EOFError) as exc:
                raise HttpUnreachable(describe_os_error(exc)) from None
            data = b"".join(e.data for e in events if isinstance(e, BodyPiece))
            self._ended = any(isinstance(e, EndOfMessage) for e in events)
            if data:
                return data
        return None


class HttpClient:
    """Requests to a few origins over kept-alive connections; ``close`` when done."""

    def __init__(
        self,
        *,
        ssl_context: Callable[[], ssl.SSLContext] | None = None,
        connect_timeout: float = 10.0,
        environ: Mapping[str, str] | None = None,
        user_agent: str = "",
        max_idle: int = 4,
    ) -> None:
        """``ssl_context`` makes the context for https origins (called once, when first needed; the system's
        default verifying context without it); ``environ`` is where proxy settings are read."""
        self._make_ssl_context = ssl_context or ssl.create_default_context
        self._ssl_context: ssl.SSLContext | None = None
        self._connect_timeout = connect_timeout
        self._environ = os.environ if environ is None else environ
        self._user_agent = user_agent
        self._max_idle = max_idle
        self._idle: dict[tuple[Origin, Proxy | None], list[_Connection]] = {}
        self._streams: set[_Connection] = set()

    def _tls(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = self._make_ssl_context()
        return self._ssl_context

    async def _open(self, origin: Origin, proxy: Proxy | None, read_size: int = _READ_SIZE) -> _Connection:
        """A new connection to ``origin`` (through ``proxy``: plain for http, a CONNECT tunnel for https).

        The stream buffers up to twice ``read_size`` before it stops reading the socket."""
        tls = origin.scheme == "https"
        try:
            async with asyncio.timeout(self._connect_timeout):
                if proxy is None:
                    reader, writer = await asyncio.open_connection(
                        origin.host, origin.port, ssl=self._tls() if tls else None,
                        server_hostname=origin.host if tls else None, limit=read_size,
                    )  # fmt: skip
                    return _Connection(reader, writer, read_size=read_size)
                reader, writer = await asyncio.open_connection(proxy.origin.host, proxy.origin.port, limit=read_size)
                connection = _Connection(reader, writer, read_size=read_size)
                if tls:
                    await self._tunnel(connection, origin, proxy)
                    await writer.start_tls(self._tls(), server_hostname=origin.host)
                return connection
        except TimeoutError:
            raise HttpUnreachable("timed out connecting") from None
        except (OSError, EOFError, ssl.SSLError) as exc:
            via = f" (through proxy {proxy.origin.url})" if proxy is not None else ""
            raise HttpUnreachable(describe_os_error(exc) + via) from None

    async def _tunnel(self, connection: _Connection, origin: Origin, proxy: Proxy) -> None:
        await connection.send(tunnel_request(origin, proxy))
        tunnel = WholeResponseReader(method="CONNECT", max_body=0)
        while not tunnel.feed(await connection.read()):
            pass
        try:
            check_tunnel(tunnel.response().head, proxy)
        except HttpUnreachable:
            connection.close()
            raise

    def _prepare(
        self, method: str, url: str, headers: Sequence[tuple[str, str]], body: bytes | None
    ) -> tuple[Origin, Proxy | None, bytes]:
        prepared = prepare_request(method, url, headers, body, self._environ, self._user_agent)
        return prepared.origin, prepared.proxy, prepared.message

    async def _checkout(self, origin: Origin, proxy: Proxy | None) -> _Connection:
        idle = self._idle.get((origin, proxy), [])
        while idle:
            connection = idle.pop()
            if connection.usable():
                connection.reused = True
                return connection
            connection.close()
        return await self._open(origin, proxy)

    def _checkin(self, origin: Origin, proxy: Proxy | None, connection: _Connection) -> None:
        idle = self._idle.setdefault((origin, proxy), [])
        if len(idle) < self._max_idle:
            idle.append(connection)
        else:
            connection.close()

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes | None = None,
        timeout: float = 30.0,
        max_body: int | None = DEFAULT_MAX_BODY,
    ) -> HttpResponse:
        """Send one request and read the whole response (at most ``max_body`` bytes of body)."""
        origin, proxy, message = self._prepare(method, url, headers, body)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    connection = await self._checkout(origin, proxy)
                    reader = WholeResponseReader(method=method, max_body=max_body)
                    try:
                        await connection.send(message)
                        while not reader.feed(await connection.read()):
                            pass
                    except (OSError, EOFError, HttpUnreachable) as exc:
                        connection.close()
                        if connection.reused and reader.received == 0:
                            continue  # the server had closed this idle connection: once more on a new one
                        reason = exc.args[0] if isinstance(exc, HttpUnreachable) else describe_os_error(exc)
                        raise HttpUnreachable(reason) from None
                    except BaseException:
                        connection.close()
                        raise
                    if reader.reusable:
                        self._checkin(origin, proxy, connection)
                    else:
                        connection.close()
                    return reader.response()
        except TimeoutError:
            raise HttpUnreachable(f"timed out after {timeout:g}s") from None

    @contextlib.asynccontextmanager
    async def stream(
        self,
        method: str,
        url: str,
        *,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes | None = None,
        timeout: float = 30.0,
        read_size: int = _READ_SIZE,
    ) -> AsyncIterator[HttpStream]:
        """Send one request on a connection of its own and hand over the response once its head arrived
        (within ``timeout``); the body is read from the HttpStream. The connection closes with the block."""
        origin, proxy, message = self._prepare(method, url, headers, body)
        connection: _Connection | None = None
        try:
            async with asyncio.timeout(timeout):
                connection = await self._open(origin, proxy, read_size)
                self._streams.add(connection)
                parser = ResponseParser(method=method)
                pieces: list[bytes] = []
                await connection.send(message)
                while parser.head is None:
                    for event in await connection.events(parser):
                        if isinstance(event, BodyPiece):
                            pieces.append(event.data)
        except TimeoutError:
            if connection is not None:
                connection.close()
                self._streams.discard(connection)
            raise HttpUnreachable(f"no answer within {timeout:g}s") from None
        except (OSError, EOFError) as exc:
            if connection is not None:
                connection.close()
                self._streams.discard(connection)
            raise HttpUnreachable(describe_os_error(exc)) from None
        except BaseException:
            if connection is not None:
                connection.close()
                self._streams.discard(connection)
            raise
        assert parser.head is not None
        try:
            yield HttpStream(parser.head, connection, parser, b"".join(pieces))
        finally:
            connection.close()
            self._streams.discard(connection)

    @property
    def open_streams(self) -> int:
        """Streamed responses not closed yet."""
        return len(self._streams)

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every connection, idle or streaming."""
        connections = [c for idle in self._idle.values() for c in idle] + list(self._streams)
        self._idle.clear()
        self._streams.clear()
        for connection in connections:
            connection.close()
        for connection in connections:
            with contextlib.suppress(Exception):
                await connection.writer.wait_closed()


__all__ = ["DEFAULT_MAX_BODY", "HttpClient", "HttpError", "HttpResponse", "HttpStream"]
