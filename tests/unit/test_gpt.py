"""GPT parsing, serialising, the boot-flag bits, cgpt's prioritize, and GptDisk over an in-memory disk."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import struct
import uuid
import zlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.disks import (
    LINUX_DATA_TYPE_GUID,
    MIB,
    EntriesEdit,
    HeaderEdit,
    PartitionSpec,
    craft_table,
    moved,
    usr_layout,
    write_gpt_image,
)
from update_engine import gpt
from update_engine.errors import ErrorCode, UpdateEngineError
from update_engine.gpt import FlagChange, GptDisk, GptError, GptTableInvalid, PartitionFlags, Prioritize

# ----------------------------------------------------------------------------------------------------------
# Test vectors built straight from the on-disk layout, independently of the module's serialiser
# ----------------------------------------------------------------------------------------------------------


def raw_header(**overrides: int) -> bytes:
    """A primary header packed field by field at the documented offsets, with its CRC computed here."""
    fields = {
        "revision": 0x00010000,
        "size": 92,
        "my_lba": 1,
        "alt_lba": 131071,
        "first": 34,
        "last": 131038,
        "entry_lba": 2,
        "count": 128,
        "esz": 128,
        "entries_crc": 0x12345678,
    }
    fields.update(overrides)
    data = bytearray(92)
    data[0:8] = b"EFI PART"
    data[8:12] = fields["revision"].to_bytes(4, "little")
    data[12:16] = fields["size"].to_bytes(4, "little")
    data[24:32] = fields["my_lba"].to_bytes(8, "little")
    data[32:40] = fields["alt_lba"].to_bytes(8, "little")
    data[40:48] = fields["first"].to_bytes(8, "little")
    data[48:56] = fields["last"].to_bytes(8, "little")
    data[56:72] = uuid.UUID("00000000-0000-0000-0000-000000000001").bytes_le
    data[72:80] = fields["entry_lba"].to_bytes(8, "little")
    data[80:84] = fields["count"].to_bytes(4, "little")
    data[84:88] = fields["esz"].to_bytes(4, "little")
    data[88:92] = fields["entries_crc"].to_bytes(4, "little")
    data[16:20] = zlib.crc32(bytes(data)).to_bytes(4, "little")  # computed while bytes 16..19 are zero
    return bytes(data)


def raw_entry(type_guid: uuid.UUID, unique: uuid.UUID, first: int, last: int, attrs: int, name: str) -> bytes:
    data = bytearray(128)
    data[0:16] = type_guid.bytes_le
    data[16:32] = unique.bytes_le
    data[32:40] = first.to_bytes(8, "little")
    data[40:48] = last.to_bytes(8, "little")
    data[48:56] = attrs.to_bytes(8, "little")
    encoded = name.encode("utf-16-le")
    data[56 : 56 + len(encoded)] = encoded
    return bytes(data)


USR_B_RAW = raw_entry(gpt.USR_TYPE_GUID, gpt.USR_B_GUID, 22528, 38911, 0, "USR-B")


# ----------------------------------------------------------------------------------------------------------
# Header
# ----------------------------------------------------------------------------------------------------------


def test_header_fields_are_read_from_their_offsets() -> None:
    header = gpt.parse_header(raw_header() + bytes(420))
    assert header.my_lba == 1
    assert header.alternate_lba == 131071
    assert (header.first_usable_lba, header.last_usable_lba) == (34, 131038)
    assert header.partition_entry_lba == 2
    assert (header.num_entries, header.entry_size) == (128, 128)
    assert header.entries_crc32 == 0x12345678
    assert header.disk_guid == uuid.UUID("00000000-0000-0000-0000-000000000001")


def test_header_round_trips_byte_for_byte() -> None:
    data = raw_header()
    assert gpt.parse_header(data).to_bytes() == data


def test_header_crc_is_over_92_bytes_with_the_crc_field_zeroed() -> None:
    header = gpt.parse_header(raw_header())
    moved = dataclasses.replace(header, my_lba=131071, alternate_lba=1, partition_entry_lba=131039)
    data = moved.to_bytes()
    zeroed = data[:16] + b"\0\0\0\0" + data[20:92]
    assert struct.unpack_from("<I", data, 16)[0] == zlib.crc32(zeroed)
    # The backup's header CRC differs from the primary's because MyLBA/AlternateLBA differ.
    assert data[16:20] != raw_header()[16:20]


def test_header_with_a_flipped_byte_is_rejected() -> None:
    data = bytearray(raw_header())
    data[40] ^= 0x01
    with pytest.raises(GptError, match="header CRC mismatch"):
        gpt.parse_header(bytes(data))


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"EFI PART", "needs 92 bytes"),
        (b"NOT GPT!" + raw_header()[8:], "no GPT signature"),
        (raw_header(size=91), "header size"),
        (raw_header(size=600), "header size"),
        (raw_header(esz=100), "entry size"),
        (raw_header(esz=384), "entry size"),
        (raw_header(count=0), "entry count"),
        (raw_header(count=1 << 20), "entry count"),
        (raw_header(revision=0x00020000), "revision"),
    ],
)
def test_implausible_headers_name_the_problem(data: bytes, problem: str) -> None:
    with pytest.raises(GptError, match=problem) as info:
        gpt.parse_header(data)
    assert isinstance(info.value, UpdateEngineError)
    assert info.value.code == ErrorCode.SET_BOOTABLE_FLAG_ERROR


def test_geometry_checks_catch_a_header_in_the_wrong_place() -> None:
    header = gpt.parse_header(raw_header())
    ok = {"disk_sectors": 131072, "sector_size": 512}
    assert gpt.geometry_problem(header, lba=1, **ok) is None
    assert "MyLBA" in (gpt.geometry_problem(header, lba=131071, **ok) or "")
    assert "not another sector" in (
        gpt.geometry_problem(header, lba=1, disk_sectors=20, sector_size=512) or ""
    )
    beyond = dataclasses.replace(header, alternate_lba=19, first_usable_lba=34, last_usable_lba=17)
    assert "usable range" in (gpt.geometry_problem(beyond, lba=1, disk_sectors=20, sector_size=512) or "")
    far = dataclasses.replace(header, partition_entry_lba=131060, first_usable_lba=3, last_usable_lba=100)
    assert "outside the disk" in (gpt.geometry_problem(far, lba=1, **ok) or "")
    overlapping = dataclasses.replace(header, first_usable_lba=20)
    assert "overlaps the usable area" in (gpt.geometry_problem(overlapping, lba=1, **ok) or "")
    # Geometry comes from the header, never from constants: the same table at 4096-byte sectors is 4 sectors.
    small = dataclasses.replace(header, alternate_lba=16383, first_usable_lba=6, last_usable_lba=16378)
    assert gpt.geometry_problem(small, lba=1, disk_sectors=16384, sector_size=4096) is None
    assert small.entries_sectors(4096) == 4


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_raise_only_gpt_error(data: bytes) -> None:
    with contextlib.suppress(GptError):
        gpt.parse_header(data)


@settings(max_examples=200, deadline=None)
@given(
    body=st.binary(min_size=84, max_size=600),
    header_size=st.one_of(st.integers(0, 0xFFFFFFFF), st.integers(88, 130)),
    fix_crc=st.booleans(),
)
def test_headers_with_a_signature_and_valid_crc_raise_only_gpt_error(
    body: bytes, header_size: int, fix_crc: bool
) -> None:
    """Get past the signature and CRC checks so the field checks see hostile values too."""
    data = bytearray(b"EFI PART" + body)
    data[8:12] = (0x00010000).to_bytes(4, "little")
    data[12:16] = header_size.to_bytes(4, "little")
    if fix_crc and 92 <= header_size <= len(data):
        data[16:20] = b"\0\0\0\0"
        data[16:20] = zlib.crc32(bytes(data[:header_size])).to_bytes(4, "little")
    try:
        header = gpt.parse_header(bytes(data))
    except GptError:
        return
    assert header.to_bytes() == bytes(data[: header.header_size])


# ----------------------------------------------------------------------------------------------------------
# Entries
# ----------------------------------------------------------------------------------------------------------


def test_entry_fields_guids_are_mixed_endian_and_names_utf16() -> None:
    entry = gpt.parse_entry(4, USR_B_RAW)
    assert USR_B_RAW[0:4] == bytes.fromhex("f4f5fb5d")  # first GUID group stored little-endian
    assert entry.type_guid == gpt.USR_TYPE_GUID
    assert entry.unique_guid == gpt.USR_B_GUID
    assert (entry.first_lba, entry.last_lba) == (22528, 38911)
    assert entry.name == "USR-B"
    assert entry.used


def test_entries_are_indexed_by_the_headers_entry_size() -> None:
    esz = 256
    extra = b"\xaa" * 128
    slots = [
        raw_entry(gpt.USR_TYPE_GUID, uuid.uuid4(), 100 * i, 100 * i + 99, 0, f"P{i}") + extra for i in (1, 2)
    ]
    array = b"".join(slots) + bytes(esz * 2)
    header = dataclasses.replace(
        gpt.parse_header(raw_header(esz=esz, count=4)), entries_crc32=zlib.crc32(array)
    )
    entries = gpt.parse_entries(array, header)
    assert [e.index for e in entries] == [1, 2, 3, 4]
    assert [e.name for e in entries] == ["P1", "P2", "", ""]
    assert entries[1].first_lba == 200
    assert not entries[2].used
    # Bytes past 128 in each slot survive a rewrite.
    assert gpt.serialize_entries(entries, esz) == array


def test_entries_crc_covers_the_whole_array_including_empty_slots() -> None:
    array = USR_B_RAW + bytes(127 * 128)
    header = dataclasses.replace(gpt.parse_header(raw_header()), entries_crc32=zlib.crc32(array))
    assert len(gpt.parse_entries(array, header)) == 128
    damaged = array[:-1] + b"\x01"  # a byte in the last, empty slot
    with pytest.raises(GptError, match="entries CRC mismatch"):
        gpt.parse_entries(damaged, header)
    with pytest.raises(GptError, match="needs 16384 bytes"):
        gpt.parse_entries(array[:1000], header)


def test_serialize_copy_writes_fresh_crcs_entries_first() -> None:
    array = USR_B_RAW + bytes(127 * 128)
    header = dataclasses.replace(gpt.parse_header(raw_header()), entries_crc32=zlib.crc32(array))
    entries = gpt.parse_entries(array, header)
    changed = list(entries)
    changed[0] = entries[0].with_flags(PartitionFlags(priority=2, tries=1, successful=False))
    header_bytes, new_array = gpt.serialize_copy(header, changed)
    reread = gpt.parse_header(header_bytes)
    assert reread.entries_crc32 == zlib.crc32(new_array) != header.entries_crc32
    assert gpt.parse_entries(new_array, reread)[0].flags == PartitionFlags(2, 1, False)
    # Only the attribute bytes of the edited slot differ.
    assert [i for i in range(len(array)) if array[i] != new_array[i]] == [54]


def test_name_bytes_after_the_terminator_are_kept_when_the_name_is_unchanged() -> None:
    raw = bytearray(USR_B_RAW)
    raw[56 + 12 : 56 + 16] = b"\0\0Z\0"  # NUL, then leftover garbage from an older, longer name
    entry = gpt.parse_entry(4, bytes(raw))
    assert entry.name == "USR-B"
    assert entry.to_bytes(128) == bytes(raw)
    renamed = dataclasses.replace(entry, name="USR-C")
    assert gpt.parse_entry(4, renamed.to_bytes(128)).name == "USR-C"


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=128, max_size=128))
def test_any_entry_slot_round_trips(raw: bytes) -> None:
    assert gpt.parse_entry(1, raw).to_bytes(128) == raw


# ----------------------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------------------


def test_flag_bits_byte_54_is_tries_and_priority_byte_55_bit_0_is_successful() -> None:
    attrs = PartitionFlags(priority=2, tries=0, successful=True).apply_to(0)
    assert attrs == 0x0102000000000000
    assert attrs.to_bytes(8, "little") == bytes.fromhex("0000000000000201")
    attrs = PartitionFlags(priority=15, tries=5, successful=False).apply_to(0)
    assert attrs.to_bytes(8, "little")[6:] == bytes.fromhex("5f00")
    assert PartitionFlags.from_attributes(0x0102000000000000) == PartitionFlags(2, 0, True)
    assert PartitionFlags.from_attributes(0x005F000000000000) == PartitionFlags(15, 5, False)


def test_flags_keep_every_other_attribute_bit() -> None:
    others = (1 << 0) | (1 << 2) | (1 << 57) | (1 << 63)  # required, legacy boot, error counter, high bit
    attrs = PartitionFlags(priority=3, tries=1, successful=True).apply_to(others | gpt.FLAGS_MASK)
    assert attrs & ~gpt.FLAGS_MASK == others
    assert PartitionFlags.from_attributes(attrs) == PartitionFlags(3, 1, True)


@pytest.mark.parametrize("bad", [{"priority": 16}, {"tries": -1}, {"tries": 1.0}, {"successful": 2}])
def test_flags_outside_their_bit_width_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        PartitionFlags(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        FlagChange(**bad)  # type: ignore[arg-type]


def test_flag_change_edits_only_the_given_fields() -> None:
    start = PartitionFlags(priority=1, tries=0, successful=True)
    assert FlagChange(successful=False, tries=1).apply(start) == PartitionFlags(1, 1, False)
    assert FlagChange().apply(start) == start


def test_bootable_follows_grubs_rule() -> None:
    assert PartitionFlags(1, 0, True).bootable
    assert PartitionFlags(2, 1, False).bootable
    assert not PartitionFlags(2, 0, False).bootable
    assert not PartitionFlags(0, 3, True).bootable


# ----------------------------------------------------------------------------------------------------------
# prioritize: the examples measured with cgpt, then properties
# ----------------------------------------------------------------------------------------------------------

FIVE = {1: 0, 2: 1, 3: 3, 4: 3, 5: 9}


def as_list(result: dict[int, int]) -> list[int]:
    return [result[i] for i in sorted(result)]


@pytest.mark.parametrize(
    ("target", "force", "max_priority", "expected"),
    [
        (2, False, None, [0, 3, 1, 1, 2]),
        (None, False, None, [0, 1, 2, 2, 3]),
        (3, True, None, [0, 1, 3, 3, 2]),
        (3, False, None, [0, 1, 4, 2, 3]),
        (2, False, 5, [0, 5, 3, 3, 4]),
    ],
)
def test_prioritize_reference_examples(
    target: int | None, force: bool, max_priority: int | None, expected: list[int]
) -> None:
    assert as_list(gpt.prioritize(FIVE, target, force=force, max_priority=max_priority)) == expected


def test_prioritize_the_flatcar_update_cycle() -> None:
    fresh = {3: 1, 4: 0}
    assert gpt.prioritize(fresh, 4) == {3: 1, 4: 2}  # postinstall arms USR-B above USR-A
    assert gpt.prioritize({3: 1, 4: 2}, 4) == {3: 1, 4: 2}  # marking USR-B good keeps it on top
    assert gpt.prioritize({3: 1, 4: 0}, 3) == {3: 1, 4: 0}  # marking a fresh USR-A good changes nothing


def test_prioritize_coalesces_the_lowest_groups_at_one() -> None:
    assert as_list(gpt.prioritize({1: 5, 2: 4, 3: 3, 4: 2}, 4, max_priority=2)) == [1, 1, 1, 2]
    sixteen_groups = {i: i - 1 for i in range(1, 17)}  # priorities 0..15, target 1 gets its own group
    result = gpt.prioritize(sixteen_groups, 1)
    assert result[1] == 15 and result[16] == 14 and result[2] == 1 and result[3] == 1


def test_prioritize_with_force_on_a_priority_zero_target_lifts_its_whole_group() -> None:
    assert as_list(gpt.prioritize({1: 0, 2: 0, 3: 4}, 1, force=True)) == [2, 2, 1]
    assert as_list(gpt.prioritize({1: 0, 2: 0, 3: 4}, 1)) == [2, 0, 1]


def test_prioritize_rejects_what_cgpt_rejects() -> None:
    with pytest.raises(ValueError, match="not one of"):
        gpt.prioritize(FIVE, 7)
    with pytest.raises(ValueError, match="max_priority"):
        gpt.prioritize(FIVE, 2, max_priority=16)
    with pytest.raises(ValueError, match="max_priority"):
        gpt.prioritize(FIVE, 2, max_priority=0)


@settings(max_examples=200, deadline=None)
@given(
    priorities=st.dictionaries(st.integers(1, 12), st.integers(0, 15), min_size=1, max_size=12),
    data=st.data(),
    force=st.booleans(),
)
def test_prioritize_properties(priorities: dict[int, int], data: st.DataObject, force: bool) -> None:
    target = data.draw(st.sampled_from(sorted(priorities)))
    result = gpt.prioritize(priorities, target, force=force)
    assert result.keys() == priorities.keys()
    assert result[target] == max(result.values()) >= 1
    for index, old in priorities.items():
        if old == 0 and not (force and priorities[target] == 0) and index != target:
            assert result[index] == 0  # nothing is raised from 0 except the target (and its group with force)
        if index != target and old > 0:
            assert result[index] >= 1  # nothing active is lowered to 0
    moved = {i for i, p in priorities.items() if p == priorities[target]} if force else {target}
    for a in priorities:
        for b in priorities:
            if not moved & {a, b} and priorities[a] > priorities[b]:
                assert result[a] >= result[b]  # the order of the others is kept


# ----------------------------------------------------------------------------------------------------------
# GptDisk over an in-memory disk: write order, single write per update, repair, stale state
# ----------------------------------------------------------------------------------------------------------


class MemoryDisk:
    """A BlockIO over a bytearray that records every write and fsync."""

    def __init__(self, data: bytes, sector_size: int | None = None) -> None:
        self.data = bytearray(data)
        self.ops: list[tuple[str, int, int]] = []
        self._sector_size = sector_size

    def pread(self, length: int, offset: int) -> bytes:
        return bytes(self.data[offset : offset + length])

    def pwrite(self, data: bytes, offset: int) -> None:
        self.ops.append(("write", offset, len(data)))
        self.data[offset : offset + len(data)] = data

    def fsync(self) -> None:
        self.ops.append(("fsync", 0, 0))

    def size(self) -> int:
        return len(self.data)

    def logical_sector_size(self) -> int | None:
        return self._sector_size

    def close(self) -> None:
        pass


def small_layout() -> list[PartitionSpec]:
    return list(usr_layout(usr_mib=1))


def image_bytes(
    tmp_path: Path, *, sector_size: int = 512, layout: list[PartitionSpec] | None = None
) -> bytes:
    layout = layout if layout is not None else small_layout()
    path = tmp_path / f"img-{sector_size}"
    with path.open("wb") as f:
        f.truncate((2 + sum(p.size_mib for p in layout)) * MIB)
    write_gpt_image(path, layout, sector_size=sector_size)
    return path.read_bytes()


def memory_disk(tmp_path: Path, **kwargs: object) -> tuple[MemoryDisk, GptDisk]:
    io = MemoryDisk(image_bytes(tmp_path, **kwargs))  # type: ignore[arg-type]
    return io, GptDisk(io, name="mem0")


def test_a_write_goes_backup_entries_header_fsync_then_primary_entries_header_fsync(tmp_path: Path) -> None:
    io, disk = memory_disk(tmp_path)
    last = len(io.data) // 512 - 1
    disk.arm_for_next_boot(4)
    assert io.ops == [
        ("write", (last - 32) * 512, 16384),
        ("write", last * 512, 92),
        ("fsync", 0, 0),
        ("write", 2 * 512, 16384),
        ("write", 1 * 512, 92),
        ("fsync", 0, 0),
    ]
    assert disk.flags(4) == PartitionFlags(priority=2, tries=1, successful=False)
    assert disk.flags(3) == PartitionFlags(priority=1, tries=0, successful=True)


def test_several_changes_and_prioritize_are_one_write(tmp_path: Path) -> None:
    io, disk = memory_disk(tmp_path)
    result = disk.update_flags(
        {3: FlagChange(tries=7), 4: PartitionFlags(priority=0, tries=1, successful=False), 1: None},
        prioritize=4,
    )
    assert [op for op, _, _ in io.ops].count("fsync") == 2
    assert len(io.ops) == 6
    assert result == {3: PartitionFlags(1, 7, True), 4: PartitionFlags(2, 1, False)}
    reread = GptDisk(io, name="mem0")
    assert reread.flags(3) == PartitionFlags(1, 7, True)
    assert reread.flags(4) == PartitionFlags(2, 1, False)


def test_mark_good_and_disarm(tmp_path: Path) -> None:
    _, disk = memory_disk(tmp_path)
    disk.arm_for_next_boot(4)
    assert disk.mark_good(4) == {4: PartitionFlags(priority=2, tries=0, successful=True)}
    assert disk.disarm(4) == {4: PartitionFlags()}
    assert disk.flags(3) == PartitionFlags(1, 0, True)


def test_an_update_that_changes_nothing_writes_nothing(tmp_path: Path) -> None:
    io, disk = memory_disk(tmp_path)
    assert disk.mark_good(3) == {}
    assert disk.disarm(4) == {}
    assert io.ops == []


def test_the_table_is_reread_before_each_update(tmp_path: Path) -> None:
    io, disk = memory_disk(tmp_path)
    other_tool = GptDisk(io, name="mem0")
    other_tool.update_flags({4: FlagChange(tries=3)})
    disk.mark_good(3)  # `disk` still holds the table from before the other tool's edit
    assert GptDisk(io, name="mem0").flags(4).tries == 3


def test_only_the_flag_bits_of_the_entry_change(tmp_path: Path) -> None:
    io, disk = memory_disk(tmp_path)
    before = bytes(io.data)
    disk.arm_for_next_boot(4)
    changed = [i for i in range(len(before)) if before[i] != io.data[i]]
    last = len(before) // 512 - 1
    entry4 = 3 * 128  # slot 4 in the entry array
    allowed = {
        *range(1 * 512 + 16, 1 * 512 + 20),  # primary header CRC
        *range(1 * 512 + 88, 1 * 512 + 92),  # primary entries CRC
        *range(last * 512 + 16, last * 512 + 20),
        *range(last * 512 + 88, last * 512 + 92),
        *range(2 * 512 + entry4 + 48, 2 * 512 + entry4 + 56),
        *range((last - 32) * 512 + entry4 + 48, (last - 32) * 512 + entry4 + 56),
    }
    assert changed and set(changed) <= allowed


def test_a_corrupt_primary_is_read_from_the_backup_and_repaired(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = bytearray(image_bytes(tmp_path))
    data[2 * 512 + 300] ^= 0xFF  # inside the primary entry array
    io = MemoryDisk(bytes(data))
    with caplog.at_level(logging.WARNING, logger="update_engine.gpt"):
        disk = GptDisk(io, name="mem0")
    assert disk.snapshot.source == "backup"
    assert "primary copy at LBA 1 is invalid (GPT entries CRC mismatch" in caplog.text
    assert disk.flags(3) == PartitionFlags(1, 0, True)
    disk.mark_good(3)  # no flag changes, but the table is not clean: the write repairs the primary
    assert len(io.ops) == 6
    assert GptDisk(io, name="mem0").snapshot.clean


def test_a_corrupt_backup_is_rebuilt_from_the_primary(tmp_path: Path) -> None:
    data = bytearray(image_bytes(tmp_path))
    data[-512 + 40] ^= 0xFF  # backup header
    io = MemoryDisk(bytes(data))
    disk = GptDisk(io, name="mem0")
    assert disk.snapshot.source == "primary" and not disk.snapshot.clean
    disk.arm_for_next_boot(4)
    assert bytes(io.data) != bytes(data)
    assert io.data[-512:] != data[-512:]
    assert GptDisk(io, name="mem0").snapshot.clean


def test_both_copies_corrupt_is_an_error_naming_both(tmp_path: Path) -> None:
    data = bytearray(image_bytes(tmp_path))
    data[2 * 512 + 300] ^= 0xFF
    data[-512 + 40] ^= 0xFF
    with pytest.raises(GptError, match=r"no valid GPT on mem0: .*primary.*entries CRC.*backup.*header CRC"):
        GptDisk(MemoryDisk(bytes(data)), name="mem0", sector_size=512)


def test_4096_byte_sectors_are_detected_on_an_image(tmp_path: Path) -> None:
    io = MemoryDisk(image_bytes(tmp_path, sector_size=4096))
    disk = GptDisk(io, name="mem0")
    assert disk.sector_size == 4096
    assert disk.byte_range(3) == (3 * MIB, 1 * MIB)
    disk.arm_for_next_boot(4)
    last = len(io.data) // 4096 - 1
    assert [offset for _, offset, _ in io.ops] == [(last - 4) * 4096, last * 4096, 0, 2 * 4096, 4096, 0]
    assert GptDisk(io, name="mem0").flags(4) == PartitionFlags(2, 1, False)


def test_the_device_sector_size_is_used_when_the_device_has_one(tmp_path: Path) -> None:
    data = image_bytes(tmp_path, sector_size=4096)
    assert GptDisk(MemoryDisk(data, sector_size=4096), name="blk").sector_size == 4096
    with pytest.raises(GptError, match="512-byte sectors"):
        GptDisk(MemoryDisk(data, sector_size=512), name="blk")


def test_usr_partitions_and_lookups(tmp_path: Path) -> None:
    _, disk = memory_disk(tmp_path)
    usr_a, usr_b = disk.usr_partitions()
    assert (usr_a.index, usr_a.unique_guid) == (3, gpt.USR_A_GUID)
    assert (usr_b.index, usr_b.unique_guid) == (4, gpt.USR_B_GUID)
    assert disk.find_by_name("OEM") is not None and disk.find_by_name("USR-C") is None
    assert [e.index for e in disk.entries] == [1, 2, 3, 4, 6, 9]
    with pytest.raises(GptError, match="mem0 has no partition 5"):
        disk.entry(5)
    with pytest.raises(GptError, match="mem0 has no partition 200"):
        disk.flags(200)


def test_a_disk_without_usr_b_is_an_error_naming_the_disk(tmp_path: Path) -> None:
    layout = [p for p in small_layout() if p.name != "USR-B"]
    disk = GptDisk(MemoryDisk(image_bytes(tmp_path, layout=layout)), name="/dev/vdz")
    with pytest.raises(GptError, match=r"disk /dev/vdz has no partition named USR-B"):
        disk.usr_partitions()


def test_wrong_type_usr_partition_warns_and_cannot_be_armed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    layout = [
        dataclasses.replace(p, type_guid=LINUX_DATA_TYPE_GUID) if p.name == "USR-B" else p
        for p in small_layout()
    ]
    io = MemoryDisk(image_bytes(tmp_path, layout=layout))
    disk = GptDisk(io, name="mem0")
    with caplog.at_level(logging.WARNING, logger="update_engine.gpt"):
        disk.usr_partitions()
    assert "partition 4 (USR-B) has type 0fc63daf" in caplog.text
    with pytest.raises(GptError, match="bootloader would never choose it"):
        disk.arm_for_next_boot(4)
    assert io.ops == []


def test_prioritize_only_touches_partitions_of_the_chosen_type(tmp_path: Path) -> None:
    layout = [
        dataclasses.replace(p, flags=PartitionFlags(priority=5)) if p.name == "OEM" else p
        for p in small_layout()
    ]
    io = MemoryDisk(image_bytes(tmp_path, layout=layout))
    disk = GptDisk(io, name="mem0")
    disk.update_flags({}, prioritize=Prioritize(4, max_priority=9))
    assert disk.flags(4).priority == 9 and disk.flags(3).priority == 8
    assert disk.flags(6).priority == 5


class BrokenDisk(MemoryDisk):
    def pwrite(self, data: bytes, offset: int) -> None:
        raise OSError(5, "Input/output error")


class PowerCut(Exception):
    pass


class CutAfterFirstWrite(MemoryDisk):
    def pwrite(self, data: bytes, offset: int) -> None:
        if self.ops:
            raise PowerCut
        super().pwrite(data, offset)


def test_write_errors_become_gpt_errors_and_other_exceptions_pass_through(tmp_path: Path) -> None:
    data = image_bytes(tmp_path)
    with pytest.raises(GptError, match="cannot write the partition table of disk mem0: Input/output error"):
        GptDisk(BrokenDisk(data), name="mem0").arm_for_next_boot(4)
    cut = CutAfterFirstWrite(data)
    with pytest.raises(PowerCut):
        GptDisk(cut, name="mem0").arm_for_next_boot(4)
    # Only the backup entries were written: the primary still reads, with the old flags.
    after = GptDisk(cut, name="mem0")
    assert after.snapshot.source == "primary"
    assert after.flags(4) == PartitionFlags()


# ----------------------------------------------------------------------------------------------------------
# Table validation: entries and headers that read (CRCs match) but describe an impossible layout
# ----------------------------------------------------------------------------------------------------------

# small_layout() on 512-byte sectors: 16384 sectors; USR-A 6144..8191, USR-B 8192..10239; usable 34..16350;
# primary header 1, entries 2..33; backup entries 16351..16382, header 16383.
LAST_USABLE = 16350
BACKUP_HEADER = 16383
U64_MAX = 2**64 - 1


def crafted_bytes(tmp_path: Path, **craft: Any) -> bytes:
    """A small_layout() image whose table was edited by :func:`craft_table` (CRCs valid again)."""
    layout = small_layout()
    path = tmp_path / "crafted.img"
    with path.open("wb") as f:
        f.truncate((2 + sum(p.size_mib for p in layout)) * MIB)
    write_gpt_image(path, layout, sector_size=512)
    craft_table(path, **craft)
    return path.read_bytes()


ENTRY_CASES: list[tuple[str, EntriesEdit, str]] = [
    ("USR-B overlaps the end of USR-A", moved(4, first=8000),
     "partition 4 (USR-B) at LBA 8000..10239 overlaps partition 3 (USR-A) at LBA 6144..8191"),
    ("USR-B inside USR-A", moved(4, first=6200, last=6300),
     "partition 4 (USR-B) at LBA 6200..6300 overlaps partition 3 (USR-A) at LBA 6144..8191"),
    ("USR-B is USR-A", moved(4, first=6144, last=8191),
     "partition 4 (USR-B) at LBA 6144..8191 overlaps partition 3 (USR-A) at LBA 6144..8191"),
    ("USR-B contains USR-A", moved(4, first=6100, last=8300),
     "partition 3 (USR-A) at LBA 6144..8191 overlaps partition 4 (USR-B) at LBA 6100..8300"),
    ("USR-B over the primary header", moved(4, first=1),
     "partition 4 (USR-B) at LBA 1..10239 lies outside the usable area (LBA 34..16350) and runs into the primary "
     "GPT header at LBA 1 and the primary entry array at LBA 2..33"),
    ("USR-B over the primary entries", moved(4, first=33),
     "partition 4 (USR-B) at LBA 33..10239 lies outside the usable area (LBA 34..16350) and runs into the primary "
     "entry array at LBA 2..33"),
    ("USR-B over the backup entries", moved(4, last=16351),
     "partition 4 (USR-B) at LBA 8192..16351 lies outside the usable area (LBA 34..16350) and runs into the backup "
     "entry array at LBA 16351..16382"),
    ("USR-B over the backup header", moved(4, first=16383, last=16383),
     "partition 4 (USR-B) at LBA 16383 lies outside the usable area (LBA 34..16350) and runs into the backup GPT "
     "header at LBA 16383"),
    ("USR-B beyond the disk", moved(4, first=20000, last=30000),
     "partition 4 (USR-B) at LBA 20000..30000 lies outside the usable area (LBA 34..16350) and runs into the end "
     "of the disk (LBA 16383)"),
    ("USR-B ends before it starts", moved(4, first=9000, last=8999),
     "partition 4 (USR-B) ends at LBA 8999, before its first LBA 9000"),
    ("USR-B near 2^64", moved(4, first=U64_MAX - 2047, last=U64_MAX),
     f"partition 4 (USR-B) at LBA {U64_MAX - 2047}..{U64_MAX} lies outside the usable area"),
    ("USR-B from its start to 2^64", moved(4, last=U64_MAX), "runs into the backup entry array"),
    ("USR-B at LBA 0", moved(4, first=0, last=2047), "runs into the protective MBR at LBA 0"),
    ("USR-B with USR-A's unique GUID",
     lambda slots: [dataclasses.replace(e, unique_guid=gpt.USR_A_GUID) if e.index == 4 else e for e in slots],
     f"partition 4 (USR-B) has the unique GUID {gpt.USR_A_GUID} of partition 3 (USR-A)"),
]


@pytest.mark.parametrize(("name", "edit", "problem"), ENTRY_CASES, ids=[c[0] for c in ENTRY_CASES])
def test_a_table_cgpt_refuses_is_refused_whole_and_nothing_is_written(
    tmp_path: Path, name: str, edit: EntriesEdit, problem: str
) -> None:
    io = MemoryDisk(crafted_bytes(tmp_path, entries=edit))
    with pytest.raises(GptTableInvalid) as caught:
        GptDisk(io, name="/dev/vdz")
    error = caught.value
    assert problem in str(error)
    assert str(error).startswith("the partition table of /dev/vdz is invalid, refusing to use it: ")
    assert "sgdisk -v /dev/vdz" in str(error)
    assert error.code == ErrorCode.INSTALL_DEVICE_OPEN_ERROR
    assert 4 in {i for p in error.problems for i in p.indexes}
    assert io.ops == []


@pytest.mark.parametrize("action", ["arm", "mark good", "disarm"])
def test_a_table_made_invalid_after_opening_is_refused_before_any_write(tmp_path: Path, action: str) -> None:
    """Every write re-reads and validates: a GptDisk opened on a sound table cannot write a broken one."""
    sound = image_bytes(tmp_path)
    io = MemoryDisk(sound)
    disk = GptDisk(io, name="mem0")
    io.data[:] = crafted_bytes(tmp_path, entries=moved(4, first=8000))
    before = bytes(io.data)
    edit = {"arm": disk.arm_for_next_boot, "mark good": disk.mark_good, "disarm": disk.disarm}[action]
    with pytest.raises(GptTableInvalid, match=r"partition 4 \(USR-B\) at LBA 8000..10239 overlaps"):
        edit(4)
    assert io.ops == [] and bytes(io.data) == before


def _move_header(which: str, **fields: int) -> HeaderEdit:
    def edit(copy: str, header: gpt.GptHeader) -> gpt.GptHeader:
        return dataclasses.replace(header, **fields) if copy == which else header

    return edit


HEADER_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("the primary entry array is the backup's",
     {"header": _move_header("primary", partition_entry_lba=16351), "copies": ["primary"]},
     "the primary entry array at LBA 16351..16382 overlaps the backup entry array at LBA 16351..16382"),
    ("the backup entry array is the primary's",
     {"header": _move_header("backup", partition_entry_lba=2), "copies": ["backup"]},
     "the primary entry array at LBA 2..33 overlaps the backup entry array at LBA 2..33"),
    ("the usable area reaches into the backup entries",
     {"header": lambda copy, h: dataclasses.replace(h, last_usable_lba=16360)},
     "the usable area at LBA 34..16360 overlaps the backup entry array at LBA 16351..16382"),
    ("the backup header is placed inside the usable area",
     {"header": _move_header("primary", alternate_lba=34), "copies": ["primary"]},
     "the usable area at LBA 34..16350 overlaps the backup GPT header at LBA 34"),
]


@pytest.mark.parametrize(("name", "craft", "problem"), HEADER_CASES, ids=[c[0] for c in HEADER_CASES])
def test_headers_whose_structures_overlap_are_refused(
    tmp_path: Path, name: str, craft: dict[str, Any], problem: str
) -> None:
    io = MemoryDisk(crafted_bytes(tmp_path, **craft))
    with pytest.raises(GptTableInvalid) as caught:
        GptDisk(io, name="mem0")
    assert problem in str(caught.value)
    assert io.ops == []


def test_a_bad_layout_in_the_copy_not_used_is_refused_too(tmp_path: Path) -> None:
    """cgpt would quietly use the sound copy; the kernel and GRUB check no overlaps and may use the other."""
    for broken in ("primary", "backup"):
        io = MemoryDisk(crafted_bytes(tmp_path, entries=moved(4, first=8000), copies=[broken]))
        with pytest.raises(GptTableInvalid, match=rf"in the {broken} copy, partition 4 \(USR-B\) at LBA 8000"):
            GptDisk(io, name="mem0")


def test_a_sound_table_has_no_problems(tmp_path: Path) -> None:
    disk = GptDisk(MemoryDisk(image_bytes(tmp_path)), name="mem0")
    primary, backup = disk.snapshot.copies_to_write()
    assert (primary.my_lba, backup.my_lba, backup.partition_entry_lba) == (1, BACKUP_HEADER, LAST_USABLE + 1)
    assert gpt.table_problems(primary, backup, disk.snapshot.entries, disk_sectors=16384, sector_size=512) == []
    assert disk.snapshot.problems() == []


def test_two_partitions_with_the_same_label_are_not_guessed_between(tmp_path: Path) -> None:
    layout = [dataclasses.replace(p, name="USR-B") if p.name == "OEM" else p for p in small_layout()]
    disk = GptDisk(MemoryDisk(image_bytes(tmp_path, layout=layout)), name="mem0")
    with pytest.raises(GptError, match=r"mem0 has 2 partitions named USR-B \(4, 6\)"):
        disk.usr_partitions()


def test_byte_range_never_reaches_past_the_disk(tmp_path: Path) -> None:
    disk = GptDisk(MemoryDisk(image_bytes(tmp_path)), name="mem0")
    assert disk.byte_range(4) == (8192 * 512, 2048 * 512)
    snapshot = disk.snapshot
    entries = list(snapshot.entries)
    entries[3] = dataclasses.replace(entries[3], last_lba=U64_MAX)
    disk._snapshot = dataclasses.replace(snapshot, entries=tuple(entries))  # as if validation had been skipped
    with pytest.raises(GptError, match="ends at LBA 18446744073709551615, beyond the disk's 16384 sectors"):
        disk.byte_range(4)


spans = st.tuples(st.integers(0, 300), st.integers(0, 60)).map(lambda t: (t[0], t[0] + t[1]))


@settings(max_examples=300, deadline=None)
@given(st.lists(spans, min_size=0, max_size=12))
def test_every_entry_that_overlaps_another_is_named(ranges: list[tuple[int, int]]) -> None:
    """The one-sweep overlap check against the obvious pairwise one."""
    entries = [
        gpt.GptEntry(i + 1, gpt.USR_TYPE_GUID, uuid.UUID(int=i + 1), first, last, 0, f"P{i + 1}")
        for i, (first, last) in enumerate(ranges)
    ]
    problems = gpt.entry_problems(entries, first_usable=0, last_usable=10_000)
    named = {i for p in problems for i in p.indexes}
    overlapping = {
        a.index
        for a in entries
        for b in entries
        if a is not b and a.first_lba <= b.last_lba and b.first_lba <= a.last_lba
    }
    assert named == overlapping
    for problem in problems:
        first, second = (entries[i - 1] for i in problem.indexes)
        assert first.first_lba <= second.last_lba and second.first_lba <= first.last_lba


def test_unused_slots_are_not_checked() -> None:
    unused = gpt.GptEntry(1, gpt.UNUSED_TYPE_GUID, uuid.UUID(int=0), U64_MAX, 5, 0, "")
    used = gpt.GptEntry(2, gpt.USR_TYPE_GUID, uuid.UUID(int=2), 40, 50, 0, "USR-A")
    assert gpt.entry_problems([unused, unused, used], first_usable=34, last_usable=100) == []
