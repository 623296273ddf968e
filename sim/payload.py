"""Payload material: signing key pairs, releases (a USR image, a kernel and their signed payload), and hand-built
payloads for cases no generator produces (MOVE, holes, BSDIFF, bad extents).

Rules: :func:`key_pair` is the one way the harness makes a signing key. RSA-2048 generation is slow, so each name
is generated once per process and kept in memory; :func:`key_files` writes one as the PEM files the commands take
(``--public-key``, ``update-payload generate --private-key``). Different names are different keys, so "a key
nobody trusts" is ``key_pair("other")``. Releases are made with the product's own generator
(:func:`update_engine.payload.generate.generate_full_payload`); their content is reproducible when a seed is
given.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from update_engine.payload import update_metadata_pb2 as pb
from update_engine.payload.format import BLOCK_SIZE, SPARSE_HOLE, encode_header, encode_signatures
from update_engine.payload.generate import CHUNK_SIZE, generate_full_payload
from update_engine.payload.target import BoundedFile, WriteTarget

REPLACE = pb.InstallOperation.REPLACE
REPLACE_BZ = pb.InstallOperation.REPLACE_BZ
MOVE = pb.InstallOperation.MOVE
BSDIFF = pb.InstallOperation.BSDIFF
HOLE = SPARSE_HOLE


@dataclass(frozen=True)
class KeyPair:
    """A signing key and its public key, as PEM (PKCS#8 and SubjectPublicKeyInfo)."""

    private_pem: bytes
    public_pem: bytes


@dataclass(frozen=True)
class Keys:
    """A key pair written as files: ``private`` signs payloads, ``public`` is what nodes trust."""

    private: Path
    public: Path


@functools.cache
def key_pair(name: str = "main") -> KeyPair:
    """An RSA-2048 key pair, generated once per process for each name (key generation is slow)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return KeyPair(
        private_pem=key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        public_pem=key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )


def key_files(directory: Path, name: str = "main") -> Keys:
    """The key pair ``name`` written to ``directory/key.pem`` (mode 0600) and ``directory/key.pub.pem``."""
    pair = key_pair(name)
    directory.mkdir(parents=True, exist_ok=True)
    keys = Keys(directory / "key.pem", directory / "key.pub.pem")
    keys.private.touch(mode=0o600)
    keys.private.write_bytes(pair.private_pem)
    keys.public.write_bytes(pair.public_pem)
    return keys


def sha256_b64(data: bytes) -> str:
    """The SHA-256 of ``data`` in base64, as Omaha's ``hash_sha256`` attribute carries it."""
    return base64.b64encode(hashlib.sha256(data).digest()).decode("ascii")


@dataclass(frozen=True)
class Release:
    """A USR image, its kernel and their signed payload."""

    image: Path
    kernel: Path
    payload: Path

    @property
    def data(self) -> bytes:
        return self.payload.read_bytes()

    @property
    def size(self) -> int:
        return self.payload.stat().st_size

    @property
    def sha256_b64(self) -> str:
        return sha256_b64(self.data)


def build_release(
    workdir: Path, keys: Keys, *, image_size: int = 3 * 1024 * 1024 + 4096, kernel_size: int = 70_000,
    chunk_size: int = CHUNK_SIZE, seed: int | None = None,
) -> Release:
    """A new USR image, half random (stored raw) and half text (stored bzip2-compressed), a random kernel, and
    their payload signed with ``keys``; the same ``seed`` gives the same bytes, None fresh ones."""
    workdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed if seed is not None else os.urandom(16))
    half = image_size // 2
    text = b"flatcar usr partition content " * (image_size // 30 + 1)
    image = workdir / "usr.img"
    image.write_bytes((rng.randbytes(half) + text)[:image_size])
    kernel = workdir / "vmlinuz"
    kernel.write_bytes(rng.randbytes(kernel_size))
    payload = workdir / "update.gz"
    generate_full_payload(image, payload, keys.private.read_bytes(), kernel=kernel, chunk_size=chunk_size)
    return Release(image, kernel, payload)


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


def write_sparse_payload(path: Path, size: int, key: KeyPair, *, chunk_size: int = CHUNK_SIZE) -> int:
    """A valid signed payload of about ``size`` bytes that costs next to nothing to make or store: a partition of
    zeros written by raw REPLACE operations, whose blobs are left as a hole in the file.  For tests of how a
    large upload is handled; returns the file's size."""
    count = max(1, size // chunk_size)
    zeros = bytes(chunk_size)
    zeros_sha256 = hashlib.sha256(zeros).digest()
    blocks = chunk_size // BLOCK_SIZE
    manifest = pb.DeltaArchiveManifest(block_size=BLOCK_SIZE)
    for i in range(count):
        manifest.partition_operations.add(
            type=REPLACE, data_offset=i * chunk_size, data_length=chunk_size, data_sha256_hash=zeros_sha256,
            dst_extents=[pb.Extent(start_block=i * blocks, num_blocks=blocks)],
        )
    partition = hashlib.sha256()
    for _ in range(count):
        partition.update(zeros)
    manifest.new_partition_info.size = count * chunk_size
    manifest.new_partition_info.hash = partition.digest()
    manifest.signatures_offset = count * chunk_size
    manifest.signatures_size = len(encode_signatures([(2, bytes(256))]))
    manifest_bytes = manifest.SerializeToString()
    metadata = encode_header(len(manifest_bytes)) + manifest_bytes
    signed = hashlib.sha256(metadata)
    for _ in range(count):
        signed.update(zeros)
    private = serialization.load_pem_private_key(key.private_pem, password=None)
    assert isinstance(private, rsa.RSAPrivateKey)
    signature = private.sign(signed.digest(), padding.PKCS1v15(), Prehashed(hashes.SHA256()))
    blob = encode_signatures([(2, signature)])
    with path.open("wb") as out:
        out.write(metadata)
        out.seek(len(metadata) + count * chunk_size)  # the blobs: a hole, read back as zeros
        out.write(blob)
    return len(metadata) + count * chunk_size + len(blob)


class RecordingFile(BoundedFile):
    """A bounded target file that notes the (offset, length) of every write, then writes as usual."""

    def __init__(self, inner: BoundedFile, writes: list[tuple[int, int]]) -> None:
        super().__init__(inner.fd, inner.base, inner.size, inner.what)
        self.writes = writes

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        self.writes.append((offset, len(data)))
        super().pwrite(data, offset)


@dataclass(frozen=True)
class RecordingTarget(WriteTarget):
    """A write target that hands the sink a :class:`RecordingFile`: the interposition point the seam offers."""

    writes: list[tuple[int, int]] = field(default_factory=list)

    def open(self) -> BoundedFile:
        return RecordingFile(super().open(), self.writes)
