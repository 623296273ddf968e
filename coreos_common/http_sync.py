"""A blocking HTTP/1.1 client for one-shot commands: the same messages as ``http_async``, over plain sockets.

``locksmithctl status`` must answer in tens of milliseconds, and importing asyncio alone costs more than that
here; ``http.client`` brings the email package. This shell drives ``coreos_common.http1`` with ``socket``
(and ``ssl`` only when an https origin is reached), so a command pays only for what it uses.

Rules of this file: the same as ``http_async``'s — every response bounded by ``max_body`` and every request by
``timeout`` (each blocking step gets what is left of it), kept-alive connections reused per origin and a
request retried once only when a reused connection turned out closed before any byte came back, every failure
an ``http1.HttpError``, proxies from the environment.  A body may also be streamed (``file_body``: an upload
read a piece at a time, so memory stays flat whatever its size); when the server stops reading it and closes
(it answered early: 401, 413…), that answer is returned if it arrived whole.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, BinaryIO

from coreos_common.http1 import (
    HttpError,
    HttpUnreachable,
    Origin,
    Proxy,
    Response,
    StreamedBody,
    WholeResponseReader,
    check_tunnel,
    checked_pieces,
    describe_os_error,
    prepare_request,
    tunnel_request,
)

if TYPE_CHECKING:
    import ssl

DEFAULT_MAX_BODY = 1 << 20
_READ_SIZE = 65536
FILE_PIECE = 1 << 20


def file_body(file: BinaryIO, *, piece_size: int = FILE_PIECE) -> StreamedBody:
    """The rest of an open file, from where it stands now, as a streamed request body read ``piece_size`` bytes
    at a time; its length is what the file holds now (a file that changes meanwhile fails the request)."""
    start = file.tell()
    length = os.fstat(file.fileno()).st_size - start

    def pieces() -> Iterator[bytes]:
        file.seek(start)
        while piece := file.read(piece_size):
            yield piece

    return StreamedBody(length, pieces)


SyncResponse = Response


class SyncHttpClient:
    """Blocking requests over kept-alive sockets; ``close`` when done."""

    def __init__(
        self,
        *,
        ssl_context: Callable[[], ssl.SSLContext] | None = None,
        environ: Mapping[str, str] | None = None,
        user_agent: str = "",
    ) -> None:
        self._make_ssl_context = ssl_context
        self._ssl_context: ssl.SSLContext | None = None
        self._environ = os.environ if environ is None else environ
        self._user_agent = user_agent
        self._idle: dict[tuple[Origin, Proxy | None], socket.socket] = {}

    def _tls(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            if self._make_ssl_context is not None:
                self._ssl_context = self._make_ssl_context()
            else:
                import ssl

                self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    def _open(self, origin: Origin, proxy: Proxy | None, deadline: float) -> socket.socket:
        target = proxy.origin if proxy is not None else origin
        sock: socket.socket | None = None
        try:
            sock = _connect(target.host, target.port, deadline)
            if proxy is not None and origin.scheme == "https":
                sock.sendall(tunnel_request(origin, proxy))
                tunnel = WholeResponseReader(method="CONNECT", max_body=0)
                while not tunnel.feed(_recv(sock, deadline)):
                    pass
                check_tunnel(tunnel.response().head, proxy)
            if origin.scheme == "https":
                sock.settimeout(_left(deadline))
                sock = self._tls().wrap_socket(sock, server_hostname=origin.host)
            return sock
        except HttpUnreachable:
            if sock is not None:
                sock.close()
            raise
        except (OSError, EOFError) as exc:
            if sock is not None:
                sock.close()
            via = f" (through proxy {proxy.origin.url})" if proxy is not None else ""
            raise HttpUnreachable(describe_os_error(exc) + via) from None

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes | StreamedBody | None = None,
        timeout: float = 30.0,
        max_body: int | None = DEFAULT_MAX_BODY,
    ) -> SyncResponse:
        """Send one request and read the whole response (at most ``max_body`` bytes of body).  A StreamedBody is
        sent a piece at a time; RequestBodyError when it cannot be read or its length is not the announced one."""
        deadline = time.monotonic() + timeout
        prepared = prepare_request(method, url, headers, body, self._environ, self._user_agent)
        origin, proxy, message = prepared.origin, prepared.proxy, prepared.message
        key = (origin, proxy)
        while True:
            sock = self._idle.pop(key, None)
            reused = sock is not None
            if sock is None:
                sock = self._open(origin, proxy, deadline)
            reader = WholeResponseReader(method=method, max_body=max_body)
            sending_body = False
            try:
                sock.settimeout(_left(deadline))
                sock.sendall(message)
                if prepared.stream is not None:
                    sending_body = True
                    for piece in checked_pieces(prepared.stream):
                        sock.settimeout(_left(deadline))
                        sock.sendall(piece)
                    sending_body = False
                while not reader.feed(_recv(sock, deadline)):
                    pass
            except (OSError, EOFError, HttpUnreachable) as exc:
                early = _early_answer(sock, reader, deadline) if sending_body else None
                sock.close()
                if early is not None:
                    return early
                if reused and reader.received == 0:
                    continue
                reason = exc.args[0] if isinstance(exc, HttpUnreachable) else describe_os_error(exc)
                raise HttpUnreachable(reason) from None
            except BaseException:
                sock.close()
                raise
            if reader.reusable:
                old = self._idle.pop(key, None)
                if old is not None:
                    old.close()
                self._idle[key] = sock
            else:
                sock.close()
            return reader.response()

    def close(self) -> None:
        for sock in self._idle.values():
            with contextlib.suppress(OSError):
                sock.close()
        self._idle.clear()


def _connect(host: str, port: int, deadline: float) -> socket.socket:
    """``socket.create_connection``, but an ASCII host goes to getaddrinfo as bytes: as text it is first
    encoded with the IDNA codec, whose import (unicodedata, stringprep) costs a command more than its request."""
    name: str | bytes = host.encode("ascii") if host.isascii() else host
    failure: OSError | None = None
    for family, kind, proto, _, address in socket.getaddrinfo(name, port, 0, socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(_left(deadline))
            sock.connect(address)
            return sock
        except OSError as exc:
            sock.close()
            failure = exc
    raise failure if failure is not None else OSError(f"{host} has no address")


def _early_answer(sock: socket.socket, reader: WholeResponseReader, deadline: float) -> Response | None:
    """The whole response a server sent before it stopped reading the body and closed, if it can still be read."""
    try:
        while not reader.feed(_recv(sock, deadline)):
            pass
    except (OSError, EOFError, HttpError):
        return None
    return reader.response()


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("timed out")
    return left


def _recv(sock: socket.socket, deadline: float) -> bytes:
    sock.settimeout(_left(deadline))
    return sock.recv(_READ_SIZE)
