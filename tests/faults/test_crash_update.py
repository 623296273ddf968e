"""``kill -9`` of ``update_engine --once`` at more than 50 moments of an update, chosen by progress.

Each trial gets a fresh node and disk image and an Omaha server in the test that serves a 2.3 MiB payload (64
operations of 64 KiB and a kernel) slowly enough to act in the middle of it. The moments are:

* the download, at evenly spaced fractions of the payload bytes the server has sent;
* verification, arming of the GPT flags and the final steps, a short random delay after the log line that
  announces each of them.

The phase a trial really reached is read from what the process logged before it died. After every kill: the
running partition's bytes and flags are unchanged, the passive partition is either not bootable or bootable with
exactly the new image and kernel, at least one GPT copy is valid and cgpt reads the same flags as our parser, and
(for a sample of trials, all trials past the download) the next run installs the update.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from sim.disks import USR_B_INDEX, DiskFacts, disk_facts, partition_bytes
from sim.node import Node, make_node
from sim.omaha import Offer, OmahaStub
from sim.payload import Keys, Release, build_release
from tests.faults.figures import record
from tests.faults.support import FRESH_USR_A, KIB, MIB, NEW_VERSION, assert_running_untouched

pytestmark = pytest.mark.faults

IMAGE_SIZE = 4 * MIB
THROTTLE = 40 * KIB  # payload bytes per 10 ms during the download kills: the download takes about 0.6 s
DOWNLOAD_KILLS = 36
NEXT_RUN_EVERY = 4  # of the download kills, every fourth is followed by a next run (all later kills are)
ARMED = (2, 1, 0)
DISARMED = (0, 0, 0)

# What the process logs as it enters each phase, in order.
PHASE_MARKERS = (
    ("check", "Checking for update"),
    ("download", "Downloading "),
    ("verification", "Download complete"),
    ("arming", "UPDATE_STATUS_VERIFYING → UPDATE_STATUS_FINALIZING"),
    ("finalizing", "armed for the next boot"),
    ("done", "installed on USR-B; reboot needed"),
)


def phase_reached(log: list[str]) -> str:
    reached = "start-up"
    text = "\n".join(log)
    for phase, marker in PHASE_MARKERS:
        if marker in text:
            reached = phase
    return reached


@dataclass(frozen=True)
class Moment:
    """When to kill: once the server has sent ``fraction`` of the payload, or ``delay`` s after a log line."""

    label: str
    fraction: float | None = None
    after_line: str | None = None
    delay: float = 0.0


def moments(rng: random.Random) -> list[Moment]:
    out = [Moment("check", after_line="Checking for update", delay=rng.uniform(0, 0.01)) for _ in range(3)]
    out += [
        Moment(f"download {100 * (i + 0.5) / DOWNLOAD_KILLS:.0f} %", fraction=(i + 0.5) / DOWNLOAD_KILLS)
        for i in range(DOWNLOAD_KILLS)
    ]
    out += [Moment("verification", after_line="Download complete", delay=rng.uniform(0, 0.03)) for _ in range(7)]
    out += [
        Moment("arming", after_line=PHASE_MARKERS[3][1], delay=rng.uniform(0, 0.012)) for _ in range(6)
    ]
    out += [Moment("finalizing", after_line="armed for the next boot", delay=rng.uniform(0, 0.003)) for _ in range(4)]
    return out


@pytest.fixture(scope="module")
def crash_release(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Release:
    return build_release(
        tmp_path_factory.mktemp("crash-release"), keys, image_size=IMAGE_SIZE, chunk_size=64 * KIB,
        kernel_size=200_000, seed=3,
    )


@dataclass
class Trial:
    moment: Moment
    phase: str
    killed: bool
    armed_after_kill: bool
    next_run: bool


async def _run_until(node: Node, keys: Keys, stub: OmahaStub, moment: Moment, size: int) -> tuple[bool, list[str]]:
    """Run ``update_engine --once`` and SIGKILL it at ``moment``; (was it killed, what it logged)."""
    proc = await asyncio.create_subprocess_exec(
        *node.once_args(keys), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    log: list[str] = []
    fire = asyncio.Event()
    if moment.fraction is not None:
        threshold = moment.fraction * size
        stub.on_sent = lambda sent: fire.set() if sent >= threshold else None

    async def read() -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            line = raw.decode(errors="replace")
            log.append(line)
            if moment.after_line is not None and moment.after_line in line:
                fire.set()

    reader = asyncio.create_task(read())
    exited = asyncio.create_task(proc.wait())
    fired = asyncio.create_task(fire.wait())
    try:
        await asyncio.wait([exited, fired], timeout=60, return_when=asyncio.FIRST_COMPLETED)
        if fired.done() and moment.delay:
            await asyncio.sleep(moment.delay)
        killed = proc.returncode is None
        if killed:
            proc.kill()
        await asyncio.wait_for(exited, 30)
        await asyncio.wait_for(reader, 30)
    finally:
        fired.cancel()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert fire.is_set() or not killed, "the kill moment never came"
    return killed and proc.returncode == -9, log


async def _next_run(node: Node, keys: Keys) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *node.once_args(keys), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _assert_after_kill(node: Node, before: DiskFacts, release: Release, where: str) -> bool:
    """The invariants of the module docstring; returns whether USR-B is armed."""
    after = disk_facts(node.disk)  # also: one valid GPT copy at least, and cgpt agrees with our parser
    assert_running_untouched(before, after)
    assert after.usr_a_flags == FRESH_USR_A
    assert after.usr_b_flags in (DISARMED, ARMED), f"{where}: USR-B flags {after.usr_b_flags}"
    kernel = node.root.kernel_dir / "vmlinuz-b"
    if kernel.exists():
        assert kernel.read_bytes() == release.kernel.read_bytes(), f"{where}: a partial kernel was installed"
    armed = after.usr_b_flags == ARMED
    if armed:
        image = release.image.read_bytes()
        assert partition_bytes(node.disk, USR_B_INDEX)[: len(image)] == image, f"{where}: armed but not verified"
        assert kernel.exists(), f"{where}: armed without its kernel"
    return armed


def _assert_installed(node: Node, release: Release) -> None:
    after = disk_facts(node.disk)
    assert after.usr_a_flags == FRESH_USR_A and after.usr_b_flags == ARMED and after.valid_copies == 2
    image = release.image.read_bytes()
    assert partition_bytes(node.disk, USR_B_INDEX)[: len(image)] == image
    assert (node.root.kernel_dir / "vmlinuz-b").read_bytes() == release.kernel.read_bytes()
    assert node.reboot_marker.exists()


async def test_kill_minus_9_at_every_phase_of_an_update(tmp_path: Path, keys: Keys, crash_release: Release) -> None:
    rng = random.Random(1509)
    trials: list[Trial] = []
    misread_as_rollback = 0
    for number, moment in enumerate(moments(rng)):
        # Only the download needs slowing down; the later moments are found by the log lines.
        throttle = THROTTLE if moment.fraction is not None else None
        stub = await OmahaStub(payload=crash_release.data, throttle=throttle).start()
        try:
            stub.offer = Offer(NEW_VERSION, crash_release.size, crash_release.sha256_b64)
            node = make_node(tmp_path / f"trial-{number}", stub.url)
            before = disk_facts(node.disk)
            killed, log = await _run_until(node, keys, stub, moment, crash_release.size)
            phase = phase_reached(log)
            where = f"trial {number} ({moment.label}, reached {phase})"
            armed = _assert_after_kill(node, before, crash_release, where)
            if phase in ("start-up", "check", "download", "verification"):
                assert not armed, f"{where}: armed before the payload was verified"
            next_run = moment.fraction is None or number % NEXT_RUN_EVERY == 0
            if next_run:
                stub.throttle = None
                stub.on_sent = None
                code, out, err = await _next_run(node, keys)
                if code != 0 and phase == "finalizing" and ROLLBACK_MISREAD in err:
                    # Known defect, shown by test_crash_after_arming_is_not_mistaken_for_a_failed_boot.
                    misread_as_rollback += 1
                    assert _assert_after_kill(node, before, crash_release, where)
                else:
                    assert code == 0, f"{where}: the next run failed: {err[-2000:]}"
                    assert "UPDATE_STATUS_UPDATED_NEED_REBOOT" in out
                    _assert_installed(node, crash_release)
            trials.append(Trial(moment, phase, killed, armed, next_run))
        finally:
            await stub.stop()

    kills = [t for t in trials if t.killed]
    phases = Counter(t.phase for t in kills)
    record(
        "kill -9 during an update", trials=len(kills), survived=len(kills) - misread_as_rollback,
        note=f"kills by phase reached: {dict(phases)}; {sum(t.next_run for t in kills)} followed by a next run "
        f"({misread_as_rollback} of them refused: crash taken for a failed boot); "
        f"{sum(t.armed_after_kill for t in kills)} left USR-B armed, each with the verified image",
    )
    assert len(kills) >= 50, f"only {len(kills)} runs were still going when killed: {dict(phases)}"
    assert phases["download"] >= DOWNLOAD_KILLS - 4  # the first moments may come before the first byte is logged
    assert phases["verification"] >= 1
    assert phases["arming"] + phases["finalizing"] >= 1


ROLLBACK_MISREAD = "Rollback detected"


async def test_crash_after_arming_is_not_mistaken_for_a_failed_boot(
    tmp_path: Path, keys: Keys, crash_release: Release
) -> None:
    """The state a kill leaves between the prefs and the reboot marker, made exactly: a completed run whose
    marker is removed (the marker is the only later write besides the Omaha event). The node has not rebooted."""
    stub = await OmahaStub(payload=crash_release.data).start()
    try:
        stub.offer = Offer(NEW_VERSION, crash_release.size, crash_release.sha256_b64)
        node = make_node(tmp_path, stub.url)
        code, _, err = await _next_run(node, keys)
        assert code == 0, err
        node.reboot_marker.unlink()
        code, out, err = await _next_run(node, keys)
        assert code == 0, err[-2000:]
        assert "UPDATE_STATUS_UPDATED_NEED_REBOOT" in out
        _assert_installed(node, crash_release)
    finally:
        await stub.stop()


async def test_crashes_leave_no_partial_kernel_files(tmp_path: Path, keys: Keys, crash_release: Release) -> None:
    stub = await OmahaStub(payload=crash_release.data, throttle=THROTTLE).start()
    try:
        stub.offer = Offer(NEW_VERSION, crash_release.size, crash_release.sha256_b64)
        node = make_node(tmp_path, stub.url)
        for _ in range(3):
            stub.bytes_sent = 0
            killed, log = await _run_until(node, keys, stub, Moment("late download", fraction=0.9),
                                           crash_release.size)
            assert killed and phase_reached(log) == "download"
        stub.throttle = None
        stub.on_sent = None
        code, _, err = await _next_run(node, keys)
        assert code == 0, err
        leftovers = sorted(p.name for p in node.root.kernel_dir.iterdir() if p.name != "vmlinuz-b")
        assert leftovers == [], f"files left in the kernel directory: {leftovers}"
    finally:
        await stub.stop()

