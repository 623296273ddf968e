"""update-engine's metrics, scraped from the Unix socket of the real daemon on a private bus and parsed with
``prometheus_client``'s own parser; the textfile for node_exporter; a socket path taken by something else."""

from __future__ import annotations

import asyncio
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from dbus_fast.aio import MessageBus
from prometheus_client.parser import text_string_to_metric_families

from sim.bus import PrivateBus
from sim.devserver import DevServerProcess
from sim.disks import make_usr_disk
from sim.node import make_node_root
from sim.payload import Keys, Release
from sim.ports import free_port
from sim.tools import VENV_BIN
from tests.integration.test_daemon import Daemon, bus, devserver, get_status, make_daemon, release
from tests.integration.test_daemon_operators import start, started

__all__ = ["bus", "devserver", "release", "started"]  # fixtures used by name below

WAIT = 60.0

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: a Unix socket's path must fit in 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="ue-metrics-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def scrape_text(path: Path) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(WAIT)
        sock.connect(str(path))
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def parse(text: str) -> tuple[Samples, dict[str, str]]:
    """Every sample by (name, labels), and every family's HELP, as Prometheus' parser reads them."""
    samples: Samples = {}
    helps: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        helps[family.name] = family.documentation
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples, helps


def value(samples: Samples, metric: str, **labels: str) -> float:
    return samples[(metric, tuple(sorted(labels.items())))]


def metrics_daemon(tmp_path: Path, bus: PrivateBus, keys: Keys, server: str, short_dir: Path) -> Daemon:
    node = make_node_root(tmp_path / "root", server=server)
    daemon = make_daemon(tmp_path, node, make_usr_disk(tmp_path / "disk.img"), bus, keys)
    daemon.args += ["--metrics-socket", str(short_dir / "m.sock"), "--metrics-textfile", str(tmp_path / "ue.prom")]
    return daemon


def client(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VENV_BIN / "update_engine_client"), *args, "--bus-address", daemon.args[2]],
                          capture_output=True, text=True, timeout=WAIT)


async def test_a_scrape_says_what_the_node_did(
    tmp_path: Path, bus: PrivateBus, keys: Keys, devserver: DevServerProcess, release: Release, short_dir: Path,
    started: tuple[MessageBus, list[Daemon]],
) -> None:
    daemon = await start(started, metrics_daemon(tmp_path, bus, keys, devserver.url, short_dir))
    sock = short_dir / "m.sock"
    assert stat.S_ISSOCK(sock.lstat().st_mode) and stat.S_IMODE(sock.lstat().st_mode) == 0o660

    samples, helps = parse(scrape_text(sock))
    assert all(name.startswith("update_engine_") and helps[name] for name in helps)
    assert value(samples, "update_engine_status", status="UPDATE_STATUS_IDLE") == 1
    assert sum(v for (name, _), v in samples.items() if name == "update_engine_status") == 1
    assert value(samples, "update_engine_booted_slot_info", slot="USR-A") == 1
    assert value(samples, "update_engine_payload_downloaded_bytes_total") == 0
    assert value(samples, "update_engine_checks_total", result="updated") == 0
    assert value(samples, "update_engine_last_check_timestamp_seconds") == 0

    assert client(daemon, "-update").returncode == 0
    samples, _ = parse(scrape_text(sock))
    size = release.payload.stat().st_size
    assert value(samples, "update_engine_status", status="UPDATE_STATUS_UPDATED_NEED_REBOOT") == 1
    assert value(samples, "update_engine_payload_downloaded_bytes_total") == size
    assert value(samples, "update_engine_checks_total", result="updated") == 1
    assert value(samples, "update_engine_last_attempt_result", result="updated") == 1
    assert value(samples, "update_engine_last_update_info", version="2.0.0") == 1
    assert value(samples, "update_engine_last_update_timestamp_seconds") > 1.7e9
    assert value(samples, "update_engine_last_check_timestamp_seconds") > 1.7e9
    assert value(samples, "update_engine_apply_duration_seconds") > 0
    assert value(samples, "update_engine_reboot_pending") == 1
    assert value(samples, "update_engine_rollback_detected") == 0
    assert not [key for key in samples if key[0] == "update_engine_errors_total"]

    # The textfile follows, for node_exporter (its writes are coalesced to one a second).
    textfile = tmp_path / "ue.prom"
    async with asyncio.timeout(WAIT):
        while 'update_engine_status{status="UPDATE_STATUS_UPDATED_NEED_REBOOT"} 1' not in (
            textfile.read_text() if textfile.exists() else ""
        ):
            await asyncio.sleep(0.1)
    assert parse(textfile.read_text())[0].keys() == samples.keys()


async def test_errors_are_counted_by_code(
    tmp_path: Path, bus: PrivateBus, keys: Keys, short_dir: Path, started: tuple[MessageBus, list[Daemon]],
) -> None:
    daemon = await start(started, metrics_daemon(tmp_path, bus, keys, f"http://127.0.0.1:{free_port()}/v1/update/",
                                                 short_dir))
    for _ in range(2):
        assert client(daemon, "-update").returncode == 1
    samples, _ = parse(scrape_text(short_dir / "m.sock"))
    assert value(samples, "update_engine_errors_total", code="2000", name="OMAHA_REQUEST_HTTP_RESPONSE_BASE") == 2
    assert value(samples, "update_engine_checks_total", result="failed") == 2
    assert value(samples, "update_engine_last_attempt_error_code") == 2000
    assert value(samples, "update_engine_last_attempt_result", result="failed") == 1


async def test_a_socket_path_taken_by_something_else_is_named_and_the_daemon_runs_on(
    tmp_path: Path, bus: PrivateBus, keys: Keys, short_dir: Path, started: tuple[MessageBus, list[Daemon]],
) -> None:
    taken = short_dir / "m.sock"
    taken.write_text("not a socket\n")
    daemon = await start(started, metrics_daemon(tmp_path, bus, keys, "disabled", short_dir))
    bus_client, _ = started
    assert (await get_status(bus_client))[2] == "UPDATE_STATUS_IDLE"
    assert (f"metrics socket path {taken} exists and is not a socket: remove it or choose another path; metrics "
            "are not served on a socket") in daemon.log()
    assert taken.read_text() == "not a socket\n"
    assert daemon.process is not None and daemon.process.poll() is None



async def test_the_default_socket_is_in_the_run_directory_and_none_turns_it_off(
    tmp_path: Path, bus: PrivateBus, keys: Keys, started: tuple[MessageBus, list[Daemon]],
) -> None:
    run_dir = Path(tempfile.mkdtemp(prefix="ue-run-", dir="/tmp"))  # short: a socket path must fit in 108 bytes
    try:
        node = make_node_root(tmp_path / "root", server="disabled")
        daemon = make_daemon(tmp_path, node, make_usr_disk(tmp_path / "disk.img"), bus, keys)
        daemon.args[daemon.args.index("--run-dir") + 1] = str(run_dir)
        await start(started, daemon)
        assert parse(scrape_text(run_dir / "metrics.promsock"))[0]
        daemon.stop()
        assert not (run_dir / "metrics.promsock").exists()  # removed on the way out
        daemon.args += ["--metrics-socket", "none"]
        await start(started, daemon)
        assert not (run_dir / "metrics.promsock").exists()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
