"""A check that fails gives back everything it took: the payload sink's threads, the descriptors it opened on the
disk, and the passive partition's flags.

The attempter runs in-process against the Omaha stub on 127.0.0.1 and a GPT image made by sgdisk. A node whose
checks fail keeps failing every hour for as long as it runs, so anything one failure leaks, the daemon accumulates:
the test repeats failures of several kinds (refused before the download, cut off in the middle of it, refused by
the verification at its end, cancelled as SIGTERM cancels them) and counts the process's threads and open file
descriptors before and after.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from coreos_common.status import UpdateStatus
from sim.disks import disk_facts
from sim.node import Node, make_node
from sim.omaha import Offer, OmahaStub, serve_bytes
from sim.payload import Keys, Release, build_release, sha256_b64
from tests.faults.support import MIB, NEW_VERSION, assert_nothing_armed, assert_running_untouched
from update_engine.engine.attempter import UpdateAttempter
from update_engine.errors import ErrorCode
from update_engine.http_rules import HttpLimits

pytestmark = pytest.mark.faults

REPEATS = 20
QUICK = HttpLimits(connect_timeout=2.0, stall_timeout=2.0, omaha_total_timeout=5.0, resume_attempts=0,
                   resume_delay=0.05)
BOUND = 30.0  # on any one attempt; a passing attempt takes a fraction of a second


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Release:
    """About 2 MiB of payload, so that a download can be cut after its first MiB."""
    return build_release(tmp_path_factory.mktemp("resources-release"), keys, image_size=4 * MIB, seed=3)


@pytest.fixture
async def stub(release: Release) -> AsyncIterator[OmahaStub]:
    server = await OmahaStub(payload=release.data).start()
    try:
        yield server
    finally:
        await server.stop()


@dataclass(frozen=True)
class Failure:
    """One way for a check to fail: how the node and the stub are set up, and the code it must end with."""

    name: str
    code: int
    arrange: Callable[[Node, OmahaStub, Release, Keys], None]


def _with_settings(**values: str) -> Callable[[Node, OmahaStub, Release, Keys], None]:
    def arrange(node: Node, stub: OmahaStub, release: Release, keys: Keys) -> None:
        node.root.set_update_conf(SERVER=stub.url, **values)
        stub.offer = Offer(NEW_VERSION, release.size, release.sha256_b64)

    return arrange


def _wrong_sha256(node: Node, stub: OmahaStub, release: Release, keys: Keys) -> None:
    node.root.set_update_conf(SERVER=stub.url)
    stub.offer = Offer(NEW_VERSION, release.size, sha256_b64(b"another payload"))


def _cut_after_a_mib(node: Node, stub: OmahaStub, release: Release, keys: Keys) -> None:
    node.root.set_update_conf(SERVER=stub.url)
    stub.offer = Offer(NEW_VERSION, release.size, release.sha256_b64)

    async def cut(request: web.Request) -> web.StreamResponse:
        return await serve_bytes(request, release.data[: MIB + 4096])

    stub.package = cut


def _not_found(node: Node, stub: OmahaStub, release: Release, keys: Keys) -> None:
    node.root.set_update_conf(SERVER=stub.url)
    stub.offer = Offer(NEW_VERSION, release.size, release.sha256_b64)

    async def missing(request: web.Request) -> web.StreamResponse:
        raise web.HTTPNotFound()

    stub.package = missing


FAILURES = [
    # A user name with ":" cannot be sent in basic authentication; the check failed after the sink existed.
    Failure("download user with a colon", int(ErrorCode.OMAHA_REQUEST_ERROR), _with_settings(DOWNLOAD_USER="a:b")),
    Failure("payload not found", int(ErrorCode.DOWNLOAD_TRANSFER_ERROR), _not_found),
    Failure("download cut after 1 MiB", int(ErrorCode.DOWNLOAD_TRANSFER_ERROR), _cut_after_a_mib),
    Failure("SHA-256 of the payload", int(ErrorCode.DOWNLOAD_HASH_MISMATCH), _wrong_sha256),
]


def _resources() -> tuple[int, int]:
    return threading.active_count(), len(os.listdir("/proc/self/fd"))


async def _fail_once(node: Node, keys: Keys, failure: Failure) -> None:
    attempter = UpdateAttempter(node.options(keys, "", QUICK))
    outcome = await asyncio.wait_for(attempter.check_and_update(interactive=True), BOUND)
    assert outcome.error_code == failure.code, f"{failure.name}: {outcome.error_code} {outcome.error_message}"
    assert attempter.machine.status is UpdateStatus.IDLE


async def _cancel_during_download(node: Node, keys: Keys, stub: OmahaStub, release: Release) -> None:
    """SIGTERM cancels the daemon's check task: here, once the stub has sent its first MiB."""
    node.root.set_update_conf(SERVER=stub.url)
    stub.offer = Offer(NEW_VERSION, release.size, release.sha256_b64)
    stub.throttle = 64 * 1024
    sent_a_mib = asyncio.Event()
    stub.on_sent = lambda sent: sent_a_mib.set() if sent >= MIB else None
    attempter = UpdateAttempter(node.options(keys, "", QUICK))
    task = asyncio.create_task(attempter.check_and_update(interactive=True))
    try:
        await asyncio.wait_for(sent_a_mib.wait(), BOUND)
    finally:
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, BOUND)
    stub.throttle, stub.on_sent = None, None


async def test_failing_checks_leak_no_threads_and_no_descriptors(
    tmp_path: Path, keys: Keys, stub: OmahaStub, release: Release
) -> None:
    node = make_node(tmp_path, stub.url)
    before = disk_facts(node.disk)

    async def each(failure: Failure) -> None:
        stub.package = None
        failure.arrange(node, stub, release, keys)
        await _fail_once(node, keys, failure)

    # Once of each kind first: what stays for good (the loop's worker thread for blocking calls) is not a leak.
    for failure in FAILURES:
        await each(failure)
    threads, fds = _resources()
    for n in range(REPEATS):
        await each(FAILURES[n % len(FAILURES)])
    await asyncio.sleep(0)
    assert _resources() == (threads, fds), f"{REPEATS} failed checks: threads {threads}, fds {fds} before"
    assert_nothing_armed(node, before)


async def test_cancelled_checks_leak_nothing_and_leave_the_partition_disarmed(
    tmp_path: Path, keys: Keys, stub: OmahaStub, release: Release
) -> None:
    node = make_node(tmp_path, stub.url)
    before = disk_facts(node.disk)
    await _cancel_during_download(node, keys, stub, release)
    threads, fds = _resources()
    for _ in range(REPEATS // 4):
        await _cancel_during_download(node, keys, stub, release)
    assert _resources() == (threads, fds)
    assert_nothing_armed(node, before)



async def test_a_cancel_during_the_postinstall_hook_kills_it_and_disarms_the_partition(
    tmp_path: Path, keys: Keys, stub: OmahaStub, release: Release
) -> None:
    """Before, the hook ran in a thread with a 600 s timeout: a cancelled check (SIGTERM) left it running, and the
    daemon's exit waited for it."""
    node = make_node(tmp_path, stub.url)
    node.root.set_update_conf(SERVER=stub.url)
    stub.offer = Offer(NEW_VERSION, release.size, release.sha256_b64)
    before = disk_facts(node.disk)
    pid_file = tmp_path / "hook.pid"
    hook = tmp_path / "postinst"
    hook.write_text(f"#!/bin/sh\nsleep 600 &\necho $! > {pid_file}\nwait\n")
    hook.chmod(0o755)
    options = dataclasses.replace(node.options(keys, "", QUICK), postinstall_hook=hook)
    task = asyncio.create_task(UpdateAttempter(options).check_and_update(interactive=True))
    try:
        async with asyncio.timeout(BOUND):
            while not pid_file.exists() or not pid_file.read_text().strip():
                assert not task.done(), task.result()
                await asyncio.sleep(0.02)
    finally:
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, BOUND)
    child = int(pid_file.read_text())
    async with asyncio.timeout(BOUND):
        while _alive(child):
            await asyncio.sleep(0.02)
    # The partition that was armed before the hook ran is disarmed again; the running one is untouched.
    after = disk_facts(node.disk)
    assert_running_untouched(before, after)
    assert after.usr_b_flags[0] == 0 and not node.reboot_marker.exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}/stat").exists() else "X"
    return status != "Z"
