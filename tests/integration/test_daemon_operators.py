"""What operators meet first, with the real ``update_engine`` daemon and ``update_engine_client`` on a private bus:
what the daemon says at start-up, the last error in ``-status``, the journal during a download, who called, and
``-watch_for_updates`` and ``-reset_status`` telling the truth."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from dbus_fast.aio import MessageBus

from sim.bus import PrivateBus
from sim.devserver import DevServerProcess
from sim.disks import make_usr_disk
from sim.node import NodeRoot, make_node_root
from sim.payload import Keys
from sim.ports import free_port
from sim.tools import VENV_BIN
from tests.integration.test_daemon import (
    Daemon,
    bus,
    call,
    connect,
    devserver,
    make_daemon,
    release,
    subscribe,
    wait_for_owner,
)

__all__ = ["bus", "devserver", "release"]  # fixtures used by name below

CLIENT = str(VENV_BIN / "update_engine_client")
WAIT = 60.0  # bound on any one wait; passing runs take a fraction of it


def client(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLIENT, *args, "--bus-address", daemon.args[2]], capture_output=True, text=True,
                          timeout=WAIT)


async def until_logged(daemon: Daemon, text: str) -> None:
    async with asyncio.timeout(WAIT):
        while text not in daemon.log():
            await asyncio.sleep(0.05)


@pytest.fixture
async def started(tmp_path: Path, bus: PrivateBus) -> AsyncIterator[tuple[MessageBus, list[Daemon]]]:
    """A client connection; the test appends the daemons it starts, stopped at the end."""
    bus_client = await connect(bus)
    daemons: list[Daemon] = []
    try:
        yield bus_client, daemons
    finally:
        for daemon in daemons:
            daemon.stop()
        bus_client.disconnect()


async def start(started: tuple[MessageBus, list[Daemon]], daemon: Daemon) -> Daemon:
    bus_client, daemons = started
    daemons.append(daemon)
    daemon.start()
    await wait_for_owner(bus_client, daemon)
    return daemon


async def test_start_up_names_what_it_uses_and_warns_about_what_is_missing(
    tmp_path: Path, bus: PrivateBus, keys: Keys, started: tuple[MessageBus, list[Daemon]]
) -> None:
    """Before, a node without a key, an update.conf or a release file started silently, and the missing key showed
    up as error 18 when an update was finally offered."""
    node = make_node_root(tmp_path / "root")
    (node.root / "etc/coreos/update.conf").unlink()
    (node.root / "usr/share/coreos/release").unlink()
    daemon = make_daemon(tmp_path, node, make_usr_disk(tmp_path / "disk.img"), bus, keys)
    missing_key = tmp_path / "no-such-key.pem"
    daemon.args[daemon.args.index("--public-key") + 1] = str(missing_key)
    await start(started, daemon)
    await until_logged(daemon, "No release file")
    log = daemon.log()
    assert re.search(
        r"update-engine \S+: server https://public\.update\.flatcar-linux\.net/v1/update/ \(default\), group stable "
        r"\(default\), running version 0\.0\.0 \(default\), board amd64-usr \(default\), app id "
        rf"\{{e96281a6-d1af-4bde-9a0a-97b76e56dc57\}} \(default\), payload key {re.escape(str(missing_key))} "
        r"\(missing\)", log), log
    warnings = [line for line in log.splitlines() if " WARNING " in line]
    assert any(f"No payload signing key: {missing_key}: No such file or directory" in line for line in warnings)
    assert any("No update.conf (/etc/coreos/update.conf," in line for line in warnings)
    assert any("No release file names COREOS_RELEASE_VERSION or FLATCAR_RELEASE_VERSION" in line for line in warnings)

    status = client(daemon, "-status", "--json")
    assert status.returncode == 0, status.stderr
    document = json.loads(status.stdout)
    assert [w.split(":")[0] for w in document["warnings"]] == [
        "No payload signing key", "No update.conf (/etc/coreos/update.conf, /etc/flatcar/update.conf, "
        "/usr/share/coreos/update.conf, /usr/share/flatcar/update.conf)", "No release file names "
        "COREOS_RELEASE_VERSION or FLATCAR_RELEASE_VERSION (/usr/share/coreos/release, /usr/share/flatcar/release)",
    ]
    assert document["settings"]["public_key"] == str(missing_key)


async def test_the_last_error_is_in_status_and_a_refused_connection_says_so(
    tmp_path: Path, bus: PrivateBus, keys: Keys, started: tuple[MessageBus, list[Daemon]]
) -> None:
    """Before, the last error was only in the journal, and a refused http:// server was "… ssl:default"."""
    port = free_port()
    node = make_node_root(tmp_path / "root", server=f"http://127.0.0.1:{port}/v1/update/")
    daemon = await start(started, make_daemon(tmp_path, node, make_usr_disk(tmp_path / "disk.img"), bus, keys))
    assert client(daemon, "-status").stdout.endswith("NEW_SIZE=0\nLAST_ERROR=\n")
    assert client(daemon, "-update").returncode == 1

    status = client(daemon, "-status")
    lines = status.stdout.splitlines()
    assert [line.split("=")[0] for line in lines] == [
        "LAST_CHECKED_TIME", "PROGRESS", "CURRENT_OP", "NEW_VERSION", "NEW_SIZE", "LAST_ERROR",
    ]
    reason = f"Omaha server 127.0.0.1:{port} unreachable: connection refused"
    assert re.fullmatch(rf"LAST_ERROR='2000 OMAHA_REQUEST_HTTP_RESPONSE_BASE at \d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\dZ: "
                        rf"{re.escape(reason)}'", lines[-1]), lines[-1]
    # The block is meant to be eval'ed by shell scripts, the new line too.
    shell = subprocess.run(["sh", "-c", 'eval "$1"; printf "%s|%s" "$CURRENT_OP" "$LAST_ERROR"', "sh",
                            status.stdout], capture_output=True, text=True, timeout=WAIT)
    assert shell.stdout.startswith("UPDATE_STATUS_IDLE|2000 OMAHA_REQUEST_HTTP_RESPONSE_BASE at ")

    document = json.loads(client(daemon, "-status", "--json").stdout)
    attempt = document["last_attempt"]
    assert (attempt["result"], attempt["error_code"], attempt["error_name"], attempt["reason"]) == (
        "failed", 2000, "OMAHA_REQUEST_HTTP_RESPONSE_BASE", reason,
    )
    assert "ssl:default" not in daemon.log()


async def test_a_download_is_followed_in_the_journal_with_the_caller_named(
    tmp_path: Path, bus: PrivateBus, keys: Keys, devserver: DevServerProcess,
    started: tuple[MessageBus, list[Daemon]],
) -> None:
    """Before, the journal was silent from "Downloading" to "Download complete", and callers were bus names."""
    node = make_node_root(tmp_path / "root", server=devserver.url)
    daemon = await start(started, make_daemon(tmp_path, node, make_usr_disk(tmp_path / "disk.img"), bus, keys))
    proc = subprocess.Popen([CLIENT, "-update", "--bus-address", daemon.args[2]], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    assert proc.wait(timeout=WAIT) == 0
    log = daemon.log()
    assert re.search(rf"AttemptUpdate from uid 0 pid {proc.pid} \(:\d+\.\d+\) in UPDATE_STATUS_IDLE", log), log
    progress = re.findall(r"Downloaded (\d+)% \([\d.]+ [KM]iB of [\d.]+ MiB\) at [\d.]+ [KM]?i?B/s, about \S+ left",
                          log)
    assert progress and [int(p) for p in progress] == sorted(int(p) for p in progress), log
    assert re.search(r"Download complete: [\d.]+ MiB in [\d.]+m?s \([\d.]+ [KMG]?i?B/s\), 0 resumes", log), log


async def test_watch_shows_the_status_at_once_and_ends_when_update_engine_stops(
    tmp_path: Path, bus: PrivateBus, keys: Keys, started: tuple[MessageBus, list[Daemon]]
) -> None:
    """Before, -watch_for_updates printed nothing until the status changed, and waited forever for a daemon
    that had gone."""
    node = make_node_root(tmp_path / "root", server=f"http://127.0.0.1:{free_port()}/v1/update/")
    daemon = await start(started, make_daemon(tmp_path, node, make_usr_disk(tmp_path / "disk.img"), bus, keys))
    watcher = await asyncio.create_subprocess_exec(
        CLIENT, "-watch_for_updates", "--bus-address", daemon.args[2],
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert watcher.stderr is not None
        first = await asyncio.wait_for(watcher.stderr.readuntil(b"  new_size: 0\n"), WAIT)
        assert b"Got status update:\n" in first and b"  current_operation: UPDATE_STATUS_IDLE\n" in first
        daemon.stop()
        assert await asyncio.wait_for(watcher.wait(), WAIT) == 1
        rest = await watcher.stderr.read()
        assert b"update-engine left the bus (com.coreos.update1 has no owner any more)" in rest
    finally:
        if watcher.returncode is None:
            watcher.kill()
            await watcher.wait()


async def test_reset_after_a_rollback_speaks_of_the_rollback(
    tmp_path: Path, bus: PrivateBus, keys: Keys, started: tuple[MessageBus, list[Daemon]]
) -> None:
    """Before, -reset_status said it disarmed "the installed update" when it cancelled a rollback."""
    node: NodeRoot = make_node_root(tmp_path / "root", server=f"http://127.0.0.1:{free_port()}/v1/update/")
    disk = make_usr_disk(tmp_path / "disk.img")
    subprocess.run(["cgpt", "add", "-i", "4", "-S", "1", "-P", "0", "-T", "0", str(disk)], check=True)
    daemon = await start(started, make_daemon(tmp_path, node, disk, bus, keys))
    assert client(daemon, "-rollback").returncode == 0
    reset = client(daemon, "-reset_status")
    assert reset.returncode == 0, reset.stderr
    assert "The rollback is cancelled" in reset.stderr and "installed update" not in reset.stderr
    assert re.search(r"ResetStatus from uid 0 pid \d+ \(:\d+\.\d+\) done", daemon.log())


async def test_get_status_details_is_a_dictionary_on_the_wire(
    tmp_path: Path, bus: PrivateBus, keys: Keys, started: tuple[MessageBus, list[Daemon]]
) -> None:
    node = make_node_root(tmp_path / "root", server=f"http://127.0.0.1:{free_port()}/v1/update/")
    daemon = await start(started, make_daemon(tmp_path, node, make_usr_disk(tmp_path / "disk.img"), bus, keys))
    bus_client, _ = started
    recorder = await subscribe(bus_client)
    await call(bus_client, "AttemptUpdate")
    await recorder.wait_for("IDLE")
    reply = await call(bus_client, "GetStatusDetails")
    assert reply.signature == "a{sv}", reply.body
    entries = {name: variant.value for name, variant in reply.body[0].items()}
    assert entries["current_operation"] == "UPDATE_STATUS_IDLE"
    assert entries["last_attempt_result"] == "failed" and entries["last_error_code"] == 2000
    assert entries["group"] == "stable" and entries["current_version"] == "1.0.0"
    assert reply.body[0]["warnings"].signature == "as"
    assert daemon.process is not None and daemon.process.poll() is None
