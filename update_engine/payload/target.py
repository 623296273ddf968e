"""Where a payload may write: the passive partition, as a bounded file that refuses every byte outside it.

Rules of this module:

* Offsets are relative to the start of the range (the partition), never absolute disk offsets: the code that
  applies a payload cannot name a byte of the running partition or of the partition table even by mistake.
* A write that would start before 0 or end after ``size`` raises :class:`OutsidePartition` and writes nothing;
  it is never clamped, so a partial write cannot pass for a complete one. Reads are bounded the same way.
* The range is checked against the size of the file or device when it is opened: a partition that runs past the
  end of the disk is refused before the first write.

* Positioned I/O only: any number of threads may use one :class:`BoundedFile` at once, on disjoint ranges. It has
  no state that changes after it is opened, except being closed, which its owner does once every thread using it
  has stopped.

:class:`BoundedFile` is the seam between the payload pipeline and the disk, in the style of
:class:`update_engine.gpt.BlockIO`: everything the pipeline writes (the passive partition, a scratch partition, the
new kernel) goes through one, and a fault test can subclass it (or :class:`WriteTarget` to hand out its own) to
observe or cut off writes. :class:`KernelFile` writes the new kernel to ``.<name>.<random>.partial`` beside its
final path and renames it into place only once verified; :func:`remove_partial_kernels` sweeps what a killed
attempt left.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from coreos_common.files import NewFile
from update_engine.errors import ErrorCode
from update_engine.payload.format import PayloadError

log = logging.getLogger(__name__)

# The new kernel is written to ``.<name>.<random>.partial`` beside its final path, then renamed.
PARTIAL_KERNEL_SUFFIX = ".partial"
_READ_CHUNK = 1024 * 1024


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

    @classmethod
    def scratch(cls, size: int) -> BoundedFile:
        """An anonymous temporary file of ``size`` bytes, for running operations with no target to write."""
        with tempfile.TemporaryFile(prefix="payload-scratch-") as stream:
            fd = os.dup(stream.fileno())
        try:
            os.ftruncate(fd, size)
        except OSError:
            os.close(fd)
            raise
        return cls(fd, 0, size, "the scratch partition")

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

    def sha256(self, length: int, code: ErrorCode) -> bytes:
        """SHA-256 of the first ``length`` bytes, read back; a short file or a read error raise with ``code``."""
        digest = hashlib.sha256()
        buf = bytearray(min(_READ_CHUNK, length))
        view = memoryview(buf)
        done = 0
        while done < length:
            piece = view[: min(len(buf), length - done)]
            self.preadinto(piece, done, code)
            digest.update(piece)
            done += len(piece)
        return digest.digest()

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


class KernelFile:
    """The new kernel, written to a temporary file beside ``path`` and renamed into place once verified
    (:class:`coreos_common.files.NewFile`; its writes go through a :class:`BoundedFile`)."""

    def __init__(self, path: Path, size: int, capacity: int) -> None:
        """``size`` is the kernel's length, ``capacity`` its whole blocks (what operations may write)."""
        self.path = path
        self.size = size
        try:
            self._new = NewFile(path, 0o644, suffix=PARTIAL_KERNEL_SUFFIX)
        except OSError as exc:
            raise PayloadError(
                ErrorCode.KERNEL_DEVICE_OPEN_ERROR,
                f"cannot create a temporary kernel file next to {path}: {exc}",
            ) from exc
        self.tmp: Path | None = self._new.temporary
        self.file = BoundedFile(self._new.fd, 0, capacity, f"the kernel file {self.tmp}", owns_fd=False)

    def sha256(self) -> bytes:
        """Cut the file to the kernel's size and hash it."""
        try:
            os.ftruncate(self.file.fd, self.size)
        except OSError as exc:
            raise PayloadError(ErrorCode.DOWNLOAD_WRITE_ERROR, f"truncating {self.tmp}: {exc}") from exc
        return self.file.sha256(self.size, ErrorCode.NEW_KERNEL_VERIFICATION_ERROR)

    def install(self) -> None:
        """Make the verified kernel durable under its final name."""
        assert self.tmp is not None
        try:
            self._new.commit(durable=True)
        except OSError as exc:
            raise PayloadError(
                ErrorCode.DOWNLOAD_WRITE_ERROR, f"installing the new kernel as {self.path}: {exc}"
            ) from exc
        finally:
            if self._new.committed:
                self.tmp = None
        log.info("installed the new kernel as %s", self.path)

    def discard(self) -> None:
        """Close the file and remove it unless it was installed. Never raises."""
        self.file.close()
        try:
            self._new.close()
        except OSError as exc:
            log.warning("cannot close or remove %s: %s", self.file.what, exc)
        self.tmp = None


def remove_partial_kernels(kernel_path: Path) -> None:
    """Delete the temporary kernel files (``.<name>.*.partial``, as KernelFile names them) that an attempt
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
