"""``update_engine --once`` against ``coreupdate serve``: the payload uploaded through the API, a GPT image made
by sgdisk, and the rollout seen through the API (granted → installed → complete)."""

from __future__ import annotations

import shutil
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sim.coreupdate import COREOS_APP_ID, CoreUpdateServer, start_coreupdate
from sim.disks import cgpt_flags, make_usr_disk, partition_bytes
from sim.node import make_node_root
from sim.payload import Keys, Release
from tests.e2e.test_once import run_once

USR_B = 4
APP = f"/apps/{COREOS_APP_ID}"


@pytest.fixture
def server(tmp_path: Path, keys: Keys) -> Iterator[CoreUpdateServer]:
    srv = start_coreupdate(tmp_path / "srv", extra_args=("--payload-public-key", str(keys.public)))
    try:
        yield srv
    finally:
        srv.stop()


def wait_for_status(server: CoreUpdateServer, machine_id: str, status: str, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    instance: dict[str, Any] = {}
    while time.monotonic() < deadline:
        code, instance = server.request("GET", f"/api/v1{APP}/instances/{machine_id}")
        if code == 200 and instance["status"] == status:
            return instance
        time.sleep(0.05)
    raise AssertionError(f"instance {machine_id} never became {status}: {instance}")


def test_update_engine_once_is_granted_installs_and_completes(
    tmp_path: Path, server: CoreUpdateServer, keys: Keys, release: Release
) -> None:
    uploaded = server.api("PUT", f"{APP}/packages/2.0.0/payload?file_name=update.gz",
                          raw=release.payload.read_bytes())
    assert uploaded["signature_verified"] is True and uploaded["size"] == release.payload.stat().st_size
    server.api("PUT", f"{APP}/channels/stable", {"version": "2.0.0"})
    # The server's download URL is stable and serves ranges (update-engine resumes with Range).
    request = urllib.request.Request(uploaded["url"], headers={"Range": "bytes=4-11"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 206 and response.read() == release.payload.read_bytes()[4:12]
    node = make_node_root(tmp_path / "root", version="1.0.0", server=server.omaha_url, group="stable")
    disk = make_usr_disk(tmp_path / "disk.img")

    result = run_once(node, disk, keys.public)

    assert result.returncode == 0, result.stderr
    assert "UPDATE_STATUS_UPDATED_NEED_REBOOT" in result.stdout
    image = release.image.read_bytes()
    assert partition_bytes(disk, USR_B)[: len(image)] == image
    assert cgpt_flags(disk, USR_B) == (2, 1, 0)
    installed = wait_for_status(server, node.machine_id, "Installed")
    assert installed["granted_version"] == "2.0.0"
    events = [(e["type"], e["result"]) for e in installed["events"]]
    assert events == [(3, 1), (14, 1), (13, 1)]

    # "Reboot" into 2.0.0: the first check from the new version sends 3/2 with the previous version.
    node.set_version("2.0.0")
    node.new_boot()
    shutil.rmtree(node.run_dir)
    again = run_once(node, disk, keys.public)
    assert again.returncode == 0, again.stderr
    complete = wait_for_status(server, node.machine_id, "Complete")
    assert complete["version"] == "2.0.0"
    groups = {g["name"]: g for g in server.api("GET", f"{APP}/groups")}
    assert groups["stable"]["rollout"]["granted"] == 1 and groups["stable"]["rollout"]["completed"] == 1
    kinds = [a["kind"] for a in server.api("GET", "/activity")]
    assert "rollout-started" in kinds


def test_a_paused_group_and_an_unknown_group_get_no_update(
    tmp_path: Path, server: CoreUpdateServer, keys: Keys, release: Release
) -> None:
    server.api("PUT", f"{APP}/packages/2.0.0/payload", raw=release.payload.read_bytes())
    server.api("PUT", f"{APP}/channels/stable", {"version": "2.0.0"})
    server.api("POST", f"{APP}/groups/stable/pause", {"reason": "change freeze"})
    disk = make_usr_disk(tmp_path / "disk.img")
    for group in ("stable", "no-such-group"):
        node = make_node_root(tmp_path / group, version="1.0.0", server=server.omaha_url, group=group)
        result = run_once(node, disk, keys.public)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "UPDATE_STATUS_IDLE"
    server.wait_for_log("names group 'no-such-group', which application")
