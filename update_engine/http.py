"""HTTP for the update-engine's payload download, with Range resume, over ``coreos_common.http_async``.

The rules (limits, redirects, URL checks) are ``http_rules``, shared with the Omaha client (``omaha_client``).
Proxy variables of the environment are not used, and https is verified against the system's CAs, as for the
Omaha client. This module is imported only when a payload is downloaded.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from coreos_common.http1 import HttpError as TransportError
from coreos_common.http_async import HttpClient
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

# The socket is read by this much: about what one delivered chunk holds, and half of what is buffered before the
# download stops reading the socket. The payload sink bounds what is in flight after it.
DOWNLOAD_READ_SIZE = 256 * 1024


def make_client(limits: HttpLimits) -> HttpClient:
    """The client for one download (``async with`` closes its connections)."""
    return HttpClient(connect_timeout=limits.connect_timeout, environ={}, max_idle=0)


DeliverFn = Callable[[bytes], Awaitable[None]]


async def download(
    client: HttpClient,
    url: str,
    deliver: DeliverFn,
    *,
    expected_size: int,
    limits: HttpLimits,
    authorization: str | None = None,
    on_first_byte: Callable[[], None] | None = None,
) -> int:
    """Stream ``url`` into ``deliver`` in order, resuming with ``Range`` after a short read.

    ``deliver`` gets the bytes exactly once each, in order, in the ``bytes`` chunks the network brought (up to a
    few hundred KiB each, never copied here); the next chunk waits until ``deliver`` returns. Returns the number
    of resumes needed. Never delivers more than ``expected_size`` bytes: a longer body is a size mismatch.
    ``authorization`` is the value of an ``Authorization`` header to send (never logged).
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
                client, url, progress, deliver, expected_size=expected_size, authorization=authorization,
                on_first_byte=first_byte, limits=limits,
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
        except TransportError as exc:
            reason = str(exc)
            status = None
        except TimeoutError:
            reason = f"nothing received for {limits.stall_timeout:g} s"
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
    client: HttpClient,
    url: str,
    progress: _Progress,
    deliver: DeliverFn,
    *,
    expected_size: int,
    authorization: str | None,
    on_first_byte: Callable[[], None] | None,
    limits: HttpLimits,
) -> None:
    """One GET from ``progress.offset``, advancing it per delivered chunk (may stop short on a drop)."""
    offset = progress.offset
    headers = [("Range", f"bytes={offset}-")] if offset else []
    if authorization is not None:
        headers.append(("Authorization", authorization))
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        async with client.stream(
            "GET", current, headers=headers, timeout=limits.connect_timeout + limits.stall_timeout,
            read_size=DOWNLOAD_READ_SIZE,
        ) as resp:
            head = resp.head
            if head.status in (301, 302, 303, 307, 308):
                current = redirect_target(current, head.header("location"))
                continue
            if offset and head.status != 206:
                raise HttpError(
                    ErrorCode.DOWNLOAD_TRANSFER_ERROR,
                    f"payload server {host_of(current)} ignored the Range request (HTTP {head.status})",
                    status=head.status,
                )
            if offset:
                check_content_range(
                    head.header("content-range"), offset=offset, expected_size=expected_size,
                    host=host_of(current),
                )
            if not offset and head.status != 200:
                raise HttpError(
                    ErrorCode.DOWNLOAD_TRANSFER_ERROR,
                    f"payload server {host_of(current)} answered HTTP {head.status}",
                    status=head.status,
                )
            ctype = head.header("content-type") or ""
            if ctype.startswith("text/html"):
                raise HttpError(
                    ErrorCode.DOWNLOAD_TRANSFER_ERROR,
                    f"payload URL on {host_of(current)} returned an HTML page, not a payload",
                )
            length = head.header("content-length")
            declared = int(length) if length is not None and length.isdigit() else None
            if declared is not None and offset + declared > expected_size:
                raise HttpError(
                    ErrorCode.DOWNLOAD_SIZE_MISMATCH,
                    f"payload on {host_of(current)} is {offset + declared} bytes, Omaha said {expected_size}",
                )
            loop = asyncio.get_running_loop()
            rate = RateWatch(limits.stall_timeout, limits.min_rate, loop.time())
            while (chunk := await resp.read(timeout=limits.stall_timeout)) is not None:
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
