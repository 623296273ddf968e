"""A throw-away certificate authority and a server certificate for 127.0.0.1, for https servers in tests.

Rules: EC P-256 keys, valid from five minutes ago for one day, the server certificate with 127.0.0.1 as its IP
subject alternative name and the server-auth usage; written as PEM files in the directory given, so a client can
be pointed at ``ca_file`` (``SSL_CERT_FILE``, ``LOCKSMITHD_ETCD_CAFILE``) and a server at ``cert_file`` and
``key_file``. Nothing here is a secret: the keys live only as long as the test's directory.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class ServerTls:
    """A server's certificate and key, and the CA certificate its clients verify against; with
    ``client_cert_file``/``client_key_file``, a client certificate from the same CA (for servers that ask one)."""

    cert_file: Path
    key_file: Path
    ca_file: Path
    client_cert_file: Path | None = None
    client_key_file: Path | None = None

    def server_context(self) -> ssl.SSLContext:
        """An ``ssl.SSLContext`` that serves this certificate (for aiohttp's ``TCPSite``)."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


def make_server_tls(directory: Path, ca_name: str = "test CA", *, client: bool = False) -> ServerTls:
    """Create a CA named ``ca_name`` and a certificate for 127.0.0.1 signed by it, as PEM files in ``directory``;
    with ``client``, also a client certificate (``client.pem``, ``client-key.pem``) signed by the same CA."""
    now = datetime.datetime.now(datetime.UTC)
    valid_from, valid_until = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(issuer)
        .issuer_name(issuer)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from)
        .not_valid_after(valid_until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, *([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from)
        .not_valid_after(valid_until)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
        # With client certificates, etcd's JSON gateway dials etcd itself with the server certificate, which
        # then needs the client usage too.
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    paths = ServerTls(directory / "server.pem", directory / "server-key.pem", directory / "ca.pem")
    paths.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_pair(paths.cert_file, paths.key_file, cert, key)
    if not client:
        return paths
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test client")]))
        .issuer_name(issuer)
        .public_key(client_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from)
        .not_valid_after(valid_until)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    with_client = ServerTls(
        paths.cert_file, paths.key_file, paths.ca_file, directory / "client.pem", directory / "client-key.pem"
    )
    assert with_client.client_cert_file is not None and with_client.client_key_file is not None
    _write_pair(with_client.client_cert_file, with_client.client_key_file, client_cert, client_key)
    return with_client


def _write_pair(cert_file: Path, key_file: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
