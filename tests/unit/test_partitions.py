"""Finding the running USR partition from the kernel command line and mountinfo, and choosing the target."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.disks import MIB, usr_layout, write_gpt_image
from update_engine.errors import ErrorCode
from update_engine.gpt import GptDisk
from update_engine.partitions import (
    PartitionError,
    UsrMount,
    UsrSlot,
    UsrSpec,
    UsrSpecKind,
    ensure_not_running,
    find_boot_disk,
    parse_cmdline_usr,
    parse_mountinfo_usr,
    parse_mountinfo_usr_mount,
    partition_number,
    resolve_slots,
    usr_lookup_spec,
)

USR_A_UUID = "7130c94a-213a-4e5a-8e26-6cce9662f132"
USR_B_UUID = "e03dd35c-7c2d-4a47-b3fe-27f15780a57c"

FLATCAR_CMDLINE = (
    "BOOT_IMAGE=/flatcar/vmlinuz-a mount.usr=/dev/mapper/usr "
    "verity.usr=PARTUUID=7130C94A-213A-4E5A-8E26-6CCE9662F132 rootflags=rw mount.usrflags=ro consoleblank=0 "
    "root=LABEL=ROOT console=ttyS0,115200n8 flatcar.first_boot=detected "
    "verity.usrhash=" + "ab" * 32
)


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cmdline", "expected"),
    [
        (
            f"mount.usr=PARTUUID={USR_B_UUID.upper()} root=LABEL=ROOT",
            (UsrSpecKind.PARTUUID, USR_B_UUID, "mount.usr"),
        ),
        ("quiet mount.usr=PARTLABEL=USR-B", (UsrSpecKind.PARTLABEL, "USR-B", "mount.usr")),
        ("usr=/dev/sda4 ro", (UsrSpecKind.DEVICE, "/dev/sda4", "usr")),
        (FLATCAR_CMDLINE, (UsrSpecKind.PARTUUID, USR_A_UUID, "verity.usr")),
        ('"mount.usr=PARTLABEL=USR-A" quiet', (UsrSpecKind.PARTLABEL, "USR-A", "mount.usr")),
        ('mount.usr="PARTLABEL=USR-A" quiet', (UsrSpecKind.PARTLABEL, "USR-A", "mount.usr")),
        ("usr=/dev/sda3 mount.usr=PARTLABEL=USR-B", (UsrSpecKind.PARTLABEL, "USR-B", "mount.usr")),
        ("verity.usr=PARTLABEL=USR-A usr=/dev/sda4", (UsrSpecKind.PARTLABEL, "USR-A", "verity.usr")),
        ("mount.usr=/dev/sda3 mount.usr=/dev/sda4", (UsrSpecKind.DEVICE, "/dev/sda4", "mount.usr")),
        (f"mount.usr=/dev/disk/by-partuuid/{USR_A_UUID}", (UsrSpecKind.PARTUUID, USR_A_UUID, "mount.usr")),
        ("mount.usr=/dev/disk/by-partlabel/USR-B", (UsrSpecKind.PARTLABEL, "USR-B", "mount.usr")),
        ("mount.usr=LABEL=usrfs", (UsrSpecKind.DEVICE, "/dev/disk/by-label/usrfs", "mount.usr")),
        ("mount.usr=/dev/mapper/usr", (UsrSpecKind.DEVICE, "/dev/mapper/usr", "mount.usr")),
    ],
)
def test_cmdline_usr_variants(cmdline: str, expected: tuple[UsrSpecKind, str, str]) -> None:
    assert parse_cmdline_usr(cmdline) == UsrSpec(*expected)


@pytest.mark.parametrize(
    "cmdline",
    ["", "root=PARTUUID=7130c94a-213a-4e5a-8e26-6cce9662f132 quiet", "mount.usr= usr", "mount.usrflags=ro"],
)
def test_cmdline_without_a_usr_device(cmdline: str) -> None:
    assert parse_cmdline_usr(cmdline) is None


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_any_cmdline_parses_without_crashing(cmdline: str) -> None:
    spec = parse_cmdline_usr(cmdline)
    assert spec is None or spec.source in ("mount.usr", "verity.usr", "usr")


# ----------------------------------------------------------------------------------------------------------
# mountinfo
# ----------------------------------------------------------------------------------------------------------

MOUNTINFO_VERITY_BTRFS = """\
22 1 0:21 / / rw,relatime shared:1 - tmpfs tmpfs rw,mode=755
23 22 0:30 / /usr ro,relatime shared:2 - btrfs /dev/mapper/usr ro,compress=zstd:3,space_cache=v2,subvolid=5
24 22 0:5 / /dev rw,nosuid shared:3 - devtmpfs devtmpfs rw,size=4096k
"""

MOUNTINFO_EXT4 = """\
36 1 8:9 / / rw,relatime shared:1 - ext4 /dev/sda9 rw,seclabel
37 36 8:4 / /usr ro,relatime shared:2 - ext4 /dev/sda4 ro,seclabel
"""


def test_mountinfo_device_number_of_usr() -> None:
    assert parse_mountinfo_usr(MOUNTINFO_EXT4) == (8, 4)
    assert parse_mountinfo_usr(MOUNTINFO_VERITY_BTRFS) == (0, 30)
    assert parse_mountinfo_usr_mount(MOUNTINFO_VERITY_BTRFS) == UsrMount(0, 30, "btrfs", "/dev/mapper/usr")


def test_mountinfo_without_usr_or_with_lookalikes() -> None:
    text = (
        "36 1 8:9 / / rw - ext4 /dev/sda9 rw\n"
        "40 36 8:20 / /usr/local rw - ext4 /dev/sdb4 rw\n"
        "41 36 8:21 / /usr\\040old rw - ext4 /dev/sdb5 rw\n"
        "garbage line\n"
    )
    assert parse_mountinfo_usr(text) is None
    assert parse_mountinfo_usr("") is None
    # Optional fields (shared:, master:) vary in number; the separator is found, not counted.
    assert parse_mountinfo_usr("1 0 8:3 / /usr ro shared:2 master:7 - ext4 /dev/sda3 ro\n") == (8, 3)


def test_mountinfo_topmost_usr_mount_wins() -> None:
    text = MOUNTINFO_EXT4 + "50 37 8:3 / /usr ro shared:9 - ext4 /dev/sda3 ro\n"
    assert parse_mountinfo_usr(text) == (8, 3)


def test_lookup_spec_prefers_the_cmdline_then_the_mount() -> None:
    assert usr_lookup_spec(FLATCAR_CMDLINE, MOUNTINFO_EXT4) == UsrSpec(
        UsrSpecKind.PARTUUID, USR_A_UUID, "verity.usr"
    )
    assert usr_lookup_spec("quiet", MOUNTINFO_EXT4) == UsrSpec(UsrSpecKind.DEVNUM, "8:4", "mountinfo")
    # btrfs reports an anonymous device number; its source path is looked up instead.
    assert usr_lookup_spec(None, MOUNTINFO_VERITY_BTRFS) == UsrSpec(
        UsrSpecKind.DEVICE, "/dev/mapper/usr", "mountinfo"
    )
    assert usr_lookup_spec(None, None) is None


@pytest.mark.parametrize(
    ("device", "number"),
    [
        ("/dev/sda3", 3),
        ("/dev/vda4", 4),
        ("/dev/nvme0n1p4", 4),
        ("/dev/mmcblk0p3", 3),
        ("/dev/loop7p4", 4),
        ("/dev/xvda12", 12),
        ("/dev/sda", None),
        ("/dev/nvme0n1", None),
        ("/dev/loop7", None),
        ("/dev/mmcblk0", None),
        ("/dev/dm-0", None),
        ("/dev/mapper/usr", None),
    ],
)
def test_partition_number_of_a_device_path(device: str, number: int | None) -> None:
    assert partition_number(device) == number


def test_find_boot_disk_without_any_hint_asks_for_the_disk(tmp_path: Path) -> None:
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/cmdline").write_text("quiet root=LABEL=ROOT\n")
    (tmp_path / "proc/self/mountinfo").write_text("36 1 8:9 / / rw - ext4 /dev/sda9 rw\n")
    with pytest.raises(PartitionError, match="names the /usr device"):
        find_boot_disk(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# Slots
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def disk(tmp_path: Path) -> GptDisk:
    layout = usr_layout(usr_mib=1)
    path = tmp_path / "disk.img"
    with path.open("wb") as f:
        f.truncate((2 + sum(p.size_mib for p in layout)) * MIB)
    write_gpt_image(path, layout, sector_size=512)
    return GptDisk.open(path, writable=False)


def test_booted_flag_wins_case_insensitively(disk: GptDisk) -> None:
    running, target = resolve_slots(disk, booted="usr-b", cmdline=FLATCAR_CMDLINE, mountinfo=None)
    assert (running.label, target.label) == ("USR-B", "USR-A")
    assert target == UsrSlot(
        label="USR-A",
        index=3,
        unique_guid=USR_A_UUID,
        offset=3 * MIB,
        size=1 * MIB,
        kernel_name="vmlinuz-a",
    )
    assert running.kernel_name == "vmlinuz-b"
    assert (running.offset, running.size) == disk.byte_range(4)
    with pytest.raises(PartitionError, match="--booted must be USR-A or USR-B, not 'USR-C'"):
        resolve_slots(disk, booted="USR-C", cmdline=None, mountinfo=None)


@pytest.mark.parametrize(
    ("cmdline", "running"),
    [
        (FLATCAR_CMDLINE, "USR-A"),
        (f"mount.usr=PARTUUID={USR_B_UUID}", "USR-B"),
        ("mount.usr=PARTLABEL=USR-B", "USR-B"),
        ("mount.usr=PARTLABEL=usr-a", "USR-A"),
        ("usr=/dev/sda4", "USR-B"),
        ("mount.usr=/dev/nvme0n1p3", "USR-A"),
    ],
)
def test_running_slot_from_the_cmdline(disk: GptDisk, cmdline: str, running: str) -> None:
    found, target = resolve_slots(disk, booted=None, cmdline=cmdline, mountinfo=None)
    assert found.label == running
    assert target.label != running
    assert {found.index, target.index} == {3, 4}


def test_running_slot_from_the_usr_mount_source(disk: GptDisk) -> None:
    running, target = resolve_slots(disk, booted=None, cmdline="quiet", mountinfo=MOUNTINFO_EXT4)
    assert (running.label, target.label) == ("USR-B", "USR-A")


@pytest.mark.parametrize(
    ("cmdline", "mountinfo"),
    [
        (None, None),
        ("quiet root=LABEL=ROOT", MOUNTINFO_VERITY_BTRFS),
        ("mount.usr=PARTUUID=00000000-0000-0000-0000-0000000000aa", None),
        ("mount.usr=PARTLABEL=ROOT", None),
    ],
)
def test_undecidable_running_slot_tells_the_operator_to_pass_booted(
    disk: GptDisk, cmdline: str | None, mountinfo: str | None
) -> None:
    with pytest.raises(PartitionError, match="pass --booted USR-A or --booted USR-B") as info:
        resolve_slots(disk, booted=None, cmdline=cmdline, mountinfo=mountinfo)
    assert str(disk.name) in info.value.message
    assert info.value.code == ErrorCode.INSTALL_DEVICE_OPEN_ERROR


def test_ensure_not_running(disk: GptDisk) -> None:
    running, target = resolve_slots(disk, booted="USR-A", cmdline=None, mountinfo=None)
    ensure_not_running(target, running)
    with pytest.raises(PartitionError, match=r"refusing to write USR-A \(partition 3\)"):
        ensure_not_running(running, running)


def test_a_target_sharing_a_byte_with_the_running_partition_is_refused(disk: GptDisk) -> None:
    running, target = resolve_slots(disk, booted="USR-A", cmdline=None, mountinfo=None)
    last_byte = running.offset + running.size - 1
    for offset, size in [(last_byte, 4096), (running.offset - 512, 1024), (running.offset - 512, 3 * MIB)]:
        overlapping = dataclasses.replace(target, offset=offset, size=size)
        with pytest.raises(PartitionError, match=r"USR-B \(partition 4, bytes .*\): it overlaps the running /usr"):
            ensure_not_running(overlapping, running)
    ensure_not_running(dataclasses.replace(target, offset=last_byte + 1), running)  # adjacent is fine
    with pytest.raises(PartitionError, match="it is empty"):
        ensure_not_running(dataclasses.replace(target, size=0), running)
