"""Build and sign full CrAU payloads from a /usr image (and optionally a kernel).

The image is cut into chunks (1 MiB unless told otherwise, as mantle's generator does); each becomes one operation
writing the chunk's blocks, stored bzip2-compressed (REPLACE_BZ) when that is smaller and raw (REPLACE) otherwise,
with the SHA-256 of its data blob. Chunks are encoded by a thread pool, one thread per CPU this process may use
(bz2, zlib and hashlib release the GIL, so it scales with them), with a bounded window, and blobs go to a temporary
file, so memory stays flat whatever the image size. A chunk size the update clients would refuse (more than
MAX_OPERATION_DATA per operation, more than MAX_OPERATIONS operations) is refused here. The payload is then
assembled as header, manifest, blobs and signature blob, hashing as it is written; the manifest names the signature
blob's offset and size, so the size comes from a placeholder signature of the key's length.

The manifest also carries the signature pseudo-operation in ``noop_operations`` (a REPLACE whose data is the
signature blob, written to a hole) for clients that predate signatures; current clients ignore that list.
"""

from __future__ import annotations

import base64
import bz2
import hashlib
import logging
import os
import tempfile
import zlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from coreos_common.files import NewFile
from update_engine.errors import ErrorCode
from update_engine.payload import update_metadata_pb2 as pb
from update_engine.payload.format import (
    BLOCK_SIZE,
    MAX_OPERATION_DATA,
    MAX_OPERATIONS,
    SIGNATURE_VERSION,
    SPARSE_HOLE,
    PayloadError,
    encode_header,
    encode_signatures,
)
from update_engine.payload.pipeline import usable_cpus

log = logging.getLogger(__name__)

CHUNK_SIZE = 1024 * 1024
_U32_MAX = 2**32 - 1
_COPY_CHUNK = 1024 * 1024

# Below this size a chunk is simply tried with bzip2: the pre-check would not save anything.
_PRECHECK_MIN = 64 * 1024
_SAMPLE = 16 * 1024
_DEDUP_BLOCK = 4096


@dataclass(frozen=True)
class GeneratedPayload:
    path: Path
    size: int
    sha256_b64: str
    partition_size: int
    operations: int
    compressed_operations: int


def _looks_incompressible(chunk: bytes) -> bool:
    """A cheap test for data bzip2 cannot shrink (already compressed or random), to skip the costly attempt.

    Only when all three miss is a chunk stored raw without trying bzip2: an order-0 Huffman coding of the whole
    chunk (catches any skew in byte frequencies, e.g. text, code, zero runs), a duplicate 4 KiB-aligned block
    (catches repeated file contents farther apart than any small window), and bzip2 on three 16 KiB samples
    (catches structure bzip2's block sorting exploits but byte counts miss). Costs about a tenth of bzip2 on
    incompressible data. Data that only bzip2 over the whole chunk could shrink (say unaligned repeats of random
    data 100 KiB apart) is then stored raw: a little larger, never wrong.
    """
    if len(chunk) < _PRECHECK_MIN:
        return False
    huffman = zlib.compressobj(1, zlib.DEFLATED, -15, 9, zlib.Z_HUFFMAN_ONLY)
    if len(huffman.compress(chunk)) + len(huffman.flush()) < len(chunk):
        return False
    view = memoryview(chunk)
    blocks = {view[i : i + _DEDUP_BLOCK] for i in range(0, len(chunk) - _DEDUP_BLOCK + 1, _DEDUP_BLOCK)}
    if len(blocks) < len(chunk) // _DEDUP_BLOCK:
        return False
    for start in (0, (len(chunk) - _SAMPLE) // 2, len(chunk) - _SAMPLE):
        sample = chunk[start : start + _SAMPLE]
        if len(bz2.compress(sample, 9)) < len(sample):
            return False
    return True


def _encode_chunk(chunk: bytes) -> tuple[int, bytes, bytes]:
    """(operation type, data blob, SHA-256 of the blob) for one chunk."""
    if not _looks_incompressible(chunk):
        compressed = bz2.compress(chunk, 9)
        if len(compressed) < len(chunk):
            return pb.InstallOperation.REPLACE_BZ, compressed, hashlib.sha256(compressed).digest()
    return pb.InstallOperation.REPLACE, chunk, hashlib.sha256(chunk).digest()


def _read_full(stream: BinaryIO, size: int) -> bytes:
    parts = []
    remaining = size
    while remaining:
        part = stream.read(remaining)
        if not part:
            break
        parts.append(part)
        remaining -= len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


class _BlobWriter:
    """Appends encoded chunks to the blob file in order and records their operations."""

    def __init__(self, blobs: BinaryIO) -> None:
        self._blobs = blobs
        self.offset = 0
        self.compressed = 0

    def add(
        self, encoded: tuple[int, bytes, bytes], start_block: int, num_blocks: int
    ) -> pb.InstallOperation:
        op_type, blob, blob_hash = encoded
        if self.offset + len(blob) > _U32_MAX:
            raise PayloadError(
                ErrorCode.ERROR, "payload data would exceed 4 GiB, the limit of the CrAU format"
            )
        self._blobs.write(blob)
        op = pb.InstallOperation(
            type=op_type,  # type: ignore[arg-type]
            data_offset=self.offset,
            data_length=len(blob),
            data_sha256_hash=blob_hash,
            dst_extents=[pb.Extent(start_block=start_block, num_blocks=num_blocks)],
        )
        self.offset += len(blob)
        if op_type == pb.InstallOperation.REPLACE_BZ:
            self.compressed += 1
        return op


Progress = Callable[[int, int], None]


def _encode_file(
    path: Path,
    pool: ThreadPoolExecutor,
    max_in_flight: int,
    writer: _BlobWriter,
    chunk_size: int,
    block_size: int,
    progress: Callable[[int], None],
) -> tuple[list[pb.InstallOperation], int, bytes]:
    """Operations writing ``path`` from block 0, with the file's size and SHA-256; ``progress`` gets the bytes
    of each chunk once it is encoded."""
    ops: list[pb.InstallOperation] = []
    digest = hashlib.sha256()
    window: deque[tuple[Future[tuple[int, bytes, bytes]], int, int]] = deque()
    block = 0
    size = 0
    with open(path, "rb") as stream:
        while chunk := _read_full(stream, chunk_size):
            digest.update(chunk)
            size += len(chunk)
            num_blocks = -(-len(chunk) // block_size)
            window.append((pool.submit(_encode_chunk, chunk), block, num_blocks))
            block += num_blocks
            if len(window) >= max_in_flight:
                future, start, count = window.popleft()
                ops.append(writer.add(future.result(), start, count))
                progress(count * block_size)
        while window:
            future, start, count = window.popleft()
            ops.append(writer.add(future.result(), start, count))
            progress(count * block_size)
    return ops, size, digest.digest()


def _size_of(path: Path, what: str) -> int:
    try:
        return path.stat().st_size
    except OSError as exc:
        raise PayloadError(ErrorCode.ERROR, f"cannot read {what} {path}: {exc}") from exc


def _load_private_key(private_key_pem: bytes) -> rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(private_key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise PayloadError(ErrorCode.ERROR, f"the private key does not load: {exc}") from exc
    if not isinstance(key, rsa.RSAPrivateKey):
        raise PayloadError(ErrorCode.ERROR, "the private key is not an RSA key")
    return key


def generate_full_payload(
    image: Path,
    out: Path,
    private_key_pem: bytes,
    *,
    kernel: Path | None = None,
    chunk_size: int = CHUNK_SIZE,
    block_size: int = BLOCK_SIZE,
    jobs: int | None = None,
    on_progress: Progress | None = None,
) -> GeneratedPayload:
    """Write a signed full payload for ``image`` (a whole number of blocks) to ``out``.

    ``chunk_size`` is the operation size; ``jobs`` the compressing threads (default: the CPUs this process may
    use); ``on_progress`` gets (bytes encoded, bytes in all) as the image and the kernel go through.
    ``block_size`` other than 4096 produces payloads that update clients refuse; it exists to test them.
    """
    key = _load_private_key(private_key_pem)
    if block_size <= 0 or block_size % 512 or chunk_size <= 0 or chunk_size % block_size:
        raise PayloadError(
            ErrorCode.ERROR,
            f"operation size {chunk_size} must be a multiple of block size {block_size}, itself a multiple of 512",
        )
    if chunk_size > MAX_OPERATION_DATA:
        raise PayloadError(
            ErrorCode.ERROR,
            f"operation size {chunk_size} is more than update clients accept ({MAX_OPERATION_DATA} bytes)",
        )
    image_size = _size_of(image, "the image")
    kernel_size = _size_of(kernel, "the kernel") if kernel is not None else 0
    if image_size == 0 or image_size % block_size:
        raise PayloadError(
            ErrorCode.ERROR,
            f"image {image} is {image_size} bytes, not a positive whole number of {block_size}-byte blocks",
        )
    operations = -(-image_size // chunk_size) + -(-kernel_size // chunk_size)
    if operations > MAX_OPERATIONS:
        raise PayloadError(
            ErrorCode.ERROR,
            f"{chunk_size}-byte operations would make {operations}, more than update clients accept "
            f"({MAX_OPERATIONS}): choose a larger operation size",
        )
    placeholder = encode_signatures([(SIGNATURE_VERSION, bytes((key.key_size + 7) // 8))])
    total = image_size + kernel_size
    done = 0

    def progress(count: int) -> None:
        nonlocal done
        done = min(done + count, total)
        if on_progress is not None:
            on_progress(done, total)

    out_dir = out.resolve().parent
    workers = max(1, jobs if jobs is not None else usable_cpus())
    try:
        with (
            tempfile.TemporaryFile(dir=out_dir, prefix=".payload-blobs-") as blobs,
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="payload-encode") as pool,
        ):
            writer = _BlobWriter(blobs)
            partition_ops, partition_size, partition_hash = _encode_file(
                image, pool, 2 * workers + 1, writer, chunk_size, block_size, progress
            )
            if partition_size != image_size:
                raise PayloadError(ErrorCode.ERROR, f"image {image} changed size while being read")
            manifest = pb.DeltaArchiveManifest(
                block_size=block_size,
                partition_operations=partition_ops,
                new_partition_info=pb.InstallInfo(size=partition_size, hash=partition_hash),
            )
            if kernel is not None:
                kernel_ops, kernel_size, kernel_hash = _encode_file(
                    kernel, pool, 2 * workers + 1, writer, chunk_size, block_size, progress
                )
                manifest.procedures.add(
                    type=pb.InstallProcedure.KERNEL,
                    operations=kernel_ops,
                    new_info=pb.InstallInfo(size=kernel_size, hash=kernel_hash),
                )
            manifest.signatures_offset = writer.offset
            manifest.signatures_size = len(placeholder)
            manifest.noop_operations.add(
                type=pb.InstallOperation.REPLACE,
                data_offset=writer.offset,
                data_length=len(placeholder),
                dst_extents=[
                    pb.Extent(start_block=SPARSE_HOLE, num_blocks=-(-len(placeholder) // block_size))
                ],
            )
            payload_size, sha256_b64 = _assemble(out, manifest, blobs, key, len(placeholder))
    except OSError as exc:
        raise PayloadError(ErrorCode.ERROR, f"generating {out}: {exc}") from exc
    operations = len(manifest.partition_operations) + sum(len(p.operations) for p in manifest.procedures)
    log.info(
        "generated %s: %d bytes, %d operations (%d bzip2), sha256 %s",
        out,
        payload_size,
        operations,
        writer.compressed,
        sha256_b64,
    )
    return GeneratedPayload(
        path=out,
        size=payload_size,
        sha256_b64=sha256_b64,
        partition_size=partition_size,
        operations=operations,
        compressed_operations=writer.compressed,
    )


def _assemble(
    out: Path, manifest: pb.DeltaArchiveManifest, blobs: BinaryIO, key: rsa.RSAPrivateKey, signature_size: int
) -> tuple[int, str]:
    """Write header, manifest, blobs and signature to ``out`` (atomically); returns (size, base64 SHA-256)."""
    manifest_bytes = manifest.SerializeToString()
    header = encode_header(len(manifest_bytes))
    with (
        NewFile(out, 0o644, suffix=".partial", directory=out.resolve().parent) as new,
        open(new.fd, "wb", closefd=False) as stream,
    ):
        signed = hashlib.sha256()
        size = 0
        for part in (header, manifest_bytes):
            stream.write(part)
            signed.update(part)
            size += len(part)
        blobs.seek(0)
        buf = bytearray(_COPY_CHUNK)
        view = memoryview(buf)
        while count := blobs.readinto(buf):  # type: ignore[attr-defined]
            stream.write(view[:count])
            signed.update(view[:count])
            size += count
        signature = key.sign(signed.digest(), padding.PKCS1v15(), Prehashed(hashes.SHA256()))
        signature_blob = encode_signatures([(SIGNATURE_VERSION, signature)])
        if len(signature_blob) != signature_size:
            raise PayloadError(
                ErrorCode.ERROR,
                f"signature blob is {len(signature_blob)} bytes, the manifest promised {signature_size}",
            )
        whole = signed.copy()
        whole.update(signature_blob)
        stream.write(signature_blob)
        size += len(signature_blob)
        stream.flush()
        new.commit(durable=True)
    return size, base64.b64encode(whole.digest()).decode("ascii")


def make_key_pair(private_out: Path, public_out: Path, *, bits: int = 2048) -> None:
    """Create an RSA signing key (PEM PKCS#8, mode 0600) and its public key (PEM SubjectPublicKeyInfo).

    Refuses to overwrite either file: replacing a signing key by accident strands every node that trusts it.
    """
    for path in (private_out, public_out):
        if path.exists():
            raise PayloadError(ErrorCode.ERROR, f"{path} already exists; not overwriting a key")
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        fd = os.open(private_out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as stream:
            stream.write(private_pem)
        os.chmod(private_out, 0o600)
        fd = os.open(public_out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "wb") as stream:
            stream.write(public_pem)
    except OSError as exc:
        raise PayloadError(ErrorCode.ERROR, f"writing the key pair: {exc}") from exc
    log.info("created RSA-%d key pair %s and %s", bits, private_out, public_out)
