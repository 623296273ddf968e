"""HTTP for the update-engine's payload download, with Range resume, over aiohttp.

The rules (limits, redirects, URL checks) are ``http_rules``, shared with the Omaha client (``omaha_client``, which
needs no aiohttp); this module is imported only when a payload is downloaded.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp

from coreos_common.http1 import describe_os_error
from update_engine.errors import ErrorCode
from update_engine.http_rules import (
    MAX_REDIRECTS,
    HttpError,
    HttpLimits,
    check_url,
    host_of,
    redirect_target,
)

log = logging.getLogger(__name__)

# aiohttp buffers up to twice this much of a response before it stops reading the socket. The default (64 KiB)
# makes it stop and restart reading every few hundred KiB; the payload sink bounds what is in flight after it.
DOWNLOAD_READ_BUFFER = 1 << 20


def make_session(limits: HttpLimits) -> aiohttp.ClientSession:
    timeout = aiohttp.ClientTimeout(
        total=None, connect=limits.connect_timeout, sock_connect=limits.connect_timeout,
        sock_read=limits.stall_timeout,
    )
    return aiohttp.ClientSession(timeout=timeout, auto_decompress=False)


def describe_transport_error(exc: BaseException) -> str:
    """What failed below HTTP, in words (aiohttp's own text names a TLS setting even for a plain-http URL)."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"the TLS certificate of {exc.host} was not accepted: {exc.certificate_error}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {exc.host} port {exc.port}: {describe_os_error(exc.os_error)}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    return describe_os_error(exc)


DeliverFn = Callable[[bytes], Awaitable[None]]


async def download(
    session: aiohttp.ClientSession,
    url: str,
    deliver: DeliverFn,
    *,
    expected_size: int,
    limits: HttpLimits,
    auth: aiohttp.BasicAuth | None = None,
    on_first_byte: Callable[[], None] | None = None,
) -> int:
    """Stream ``url`` into ``deliver`` in order, resuming with ``Range`` after a short read.

    ``deliver`` gets the bytes exactly once each, in order, in the ``bytes`` chunks the network brought (up to a
    few hundred KiB each, never copied here); the next chunk waits until ``deliver`` returns. Returns the number
    of resumes needed. Never delivers more than ``expected_size`` bytes: a longer body is a size mismatch.
    """
    check_url(url, what="payload URL")
    progress = _Progress()
    resumes = 0
    first_byte_seen = False

    def first_byte() -> None:
        nonlocal first_byte_seen
        if not first_byte_seen:
            first_byte_seen = True
            if on_first_byte is not None:
                on_first_byte()

    reason = ""
    status: int | None = None
    while True:
        try:
            await _fetch_from(
                session, url, progress, deliver, expected_size=expected_size, auth=auth, on_first_byte=first_byte,
                limits=limits,
            )
            if progress.offset == expected_size:
                return resumes
            reason = f"connection closed after {progress.offset} of {expected_size} bytes"
            status = None
        except HttpError as exc:
            if not resumes:
                raise
            # A resume refused (say, Range ignored) is the end, but what broke the transfer first is news too.
            raise HttpError(exc.code, f"{exc.message}, resuming after: {reason}", status=exc.status) from exc
        except (TransferTooSlow, WrongRange) as exc:
            reason = str(exc)
            status = exc.status if isinstance(exc, WrongRange) else None
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
            reason = describe_transport_error(exc)
            status = None
        offset = progress.offset
        if resumes >= limits.resume_attempts:
            raise HttpError(
                ErrorCode.DOWNLOAD_TRANSFER_ERROR,
                f"download from {host_of(url)} failed after {resumes} resumes: {reason}",
                status=status,
            )
        resumes += 1
        log.warning(
            "Download from %s interrupted at %d of %d bytes (%s); resuming with Range in %.0f s (attempt %d/%d)",
            host_of(url), offset, expected_size, reason, limits.resume_delay, resumes, limits.resume_attempts,
        )
        await asyncio.sleep(limits.resume_delay)


class WrongRange(Exception):
    """A 206 answer that does not start where the ``Range`` request asked: a server fault, resumed like a drop.

    Its bytes would land at the wrong place in the payload, so not one of them is delivered.
    """

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def check_content_range(header: str | None, *, offset: int, expected_size: int, host: str) -> None:
    """Sans-IO: the ``Content-Range`` of a 206 answer to ``Range: bytes=offset-`` for a payload of
    ``expected_size`` bytes. Raises WrongRange when it starts elsewhere or is missing or malformed, and
    HttpError (code 11) when it names another total size."""
    match = _CONTENT_RANGE.fullmatch((header or "").strip())
    if match is None:
        raise WrongRange(f"payload server {host} answered a Range request with Content-Range {header!r}", 206)
    start, total = int(match[1]), match[3]
    if start != offset:
        raise WrongRange(
            f"payload server {host} answered Range bytes={offset}- with bytes from {start} (Content-Range {header})",
            206,
        )
    if total != "*" and int(total) != expected_size:
        raise HttpError(
            ErrorCode.DOWNLOAD_SIZE_MISMATCH,
            f"payload on {host} is {total} bytes (Content-Range {header}), Omaha said {expected_size}",
            status=206,
        )


class TransferTooSlow(Exception):
    """A window of ``stall_timeout`` seconds brought fewer bytes than ``min_rate`` asks: treated like a stall."""


@dataclass
class RateWatch:
    """Sans-IO low-speed rule: each ``window`` seconds must bring at least ``min_rate × window`` bytes.

    A server dripping a byte just often enough to dodge the read timeout would otherwise hold the download, and
    with it the daemon, for as long as it likes.
    """

    window: float
    min_rate: float
    started: float
    received: int = 0

    def feed(self, count: int, now: float) -> None:
        """Count ``count`` bytes arrived at ``now``; raise TransferTooSlow when a full window fell short."""
        self.received += count
        elapsed = now - self.started
        if elapsed < self.window:
            return
        if self.received < self.min_rate * elapsed:
            raise TransferTooSlow(
                f"transfer slower than {self.min_rate:g} B/s: {self.received} bytes in {elapsed:.1f} s"
            )
        self.started = now
        self.received = 0


@dataclass
class _Progress:
    """Bytes delivered so far; survives an exception in the middle of a transfer."""

    offset: int = 0


async def _fetch_from(
    session: aiohttp.ClientSession,
    url: str,
    progress: _Progress,
    deliver: DeliverFn,
    *,
    expected_size: int,
    auth: aiohttp.BasicAuth | None,
    on_first_byte: Callable[[], None] | None,
    limits: HttpLimits,
) -> None:
    """One GET from ``progress.offset``, advancing it per delivered chunk (may stop short on a drop)."""
    offset = progress.offset
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        async with session.get(
            current, headers=headers, allow_redirects=False, auth=auth, read_bufsize=DOWNLOAD_READ_BUFFER
        ) as resp:
            if resp.status in (301, 302, 303, 307, 308):
                current = redirect_target(current, resp.headers.get("Location"))
                continue
            if offset and resp.status != 206:
                raise HttpError(
                    ErrorCode.DOWNLOAD_TRANSFER_ERROR,
                    f"payload server {host_of(current)} ignored the Range request (HTTP {resp.status})",
                    status=resp.status,
                )
            if offset:
                check_content_range(
                    resp.headers.get("Content-Range"), offset=offset, expected_size=expected_size,
                    host=host_of(current),
                )
            if not offset and resp.status != 200:
                raise HttpError(
                    ErrorCode.DOWNLOAD_TRANSFER_ERROR,
                    f"payload server {host_of(current)} answered HTTP {resp.status}",
                    status=resp.status,
                )
            ctype = resp.headers.get("Content-Type", "")
            if ctype.startswith("text/html"):
                raise HttpError(
                    ErrorCode.DOWNLOAD_TRANSFER_ERROR,
                    f"payload URL on {host_of(current)} returned an HTML page, not a payload",
                )
            declared = resp.content_length
            if declared is not None and offset + declared > expected_size:
                raise HttpError(
                    ErrorCode.DOWNLOAD_SIZE_MISMATCH,
                    f"payload on {host_of(current)} is {offset + declared} bytes, Omaha said {expected_size}",
                )
            loop = asyncio.get_running_loop()
            rate = RateWatch(limits.stall_timeout, limits.min_rate, loop.time())
            # iter_chunks hands out the parser's buffers as they are (iter_chunked would join them into copies).
            async for chunk, _ in resp.content.iter_chunks():
                if not chunk:
                    continue
                rate.feed(len(chunk), loop.time())
                if on_first_byte is not None:
                    on_first_byte()
                    on_first_byte = None
                if offset + len(chunk) > expected_size:
                    raise HttpError(
                        ErrorCode.DOWNLOAD_SIZE_MISMATCH,
                        f"payload on {host_of(current)} is longer than the {expected_size} bytes Omaha announced",
                    )
                await deliver(chunk)
                offset += len(chunk)
                progress.offset = offset
            return
    raise HttpError(ErrorCode.DOWNLOAD_TRANSFER_ERROR, f"more than {MAX_REDIRECTS} redirects from {url}")
