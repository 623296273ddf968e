"""Apply a payload to the passive partition and verify it, in one streaming pass with flat memory.

Theory of operation
-------------------
The downloader hands the payload's bytes in order to :meth:`PayloadSink.write` (from a thread) or
:meth:`PayloadSink.write_async` (from the event loop, which then never blocks: it only queues a reference and,
when the pipeline is full, awaits room). Chunks are not copied: one bounded fan-out queue shows every chunk to
two threads, each at its own pace:

* the **digest** thread feeds :class:`~update_engine.payload.digest.PayloadDigest` (the whole payload's SHA-256
  and the signed part's);
* the **apply** thread feeds :class:`~update_engine.payload.format.PayloadStreamParser` one unit at a time. The
  parser hands out each operation once its data blob is complete and matches its SHA-256 (a blob split across
  network chunks is assembled in a buffer from a small pool). Nothing reaches the target before its operation's
  hash matched, and every write goes through the bounded window of the target.

What happens to an operation then depends on the payload. A full payload writes the partition from block 0
upward, each block once (every full payload does; validation refuses a block written twice): its operations are
independent, so the apply thread queues them to the **workers**, one per CPU update-engine may use (its affinity
and its cgroup's ``CPUQuota=``, at most :data:`MAX_WORKERS`), which decompress and write them in parallel with
the :class:`~update_engine.payload.executor.Executor`. What they write goes through an
:class:`~update_engine.payload.pipeline.OrderedWindow` to the **partition-hash** thread, which feeds
:class:`~update_engine.payload.digest.PartitionDigest` in partition order whatever order the operations finish
in. An operation reserves its output's size in the window before it is queued, so the bytes in flight are
bounded (:data:`WINDOW_BYTES`) however many operations there are. Any other payload (MOVE, holes, any order)
runs its operations one by one in the apply thread, and the partition is read back at the end.

hashlib (for buffers over 2 KiB), bz2 and ``os.pwrite`` release the GIL, so the threads really run in parallel;
the Python work per chunk is a few queue operations.

Who owns what: the caller's thread owns the sink's phase, the byte count and the small-chunk buffer; each thread
owns the object it feeds (the apply thread also the manifest, the executor and the kernel file, until it ends;
the workers only run the executor, which has no state of its own); :meth:`close` reads them after joining the
threads. The only state the threads share is the queues, the pool and the window (each with its own lock) and
the failure slot: the first failure anywhere is kept, everything is stopped, and every later call raises it
(:meth:`_fail`, the one place failures are handled).

At :meth:`close`, the checks of :mod:`update_engine.payload.verify` run in their documented order; errors found
while streaming (operation hashes, malformed manifest, extents outside the partition…) end the attempt at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from update_engine.errors import ErrorCode, UpdateEngineError
from update_engine.payload import update_metadata_pb2 as pb
from update_engine.payload import verify
from update_engine.payload.digest import PartitionDigest, PayloadDigest
from update_engine.payload.executor import Executor
from update_engine.payload.format import (
    Destination,
    ManifestParsed,
    OperationData,
    PayloadError,
    PayloadStreamParser,
    SignatureBlob,
    procedure_type_name,
    summarize_manifest,
    writes_sequentially,
)
from update_engine.payload.pipeline import (
    BufferPool,
    FanOut,
    OrderedWindow,
    Stopped,
    fix_malloc_mmap_threshold,
    usable_cpus,
)
from update_engine.payload.target import BoundedFile, KernelFile, WriteTarget
from update_engine.payload.verify import VerifiedPayload

log = logging.getLogger(__name__)

# Bytes in flight between the downloader and the slower of the digest and apply threads. Small enough for flat
# memory, large enough to ride out scheduling jitter. The async writer is woken when half of it is free again.
QUEUE_BYTES = 2 * 1024 * 1024
# Output of the operations queued to the workers and not yet hashed (for a REPLACE, its blob): enough to keep the
# workers busy when operations finish out of order; one operation larger than this runs alone.
WINDOW_BYTES = 3 * 1024 * 1024
# Reused buffers that assemble operation blobs split across chunks; one blob may exceed it (it is then the only one).
POOL_BYTES = 2 * 1024 * 1024
# Workers at most, whatever the CPUs: each bzip2 decompression holds ~3.6 MiB of tables while it runs.
MAX_WORKERS = 4
# Chunks smaller than this are gathered before being queued: per-item costs (locks, calls) dominate below it.
_COALESCE_BELOW = 64 * 1024
_COALESCE_TARGET = 256 * 1024
# How long abort() waits for each thread; one stuck in I/O keeps the files open rather than have them closed under it.
_ABORT_JOIN_SECONDS = 120.0

_APPLY = 0
_DIGEST = 1

Chunk = bytes | bytearray


class _Phase(enum.Enum):
    """The sink's life: write() only while STREAMING; close() or any failure ends it."""

    STREAMING = "streaming"  # accepting bytes; the threads run
    CLOSED = "closed"  # close() verified the payload and released everything
    ABORTED = "aborted"  # a failure or abort() stopped the threads and released everything


@dataclass(frozen=True)
class _Job:
    """An operation queued to the workers; ``seq`` is its place in the window (None: nothing to hash)."""

    event: OperationData
    seq: int | None


def _as_payload_error(exc: BaseException) -> PayloadError:
    if isinstance(exc, PayloadError):
        return exc
    if isinstance(exc, UpdateEngineError):
        return PayloadError(exc.code, exc.message)
    if isinstance(exc, OSError):
        return PayloadError(ErrorCode.DOWNLOAD_WRITE_ERROR, f"I/O error while applying the payload: {exc}")
    log.error("unexpected failure while applying the payload", exc_info=exc)
    return PayloadError(ErrorCode.ERROR, f"unexpected failure while applying the payload: {exc!r}")


def _wake_from_thread(loop: asyncio.AbstractEventLoop, future: asyncio.Future[None]) -> None:
    """Resolve ``future`` on its loop from any thread; harmless if it was cancelled or the loop is gone."""

    def wake() -> None:
        if not future.done():
            future.set_result(None)

    with contextlib.suppress(RuntimeError):  # the loop was closed: nobody awaits any more
        loop.call_soon_threadsafe(wake)


def _free_bytes(directory: Path) -> int | None:
    """Bytes update-engine (root) may still write in ``directory``'s file system; None when it cannot tell."""
    try:
        stats = os.statvfs(directory)
    except OSError:
        return None
    return stats.f_bfree * stats.f_frsize


class PayloadSink:
    """Consumes a payload as it downloads: writes the partition (and kernel), verifies everything at close().

    :meth:`write` (or :meth:`write_async`) and :meth:`close` are called one at a time, never concurrently;
    :meth:`write` may block while the threads catch up, :meth:`write_async` awaits instead. Any exception from
    :meth:`write`, :meth:`write_async` or :meth:`close` leaves the sink aborted (threads stopped, files closed,
    the kernel's temporary file removed); calling :meth:`abort` again is harmless.
    """

    def __init__(
        self,
        target: WriteTarget | None,
        *,
        public_key_pem: bytes | None,
        expected_size: int | None,
        expected_sha256_b64: str | None,
        kernel_path: Path | None = None,
    ) -> None:
        self._public_key_pem = public_key_pem
        self._expected_size = expected_size
        self._expected_sha256_b64 = expected_sha256_b64
        self._kernel_path = kernel_path
        self._target = target.open() if target is not None else None
        fix_malloc_mmap_threshold()

        # The caller's.
        self._phase = _Phase.STREAMING
        self._received = 0
        self._pending = bytearray()
        # The failure slot, shared by every thread.
        self._failure: PayloadError | None = None
        self._failure_lock = threading.Lock()

        self._chunks: FanOut[Chunk] = FanOut(QUEUE_BYTES, consumers=2)
        self._pool = BufferPool(POOL_BYTES)
        self._jobs: FanOut[_Job] = FanOut(0)  # bounded by the window and the pool, not by itself
        self._window: OrderedWindow[memoryview] = OrderedWindow(WINDOW_BYTES)
        # The digest thread's.
        self._digest = PayloadDigest()
        # The apply thread's (set up when the manifest arrives).
        self._parser = PayloadStreamParser(
            partition_size=target.size if target is not None else None,
            payload_size=expected_size,
            kernel_room=_free_bytes(kernel_path.parent) if kernel_path is not None else None,
            allocate=self._pool.acquire,
        )
        self._executor: Executor | None = None
        self._scratch: BoundedFile | None = None
        self._kernel: KernelFile | None = None
        self._in_order = False
        self._signature_blob: bytes | None = None
        # The partition-hash thread's, handed over by the apply thread before the first written byte.
        self._partition_digest: PartitionDigest | None = None

        workers = min(usable_cpus(), MAX_WORKERS)
        self._threads = [
            threading.Thread(target=self._run, args=(self._apply_loop,), name="payload-apply", daemon=True),
            threading.Thread(target=self._run, args=(self._digest_loop,), name="payload-digest", daemon=True),
            threading.Thread(target=self._run, args=(self._hash_loop,), name="payload-partition-hash", daemon=True),
            *(
                threading.Thread(target=self._run, args=(self._work_loop,), name=f"payload-worker-{n}", daemon=True)
                for n in range(workers)
            ),
        ]
        for thread in self._threads:
            thread.start()

    # --- the caller's side ---------------------------------------------------------------------------------------

    def write(self, chunk: bytes | bytearray | memoryview) -> None:
        """Accept the next bytes of the payload; a ``bytes`` chunk is kept by reference, anything else copied."""
        for item in self._accept(chunk):
            if not self._chunks.put(item, len(item)):
                self._raise_stopped()

    async def write_async(self, chunk: bytes | bytearray | memoryview) -> None:
        """Like :meth:`write`, for an event loop: never blocks it, awaits room in the pipeline instead.

        If the awaiting task is cancelled, the sink must still be aborted (as after any failure).
        """
        for item in self._accept(chunk):
            while not self._try_put(item):
                loop = asyncio.get_running_loop()
                room: asyncio.Future[None] = loop.create_future()
                self._chunks.call_when_room(len(item), functools.partial(_wake_from_thread, loop, room))
                await room

    def close(self) -> VerifiedPayload:
        """Wait for the threads, run the final checks, make the result durable; raises PayloadError."""
        self._check_streaming("close")
        try:
            if self._pending:
                item, self._pending = self._pending, bytearray()
                if not self._chunks.put(item, len(item)):
                    self._raise_stopped()
            self._chunks.finish()
            for thread in self._threads:
                # No time limit: a thread that is still working is not a thread that failed, and judging the
                # payload before it is done would misreport a good one.
                thread.join()
            self._raise_failure()
            result = self._finish()
        except BaseException:
            self.abort()
            raise
        self._phase = _Phase.CLOSED
        self._release()
        return result

    def abort(self) -> None:
        """Stop the threads and release every file; the partition is left as it is. Never raises."""
        if self._phase is not _Phase.STREAMING:
            return
        self._phase = _Phase.ABORTED
        try:
            self._stop()
            for thread in self._threads:
                if thread is not threading.current_thread():
                    thread.join(timeout=_ABORT_JOIN_SECONDS)
                    if thread.is_alive():
                        log.error("payload thread %s did not stop within %.0f s", thread.name, _ABORT_JOIN_SECONDS)
            self._release()
        except Exception:
            log.exception("error while aborting the payload sink")

    def _check_streaming(self, what: str) -> None:
        self._raise_failure()
        if self._phase is not _Phase.STREAMING:
            raise PayloadError(ErrorCode.ERROR, f"{what}() on a payload sink that is {self._phase.value}")

    def _accept(self, chunk: bytes | bytearray | memoryview) -> tuple[Chunk, ...]:
        """Count ``chunk``; the items to queue now (none while short chunks are being gathered)."""
        self._check_streaming("write")
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

    def _try_put(self, item: Chunk) -> bool:
        queued = self._chunks.try_put(item, len(item))
        if queued is None:
            self._raise_stopped()
        return bool(queued)

    # --- failure: the one place -----------------------------------------------------------------------------------

    def _run(self, loop: Callable[[], None]) -> None:
        """A thread's body: its loop, with any failure recorded once and everything stopped."""
        try:
            loop()
        except Stopped:
            pass
        except BaseException as exc:  # every failure ends the attempt, with its code
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        error = _as_payload_error(exc)
        with self._failure_lock:
            if self._failure is None:
                self._failure = error
        self._stop()

    def _stop(self) -> None:
        self._chunks.stop()
        self._jobs.stop()
        self._window.stop()
        self._pool.stop()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            self.abort()
            raise self._failure

    def _raise_stopped(self) -> None:
        self._raise_failure()
        raise PayloadError(ErrorCode.ERROR, "the payload sink was aborted")

    def _release(self) -> None:
        if any(thread.is_alive() for thread in self._threads):
            # A thread stuck in I/O still uses the descriptors; closing them could redirect its writes.
            log.error("leaving payload files open: a payload thread is still running")
            return
        for file in (self._target, self._scratch):
            if file is not None:
                try:
                    file.close()
                except OSError as exc:
                    log.warning("closing %s failed: %s", file.what, exc)
        if self._kernel is not None:
            self._kernel.discard()

    # --- the threads ----------------------------------------------------------------------------------------------

    def _digest_loop(self) -> None:
        while (chunk := self._chunks.get(_DIGEST)) is not None:
            self._digest.update(chunk)

    def _apply_loop(self) -> None:
        parser = self._parser
        try:
            while (chunk := self._chunks.get(_APPLY)) is not None:
                view = memoryview(chunk)
                while view:
                    # One unit per call: the pool's buffer of a blob goes back before the next one is taken.
                    take = parser.unit_remaining or len(view)
                    for event in parser.feed(view[:take]):
                        if isinstance(event, ManifestParsed):
                            self._prepare(event.manifest)
                        elif isinstance(event, OperationData):
                            self._execute(event)
                        elif isinstance(event, SignatureBlob):
                            self._signature_blob = event.data
                    view = view[take:]
        finally:
            self._jobs.finish()
            self._window.finish()

    def _work_loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            assert self._executor is not None
            event, seq = job.event, job.seq
            if seq is None:
                self._executor.execute(event)
            else:
                self._executor.execute(event, functools.partial(self._window.add, seq))
            if event.buffer is not None and (seq is None or event.op.type != pb.InstallOperation.REPLACE):
                self._pool.release(event.buffer)  # nothing queued for hashing points into it
            if seq is not None:
                self._window.done(seq)

    def _hash_loop(self) -> None:
        while (piece := self._window.get()) is not None:
            assert self._partition_digest is not None
            self._partition_digest.update(piece)
        if self._partition_digest is not None:
            self._partition_digest.flush()

    # --- the apply thread's work ----------------------------------------------------------------------------------

    def _prepare(self, manifest: pb.DeltaArchiveManifest) -> None:
        """Set up the writes once the manifest is known (the parser checked it against the target's size, the
        announced payload size and the kernel directory's free space)."""
        verify.check_names_a_signature(manifest)
        has_npi = manifest.HasField("new_partition_info")
        new_size = manifest.new_partition_info.size if has_npi else 0
        block_size = manifest.block_size
        self._in_order = writes_sequentially(manifest)
        partition = self._target
        if self._in_order:
            self._partition_digest = PartitionDigest(new_size, self._target)
        elif partition is None and has_npi:
            # Nothing to write to, but the operations must run to know the partition's hash: use a scratch file.
            partition = self._scratch = BoundedFile.scratch(-(-new_size // block_size) * block_size)
        log.info(
            "payload manifest: %d partition operations, new partition %s bytes, partition hash %s",
            len(manifest.partition_operations),
            new_size if has_npi else "unknown",
            "computed while writing" if self._in_order else "read back after writing",
        )
        for proc in manifest.procedures:
            kind = procedure_type_name(proc)
            if kind == "KERNEL" and self._kernel_path is not None:
                capacity = -(-proc.new_info.size // block_size) * block_size
                self._kernel = KernelFile(self._kernel_path, proc.new_info.size, capacity)
                log.info("writing the payload's kernel (%d bytes) to %s", proc.new_info.size, self._kernel.tmp)
            elif kind == "KERNEL":
                log.info("payload has a kernel (%d bytes); no kernel path given, not writing it", proc.new_info.size)
            else:
                log.info(
                    "payload procedure of type %s (%d operations) is consumed, not applied",
                    kind or "none",
                    len(proc.operations),
                )
        self._executor = Executor(
            partition, self._kernel.file if self._kernel is not None else None, block_size
        )

    def _execute(self, event: OperationData) -> None:
        """Run ``event`` here (a payload whose operations depend on each other) or queue it to the workers."""
        assert self._executor is not None
        if not self._in_order:
            self._executor.execute(event)
            if event.buffer is not None:
                self._pool.release(event.buffer)
            return
        seq = None
        if event.destination is Destination.PARTITION:
            buffer = event.buffer
            # A REPLACE's pieces are views of its blob: the blob's buffer goes back once they are hashed.
            give_back = (
                functools.partial(self._pool.release, buffer)
                if buffer is not None and event.op.type == pb.InstallOperation.REPLACE
                else None
            )
            seq = self._window.reserve(self._executor.output_size(event), give_back)
        if not self._jobs.put(_Job(event, seq), 0):
            raise Stopped()

    # --- the final checks -----------------------------------------------------------------------------------------

    def _finish(self) -> VerifiedPayload:
        manifest = self._parser.manifest
        facts = verify.StreamFacts.of(self._parser, self._digest, self._signature_blob)
        npi = verify.check_stream(
            facts,
            expected_size=self._expected_size,
            expected_sha256_b64=self._expected_sha256_b64,
            public_key_pem=self._public_key_pem,
        )
        assert manifest is not None
        if self._partition_digest is not None:
            partition_sha256, hashed = self._partition_digest.digest(), self._partition_digest.hashed
        else:
            partition = self._target or self._scratch
            assert partition is not None
            partition_sha256 = partition.sha256(npi.size, ErrorCode.NEW_ROOTFS_VERIFICATION_ERROR)
            hashed = npi.size
        verify.check_partition(partition_sha256, hashed, npi)
        kernel = self._kernel
        if kernel is not None:
            info = next(p.new_info for p in manifest.procedures if procedure_type_name(p) == "KERNEL")
            verify.check_kernel(kernel.sha256(), info)
        if self._target is not None:
            self._target.fsync()
        if kernel is not None:
            kernel.install()
        log.info(
            "payload verified: %d bytes, sha256 %s, partition %d bytes%s",
            self._received,
            facts.sha256_b64,
            npi.size,
            f", kernel {kernel.size} bytes" if kernel is not None else "",
        )
        return VerifiedPayload(
            size=facts.received,
            sha256_b64=facts.sha256_b64,
            manifest=summarize_manifest(manifest),
            partition_size=npi.size,
            partition_sha256=partition_sha256,
            kernel_written=kernel is not None,
            kernel_size=kernel.size if kernel is not None else None,
            signature_verified=True,
        )
