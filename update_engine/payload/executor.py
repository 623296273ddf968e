"""Executing one payload operation: its verified data blob in, its destination blocks written.

Rules
-----
* Only operations the parser handed out are executed: their blob matched its SHA-256 and the manifest passed
  :func:`~update_engine.payload.format.validate_manifest`, so nothing unverified reaches a target.
* Every write goes through a :class:`~update_engine.payload.target.BoundedFile`, which refuses any byte outside
  its window; the executor adds its own checks on what an operation produces (exactly its blocks, no more).
* An :class:`Executor` holds no state that changes after construction: any number of threads may execute
  operations at once, as long as their destinations are disjoint (the sink only runs operations in parallel
  for payloads whose operations write the partition in order, each block once).
* ``on_data``, when given, sees every byte an operation writes to the partition, in order and zero-padded to
  whole blocks (holes excepted): the partition hash is computed from it.
"""

from __future__ import annotations

import bz2
from collections.abc import Callable
from dataclasses import dataclass

from update_engine.errors import ErrorCode
from update_engine.payload import update_metadata_pb2 as pb
from update_engine.payload.format import SPARSE_HOLE, Destination, OperationData, PayloadError
from update_engine.payload.target import BoundedFile

# Largest piece produced by one bzip2 decompression step.
PIECE = 256 * 1024

DataCallback = Callable[[memoryview], None]


def _execution_error(event: OperationData, problem: str) -> PayloadError:
    return PayloadError(ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR, f"payload operation {event.op_index} {problem}")


class _ExtentWriter:
    """Writes one operation's output stream into its destination extents, skipping holes."""

    def __init__(
        self, target: BoundedFile | None, extents: list[pb.Extent], block_size: int, on_data: DataCallback | None
    ) -> None:
        self._target = target
        self._on_data = on_data
        self.block_size = block_size
        self._runs = [
            (None if extent.start_block == SPARSE_HOLE else extent.start_block * block_size,
             extent.num_blocks * block_size)
            for extent in extents
        ]
        self.capacity = sum(length for _, length in self._runs)
        self.written = 0
        self._run = 0
        self._run_pos = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        if len(view) > self.capacity - self.written:
            raise PayloadError(
                ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR,
                f"operation produces more than the {self.capacity} bytes of its destination extents",
            )
        while view:
            offset, length = self._runs[self._run]
            piece = view[: length - self._run_pos]
            if offset is not None:
                if self._target is not None:
                    self._target.pwrite(piece, offset + self._run_pos)
                if self._on_data is not None:
                    self._on_data(piece)
            self._run_pos += len(piece)
            self.written += len(piece)
            view = view[len(piece) :]
            if self._run_pos == length:
                self._run += 1
                self._run_pos = 0

    def pad_last_block(self) -> None:
        tail = self.written % self.block_size
        if tail:
            self.write(bytes(self.block_size - tail))


@dataclass(frozen=True)
class Executor:
    """Runs operations against the partition (None: nothing to write, only ``on_data`` to feed) and the kernel
    file (None: kernel operations are skipped)."""

    partition: BoundedFile | None
    kernel: BoundedFile | None
    block_size: int

    def output_size(self, event: OperationData) -> int:
        """Bytes the operation writes, holes included: what it may make its ``on_data`` hold."""
        return sum(extent.num_blocks for extent in event.op.dst_extents) * self.block_size

    def execute(self, event: OperationData, on_data: DataCallback | None = None) -> None:
        """Apply one operation; ``on_data`` gets what it writes to the partition (see the module rules)."""
        if event.destination is Destination.PARTITION:
            if self.partition is None and on_data is None:
                return  # nothing to write and nothing to hash: only the blob's own hash could be checked
            writer = _ExtentWriter(self.partition, list(event.op.dst_extents), self.block_size, on_data)
        elif event.destination is Destination.KERNEL and self.kernel is not None:
            writer = _ExtentWriter(self.kernel, list(event.op.dst_extents), self.block_size, None)
        else:
            return
        op_type = event.op.type
        if op_type == pb.InstallOperation.REPLACE:
            writer.write(event.blob)
        elif op_type == pb.InstallOperation.REPLACE_BZ:
            self._bunzip_into(event, writer)
        elif op_type == pb.InstallOperation.MOVE:
            writer.write(self._read_sources(event))
        else:  # refused by validate_manifest already
            raise _execution_error(event, f"has type {op_type}, which cannot be executed")
        writer.pad_last_block()
        if writer.written != writer.capacity:
            raise _execution_error(event, f"filled {writer.written} of its {writer.capacity} bytes")

    def _bunzip_into(self, event: OperationData, writer: _ExtentWriter) -> None:
        """Decompress in bounded pieces; more output than the destination holds is refused (no bombs)."""
        decompressor = bz2.BZ2Decompressor()
        data: bytes | memoryview = event.blob
        try:
            while True:
                room = writer.capacity - writer.written
                out = decompressor.decompress(data, max_length=min(PIECE, room + 1))
                data = b""
                if len(out) > room:
                    raise _execution_error(event, f"decompresses to more than its {writer.capacity} bytes")
                writer.write(out)
                if decompressor.eof:
                    break
                if decompressor.needs_input:
                    raise _execution_error(event, "has truncated bzip2 data")
        except (OSError, EOFError, ValueError) as exc:
            raise _execution_error(event, f"has bzip2 data that does not decompress: {exc}") from exc
        if decompressor.unused_data:
            raise _execution_error(event, "has bytes after the end of its bzip2 data")
        if writer.written <= writer.capacity - writer.block_size:
            raise _execution_error(
                event, f"decompresses to {writer.written} bytes, too few for its {writer.capacity} bytes of blocks"
            )

    def _read_sources(self, event: OperationData) -> bytearray:
        """A MOVE's source blocks, read from the partition as earlier operations left it."""
        if self.partition is None:
            raise _execution_error(event, "reads blocks, but there is no partition to read")
        extents = list(event.op.src_extents)
        data = bytearray(sum(extent.num_blocks for extent in extents) * self.block_size)
        view = memoryview(data)
        pos = 0
        for extent in extents:
            length = extent.num_blocks * self.block_size
            self.partition.preadinto(
                view[pos : pos + length], extent.start_block * self.block_size,
                ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR,
            )
            pos += length
        return data
