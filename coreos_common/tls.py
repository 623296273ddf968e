"""TLS client contexts for the services the node daemons reach (etcd, FleetLock servers).

One rule for both HTTP shells: with a CA file, the server is verified against that CA only; without one,
against the system's roots. A client certificate needs both its certificate and key files. Verification is
never turned off. Reading the files happens here, once per client; a file that cannot be used is a
TlsSettingsError naming it.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass


class TlsSettingsError(ValueError):
    """A CA, certificate or key file cannot be used; the message names the file."""


@dataclass(frozen=True)
class TlsFiles:
    """Where the CA and the client certificate are; None for what is not configured."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


def client_context(files: TlsFiles) -> ssl.SSLContext:
    """A verifying client context for ``files``; raises TlsSettingsError naming a file it cannot use."""
    try:
        context = ssl.create_default_context(cafile=files.ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise TlsSettingsError(f"cannot use CA file {files.ca_file}: {exc}") from None
    if files.cert_file or files.key_file:
        if not (files.cert_file and files.key_file):
            raise TlsSettingsError("a client certificate needs both its certificate and its key file")
        try:
            context.load_cert_chain(files.cert_file, files.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise TlsSettingsError(
                f"cannot use client certificate {files.cert_file} with key {files.key_file}: {exc}"
            ) from None
    return context
