"""Payload files at rest: what an Omaha offer announces about one, and checking one without applying it.

Rules
-----
* :func:`verify_payload_file` checks the signature before anything is written anywhere: a first pass reads the
  file through the parser (structure, bounds, each operation's hash) and the digests, and the signature is
  checked on those; only then does a second pass run the operations (into a scratch file when they do not write
  the partition in order) to check the partition's and the kernel's hashes. The second pass must see the very
  manifest the first one verified, or the file changed under us and is refused.
* :func:`check_payload_file` is the same without the signature, for an update server that stores payloads
  when it was given no key. It never writes a node's partition; every node checks the signature itself.
* Single-threaded; files are read in 1 MiB pieces, so memory is flat whatever the payload's size.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from pathlib import Path

from update_engine.errors import ErrorCode
from update_engine.payload import update_metadata_pb2 as pb
from update_engine.payload import verify
from update_engine.payload.digest import PartitionDigest, PayloadDigest
from update_engine.payload.executor import Executor
from update_engine.payload.format import (
    Destination,
    OperationData,
    PayloadError,
    PayloadStreamParser,
    SignatureBlob,
    procedure_type_name,
    summarize_manifest,
    writes_sequentially,
)
from update_engine.payload.target import BoundedFile
from update_engine.payload.verify import VerifiedPayload

_READ_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class PayloadFileDigests:
    """What an Omaha offer announces about a payload file: its size, base64 SHA-256 and base64 SHA-1."""

    size: int
    sha256_b64: str
    sha1_b64: str


def payload_digests(path: Path) -> PayloadFileDigests:
    """Size and hashes of a payload file, in one read. Raises OSError."""
    sha256, sha1 = hashlib.sha256(), hashlib.sha1()
    size = 0
    with open(path, "rb") as stream:
        while chunk := stream.read(_READ_CHUNK):
            sha256.update(chunk)
            sha1.update(chunk)
            size += len(chunk)
    return PayloadFileDigests(
        size, base64.b64encode(sha256.digest()).decode("ascii"), base64.b64encode(sha1.digest()).decode("ascii")
    )


def verify_payload_file(path: Path, public_key_pem: bytes | None) -> VerifiedPayload:
    """Check a payload file without applying it: structure, operation hashes and signature first, then the
    partition's and the kernel's hashes. Raises PayloadError; OSError when the file cannot be read."""
    facts = _scan(path)
    npi = verify.check_stream(facts, expected_size=None, expected_sha256_b64=None, public_key_pem=public_key_pem)
    return _replay(path, facts, npi, signature_verified=True)


def check_payload_file(path: Path) -> VerifiedPayload:
    """Everything :func:`verify_payload_file` checks but the signature (``signature_verified`` is False)."""
    facts = _scan(path)
    npi = verify.check_unsigned(facts, expected_size=None, expected_sha256_b64=None)
    return _replay(path, facts, npi, signature_verified=False)


def _scan(path: Path) -> verify.StreamFacts:
    """The first pass: every byte through the parser and the digests, nothing executed."""
    parser = PayloadStreamParser(payload_size=path.stat().st_size)
    digest = PayloadDigest()
    signature_blob = None
    with open(path, "rb") as stream:
        while chunk := stream.read(_READ_CHUNK):
            digest.update(chunk)
            for event in parser.feed(chunk):
                if isinstance(event, SignatureBlob):
                    signature_blob = event.data
    return verify.StreamFacts.of(parser, digest, signature_blob)


def _replay(
    path: Path, facts: verify.StreamFacts, npi: pb.InstallInfo, *, signature_verified: bool
) -> VerifiedPayload:
    """The second pass: run the operations of the manifest the first pass checked, and check what they wrote."""
    manifest = facts.manifest
    assert manifest is not None
    block_size = manifest.block_size
    in_order = writes_sequentially(manifest)
    partition = None if in_order else BoundedFile.scratch(-(-npi.size // block_size) * block_size)
    kernel_info = next((p.new_info for p in manifest.procedures if procedure_type_name(p) == "KERNEL"), None)
    kernel = (
        BoundedFile.scratch(-(-kernel_info.size // block_size) * block_size) if kernel_info is not None else None
    )
    try:
        partition_digest = PartitionDigest(npi.size, None) if in_order else None
        executor = Executor(partition, kernel, block_size)
        parser = PayloadStreamParser()  # the first pass checked the manifest against the size; this one must match it
        with open(path, "rb") as stream:
            while chunk := stream.read(_READ_CHUNK):
                for event in parser.feed(chunk):
                    if parser.manifest is not None and parser.manifest != manifest:
                        raise PayloadError(ErrorCode.DOWNLOAD_HASH_MISMATCH, f"{path} changed while being verified")
                    if isinstance(event, OperationData):
                        hashed = partition_digest is not None and event.destination is Destination.PARTITION
                        executor.execute(event, partition_digest.update if hashed and partition_digest else None)
        if not parser.done or parser.manifest != manifest:
            raise PayloadError(ErrorCode.DOWNLOAD_HASH_MISMATCH, f"{path} changed while being verified")
        if partition_digest is not None:
            verify.check_partition(partition_digest.digest(), partition_digest.hashed, npi)
        else:
            assert partition is not None
            written = partition.sha256(npi.size, ErrorCode.NEW_ROOTFS_VERIFICATION_ERROR)
            verify.check_partition(written, npi.size, npi)
        if kernel is not None and kernel_info is not None:
            verify.check_kernel(kernel.sha256(kernel_info.size, ErrorCode.NEW_KERNEL_VERIFICATION_ERROR), kernel_info)
    finally:
        for scratch in (partition, kernel):
            if scratch is not None:
                scratch.close()
    return VerifiedPayload(
        size=facts.received,
        sha256_b64=facts.sha256_b64,
        manifest=summarize_manifest(manifest),
        partition_size=npi.size,
        partition_sha256=npi.hash,
        kernel_written=False,
        kernel_size=None,
        signature_verified=signature_verified,
    )
