"""Apply a payload to the passive partition and verify it, in one streaming pass with flat memory.

Theory of operation
-------------------
The downloader hands the payload's bytes in order to :meth:`PayloadSink.write` (from a thread) or
:meth:`PayloadSink.write_async` (from the event loop, which then never blocks: it only queues a reference and,
when the pipeline is full, awaits room). Chunks are not copied: a bounded fan-out queue (a few MiB in flight)
shows every chunk to two workers, each at its own pace:

* the **digest worker** computes the SHA-256 of the whole payload. On the way it snapshots the hash state where
  the signature blob starts: that snapshot is exactly the digest the signature covers, so the signed region is
  hashed once, not twice;
* the **apply worker** feeds :class:`~update_engine.payload.format.PayloadStreamParser`, which hands out each
  operation once its data blob is complete and matches its SHA-256, and executes it on the target (or on the
  kernel's temporary file) through a :class:`~update_engine.payload.target.BoundedFile`, which refuses any byte
  outside the partition. Nothing reaches the target before its operation's hash matched.
  The worker feeds the parser whole blobs: a blob split across network chunks is gathered into a reused buffer
  from a small pool, so no memory is allocated (and page-faulted in) per operation.

Partition hash. When the partition operations write the partition from block 0 upward with no gaps or holes and
cover ``new_partition_info.size`` (every full payload does), a third worker hashes the bytes as they are written,
which saves reading the whole partition back at the end. Otherwise (MOVE, holes, any other order) the target is
read back in :meth:`PayloadSink.close`. The in-flight hash trusts that the data ``pwrite`` accepted is what the
page cache holds; write and ``fsync`` errors are still checked.

hashlib (for buffers over 2 KiB), bz2 and ``os.pwrite`` release the GIL, so the three hashes really run in
parallel; the Python work per chunk is a few queue operations.

Checks at :meth:`PayloadSink.close`, in this order, the first failure wins: payload size, base64 SHA-256 of the
whole payload, ``new_partition_info`` present, signature (mandatory: no public key, no update), payload complete,
partition hash, kernel size and hash. Errors found while streaming (operation hashes, malformed manifest,
extents outside the partition…) end the attempt at once.
"""

from __future__ import annotations

import asyncio
import base64
import bz2
import contextlib
import functools
import hashlib
import logging
import os
import tempfile
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from update_engine.errors import ErrorCode, UpdateEngineError
from update_engine.payload import update_metadata_pb2 as pb
from update_engine.payload.format import (
    HEADER_SIZE,
    SIGNATURE_VERSION,
    SPARSE_HOLE,
    Destination,
    ManifestParsed,
    ManifestSummary,
    OperationData,
    PayloadError,
    PayloadStreamParser,
    SignatureBlob,
    parse_signatures,
    procedure_type_name,
    summarize_manifest,
)
from update_engine.payload.target import BoundedFile, WriteTarget

log = logging.getLogger(__name__)

# The new kernel is written to ``.<name>.<random>.partial`` beside its final path, then renamed.
PARTIAL_KERNEL_SUFFIX = ".partial"

# Bytes in flight between the downloader and the slower of the digest and apply workers. Small enough for flat
# memory, large enough to ride out scheduling jitter. The async writer is woken when half of it is free again.
QUEUE_BYTES = 4 * 1024 * 1024
# Bytes written but not yet hashed by the partition-hash worker (references, not copies).
_PARTITION_QUEUE_BYTES = 4 * 1024 * 1024
# Reused buffers that gather operation blobs split across chunks; one blob may exceed it (it is then the only one).
_GATHER_POOL_BYTES = 4 * 1024 * 1024
# Chunks smaller than this are gathered before being queued: per-item costs (locks, calls) dominate below it.
_COALESCE_BELOW = 64 * 1024
_COALESCE_TARGET = 256 * 1024
# Written ranges of the target are handed to the kernel's writeback in batches of this size.
_WRITEBACK_BYTES = 8 * 1024 * 1024
# Largest piece produced by one bzip2 decompression step or one read-back.
_PIECE = 1024 * 1024
_READ_CHUNK = 1024 * 1024


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


def writes_sequentially(manifest: pb.DeltaArchiveManifest) -> bool:
    """True when the partition operations write blocks 0, 1, 2… in order, without holes, up to the new size."""
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


class _EndOfStream:
    pass


_END = _EndOfStream()
_Item = bytes | bytearray | memoryview | _EndOfStream


# Consumers of the fan-out queue.
_APPLY = 0
_DIGEST = 1


class _Stopped(Exception):
    """Raised inside a worker when the pipeline was stopped (by abort() or by another worker's failure)."""


class _FanOut:
    """One producer, a fixed number of consumers that each get every item in order; bounded by bytes in flight.

    An item leaves the queue (and stops counting) once every consumer has taken it, so the bound holds between
    the producer and the slowest consumer, and each chunk is shared rather than copied per consumer. A producer
    on an event loop uses :meth:`try_put` and :meth:`call_when_room`; :meth:`stop` wakes and releases everyone.
    """

    def __init__(self, limit: int, consumers: int) -> None:
        self._limit = limit
        self._low_water = limit // 2
        self._items: deque[tuple[_Item, int]] = deque()
        self._first = 0  # sequence number of _items[0]
        self._cursors = [0] * consumers
        self._bytes = 0
        self._stopped = False
        self._room_callback: Callable[[], None] | None = None
        self._room_for = 0
        lock = threading.Lock()
        self._not_full = threading.Condition(lock)
        self._not_empty = threading.Condition(lock)

    def _fits(self, size: int) -> bool:
        return not self._bytes or self._bytes + size <= self._limit

    def _append(self, item: _Item, size: int) -> None:
        self._items.append((item, size))
        self._bytes += size
        self._not_empty.notify_all()

    def put(self, item: _Item, size: int) -> bool:
        """Queue ``item``, waiting while the queue is full; False when the queue was stopped."""
        with self._not_full:
            while not self._stopped and not self._fits(size):
                self._not_full.wait()
            if self._stopped:
                return False
            self._append(item, size)
            return True

    def try_put(self, item: _Item, size: int) -> bool | None:
        """Queue ``item`` if it fits now: True; False when full; None when the queue was stopped."""
        with self._not_full:
            if self._stopped:
                return None
            if not self._fits(size):
                return False
            self._append(item, size)
            return True

    def _has_room(self, size: int) -> bool:
        return self._bytes <= self._low_water and self._fits(size)

    def call_when_room(self, size: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` once (from a consumer's thread, or now) when half the queue is free and ``size``
        bytes fit, or when the queue stopped."""
        with self._not_full:
            ready = self._stopped or self._has_room(size)
            if not ready:
                self._room_callback, self._room_for = callback, size
        if ready:
            callback()

    def get(self, consumer: int) -> _Item | None:
        """The next item for ``consumer``, waiting for one; None when the queue was stopped."""
        callback = None
        with self._not_empty:
            while not self._stopped and self._cursors[consumer] - self._first >= len(self._items):
                self._not_empty.wait()
            if self._stopped:
                return None
            item = self._items[self._cursors[consumer] - self._first][0]
            self._cursors[consumer] += 1
            freed = False
            while self._items and min(self._cursors) > self._first:
                self._bytes -= self._items.popleft()[1]
                self._first += 1
                freed = True
            if freed:
                self._not_full.notify()
                if self._room_callback is not None and self._has_room(self._room_for):
                    callback, self._room_callback = self._room_callback, None
        if callback is not None:
            callback()
        return item

    def stop(self) -> None:
        with self._not_full:
            self._stopped = True
            self._items.clear()
            self._bytes = 0
            callback, self._room_callback = self._room_callback, None
            self._not_full.notify_all()
            self._not_empty.notify_all()
        if callback is not None:
            callback()


class _Release:
    """Queued behind the data it covers: the partition-hash worker gives ``buffer`` back to the pool."""

    __slots__ = ("buffer",)

    def __init__(self, buffer: bytearray) -> None:
        self.buffer = buffer


_PartItem = bytes | bytearray | memoryview | _Release | _EndOfStream


class _ByteQueue:
    """FIFO of byte chunks bounded by their total size; :meth:`stop` wakes and releases everyone."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._items: deque[tuple[_PartItem, int]] = deque()
        self._bytes = 0
        self._stopped = False
        lock = threading.Lock()
        self._not_full = threading.Condition(lock)
        self._not_empty = threading.Condition(lock)

    def put(self, item: _PartItem, size: int) -> bool:
        """Queue ``item``, waiting while the queue is full; False when the queue was stopped."""
        with self._not_full:
            while not self._stopped and self._bytes and self._bytes + size > self._limit:
                self._not_full.wait()
            if self._stopped:
                return False
            self._items.append((item, size))
            self._bytes += size
            self._not_empty.notify()
            return True

    def get(self) -> _PartItem | None:
        """Next item, waiting for one; None when the queue was stopped."""
        with self._not_empty:
            while not self._items and not self._stopped:
                self._not_empty.wait()
            if self._stopped:
                return None
            item, size = self._items.popleft()
            self._bytes -= size
            self._not_full.notify()
            return item

    def stop(self) -> None:
        with self._not_full:
            self._stopped = True
            self._items.clear()
            self._bytes = 0
            self._not_full.notify_all()
            self._not_empty.notify_all()


class _BufferPool:
    """Reused buffers for gathering operation blobs, bounded by their total size.

    A fresh buffer per blob would cost an allocation that the C library often returns to the kernel on release,
    and so a page fault per 4 KiB on the next one: more CPU than the copy itself.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._free: list[bytearray] = []
        self._in_use = 0
        self._stopped = False
        self._cond = threading.Condition(threading.Lock())

    def acquire(self, size: int) -> bytearray:
        """A buffer of at least ``size`` bytes, waiting while the pool is exhausted; raises _Stopped."""
        with self._cond:
            while not self._stopped and self._in_use and self._in_use + size > self._limit:
                self._cond.wait()
            if self._stopped:
                raise _Stopped()
            buffer = next((b for b in self._free if len(b) >= size), None)
            if buffer is not None:
                self._free.remove(buffer)
            else:
                cached = sum(len(b) for b in self._free)
                while self._free and self._in_use + cached + size > self._limit:
                    cached -= len(self._free.pop(0))
                buffer = bytearray(size)
            self._in_use += len(buffer)
            return buffer

    def release(self, buffer: bytearray) -> None:
        with self._cond:
            self._in_use -= len(buffer)
            self._free.append(buffer)
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._free.clear()
            self._cond.notify_all()


def _wake_from_thread(loop: asyncio.AbstractEventLoop, future: asyncio.Future[None]) -> None:
    """Resolve ``future`` on its loop from any thread; harmless if it was cancelled or the loop is gone."""

    def wake() -> None:
        if not future.done():
            future.set_result(None)

    with contextlib.suppress(RuntimeError):  # the loop was closed: nobody awaits any more
        loop.call_soon_threadsafe(wake)


def _as_payload_error(exc: BaseException) -> PayloadError:
    if isinstance(exc, PayloadError):
        return exc
    if isinstance(exc, UpdateEngineError):
        return PayloadError(exc.code, exc.message)
    if isinstance(exc, OSError):
        return PayloadError(ErrorCode.DOWNLOAD_WRITE_ERROR, f"I/O error while applying the payload: {exc}")
    log.error("unexpected failure while applying the payload", exc_info=exc)
    return PayloadError(ErrorCode.ERROR, f"unexpected failure while applying the payload: {exc!r}")


class _ExtentWriter:
    """Writes a stream of bytes into a list of extents, skipping holes, never past ``limit``."""

    def __init__(
        self,
        io: BoundedFile | None,
        limit: int,
        extents: list[pb.Extent],
        block_size: int,
        what: str,
        on_data: Callable[[bytes | bytearray | memoryview], None] | None,
        on_written: Callable[[int, int], None] | None = None,
    ) -> None:
        self._io = io
        self._on_written = on_written
        self.block_size = block_size
        self._what = what
        self._on_data = on_data
        self._runs: list[tuple[int | None, int]] = []
        for extent in extents:
            length = extent.num_blocks * block_size
            if extent.start_block == SPARSE_HOLE:
                self._runs.append((None, length))
                continue
            start = extent.start_block * block_size
            if start + length > limit:
                raise PayloadError(
                    ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR,
                    f"extent [{start}, {start + length}) crosses the end of {what} ({limit} bytes)",
                )
            self._runs.append((start, length))
        self.capacity = sum(length for _, length in self._runs)
        self.written = 0
        self._run = 0
        self._run_pos = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if len(data) > self.capacity - self.written:
            raise PayloadError(
                ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR,
                f"operation produces more than the {self.capacity} bytes of its destination extents",
            )
        if self._on_data is not None:
            self._on_data(data)
        view = memoryview(data)
        while view:
            offset, length = self._runs[self._run]
            take = min(length - self._run_pos, len(view))
            if offset is not None and self._io is not None:
                self._io.pwrite(view[:take], offset + self._run_pos)
                if self._on_written is not None:
                    self._on_written(offset + self._run_pos, take)
            self._run_pos += take
            self.written += take
            view = view[take:]
            if self._run_pos == length:
                self._run += 1
                self._run_pos = 0

    def pad_last_block(self) -> None:
        tail = self.written % self.block_size
        if tail:
            self.write(bytes(self.block_size - tail))


class PayloadSink:
    """Consumes a payload as it downloads: writes the partition (and kernel), verifies everything at close().

    :meth:`write` (or :meth:`write_async`) and :meth:`close` are called one at a time, never concurrently;
    :meth:`write` may block while the workers catch up, :meth:`write_async` awaits instead. ``on_progress`` is
    called by them with the number of bytes accepted so far. Any exception from :meth:`write`,
    :meth:`write_async` or :meth:`close` leaves the sink aborted (workers stopped, files closed, the kernel's
    temporary file removed); calling :meth:`abort` again is harmless.
    """

    def __init__(
        self,
        target: WriteTarget | None,
        *,
        public_key_pem: bytes | None,
        expected_size: int | None,
        expected_sha256_b64: str | None,
        kernel_path: Path | None = None,
        on_progress: Callable[[int], None] | None = None,
        require_signature: bool = True,
    ) -> None:
        self._public_key_pem = public_key_pem
        self._expected_size = expected_size
        self._expected_sha256_b64 = expected_sha256_b64
        self._kernel_path = kernel_path
        self._on_progress = on_progress
        self._require_signature = require_signature

        self._received = 0
        self._pending = bytearray()
        self._closed = False
        self._aborted = False
        self._failure: PayloadError | None = None
        self._failure_lock = threading.Lock()
        self._stop = threading.Event()

        self._parser = PayloadStreamParser(partition_size=target.size if target is not None else None)
        self._manifest: pb.DeltaArchiveManifest | None = None
        self._signature_blob: bytes | None = None

        # Shared with the digest worker: where the signed region ends (None: unsigned or unknown).
        self._boundary = threading.Event()
        self._signed_end: int | None = None
        self._signed_digest: bytes | None = None
        self._payload_digest: bytes | None = None

        # Partition writing, set up when the manifest arrives.
        self._target_io: BoundedFile | None = None
        self._part_io: BoundedFile | None = None
        self._part_limit = 0
        self._sequential = False
        self._seq_remaining = 0
        self._part_hash_digest: bytes | None = None
        self._part_hashed = 0
        self._writeback_start = 0
        self._writeback_end = 0

        self._kernel_fd: int | None = None
        self._kernel_io: BoundedFile | None = None
        self._kernel_tmp: Path | None = None
        self._kernel_limit = 0
        self._kernel_info: pb.InstallInfo | None = None

        if target is not None:
            self._target_io = target.open()

        self._chunks = _FanOut(QUEUE_BYTES, consumers=2)
        self._part_q = _ByteQueue(_PARTITION_QUEUE_BYTES)
        self._gather_pool = _BufferPool(_GATHER_POOL_BYTES)
        # Apply worker: sizes of the blobs still to come (known from the manifest), and the one being gathered.
        self._blob_sizes: deque[int] = deque()
        self._unit_left = 0
        self._unit_is_blob = False
        self._gather: bytearray | None = None
        self._gathered = 0
        self._workers = [
            threading.Thread(target=self._apply_main, name="payload-apply", daemon=True),
            threading.Thread(target=self._digest_main, name="payload-digest", daemon=True),
            threading.Thread(target=self._partition_hash_main, name="payload-partition-hash", daemon=True),
        ]
        for worker in self._workers:
            worker.start()

    # --- caller side ---------------------------------------------------------------------------------------------

    def write(self, chunk: bytes | bytearray | memoryview) -> None:
        """Accept the next bytes of the payload; a ``bytes`` chunk is kept by reference, anything else copied."""
        for item in self._accept(chunk):
            self._dispatch(item)
        if self._on_progress is not None:
            self._on_progress(self._received)

    async def write_async(self, chunk: bytes | bytearray | memoryview) -> None:
        """Like :meth:`write`, for an event loop: never blocks it, awaits room in the pipeline instead.

        If the awaiting task is cancelled, the sink must still be aborted (as after any failure).
        """
        for item in self._accept(chunk):
            while not self._try_dispatch(item):
                loop = asyncio.get_running_loop()
                room: asyncio.Future[None] = loop.create_future()
                self._chunks.call_when_room(len(item), functools.partial(_wake_from_thread, loop, room))
                await room
        if self._on_progress is not None:
            self._on_progress(self._received)

    def _accept(self, chunk: bytes | bytearray | memoryview) -> tuple[bytes | bytearray, ...]:
        """Count ``chunk``; the items to queue now (none while short chunks are being gathered)."""
        self._raise_failure()
        if self._closed or self._aborted:
            raise PayloadError(ErrorCode.ERROR, "write() on a payload sink that is closed")
        size = len(chunk)
        if not size:
            return ()
        self._received += size
        if self._expected_size is not None and self._received > self._expected_size:
            self._fail(
                PayloadError(
                    ErrorCode.DOWNLOAD_SIZE_MISMATCH,
                    f"payload is longer than the {self._expected_size} bytes announced",
                )
            )
            self._raise_failure()
        if size < _COALESCE_BELOW:
            self._pending += chunk
            if len(self._pending) < _COALESCE_TARGET:
                return ()
            gathered, self._pending = self._pending, bytearray()
            return (gathered,)
        # The caller may reuse a bytearray or a view after we return; bytes cannot change.
        item = chunk if isinstance(chunk, bytes) else bytes(chunk)
        if self._pending:
            gathered, self._pending = self._pending, bytearray()
            return gathered, item
        return (item,)

    def close(self) -> VerifiedPayload:
        """Wait for the workers, run the final checks, make the result durable; raises PayloadError."""
        self._raise_failure()
        if self._closed or self._aborted:
            raise PayloadError(ErrorCode.ERROR, "close() on a payload sink that is closed")
        try:
            self._flush_pending()
            self._chunks.put(_END, 0)
            self._join_workers()
            self._raise_failure()
            result = self._finish()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self._release()
        return result

    def abort(self) -> None:
        """Stop the workers and release every file; the partition is left as it is. Never raises."""
        if self._aborted:
            return
        self._aborted = True
        try:
            self._stop_workers()
            self._join_workers()
            self._release()
        except Exception:
            log.exception("error while aborting the payload sink")

    # --- plumbing ------------------------------------------------------------------------------------------------

    def _flush_pending(self) -> None:
        if self._pending:
            item, self._pending = self._pending, bytearray()
            self._dispatch(item)

    def _dispatch(self, item: bytes | bytearray) -> None:
        # Both workers see each item: the digest worker may wait for the apply worker to parse the manifest (see
        # _digest_main), and the apply worker never waits for the digest worker, so the two cannot deadlock.
        if not self._chunks.put(item, len(item)):
            self._raise_failure()
            raise PayloadError(ErrorCode.ERROR, "the payload sink was aborted")

    def _try_dispatch(self, item: bytes | bytearray) -> bool:
        queued = self._chunks.try_put(item, len(item))
        if queued is None:
            self._raise_failure()
            raise PayloadError(ErrorCode.ERROR, "the payload sink was aborted")
        return queued

    def _fail(self, exc: BaseException) -> None:
        if isinstance(exc, _Stopped):
            return
        error = _as_payload_error(exc)
        with self._failure_lock:
            if self._failure is None:
                self._failure = error
        self._stop_workers()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            self.abort()
            raise self._failure

    def _stop_workers(self) -> None:
        self._stop.set()
        self._boundary.set()
        self._chunks.stop()
        self._part_q.stop()
        self._gather_pool.stop()

    def _join_workers(self) -> None:
        for worker in self._workers:
            if worker is not threading.current_thread():
                worker.join(timeout=120)
                if worker.is_alive():
                    log.error("payload worker %s did not stop within 120 s", worker.name)

    def _release(self) -> None:
        if any(worker.is_alive() for worker in self._workers):
            # A worker stuck in I/O still uses the descriptors; closing them could redirect its writes.
            log.error("leaving payload files open: a worker is still running")
            return
        for io in {self._target_io, self._part_io, self._kernel_io} - {None}:
            assert io is not None
            try:
                io.close()
            except OSError as exc:
                log.warning("closing %s failed: %s", io.what, exc)
        if self._kernel_fd is not None:
            try:
                os.close(self._kernel_fd)
            except OSError as exc:
                log.warning("closing %s failed: %s", self._kernel_tmp, exc)
        self._target_io = self._part_io = self._kernel_io = None
        self._kernel_fd = None
        if self._kernel_tmp is not None:
            try:
                self._kernel_tmp.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("cannot remove %s: %s", self._kernel_tmp, exc)
            self._kernel_tmp = None

    # --- workers -------------------------------------------------------------------------------------------------

    def _apply_main(self) -> None:
        try:
            while True:
                item = self._chunks.get(_APPLY)
                if item is None:
                    return
                if isinstance(item, _EndOfStream):
                    break
                self._apply_chunk(memoryview(item))
            if self._gather is not None:
                # A truncated payload: the parser sees the partial blob too, so close() says where it ended.
                self._feed_parser(memoryview(self._gather)[: self._gathered], None)
        except BaseException as exc:
            self._fail(exc)
        finally:
            # A payload that ended before its manifest still releases the digest worker.
            self._boundary.set()
            self._part_q.put(_END, 0)

    def _apply_chunk(self, view: memoryview) -> None:
        """Feed the parser whole blobs: straight from the chunk when it holds one, else gathered in a pooled buffer.

        The parser would gather a split blob itself, in a new buffer each time. Header, manifest and signature
        blob are small and go to the parser as they come.
        """
        while view:
            if not self._unit_left:
                self._next_unit()
                if not self._unit_left:  # after the last blob: the signature blob, and what must not follow it
                    self._feed_parser(view, None)
                    return
            take = min(self._unit_left, len(view))
            if self._gather is None and (take == self._unit_left or not self._unit_is_blob):
                self._unit_left -= take
                self._feed_parser(view[:take], None)
                view = view[take:]
                continue
            if self._gather is None:
                self._gather = self._gather_pool.acquire(self._unit_left)
                self._gathered = 0
            self._gather[self._gathered : self._gathered + take] = view[:take]
            self._gathered += take
            self._unit_left -= take
            view = view[take:]
            if not self._unit_left:
                buffer, self._gather = self._gather, None
                self._feed_parser(memoryview(buffer)[: self._gathered], buffer)

    def _next_unit(self) -> None:
        """Size and kind of the next unit the parser expects (0: none known, feed the rest as it comes)."""
        parser = self._parser
        if parser.header is None:
            self._unit_left, self._unit_is_blob = HEADER_SIZE, False
        elif parser.manifest is None:
            self._unit_left, self._unit_is_blob = parser.header.manifest_size, False
        elif self._blob_sizes:
            self._unit_left, self._unit_is_blob = self._blob_sizes.popleft(), True
        else:
            self._unit_left, self._unit_is_blob = 0, False

    def _feed_parser(self, data: memoryview, buffer: bytearray | None) -> None:
        """Feed the parser and execute what it hands out; ``buffer`` (pooled, holding ``data``) is then returned."""
        for event in self._parser.feed(data):
            if self._stop.is_set():
                raise _Stopped()
            if isinstance(event, ManifestParsed):
                self._prepare(event.manifest)
                self._blob_sizes = deque(op.data_length for op in event.operations if op.data_length)
            elif isinstance(event, OperationData):
                self._execute(event)
            elif isinstance(event, SignatureBlob):
                self._signature_blob = event.data
        if buffer is not None:
            if self._sequential:
                # The partition-hash worker may still hold views of the buffer: it returns it when done.
                if not self._part_q.put(_Release(buffer), 0):
                    raise _Stopped()
            else:
                self._gather_pool.release(buffer)

    def _digest_main(self) -> None:
        """SHA-256 of the whole payload, with a snapshot at the start of the signature blob."""
        try:
            digest = hashlib.sha256()
            pos = 0
            head = bytearray()
            metadata_end: int | None = None
            boundary_known = False
            signed_end: int | None = None
            while True:
                item = self._chunks.get(_DIGEST)
                if item is None:
                    return
                if isinstance(item, _EndOfStream):
                    break
                view = memoryview(item)
                while view:
                    if not boundary_known:
                        # The signed region ends at or after the metadata, so hashing up to there never needs to
                        # wait; past it, wait for the apply worker to read signatures_offset from the manifest.
                        limit = HEADER_SIZE if metadata_end is None else metadata_end
                        if pos >= limit:
                            if metadata_end is None:
                                metadata_end = HEADER_SIZE + int.from_bytes(head[12:20], "big")
                                continue
                            self._boundary.wait()
                            if self._stop.is_set():
                                return
                            boundary_known = True
                            signed_end = self._signed_end
                            if signed_end == pos:
                                self._signed_digest = digest.copy().digest()
                            continue
                        take = min(len(view), limit - pos)
                        if metadata_end is None:
                            head += view[:take]
                    elif signed_end is not None and pos < signed_end:
                        take = min(len(view), signed_end - pos)
                    else:
                        take = len(view)
                    digest.update(view[:take])
                    pos += take
                    view = view[take:]
                    if boundary_known and pos == signed_end and take:
                        self._signed_digest = digest.copy().digest()
            self._payload_digest = digest.digest()
        except BaseException as exc:
            self._fail(exc)

    def _partition_hash_main(self) -> None:
        try:
            digest = hashlib.sha256()
            hashed = 0
            while True:
                item = self._part_q.get()
                if item is None:
                    return
                if isinstance(item, _EndOfStream):
                    break
                if isinstance(item, _Release):
                    self._gather_pool.release(item.buffer)
                    continue
                digest.update(item)
                hashed += len(item)
            self._part_hash_digest = digest.digest()
            self._part_hashed = hashed
        except BaseException as exc:
            self._fail(exc)

    # --- applying ------------------------------------------------------------------------------------------------

    def _prepare(self, manifest: pb.DeltaArchiveManifest) -> None:
        """Set up the writes once the manifest is known (it has been validated against the target size)."""
        self._manifest = manifest
        header = self._parser.header
        assert header is not None
        if manifest.HasField("signatures_offset"):
            self._signed_end = header.metadata_size + manifest.signatures_offset
        self._boundary.set()

        has_npi = manifest.HasField("new_partition_info")
        new_size = manifest.new_partition_info.size if has_npi else 0
        self._sequential = writes_sequentially(manifest)
        self._seq_remaining = new_size if self._sequential else 0
        if self._target_io is not None:
            self._part_io = self._target_io
            self._part_limit = self._target_io.size
        elif has_npi and not self._sequential:
            # Nothing to write to, but the operations must run to know the partition's hash: use a scratch file.
            block_size = manifest.block_size
            self._part_limit = -(-new_size // block_size) * block_size
            with tempfile.TemporaryFile(prefix="payload-scratch-") as scratch:
                self._part_io = BoundedFile(os.dup(scratch.fileno()), 0, self._part_limit, "the scratch partition")
            os.ftruncate(self._part_io.fd, self._part_limit)
        log.info(
            "payload manifest: %d partition operations, new partition %s bytes, partition hash %s",
            len(manifest.partition_operations),
            new_size if has_npi else "unknown",
            "computed while writing" if self._sequential else "read back after writing",
        )

        for proc in manifest.procedures:
            kind = procedure_type_name(proc)
            if kind == "KERNEL" and self._kernel_path is not None:
                self._open_kernel(proc, manifest.block_size)
            elif kind == "KERNEL":
                log.info(
                    "payload has a kernel (%d bytes); no kernel path given, not writing it",
                    proc.new_info.size,
                )
            else:
                log.info(
                    "payload procedure of type %s (%d operations) is consumed, not applied",
                    kind or "none",
                    len(proc.operations),
                )

    def _open_kernel(self, proc: pb.InstallProcedure, block_size: int) -> None:
        assert self._kernel_path is not None
        path = self._kernel_path
        try:
            fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PARTIAL_KERNEL_SUFFIX, dir=path.parent)
        except OSError as exc:
            raise PayloadError(
                ErrorCode.KERNEL_DEVICE_OPEN_ERROR,
                f"cannot create a temporary kernel file next to {path}: {exc}",
            ) from exc
        self._kernel_fd = fd
        self._kernel_tmp = Path(name)
        self._kernel_info = proc.new_info
        self._kernel_limit = -(-proc.new_info.size // block_size) * block_size
        self._kernel_io = BoundedFile(fd, 0, self._kernel_limit, f"the kernel file {self._kernel_tmp}", owns_fd=False)
        log.info("writing the payload's kernel (%d bytes) to %s", proc.new_info.size, self._kernel_tmp)

    def _feed_partition_hash(self, data: bytes | bytearray | memoryview) -> None:
        if self._seq_remaining <= 0:
            return
        piece = memoryview(data)[: self._seq_remaining]
        self._seq_remaining -= len(piece)
        if not self._part_q.put(piece, len(piece)):
            raise _Stopped()

    def _note_written(self, offset: int, length: int) -> None:
        """Start writeback of the target in batches as it is written, so close()'s fsync has little left to do.

        POSIX_FADV_DONTNEED makes Linux submit the dirty pages of the range for writing without waiting for
        them, and drop them from the page cache once clean: an update does not evict the node's working set.
        """
        if offset != self._writeback_end:
            self._start_writeback()
            self._writeback_start = offset
        self._writeback_end = offset + length
        if self._writeback_end - self._writeback_start >= _WRITEBACK_BYTES:
            self._start_writeback()

    def _start_writeback(self) -> None:
        if self._target_io is not None and self._writeback_end > self._writeback_start:
            # Only a hint; fsync at close() still makes the data durable.
            self._target_io.drop_cache(self._writeback_start, self._writeback_end - self._writeback_start)
        self._writeback_start = self._writeback_end

    def _execute(self, event: OperationData) -> None:
        manifest = self._manifest
        assert manifest is not None
        block_size = manifest.block_size
        if event.destination is Destination.PARTITION:
            if self._part_io is None and not self._sequential:
                return  # no target and no new_partition_info: only the data hashes can be checked
            target_what = self._part_io.what if self._part_io is not None else "the partition"
            writer = _ExtentWriter(
                self._part_io,
                self._part_limit if self._part_io is not None else 1 << 64,
                list(event.op.dst_extents),
                block_size,
                target_what,
                self._feed_partition_hash if self._sequential else None,
                self._note_written
                if self._part_io is not None and self._part_io is self._target_io
                else None,
            )
        elif event.destination is Destination.KERNEL and self._kernel_io is not None:
            writer = _ExtentWriter(
                self._kernel_io,
                self._kernel_limit,
                list(event.op.dst_extents),
                block_size,
                f"the kernel file {self._kernel_tmp}",
                None,
            )
        else:
            return

        op_type = event.op.type
        if op_type == pb.InstallOperation.REPLACE:
            writer.write(event.blob)
        elif op_type == pb.InstallOperation.REPLACE_BZ:
            self._bunzip_into(event, writer)
        elif op_type == pb.InstallOperation.MOVE:
            writer.write(self._read_extents(list(event.op.src_extents), block_size))
        else:  # refused by validate_manifest already
            raise PayloadError(
                ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR, f"cannot execute operation {op_type}"
            )
        writer.pad_last_block()
        if writer.written != writer.capacity:
            raise PayloadError(
                ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR,
                f"payload operation {event.op_index} filled {writer.written} of its {writer.capacity} bytes",
            )

    def _bunzip_into(self, event: OperationData, writer: _ExtentWriter) -> None:
        """Decompress in bounded pieces; more output than the destination holds is refused (no bombs)."""
        decompressor = bz2.BZ2Decompressor()
        data: bytes | memoryview = event.blob
        try:
            while True:
                room = writer.capacity - writer.written
                out = decompressor.decompress(data, max_length=min(_PIECE, room + 1))
                data = b""
                if len(out) > room:
                    raise PayloadError(
                        ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR,
                        f"payload operation {event.op_index} decompresses to more than its {writer.capacity} bytes",
                    )
                writer.write(out)
                if decompressor.eof:
                    break
                if decompressor.needs_input:
                    raise PayloadError(
                        ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR,
                        f"payload operation {event.op_index}: bzip2 data is truncated",
                    )
        except (OSError, EOFError, ValueError) as exc:
            raise PayloadError(
                ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR,
                f"payload operation {event.op_index}: bzip2 data does not decompress: {exc}",
            ) from exc
        if decompressor.unused_data:
            raise PayloadError(
                ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR,
                f"payload operation {event.op_index}: bytes follow the end of the bzip2 data",
            )
        if writer.written <= writer.capacity - writer.block_size:
            raise PayloadError(
                ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR,
                f"payload operation {event.op_index} decompresses to {writer.written} bytes, "
                f"too few for its {writer.capacity} bytes of blocks",
            )

    def _read_extents(self, extents: list[pb.Extent], block_size: int) -> bytearray:
        assert self._part_io is not None
        total = sum(extent.num_blocks for extent in extents) * block_size
        data = bytearray(total)
        view = memoryview(data)
        pos = 0
        for extent in extents:
            start = extent.start_block * block_size
            length = extent.num_blocks * block_size
            if start + length > self._part_limit:
                raise PayloadError(
                    ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR,
                    f"source extent [{start}, {start + length}) crosses the end of the partition",
                )
            self._part_io.preadinto(view[pos : pos + length], start, ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR)
            pos += length
        return data

    # --- final checks --------------------------------------------------------------------------------------------

    def _finish(self) -> VerifiedPayload:
        assert self._payload_digest is not None
        payload_b64 = base64.b64encode(self._payload_digest).decode("ascii")
        if self._expected_size is not None and self._received != self._expected_size:
            raise PayloadError(
                ErrorCode.DOWNLOAD_SIZE_MISMATCH,
                f"payload is {self._received} bytes, {self._expected_size} were announced",
            )
        if self._expected_sha256_b64 is not None and payload_b64 != self._expected_sha256_b64:
            raise PayloadError(
                ErrorCode.DOWNLOAD_HASH_MISMATCH,
                f"payload SHA-256 is {payload_b64}, {self._expected_sha256_b64} was announced",
            )
        manifest = self._manifest
        if manifest is None or not manifest.HasField("new_partition_info"):
            raise PayloadError(
                ErrorCode.DOWNLOAD_PAYLOAD_VERIFICATION_ERROR,
                "payload manifest has no new_partition_info"
                if manifest is not None
                else f"payload has no complete manifest (it ends {self._parser.describe_position()})",
            )
        signature_verified = self._check_signature()
        if not self._parser.done:
            raise PayloadError(
                ErrorCode.DOWNLOAD_SIZE_MISMATCH,
                f"payload is truncated: it ends {self._parser.describe_position()}",
            )

        npi = manifest.new_partition_info
        partition_digest = self._partition_digest(npi.size)
        if partition_digest != npi.hash:
            raise PayloadError(
                ErrorCode.NEW_ROOTFS_VERIFICATION_ERROR,
                f"new partition SHA-256 is {partition_digest.hex()}, the manifest says {npi.hash.hex()}",
            )
        kernel_size = self._verify_kernel()

        if self._target_io is not None:
            self._target_io.fsync()
        if kernel_size is not None:
            self._install_kernel()
        log.info(
            "payload verified: %d bytes, sha256 %s, partition %d bytes%s",
            self._received,
            payload_b64,
            npi.size,
            f", kernel {kernel_size} bytes" if kernel_size is not None else "",
        )
        return VerifiedPayload(
            size=self._received,
            sha256_b64=payload_b64,
            manifest=summarize_manifest(manifest),
            partition_size=npi.size,
            partition_sha256=partition_digest,
            kernel_written=kernel_size is not None,
            kernel_size=kernel_size,
            signature_verified=signature_verified,
        )

    def _check_signature(self) -> bool:
        if self._public_key_pem is None:
            if self._require_signature:
                raise PayloadError(
                    ErrorCode.DOWNLOAD_PAYLOAD_PUBKEY_VERIFICATION_ERROR,
                    "no public key to check the payload signature with: refusing the payload",
                )
            log.warning("payload signature not checked: no public key given")
            return False
        if self._signature_blob is None:
            if not self._require_signature:
                log.warning("payload signature not checked: the payload has no signature blob")
                return False
            where = "" if self._parser.done else f" (it ends {self._parser.describe_position()})"
            raise PayloadError(
                ErrorCode.SIGNED_DELTA_PAYLOAD_EXPECTED, f"payload has no signature blob{where}"
            )
        try:
            key = serialization.load_pem_public_key(self._public_key_pem)
        except (ValueError, TypeError) as exc:
            raise PayloadError(
                ErrorCode.DOWNLOAD_PAYLOAD_PUBKEY_VERIFICATION_ERROR,
                f"the payload public key does not load: {exc}",
            ) from exc
        if not isinstance(key, rsa.RSAPublicKey):
            raise PayloadError(
                ErrorCode.DOWNLOAD_PAYLOAD_PUBKEY_VERIFICATION_ERROR,
                "the payload public key is not an RSA key",
            )
        entries = parse_signatures(self._signature_blob)
        signature = next((data for version, data in entries if version == SIGNATURE_VERSION), None)
        if signature is None:
            raise PayloadError(
                ErrorCode.DOWNLOAD_PAYLOAD_PUBKEY_VERIFICATION_ERROR,
                f"payload has no version {SIGNATURE_VERSION} signature "
                f"(versions present: {[version for version, _ in entries]})",
            )
        assert self._signed_digest is not None
        try:
            key.verify(signature, self._signed_digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
        except InvalidSignature as exc:
            raise PayloadError(
                ErrorCode.DOWNLOAD_PAYLOAD_PUBKEY_VERIFICATION_ERROR,
                "payload signature does not match the public key",
            ) from exc
        return True

    def _partition_digest(self, size: int) -> bytes:
        if self._sequential:
            assert self._part_hash_digest is not None
            if self._part_hashed != size:
                raise PayloadError(
                    ErrorCode.NEW_ROOTFS_VERIFICATION_ERROR,
                    f"payload wrote {self._part_hashed} bytes of the {size}-byte partition",
                )
            return self._part_hash_digest
        assert self._part_io is not None
        return _hash_range(self._part_io, size, ErrorCode.NEW_ROOTFS_VERIFICATION_ERROR)

    def _verify_kernel(self) -> int | None:
        """Size of the kernel written and checked, or None when no kernel was written."""
        if self._kernel_fd is None:
            return None
        info = self._kernel_info
        assert info is not None
        try:
            os.ftruncate(self._kernel_fd, info.size)
        except OSError as exc:
            raise PayloadError(
                ErrorCode.DOWNLOAD_WRITE_ERROR, f"truncating {self._kernel_tmp}: {exc}"
            ) from exc
        assert self._kernel_io is not None
        digest = _hash_range(self._kernel_io, info.size, ErrorCode.NEW_KERNEL_VERIFICATION_ERROR)
        if digest != info.hash:
            raise PayloadError(
                ErrorCode.NEW_KERNEL_VERIFICATION_ERROR,
                f"new kernel SHA-256 is {digest.hex()}, the manifest says {info.hash.hex()}",
            )
        return info.size

    def _install_kernel(self) -> None:
        assert self._kernel_fd is not None and self._kernel_tmp is not None and self._kernel_path is not None
        try:
            os.fchmod(self._kernel_fd, 0o644)
            os.fsync(self._kernel_fd)
            os.replace(self._kernel_tmp, self._kernel_path)
            self._kernel_tmp = None
            dir_fd = os.open(self._kernel_path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise PayloadError(
                ErrorCode.DOWNLOAD_WRITE_ERROR, f"installing the new kernel as {self._kernel_path}: {exc}"
            ) from exc
        log.info("installed the new kernel as %s", self._kernel_path)


def _hash_range(io: BoundedFile, size: int, code: ErrorCode) -> bytes:
    """SHA-256 of the first ``size`` bytes of ``io``'s range."""
    digest = hashlib.sha256()
    buf = bytearray(min(_READ_CHUNK, size))
    view = memoryview(buf)
    done = 0
    while done < size:
        piece = view[: min(len(buf), size - done)]
        io.preadinto(piece, done, code)
        digest.update(piece)
        done += len(piece)
    return digest.digest()


def verify_payload_file(
    path: Path, public_key_pem: bytes | None, *, require_signature: bool = True
) -> VerifiedPayload:
    """Check a payload file without applying it: structure, operation hashes, signature and partition hash.

    The partition hash is computed over what the operations would write (in a scratch file when they do not
    write the partition in order). Raises PayloadError; OSError when the file cannot be read. With
    ``require_signature=False`` a missing key or signature blob is not an error (``signature_verified`` says
    whether it was checked); a signature that is there and does not verify always is.
    """
    sink = PayloadSink(
        None, public_key_pem=public_key_pem, expected_size=None, expected_sha256_b64=None,
        require_signature=require_signature,
    )
    try:
        with open(path, "rb") as stream:
            while chunk := stream.read(_READ_CHUNK):
                sink.write(chunk)
        return sink.close()
    except BaseException:
        sink.abort()
        raise


@dataclass(frozen=True)
class PayloadDigests:
    """What an Omaha offer announces about a payload file: its size, base64 SHA-256 and base64 SHA-1."""

    size: int
    sha256_b64: str
    sha1_b64: str


def payload_digests(path: Path) -> PayloadDigests:
    """Size and hashes of a payload file, in one read.  Raises OSError."""
    sha256, sha1 = hashlib.sha256(), hashlib.sha1()
    size = 0
    with open(path, "rb") as stream:
        while chunk := stream.read(_READ_CHUNK):
            sha256.update(chunk)
            sha1.update(chunk)
            size += len(chunk)
    return PayloadDigests(
        size, base64.b64encode(sha256.digest()).decode("ascii"), base64.b64encode(sha1.digest()).decode("ascii")
    )


def remove_partial_kernels(kernel_path: Path) -> None:
    """Delete the temporary kernel files (``.<name>.*.partial``, as PayloadSink names them) that an attempt
    killed before its rename left beside ``kernel_path``: without this each crash would leave one more in /boot."""
    for stale in kernel_path.parent.glob(f".{kernel_path.name}.*{PARTIAL_KERNEL_SUFFIX}"):
        try:
            stale.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("Cannot remove the unfinished kernel file %s: %s; remove it by hand", stale, exc.strerror)
            continue
        log.info("Removed %s, an unfinished kernel file left by an interrupted attempt", stale)
