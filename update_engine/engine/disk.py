"""The node's boot disk as the engine sees it: which file or device, and which USR partition runs.

A thin shell over ``update_engine.gpt`` and ``update_engine.partitions``: the disk is ``--disk`` or found with udev,
the running partition is ``--booted`` or read from ``/proc/cmdline`` and the ``/usr`` mount (under the config
root). Every call opens the disk afresh: the table is read and validated each time, never cached.
"""

from __future__ import annotations

from pathlib import Path

from update_engine.engine.options import EngineOptions
from update_engine.gpt import GptDisk
from update_engine.partitions import UsrSlot, find_boot_disk, resolve_slots


class NodeDisk:
    """Opens the boot disk and tells the running USR partition from the passive one."""

    def __init__(self, options: EngineOptions) -> None:
        self._options = options

    def path(self) -> Path:
        if self._options.disk is not None:
            return self._options.disk
        return find_boot_disk(self._options.config_root)

    def open(self) -> GptDisk:
        return GptDisk.open(self.path())

    def slots(self, disk: GptDisk) -> tuple[UsrSlot, UsrSlot]:
        """(running, passive)."""
        root = self._options.config_root
        cmdline = _read_optional(root / "proc/cmdline")
        mountinfo = _read_optional(root / "proc/self/mountinfo") if self._options.booted is None else None
        return resolve_slots(disk, booted=self._options.booted, cmdline=cmdline, mountinfo=mountinfo)


def _read_optional(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None
