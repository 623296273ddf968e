"""HTTP/1.1 client messages without I/O: request bytes, an incremental response parser, proxies from the environment.

The node daemons talk to a handful of small JSON services (etcd's v3 gateway and v2 API, FleetLock servers).
A general HTTP library costs more memory than locksmithd may use (aiohttp alone is ~13 MiB), so this module
holds what such a client needs, as pure code that two thin shells drive: ``coreos_common.http_async`` (asyncio
streams, for the daemons) and ``coreos_common.http_sync`` (blocking sockets, for one-shot commands that must
start fast).

Rules of this file:

* No sockets, files or clocks. The parser is fed bytes and returns events; the shells do the reading.
* Every response is bounded: its head (status line and headers) by ``MAX_HEAD``, its body by the caller's
  ``max_body`` (None only for streams, whose consumers bound each message themselves). Exceeding a bound is a
  ResponseTooLarge naming the limit, never a silent truncation.
* A request body is bytes, or a ``StreamedBody`` (an upload too large to hold in memory): its length is
  announced in ``Content-Length`` and the shell sends its pieces as they come (``checked_pieces``), never more
  or fewer bytes than announced.
* Framing follows RFC 9112: a body is delimited by ``Transfer-Encoding: chunked``, else by ``Content-Length``,
  else by the end of the connection; responses to HEAD and statuses 1xx/204/304 have none. A connection is
  reused only after a response that was framed (not close-delimited) and did not ask to close.
* Proxies come from the environment as curl and Go read them: ``http_proxy``/``HTTP_PROXY`` for http,
  ``https_proxy``/``HTTPS_PROXY`` for https (lower case first), ``no_proxy``/``NO_PROXY`` a comma-separated
  list of host suffixes, ``*`` for all. Loopback addresses never go through a proxy.
* Errors say what went wrong in a few words (``connection refused``, ``timed out``…) so that callers can put
  them in one log line next to the URL.
"""

from __future__ import annotations

import base64
import errno
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

MAX_HEAD = 64 * 1024
# A chunk-size line is a hex number with optional extensions; nothing legitimate is longer.
_MAX_CHUNK_LINE = 1024
DEFAULT_PORTS = {"http": 80, "https": 443}


class HttpError(Exception):
    """No usable response; the message says why in a few words (the caller adds the URL)."""


class HttpUnreachable(HttpError):
    """The connection could not be made or broke before a whole response arrived."""


class HttpProtocolError(HttpError):
    """The peer answered something that is not a valid HTTP/1.1 response."""


class ResponseTooLarge(HttpProtocolError):
    """The response went past a size limit; nothing beyond the limit was kept."""


class RequestBodyError(HttpError):
    """A streamed request body could not be read, or did not have the length announced for it (the file changed
    while it was being sent); the request was not completed."""


@dataclass(frozen=True)
class StreamedBody:
    """A request body sent in pieces instead of held in memory: ``length`` bytes in all, produced by ``pieces()``,
    which starts from the beginning at every call (a request retried on a new connection sends them again)."""

    length: int
    pieces: Callable[[], Iterable[bytes]]


def checked_pieces(body: StreamedBody) -> Iterator[bytes]:
    """``body``'s pieces, as long as they add up to its announced length: RequestBodyError when they run past it
    or end short of it, or when producing them fails with OSError (a file that cannot be read)."""
    sent = 0
    pieces: Iterator[bytes] | None = None
    while True:
        try:
            if pieces is None:
                pieces = iter(body.pieces())
            piece = next(pieces)
        except StopIteration:
            break
        except OSError as exc:
            raise RequestBodyError(f"cannot read the request body: {exc.strerror or exc}") from None
        sent += len(piece)
        if sent > body.length:
            raise RequestBodyError(f"the request body grew past its announced {body.length} bytes while being sent")
        yield piece
    if sent != body.length:
        raise RequestBodyError(f"the request body ended after {sent} of its announced {body.length} bytes")


def describe_limit(size: int) -> str:
    """``1 MiB``, ``64 KiB`` or ``100 bytes``: a limit as it reads in an error message."""
    for unit, name in ((1 << 20, "MiB"), (1 << 10, "KiB")):
        if size >= unit and size % unit == 0:
            return f"{size // unit} {name}"
    return f"{size} bytes"


def describe_os_error(exc: BaseException) -> str:
    """A short cause for a connection failure, without the exception's class and addresses."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    reason = getattr(exc, "reason", None)  # ssl.SSLError
    if reason == "CERTIFICATE_VERIFY_FAILED" or "CERTIFICATE_VERIFY_FAILED" in str(exc):
        return "TLS certificate verification failed"
    if isinstance(reason, str) and reason:
        return f"TLS: {reason.lower().replace('_', ' ')}"
    code = getattr(exc, "errno", None)
    known = {
        errno.ECONNREFUSED: "connection refused",
        errno.ECONNRESET: "connection reset",
        errno.EHOSTUNREACH: "no route to host",
        errno.ENETUNREACH: "network unreachable",
        errno.ETIMEDOUT: "timed out",
        errno.EPIPE: "connection closed",
    }
    if code in known:
        return known[code]
    if type(exc).__name__ == "gaierror":
        return "host not found"
    if isinstance(exc, EOFError | ConnectionError):
        return "connection closed"
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "…"


@dataclass(frozen=True)
class Origin:
    """Where requests go: scheme (http or https), host and port. ``host`` is bare (no brackets for IPv6)."""

    scheme: str
    host: str
    port: int

    @property
    def authority(self) -> str:
        """``host:port`` as the Host header and a CONNECT request spell it (IPv6 in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.authority}"


@dataclass(frozen=True)
class Proxy:
    """An HTTP proxy and the ``Proxy-Authorization`` value its URL's user info asks for ('' for none)."""

    origin: Origin
    authorization: str = ""


def split_url(url: str) -> tuple[Origin, str]:
    """``http(s)://host[:port]/path?query`` → (origin, request target); ValueError names what is wrong."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{url!r} is not a valid URL: {exc}") from None
    if parts.scheme not in DEFAULT_PORTS:
        raise ValueError(f"{url!r} must start with http:// or https://")
    if not parts.hostname:
        raise ValueError(f"{url!r} has no host")
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return Origin(parts.scheme, parts.hostname, port or DEFAULT_PORTS[parts.scheme]), target


def encode_request(
    method: str,
    target: str,
    origin: Origin,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes | StreamedBody | None = None,
) -> bytes:
    """The bytes of one request (for a StreamedBody, its head alone: the shell sends the pieces after it).
    ``Host`` and ``Content-Length`` are added; header values may not contain line breaks (a ValueError, so no
    input can add a header of its own)."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {origin.authority}"]
    for name, value in headers:
        if any(c in name + value for c in "\r\n\0") or not name or ":" in name:
            raise ValueError(f"invalid HTTP header {name!r}")
        lines.append(f"{name}: {value}")
    if isinstance(body, StreamedBody):
        lines.append(f"Content-Length: {body.length}")
    elif body is not None or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body or b'')}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + body if isinstance(body, bytes) and body else head


@dataclass(frozen=True)
class PreparedRequest:
    """A request ready to send: where to connect (the origin, or a proxy on the way), its bytes, and the body
    to send after them when it is streamed."""

    origin: Origin
    proxy: Proxy | None
    message: bytes
    stream: StreamedBody | None = None


def prepare_request(
    method: str,
    url: str,
    headers: Sequence[tuple[str, str]],
    body: bytes | StreamedBody | None,
    environ: Mapping[str, str],
    user_agent: str = "",
) -> PreparedRequest:
    """Resolve the proxy for ``url`` and encode the request for it; HttpProtocolError for a bad URL.

    Through a proxy an http request names its absolute URL; an https one goes through a CONNECT tunnel that
    the shell opens, so it is encoded as for the origin itself.
    """
    try:
        origin, target = split_url(url)
        proxy = proxy_for(origin, environ)
    except ValueError as exc:
        raise HttpProtocolError(str(exc)) from None
    extra = list(headers)
    if user_agent:
        extra.append(("User-Agent", user_agent))
    if proxy is not None and origin.scheme == "http":
        target = origin.url + target
        if proxy.authorization:
            extra.append(("Proxy-Authorization", proxy.authorization))
    stream = body if isinstance(body, StreamedBody) else None
    return PreparedRequest(origin, proxy, encode_request(method, target, origin, extra, body), stream)


def tunnel_request(origin: Origin, proxy: Proxy) -> bytes:
    """The CONNECT request that opens a tunnel to an https ``origin`` through ``proxy``."""
    headers = [("Proxy-Authorization", proxy.authorization)] if proxy.authorization else []
    return encode_request("CONNECT", origin.authority, origin, headers)


def check_tunnel(head: ResponseHead, proxy: Proxy) -> None:
    """Raise HttpUnreachable unless the proxy's answer to CONNECT opened the tunnel."""
    if head.status // 100 != 2:
        raise HttpUnreachable(f"proxy {proxy.origin.url} refused the tunnel: {head.status_line}")


@dataclass(frozen=True)
class ResponseHead:
    """Status line and headers; header names are lower-cased, in the order received."""

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    http_10: bool = False

    def header(self, name: str) -> str | None:
        """The last value of header ``name`` (case-insensitive), or None."""
        wanted = name.lower()
        found = None
        for key, value in self.headers:
            if key == wanted:
                found = value
        return found

    @property
    def status_line(self) -> str:
        """``404 Not Found`` for messages."""
        return f"{self.status} {self.reason}".strip()


@dataclass(frozen=True)
class BodyPiece:
    """Body bytes as they arrived (chunk framing removed)."""

    data: bytes


@dataclass(frozen=True)
class EndOfMessage:
    """The response is complete; ``reusable`` says whether the connection may carry another request."""

    reusable: bool


ResponseEvent = ResponseHead | BodyPiece | EndOfMessage


class ResponseParser:
    """Incremental parser of one response. ``feed`` bytes as they arrive, ``feed_eof`` when the peer closed;
    both return the events they completed. Raises HttpProtocolError (ResponseTooLarge past a bound)."""

    def __init__(self, *, method: str = "GET", max_body: int | None = None) -> None:
        self._method = method
        self._max_body = max_body
        self._buffer = bytearray()
        self._head: ResponseHead | None = None
        self._done = False
        self._body_seen = 0
        # Body framing, set with the head: "none", "length" (with _remaining), "chunked", "close".
        self._framing = ""
        self._remaining = 0
        # Chunked decoding: "size" (reading a size line), "data" (with _remaining), "crlf", "trailer".
        self._chunk_state = "size"

    @property
    def head(self) -> ResponseHead | None:
        return self._head

    @property
    def done(self) -> bool:
        return self._done

    def feed(self, data: bytes) -> list[ResponseEvent]:
        if self._done:
            if data:
                raise HttpProtocolError("data after the end of the response")
            return []
        if self._head is not None and not self._buffer and data:
            whole = self._whole_body_piece(data)
            if whole is not None:
                return whole
        self._buffer += data
        events: list[ResponseEvent] = []
        if self._head is None:
            head = self._parse_head()
            if head is None:
                return events
            events.append(head)
        events.extend(self._parse_body())
        return events

    def _whole_body_piece(self, data: bytes) -> list[ResponseEvent] | None:
        """``data`` as one body piece, not copied, when all of it is body (the common case of a large download);
        None when it must go through the buffer."""
        if self._framing == "close":
            self._count(len(data))
            return [BodyPiece(data)]
        if self._framing != "length" or len(data) > self._remaining:
            return None
        self._count(len(data))
        self._remaining -= len(data)
        if self._remaining:
            return [BodyPiece(data)]
        self._done = True
        return [BodyPiece(data), EndOfMessage(self._reusable())]

    def feed_eof(self) -> list[ResponseEvent]:
        """The peer closed the connection: the end of a close-delimited body, else a truncated response."""
        if self._done:
            return []
        if self._head is not None and self._framing == "close":
            self._done = True
            return [EndOfMessage(reusable=False)]
        what = "the response head" if self._head is None else "the response body"
        raise HttpUnreachable(f"connection closed in the middle of {what}")

    # -- head ------------------------------------------------------------------------------------------------

    def _parse_head(self) -> ResponseHead | None:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_HEAD:
                raise ResponseTooLarge(f"response head longer than {describe_limit(MAX_HEAD)}")
            return None
        if end > MAX_HEAD:
            raise ResponseTooLarge(f"response head longer than {describe_limit(MAX_HEAD)}")
        raw = bytes(self._buffer[:end]).decode("latin-1")
        del self._buffer[: end + 4]
        status_line, *header_lines = raw.split("\r\n")
        version, _, rest = status_line.partition(" ")
        code, _, reason = rest.partition(" ")
        if version not in ("HTTP/1.1", "HTTP/1.0") or len(code) != 3 or not code.isdigit():
            shown = status_line[:60]
            raise HttpProtocolError(f"not an HTTP/1.1 response (it starts with {shown!r})")
        headers = []
        for line in header_lines:
            name, colon, value = line.partition(":")
            if not colon or not name or name != name.strip():
                raise HttpProtocolError(f"malformed response header {line[:60]!r}")
            headers.append((name.lower(), value.strip()))
        head = ResponseHead(int(code), reason.strip(), tuple(headers), http_10=version == "HTTP/1.0")
        if 100 <= head.status < 200:
            # An interim answer (100 Continue): the real head follows.
            return self._parse_head()
        self._head = head
        self._choose_framing(head)
        return head

    def _choose_framing(self, head: ResponseHead) -> None:
        tunnel = self._method == "CONNECT" and 200 <= head.status < 300
        if self._method == "HEAD" or head.status in (204, 304) or tunnel:
            self._framing = "none"
            return
        encoding = (head.header("transfer-encoding") or "").lower()
        if encoding:
            if encoding.split(",")[-1].strip() != "chunked":
                raise HttpProtocolError(f"unsupported transfer encoding {encoding!r}")
            self._framing = "chunked"
            return
        length = head.header("content-length")
        if length is not None:
            if not length.isdigit():
                raise HttpProtocolError(f"invalid Content-Length {length[:30]!r}")
            self._framing = "length"
            self._remaining = int(length)
            if self._max_body is not None and self._remaining > self._max_body:
                raise ResponseTooLarge(
                    f"response body of {self._remaining} bytes, more than {describe_limit(self._max_body)}"
                )
            return
        self._framing = "close"

    def _reusable(self) -> bool:
        assert self._head is not None
        connection = (self._head.header("connection") or "").lower()
        if self._head.http_10:
            return "keep-alive" in connection
        return "close" not in connection

    # -- body ------------------------------------------------------------------------------------------------

    def _count(self, size: int) -> None:
        self._body_seen += size
        if self._max_body is not None and self._body_seen > self._max_body:
            raise ResponseTooLarge(f"response body of more than {describe_limit(self._max_body)}")

    def _parse_body(self) -> list[ResponseEvent]:
        events: list[ResponseEvent] = []
        if self._framing == "none":
            self._done = True
            events.append(EndOfMessage(self._reusable()))
        elif self._framing == "length":
            take = min(self._remaining, len(self._buffer))
            if take:
                self._count(take)
                events.append(BodyPiece(bytes(self._buffer[:take])))
                del self._buffer[:take]
                self._remaining -= take
            if self._remaining == 0:
                self._done = True
                if self._buffer:
                    raise HttpProtocolError("more data than Content-Length announced")
                events.append(EndOfMessage(self._reusable()))
        elif self._framing == "close":
            if self._buffer:
                self._count(len(self._buffer))
                events.append(BodyPiece(bytes(self._buffer)))
                self._buffer.clear()
        else:
            events.extend(self._parse_chunks())
        return events

    def _line(self) -> str | None:
        end = self._buffer.find(b"\r\n")
        if end < 0:
            if len(self._buffer) > _MAX_CHUNK_LINE:
                raise HttpProtocolError("chunk size line too long")
            return None
        line = bytes(self._buffer[:end]).decode("latin-1")
        del self._buffer[: end + 2]
        return line

    def _parse_chunks(self) -> list[ResponseEvent]:
        events: list[ResponseEvent] = []
        while True:
            if self._chunk_state == "size":
                line = self._line()
                if line is None:
                    return events
                size_text = line.split(";", 1)[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise HttpProtocolError(f"invalid chunk size {size_text[:30]!r}") from None
                if size < 0:
                    raise HttpProtocolError(f"invalid chunk size {size_text[:30]!r}")
                if size == 0:
                    self._chunk_state = "trailer"
                else:
                    if self._max_body is not None and self._body_seen + size > self._max_body:
                        # Refused before any of it is buffered.
                        raise ResponseTooLarge(
                            f"response body of more than {describe_limit(self._max_body)}"
                        )
                    self._chunk_state, self._remaining = "data", size
            elif self._chunk_state == "data":
                take = min(self._remaining, len(self._buffer))
                if not take:
                    return events
                self._count(take)
                events.append(BodyPiece(bytes(self._buffer[:take])))
                del self._buffer[:take]
                self._remaining -= take
                if self._remaining == 0:
                    self._chunk_state = "crlf"
            elif self._chunk_state == "crlf":
                if len(self._buffer) < 2:
                    return events
                if self._buffer[:2] != b"\r\n":
                    raise HttpProtocolError("chunk not followed by CRLF")
                del self._buffer[:2]
                self._chunk_state = "size"
            else:  # trailer: header lines up to an empty one
                line = self._line()
                if line is None:
                    return events
                if line == "":
                    self._done = True
                    if self._buffer:
                        raise HttpProtocolError("data after the last chunk")
                    events.append(EndOfMessage(self._reusable()))
                    return events


@dataclass(frozen=True)
class Response:
    """A whole response: its head and its (bounded) body."""

    head: ResponseHead
    body: bytes

    @property
    def status(self) -> int:
        return self.head.status


class WholeResponseReader:
    """Collects one whole response from the bytes a shell reads: ``feed`` them (``b""`` when the peer closed)
    until it returns True, then take ``response()``; ``received`` counts the bytes fed so far."""

    def __init__(self, *, method: str, max_body: int | None) -> None:
        self._parser = ResponseParser(method=method, max_body=max_body)
        self._pieces: list[bytes] = []
        self.reusable = False
        self.received = 0

    def feed(self, data: bytes) -> bool:
        self.received += len(data)
        for event in self._parser.feed(data) if data else self._parser.feed_eof():
            if isinstance(event, BodyPiece):
                self._pieces.append(event.data)
            elif isinstance(event, EndOfMessage):
                self.reusable = event.reusable
        return self._parser.done

    def response(self) -> Response:
        assert self._parser.head is not None and self._parser.done
        return Response(self._parser.head, b"".join(self._pieces))


# -- proxies -------------------------------------------------------------------------------------------------


def _env(environ: Mapping[str, str], name: str) -> str:
    return environ.get(name.lower()) or environ.get(name.upper()) or ""


def _bypassed(host: str, no_proxy: str) -> bool:
    import ipaddress  # only with a proxy configured: a command without one does not pay for it

    try:
        if ipaddress.ip_address(host).is_loopback:
            return True
    except ValueError:
        if host == "localhost" or host.endswith(".localhost"):
            return True
    host = host.lower().rstrip(".")
    for entry in no_proxy.split(","):
        entry = entry.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        entry = entry.split(":", 1)[0] if entry.count(":") == 1 else entry  # host:port entries
        entry = entry.lstrip(".")
        if host == entry or host.endswith("." + entry):
            return True
    return False


def proxy_for(origin: Origin, environ: Mapping[str, str]) -> Proxy | None:
    """The proxy requests to ``origin`` go through, or None; ValueError for a proxy URL that cannot work."""
    url = _env(environ, f"{origin.scheme}_proxy")
    if not url or _bypassed(origin.host, _env(environ, "no_proxy")):
        return None
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"proxy {url!r}: only http:// proxies are supported")
    proxy_origin, _ = split_url(url)
    authorization = ""
    if parts.username is not None:
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(credentials.encode()).decode("ascii")
    return Proxy(proxy_origin, authorization)


def basic_authorization(user: str, password: str, *, encoding: str = "utf-8") -> str:
    """The ``Authorization`` value of HTTP basic authentication (UnicodeEncodeError when ``encoding`` cannot
    carry the credentials)."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode(encoding)).decode("ascii")
