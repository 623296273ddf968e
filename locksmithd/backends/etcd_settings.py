"""Where the etcd semaphore lives and how to reach it: settings only, without the HTTP client.

Kept apart from ``locksmithd.backends.etcd`` so that reading and checking the configuration does not load the
etcd client: a node whose strategy does not use etcd never imports it.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

from locksmithd.backends import LockBackendError
from locksmithd.semaphore import key_for_group

# locksmith's defaults: etcd's client port, then the one etcd 2 also listened on.
DEFAULT_ENDPOINTS: tuple[str, ...] = ("http://127.0.0.1:2379", "http://127.0.0.1:4001")


def parse_endpoints(text: str) -> tuple[str, ...]:
    """Split ``LOCKSMITHD_ENDPOINT``-style text (comma-separated, spaces trimmed) into endpoint URLs."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


@dataclass(frozen=True)
class Endpoint:
    """One etcd endpoint URL, split."""

    url: str
    scheme: str
    host: str
    port: int


def parse_endpoint(url: str) -> Endpoint:
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise LockBackendError(f"etcd endpoint {url!r} is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise LockBackendError(f"etcd endpoint {url!r} must start with http:// or https://")
    if not parts.hostname:
        raise LockBackendError(f"etcd endpoint {url!r} has no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        raise LockBackendError(
            f"etcd endpoint {url!r} must be scheme://host[:port] with no path or credentials"
        )
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    return Endpoint(url=url, scheme=parts.scheme, host=parts.hostname, port=port)


@dataclass(frozen=True)
class EtcdSettings:
    """Where the semaphore lives and how to reach it; ``endpoints`` also accepts a comma-separated string.

    An endpoint without a port uses the URL scheme's (80/443), as any URL would. TLS: ``ca_file`` alone
    verifies the server against that CA (without it, https uses the system roots); ``cert_file`` and
    ``key_file`` together add a client certificate.
    """

    endpoints: tuple[str, ...] = DEFAULT_ENDPOINTS
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password: str | None = None
    group: str = ""
    request_timeout: float = 5.0
    # Also hold locksmith's v2 semaphore (taken first, released last), for fleets that still run locksmith.
    v2_compat: bool = False

    def __post_init__(self) -> None:
        raw: object = self.endpoints
        if isinstance(raw, str):
            object.__setattr__(self, "endpoints", parse_endpoints(raw))
        else:
            object.__setattr__(self, "endpoints", tuple(str(e).strip() for e in self.endpoints))
        # Unset environment variables arrive as empty strings; they mean "not given".
        for name in ("ca_file", "cert_file", "key_file", "username", "password"):
            if getattr(self, name) == "":
                object.__setattr__(self, name, None)

    @property
    def key(self) -> str:
        return key_for_group(self.group)

    def validate(self) -> None:
        """Raise LockBackendError naming the first setting that cannot work."""
        if not self.endpoints:
            raise LockBackendError("no etcd endpoint configured")
        for url in self.endpoints:
            parse_endpoint(url)
        if (self.cert_file is None) != (self.key_file is None):
            given, missing = ("cert", "key") if self.key_file is None else ("key", "cert")
            raise LockBackendError(
                f"etcd client {given} file given without a {missing} file; both are needed"
            )
        for label, path in (
            ("CA", self.ca_file),
            ("client cert", self.cert_file),
            ("client key", self.key_file),
        ):
            if path is None:
                continue
            try:
                with open(path, "rb") as fh:
                    fh.read(1)
            except OSError as exc:
                raise LockBackendError(
                    f"cannot read etcd {label} file {path}: {exc.strerror or exc}"
                ) from None
        if self.password is not None and self.username is None:
            raise LockBackendError("etcd password given without a user name")
        if self.request_timeout <= 0:
            raise LockBackendError(f"etcd request timeout must be positive, got {self.request_timeout}")
