"""Which USR partition is running and which one an update goes to.

The running /usr is named on the kernel command line by GRUB (``mount.usr=PARTUUID=…``, or with dm-verity
``mount.usr=/dev/mapper/usr verity.usr=PARTUUID=…``) and is visible as the /usr mount.  The target is always
the other of USR-A/USR-B.  Writing to the running partition would destroy the system we are running on, so the
pipeline asks :func:`ensure_not_running` before it opens the target for writing.
"""

from __future__ import annotations

import enum
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from update_engine.errors import ErrorCode, UpdateEngineError
from update_engine.gpt import USR_A_LABEL, USR_B_LABEL, GptDisk, GptEntry

if TYPE_CHECKING:
    import pyudev

log = logging.getLogger(__name__)

# Kernel command-line parameters naming the /usr device, in the order they are consulted.
USR_PARAMETERS = ("mount.usr", "verity.usr", "usr")

KERNEL_NAMES = {USR_A_LABEL: "vmlinuz-a", USR_B_LABEL: "vmlinuz-b"}


class PartitionError(UpdateEngineError):
    """The running or target USR partition cannot be determined, or the target is the running one."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.INSTALL_DEVICE_OPEN_ERROR, message)


class UsrSpecKind(enum.Enum):
    PARTUUID = "PARTUUID"
    PARTLABEL = "PARTLABEL"
    DEVICE = "DEVICE"  # a device node path, e.g. /dev/sda3 or /dev/mapper/usr
    DEVNUM = "DEVNUM"  # "major:minor", from /proc/self/mountinfo


@dataclass(frozen=True)
class UsrSpec:
    """How the /usr device was named: ``kind``, ``value`` (PARTUUIDs lower-cased) and where (``source``)."""

    kind: UsrSpecKind
    value: str
    source: str


@dataclass(frozen=True)
class UsrMount:
    """The /usr line of mountinfo: the device number and the mount source as the kernel reports them."""

    major: int
    minor: int
    fstype: str
    source: str


@dataclass(frozen=True)
class UsrSlot:
    """One of the two USR partitions of the boot disk."""

    label: str  # "USR-A" or "USR-B"
    index: int  # GPT partition number
    unique_guid: str  # lower-case, as PARTUUID= spells it
    offset: int  # bytes from the start of the disk
    size: int  # bytes
    kernel_name: str  # file name of the matching kernel on the ESP

    @classmethod
    def from_entry(cls, disk: GptDisk, entry: GptEntry) -> UsrSlot:
        offset, size = disk.byte_range(entry.index)
        label = entry.name
        return cls(
            label=label,
            index=entry.index,
            unique_guid=str(entry.unique_guid),
            offset=offset,
            size=size,
            kernel_name=KERNEL_NAMES[label],
        )


# ----------------------------------------------------------------------------------------------------------
# Pure parsing
# ----------------------------------------------------------------------------------------------------------


def split_cmdline(cmdline: str) -> list[tuple[str, str | None]]:
    """(key, value) pairs of a kernel command line; double quotes group spaces and are dropped."""
    words: list[str] = []
    current: list[str] = []
    quoted = False
    in_word = False
    for char in cmdline:
        if char == '"':
            quoted = not quoted
            in_word = True
        elif char.isspace() and not quoted:
            if in_word:
                words.append("".join(current))
                current, in_word = [], False
        else:
            current.append(char)
            in_word = True
    if in_word:
        words.append("".join(current))
    pairs: list[tuple[str, str | None]] = []
    for word in words:
        key, sep, value = word.partition("=")
        pairs.append((key, value if sep else None))
    return pairs


def spec_from_value(value: str, source: str) -> UsrSpec:
    """Interpret a /usr device reference: ``PARTUUID=``, ``PARTLABEL=``, a by-partuuid/by-partlabel link, a
    path.

    ``UUID=``/``LABEL=`` name filesystems, not partitions; they become their /dev/disk/by-* paths, as
    systemd's fstab generator treats them.
    """
    head, sep, rest = value.partition("=")
    if sep:
        upper = head.upper()
        if upper == "PARTUUID":
            return UsrSpec(UsrSpecKind.PARTUUID, rest.lower(), source)
        if upper == "PARTLABEL":
            return UsrSpec(UsrSpecKind.PARTLABEL, rest, source)
        if upper == "UUID":
            return UsrSpec(UsrSpecKind.DEVICE, f"/dev/disk/by-uuid/{rest.lower()}", source)
        if upper == "LABEL":
            return UsrSpec(UsrSpecKind.DEVICE, f"/dev/disk/by-label/{rest}", source)
    for prefix, kind in (("/dev/disk/by-partuuid/", UsrSpecKind.PARTUUID), ("/dev/disk/by-partlabel/", None)):
        if value.startswith(prefix):
            name = value[len(prefix) :]
            if kind is UsrSpecKind.PARTUUID:
                return UsrSpec(kind, name.lower(), source)
            return UsrSpec(UsrSpecKind.PARTLABEL, name, source)
    return UsrSpec(UsrSpecKind.DEVICE, value, source)


def is_device_mapper(path: str) -> bool:
    return path.startswith("/dev/mapper/") or re.fullmatch(r"/dev/dm-\d+", path) is not None


def parse_cmdline_usr(cmdline: str) -> UsrSpec | None:
    """The /usr device named by ``mount.usr=``, else ``verity.usr=``, else ``usr=``; None if none is present.

    With dm-verity GRUB writes ``mount.usr=/dev/mapper/usr verity.usr=PARTUUID=…``: a device-mapper
    ``mount.usr`` says nothing about the partition, so ``verity.usr`` is used instead when it is present.
    The last occurrence of a parameter counts.
    """
    found: dict[str, str] = {}
    for key, value in split_cmdline(cmdline):
        if key in USR_PARAMETERS and value:
            found[key] = value
    if is_device_mapper(found.get("mount.usr", "")) and "verity.usr" in found:
        del found["mount.usr"]
    for key in USR_PARAMETERS:
        if key in found:
            return spec_from_value(found[key], key)
    return None


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape_mountinfo(field: str) -> str:
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo_usr_mount(text: str, mount_point: str = "/usr") -> UsrMount | None:
    """The topmost (last listed) mount at ``mount_point`` in /proc/self/mountinfo text, or None."""
    found: UsrMount | None = None
    for line in text.splitlines():
        fields = line.split(" ")
        if len(fields) < 10 or "-" not in fields[6:]:
            continue
        if _unescape_mountinfo(fields[4]) != mount_point:
            continue
        separator = fields.index("-", 6)
        if len(fields) < separator + 3:
            continue
        major, _, minor = fields[2].partition(":")
        if not (major.isdigit() and minor.isdigit()):
            continue
        found = UsrMount(
            int(major), int(minor), fields[separator + 1], _unescape_mountinfo(fields[separator + 2])
        )
    return found


def parse_mountinfo_usr(text: str) -> tuple[int, int] | None:
    """(major, minor) of the filesystem mounted at /usr, or None when /usr is not a mount point."""
    mount = parse_mountinfo_usr_mount(text)
    return None if mount is None else (mount.major, mount.minor)


def usr_lookup_spec(cmdline: str | None, mountinfo: str | None) -> UsrSpec | None:
    """What to look up to find the running /usr partition: the command line first, then the /usr mount.

    A mount whose device number is anonymous (major 0, e.g. btrfs) is looked up by its source path instead.
    """
    if cmdline:
        spec = parse_cmdline_usr(cmdline)
        if spec is not None:
            return spec
    if mountinfo:
        mount = parse_mountinfo_usr_mount(mountinfo)
        if mount is not None:
            if mount.major != 0:
                return UsrSpec(UsrSpecKind.DEVNUM, f"{mount.major}:{mount.minor}", "mountinfo")
            if mount.source.startswith("/dev/"):
                return spec_from_value(mount.source, "mountinfo")
    return None


def partition_number(device: str) -> int | None:
    """Partition number of a partition device path (``/dev/sda3`` → 3, ``/dev/nvme0n1p4`` → 4), else None."""
    if is_device_mapper(device):
        return None
    name = os.path.basename(device)
    # Disks whose names end in a digit (nvme0n1, mmcblk0, loop0) put a "p" before the partition number.
    match = re.fullmatch(r".*\dp(\d+)", name) or re.fullmatch(
        r"(?!loop|nbd|md|mmcblk|ram|zram|sr)[a-z]+(\d+)", name
    )
    return int(match.group(1)) if match else None


# ----------------------------------------------------------------------------------------------------------
# Slots
# ----------------------------------------------------------------------------------------------------------


def _match_spec(spec: UsrSpec, slots: tuple[UsrSlot, UsrSlot]) -> UsrSlot | None:
    for slot in slots:
        if spec.kind is UsrSpecKind.PARTUUID and spec.value == slot.unique_guid:
            return slot
        if spec.kind is UsrSpecKind.PARTLABEL and spec.value.upper() == slot.label:
            return slot
        if spec.kind is UsrSpecKind.DEVICE and partition_number(spec.value) == slot.index:
            return slot
    return None


def resolve_slots(
    disk: GptDisk, *, booted: str | None, cmdline: str | None, mountinfo: str | None
) -> tuple[UsrSlot, UsrSlot]:
    """(running, target): ``booted`` ("USR-A"/"USR-B") if given, else the command line, else the mount."""
    usr_a, usr_b = disk.usr_partitions()
    slots = (UsrSlot.from_entry(disk, usr_a), UsrSlot.from_entry(disk, usr_b))

    running: UsrSlot | None = None
    reason = ""
    if booted is not None:
        wanted = booted.strip().upper()
        running = next((s for s in slots if s.label == wanted), None)
        if running is None:
            raise PartitionError(f"--booted must be USR-A or USR-B, not {booted!r}")
        reason = f"--booted {booted}"
    else:
        candidates: list[UsrSpec] = []
        if cmdline:
            spec = parse_cmdline_usr(cmdline)
            if spec is not None:
                candidates.append(spec)
        if mountinfo:
            mount = parse_mountinfo_usr_mount(mountinfo)
            if mount is not None:
                candidates.append(spec_from_value(mount.source, "mountinfo /usr source"))
        for spec in candidates:
            running = _match_spec(spec, slots)
            if running is not None:
                reason = f"{spec.source} {spec.kind.value} {spec.value}"
                break
        if running is None:
            tried = ", ".join(f"{s.source}: {s.kind.value} {s.value}" for s in candidates) or "nothing usable"
            raise PartitionError(
                f"cannot tell whether USR-A or USR-B of {disk.name} is running (looked at {tried}); "
                "pass --booted USR-A or --booted USR-B"
            )
    target = slots[1] if running is slots[0] else slots[0]
    log.info(
        "running /usr is %s (partition %d, from %s); update target is %s (partition %d)",
        running.label,
        running.index,
        reason,
        target.label,
        target.index,
    )
    return running, target


def ensure_not_running(target: UsrSlot, running: UsrSlot) -> None:
    """Refuse to go on if ``target`` is the partition the system runs from or shares any byte with it.

    The byte ranges come from a validated table (:class:`~update_engine.gpt.GptDisk` refuses overlapping
    entries), so the range check can only fire if that validation is bypassed; it is kept because it is the
    last word before the target is opened for writing.
    """
    if (
        target.index == running.index
        or target.unique_guid == running.unique_guid
        or target.label == running.label
    ):
        raise PartitionError(
            f"refusing to write {target.label} (partition {target.index}): it is the running /usr partition"
        )
    if target.size <= 0 or (
        target.offset < running.offset + running.size and running.offset < target.offset + target.size
    ):
        raise PartitionError(
            f"refusing to write {target.label} (partition {target.index}, bytes {target.offset}.."
            f"{target.offset + target.size - 1}): it overlaps the running /usr partition {running.label} "
            f"(bytes {running.offset}..{running.offset + running.size - 1})"
            if target.size > 0
            else f"refusing to write {target.label} (partition {target.index}): it is empty"
        )


# ----------------------------------------------------------------------------------------------------------
# Finding the boot disk on a real node
# ----------------------------------------------------------------------------------------------------------


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _udev_partition(context: pyudev.Context, spec: UsrSpec) -> pyudev.Device:
    import pyudev

    if spec.kind is UsrSpecKind.DEVNUM:
        major, minor = (int(x) for x in spec.value.split(":"))
        device = pyudev.Devices.from_device_number(context, "block", os.makedev(major, minor))
    elif spec.kind is UsrSpecKind.DEVICE:
        device = pyudev.Devices.from_device_file(context, spec.value)
    else:
        prop, wanted = (
            ("ID_PART_ENTRY_UUID", spec.value)
            if spec.kind is UsrSpecKind.PARTUUID
            else ("ID_PART_ENTRY_NAME", spec.value)
        )
        matches = [
            d
            for d in context.list_devices(subsystem="block", DEVTYPE="partition")
            if (d.properties.get(prop) or "").lower() == wanted.lower()
        ]
        if len(matches) != 1:
            names = ", ".join(d.device_node for d in matches) or "none"
            raise PartitionError(
                f"{spec.source}={spec.kind.value}={spec.value} matches {names}; expected one"
            )
        device = matches[0]
    # dm-verity (/dev/mapper/usr) sits on the partition: follow it down to the one it is built on.
    slaves = Path(device.sys_path, "slaves")
    if slaves.is_dir():
        below = sorted(os.listdir(slaves))
        if not below:
            raise PartitionError(
                f"device-mapper device {device.device_node} for /usr has no underlying device"
            )
        device = pyudev.Devices.from_name(context, "block", below[0])
    return device


def find_boot_disk(config_root: Path = Path("/")) -> Path:
    """The whole-disk device holding the running /usr partition (``/dev/sda`` for ``/dev/sda3``)."""
    import pyudev

    cmdline = _read_text(config_root / "proc/cmdline")
    mountinfo = _read_text(config_root / "proc/self/mountinfo")
    spec = usr_lookup_spec(cmdline, mountinfo)
    if spec is None:
        raise PartitionError(
            f"neither {config_root / 'proc/cmdline'} nor {config_root / 'proc/self/mountinfo'} "
            "names the /usr device; pass the disk explicitly"
        )
    try:
        partition = _udev_partition(pyudev.Context(), spec)
    except (pyudev.DeviceNotFoundError, OSError, ValueError) as exc:
        raise PartitionError(f"cannot find the /usr device {spec.kind.value} {spec.value}: {exc}") from exc
    disk = partition.find_parent("block", "disk") if partition.device_type == "partition" else None
    if disk is None or disk.device_node is None:
        raise PartitionError(f"/usr device {partition.device_node} is not a partition of a disk")
    log.info("boot disk is %s (/usr on %s, from %s)", disk.device_node, partition.device_node, spec.source)
    return Path(disk.device_node)
