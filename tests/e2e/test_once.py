"""``update_engine --once`` end to end: dev server on 127.0.0.1, real payload and keys, a GPT disk image made by
sgdisk, flags read back with cgpt."""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sim.devserver import DevServerProcess, start_devserver
from sim.disks import cgpt_flags, make_usr_disk, partition_bytes
from sim.node import NodeRoot, make_node_root, update_engine_args
from sim.payload import Keys, Release

USR_A, USR_B = 3, 4
TEST_OMAHA_URL_FLAG = 1 << 28


@pytest.fixture
def devserver(tmp_path: Path, release: Release) -> Iterator[DevServerProcess]:
    with start_devserver(tmp_path / "srv", [(release.payload, "2.0.0", None)]) as server:
        yield server


@pytest.fixture
def node(tmp_path: Path, devserver: DevServerProcess) -> NodeRoot:
    return make_node_root(tmp_path / "root", version="1.0.0", server=devserver.url)


def run_once(node: NodeRoot, disk: Path, public_key: Path | None, *extra: str) -> subprocess.CompletedProcess[str]:
    args = update_engine_args(node, disk, "USR-A", public_key, "--once", "--resume-delay", "0.2", *extra)
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def event_pairs(server: DevServerProcess) -> list[tuple[object, object, object]]:
    return [(e["event_type"], e["event_result"], e["error_code"]) for e in server.events()]


def test_full_cycle_updates_passive_partition_and_arms_it(
    tmp_path: Path, node: NodeRoot, devserver: DevServerProcess, keys: Keys, release: Release
) -> None:
    disk = make_usr_disk(tmp_path / "disk.img")
    usr_a_before = partition_bytes(disk, USR_A)

    result = run_once(node, disk, keys.public)

    assert result.returncode == 0, result.stderr
    assert "UPDATE_STATUS_UPDATED_NEED_REBOOT" in result.stdout
    assert "2.0.0" in result.stdout
    image = release.image.read_bytes()
    usr_b = partition_bytes(disk, USR_B)
    assert usr_b[: len(image)] == image
    assert partition_bytes(disk, USR_A) == usr_a_before
    # USR-B tried once at top priority; USR-A (running) keeps successful=1 below it.
    assert cgpt_flags(disk, USR_B) == (2, 1, 0)
    assert cgpt_flags(disk, USR_A) == (1, 0, 1)
    assert (node.kernel_dir / "vmlinuz-b").read_bytes() == release.kernel.read_bytes()
    assert not (node.kernel_dir / "vmlinuz-a").exists()
    # Omaha saw: the check's 3/2, download started, download finished, update complete.
    assert event_pairs(devserver) == [(3, 2, None), (13, 1, None), (14, 1, None), (3, 1, None)]
    assert node.prefs("previous-version") == "1.0.0"
    assert node.prefs("aleph-version") == "1.0.0"
    full = node.prefs("full-response")
    assert full is not None and 'version="2.0.0"' in full
    assert (node.run_dir / "update_engine_autoupdate_completed").exists()


def test_second_run_keeps_the_pending_reboot(
    tmp_path: Path, node: NodeRoot, devserver: DevServerProcess, keys: Keys
) -> None:
    disk = make_usr_disk(tmp_path / "disk.img")
    assert run_once(node, disk, keys.public).returncode == 0
    before = disk.read_bytes()
    again = run_once(node, disk, keys.public)
    assert again.returncode == 0
    assert "UPDATE_STATUS_UPDATED_NEED_REBOOT" in again.stdout
    assert disk.read_bytes() == before  # nothing downloaded or written again


def test_no_update_when_version_is_current(
    tmp_path: Path, node: NodeRoot, devserver: DevServerProcess, keys: Keys
) -> None:
    node.set_version("2.0.0")
    disk = make_usr_disk(tmp_path / "disk.img")
    before = disk.read_bytes()
    result = run_once(node, disk, keys.public)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "UPDATE_STATUS_IDLE"
    assert disk.read_bytes() == before
    assert event_pairs(devserver) == [(3, 2, None)]


def assert_refused(
    result: subprocess.CompletedProcess[str], disk: Path, usr_a_before: bytes, server: DevServerProcess,
    code: int, name: str,
) -> None:
    assert result.returncode != 0
    assert f"error {code} {name}" in result.stderr, result.stderr
    assert cgpt_flags(disk, USR_A) == (1, 0, 1)
    assert cgpt_flags(disk, USR_B)[0] == 0  # passive never armed
    assert partition_bytes(disk, USR_A) == usr_a_before
    failures = [e for e in server.events() if e["event_result"] == 0]
    assert failures and failures[-1]["error_code"] == code | TEST_OMAHA_URL_FLAG


def test_wrong_key_is_refused_and_nothing_is_armed(
    tmp_path: Path, node: NodeRoot, devserver: DevServerProcess, other_keys: Keys
) -> None:
    disk = make_usr_disk(tmp_path / "disk.img")
    usr_a = partition_bytes(disk, USR_A)
    result = run_once(node, disk, other_keys.public)
    assert_refused(result, disk, usr_a, devserver, 18, "DOWNLOAD_PAYLOAD_PUBKEY_VERIFICATION_ERROR")
    assert not (node.run_dir / "update_engine_autoupdate_completed").exists()
    assert not (node.kernel_dir / "vmlinuz-b").exists()


def test_missing_public_key_means_no_update(tmp_path: Path, node: NodeRoot, devserver: DevServerProcess) -> None:
    disk = make_usr_disk(tmp_path / "disk.img")
    usr_a = partition_bytes(disk, USR_A)
    result = run_once(node, disk, tmp_path / "absent.pub.pem")
    assert_refused(result, disk, usr_a, devserver, 18, "DOWNLOAD_PAYLOAD_PUBKEY_VERIFICATION_ERROR")
    assert "no update without a key" in result.stderr


def test_corrupt_payload_is_refused(tmp_path: Path, keys: Keys, release: Release) -> None:
    bad = tmp_path / "bad.gz"
    data = bytearray(release.payload.read_bytes())
    data[len(data) // 2] ^= 0x01  # a byte inside an operation blob
    bad.write_bytes(bytes(data))
    server = start_devserver(tmp_path / "srv", [(bad, "2.0.0", None)])
    try:
        node = make_node_root(tmp_path / "root", server=server.url)
        disk = make_usr_disk(tmp_path / "disk.img")
        usr_a = partition_bytes(disk, USR_A)
        result = run_once(node, disk, keys.public)
        assert_refused(result, disk, usr_a, server, 29, "DOWNLOAD_OPERATION_HASH_MISMATCH")
    finally:
        server.stop()


def test_server_down_fails_cleanly(tmp_path: Path, keys: Keys) -> None:
    node = make_node_root(tmp_path / "root", server="http://127.0.0.1:9/v1/update/")
    disk = make_usr_disk(tmp_path / "disk.img")
    before = hashlib.sha256(disk.read_bytes()).hexdigest()
    result = run_once(node, disk, keys.public)
    assert result.returncode != 0
    assert "error 2000" in result.stderr
    assert hashlib.sha256(disk.read_bytes()).hexdigest() == before


def test_disk_without_usr_partitions_is_refused(
    tmp_path: Path, node: NodeRoot, devserver: DevServerProcess, keys: Keys
) -> None:
    disk = tmp_path / "plain.img"
    disk.write_bytes(b"\0" * (4 << 20))
    subprocess.run(["sgdisk", "-n", "1:2048:+1M", "-c", "1:DATA", str(disk)], check=True, capture_output=True)
    result = run_once(node, disk, keys.public)
    assert result.returncode != 0
    assert "USR-A" in result.stderr


def test_rolled_back_version_is_reported_and_not_installed_again(
    tmp_path: Path, node: NodeRoot, devserver: DevServerProcess, keys: Keys
) -> None:
    disk = make_usr_disk(tmp_path / "disk.img")
    assert run_once(node, disk, keys.public).returncode == 0
    # The bootloader tried USR-B once, it failed, and the node is back on USR-A (1.0.0): /run is empty again.
    (node.run_dir / "update_engine_autoupdate_completed").unlink()
    node.new_boot()
    subprocess.run(["cgpt", "add", "-i", str(USR_B), "-T", "0", str(disk)], check=True)
    usr_b_before = partition_bytes(disk, USR_B)

    result = run_once(node, disk, keys.public)

    assert result.returncode != 0
    assert "failed to boot" in result.stderr
    events = event_pairs(devserver)
    assert (3, 0, 44) in events[4:]  # the check after the failed boot reports the rollback
    assert events[-1] == (3, 9, 36 | TEST_OMAHA_URL_FLAG)  # and the same version is deferred, not re-installed
    assert len([e for e in events if e[0] == 13]) == 1
    assert partition_bytes(disk, USR_B) == usr_b_before
    assert node.prefs("failed-boot-version") == "2.0.0"


@pytest.mark.parametrize(
    ("user", "password", "named"),
    [("fleet", "pässwörd-€-geheim", "DOWNLOAD_PASSWORD"), ("fleet:geheim", "x", "DOWNLOAD_USER"),
     ("flötte-€-geheim", "x", "DOWNLOAD_USER")],
)
def test_credentials_that_cannot_be_sent_are_refused_by_name_and_never_shown(
    tmp_path: Path, node: NodeRoot, devserver: DevServerProcess, keys: Keys, user: str, password: str, named: str
) -> None:
    """Before, a password outside Latin-1 came back in the error message (an encoding error's repr carries the
    whole value), in the journal and on stdout; a user name with ':' failed as an internal error."""
    node.set_update_conf(SERVER=devserver.url, DOWNLOAD_USER=user, DOWNLOAD_PASSWORD=password)
    disk = make_usr_disk(tmp_path / "disk.img")
    result = run_once(node, disk, keys.public)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert f"{named} in {node.root / 'etc/coreos/update.conf'} " in output
    assert "error 2 OMAHA_REQUEST_ERROR" in output
    assert "geheim" not in output and "€" not in output
    # Nothing was written: the refusal comes before the payload's first byte.
    assert cgpt_flags(disk, USR_B)[0] == 0
    assert event_pairs(devserver)[-1] == (3, 0, 2 | TEST_OMAHA_URL_FLAG)
