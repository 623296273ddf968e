"""The GRUB ``gptprio`` bootloader stand-in: which USR partition a simulated node boots, by Flatcar's rules.

A real bootloader cannot run here, so this module applies GRUB's ``gptprio.next`` to a disk image through the
project's GPT code: among the partitions of the USR type with tries left or marked successful, the one with the
highest priority (ties to the lowest index, priority 0 never); its tries are decremented, both GPT copies written,
before it "boots". A simulated image says which version it holds in the first block of its USR partition
(``COREOS_RELEASE_VERSION=…``, :func:`release_block`), which becomes the booted node's release file.

Rules: :func:`gptprio_choose` is pure; :func:`gptprio_next` is the only function that writes, and writes only the
chosen partition's tries (after GRUB's repair of a damaged table). Nothing here decides whether a boot succeeds:
that is the caller's simulation (a kernel panic is the caller not starting the daemons).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from update_engine import gpt

RELEASE_KEY = "COREOS_RELEASE_VERSION"
BLOCK = 4096


def gptprio_choose(entries: Sequence[gpt.GptEntry]) -> gpt.GptEntry | None:
    """GRUB's ``gptprio.next`` choice: of the USR-type entries with tries left or marked successful, the first
    (in index order) with the highest priority; priority 0 is never chosen. None: nothing is bootable."""
    best: gpt.GptEntry | None = None
    best_priority = 0
    for entry in sorted(entries, key=lambda e: e.index):
        if entry.type_guid != gpt.USR_TYPE_GUID:
            continue
        flags = entry.flags
        if (flags.tries > 0 or flags.successful) and flags.priority > best_priority:
            best, best_priority = entry, flags.priority
    return best


@dataclass(frozen=True)
class BootChoice:
    """What the bootloader picked and what it did to the partition's flags before booting it."""

    index: int
    label: str
    before: gpt.PartitionFlags
    after: gpt.PartitionFlags
    version: str | None

    def describe(self) -> str:
        """``boot USR-B 2.0.0 (tries 1→0)``: the line a bootloader would print."""
        version = self.version or "(no release file)"
        if self.before.tries != self.after.tries:
            detail = f"tries {self.before.tries}→{self.after.tries}"
        else:
            detail = f"successful={int(self.after.successful)}, tries {self.after.tries}"
        return f"boot {self.label} {version} ({detail})"


def release_block(version: str, board: str = "amd64-usr") -> bytes:
    """The first block of a simulated USR image holding ``version`` (zero-padded to 4 KiB)."""
    header = f"{RELEASE_KEY}={version}\nCOREOS_RELEASE_BOARD={board}\n".encode()
    return header + bytes(BLOCK - len(header))


def release_version(block: bytes) -> str | None:
    """``COREOS_RELEASE_VERSION`` from the first block of a USR partition (None: the partition holds none)."""
    prefix = RELEASE_KEY.encode() + b"="
    for line in block.split(b"\n"):
        if line.startswith(prefix):
            try:
                return line[len(prefix) :].strip().decode("ascii") or None
            except UnicodeDecodeError:
                return None
    return None


def stamp_version(disk_path: Path, label: str, version: str) -> None:
    """Write the release line of ``version`` at the start of partition ``label`` (USR-A or USR-B)."""
    with gpt.GptDisk.open(disk_path, writable=False) as disk:
        entry = next((e for e in disk.usr_partitions() if e.name == label), None)
        if entry is None:
            raise ValueError(f"{disk_path} has no partition {label}")
        offset, _ = disk.byte_range(entry.index)
    with disk_path.open("r+b") as f:
        f.seek(offset)
        f.write(f"{RELEASE_KEY}={version}\n".encode())


def gptprio_next(disk_path: Path) -> BootChoice | None:
    """The bootloader on ``disk_path``: repair the GPT, choose, decrement tries (both copies written), read
    the chosen slot's version. None when no partition is bootable."""
    with gpt.GptDisk.open(disk_path) as disk:
        disk.update_flags({})  # grub_gpt_repair: writes both copies only when they are not valid and equal
        chosen = gptprio_choose(disk.entries)
        if chosen is None:
            return None
        before = chosen.flags
        if before.tries > 0:
            disk.update_flags({chosen.index: gpt.FlagChange(tries=before.tries - 1)})
        after = disk.flags(chosen.index)
        offset, _ = disk.byte_range(chosen.index)
    with disk_path.open("rb") as f:
        f.seek(offset)
        block = f.read(BLOCK)
    return BootChoice(chosen.index, chosen.name, before, after, release_version(block))
