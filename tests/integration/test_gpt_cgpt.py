"""GptDisk against the real tools: images made by sgdisk, flags read and written by cgpt, sgdisk -v."""

from __future__ import annotations

import contextlib
import logging
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sim.disks import (
    MIB,
    USR_A_INDEX,
    USR_B_INDEX,
    cached_image,
    cgpt_flags,
    make_usr_disk,
    partition_sha256,
    usr_a_pattern,
)
from tests.conftest import require_tool
from update_engine import gpt
from update_engine.gpt import GptDisk, GptError, PartitionFlags, Prioritize

pytestmark = pytest.mark.integration


def cgpt(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("cgpt"), *args], check=True, capture_output=True, text=True)


def assert_tools_find_no_fault(path: Path | str) -> None:
    shown = cgpt("show", str(path))
    assert "invalid" not in (shown.stdout + shown.stderr).lower(), shown.stderr
    verify = subprocess.run(
        [require_tool("sgdisk"), "-v", str(path)], check=True, capture_output=True, text=True
    )
    assert "No problems found" in verify.stdout, verify.stdout


def test_we_read_exactly_what_cgpt_add_wrote(usr_disk: Path) -> None:
    for priority, tries, successful in [(2, 0, 1), (15, 5, 0), (0, 15, 1), (7, 1, 0), (0, 0, 0)]:
        cgpt(
            "add",
            "-i",
            str(USR_B_INDEX),
            "-P",
            str(priority),
            "-T",
            str(tries),
            "-S",
            str(successful),
            str(usr_disk),
        )
        with GptDisk.open(usr_disk, writable=False) as disk:
            assert disk.flags(USR_B_INDEX) == PartitionFlags(priority, tries, bool(successful))
            assert disk.flags(USR_A_INDEX) == PartitionFlags(1, 0, True)


def test_cgpt_reads_exactly_what_we_wrote(usr_disk: Path) -> None:
    with GptDisk.open(usr_disk) as disk:
        for flags in [PartitionFlags(2, 1, False), PartitionFlags(15, 15, True), PartitionFlags(0, 3, True)]:
            disk.update_flags({USR_B_INDEX: flags})
            assert cgpt_flags(usr_disk, USR_B_INDEX) == (flags.priority, flags.tries, int(flags.successful))
            assert cgpt_flags(usr_disk, USR_A_INDEX) == (1, 0, 1)
            assert_tools_find_no_fault(usr_disk)


def test_the_update_cycle_as_cgpt_sees_it(usr_disk: Path) -> None:
    usr_a_before = partition_sha256(usr_disk, USR_A_INDEX)
    with GptDisk.open(usr_disk) as disk:
        disk.arm_for_next_boot(USR_B_INDEX)
        assert (cgpt_flags(usr_disk, USR_B_INDEX), cgpt_flags(usr_disk, USR_A_INDEX)) == (
            (2, 1, 0),
            (1, 0, 1),
        )
        disk.mark_good(USR_B_INDEX)
        assert (cgpt_flags(usr_disk, USR_B_INDEX), cgpt_flags(usr_disk, USR_A_INDEX)) == (
            (2, 0, 1),
            (1, 0, 1),
        )
        disk.disarm(USR_B_INDEX)
        assert (cgpt_flags(usr_disk, USR_B_INDEX), cgpt_flags(usr_disk, USR_A_INDEX)) == (
            (0, 0, 0),
            (1, 0, 1),
        )
    assert partition_sha256(usr_disk, USR_A_INDEX) == usr_a_before
    assert_tools_find_no_fault(usr_disk)


def changed_sectors(before: bytes, after: bytes, sector_size: int) -> set[int]:
    return {
        i
        for i in range(len(before) // sector_size)
        if before[i * sector_size : (i + 1) * sector_size] != after[i * sector_size : (i + 1) * sector_size]
    }


def test_a_write_touches_only_the_two_headers_and_two_entry_arrays(usr_disk: Path, tmp_path: Path) -> None:
    before = usr_disk.read_bytes()
    with GptDisk.open(usr_disk) as disk:
        disk.arm_for_next_boot(USR_B_INDEX)
    after = usr_disk.read_bytes()
    assert len(after) == len(before)
    last = len(before) // 512 - 1
    regions = {
        "primary header": range(1, 2),
        "primary entries": range(2, 34),
        "backup entries": range(last - 32, last),
        "backup header": range(last, last + 1),
    }
    changed = changed_sectors(before, after, 512)
    for name, sectors in regions.items():
        assert changed & set(sectors), f"{name} was not rewritten"
    assert changed <= set().union(*regions.values())
    assert after[3 * MIB : 11 * MIB] == usr_a_pattern(8 * MIB)


# ----------------------------------------------------------------------------------------------------------
# prioritize against Debian's cgpt, which only renumbers ChromeOS kernel partitions
# ----------------------------------------------------------------------------------------------------------


KERNEL_PARTITIONS = 5


def _build_kernel_disk(path: Path) -> None:
    with path.open("wb") as f:
        f.truncate(2 * MIB)
    args = [require_tool("sgdisk"), "--clear"]
    for index in range(1, KERNEL_PARTITIONS + 1):
        start = 2048 + (index - 1) * 128
        args += [
            f"--new={index}:{start}:{start + 127}",
            f"--typecode={index}:{gpt.CHROMEOS_KERNEL_TYPE_GUID}",
        ]
    subprocess.run([*args, str(path)], check=True, capture_output=True)


def make_kernel_disk(path: Path, priorities: list[int]) -> Path:
    """Partitions 1..5 of the ChromeOS kernel type with the given priorities and distinct tries/successful."""
    shutil.copyfile(cached_image("kernel-5.img", _build_kernel_disk), path)
    for index, priority in enumerate(priorities, start=1):
        cgpt(
            "add",
            "-i",
            str(index),
            "-P",
            str(priority),
            "-T",
            str(index % 16),
            "-S",
            str(index % 2),
            str(path),
        )
    return path


PRIORITY_SETS = [[0, 1, 3, 3, 9], [1, 0, 0, 0, 0], [15, 15, 14, 1, 0], [2, 2, 2, 2, 2], [0, 0, 0, 5, 0]]
OPTION_SETS: list[tuple[bool, int | None]] = [(False, None), (True, None), (False, 3), (True, 15), (False, 1)]


@pytest.mark.parametrize("priorities", PRIORITY_SETS, ids=lambda p: "-".join(map(str, p)))
def test_prioritize_equals_cgpt_prioritize(priorities: list[int], tmp_path: Path) -> None:
    start = make_kernel_disk(tmp_path / "start.img", priorities)
    for target in range(1, len(priorities) + 1):
        for force, max_priority in OPTION_SETS:
            theirs, ours = tmp_path / "cgpt.img", tmp_path / "ours.img"
            shutil.copyfile(start, theirs)
            shutil.copyfile(start, ours)
            options = ["-i", str(target)] + (["-f"] if force else [])
            options += ["-P", str(max_priority)] if max_priority is not None else []
            cgpt("prioritize", *options, str(theirs))
            step = Prioritize(
                target, force=force, max_priority=max_priority, type_guid=gpt.CHROMEOS_KERNEL_TYPE_GUID
            )
            with GptDisk.open(ours) as disk:
                disk.update_flags({}, prioritize=step)
            # Byte-identical images: same priorities, same untouched tries/successful, same CRCs.
            assert ours.read_bytes() == theirs.read_bytes(), f"prioritize {options} from {priorities}"


@pytest.mark.parametrize("priorities", PRIORITY_SETS, ids=lambda p: "-".join(map(str, p)))
def test_prioritize_without_a_target_equals_cgpt(priorities: list[int], tmp_path: Path) -> None:
    path = make_kernel_disk(tmp_path / "k.img", priorities)
    cgpt("prioritize", str(path))
    expected = gpt.prioritize(dict(enumerate(priorities, start=1)), None)
    assert [cgpt_flags(path, i)[0] for i in range(1, len(priorities) + 1)] == [
        expected[i] for i in sorted(expected)
    ]


# ----------------------------------------------------------------------------------------------------------
# Damaged tables
# ----------------------------------------------------------------------------------------------------------


def flip(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize(("where", "offset"), [("entries", 2 * 512 + 3 * 128 + 60), ("header", 512 + 48)])
def test_a_corrupt_primary_is_read_from_the_backup_and_our_write_repairs_it(
    usr_disk: Path, where: str, offset: int, caplog: pytest.LogCaptureFixture
) -> None:
    cgpt("add", "-i", str(USR_B_INDEX), "-P", "3", "-T", "2", str(usr_disk))
    flip(usr_disk, offset)
    assert "invalid" in cgpt("show", str(usr_disk)).stderr  # cgpt sees the damage too
    with caplog.at_level(logging.WARNING, logger="update_engine.gpt"), GptDisk.open(usr_disk) as disk:
        assert disk.snapshot.source == "backup"
        assert disk.flags(USR_B_INDEX) == PartitionFlags(3, 2, False)
        disk.arm_for_next_boot(USR_B_INDEX)
    assert "primary copy at LBA 1 is invalid" in caplog.text
    assert_tools_find_no_fault(usr_disk)
    assert cgpt_flags(usr_disk, USR_B_INDEX) == (2, 1, 0)
    with GptDisk.open(usr_disk, writable=False) as disk:
        assert disk.snapshot.source == "primary" and disk.snapshot.clean


def test_a_corrupt_backup_is_repaired_by_our_write(usr_disk: Path) -> None:
    size = usr_disk.stat().st_size
    flip(usr_disk, size - 512 - 16 * 128)  # inside the backup entry array
    with GptDisk.open(usr_disk) as disk:
        assert disk.snapshot.source == "primary" and not disk.snapshot.clean
        disk.mark_good(USR_A_INDEX)
    assert_tools_find_no_fault(usr_disk)


def test_both_copies_corrupt_is_an_error(usr_disk: Path) -> None:
    size = usr_disk.stat().st_size
    flip(usr_disk, 2 * 512 + 3 * 128 + 60)
    flip(usr_disk, size - 512 + 24)
    before = usr_disk.read_bytes()
    with pytest.raises(GptError, match=f"no valid GPT on {usr_disk}: 512-byte sectors: primary.*backup"):
        GptDisk.open(usr_disk, sector_size=512)
    with pytest.raises(GptError, match=f"no valid GPT on {usr_disk}"):
        GptDisk.open(usr_disk)
    assert usr_disk.read_bytes() == before


def test_a_disk_without_usr_partitions_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "plain.img"
    with path.open("wb") as f:
        f.truncate(8 * MIB)
    subprocess.run(
        [require_tool("sgdisk"), "--clear", "--new=1:2048:+2M", "--change-name=1:DATA", str(path)],
        check=True,
        capture_output=True,
    )
    with (
        GptDisk.open(path) as disk,
        pytest.raises(GptError, match=f"disk {path} has no partition named USR-A"),
    ):
        disk.usr_partitions()


# ----------------------------------------------------------------------------------------------------------
# 4096-byte sectors
# ----------------------------------------------------------------------------------------------------------


def test_4096_byte_sector_image_round_trip(tmp_path: Path) -> None:
    path = make_usr_disk(tmp_path / "4k.img", sector_size=4096)
    before = path.read_bytes()
    with GptDisk.open(path) as disk:
        assert disk.sector_size == 4096
        assert disk.header.partition_entry_lba == 2 and disk.header.first_usable_lba == 6
        assert disk.byte_range(USR_A_INDEX) == (3 * MIB, 8 * MIB)
        disk.arm_for_next_boot(USR_B_INDEX)
    after = path.read_bytes()
    last = len(before) // 4096 - 1
    allowed = {1, 2, 3, 4, 5, last - 4, last - 3, last - 2, last - 1, last}
    changed = changed_sectors(before, after, 4096)
    assert changed and changed <= allowed
    with GptDisk.open(path, writable=False) as disk:
        assert disk.flags(USR_B_INDEX) == PartitionFlags(2, 1, False)
        assert disk.snapshot.clean


@contextlib.contextmanager
def loop_device(image: Path, sector_size: int) -> Iterator[str]:
    losetup = require_tool("losetup")
    attach = subprocess.run(
        [losetup, "--find", "--show", f"--sector-size={sector_size}", str(image)],
        capture_output=True,
        text=True,
    )
    if attach.returncode != 0:
        pytest.skip(f"no loop devices here ({attach.stderr.strip()}); 4096-byte interop needs one")
    device = attach.stdout.strip()
    try:
        yield device
    finally:
        subprocess.run([losetup, "--detach", device], check=True)


def test_4096_byte_sectors_with_cgpt_and_sgdisk_on_a_loop_device(tmp_path: Path) -> None:
    """cgpt and sgdisk only use 4096-byte sectors on a device that has them; a loop device does."""
    ours = make_usr_disk(tmp_path / "ours.img", sector_size=4096)
    with loop_device(ours, 4096) as device:
        assert_tools_find_no_fault(device)
        assert cgpt_flags(Path(device), USR_A_INDEX) == (1, 0, 1)
        with GptDisk.open(device) as disk:  # sector size from BLKSSZGET
            assert disk.sector_size == 4096
            disk.arm_for_next_boot(USR_B_INDEX)
        assert cgpt_flags(Path(device), USR_B_INDEX) == (2, 1, 0)
        assert_tools_find_no_fault(device)

    theirs = tmp_path / "theirs.img"
    with theirs.open("wb") as f:
        f.truncate(16 * MIB)
    with loop_device(theirs, 4096) as device:
        subprocess.run(
            [
                require_tool("sgdisk"),
                "--clear",
                "--new=3:256:+4M",
                "--change-name=3:USR-A",
                f"--typecode=3:{gpt.USR_TYPE_GUID}",
                "--new=4:0:+4M",
                "--change-name=4:USR-B",
                f"--typecode=4:{gpt.USR_TYPE_GUID}",
                device,
            ],
            check=True,
            capture_output=True,
        )
        cgpt("add", "-i", "4", "-P", "5", "-T", "3", "-S", "0", device)
    with GptDisk.open(theirs) as disk:  # an image file: 4096 found by looking
        assert disk.sector_size == 4096
        assert disk.byte_range(3) == (1 * MIB, 4 * MIB)
        assert disk.flags(4) == PartitionFlags(5, 3, False)
        disk.mark_good(4)
    with loop_device(theirs, 4096) as device:
        assert cgpt_flags(Path(device), 4) == (1, 0, 1)
        assert_tools_find_no_fault(device)
