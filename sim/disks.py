"""GPT disk images laid out like a Flatcar boot disk, made with sgdisk and read back with cgpt.

``make_usr_disk`` builds a small image with EFI-SYSTEM (1), BIOS-BOOT (2), USR-A (3), USR-B (4), OEM (6) and
ROOT (9); USR-A/USR-B carry the USR type and the fixed unique GUIDs of real images, and the flags of a fresh
image (USR-A priority 1 successful 1, USR-B all zero).  USR-A is filled with a deterministic pattern
(:func:`usr_a_pattern`) so a test can prove the running partition was not touched.  :func:`disk_facts` reads what
a fault must leave alone (USR-A's bytes and flags) with both cgpt and :mod:`update_engine.gpt`, and fails when
they disagree.

Rules: 512-byte-sector images are made by sgdisk.  sgdisk cannot give an image file another sector size, so
4096-byte images are assembled by hand from :mod:`update_engine.gpt`'s serialiser (:func:`write_gpt_image`).
sgdisk also refuses to make a table whose entries overlap or leave the usable area; :func:`craft_table` edits the
entries or headers of an image in place and gives them correct CRCs again, as a broken tool or an attacker would,
so the tests can show what happens with such tables.  sgdisk syncs and sleeps a second on every run, so each
layout is built once per process (:func:`cached_image`) and copied.  cgpt is the independent reader: flags a test
checks come from cgpt, not from the code under test.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sim.tools import find_tool
from update_engine import gpt

MIB = 1 << 20
USR_A_INDEX = 3
USR_B_INDEX = 4
DISK_GUID = uuid.UUID("00000000-0000-0000-0000-000000000001")  # what a fresh image carries until first boot

EFI_TYPE_GUID = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")
BIOS_BOOT_TYPE_GUID = uuid.UUID("21686148-6449-6e6f-744e-656564454649")
LINUX_DATA_TYPE_GUID = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4")
RESIZE_TYPE_GUID = uuid.UUID("3884dd41-8582-4404-b9a8-e9b84f2df50e")

FRESH_USR_A_FLAGS = gpt.PartitionFlags(priority=1, tries=0, successful=True)
FRESH_USR_B_FLAGS = gpt.PartitionFlags()


@dataclass(frozen=True)
class PartitionSpec:
    """One partition of a test image; sizes in MiB so layouts are the same at any sector size."""

    index: int
    name: str
    type_guid: uuid.UUID
    unique_guid: uuid.UUID
    size_mib: int
    flags: gpt.PartitionFlags = dataclasses.field(default_factory=gpt.PartitionFlags)


def usr_layout(usr_mib: int = 8) -> tuple[PartitionSpec, ...]:
    return (
        PartitionSpec(1, "EFI-SYSTEM", EFI_TYPE_GUID, uuid.UUID("6e8a1c52-4b7d-4f0e-9b63-0c2d1e5f7a01"), 1),
        PartitionSpec(
            2, "BIOS-BOOT", BIOS_BOOT_TYPE_GUID, uuid.UUID("6e8a1c52-4b7d-4f0e-9b63-0c2d1e5f7a02"), 1
        ),
        PartitionSpec(3, "USR-A", gpt.USR_TYPE_GUID, gpt.USR_A_GUID, usr_mib, FRESH_USR_A_FLAGS),
        PartitionSpec(4, "USR-B", gpt.USR_TYPE_GUID, gpt.USR_B_GUID, usr_mib, FRESH_USR_B_FLAGS),
        PartitionSpec(6, "OEM", LINUX_DATA_TYPE_GUID, uuid.UUID("6e8a1c52-4b7d-4f0e-9b63-0c2d1e5f7a06"), 1),
        PartitionSpec(9, "ROOT", RESIZE_TYPE_GUID, uuid.UUID("6e8a1c52-4b7d-4f0e-9b63-0c2d1e5f7a09"), 1),
    )


def usr_a_pattern(length: int) -> bytes:
    """Deterministic, position-dependent content for USR-A: every 4 KiB block differs from every other."""
    blocks = []
    for block in range(-(-length // 4096)):
        blocks.append(hashlib.sha256(b"USR-A block %d" % block).digest() * 128)
    return b"".join(blocks)[:length]


def _disk_bytes(layout: Sequence[PartitionSpec]) -> int:
    # 1 MiB for the primary table and alignment, the partitions, 1 MiB for the backup table.
    return (2 + sum(p.size_mib for p in layout)) * MIB


def _sgdisk_image(path: Path, layout: Sequence[PartitionSpec]) -> None:
    sgdisk = find_tool("sgdisk")
    args = [sgdisk, "--clear", f"--disk-guid={DISK_GUID}"]
    start = MIB // 512
    for p in layout:
        end = start + p.size_mib * MIB // 512 - 1
        args += [
            f"--new={p.index}:{start}:{end}",
            f"--change-name={p.index}:{p.name}",
            f"--typecode={p.index}:{p.type_guid}",
            f"--partition-guid={p.index}:{p.unique_guid}",
        ]
        if p.flags != gpt.PartitionFlags():
            # sgdisk sets attribute bits one at a time.
            value = p.flags.apply_to(0)
            args += [f"--attributes={p.index}:set:{bit}" for bit in range(64) if value >> bit & 1]
        start = end + 1
    subprocess.run([*args, str(path)], check=True, capture_output=True)


def write_gpt_image(path: Path, layout: Sequence[PartitionSpec], *, sector_size: int) -> None:
    """Write a protective MBR and both GPT copies for ``layout`` at ``sector_size`` (any size, e.g. 4096)."""
    disk_sectors = path.stat().st_size // sector_size
    num_entries = 128
    entry_sectors = -(-num_entries * gpt.ENTRY_SIZE // sector_size)
    header = gpt.GptHeader(
        revision=gpt.REVISION_1_0,
        header_size=gpt.HEADER_SIZE,
        my_lba=1,
        alternate_lba=disk_sectors - 1,
        first_usable_lba=2 + entry_sectors,
        last_usable_lba=disk_sectors - 2 - entry_sectors,
        disk_guid=DISK_GUID,
        partition_entry_lba=2,
        num_entries=num_entries,
        entry_size=gpt.ENTRY_SIZE,
    )
    by_index = {p.index: p for p in layout}
    entries = []
    start = MIB // sector_size
    for index in range(1, num_entries + 1):
        p = by_index.get(index)
        if p is None:
            entries.append(gpt.GptEntry(index, gpt.UNUSED_TYPE_GUID, gpt.UNUSED_TYPE_GUID, 0, 0, 0, ""))
            continue
        last = start + p.size_mib * MIB // sector_size - 1
        entries.append(
            gpt.GptEntry(index, p.type_guid, p.unique_guid, start, last, p.flags.apply_to(0), p.name)
        )
        start = last + 1
    backup = dataclasses.replace(
        header, my_lba=disk_sectors - 1, alternate_lba=1, partition_entry_lba=disk_sectors - 1 - entry_sectors
    )
    primary_header, array = gpt.serialize_copy(header, entries)
    backup_header, _ = gpt.serialize_copy(backup, entries)
    pmbr = bytearray(512)
    # One partition of type 0xEE covering the disk (in sectors, capped at 32 bits), then the boot signature.
    pmbr[446 + 4] = 0xEE
    pmbr[446 + 8 : 446 + 12] = (1).to_bytes(4, "little")
    pmbr[446 + 12 : 446 + 16] = min(disk_sectors - 1, 0xFFFFFFFF).to_bytes(4, "little")
    pmbr[510:512] = b"\x55\xaa"
    with path.open("r+b") as f:
        for offset, data in (
            (0, bytes(pmbr)),
            (sector_size, primary_header),
            (2 * sector_size, array),
            (backup.partition_entry_lba * sector_size, array),
            (backup.my_lba * sector_size, backup_header),
        ):
            f.seek(offset)
            f.write(data)


EntriesEdit = Callable[[list[gpt.GptEntry]], Iterable[gpt.GptEntry]]
HeaderEdit = Callable[[str, gpt.GptHeader], gpt.GptHeader]


def craft_table(
    path: Path,
    *,
    entries: EntriesEdit | None = None,
    header: HeaderEdit | None = None,
    copies: Sequence[str] = ("primary", "backup"),
    sector_size: int = 512,
) -> None:
    """Edit the entry array and/or header of the chosen GPT copies of the image at ``path`` in place, then write
    each copy where its (edited) header says, with both CRCs computed afresh.

    ``entries`` gets all slots of a copy and returns them (the same count, in order); ``header`` gets "primary" or
    "backup" and the header. Only the two headers and the two entry arrays are written.
    """
    disk_sectors = path.stat().st_size // sector_size
    with path.open("r+b") as f:
        for which, lba in (("primary", 1), ("backup", disk_sectors - 1)):
            if which not in copies:
                continue
            f.seek(lba * sector_size)
            old = gpt.parse_header(f.read(sector_size))
            f.seek(old.partition_entry_lba * sector_size)
            slots = list(gpt.parse_entries(f.read(old.entries_bytes), old))
            new_slots = list(entries(slots)) if entries is not None else slots
            new = header(which, old) if header is not None else old
            header_bytes, array = gpt.serialize_copy(new, new_slots)
            f.seek(new.partition_entry_lba * sector_size)
            f.write(array)
            f.seek(new.my_lba * sector_size)
            f.write(header_bytes)


def moved(index: int, *, first: int | None = None, last: int | None = None) -> EntriesEdit:
    """An :func:`craft_table` edit that gives partition ``index`` new first and/or last LBAs."""

    def edit(slots: list[gpt.GptEntry]) -> list[gpt.GptEntry]:
        entry = slots[index - 1]
        slots[index - 1] = dataclasses.replace(
            entry,
            first_lba=entry.first_lba if first is None else first,
            last_lba=entry.last_lba if last is None else last,
        )
        return slots

    return edit


_template_dir: Path | None = None


def cached_image(key: str, build: Callable[[Path], object]) -> Path:
    """A template image built once per test process by ``build(path)``, to be copied rather than rebuilt.

    sgdisk syncs and sleeps a second on every run, so each layout is made once and copied for each test.
    """
    global _template_dir
    if _template_dir is None:
        _template_dir = Path(tempfile.mkdtemp(prefix="gpt-templates-"))
        atexit.register(shutil.rmtree, _template_dir, True)
    path = _template_dir / key
    if not path.exists():
        partial = path.with_suffix(".partial")
        build(partial)
        partial.rename(path)
    return path


def _build_usr_disk(path: Path, usr_mib: int, sector_size: int) -> None:
    layout = usr_layout(usr_mib)
    with path.open("wb") as f:
        f.truncate(_disk_bytes(layout))
    if sector_size == 512:
        _sgdisk_image(path, layout)
    else:
        write_gpt_image(path, layout, sector_size=sector_size)
    usr_a_offset = MIB + sum(p.size_mib for p in layout if p.index < USR_A_INDEX) * MIB
    with path.open("r+b") as f:
        f.seek(usr_a_offset)
        f.write(usr_a_pattern(usr_mib * MIB))


def make_usr_disk(path: Path, *, usr_mib: int = 8, sector_size: int = 512) -> Path:
    """Create a Flatcar-like disk image at ``path`` (about 2 × usr_mib + 6 MiB) and return ``path``."""
    template = cached_image(
        f"usr-{usr_mib}-{sector_size}.img", lambda p: _build_usr_disk(p, usr_mib, sector_size)
    )
    shutil.copyfile(template, path)
    return path


def _cgpt_value(path: Path, index: int, field: str) -> str:
    cgpt = find_tool("cgpt")
    result = subprocess.run(
        [cgpt, "show", "-i", str(index), f"-{field}", str(path)], check=True, capture_output=True, text=True
    )
    return result.stdout.strip()


def cgpt_flags(path: Path, index: int) -> tuple[int, int, int]:
    """(priority, tries, successful) of partition ``index`` as cgpt reads them."""
    return (
        int(_cgpt_value(path, index, "P")),
        int(_cgpt_value(path, index, "T")),
        int(_cgpt_value(path, index, "S")),
    )


def partition_range(path: Path, index: int, *, sector_size: int = 512) -> tuple[int, int]:
    """(offset, length) in bytes of a partition: from cgpt for 512-byte sectors, else from our own reader."""
    if sector_size == 512:
        first = int(_cgpt_value(path, index, "b"))
        count = int(_cgpt_value(path, index, "s"))
        return first * 512, count * 512
    with gpt.GptDisk.open(path, sector_size=sector_size, writable=False) as disk:
        return disk.byte_range(index)


def partition_bytes(path: Path, index: int, *, sector_size: int = 512) -> bytes:
    offset, length = partition_range(path, index, sector_size=sector_size)
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(length)


def partition_sha256(path: Path, index: int, *, sector_size: int = 512) -> str:
    return hashlib.sha256(partition_bytes(path, index, sector_size=sector_size)).hexdigest()


class DiskCheckError(AssertionError):
    """cgpt cannot read an image, or cgpt and :mod:`update_engine.gpt` read different flags from it."""


def cgpt_flags_checked(disk: Path, index: int) -> tuple[int, int, int]:
    """(priority, tries, successful) from cgpt's attribute word; DiskCheckError if cgpt finds no valid table."""
    shown = subprocess.run(
        [find_tool("cgpt"), "show", "-i", str(index), "-A", str(disk)], capture_output=True, text=True
    )
    if shown.returncode != 0:
        raise DiskCheckError(f"cgpt cannot read {disk}: {shown.stderr.strip()}")
    flags = gpt.PartitionFlags.from_attributes(int(shown.stdout.strip(), 0) << 48)
    return flags.priority, flags.tries, int(flags.successful)


@dataclass(frozen=True)
class DiskFacts:
    """What a fault must never change (the running partition) and what it may (the passive one's flags)."""

    usr_a_sha256: str
    usr_a_flags: tuple[int, int, int]
    usr_b_flags: tuple[int, int, int]
    valid_copies: int  # GPT copies our reader accepts


def disk_facts(disk: Path) -> DiskFacts:
    """USR-A's hash, both USR partitions' flags (cgpt and our reader must agree) and how many GPT copies are valid."""
    with gpt.GptDisk.open(disk, writable=False) as gpt_disk:
        snap = gpt_disk.snapshot
        valid = sum(copy.problem is None for copy in (snap.primary, snap.backup))
        ours = {i: gpt_disk.flags(i) for i in (USR_A_INDEX, USR_B_INDEX)}
    a, b = cgpt_flags_checked(disk, USR_A_INDEX), cgpt_flags_checked(disk, USR_B_INDEX)
    for index, theirs in ((USR_A_INDEX, a), (USR_B_INDEX, b)):
        mine = ours[index]
        if (mine.priority, mine.tries, int(mine.successful)) != theirs:
            raise DiskCheckError(f"cgpt and GptDisk disagree on partition {index}: {theirs} and {mine}")
    return DiskFacts(partition_sha256(disk, USR_A_INDEX), a, b, valid)


def usr_flags(path: Path) -> dict[str, gpt.PartitionFlags]:
    """Flags of USR-A and USR-B as the disk holds them now, by label (read with :mod:`update_engine.gpt`)."""
    with gpt.GptDisk.open(path, writable=False) as disk:
        a, b = disk.usr_partitions()
        return {a.name: a.flags, b.name: b.flags}
