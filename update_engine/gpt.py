"""GUID Partition Table: the A/B boot attributes of the USR partitions, read and written as the bootloader
expects.

GRUB's ``gptprio.next`` picks the USR partition to boot from three fields in bits 48..56 of each entry's
attribute word (priority, tries left, successful).  Update-engine arms the freshly written partition, marks a
healthy boot good and disarms an abandoned update by editing exactly those bits.  Every edit rewrites both
copies of the table with fresh CRCs, with an fsync after each: first the copy readers are not using, then the
one they are (usually backup then primary; primary then backup when the primary is the damaged copy being
rebuilt), so that an interrupted write always leaves one valid copy behind.

The module has a pure part (header/entry parsing and serialising, the flag bit layout, cgpt's ``prioritize``
renumbering, table validation) and one I/O shell, :class:`GptDisk`, which does all its disk access through a
:class:`BlockIO`.

Rules of the table.  CRCs only prove that a copy was written whole; they say nothing about whether its numbers make
sense.  A table is used only if :func:`table_problems` finds nothing wrong with it, as cgpt requires before it
touches a disk: every used entry has first <= last LBA, lies inside [FirstUsableLBA, LastUsableLBA], overlaps no
other used entry and has its own unique GUID; the usable area, the protective MBR, both headers and both entry
arrays lie on the disk and overlap none of each other.  Python integers do not wrap, so an LBA near 2^64 is just an
LBA beyond the disk.  :class:`GptDisk` checks this at every read, before every write, and on the copy it would
write; a table that fails is refused whole (:class:`GptTableInvalid`), never repaired or worked around, because the
kernel and the bootloader do not check overlaps and may be reading the very numbers that are wrong.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import stat
import struct
import uuid
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

from update_engine.errors import ErrorCode, UpdateEngineError

log = logging.getLogger(__name__)

SIGNATURE = b"EFI PART"
REVISION_1_0 = 0x00010000
HEADER_SIZE = 92
ENTRY_SIZE = 128
NAME_BYTES = 72  # 36 UTF-16LE code units

# Type GUIDs (cgpt/seismograph names in brackets).
USR_TYPE_GUID = uuid.UUID("5dfbf5f4-2848-4bac-aa5e-0d9a20b745a6")  # flatcar-usr / coreos-rootfs
CHROMEOS_KERNEL_TYPE_GUID = uuid.UUID("fe3a2a5d-4f32-41a7-b725-accc3285a309")  # kernel
UNUSED_TYPE_GUID = uuid.UUID(int=0)

# The USR partitions' unique GUIDs are fixed in every image and never randomised; GRUB's config compares them.
USR_A_GUID = uuid.UUID("7130c94a-213a-4e5a-8e26-6cce9662f132")
USR_B_GUID = uuid.UUID("e03dd35c-7c2d-4a47-b3fe-27f15780a57c")
USR_A_LABEL = "USR-A"
USR_B_LABEL = "USR-B"

# Attribute bits shared by GRUB's gptprio and ChromeOS firmware (not the Android/Qualcomm layout).
PRIORITY_SHIFT = 48
TRIES_SHIFT = 52
SUCCESSFUL_SHIFT = 56
FLAG_MAX = 15
_PRIORITY_MASK = 0xF << PRIORITY_SHIFT
_TRIES_MASK = 0xF << TRIES_SHIFT
_SUCCESSFUL_MASK = 1 << SUCCESSFUL_SHIFT
FLAGS_MASK = _PRIORITY_MASK | _TRIES_MASK | _SUCCESSFUL_MASK

# A header that claims a larger entry array than this is treated as corrupt rather than read.
MAX_ENTRIES_BYTES = 1 << 20

# The sector sizes we look for a GPT at when the device does not tell us (image files).
CANDIDATE_SECTOR_SIZES = (512, 4096)

_HEADER_STRUCT = struct.Struct("<8sIIIIQQQQ16sQIII")
_ENTRY_STRUCT = struct.Struct("<16s16sQQQ72s")
_HEADER_CRC_FIELD = slice(16, 20)

BLKSSZGET = 0x1268  # linux/fs.h: logical sector size of a block device


class GptError(UpdateEngineError):
    """The partition table cannot be read, is inconsistent, or cannot be changed as asked.

    The default Omaha code is SET_BOOTABLE_FLAG_ERROR: every GPT access in the update cycle exists to set or
    read the boot flags (arming the target after install, marking a boot good, disarming), so that is the step
    a report to the server should name.
    """

    def __init__(self, message: str, code: ErrorCode = ErrorCode.SET_BOOTABLE_FLAG_ERROR) -> None:
        super().__init__(code, message)


# At most this many problems are spelled out in one error message; the rest are counted.
_PROBLEMS_SHOWN = 4


class GptTableInvalid(GptError):
    """The table reads (its CRCs match) but describes an impossible layout, so nothing may be written by it.

    The Omaha code is INSTALL_DEVICE_OPEN_ERROR, what the original reports when it cannot determine the install
    device: the table is the only source of where the passive partition is, and it cannot be trusted.
    """

    def __init__(self, disk: str, problems: Sequence[TableProblem]) -> None:
        self.disk = disk
        self.problems = tuple(problems)
        shown = "; ".join(str(p) for p in self.problems[:_PROBLEMS_SHOWN])
        if len(self.problems) > _PROBLEMS_SHOWN:
            shown += f"; and {len(self.problems) - _PROBLEMS_SHOWN} more"
        super().__init__(
            f"the partition table of {disk} is invalid, refusing to use it: {shown}; the table was left as it "
            f"is (inspect it with 'sgdisk -v {disk}' or 'cgpt show {disk}' and correct it)",
            ErrorCode.INSTALL_DEVICE_OPEN_ERROR,
        )


# ----------------------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------------------


def _check_nibble(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= FLAG_MAX:
        raise ValueError(f"{name} must be an integer between 0 and {FLAG_MAX}, not {value!r}")


@dataclass(frozen=True)
class PartitionFlags:
    """Boot-selection fields of a partition: GRUB boots the highest priority with tries > 0 or successful."""

    priority: int = 0
    tries: int = 0
    successful: bool = False

    def __post_init__(self) -> None:
        _check_nibble("priority", self.priority)
        _check_nibble("tries", self.tries)
        if self.successful not in (0, 1):
            raise ValueError(f"successful must be 0 or 1, not {self.successful!r}")
        object.__setattr__(self, "successful", bool(self.successful))

    @classmethod
    def from_attributes(cls, attributes: int) -> PartitionFlags:
        return cls(
            priority=(attributes >> PRIORITY_SHIFT) & 0xF,
            tries=(attributes >> TRIES_SHIFT) & 0xF,
            successful=bool((attributes >> SUCCESSFUL_SHIFT) & 1),
        )

    def apply_to(self, attributes: int) -> int:
        """``attributes`` with bits 48..56 replaced by these flags; every other bit is kept."""
        return (
            (attributes & ~FLAGS_MASK & 0xFFFFFFFFFFFFFFFF)
            | (self.priority << PRIORITY_SHIFT)
            | (self.tries << TRIES_SHIFT)
            | (int(self.successful) << SUCCESSFUL_SHIFT)
        )

    @property
    def bootable(self) -> bool:
        """Whether GRUB's gptprio would consider this partition at all."""
        return self.priority > 0 and (self.tries > 0 or self.successful)

    def __str__(self) -> str:
        return f"priority={self.priority} tries={self.tries} successful={int(self.successful)}"


@dataclass(frozen=True)
class FlagChange:
    """A partial edit of :class:`PartitionFlags`: fields left as None keep their value on disk."""

    priority: int | None = None
    tries: int | None = None
    successful: bool | None = None

    def __post_init__(self) -> None:
        if self.priority is not None:
            _check_nibble("priority", self.priority)
        if self.tries is not None:
            _check_nibble("tries", self.tries)
        if self.successful is not None and self.successful not in (0, 1):
            raise ValueError(f"successful must be 0 or 1, not {self.successful!r}")

    def apply(self, flags: PartitionFlags) -> PartitionFlags:
        return PartitionFlags(
            priority=flags.priority if self.priority is None else self.priority,
            tries=flags.tries if self.tries is None else self.tries,
            successful=flags.successful if self.successful is None else bool(self.successful),
        )


def prioritize(
    priorities: Mapping[int, int],
    target: int | None,
    *,
    force: bool = False,
    max_priority: int | None = None,
) -> dict[int, int]:
    """New priorities after ``cgpt prioritize [-i target] [-f] [-P max_priority]``; only priorities change.

    ``priorities`` maps partition index to current priority for the partitions taking part (cgpt: those of one
    type).  Partitions are grouped by priority; the target (with ``force``, its whole group) becomes its own
    top group; the priority-0 group stays 0; the remaining groups are renumbered from ``max_priority``
    (default: the number of groups, at most 15) downwards, never below 1, so the lowest groups may merge at 1.
    """
    for index, priority in priorities.items():
        _check_nibble(f"priority of partition {index}", priority)
    if max_priority is not None and not 1 <= max_priority <= FLAG_MAX:
        raise ValueError(f"max_priority must be between 1 and {FLAG_MAX}, not {max_priority}")
    if target is not None and target not in priorities:
        raise ValueError(f"partition {target} is not one of the partitions being prioritized")

    top = FLAG_MAX + 1  # above any real priority, like cgpt's sentinel group
    groups: dict[int, list[int]] = {}
    for index in sorted(priorities):
        priority = priorities[index]
        if index == target and not force:
            priority = top
        groups.setdefault(priority, []).append(index)
    if target is not None and force:
        groups[top] = groups.pop(priorities[target])

    ranked = [groups[p] for p in sorted(groups, reverse=True) if p != 0]
    result = {index: 0 for index in groups.get(0, [])}
    next_priority = max_priority if max_priority is not None else min(len(ranked), FLAG_MAX)
    for members in ranked:
        for index in members:
            result[index] = next_priority
        next_priority = max(next_priority - 1, 1)
    return result


# ----------------------------------------------------------------------------------------------------------
# Header and entries (pure)
# ----------------------------------------------------------------------------------------------------------


def _crc32(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


@dataclass(frozen=True)
class GptHeader:
    """One GPT header.  ``header_crc32``/``entries_crc32`` are what the disk said; to_bytes computes them."""

    revision: int
    header_size: int
    my_lba: int
    alternate_lba: int
    first_usable_lba: int
    last_usable_lba: int
    disk_guid: uuid.UUID
    partition_entry_lba: int
    num_entries: int
    entry_size: int
    entries_crc32: int = 0
    header_crc32: int = 0
    reserved: int = 0
    tail: bytes = b""  # bytes between offset 92 and header_size, kept so a round trip changes nothing

    @property
    def entries_bytes(self) -> int:
        return self.num_entries * self.entry_size

    def entries_sectors(self, sector_size: int) -> int:
        return -(-self.entries_bytes // sector_size)

    def to_bytes(self, *, entries_crc32: int | None = None) -> bytes:
        """``header_size`` bytes with a freshly computed header CRC (and the given entries CRC, if any)."""
        crc_entries = self.entries_crc32 if entries_crc32 is None else entries_crc32
        body = _HEADER_STRUCT.pack(
            SIGNATURE,
            self.revision,
            self.header_size,
            0,
            self.reserved,
            self.my_lba,
            self.alternate_lba,
            self.first_usable_lba,
            self.last_usable_lba,
            self.disk_guid.bytes_le,
            self.partition_entry_lba,
            self.num_entries,
            self.entry_size,
            crc_entries,
        )
        body += self.tail
        crc = _crc32(body)
        return body[:16] + struct.pack("<I", crc) + body[20:]


def parse_header(data: bytes) -> GptHeader:
    """Parse and check a header at the start of ``data`` (a sector); raises GptError and nothing else."""
    if len(data) < HEADER_SIZE:
        raise GptError(f"GPT header needs {HEADER_SIZE} bytes, got {len(data)}")
    (
        signature,
        revision,
        header_size,
        header_crc,
        reserved,
        my_lba,
        alternate_lba,
        first_usable,
        last_usable,
        disk_guid,
        entry_lba,
        num_entries,
        entry_size,
        entries_crc,
    ) = _HEADER_STRUCT.unpack_from(data)
    if signature != SIGNATURE:
        raise GptError(f"no GPT signature (found {signature!r})")
    if not HEADER_SIZE <= header_size <= len(data):
        raise GptError(f"GPT header size {header_size} is outside {HEADER_SIZE}..{len(data)}")
    covered = bytearray(data[:header_size])
    covered[_HEADER_CRC_FIELD] = b"\0\0\0\0"
    if _crc32(bytes(covered)) != header_crc:
        raise GptError(
            f"GPT header CRC mismatch (stored {header_crc:#010x}, computed {_crc32(bytes(covered)):#010x})"
        )
    if revision >> 16 != 1:
        raise GptError(f"unsupported GPT revision {revision:#010x}")
    if entry_size < ENTRY_SIZE or entry_size % ENTRY_SIZE or (entry_size & (entry_size - 1)):
        raise GptError(f"GPT entry size {entry_size} is not 128 x 2^n")
    if num_entries < 1 or num_entries * entry_size > MAX_ENTRIES_BYTES:
        raise GptError(f"GPT entry count {num_entries} x {entry_size} bytes is not plausible")
    return GptHeader(
        revision=revision,
        header_size=header_size,
        my_lba=my_lba,
        alternate_lba=alternate_lba,
        first_usable_lba=first_usable,
        last_usable_lba=last_usable,
        disk_guid=uuid.UUID(bytes_le=disk_guid),
        partition_entry_lba=entry_lba,
        num_entries=num_entries,
        entry_size=entry_size,
        entries_crc32=entries_crc,
        header_crc32=header_crc,
        reserved=reserved,
        tail=bytes(data[HEADER_SIZE:header_size]),
    )


def geometry_problem(header: GptHeader, *, lba: int, disk_sectors: int, sector_size: int) -> str | None:
    """Why ``header`` (read at ``lba``) cannot describe this disk, or None.  Guards every write position."""
    if header.my_lba != lba:
        return f"MyLBA is {header.my_lba} but the header was read at LBA {lba}"
    last = disk_sectors - 1
    if not 1 <= header.alternate_lba <= last or header.alternate_lba == header.my_lba:
        return f"AlternateLBA {header.alternate_lba} is not another sector of this {disk_sectors}-sector disk"
    if not 0 < header.first_usable_lba <= header.last_usable_lba + 1 or header.last_usable_lba >= last:
        return f"usable range {header.first_usable_lba}..{header.last_usable_lba} does not fit the disk"
    first_entry = header.partition_entry_lba
    last_entry = first_entry + header.entries_sectors(sector_size) - 1
    if first_entry < 1 or last_entry > last:
        return f"entry array at LBA {first_entry}..{last_entry} lies outside the disk"
    if first_entry <= header.last_usable_lba and last_entry >= header.first_usable_lba:
        return f"entry array at LBA {first_entry}..{last_entry} overlaps the usable area"
    if first_entry <= header.my_lba <= last_entry:
        return f"entry array at LBA {first_entry}..{last_entry} overlaps its own header"
    return None


def _decode_name(raw: bytes) -> str:
    units = [raw[i : i + 2] for i in range(0, len(raw), 2)]
    end = next((i for i, unit in enumerate(units) if unit == b"\0\0"), len(units))
    return b"".join(units[:end]).decode("utf-16-le", errors="replace")


@dataclass(frozen=True)
class GptEntry:
    """One slot of the entry array.  ``index`` is 1-based, as in ``cgpt -i`` and ``/dev/sdaN``.

    ``raw`` holds the slot's bytes as read, so fields nobody changed are written back byte for byte (names
    with bytes after the terminating NUL, entries larger than 128 bytes).
    """

    index: int
    type_guid: uuid.UUID
    unique_guid: uuid.UUID
    first_lba: int
    last_lba: int  # inclusive
    attributes: int
    name: str
    raw: bytes = dataclasses.field(default=b"", repr=False, compare=False)

    @property
    def used(self) -> bool:
        return self.type_guid != UNUSED_TYPE_GUID

    @property
    def flags(self) -> PartitionFlags:
        return PartitionFlags.from_attributes(self.attributes)

    def with_flags(self, flags: PartitionFlags) -> GptEntry:
        return dataclasses.replace(self, attributes=flags.apply_to(self.attributes))

    def to_bytes(self, entry_size: int) -> bytes:
        raw = self.raw if len(self.raw) == entry_size else bytes(entry_size)
        name_field = raw[56 : 56 + NAME_BYTES]
        if _decode_name(name_field) != self.name:
            encoded = self.name.encode("utf-16-le")
            if len(encoded) > NAME_BYTES:
                raise GptError(f"partition {self.index} name {self.name!r} is longer than 36 UTF-16 units")
            name_field = encoded.ljust(NAME_BYTES, b"\0")
        packed = _ENTRY_STRUCT.pack(
            self.type_guid.bytes_le,
            self.unique_guid.bytes_le,
            self.first_lba,
            self.last_lba,
            self.attributes,
            name_field,
        )
        return packed + raw[ENTRY_SIZE:]


def parse_entry(index: int, raw: bytes) -> GptEntry:
    type_guid, unique_guid, first_lba, last_lba, attributes, name = _ENTRY_STRUCT.unpack_from(raw)
    return GptEntry(
        index=index,
        type_guid=uuid.UUID(bytes_le=type_guid),
        unique_guid=uuid.UUID(bytes_le=unique_guid),
        first_lba=first_lba,
        last_lba=last_lba,
        attributes=attributes,
        name=_decode_name(name),
        raw=bytes(raw),
    )


def parse_entries(data: bytes, header: GptHeader) -> tuple[GptEntry, ...]:
    """All ``num_entries`` slots (unused ones included), after checking the entries CRC from ``header``."""
    size = header.entries_bytes
    if len(data) < size:
        raise GptError(f"GPT entry array needs {size} bytes, got {len(data)}")
    array = bytes(data[:size])
    crc = _crc32(array)
    if crc != header.entries_crc32:
        raise GptError(
            f"GPT entries CRC mismatch (stored {header.entries_crc32:#010x}, computed {crc:#010x})"
        )
    step = header.entry_size
    return tuple(parse_entry(i + 1, array[i * step : (i + 1) * step]) for i in range(header.num_entries))


def serialize_entries(entries: Sequence[GptEntry], entry_size: int) -> bytes:
    for position, entry in enumerate(entries, start=1):
        if entry.index != position:
            raise GptError(f"entry array out of order: slot {position} holds partition {entry.index}")
    return b"".join(entry.to_bytes(entry_size) for entry in entries)


def serialize_copy(header: GptHeader, entries: Sequence[GptEntry]) -> tuple[bytes, bytes]:
    """(header bytes, entry array bytes) of one copy, both CRCs fresh: entries CRC first, then header CRC."""
    if len(entries) != header.num_entries:
        raise GptError(f"header expects {header.num_entries} entries, got {len(entries)}")
    array = serialize_entries(entries, header.entry_size)
    return header.to_bytes(entries_crc32=_crc32(array)), array


# ----------------------------------------------------------------------------------------------------------
# Table validation (pure)
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LbaRange:
    """Sectors ``first``..``last`` (inclusive) and what occupies them, as a message names it."""

    what: str
    first: int
    last: int

    def overlaps(self, other: LbaRange) -> bool:
        return self.first <= other.last and other.first <= self.last

    def __str__(self) -> str:
        where = f"LBA {self.first}" if self.first == self.last else f"LBA {self.first}..{self.last}"
        return f"{self.what} at {where}"


@dataclass(frozen=True)
class TableProblem:
    """One reason a table must not be used.  ``indexes`` are the partitions at fault (none: the headers are)."""

    message: str
    indexes: tuple[int, ...] = ()

    def __str__(self) -> str:
        return self.message


def _entry_label(entry: GptEntry) -> str:
    return f"partition {entry.index} ({entry.name or 'unnamed'})"


def _entry_range(entry: GptEntry) -> LbaRange:
    return LbaRange(_entry_label(entry), entry.first_lba, entry.last_lba)


def table_regions(primary: GptHeader, backup: GptHeader, sector_size: int) -> tuple[LbaRange, ...]:
    """The sectors the table itself occupies: protective MBR, both headers, both entry arrays."""
    regions = [LbaRange("the protective MBR", 0, 0)]
    for which, header in (("primary", primary), ("backup", backup)):
        sectors = max(header.entries_sectors(sector_size), 1)
        regions.append(LbaRange(f"the {which} GPT header", header.my_lba, header.my_lba))
        regions.append(
            LbaRange(
                f"the {which} entry array",
                header.partition_entry_lba,
                header.partition_entry_lba + sectors - 1,
            )
        )
    return tuple(sorted(regions, key=lambda region: (region.first, region.last)))


def _layout_problems(
    primary: GptHeader, backup: GptHeader, *, disk_sectors: int, sector_size: int
) -> list[TableProblem]:
    problems: list[TableProblem] = []
    last_sector = disk_sectors - 1
    regions = table_regions(primary, backup, sector_size)
    for region in regions:
        if region.last > last_sector:
            problems.append(TableProblem(f"{region} lies beyond the last sector of the disk ({last_sector})"))
    for i, region in enumerate(regions):
        for other in regions[i + 1 :]:
            if region.overlaps(other):
                problems.append(TableProblem(f"{region} overlaps {other}"))
    if (primary.first_usable_lba, primary.last_usable_lba) != (backup.first_usable_lba, backup.last_usable_lba):
        problems.append(
            TableProblem(
                f"the primary and backup headers disagree on the usable area (LBA {primary.first_usable_lba}.."
                f"{primary.last_usable_lba} and {backup.first_usable_lba}..{backup.last_usable_lba})"
            )
        )
    usable = LbaRange("the usable area", primary.first_usable_lba, primary.last_usable_lba)
    if usable.first > usable.last + 1:
        problems.append(TableProblem(f"the usable area starts at LBA {usable.first}, after its end {usable.last}"))
    elif usable.first <= usable.last:
        if usable.last > last_sector:
            problems.append(TableProblem(f"{usable} ends beyond the last sector of the disk ({last_sector})"))
        for region in regions:
            if usable.overlaps(region):
                problems.append(TableProblem(f"{usable} overlaps {region}"))
    return problems


def entry_problems(
    entries: Sequence[GptEntry],
    *,
    first_usable: int,
    last_usable: int,
    regions: Sequence[LbaRange] = (),
    disk_sectors: int | None = None,
) -> list[TableProblem]:
    """What is wrong with the used entries, as cgpt's entry check sees it (plus which table structure an entry
    outside the usable area runs into, for the message).

    Overlaps are found by one sweep in start order, so a table of thousands of entries costs n log n, and every
    entry that overlaps another is named at least once.
    """
    problems: list[TableProblem] = []
    used = [e for e in entries if e.used]
    ordered: list[GptEntry] = []
    for entry in used:
        span = _entry_range(entry)
        if entry.last_lba < entry.first_lba:
            problems.append(
                TableProblem(
                    f"{_entry_label(entry)} ends at LBA {entry.last_lba}, before its first LBA "
                    f"{entry.first_lba}",
                    (entry.index,),
                )
            )
            continue
        ordered.append(entry)
        if entry.first_lba < first_usable or entry.last_lba > last_usable:
            hits = [str(region) for region in regions if span.overlaps(region)]
            if disk_sectors is not None and entry.last_lba >= disk_sectors:
                hits.append(f"the end of the disk (LBA {disk_sectors - 1})")
            problems.append(
                TableProblem(
                    f"{span} lies outside the usable area (LBA {first_usable}..{last_usable})"
                    + (f" and runs into {' and '.join(hits)}" if hits else ""),
                    (entry.index,),
                )
            )
    ordered.sort(key=lambda e: (e.first_lba, e.last_lba, e.index))
    reach: GptEntry | None = None  # of the entries so far, the one that ends last
    for entry in ordered:
        if reach is not None and entry.first_lba <= reach.last_lba:
            problems.append(
                TableProblem(
                    f"{_entry_range(entry)} overlaps {_entry_range(reach)}",
                    tuple(sorted((reach.index, entry.index))),
                )
            )
        if reach is None or entry.last_lba > reach.last_lba:
            reach = entry
    by_guid: dict[uuid.UUID, GptEntry] = {}
    for entry in used:
        twin = by_guid.setdefault(entry.unique_guid, entry)
        if twin is not entry:
            problems.append(
                TableProblem(
                    f"{_entry_label(entry)} has the unique GUID {entry.unique_guid} of {_entry_label(twin)}",
                    (twin.index, entry.index),
                )
            )
    return problems


def table_problems(
    primary: GptHeader,
    backup: GptHeader,
    entries: Sequence[GptEntry],
    *,
    disk_sectors: int,
    sector_size: int,
) -> list[TableProblem]:
    """Everything wrong with a table that would be written as these two headers and these entries; empty when it
    can be used.  Positions come from the headers (MyLBA, PartitionEntryLBA), the size of the disk from the
    caller: nothing here trusts a number the disk gave without comparing it with the others.
    """
    problems = _layout_problems(primary, backup, disk_sectors=disk_sectors, sector_size=sector_size)
    problems += entry_problems(
        entries,
        first_usable=primary.first_usable_lba,
        last_usable=primary.last_usable_lba,
        regions=table_regions(primary, backup, sector_size),
        disk_sectors=disk_sectors,
    )
    return problems


# ----------------------------------------------------------------------------------------------------------
# I/O shell
# ----------------------------------------------------------------------------------------------------------


class BlockIO(Protocol):
    """The only way :class:`GptDisk` touches a disk.  Wrap one to observe or cut off writes."""

    def pread(self, length: int, offset: int) -> bytes: ...

    def pwrite(self, data: bytes, offset: int) -> None: ...

    def fsync(self) -> None: ...

    def size(self) -> int: ...

    def logical_sector_size(self) -> int | None:
        """The device's logical sector size, or None when it has none (an image file)."""
        ...

    def close(self) -> None: ...


class FileBlockIO:
    """:class:`BlockIO` over a block device or an image file, with positioned reads and writes."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd = fd
        self.path = path

    @classmethod
    def open(cls, path: str | Path, *, writable: bool = True) -> FileBlockIO:
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise GptError(
                f"cannot open disk {path}: {exc.strerror}", ErrorCode.INSTALL_DEVICE_OPEN_ERROR
            ) from exc
        return cls(fd, Path(path))

    def pread(self, length: int, offset: int) -> bytes:
        chunks: list[bytes] = []
        while length > 0:
            chunk = os.pread(self._fd, length, offset)
            if not chunk:
                break
            chunks.append(chunk)
            length -= len(chunk)
            offset += len(chunk)
        return b"".join(chunks)

    def pwrite(self, data: bytes, offset: int) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self._fd, view, offset)
            view = view[written:]
            offset += written

    def fsync(self) -> None:
        os.fsync(self._fd)

    def size(self) -> int:
        return os.lseek(self._fd, 0, os.SEEK_END)

    def logical_sector_size(self) -> int | None:
        if not stat.S_ISBLK(os.fstat(self._fd).st_mode):
            return None
        answer = fcntl.ioctl(self._fd, BLKSSZGET, struct.pack("i", 0))
        return int(struct.unpack("i", answer)[0])

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass(frozen=True)
class CopyState:
    """One of the two copies as found on disk: its header and entries, or why it is unusable."""

    which: str  # "primary" or "backup"
    lba: int
    header: GptHeader | None
    entries: tuple[GptEntry, ...] | None
    problem: str | None


@dataclass(frozen=True)
class GptSnapshot:
    """What one read of the disk found: the table in use and the state of both copies."""

    sector_size: int
    disk_sectors: int
    primary: CopyState
    backup: CopyState
    source: str  # the copy the table was taken from
    header: GptHeader
    entries: tuple[GptEntry, ...]

    @property
    def clean(self) -> bool:
        """Both copies valid and describing the same entries."""
        return (
            self.primary.problem is None
            and self.backup.problem is None
            and self.primary.entries is not None
            and self.backup.entries is not None
            and [e.raw for e in self.primary.entries] == [e.raw for e in self.backup.entries]
        )

    def copies_to_write(self) -> tuple[GptHeader, GptHeader]:
        """The (primary, backup) headers a write puts on the disk: shared fields from the copy in use, positions
        from each copy.

        A copy being rebuilt keeps its entry-array position if its header was sound (only its entries were
        bad), else gets the standard one: LBA 2 for the primary, just before the header for the backup.
        """
        source = self.header
        ss = self.sector_size
        sectors = source.entries_sectors(ss)

        def entry_lba(copy: CopyState, standard: int) -> int:
            header = copy.header
            if header is not None and header.entries_sectors(ss) == sectors:
                return header.partition_entry_lba
            return standard

        if self.source == "primary":
            backup_lba = source.alternate_lba
            backup = dataclasses.replace(
                source,
                my_lba=backup_lba,
                alternate_lba=source.my_lba,
                partition_entry_lba=entry_lba(self.backup, backup_lba - sectors),
            )
            return source, backup
        primary = dataclasses.replace(
            source,
            my_lba=1,
            alternate_lba=source.my_lba,
            partition_entry_lba=entry_lba(self.primary, 2),
        )
        return primary, dataclasses.replace(source, alternate_lba=1)

    def problems(self) -> list[TableProblem]:
        """What is wrong with the table as it would be written, and with the entries of the other copy when
        that copy reads but lists different entries (the kernel may be using it)."""
        primary, backup = self.copies_to_write()
        other = self.backup if self.source == "primary" else self.primary
        if other.entries is None or [e.raw for e in other.entries] == [e.raw for e in self.entries]:
            return table_problems(
                primary, backup, self.entries, disk_sectors=self.disk_sectors, sector_size=self.sector_size
            )
        problems = _layout_problems(primary, backup, disk_sectors=self.disk_sectors, sector_size=self.sector_size)
        regions = table_regions(primary, backup, self.sector_size)
        for copy in (self.primary, self.backup):
            assert copy.entries is not None  # the copy in use, or `other`, which has entries here
            for problem in entry_problems(
                copy.entries,
                first_usable=primary.first_usable_lba,
                last_usable=primary.last_usable_lba,
                regions=regions,
                disk_sectors=self.disk_sectors,
            ):
                problems.append(dataclasses.replace(problem, message=f"in the {copy.which} copy, {problem}"))
        return problems


@dataclass(frozen=True)
class Prioritize:
    """Options of a ``cgpt prioritize`` step inside :meth:`GptDisk.update_flags`.

    Only partitions of ``type_guid`` take part, as in cgpt (Flatcar's cgpt and GRUB's gptprio use the USR
    type; upstream cgpt the ChromeOS kernel type).
    """

    target: int
    force: bool = False
    max_priority: int | None = None
    type_guid: uuid.UUID = USR_TYPE_GUID


FlagEdit = PartitionFlags | FlagChange | None


class GptDisk:
    """The GPT of one whole disk or image file, with the boot-flag edits update-engine needs.

    Reads take both copies; a bad copy (header CRC, entries CRC, MyLBA, impossible geometry) is reported with
    a WARNING and the other one is used; two bad copies raise :class:`GptError`.  A table that reads but fails
    :func:`table_problems` (entries overlapping each other or the table, outside the usable area, reversed...)
    raises :class:`GptTableInvalid` at every read and before every write, so no flag is ever changed on it and
    no partition range is ever taken from it.  Query methods answer from the table read by
    :meth:`open`/:meth:`refresh` or the last write; every write re-reads the disk first.

    Writing (:meth:`update_flags`) rewrites both entry arrays and both headers with fresh CRCs, in this order:
    backup entries, backup header, fsync, primary entries, primary header, fsync.  No other byte changes.  If
    the primary (or backup) copy was bad, the write rebuilds it from the good one.

    All disk access goes through the :class:`BlockIO` given to the constructor.  That is the interposition
    point for fault tests: wrap a :class:`FileBlockIO` in a class that forwards ``pread``/``pwrite``/``fsync``
    and, say, raises after K bytes written to simulate a power cut, then build the disk with
    ``GptDisk(wrapper, name=str(path))``.  Exceptions other than OSError from ``pwrite``/``fsync`` propagate
    unchanged.
    """

    def __init__(self, io: BlockIO, *, name: str, sector_size: int | None = None) -> None:
        self._io = io
        self.name = name
        self._sector_size_hint = sector_size
        self._snapshot = self._read()

    @classmethod
    def open(cls, path: str | Path, *, sector_size: int | None = None, writable: bool = True) -> GptDisk:
        """Open a whole-disk block device or an image file and read its table.

        The sector size is ``sector_size`` if given, else the device's logical sector size, else (image files)
        the first of 512 and 4096 at which a valid GPT is found.
        """
        io = FileBlockIO.open(path, writable=writable)
        try:
            return cls(io, name=str(path), sector_size=sector_size)
        except BaseException:
            io.close()
            raise

    def close(self) -> None:
        self._io.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- reading ------------------------------------------------------------------------------------------

    def _io_error(self, action: str, exc: OSError) -> GptError:
        return GptError(f"cannot {action} disk {self.name}: {exc.strerror or exc}")

    def _read(self) -> GptSnapshot:
        try:
            disk_bytes = self._io.size()
            device_sector = self._io.logical_sector_size()
        except OSError as exc:
            raise self._io_error("inspect", exc) from exc
        if self._sector_size_hint is not None:
            candidates: tuple[int, ...] = (self._sector_size_hint,)
        elif device_sector is not None:
            candidates = (device_sector,)
        else:
            candidates = CANDIDATE_SECTOR_SIZES
        failures: list[str] = []
        for sector_size in candidates:
            if disk_bytes < sector_size * 4:
                failures.append(f"{disk_bytes} bytes is too small for a GPT with {sector_size}-byte sectors")
                continue
            snapshot = self._read_with(sector_size, disk_bytes // sector_size)
            if isinstance(snapshot, GptSnapshot):
                return snapshot
            failures.append(snapshot)
        raise GptError(f"no valid GPT on {self.name}: " + "; ".join(failures))

    def _read_copy(self, which: str, lba: int, sector_size: int, disk_sectors: int) -> CopyState:
        try:
            sector = self._io.pread(sector_size, lba * sector_size)
            try:
                header = parse_header(sector)
            except GptError as exc:
                return CopyState(which, lba, None, None, exc.message)
            problem = geometry_problem(header, lba=lba, disk_sectors=disk_sectors, sector_size=sector_size)
            if problem is not None:
                return CopyState(which, lba, None, None, problem)
            array = self._io.pread(header.entries_bytes, header.partition_entry_lba * sector_size)
            try:
                entries = parse_entries(array, header)
            except GptError as exc:
                # The header itself is sound, so its positions can be reused when this copy is rebuilt.
                return CopyState(which, lba, header, None, exc.message)
        except OSError as exc:
            raise self._io_error("read", exc) from exc
        return CopyState(which, lba, header, entries, None)

    def _read_with(self, sector_size: int, disk_sectors: int) -> GptSnapshot | str:
        primary = self._read_copy("primary", 1, sector_size, disk_sectors)
        backup_lba = disk_sectors - 1
        if primary.header is not None and 1 <= primary.header.alternate_lba < disk_sectors:
            backup_lba = primary.header.alternate_lba
        backup = self._read_copy("backup", backup_lba, sector_size, disk_sectors)
        if primary.problem is None:
            used = primary
        elif backup.problem is None:
            used = backup
        else:
            return (
                f"{sector_size}-byte sectors: primary at LBA 1: {primary.problem}; "
                f"backup at LBA {backup.lba}: {backup.problem}"
            )
        assert used.header is not None and used.entries is not None
        for copy in (primary, backup):
            if copy.problem is not None:
                log.warning(
                    "GPT %s: %s copy at LBA %d is invalid (%s); using the %s copy",
                    self.name,
                    copy.which,
                    copy.lba,
                    copy.problem,
                    used.which,
                )
        snapshot = GptSnapshot(
            sector_size, disk_sectors, primary, backup, used.which, used.header, used.entries
        )
        problems = snapshot.problems()
        if problems:
            raise GptTableInvalid(self.name, problems)
        if primary.problem is None and backup.problem is None and not snapshot.clean:
            log.warning(
                "GPT %s: primary and backup copies list different entries; using the primary", self.name
            )
        return snapshot

    def refresh(self) -> None:
        """Re-read both copies from the disk (another tool may have changed the table)."""
        self._snapshot = self._read()

    @property
    def snapshot(self) -> GptSnapshot:
        return self._snapshot

    @property
    def sector_size(self) -> int:
        return self._snapshot.sector_size

    @property
    def header(self) -> GptHeader:
        return self._snapshot.header

    @property
    def entries(self) -> tuple[GptEntry, ...]:
        """The used entries (non-zero type GUID), in index order."""
        return tuple(e for e in self._snapshot.entries if e.used)

    def entry(self, index: int) -> GptEntry:
        all_entries = self._snapshot.entries
        if not 1 <= index <= len(all_entries) or not all_entries[index - 1].used:
            raise GptError(f"disk {self.name} has no partition {index}")
        return all_entries[index - 1]

    def find_by_name(self, name: str) -> GptEntry | None:
        return next((e for e in self.entries if e.name == name), None)

    def usr_partitions(self) -> tuple[GptEntry, GptEntry]:
        """(USR-A, USR-B), found by partition name."""
        found: list[GptEntry] = []
        for label in (USR_A_LABEL, USR_B_LABEL):
            named = [e for e in self.entries if e.name == label]
            if len(named) > 1:
                raise GptError(
                    f"disk {self.name} has {len(named)} partitions named {label} "
                    f"({', '.join(str(e.index) for e in named)}); refusing to guess which one is meant",
                    ErrorCode.INSTALL_DEVICE_OPEN_ERROR,
                )
            entry = named[0] if named else None
            if entry is None:
                names = ", ".join(f"{e.index}:{e.name or '(unnamed)'}" for e in self.entries) or "none"
                raise GptError(
                    f"disk {self.name} has no partition named {label} (partitions: {names}); "
                    "it is not an A/B USR disk",
                    ErrorCode.INSTALL_DEVICE_OPEN_ERROR,
                )
            if entry.type_guid != USR_TYPE_GUID:
                log.warning(
                    "GPT %s: partition %d (%s) has type %s, not the USR type %s; the bootloader will skip it",
                    self.name,
                    entry.index,
                    label,
                    entry.type_guid,
                    USR_TYPE_GUID,
                )
            found.append(entry)
        return found[0], found[1]

    def flags(self, index: int) -> PartitionFlags:
        return self.entry(index).flags

    def byte_range(self, index: int) -> tuple[int, int]:
        """(offset, length) of the partition in bytes, inside the disk (the table was validated when read)."""
        entry = self.entry(index)
        if entry.last_lba < entry.first_lba:
            raise GptError(f"partition {index} on {self.name} ends (LBA {entry.last_lba}) before it starts")
        if entry.last_lba >= self._snapshot.disk_sectors:
            raise GptError(
                f"partition {index} on {self.name} ends at LBA {entry.last_lba}, beyond the disk's "
                f"{self._snapshot.disk_sectors} sectors"
            )
        return entry.first_lba * self.sector_size, (entry.last_lba - entry.first_lba + 1) * self.sector_size

    # -- writing ------------------------------------------------------------------------------------------

    def update_flags(
        self,
        changes: Mapping[int, FlagEdit],
        *,
        prioritize: int | Prioritize | None = None,
    ) -> dict[int, PartitionFlags]:
        """Apply several flag edits and an optional prioritize step in one write of both copies.

        ``changes`` maps a partition index to new flags (:class:`PartitionFlags`), a partial edit
        (:class:`FlagChange`), or None (no edit; the index is only checked to exist).  The prioritize step
        runs after the edits, over the partitions of the chosen type.  The table is re-read first; nothing is
        written when nothing changes and both copies are already valid and equal.  Returns the resulting flags
        of every partition whose flags changed.
        """
        snapshot = self._read()
        self._snapshot = snapshot
        table = {e.index: e for e in snapshot.entries}

        def used_entry(index: int) -> GptEntry:
            entry = table.get(index)
            if entry is None or not entry.used:
                raise GptError(f"disk {self.name} has no partition {index}")
            return entry

        for index, edit in changes.items():
            entry = used_entry(index)
            if isinstance(edit, PartitionFlags):
                table[index] = entry.with_flags(edit)
            elif isinstance(edit, FlagChange):
                table[index] = entry.with_flags(edit.apply(entry.flags))

        if prioritize is not None:
            step = prioritize if isinstance(prioritize, Prioritize) else Prioritize(prioritize)
            target = used_entry(step.target)
            if target.type_guid != step.type_guid:
                raise GptError(
                    f"partition {step.target} on {self.name} has type {target.type_guid}, "
                    f"not {step.type_guid}; the bootloader would never choose it"
                )
            members = {e.index: e.flags.priority for e in table.values() if e.type_guid == step.type_guid}
            try:
                renumbered = _prioritize_for(members, step)
            except ValueError as exc:
                raise GptError(f"cannot prioritize partition {step.target} on {self.name}: {exc}") from exc
            for index, priority in renumbered.items():
                entry = table[index]
                table[index] = entry.with_flags(dataclasses.replace(entry.flags, priority=priority))

        new_entries = tuple(table[i] for i in range(1, len(snapshot.entries) + 1))
        changed = {
            e.index: (old.flags, e.flags)
            for e, old in zip(new_entries, snapshot.entries, strict=True)
            if e.attributes != old.attributes
        }
        if not changed and snapshot.clean:
            log.debug("GPT %s: flags already as requested; nothing written", self.name)
            return {}
        self._write(snapshot, new_entries)
        log.info(
            "GPT %s: %s (both copies written%s)",
            self.name,
            "; ".join(
                f"partition {i} ({table[i].name}) {old} -> {new}" for i, (old, new) in sorted(changed.items())
            )
            or "no flag changes",
            ""
            if snapshot.clean
            else f", {'primary' if snapshot.source == 'backup' else 'backup'} copy repaired",
        )
        return {index: new for index, (_, new) in changed.items()}

    def arm_for_next_boot(self, index: int) -> dict[int, PartitionFlags]:
        """Postinstall: successful=0, tries=1 on ``index``, then make it the highest priority."""
        return self.update_flags({index: FlagChange(successful=False, tries=1)}, prioritize=index)

    def mark_good(self, index: int) -> dict[int, PartitionFlags]:
        """After a healthy boot from ``index``: successful=1, tries=0, and keep it the highest priority."""
        return self.update_flags({index: FlagChange(successful=True, tries=0)}, prioritize=index)

    def disarm(self, index: int) -> dict[int, PartitionFlags]:
        """Make ``index`` not bootable: priority=0, tries=0, successful=0."""
        return self.update_flags({index: PartitionFlags(priority=0, tries=0, successful=False)})

    def _write(self, snapshot: GptSnapshot, entries: tuple[GptEntry, ...]) -> None:
        primary, backup = snapshot.copies_to_write()
        ss = snapshot.sector_size
        problems = table_problems(
            primary, backup, entries, disk_sectors=snapshot.disk_sectors, sector_size=ss
        )
        if problems:
            raise GptTableInvalid(self.name, problems)
        primary_header, array = serialize_copy(primary, entries)
        backup_header, _ = serialize_copy(backup, entries)
        # The copy readers use now is written last: a write cut short anywhere leaves it intact until the other
        # copy is whole again. Usually that is the primary; when the primary is the damaged one, it is rebuilt
        # first and the backup, which readers fall back on meanwhile, is rewritten after.
        copies = [(backup, backup_header), (primary, primary_header)]
        if snapshot.source == "backup":
            copies.reverse()
        try:
            for header, header_bytes in copies:
                self._io.pwrite(array, header.partition_entry_lba * ss)
                self._io.pwrite(header_bytes, header.my_lba * ss)
                self._io.fsync()
        except OSError as exc:
            raise self._io_error("write the partition table of", exc) from exc
        after = self._read()
        self._snapshot = after
        if after.source != "primary" or not after.clean or b"".join(e.raw for e in after.entries) != array:
            raise GptError(f"the partition table of {self.name} does not read back as written")


def _prioritize_for(members: Mapping[int, int], step: Prioritize) -> dict[int, int]:
    return prioritize(members, step.target, force=step.force, max_priority=step.max_priority)
