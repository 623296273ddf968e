"""A payload that keeps failing is backed off: the attempter's scheduled (non-interactive) checks against the dev
server on 127.0.0.1, a payload whose signature does not match the node's key, a GPT image made by sgdisk."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from coreos_common.status import UpdateStatus
from sim.devserver import DevServerProcess, start_devserver
from sim.disks import cgpt_flags, make_usr_disk
from sim.node import NodeRoot, make_node_root
from sim.payload import Keys, Release, build_release
from tests.e2e.test_once import event_pairs
from update_engine.engine.attempter import EngineOptions, UpdateAttempter
from update_engine.engine.history import BACKOFF_EXPIRY_TIME, PAYLOAD_ATTEMPT_NUMBER
from update_engine.errors import FLAG_TEST_OMAHA_URL, ErrorCode

USR_B = 4
DAY = 24 * 3600
SIX_HOURS = 6 * 3600
DOWNLOAD_STARTED = (13, 1, None)
DEFERRED = (3, 9, ErrorCode.OMAHA_UPDATE_DEFERRED_FOR_BACKOFF | FLAG_TEST_OMAHA_URL)  # 3/9: deferred


@pytest.fixture(scope="module")
def badly_signed(tmp_path_factory: pytest.TempPathFactory, other_keys: Keys) -> Release:
    """A well-formed payload signed with a key the node does not trust: it fails after a complete download."""
    return build_release(tmp_path_factory.mktemp("badly-signed"), other_keys)


def serve(tmp_path: Path, release: Release, name: str, *extra: str) -> DevServerProcess:
    return start_devserver(tmp_path / name, [(release.payload, "2.0.0", None)], *extra)


def attempter_for(node: NodeRoot, disk: Path, keys: Keys) -> UpdateAttempter:
    return UpdateAttempter(
        EngineOptions(
            config_root=node.root, state_dir=node.state_dir, run_dir=node.run_dir, disk=disk, booted="USR-A",
            public_key=keys.public, kernel_dir=node.kernel_dir,
        )
    )


def expiry_in(attempter: UpdateAttempter) -> float:
    expiry = attempter.prefs.get_int(BACKOFF_EXPIRY_TIME)
    assert expiry is not None
    return expiry - time.time()


async def test_a_failing_payload_is_not_downloaded_again_by_scheduled_checks_until_its_backoff_ends(
    tmp_path: Path, keys: Keys, badly_signed: Release
) -> None:
    server = serve(tmp_path, badly_signed, "srv", "--payload-backoff")
    try:
        node = make_node_root(tmp_path / "root", server=server.url)
        attempter = attempter_for(node, make_usr_disk(tmp_path / "disk.img"), keys)

        first = await attempter.check_and_update()
        assert first.error_code == ErrorCode.DOWNLOAD_PAYLOAD_PUBKEY_VERIFICATION_ERROR
        assert attempter.prefs.get_int(PAYLOAD_ATTEMPT_NUMBER) == 1
        assert DAY - SIX_HOURS - 60 <= expiry_in(attempter) <= DAY + SIX_HOURS
        assert event_pairs(server).count(DOWNLOAD_STARTED) == 1

        second = await attempter.check_and_update()
        assert second.error_code == ErrorCode.OMAHA_UPDATE_DEFERRED_FOR_BACKOFF
        assert second.status is UpdateStatus.IDLE
        assert event_pairs(server)[-1] == DEFERRED
        assert event_pairs(server).count(DOWNLOAD_STARTED) == 1  # nothing downloaded

        # Someone asking now is not deferred; the second failure doubles the wait.
        third = await attempter.check_and_update(interactive=True)
        assert third.error_code == ErrorCode.DOWNLOAD_PAYLOAD_PUBKEY_VERIFICATION_ERROR
        assert event_pairs(server).count(DOWNLOAD_STARTED) == 2
        assert attempter.prefs.get_int(PAYLOAD_ATTEMPT_NUMBER) == 2
        assert 2 * DAY - SIX_HOURS - 60 <= expiry_in(attempter) <= 2 * DAY + SIX_HOURS

        # ResetStatus forgets the attempts: the next scheduled check downloads again.
        attempter.reset_status()
        assert attempter.prefs.get_int(PAYLOAD_ATTEMPT_NUMBER) is None
        await attempter.check_and_update()
        assert event_pairs(server).count(DOWNLOAD_STARTED) == 3
    finally:
        server.stop()


async def test_a_new_payload_is_tried_at_once_and_installs(
    tmp_path: Path, keys: Keys, badly_signed: Release
) -> None:
    """The backoff belongs to the failing response: once the server offers a fixed payload, the next
    scheduled check installs it."""
    bad = serve(tmp_path, badly_signed, "bad", "--payload-backoff")
    node = make_node_root(tmp_path / "root", server=bad.url)
    disk = make_usr_disk(tmp_path / "disk.img")
    attempter = attempter_for(node, disk, keys)
    try:
        await attempter.check_and_update()
        assert (await attempter.check_and_update()).error_code == ErrorCode.OMAHA_UPDATE_DEFERRED_FOR_BACKOFF
    finally:
        bad.stop()
    fixed = serve(tmp_path, build_release(tmp_path / "fixed", keys), "fixed", "--payload-backoff")
    try:
        node.set_update_conf(SERVER=fixed.url)
        outcome = await attempter.check_and_update()
        assert outcome.error_code is None, outcome.error_message
        assert outcome.status is UpdateStatus.UPDATED_NEED_REBOOT
        assert cgpt_flags(disk, USR_B) == (2, 1, 0)
        assert attempter.prefs.get_int(PAYLOAD_ATTEMPT_NUMBER) == 0
    finally:
        fixed.stop()


async def test_without_backoff_from_the_server_every_scheduled_check_tries_again(
    tmp_path: Path, keys: Keys, badly_signed: Release
) -> None:
    server = serve(tmp_path, badly_signed, "srv")  # the dev server's default: DisablePayloadBackoff="true"
    try:
        node = make_node_root(tmp_path / "root", server=server.url)
        attempter = attempter_for(node, make_usr_disk(tmp_path / "disk.img"), keys)
        for _ in range(2):
            outcome = await attempter.check_and_update()
            assert outcome.error_code == ErrorCode.DOWNLOAD_PAYLOAD_PUBKEY_VERIFICATION_ERROR
        assert event_pairs(server).count(DOWNLOAD_STARTED) == 2
    finally:
        server.stop()
