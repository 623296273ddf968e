"""The SHA-256 digests computed while a payload streams: the payload's own two, and the new partition's.

Theory of operation
-------------------
:class:`PayloadDigest` computes, in one pass, the digest of the whole file (what Omaha announces) and of the part
the signature covers (header, manifest and operation blobs: everything before the signature blob). That part
ends where the signature blob starts, which only the manifest says. Rather than wait for the manifest to be
parsed elsewhere, :class:`PayloadDigest` keeps the hash of everything but the last
:data:`~update_engine.payload.format.MAX_SIGNATURES_SIZE` bytes, and those bytes aside. The signature blob is
the payload's last unit and never longer than that, so at the end the signed digest is the running state plus
the part of the kept tail before the blob, and the whole digest the running state plus all of it: each byte is
hashed once, and nothing waits.

:class:`PartitionDigest` hashes the new partition from the bytes the operations write, when they write it from
block 0 upward (every full payload does), which saves reading the partition back. It trusts that the data
``pwrite`` accepted is what the page cache holds; write and fsync errors are still checked. Since it sees the
partition in order, it is also where written ranges are handed to the kernel's writeback in batches.

Both are single-threaded: :class:`PayloadDigest` belongs to the sink's digest thread, :class:`PartitionDigest`
to its partition-hash thread.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from update_engine.payload.format import MAX_SIGNATURES_SIZE
from update_engine.payload.target import BoundedFile

TAIL = MAX_SIGNATURES_SIZE
# Written ranges of the target are handed to the kernel's writeback in batches of this size.
WRITEBACK_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class PayloadDigests:
    size: int
    whole: bytes  # SHA-256 of every byte
    signed: bytes | None  # SHA-256 of the bytes before ``signed_end``; None when unsigned or out of reach


class PayloadDigest:
    """Hashes a payload fed in order, for :meth:`finish` to give both digests once the signed end is known."""

    def __init__(self) -> None:
        self._running = hashlib.sha256()
        self._hashed = 0
        self._tail = bytearray()

    @property
    def size(self) -> int:
        """Bytes fed so far."""
        return self._hashed + len(self._tail)

    def update(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        if len(view) >= TAIL:
            if self._tail:
                self._running.update(self._tail)
                self._hashed += len(self._tail)
            head = view[: len(view) - TAIL]
            self._running.update(head)
            self._hashed += len(head)
            self._tail[:] = view[len(view) - TAIL :]
            return
        self._tail += view
        excess = len(self._tail) - TAIL
        if excess > 0:
            self._running.update(self._tail[:excess])
            self._hashed += excess
            del self._tail[:excess]

    def finish(self, signed_end: int | None) -> PayloadDigests:
        """Both digests; ``signed_end`` is where the signature blob starts (None: the payload has none)."""
        signed = None
        if signed_end is not None and self._hashed <= signed_end <= self.size:
            state = self._running.copy()
            state.update(self._tail[: signed_end - self._hashed])
            signed = state.digest()
        whole = self._running.copy()
        whole.update(self._tail)
        return PayloadDigests(size=self.size, whole=whole.digest(), signed=signed)


class PartitionDigest:
    """SHA-256 of the first ``size`` bytes of the partition, fed in order; starts writeback of ``target``."""

    def __init__(self, size: int, target: BoundedFile | None) -> None:
        self._size = size
        self._target = target
        self._hash = hashlib.sha256()
        self.hashed = 0
        self._fed = 0
        self._writeback_from = 0

    def update(self, data: memoryview) -> None:
        self._fed += len(data)
        piece = data[: self._size - self.hashed]
        self._hash.update(piece)
        self.hashed += len(piece)
        if self._target is not None and self._fed - self._writeback_from >= WRITEBACK_BYTES:
            self.flush()

    def flush(self) -> None:
        """Hand what was written since the last batch to writeback."""
        if self._target is not None:
            self._target.drop_cache(self._writeback_from, self._fed - self._writeback_from)
        self._writeback_from = self._fed

    def digest(self) -> bytes:
        return self._hash.digest()
