"""The HTTP rules update-engine keeps for every transfer, pure and without an HTTP library.

The limits follow the original's libcurl settings where users depend on them (30 s connect, a stalled transfer is
abandoned, at most 10 redirects, a short download resumed with ``Range`` up to 20 times) and are stricter where the
original trusted the network: the Omaha body is capped at 1 MiB, and a redirect may never change an https URL into
anything else or leave http(s). The Omaha client (``omaha_client``) and the payload download (``http``) both
follow them; this module imports neither, so an idle daemon loads no HTTP library to know them.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from update_engine.errors import ErrorCode, UpdateEngineError

OMAHA_BODY_LIMIT = 1 << 20
MAX_REDIRECTS = 10
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


@dataclass(frozen=True)
class HttpLimits:
    """Timeouts and retry counts; tests shrink them, the defaults are the original's."""

    connect_timeout: float = 30.0
    stall_timeout: float = 90.0  # no byte for this long, or too few (see min_rate), → resume or abandon
    min_rate: float = 10.0  # bytes/s averaged over each stall_timeout window, as the original's low-speed limit
    omaha_total_timeout: float = 120.0
    resume_attempts: int = 20
    resume_delay: float = 20.0


class HttpError(UpdateEngineError):
    """A transfer failed; ``status`` is the HTTP status when there was a response."""

    def __init__(self, code: ErrorCode | int, message: str, status: int | None = None) -> None:
        super().__init__(code, message)
        self.status = status


def check_url(url: str, *, what: str) -> None:
    """Refuse anything but http(s) URLs with a host; ``what`` names the URL in the message."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HttpError(ErrorCode.OMAHA_RESPONSE_INVALID, f"{what} {url!r} is not an http(s) URL with a host")


def redirect_target(current: str, location: str | None) -> str:
    """Where a redirect leads, refusing scheme changes away from https and non-http(s) schemes."""
    if not location:
        raise HttpError(ErrorCode.DOWNLOAD_TRANSFER_ERROR, f"redirect from {current} has no Location header")
    target = urljoin(current, location)
    old_scheme = urlsplit(current).scheme
    new_scheme = urlsplit(target).scheme
    if new_scheme not in ("http", "https"):
        raise HttpError(ErrorCode.DOWNLOAD_TRANSFER_ERROR, f"redirect from {current} to non-http(s) URL {target!r}")
    if old_scheme == "https" and new_scheme != "https":
        raise HttpError(ErrorCode.DOWNLOAD_TRANSFER_ERROR, f"redirect from https {current} downgrades to {target!r}")
    return target


def host_of(url: str) -> str:
    """The host:port of a URL, for log lines (never the path, which may carry tokens)."""
    parts = urlsplit(url)
    return parts.netloc.rpartition("@")[2] or url
