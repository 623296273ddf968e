"""The demo's scenarios: what the fleet is, what happens to it, and what each node must end as.

``update``: every node updates 1.0.0 → 2.0.0, one reboot at a time (max 1). ``rollback``: node-1's first boot of
USR-B fails (a kernel panic), the bootloader falls back to USR-A, update-engine reports the rollback and will not
install 2.0.0 again, and the other nodes update.

The update server is ``coreupdate`` (or, with ``--server devserver``, the dev server, which offers the release to
every node at once and keeps no view of them). On coreupdate the nodes are in group ``demo-fleet``, which follows
channel ``stable`` at ``ceil(nodes / 3)`` node(s) per ``ROLLOUT_INTERVAL_S`` (and as many in flight at once): the
scaled-down form of "one machine every 90 minutes". Its view must agree with the nodes': every instance Complete on
2.0.0, and in ``rollback`` node-1 RolledBack (or Error) on 1.0.0; there the server no longer offers node-1 2.0.0,
while the dev server offers it on and the node declines (errorcode 36).

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

from sim.fleet.node import NodeHistory, NodeTiming
from sim.payload import key_files
from sim.standins.bootloader import release_block
from update_engine.errors import ErrorCode
from update_engine.omaha import EventResult
from update_engine.payload.generate import generate_full_payload

OLD_VERSION = "1.0.0"
NEW_VERSION = "2.0.0"
GROUP = "demo-fleet"  # the nodes' GROUP= on coreupdate: a group the operator makes
GROUP_LABEL = "Demo fleet"
CHANNEL = "stable"  # the channel the group follows (and, on the dev server, the nodes' GROUP=)
ROLLOUT_INTERVAL_S = 10  # the group's --update-interval
CHECK_INTERVAL_S = 3  # update_engine --check-interval: a node held back asks again this soon
SERVERS = ("coreupdate", "devserver")
USR_MIB = 8
SEMAPHORE_MAX = 1
MIB = 1 << 20
LINK_RATE = 4 * MIB  # bytes/s of each download between the nodes and the Omaha server
SCENARIOS = ("update", "rollback")
DEFAULT_TIMEOUT = 110.0


TIMING = NodeTiming(check_interval=CHECK_INTERVAL_S)


@dataclass(frozen=True)
class DemoOptions:
    scenario: str = "update"
    nodes: int = 3
    timeout: float = DEFAULT_TIMEOUT
    keep: bool = False
    workdir: Path | None = None
    server: str = "coreupdate"
    serve: bool = False

    @property
    def on_coreupdate(self) -> bool:
        return self.server == "coreupdate"

    @property
    def update_count(self) -> int:
        """Nodes the rollout lets go per interval (and in flight at once): three waves whatever the size."""
        return -(-self.nodes // 3)

    def rollout_text(self) -> str:
        """The group's rate, in words."""
        nodes = "node" if self.update_count == 1 else "nodes"
        return f"{self.update_count} {nodes} per {ROLLOUT_INTERVAL_S} s, as many in flight at once"

    def describe(self) -> str:
        """The scenario's first line."""
        what = ("every node updates 1.0.0 → 2.0.0, one reboot at a time" if self.scenario == "update"
                else "node-1's new /usr fails to boot and rolls back; the other nodes update")  # fmt: skip
        server = (f"coreupdate, group {GROUP}: {self.rollout_text()}" if self.on_coreupdate
                  else "the Omaha dev server, the release offered to every node at once")  # fmt: skip
        return f"scenario {self.scenario}: {self.nodes} nodes, max {SEMAPHORE_MAX} down at once; {what}; {server}"


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


def end_state_missing(history: NodeHistory, expected: Outcome, *, on_coreupdate: bool) -> list[str]:
    """What a node still lacks to be in its expected end state, as the node and (``on_coreupdate``) as the update
    server see it (empty: it is there)."""
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
        if not on_coreupdate and ErrorCode.OMAHA_UPDATE_DEFERRED_PER_POLICY not in codes:
            missing.append(f"{NEW_VERSION} refused after the rollback (errorcode 36)")
    if on_coreupdate:
        missing += server_disagrees(history, expected)
    return missing


def server_disagrees(history: NodeHistory, expected: Outcome) -> list[str]:
    """What the update server's record of the node lacks to agree with the expected end state."""
    server = history.server
    shown = f"it shows {server.status} on {server.version}" if server else "it does not know the node"
    if expected is Outcome.UPDATED:
        if server is None or (server.status, server.version) != ("Complete", NEW_VERSION):
            return [f"the server's Complete on {NEW_VERSION} ({shown})"]
    elif server is None or server.status not in ("RolledBack", "Error") or server.version != OLD_VERSION:
        return [f"the server's record of the rollback, on {OLD_VERSION} ({shown})"]
    return []
