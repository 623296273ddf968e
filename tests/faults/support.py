"""What the update-engine fault tests share beyond :mod:`sim`: the versions and flags they expect, the checks that a
fault left the running partition alone, and a disk image held in memory for GPT trials."""

from __future__ import annotations

import hashlib
from pathlib import Path

from sim.disks import DiskFacts, disk_facts
from sim.node import Node

KIB = 1024
MIB = 1024 * KIB
OLD_VERSION = "1.0.0"
NEW_VERSION = "2.0.0"
FRESH_USR_A = (1, 0, 1)  # (priority, tries, successful) of the running partition on a fresh image
TEST_OMAHA_URL_FLAG = 1 << 28


def assert_running_untouched(before: DiskFacts, after: DiskFacts) -> None:
    assert after.usr_a_sha256 == before.usr_a_sha256, "the running partition's bytes changed"
    assert after.usr_a_flags == before.usr_a_flags, "the running partition's flags changed"
    assert after.valid_copies >= 1


def assert_nothing_armed(node: Node, before: DiskFacts) -> None:
    """A refused update: USR-A as it was, USR-B not bootable, no kernel installed, no reboot pending."""
    after = disk_facts(node.disk)
    assert_running_untouched(before, after)
    assert after.usr_b_flags[0] == 0, f"USR-B is bootable after a refused update: {after.usr_b_flags}"
    assert after.valid_copies == 2
    assert not (node.root.kernel_dir / "vmlinuz-b").exists()
    assert not node.reboot_marker.exists()


# --- a disk image in memory ----------------------------------------------------------------------------------

# Bytes kept in memory at each end of the image: both GPT copies at 512- and 4096-byte sectors fit.
REGION = 128 * 1024


class MemoryDisk:
    """A :class:`update_engine.gpt.BlockIO` over the first and last ``REGION`` bytes of an image; zeros between.

    Only the GPT areas matter here, and copying 256 KiB per trial instead of the whole image keeps thousands of
    trials cheap. A write outside the two regions fails the test (the GPT code must not write there).
    """

    def __init__(self, size: int, head: bytearray, tail: bytearray) -> None:
        self._size = size
        self.head = head
        self.tail = tail

    @classmethod
    def from_file(cls, path: Path) -> MemoryDisk:
        data = path.read_bytes()
        assert len(data) >= 2 * REGION
        return cls(len(data), bytearray(data[:REGION]), bytearray(data[-REGION:]))

    def clone(self) -> MemoryDisk:
        return MemoryDisk(self._size, bytearray(self.head), bytearray(self.tail))

    def state(self) -> bytes:
        return bytes(self.head) + bytes(self.tail)

    def digest(self) -> str:
        return hashlib.sha256(self.state()).hexdigest()

    def write_file(self, path: Path) -> None:
        """A sparse image file with this content, for cgpt."""
        with path.open("wb") as f:
            f.truncate(self._size)
            f.write(self.head)
            f.seek(self._size - REGION)
            f.write(self.tail)

    # BlockIO

    def pread(self, length: int, offset: int) -> bytes:
        out = bytearray(max(0, min(length, self._size - offset)))
        for base, region in ((0, self.head), (self._size - REGION, self.tail)):
            start, end = max(offset, base), min(offset + len(out), base + len(region))
            if start < end:
                out[start - offset : end - offset] = region[start - base : end - base]
        return bytes(out)

    def pwrite(self, data: bytes, offset: int) -> None:
        end = offset + len(data)
        if end <= REGION:
            self.head[offset:end] = data
        elif offset >= self._size - REGION and end <= self._size:
            base = self._size - REGION
            self.tail[offset - base : end - base] = data
        else:
            raise AssertionError(f"GPT write of {len(data)} bytes at {offset} is outside both GPT areas")

    def fsync(self) -> None:
        pass

    def size(self) -> int:
        return self._size

    def logical_sector_size(self) -> int | None:
        return None

    def close(self) -> None:
        pass
