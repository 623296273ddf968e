"""The CrAU (version 1) payload format: header, manifest, validation and an incremental parser.

Everything here is pure: bytes and protobuf messages in, values and events out, no files or clocks. The sink
(``sink.py``) drives :class:`PayloadStreamParser` with whatever chunks the network delivers.

Layout (all offsets in bytes)::

    [0, 4)        b"CrAU"
    [4, 12)       version, u64 big-endian, must be 1
    [12, 20)      manifest size M, u64 big-endian
    [20, 20+M)    DeltaArchiveManifest (protobuf)
    [20+M, ...)   operation data blobs, back to back in operation order, then the Signatures message

``data_offset`` and ``signatures_offset`` count from ``20+M``. The operations applied are the partition
operations followed by each procedure's operations ("the flat operation list"). ``noop_operations`` are never
applied: generators put a pseudo-operation there whose data is the signature blob itself, for clients that
predate signatures. This parser ignores that list entirely (as the Flatcar client does) and reads the signature
blob at ``signatures_offset``, which must be exactly where the last operation's data ends.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from update_engine.errors import ErrorCode, UpdateEngineError
from update_engine.payload import update_metadata_pb2 as pb

MAGIC = b"CrAU"
HEADER_SIZE = 20
PAYLOAD_VERSION = 1
BLOCK_SIZE = 4096
SPARSE_HOLE = 2**64 - 1
SIGNATURE_VERSION = 2

# Bounds on the work a manifest may ask for, checked before any byte is written: the signature and the payload
# hash are only known at the end. Sized from what a real update needs, with headroom: Flatcar's /usr partition is
# 2 GiB (its image 1 GiB), and full payloads from mantle and from ``update-payload generate`` use 1 MiB
# operations of one extent each, so a whole 2 GiB partition is 2048 operations and ~120 KiB of manifest.
#
# Operations (all of them: partition and procedures): 32 times that, a 2 GiB partition in 32 KiB operations.
MAX_OPERATIONS = 65536
# Destination and source extents of all operations together: two per operation on average.
MAX_EXTENTS = 2 * MAX_OPERATIONS
# The manifest is held in memory to be parsed: 65536 one-extent operations take ~3.8 MiB.
MAX_MANIFEST_SIZE = 4 * 1024 * 1024
# What one operation may make us hold in memory: its data blob, its output, or a MOVE's source; 8 x 1 MiB.
MAX_OPERATION_DATA = 8 * 1024 * 1024
# A kernel with its initramfs is ~60 MiB on Flatcar; it is written to a temporary file beside the old one.
MAX_KERNEL_SIZE = 256 * 1024 * 1024
# One RSA-4096 signature blob is ~520 bytes; anything near this limit is not a signature.
MAX_SIGNATURES_SIZE = 64 * 1024

_HEADER = struct.Struct(">4sQQ")

InstallOperation = pb.InstallOperation
DeltaArchiveManifest = pb.DeltaArchiveManifest
Extent = pb.Extent
_KNOWN_OPERATION_TYPES = frozenset(pb.InstallOperation.Type.values())


class PayloadError(UpdateEngineError):
    """The payload is malformed, tampered with, or cannot be applied; ``code`` is the Omaha error code."""


@dataclass(frozen=True)
class PayloadHeader:
    version: int
    manifest_size: int

    @property
    def metadata_size(self) -> int:
        """Header plus manifest: where the data blobs start."""
        return HEADER_SIZE + self.manifest_size


class Destination(enum.Enum):
    """Where an operation of the flat list writes."""

    PARTITION = "partition"
    KERNEL = "kernel"
    PCR_POLICY = "pcr-policy"
    IGNORED = "ignored"  # a procedure without a type, or with one this client does not know


@dataclass(frozen=True)
class PlannedOperation:
    """One entry of the flat operation list, with the data range it owns (relative to the blob area)."""

    index: int
    operation: pb.InstallOperation
    destination: Destination
    data_offset: int
    data_length: int  # 0 when the operation carries no data


def operation_type_name(op_type: int) -> str:
    try:
        return pb.InstallOperation.Type.Name(op_type)
    except ValueError:
        return f"UNKNOWN_{op_type}"


def procedure_type_name(proc: pb.InstallProcedure) -> str | None:
    """Name of a procedure's type, or None when untyped (an unknown value is stored as no value)."""
    if not proc.HasField("type"):
        return None
    return pb.InstallProcedure.Type.Name(proc.type)


def encode_header(manifest_size: int) -> bytes:
    return _HEADER.pack(MAGIC, PAYLOAD_VERSION, manifest_size)


def parse_header(data: bytes | bytearray | memoryview) -> PayloadHeader:
    """Parse the 20-byte header.

    A version other than 1 is refused with the magic's code (21): the version is part of the fixed preamble that
    says how to read the rest, and a version-2 (Android) payload has a different header layout altogether.
    """
    if len(data) < HEADER_SIZE:
        raise PayloadError(
            ErrorCode.DOWNLOAD_INVALID_METADATA_MAGIC,
            f"payload header is {len(data)} bytes, need {HEADER_SIZE}",
        )
    magic, version, manifest_size = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise PayloadError(
            ErrorCode.DOWNLOAD_INVALID_METADATA_MAGIC,
            f"payload magic is {bytes(magic)!r}, expected {MAGIC!r}",
        )
    if version != PAYLOAD_VERSION:
        raise PayloadError(
            ErrorCode.DOWNLOAD_INVALID_METADATA_MAGIC,
            f"payload format version is {version}, only version {PAYLOAD_VERSION} is supported",
        )
    if manifest_size > MAX_MANIFEST_SIZE:
        raise PayloadError(
            ErrorCode.DOWNLOAD_INVALID_METADATA_SIZE,
            f"payload manifest size {manifest_size} exceeds the limit of {MAX_MANIFEST_SIZE} bytes",
        )
    return PayloadHeader(version=version, manifest_size=manifest_size)


def parse_manifest(data: bytes | bytearray | memoryview) -> pb.DeltaArchiveManifest:
    manifest = pb.DeltaArchiveManifest()
    try:
        manifest.ParseFromString(bytes(data))
    except DecodeError as exc:
        raise PayloadError(
            ErrorCode.DOWNLOAD_MANIFEST_PARSE_ERROR, f"payload manifest does not decode: {exc}"
        ) from exc
    return manifest


def parse_signatures(blob: bytes | bytearray | memoryview) -> list[tuple[int, bytes]]:
    """(version, signature bytes) of every entry of a Signatures message, in order."""
    message = pb.Signatures()
    try:
        message.ParseFromString(bytes(blob))
    except DecodeError as exc:
        raise PayloadError(
            ErrorCode.DOWNLOAD_PAYLOAD_PUBKEY_VERIFICATION_ERROR,
            f"payload signature blob does not decode: {exc}",
        ) from exc
    return [(sig.version, sig.data) for sig in message.signatures]


def encode_signatures(entries: list[tuple[int, bytes]]) -> bytes:
    message = pb.Signatures(signatures=[pb.Signatures.Signature(version=v, data=d) for v, d in entries])
    return message.SerializeToString()


def _blocks(size: int, block_size: int) -> int:
    return -(-size // block_size)


def flatten_operations(manifest: pb.DeltaArchiveManifest) -> list[PlannedOperation]:
    """The flat operation list: partition operations, then each procedure's, with their data ranges."""
    planned: list[PlannedOperation] = []
    entries: list[tuple[pb.InstallOperation, Destination]] = [
        (op, Destination.PARTITION) for op in manifest.partition_operations
    ]
    for proc in manifest.procedures:
        name = procedure_type_name(proc)
        dest = {"KERNEL": Destination.KERNEL, "PCR_POLICY": Destination.PCR_POLICY}.get(name or "")
        entries.extend((op, dest or Destination.IGNORED) for op in proc.operations)
    for index, (op, dest) in enumerate(entries):
        has_data = op.HasField("data_offset") and op.HasField("data_length")
        planned.append(
            PlannedOperation(
                index=index,
                operation=op,
                destination=dest,
                data_offset=op.data_offset if has_data else 0,
                data_length=op.data_length if has_data else 0,
            )
        )
    return planned


def _op_error(code: ErrorCode, planned: PlannedOperation, problem: str) -> PayloadError:
    name = operation_type_name(planned.operation.type) if planned.operation.HasField("type") else "untyped"
    return PayloadError(
        code, f"payload operation {planned.index} ({name}, {planned.destination.value}): {problem}"
    )


def _check_extents(
    planned: PlannedOperation,
    extents: list[pb.Extent],
    what: str,
    limit_blocks: int | None,
    *,
    allow_sparse: bool,
) -> int:
    """Validate a list of extents and return its total number of blocks (holes included)."""
    if not extents:
        raise _op_error(ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR, planned, f"has no {what} extents")
    total = 0
    for extent in extents:
        if extent.num_blocks == 0:
            raise _op_error(
                ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR, planned, f"has an empty {what} extent"
            )
        total += extent.num_blocks
        if extent.start_block == SPARSE_HOLE:
            if not allow_sparse:
                raise _op_error(
                    ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR, planned, f"has a sparse {what} extent"
                )
            continue
        end = extent.start_block + extent.num_blocks
        if limit_blocks is not None and end > limit_blocks:
            raise _op_error(
                ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR,
                planned,
                f"{what} extent [{extent.start_block}, {end}) crosses the end of its target ({limit_blocks} blocks)",
            )
    return total


def _check_operation(
    planned: PlannedOperation, block_size: int, limit_blocks: int | None, running_offset: int
) -> None:
    op = planned.operation
    if not op.HasField("type") or op.type not in _KNOWN_OPERATION_TYPES:
        raise _op_error(ErrorCode.DOWNLOAD_MANIFEST_PARSE_ERROR, planned, "has no known operation type")
    if op.type == pb.InstallOperation.BSDIFF:
        raise _op_error(
            ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR, planned, "BSDIFF operations are not supported"
        )
    if op.HasField("data_offset") != op.HasField("data_length"):
        raise _op_error(
            ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR,
            planned,
            "has only one of data_offset and data_length",
        )
    has_data = op.HasField("data_offset")
    if has_data:
        if op.data_offset != running_offset:
            raise _op_error(
                ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR,
                planned,
                f"data starts at {op.data_offset}, expected {running_offset} (blobs must be contiguous)",
            )
        if op.data_length > MAX_OPERATION_DATA:
            raise _op_error(
                ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR,
                planned,
                f"data length {op.data_length} exceeds the limit of {MAX_OPERATION_DATA} bytes",
            )
        if not op.HasField("data_sha256_hash"):
            raise _op_error(
                ErrorCode.DOWNLOAD_OPERATION_HASH_MISSING, planned, "has data but no data_sha256_hash"
            )
        if len(op.data_sha256_hash) != hashlib.sha256().digest_size:
            raise _op_error(
                ErrorCode.DOWNLOAD_OPERATION_HASH_MISSING,
                planned,
                f"data_sha256_hash is {len(op.data_sha256_hash)} bytes, not a SHA-256",
            )
    dst_blocks = _check_extents(planned, list(op.dst_extents), "destination", limit_blocks, allow_sparse=True)
    dst_bytes = dst_blocks * block_size
    if op.type in (pb.InstallOperation.REPLACE, pb.InstallOperation.REPLACE_BZ):
        if not has_data or op.data_length == 0:
            raise _op_error(ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR, planned, "carries no data")
        if dst_bytes > MAX_OPERATION_DATA:
            raise _op_error(
                ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR,
                planned,
                f"writes {dst_bytes} bytes, more than the limit of {MAX_OPERATION_DATA}",
            )
        if (
            op.type == pb.InstallOperation.REPLACE
            and not dst_bytes - block_size < op.data_length <= dst_bytes
        ):
            raise _op_error(
                ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR,
                planned,
                f"{op.data_length} data bytes do not fill its {dst_blocks} destination blocks",
            )
    elif op.type == pb.InstallOperation.MOVE:
        if has_data:
            raise _op_error(ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR, planned, "MOVE must not carry data")
        if planned.destination is not Destination.PARTITION:
            raise _op_error(
                ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR,
                planned,
                "MOVE is only supported on the partition",
            )
        src_blocks = _check_extents(planned, list(op.src_extents), "source", limit_blocks, allow_sparse=False)
        if src_blocks != dst_blocks:
            raise _op_error(
                ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR,
                planned,
                f"moves {src_blocks} source blocks to {dst_blocks} destination blocks",
            )
        if dst_bytes > MAX_OPERATION_DATA:
            raise _op_error(
                ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR,
                planned,
                f"moves {dst_bytes} bytes, more than the limit of {MAX_OPERATION_DATA}",
            )


def validate_manifest(
    manifest: pb.DeltaArchiveManifest,
    *,
    partition_size: int | None,
    metadata_size: int | None = None,
    payload_size: int | None = None,
    kernel_room: int | None = None,
) -> None:
    """Check everything about the manifest that can be checked before any data arrives, bounding the work the
    payload can cause before its signature is known.

    ``partition_size`` is the size in bytes of the partition the operations will write; None means "as large as
    new_partition_info says", which is what a verifier without a target assumes. ``payload_size`` is the size
    Omaha announced (with ``metadata_size``, the header and manifest's, it bounds where blobs may lie), and
    ``kernel_room`` the free bytes of the kernel's directory (None: the kernel is not written). Each block of the
    partition or the kernel is written at most once, and only blocks that the final hash covers.
    """
    block_size = manifest.block_size
    if block_size != BLOCK_SIZE:
        raise PayloadError(
            ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR,
            f"payload block size is {block_size}, only {BLOCK_SIZE} is supported",
        )
    planned_ops = flatten_operations(manifest)
    _check_counts(planned_ops)
    limits: dict[Destination, int | None] = {
        Destination.PARTITION: _partition_blocks(manifest, partition_size, block_size)
    }
    for proc in manifest.procedures:
        name = procedure_type_name(proc)
        if name is None:
            continue
        if not proc.HasField("new_info"):
            raise PayloadError(
                ErrorCode.DOWNLOAD_MANIFEST_PARSE_ERROR, f"payload {name} procedure has no new_info"
            )
        dest = Destination.KERNEL if name == "KERNEL" else Destination.PCR_POLICY
        if dest in limits:
            raise PayloadError(
                ErrorCode.DOWNLOAD_MANIFEST_PARSE_ERROR, f"payload has more than one {name} procedure"
            )
        if dest is Destination.KERNEL:
            _check_kernel_size(proc.new_info.size, block_size, kernel_room)
        limits[dest] = _blocks(proc.new_info.size, block_size)

    running_offset = 0
    for planned in planned_ops:
        limit = limits.get(planned.destination)
        _check_operation(planned, block_size, limit, running_offset)
        running_offset += planned.data_length
    for dest in (Destination.PARTITION, Destination.KERNEL):
        _check_written_once([p for p in planned_ops if p.destination is dest], dest)

    has_sig_offset = manifest.HasField("signatures_offset")
    if has_sig_offset != manifest.HasField("signatures_size"):
        raise PayloadError(
            ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR,
            "payload has only one of signatures_offset and signatures_size",
        )
    if has_sig_offset:
        if manifest.signatures_offset != running_offset:
            raise PayloadError(
                ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR,
                f"payload signatures start at {manifest.signatures_offset}, "
                f"but the operation data ends at {running_offset}",
            )
        if not 0 < manifest.signatures_size <= MAX_SIGNATURES_SIZE:
            raise PayloadError(
                ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR,
                f"payload signatures size {manifest.signatures_size} is outside (0, {MAX_SIGNATURES_SIZE}]",
            )
    if payload_size is not None and metadata_size is not None:
        _check_payload_size(manifest, metadata_size + running_offset, payload_size)


def _check_counts(planned_ops: list[PlannedOperation]) -> None:
    if len(planned_ops) > MAX_OPERATIONS:
        raise PayloadError(
            ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR,
            f"payload has {len(planned_ops)} operations, more than the limit of {MAX_OPERATIONS}",
        )
    extents = sum(len(p.operation.dst_extents) + len(p.operation.src_extents) for p in planned_ops)
    if extents > MAX_EXTENTS:
        raise PayloadError(
            ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR,
            f"payload operations have {extents} extents, more than the limit of {MAX_EXTENTS}",
        )


def _partition_blocks(manifest: pb.DeltaArchiveManifest, partition_size: int | None, block_size: int) -> int | None:
    """How many blocks of the partition operations may write: those new_partition_info's hash covers.

    A size of 0 (or a partial last block) would let operations write bytes the final hash never reads, so it is
    refused rather than hashed as an empty partition.
    """
    if not manifest.HasField("new_partition_info"):
        return partition_size // block_size if partition_size is not None else None
    size = manifest.new_partition_info.size
    if size == 0 or size % block_size:
        raise PayloadError(
            ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR,
            f"new partition size {size} is not a positive whole number of {block_size}-byte blocks",
        )
    if partition_size is not None and size > partition_size:
        raise PayloadError(
            ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR,
            f"new partition is {size} bytes, the target only {partition_size}",
        )
    return size // block_size


def _check_kernel_size(size: int, block_size: int, room: int | None) -> None:
    if size > MAX_KERNEL_SIZE:
        raise PayloadError(
            ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR,
            f"payload kernel is {size} bytes, more than the limit of {MAX_KERNEL_SIZE}",
        )
    needed = _blocks(size, block_size) * block_size
    if room is not None and needed > room:
        raise PayloadError(
            ErrorCode.DOWNLOAD_WRITE_ERROR,
            f"the new kernel needs {needed} bytes, its directory has {room} free: free some space there and the "
            "next check will try again",
        )


def _check_written_once(planned_ops: list[PlannedOperation], dest: Destination) -> None:
    """No block written twice: a full payload writes each block once, so no payload may write more than that."""
    runs = sorted(
        (extent.start_block, extent.start_block + extent.num_blocks, planned.index)
        for planned in planned_ops
        for extent in planned.operation.dst_extents
        if extent.start_block != SPARSE_HOLE
    )
    for (_, end, first), (start, _, second) in itertools.pairwise(runs):
        if start < end:
            raise PayloadError(
                ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR,
                f"payload operations {first} and {second} both write block {start} of the {dest.value}",
            )


def _check_payload_size(manifest: pb.DeltaArchiveManifest, data_end: int, payload_size: int) -> None:
    """The blobs lie within the payload size Omaha announced, and the signature blob ends exactly there.

    Operation data past the announced end means the payload is cut short of its signature (17; 11 when it names
    none). A signature
    blob that ends short of it means bytes would follow it (11). One that ends past it is left to the end of
    the download, which tells a truncated payload (17) from a changed one (10): it costs no writes.
    """
    signed = manifest.HasField("signatures_size")
    if data_end > payload_size:
        raise PayloadError(
            ErrorCode.SIGNED_DELTA_PAYLOAD_EXPECTED if signed else ErrorCode.DOWNLOAD_SIZE_MISMATCH,
            f"payload operation data ends at byte {data_end}, past the {payload_size} bytes announced: the payload "
            f"is cut short{' of its signature' if signed else ''}",
        )
    end = data_end + (manifest.signatures_size if signed else 0)
    if end < payload_size:
        raise PayloadError(
            ErrorCode.DOWNLOAD_SIZE_MISMATCH,
            f"payload manifest describes {end} bytes, {payload_size} were announced",
        )


def writes_sequentially(manifest: pb.DeltaArchiveManifest) -> bool:
    """True when the partition operations write blocks 0, 1, 2… in order, without holes, up to the new size.

    Every full payload does. Its partition can then be hashed from the bytes as they are written, and no
    operation reads what another wrote.
    """
    if not manifest.HasField("new_partition_info"):
        return False
    next_block = 0
    for op in manifest.partition_operations:
        if op.type not in (pb.InstallOperation.REPLACE, pb.InstallOperation.REPLACE_BZ):
            return False
        for extent in op.dst_extents:
            if extent.start_block != next_block:
                return False
            next_block += extent.num_blocks
    return next_block * manifest.block_size >= manifest.new_partition_info.size


@dataclass(frozen=True)
class ProcedureSummary:
    type: str | None
    operations: int
    new_size: int | None
    new_sha256: bytes | None


@dataclass(frozen=True)
class ManifestSummary:
    """Version-independent facts about a manifest, for logs, ``update-payload show`` and callers."""

    block_size: int
    partition_operations: int
    operation_counts: Mapping[str, int]  # flat list, by type name
    noop_operations: int
    new_partition_size: int | None
    new_partition_sha256: bytes | None
    procedures: tuple[ProcedureSummary, ...]
    signatures_offset: int | None
    signatures_size: int | None

    @property
    def kernel(self) -> ProcedureSummary | None:
        return next((p for p in self.procedures if p.type == "KERNEL"), None)


def summarize_manifest(manifest: pb.DeltaArchiveManifest) -> ManifestSummary:
    counts: dict[str, int] = {}
    for planned in flatten_operations(manifest):
        name = operation_type_name(planned.operation.type)
        counts[name] = counts.get(name, 0) + 1
    npi = manifest.new_partition_info if manifest.HasField("new_partition_info") else None
    procedures = tuple(
        ProcedureSummary(
            type=procedure_type_name(proc),
            operations=len(proc.operations),
            new_size=proc.new_info.size if proc.HasField("new_info") else None,
            new_sha256=proc.new_info.hash if proc.HasField("new_info") else None,
        )
        for proc in manifest.procedures
    )
    return ManifestSummary(
        block_size=manifest.block_size,
        partition_operations=len(manifest.partition_operations),
        operation_counts=counts,
        noop_operations=len(manifest.noop_operations),
        new_partition_size=npi.size if npi is not None else None,
        new_partition_sha256=npi.hash if npi is not None else None,
        procedures=procedures,
        signatures_offset=manifest.signatures_offset if manifest.HasField("signatures_offset") else None,
        signatures_size=manifest.signatures_size if manifest.HasField("signatures_size") else None,
    )


# --- incremental parser ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeaderParsed:
    header: PayloadHeader


@dataclass(frozen=True)
class ManifestParsed:
    manifest: pb.DeltaArchiveManifest
    operations: tuple[PlannedOperation, ...]


@dataclass(frozen=True)
class OperationData:
    """An operation whose data blob arrived complete and matched its SHA-256 (empty blob for MOVE).

    ``buffer`` is the buffer from the parser's ``allocate`` that holds ``blob`` when the blob was assembled from
    several chunks (None when it is a slice of one chunk): whoever is done with the blob gives it back.
    """

    op_index: int
    op: pb.InstallOperation
    destination: Destination
    blob: memoryview
    buffer: bytearray | None = None


@dataclass(frozen=True)
class SignatureBlob:
    data: bytes


PayloadEvent = HeaderParsed | ManifestParsed | OperationData | SignatureBlob


class _Stage(enum.Enum):
    HEADER = "header"
    MANIFEST = "manifest"
    OPERATIONS = "operation data"
    SIGNATURES = "signature blob"
    DONE = "end"


class PayloadStreamParser:
    """Turns payload bytes, in chunks of any size, into events.

    Each unit (header, manifest, one operation's blob, the signature blob) is handed out once complete: as a
    zero-copy slice of the caller's chunk when it lies inside one, else assembled in a buffer of its size
    (an operation blob in one from ``allocate``, which may be larger, so a caller can reuse buffers). The caller
    must not modify a chunk after feeding it. An operation's blob is checked against its SHA-256 before its
    event is produced. Memory is bounded by the unit limits (manifest, operation, signature). Bytes after the
    signature blob (or after the last operation of an unsigned payload) are an error.

    A caller that holds back the buffers of the events it has not handled yet feeds at most
    :attr:`unit_remaining` bytes at a time: then one call completes at most one unit, so ``allocate`` is never
    asked for a buffer while the previous one is still in the caller's hands.
    """

    def __init__(
        self,
        *,
        partition_size: int | None = None,
        payload_size: int | None = None,
        kernel_room: int | None = None,
        allocate: Callable[[int], bytearray] = bytearray,
    ) -> None:
        """The sizes are :func:`validate_manifest`'s bounds."""
        self._partition_size = partition_size
        self._payload_size = payload_size
        self._kernel_room = kernel_room
        self._allocate = allocate
        self._stage = _Stage.HEADER
        self._need = HEADER_SIZE
        self._buf: bytearray | None = None
        self._buf_pooled = False
        self._filled = 0
        self._consumed = 0
        self.header: PayloadHeader | None = None
        self.manifest: pb.DeltaArchiveManifest | None = None
        self._operations: list[PlannedOperation] = []
        self._next_op = 0

    @property
    def done(self) -> bool:
        return self._stage is _Stage.DONE

    @property
    def consumed(self) -> int:
        """Bytes accepted so far."""
        return self._consumed

    @property
    def unit_remaining(self) -> int:
        """Bytes that complete the unit being read (0 once the payload is complete)."""
        if self._stage is _Stage.DONE:
            return 0
        return self._need - self._filled if self._buf is not None else self._need

    def describe_position(self) -> str:
        """Where the parser stands, for error messages about truncated payloads."""
        if self._stage is _Stage.OPERATIONS:
            return f"in the data of operation {self._operations[self._next_op].index} after {self._consumed} bytes"
        return f"in the {self._stage.value} after {self._consumed} bytes"

    def feed(self, chunk: bytes | bytearray | memoryview) -> list[PayloadEvent]:
        view = memoryview(chunk).cast("B") if not isinstance(chunk, bytes) else memoryview(chunk)
        events: list[PayloadEvent] = []
        pos = 0
        size = len(view)
        while True:
            if self._stage is _Stage.DONE:
                if pos < size:
                    raise PayloadError(
                        ErrorCode.DOWNLOAD_SIZE_MISMATCH,
                        f"payload continues after its end at byte {self._consumed} ({size - pos} more bytes)",
                    )
                return events
            if self._buf is None and self._need == 0:
                self._complete(memoryview(b""), events)
                continue
            if pos == size:
                return events
            if self._buf is None and size - pos >= self._need:
                unit = view[pos : pos + self._need]
                pos += self._need
                self._consumed += self._need
                self._complete(unit, events)
                continue
            if self._buf is None:
                self._buf_pooled = self._stage is _Stage.OPERATIONS
                self._buf = self._allocate(self._need) if self._buf_pooled else bytearray(self._need)
                self._filled = 0
            take = min(self._need - self._filled, size - pos)
            self._buf[self._filled : self._filled + take] = view[pos : pos + take]
            self._filled += take
            pos += take
            self._consumed += take
            if self._filled == self._need:
                buffer, self._buf = self._buf, None
                self._complete(memoryview(buffer)[: self._need], events, buffer if self._buf_pooled else None)

    def _complete(self, unit: memoryview, events: list[PayloadEvent], buffer: bytearray | None = None) -> None:
        if self._stage is _Stage.HEADER:
            self.header = parse_header(unit)
            events.append(HeaderParsed(self.header))
            self._stage = _Stage.MANIFEST
            self._need = self.header.manifest_size
        elif self._stage is _Stage.MANIFEST:
            manifest = parse_manifest(unit)
            assert self.header is not None
            validate_manifest(
                manifest,
                partition_size=self._partition_size,
                metadata_size=self.header.metadata_size,
                payload_size=self._payload_size,
                kernel_room=self._kernel_room,
            )
            self.manifest = manifest
            self._operations = flatten_operations(manifest)
            events.append(ManifestParsed(manifest, tuple(self._operations)))
            self._advance(events)
        elif self._stage is _Stage.OPERATIONS:
            planned = self._operations[self._next_op]
            digest = hashlib.sha256(unit).digest()
            if digest != planned.operation.data_sha256_hash:
                raise _op_error(
                    ErrorCode.DOWNLOAD_OPERATION_HASH_MISMATCH,
                    planned,
                    f"data SHA-256 is {digest.hex()}, the manifest says {planned.operation.data_sha256_hash.hex()}",
                )
            events.append(OperationData(planned.index, planned.operation, planned.destination, unit, buffer))
            self._next_op += 1
            self._advance(events)
        elif self._stage is _Stage.SIGNATURES:
            events.append(SignatureBlob(bytes(unit)))
            self._stage = _Stage.DONE
            self._need = 0

    def _advance(self, events: list[PayloadEvent]) -> None:
        """Emit the operations that carry no data, then wait for the next blob or the signatures."""
        while self._next_op < len(self._operations) and self._operations[self._next_op].data_length == 0:
            planned = self._operations[self._next_op]
            events.append(
                OperationData(planned.index, planned.operation, planned.destination, memoryview(b""))
            )
            self._next_op += 1
        if self._next_op < len(self._operations):
            self._stage = _Stage.OPERATIONS
            self._need = self._operations[self._next_op].data_length
            return
        assert self.manifest is not None
        if self.manifest.HasField("signatures_offset"):
            self._stage = _Stage.SIGNATURES
            self._need = self.manifest.signatures_size
        else:
            self._stage = _Stage.DONE
            self._need = 0
