"""Payload test material: RSA keys made once per test session, and hand-built payloads for cases no
generator produces (MOVE, holes, BSDIFF, bad extents)."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from update_engine.payload import update_metadata_pb2 as pb
from update_engine.payload.format import BLOCK_SIZE, SPARSE_HOLE, encode_header, encode_signatures

REPLACE = pb.InstallOperation.REPLACE
REPLACE_BZ = pb.InstallOperation.REPLACE_BZ
MOVE = pb.InstallOperation.MOVE
BSDIFF = pb.InstallOperation.BSDIFF
HOLE = SPARSE_HOLE


@dataclass(frozen=True)
class KeyPair:
    private_pem: bytes
    public_pem: bytes


@functools.cache
def key_pair(name: str = "main") -> KeyPair:
    """An RSA-2048 key pair, generated once per test process for each name (key generation is slow)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return KeyPair(
        private_pem=key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        public_pem=key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )


@dataclass
class Op:
    """One hand-written operation: its type, extents as (start_block, num_blocks), and its data blob."""

    type: int
    dst: Sequence[tuple[int, int]]
    data: bytes | None = None
    src: Sequence[tuple[int, int]] = ()
    with_hash: bool = True

    def message(self) -> pb.InstallOperation:
        op = pb.InstallOperation(
            type=self.type,  # type: ignore[arg-type]
            dst_extents=[pb.Extent(start_block=s, num_blocks=n) for s, n in self.dst],
            src_extents=[pb.Extent(start_block=s, num_blocks=n) for s, n in self.src],
        )
        if self.with_hash and self.data is not None:
            op.data_sha256_hash = hashlib.sha256(self.data).digest()
        return op


@dataclass
class Built:
    """A hand-built payload and where its parts lie."""

    data: bytes
    manifest: pb.DeltaArchiveManifest
    metadata_size: int
    blob_ranges: list[tuple[int, int]] = field(
        default_factory=list
    )  # absolute [start, end) of each op's data
    signature_range: tuple[int, int] | None = None


def build_payload(
    partition_ops: Sequence[Op],
    *,
    new_partition: bytes | None,
    kernel_ops: Sequence[Op] = (),
    kernel: bytes | None = None,
    key: KeyPair | None = None,
    block_size: int = BLOCK_SIZE,
    signature_version: int = 2,
    edit_manifest: Callable[[pb.DeltaArchiveManifest], None] | None = None,
) -> Built:
    """Assemble a payload: data offsets in order, new_partition_info from ``new_partition`` (the expected partition
    content), a KERNEL procedure when ``kernel`` is given, and a signature when ``key`` is given."""
    manifest = pb.DeltaArchiveManifest(block_size=block_size)
    blobs: list[bytes] = []
    offset = 0

    def add(spec: Op) -> pb.InstallOperation:
        nonlocal offset
        op = spec.message()
        if spec.data is not None:
            op.data_offset = offset
            op.data_length = len(spec.data)
            blobs.append(spec.data)
            offset += len(spec.data)
        return op

    manifest.partition_operations.extend(add(spec) for spec in partition_ops)
    if new_partition is not None:
        manifest.new_partition_info.size = len(new_partition)
        manifest.new_partition_info.hash = hashlib.sha256(new_partition).digest()
    if kernel is not None:
        manifest.procedures.add(
            type=pb.InstallProcedure.KERNEL,
            operations=[add(spec) for spec in kernel_ops],
            new_info=pb.InstallInfo(size=len(kernel), hash=hashlib.sha256(kernel).digest()),
        )
    placeholder = encode_signatures([(signature_version, bytes(256))]) if key is not None else b""
    if key is not None:
        manifest.signatures_offset = offset
        manifest.signatures_size = len(placeholder)
    if edit_manifest is not None:
        edit_manifest(manifest)
    manifest_bytes = manifest.SerializeToString()
    body = encode_header(len(manifest_bytes)) + manifest_bytes + b"".join(blobs)
    metadata_size = 20 + len(manifest_bytes)
    ranges = []
    pos = metadata_size
    for blob in blobs:
        ranges.append((pos, pos + len(blob)))
        pos += len(blob)
    signature_range = None
    if key is not None:
        private = serialization.load_pem_private_key(key.private_pem, password=None)
        assert isinstance(private, rsa.RSAPrivateKey)
        signature = private.sign(
            hashlib.sha256(body).digest(), padding.PKCS1v15(), Prehashed(hashes.SHA256())
        )
        sig_blob = encode_signatures([(signature_version, signature)])
        signature_range = (len(body), len(body) + len(sig_blob))
        body += sig_blob
    return Built(body, manifest, metadata_size, ranges, signature_range)
