"""The demo's scenarios: what the fleet is, what happens to it, and what each node must end as.

``update``: every node updates 1.0.0 → 2.0.0, one reboot at a time (max 1). ``rollback``: node-1's first boot of
USR-B fails (a kernel panic), the bootloader falls back to USR-A, update-engine reports the rollback and refuses to
install 2.0.0 again, and the other nodes update.

Rules: a scenario only says what to set up and what to expect; running the fleet is :mod:`sim.fleet`'s, telling
the story :mod:`demo.story`'s. :func:`end_state_missing` lists what a node still lacks, empty once it is where
its scenario says it ends.
"""

from __future__ import annotations

import asyncio
import enum
import os
from dataclasses import dataclass
from pathlib import Path

from sim.fleet.node import NodeHistory
from sim.payload import key_files
from sim.standins.bootloader import release_block
from update_engine.errors import ErrorCode
from update_engine.omaha import EventResult
from update_engine.payload.generate import generate_full_payload

OLD_VERSION = "1.0.0"
NEW_VERSION = "2.0.0"
GROUP = "stable"
USR_MIB = 8
SEMAPHORE_MAX = 1
MIB = 1 << 20
LINK_RATE = 4 * MIB  # bytes/s of each download between the nodes and the Omaha server
SCENARIOS = ("update", "rollback")
DEFAULT_TIMEOUT = 110.0


@dataclass(frozen=True)
class DemoOptions:
    scenario: str = "update"
    nodes: int = 3
    timeout: float = DEFAULT_TIMEOUT
    keep: bool = False
    workdir: Path | None = None

    def describe(self) -> str:
        """The scenario's first line."""
        what = ("every node updates 1.0.0 → 2.0.0, one reboot at a time" if self.scenario == "update"
                else "node-1's new /usr fails to boot and rolls back; the other nodes update")  # fmt: skip
        return f"scenario {self.scenario}: {self.nodes} nodes, max {SEMAPHORE_MAX} down at once; {what}"


class Outcome(enum.Enum):
    UPDATED = "updated"
    ROLLED_BACK = "rolled back"


def expected_outcome(options: DemoOptions, index: int) -> Outcome:
    """``rollback``: node-1 rolls back; every other node updates."""
    return Outcome.ROLLED_BACK if options.scenario == "rollback" and index == 1 else Outcome.UPDATED


def fails_first_boot_of(outcome: Outcome) -> str | None:
    """The slot whose first boot panics on a node expected to roll back."""
    return "USR-B" if outcome is Outcome.ROLLED_BACK else None


@dataclass(frozen=True)
class Release:
    public_key: Path
    payload: Path

    @property
    def size(self) -> int:
        return self.payload.stat().st_size


async def make_release(directory: Path) -> Release:
    """A key pair and the signed payload of a 2.0.0 USR image and kernel, by the project's generator."""
    keys = await asyncio.to_thread(key_files, directory)
    image = directory / f"usr-{NEW_VERSION}.img"
    size = USR_MIB * MIB
    # Random data does not compress: the payload is as big as the image, and its download takes a moment.
    block = release_block(NEW_VERSION)
    image.write_bytes(block + os.urandom(size - len(block)))
    kernel = directory / "vmlinuz"
    kernel.write_bytes(f"demo kernel {NEW_VERSION}\n".encode() * 4096)
    payload = directory / f"update-{NEW_VERSION}.gz"
    key = keys.private.read_bytes()
    await asyncio.to_thread(generate_full_payload, image, payload, key, kernel=kernel)
    return Release(keys.public, payload)


def end_state_missing(history: NodeHistory, expected: Outcome) -> list[str]:
    """What a node still lacks to be in its expected end state (empty: it is there)."""
    missing: list[str] = []
    boot = history.current_boot
    updated = expected is Outcome.UPDATED
    slot, version = ("USR-B", NEW_VERSION) if updated else ("USR-A", OLD_VERSION)
    if boot is None or boot.failed or (boot.choice.label, boot.choice.version) != (slot, version):
        missing.append(f"running {slot} {version}")
    if not updated and not any(b.failed for b in history.boots):
        missing.append("a failed boot of USR-B")
    if not history.reboot_calls:
        missing.append("a reboot")
    if boot is None or boot.marked_good_at is None or len(history.boots) < 2:
        missing.append(f"{slot} marked good after the reboot")
    if history.lock_taken_at is None:
        missing.append("the reboot lock taken")
    if history.holding or history.lock_released_at is None:
        missing.append("the reboot lock released")
    if updated:
        if not any(e.app_version == NEW_VERSION and e.event_result == EventResult.SUCCESS_REBOOT
                   for e in history.omaha_events):  # fmt: skip
            missing.append(f"the post-boot report from {NEW_VERSION}")
    else:
        codes = {e.base_code for e in history.omaha_events}
        if ErrorCode.ROLLBACK_ERROR not in codes:
            missing.append("the rollback reported to Omaha (errorcode 44)")
        if ErrorCode.OMAHA_UPDATE_DEFERRED_PER_POLICY not in codes:
            missing.append(f"{NEW_VERSION} refused after the rollback (errorcode 36)")
    return missing
