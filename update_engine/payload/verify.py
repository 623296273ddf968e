"""The checks a payload must pass once it has streamed through, in the reference's order; the first failure wins.

1. size: the bytes received are the size Omaha announced (11);
2. the base64 SHA-256 of the whole payload is Omaha's, compared as the exact string (10);
3. the manifest has ``new_partition_info`` (12);
4. the signature: mandatory (no public key, no update: 18), a signature blob present (17), its first version-2
   entry an RSA PKCS#1 v1.5 / SHA-256 signature of the signed digest by the public key (18);
5. the payload is complete: the parser reached its end (11);
6. the SHA-256 of the written partition's first ``new_partition_info.size`` bytes (15);
7. the kernel's (16).

Pure functions over values: the sink gathers them (digests, manifest, signature blob, parser position) and
computes the partition and kernel digests, which only steps 6 and 7 need, after steps 1-5 passed. The
signature code (``cryptography``, ~9 MiB) is imported only when a payload gets this far.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from update_engine.errors import ErrorCode
from update_engine.payload import update_metadata_pb2 as pb
from update_engine.payload.digest import PayloadDigest
from update_engine.payload.format import (
    SIGNATURE_VERSION,
    ManifestSummary,
    PayloadError,
    PayloadStreamParser,
    parse_signatures,
)


@dataclass(frozen=True)
class StreamFacts:
    """What the stream showed, for the checks that need no partition read."""

    received: int
    sha256: bytes  # of the whole payload
    signed_sha256: bytes | None  # of the bytes before the signature blob (None when there is none)
    manifest: pb.DeltaArchiveManifest | None
    signature_blob: bytes | None
    complete: bool
    position: str  # where the parser stopped, for messages about truncated payloads

    @property
    def sha256_b64(self) -> str:
        return base64.b64encode(self.sha256).decode("ascii")

    @classmethod
    def of(cls, parser: PayloadStreamParser, digest: PayloadDigest, signature_blob: bytes | None) -> StreamFacts:
        """The facts once every byte went through ``parser`` and ``digest`` (which this finishes)."""
        manifest = parser.manifest
        signed_end = None
        if manifest is not None and manifest.HasField("signatures_offset") and parser.header is not None:
            signed_end = parser.header.metadata_size + manifest.signatures_offset
        digests = digest.finish(signed_end)
        return cls(
            received=digests.size,
            sha256=digests.whole,
            signed_sha256=digests.signed,
            manifest=manifest,
            signature_blob=signature_blob,
            complete=parser.done,
            position=parser.describe_position(),
        )


@dataclass(frozen=True)
class VerifiedPayload:
    """What a fully verified payload was, independent of the payload format's details."""

    size: int  # payload bytes consumed
    sha256_b64: str  # base64 SHA-256 of the whole payload, as Omaha announces it
    manifest: ManifestSummary
    partition_size: int
    partition_sha256: bytes
    kernel_written: bool
    kernel_size: int | None
    signature_verified: bool


def check_stream(
    facts: StreamFacts, *, expected_size: int | None, expected_sha256_b64: str | None, public_key_pem: bytes | None
) -> pb.InstallInfo:
    """Checks 1-5; returns the manifest's ``new_partition_info`` for checks 6 and 7."""
    info = _check_announced(facts, expected_size, expected_sha256_b64)
    check_signature(facts, public_key_pem)
    _check_complete(facts)
    return info


def check_unsigned(
    facts: StreamFacts, *, expected_size: int | None, expected_sha256_b64: str | None
) -> pb.InstallInfo:
    """Checks 1-3 and 5, without the signature: only for an update server that was given no key to store
    payloads with. Nothing a node installs goes through here."""
    info = _check_announced(facts, expected_size, expected_sha256_b64)
    _check_complete(facts)
    return info


def _check_announced(facts: StreamFacts, expected_size: int | None, expected_sha256_b64: str | None) -> pb.InstallInfo:
    if expected_size is not None and facts.received != expected_size:
        raise PayloadError(
            ErrorCode.DOWNLOAD_SIZE_MISMATCH, f"payload is {facts.received} bytes, {expected_size} were announced"
        )
    if expected_sha256_b64 is not None and facts.sha256_b64 != expected_sha256_b64:
        raise PayloadError(
            ErrorCode.DOWNLOAD_HASH_MISMATCH,
            f"payload SHA-256 is {facts.sha256_b64}, {expected_sha256_b64} was announced",
        )
    manifest = facts.manifest
    if manifest is None:
        raise PayloadError(
            ErrorCode.DOWNLOAD_PAYLOAD_VERIFICATION_ERROR,
            f"payload has no complete manifest (it ends {facts.position})",
        )
    if not manifest.HasField("new_partition_info"):
        raise PayloadError(ErrorCode.DOWNLOAD_PAYLOAD_VERIFICATION_ERROR, "payload manifest has no new_partition_info")
    return manifest.new_partition_info


def _check_complete(facts: StreamFacts) -> None:
    if not facts.complete:
        raise PayloadError(ErrorCode.DOWNLOAD_SIZE_MISMATCH, f"payload is truncated: it ends {facts.position}")


def check_signature(facts: StreamFacts, public_key_pem: bytes | None) -> None:
    """Check 4: the payload is signed by ``public_key_pem``. There is no way to skip it."""
    if public_key_pem is None:
        raise PayloadError(
            ErrorCode.DOWNLOAD_PAYLOAD_PUBKEY_VERIFICATION_ERROR,
            "no public key to check the payload signature with: refusing the payload",
        )
    if facts.signature_blob is None:
        where = "" if facts.complete else f" (it ends {facts.position})"
        raise PayloadError(ErrorCode.SIGNED_DELTA_PAYLOAD_EXPECTED, f"payload has no signature blob{where}")
    entries = parse_signatures(facts.signature_blob)
    signature = next((data for version, data in entries if version == SIGNATURE_VERSION), None)
    if signature is None:
        raise PayloadError(
            ErrorCode.DOWNLOAD_PAYLOAD_PUBKEY_VERIFICATION_ERROR,
            f"payload has no version {SIGNATURE_VERSION} signature "
            f"(versions present: {[version for version, _ in entries]})",
        )
    if facts.signed_sha256 is None:
        raise PayloadError(
            ErrorCode.DOWNLOAD_PAYLOAD_PUBKEY_VERIFICATION_ERROR, "payload's signed part could not be hashed"
        )
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    try:
        key = serialization.load_pem_public_key(public_key_pem)
    except (ValueError, TypeError) as exc:
        raise PayloadError(
            ErrorCode.DOWNLOAD_PAYLOAD_PUBKEY_VERIFICATION_ERROR, f"the payload public key does not load: {exc}"
        ) from exc
    if not isinstance(key, rsa.RSAPublicKey):
        raise PayloadError(
            ErrorCode.DOWNLOAD_PAYLOAD_PUBKEY_VERIFICATION_ERROR, "the payload public key is not an RSA key"
        )
    try:
        key.verify(signature, facts.signed_sha256, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
    except InvalidSignature as exc:
        raise PayloadError(
            ErrorCode.DOWNLOAD_PAYLOAD_PUBKEY_VERIFICATION_ERROR, "payload signature does not match the public key"
        ) from exc


def check_names_a_signature(manifest: pb.DeltaArchiveManifest) -> None:
    """Check 4's first half, as soon as the manifest arrives: a payload without a signature blob is refused
    before anything is written (17)."""
    if not manifest.HasField("signatures_offset"):
        raise PayloadError(
            ErrorCode.SIGNED_DELTA_PAYLOAD_EXPECTED, "payload manifest names no signature blob: refusing the payload"
        )


def check_partition(digest: bytes, written: int, info: pb.InstallInfo) -> None:
    """Check 6: ``digest`` is the SHA-256 of the ``written`` bytes hashed from the new partition."""
    if written != info.size:
        raise PayloadError(
            ErrorCode.NEW_ROOTFS_VERIFICATION_ERROR, f"payload wrote {written} bytes of the {info.size}-byte partition"
        )
    if digest != info.hash:
        raise PayloadError(
            ErrorCode.NEW_ROOTFS_VERIFICATION_ERROR,
            f"new partition SHA-256 is {digest.hex()}, the manifest says {info.hash.hex()}",
        )


def check_kernel(digest: bytes, info: pb.InstallInfo) -> None:
    """Check 7: the kernel file, cut to ``info.size``, hashes to ``info.hash``."""
    if digest != info.hash:
        raise PayloadError(
            ErrorCode.NEW_KERNEL_VERIFICATION_ERROR,
            f"new kernel SHA-256 is {digest.hex()}, the manifest says {info.hash.hex()}",
        )
