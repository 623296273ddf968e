"""Where a payload may write: the passive partition, as a bounded file that refuses every byte outside it.

Rules of this module:

* Offsets are relative to the start of the range (the partition), never absolute disk offsets: the code that
  applies a payload cannot name a byte of the running partition or of the partition table even by mistake.
* A write that would start before 0 or end after ``size`` raises :class:`OutsidePartition` and writes nothing;
  it is never clamped, so a partial write cannot pass for a complete one. Reads are bounded the same way.
* The range is checked against the size of the file or device when it is opened: a partition that runs past the
  end of the disk is refused before the first write.

:class:`BoundedFile` is the seam between the payload pipeline and the disk, in the style of
:class:`update_engine.gpt.BlockIO`: everything the pipeline writes (the passive partition, a scratch partition, the
new kernel) goes through one, and a fault test can subclass it (or :class:`WriteTarget` to hand out its own) to
observe or cut off writes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from update_engine.errors import ErrorCode
from update_engine.payload.format import PayloadError

log = logging.getLogger(__name__)


class OutsidePartition(PayloadError):
    """A write or read would reach outside the range it is bounded to; nothing of it was done."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.DOWNLOAD_WRITE_ERROR, message)


class BoundedFile:
    """Positioned I/O confined to bytes ``base`` .. ``base + size - 1`` of an open file descriptor.

    ``what`` names the range in errors ("the target /dev/sda, partition USR-B"). With ``owns_fd`` the descriptor is
    closed by :meth:`close`; otherwise the caller keeps it.
    """

    def __init__(self, fd: int, base: int, size: int, what: str, *, owns_fd: bool = True) -> None:
        if base < 0 or size < 0:
            raise OutsidePartition(f"{what}: invalid range of {size} bytes at byte {base}")
        self._fd = fd
        self.base = base
        self.size = size
        self.what = what
        self._owns_fd = owns_fd

    @property
    def fd(self) -> int:
        """The descriptor, for calls that do not move data (fsync, truncate, chmod); -1 once closed."""
        return self._fd

    def _check(self, action: str, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OutsidePartition(
                f"refusing to {action} {length} bytes at byte {offset} of {self.what}: it holds bytes 0.."
                f"{self.size - 1} only"
            )

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        """Write all of ``data`` at ``offset`` (relative), or raise having written nothing out of range."""
        view = memoryview(data)
        self._check("write", offset, len(view))
        position = self.base + offset
        while view:
            try:
                written = os.pwrite(self._fd, view, position)
            except OSError as exc:
                raise PayloadError(
                    ErrorCode.DOWNLOAD_WRITE_ERROR, f"writing {self.what} at byte {position}: {exc}"
                ) from exc
            view = view[written:]
            position += written

    def preadinto(self, buf: memoryview, offset: int, code: ErrorCode) -> None:
        """Fill ``buf`` from ``offset`` (relative); a short file or a read error raise PayloadError(``code``)."""
        self._check("read", offset, len(buf))
        position = self.base + offset
        while buf:
            try:
                got = os.preadv(self._fd, [buf], position)
            except OSError as exc:
                raise PayloadError(code, f"reading {self.what} at byte {position}: {exc}") from exc
            if got == 0:
                raise PayloadError(code, f"reading {self.what}: it ends at byte {position}")
            buf = buf[got:]
            position += got

    def drop_cache(self, offset: int, length: int) -> None:
        """Start writeback of a written range and let the page cache drop it; only a hint, errors are logged."""
        self._check("advise", offset, length)
        try:
            os.posix_fadvise(self._fd, self.base + offset, length, os.POSIX_FADV_DONTNEED)
        except OSError as exc:
            log.debug("posix_fadvise on %s failed: %s", self.what, exc)

    def fsync(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as exc:
            raise PayloadError(ErrorCode.DOWNLOAD_WRITE_ERROR, f"flushing {self.what}: {exc}") from exc

    def close(self) -> None:
        """Close the descriptor if this object owns it; safe to call twice."""
        fd, self._fd = self._fd, -1
        if self._owns_fd and fd >= 0:
            os.close(fd)


@dataclass(frozen=True)
class WriteTarget:
    """The passive partition: a disk image and the partition's byte offset in it, or a partition device at 0."""

    path: Path
    offset: int
    size: int

    def open(self) -> BoundedFile:
        """Open the disk for writing, bounded to the partition; refuses a range that leaves the disk."""
        if self.offset < 0 or self.size < 0:
            raise PayloadError(ErrorCode.INSTALL_DEVICE_OPEN_ERROR, f"invalid write target {self}")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise PayloadError(
                ErrorCode.INSTALL_DEVICE_OPEN_ERROR, f"cannot open the target {self.path}: {exc}"
            ) from exc
        try:
            disk_size = os.lseek(fd, 0, os.SEEK_END)
        except OSError as exc:
            os.close(fd)
            raise PayloadError(
                ErrorCode.INSTALL_DEVICE_OPEN_ERROR, f"cannot tell the size of the target {self.path}: {exc}"
            ) from exc
        if self.offset + self.size > disk_size:
            os.close(fd)
            raise PayloadError(
                ErrorCode.INSTALL_DEVICE_OPEN_ERROR,
                f"the target partition (bytes {self.offset}..{self.offset + self.size - 1}) runs past the end "
                f"of {self.path} ({disk_size} bytes)",
            )
        return BoundedFile(fd, self.offset, self.size, f"the target {self.path}")
