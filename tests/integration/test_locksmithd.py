"""The real locksmithd on a private system-like bus, with real etcd and logind/update-engine stand-ins.

Each "node" is a private dbus-daemon with the update-engine and logind stand-ins on it, plus a config root
holding its machine id; locksmithd runs as a subprocess with ``--bus-address`` and ``--config-root``.  Retry
delays are shortened through ``LOCKSMITHD_BACKOFF_INITIAL``/``_MAX`` so every wait stays short and bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from coreos_common.status import StatusSnapshot, UpdateStatus
from locksmithd import __version__, ctl
from locksmithd.login1 import USER_PROCESS, UTMP_RECORD
from locksmithd.semaphore import HolderRecord
from sim.bus import PrivateBus, start_private_bus
from sim.etcd import EtcdCluster
from sim.ports import free_port
from sim.standins.login1 import Login1StandIn, start_login1
from sim.standins.systemd import start_systemd_standin
from sim.standins.update_engine import (
    UpdateEngineStandIn,
    emit_from_other_connection,
    policy_files,
    status_of,
)
from tests.conftest import require_tool
from tests.fixtures.etcd import start_cluster

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
WAIT = 30.0  # upper bound for any single wait; passing runs take a fraction of it
SEMAPHORE_KEY = "coreos.com/updateengine/rebootlock/semaphore"
IDLE = status_of(UpdateStatus.IDLE)
NEED_REBOOT = status_of(UpdateStatus.UPDATED_NEED_REBOOT, "3975.2.1", 123456)
DOWNLOADING = status_of(UpdateStatus.DOWNLOADING, "3975.2.1", 123456)


class Locksmithd:
    """One locksmithd subprocess; its log (stderr) is collected line by line for ``wait_for_log``."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.args = args
        self.env = env
        self.process: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self._new_line = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> Locksmithd:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "locksmithd.daemon", *self.args,
            env=self.env, cwd=REPO, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        while line := await self.process.stderr.readline():
            self.lines.append(line.decode(errors="replace").rstrip("\n"))
            self._new_line.set()
        self._new_line.set()

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    async def wait_for_log(self, text: str, timeout: float = WAIT) -> str:
        """The first log line containing ``text``; fails with the whole log if it does not come in time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for line in self.lines:
                if text in line:
                    return line
            remaining = deadline - loop.time()
            if remaining <= 0 or (self._reader is not None and self._reader.done()):
                pytest.fail(f"locksmithd never logged {text!r}; its log:\n{self.log}")
            self._new_line.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new_line.wait(), remaining)

    async def wait_exit(self, timeout: float = WAIT) -> int:
        assert self.process is not None
        code = await asyncio.wait_for(self.process.wait(), timeout)
        if self._reader is not None:
            await asyncio.wait_for(self._reader, timeout)
        return code

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def stop(self) -> int:
        """SIGTERM and wait; SIGKILL if it does not exit in time."""
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return await self.wait_exit(10)
            except TimeoutError:
                self.process.kill()
        return await self.wait_exit(10)


def base_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LOCKSMITHD_", "REBOOT_", "NOTIFY_SOCKET", "WATCHDOG_", "DBUS_"))
    }
    env.update(
        TZ="UTC", LOCKSMITHD_BACKOFF_INITIAL="100ms", LOCKSMITHD_BACKOFF_MAX="400ms", PYTHONUNBUFFERED="1"
    )
    env.update(extra)
    return env


@dataclass
class Node:
    """A machine: its own bus with update-engine and logind stand-ins, a config root, and its daemons."""

    name: str
    workdir: Path
    machine_id: str
    bus: PrivateBus | None = None
    update_engine: UpdateEngineStandIn | None = None
    logind: Login1StandIn | None = None
    daemons: list[Locksmithd] = field(default_factory=list)

    @property
    def root(self) -> Path:
        return self.workdir / "root"

    @property
    def reboots(self) -> list[bool]:
        assert self.logind is not None
        return self.logind.manager.reboots

    async def setup(self, status: StatusSnapshot = IDLE, logind_failures: int = 0) -> Node:
        (self.root / "etc").mkdir(parents=True)
        (self.root / "etc/machine-id").write_text(self.machine_id + "\n")
        self.bus = start_private_bus(self.workdir / "dbus", policy_files(self.workdir / "policy"))
        self.update_engine = await UpdateEngineStandIn(self.bus.address, status).start()
        self.logind = await start_login1(self.bus.address, fail_times=logind_failures)
        return self

    async def locksmithd(self, *args: str, **env: str) -> Locksmithd:
        assert self.bus is not None
        daemon = Locksmithd(
            ["--bus-address", self.bus.address, "--config-root", str(self.root), *args], base_env(**env)
        )
        self.daemons.append(daemon)
        return await daemon.start()

    async def wait_for_reboot(self, timeout: float = WAIT) -> None:
        assert self.logind is not None
        await asyncio.wait_for(self.logind.manager.called.wait(), timeout)

    def coordinator_state(self) -> str:
        return (self.root / "run/update-engine/coordinator.conf").read_text()

    async def teardown(self) -> None:
        for daemon in self.daemons:
            if daemon.process is not None:
                await daemon.stop()
        if self.update_engine is not None:
            await self.update_engine.stop()
        if self.logind is not None:
            self.logind.stop()
        if self.bus is not None:
            self.bus.stop()


@pytest.fixture
async def nodes(tmp_path: Path) -> AsyncIterator[dict[str, Node]]:
    require_tool("dbus-daemon")
    made: dict[str, Node] = {}
    ids = {"a": "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "b": "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"}
    for name, machine_id in ids.items():
        made[name] = Node(name, tmp_path / f"node-{name}", machine_id)
    try:
        yield made
    finally:
        for node in made.values():
            await node.teardown()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()


async def wait_until(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    """One real etcd member on a free loopback port."""
    cluster = start_cluster(1, tmp_path / "etcd")
    try:
        yield cluster
    finally:
        cluster.stop_all()


def semaphore(cluster: EtcdCluster) -> dict[str, object]:
    raw = cluster.get(SEMAPHORE_KEY)
    assert raw is not None
    value = json.loads(raw)
    assert isinstance(value, dict)
    return value


# ------------------------------------------------------------------------------------------------------------
# reboot strategy: the whole path, sd_notify, coordinator file, logind refusal, sessions, second instance


async def test_reboot_strategy(nodes: dict[str, Node], notify_socket: socket.socket, tmp_path: Path) -> None:
    node = await nodes["a"].setup(logind_failures=1)
    (node.root / "run").mkdir()
    (node.root / "dev/pts").mkdir(parents=True)
    (node.root / "dev/pts/0").write_text("")
    record = UTMP_RECORD.pack(
        USER_PROCESS, 4242, b"pts/0", b"ts/0", b"core", b"", 0, 0, 0, 0, 0, 0, 0, 0, 0, b""
    )
    (node.root / "run/utmp").write_bytes(record)
    daemon = await node.locksmithd(
        "--strategy",
        "reboot",
        NOTIFY_SOCKET=str(tmp_path / "notify.sock"),
        WATCHDOG_USEC="60000000",
        LOCKSMITHD_SESSION_GRACE="300ms",
    )
    await daemon.wait_for_log('locksmithd starting currentOperation="UPDATE_STATUS_IDLE" strategy="reboot"')
    loop = asyncio.get_running_loop()
    notified: set[bytes] = set()
    while not {b"READY=1", b"WATCHDOG=1"} <= notified or not any(m.startswith(b"STATUS=") for m in notified):
        notified.add(await asyncio.wait_for(loop.sock_recv(notify_socket, 4096), WAIT))
    assert "STATE=running" in node.coordinator_state()

    second = await node.locksmithd("--strategy", "reboot")
    assert await second.wait_exit() == 1
    assert "unable to become 'update coordinator'" in second.log

    assert node.update_engine is not None
    await node.update_engine.set_status(NEED_REBOOT)
    await node.wait_for_reboot()
    assert node.reboots == [False]
    assert "Logins detected on pts/0, delaying reboot for 300ms." in daemon.log
    assert "System reboot in 1 minute!" in (node.root / "dev/pts/0").read_text()
    assert "logind refused to reboot: org.freedesktop.login1.OperationInProgress" in daemon.log
    await wait_until(lambda: "STATE=rebooting" in node.coordinator_state(), "STATE=rebooting")
    assert node.coordinator_state() == "NAME=locksmithd\nSTRATEGY=reboot\nSTATE=rebooting\n"
    assert daemon.running  # never exits after asking for the reboot
    assert await daemon.stop() == 0
    assert "locksmithd is exiting" in daemon.log
    assert node.reboots == [False]


async def test_need_reboot_at_start_acts_at_once(nodes: dict[str, Node]) -> None:
    node = await nodes["a"].setup(status=NEED_REBOOT)
    daemon = await node.locksmithd(REBOOT_STRATEGY="reboot")
    await node.wait_for_reboot()
    assert node.reboots == [False]
    assert "No configured reboot window" in daemon.log


async def test_closed_window_postpones_the_reboot(nodes: dict[str, Node]) -> None:
    node = await nodes["a"].setup(status=NEED_REBOOT)
    opens = (datetime.now(UTC) + timedelta(hours=3)).replace(second=0, microsecond=0)
    daemon = await node.locksmithd(
        REBOOT_STRATEGY="reboot", REBOOT_WINDOW_START=opens.strftime("%a %H:%M"), REBOOT_WINDOW_LENGTH="30m"
    )
    line = await daemon.wait_for_log("Next window begins at")
    assert f"Next window begins at {opens:%Y-%m-%d %H:%M:%S} +0000 UTC" in line
    await daemon.wait_for_log("to reboot.")
    assert "STATE=reboot-planned" in node.coordinator_state()
    assert node.reboots == []


async def test_several_windows_in_a_time_zone_are_logged_and_waited_for(nodes: dict[str, Node]) -> None:
    node = await nodes["a"].setup(status=NEED_REBOOT)
    tokyo = ZoneInfo("Asia/Tokyo")
    first = (datetime.now(tokyo) + timedelta(hours=5)).replace(second=0, microsecond=0)
    second = first + timedelta(hours=30)
    text = f"{first:%a %H:%M} 30m; {second:%a %H:%M} 1h"
    daemon = await node.locksmithd(
        REBOOT_STRATEGY="reboot", REBOOT_WINDOWS=text, REBOOT_WINDOW_TIMEZONE="Asia/Tokyo"
    )
    line = await daemon.wait_for_log("the next one opens at")
    assert f'Reboot windows are "{text}" (time zone Asia/Tokyo)' in line
    assert f"{first:%Y-%m-%d %H:%M:%S} +0900 JST" in line
    await daemon.wait_for_log("to reboot.")
    assert f"Next window begins at {first:%Y-%m-%d %H:%M:%S} +0900 JST" in daemon.log
    assert node.reboots == []


async def test_malformed_status_update_is_ignored(nodes: dict[str, Node]) -> None:
    node = await nodes["a"].setup()
    daemon = await node.locksmithd(REBOOT_STRATEGY="reboot")
    await daemon.wait_for_log("locksmithd starting")
    assert node.update_engine is not None
    await node.update_engine.emit_raw("sdssx", ["0", 0.0, UpdateStatus.UPDATED_NEED_REBOOT.value, "1.0", 0])
    await node.update_engine.emit_raw("xdss", [0, 0.0, UpdateStatus.UPDATED_NEED_REBOOT.value, "1.0"])
    await daemon.wait_for_log("signature 'sdssx', expected 'xdssx'")
    await node.update_engine.set_status(DOWNLOADING)
    await daemon.wait_for_log('CurrentOperation="UPDATE_STATUS_DOWNLOADING"')
    # The second one came within a minute of the first: counted for the summary, not logged on its own.
    assert "signature 'xdss'" not in daemon.log
    assert node.reboots == []
    await node.update_engine.set_status(NEED_REBOOT)
    await node.wait_for_reboot()
    assert node.reboots == [False]


async def test_need_reboot_from_another_sender_is_ignored_unless_allowed(nodes: dict[str, Node]) -> None:
    node = await nodes["a"].setup()
    assert node.bus is not None and node.update_engine is not None
    daemon = await node.locksmithd(REBOOT_STRATEGY="reboot")
    await daemon.wait_for_log("locksmithd starting")
    forger = await emit_from_other_connection(node.bus.address, NEED_REBOOT)
    line = await daemon.wait_for_log(f"ignoring a StatusUpdate signal from {forger}")
    assert f"the owner is {node.update_engine.unique_name}" in line
    await node.update_engine.set_status(DOWNLOADING)
    await daemon.wait_for_log('CurrentOperation="UPDATE_STATUS_DOWNLOADING"')
    assert node.reboots == []
    await daemon.stop()

    trusting = await node.locksmithd(REBOOT_STRATEGY="reboot", LOCKSMITHD_ACCEPT_ANY_SENDER="true")
    await trusting.wait_for_log("locksmithd starting")
    await emit_from_other_connection(node.bus.address, NEED_REBOOT)
    await node.wait_for_reboot()
    assert node.reboots == [False]


async def test_off_exits_zero(tmp_path: Path) -> None:
    daemon = await Locksmithd(["--config-root", str(tmp_path)], base_env(REBOOT_STRATEGY="off")).start()
    assert await daemon.wait_exit() == 0
    assert 'Reboot strategy is "off" - locksmithd is exiting.' in daemon.log
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"REBOOT_STRATEGY": "sometimes"},
            "unknown reboot strategy 'sometimes'; valid: best-effort, etcd-lock",
        ),
        ({"REBOOT_WINDOW_START": "14", "REBOOT_WINDOW_LENGTH": "1h"}, "time '14' is not H:MM"),
        ({"REBOOT_WINDOW_START": "Thu 4:00"}, "Either both or neither"),
        ({"REBOOT_WINDOW_START": "Thu 4:00", "REBOOT_WINDOW_LENGTH": "0s"}, "'0s': must be at least 1s"),
        (
            {"REBOOT_WINDOWS": "Sat 22:00 3h", "REBOOT_WINDOW_START": "Thu 4:00", "REBOOT_WINDOW_LENGTH": "1h"},
            "REBOOT_WINDOWS (environment) and REBOOT_WINDOW_START (environment) and REBOOT_WINDOW_LENGTH "
            "(environment) both set reboot windows",
        ),
        ({"REBOOT_WINDOWS": "Sat 22:00 3h", "REBOOT_WINDOW_TIMEZONE": "Nowhere/City"}, "'Nowhere/City'"),
        ({"REBOOT_STRATEGY": "fleet-lock"}, "needs the FleetLock server's base URL"),
        (
            {"REBOOT_STRATEGY": "etcd-lock", "LOCKSMITHD_ETCD_CAFILE": "/nonexistent/ca.pem"},
            "/nonexistent/ca.pem",
        ),
    ],
)
async def test_bad_settings_exit_one_with_the_reason(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/machine-id").write_text("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n")
    daemon = await Locksmithd(["--config-root", str(tmp_path)], base_env(**env)).start()
    assert await daemon.wait_exit() == 1
    assert message in daemon.log


# ------------------------------------------------------------------------------------------------------------
# etcd-lock and best-effort against a real etcd


async def test_etcd_lock_lets_one_node_reboot_at_a_time(nodes: dict[str, Node], etcd: EtcdCluster) -> None:
    endpoint = etcd.endpoint(0)
    a, b = nodes["a"], nodes["b"]
    await a.setup()
    await b.setup()
    daemon_a = await a.locksmithd("--endpoint", endpoint, REBOOT_STRATEGY="etcd-lock")
    daemon_b = await b.locksmithd(REBOOT_STRATEGY="etcd-lock", LOCKSMITHD_ENDPOINT=endpoint)
    for daemon in (daemon_a, daemon_b):
        await daemon.wait_for_log("holds no reboot lock: nothing to release")

    assert a.update_engine is not None and b.update_engine is not None
    await a.update_engine.set_status(NEED_REBOOT)
    await a.wait_for_reboot()
    assert semaphore(etcd)["holders"] == [a.machine_id]
    await b.update_engine.set_status(NEED_REBOOT)
    await daemon_b.wait_for_log("waiting for a release")
    assert b.reboots == []

    # Node a "boots": a fresh locksmithd sees update-engine idle and gives the slot back.
    await daemon_a.stop()
    await a.update_engine.set_status(IDLE, emit=False)
    restarted = await a.locksmithd("--endpoint", endpoint, REBOOT_STRATEGY="etcd-lock")
    await restarted.wait_for_log("not waiting for boot-complete.target")
    await b.wait_for_reboot()
    assert b.reboots == [False]
    assert a.reboots == [False]
    assert semaphore(etcd)["holders"] == [b.machine_id]


async def test_best_effort_without_etcd_reboots_without_a_lock(nodes: dict[str, Node]) -> None:
    node = await nodes["a"].setup(status=NEED_REBOOT)
    nothing_there = f"http://127.0.0.1:{free_port()}"
    daemon = await node.locksmithd(LOCKSMITHD_ENDPOINT=nothing_there)
    await node.wait_for_reboot()
    assert f"best-effort: etcd does not answer at {nothing_there}: rebooting without a lock" in daemon.log


async def test_best_effort_with_etcd_takes_the_lock(nodes: dict[str, Node], etcd: EtcdCluster) -> None:
    node = await nodes["a"].setup(status=NEED_REBOOT)
    daemon = await node.locksmithd(LOCKSMITHD_ENDPOINT=etcd.endpoint(0))
    await node.wait_for_reboot()
    assert "best-effort: etcd answers at" in daemon.log
    assert semaphore(etcd)["holders"] == [node.machine_id]


# ------------------------------------------------------------------------------------------------------------
# fleet-lock against a small FleetLock server


@dataclass
class FleetLockServer:
    """One slot per group; records every request as (path, header, body)."""

    holder: str | None = None
    calls: list[tuple[str, str | None, dict[str, object]]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls.append((request.path, request.headers.get("fleet-lock-protocol"), body))
        self.changed.set()
        if request.headers.get("fleet-lock-protocol") != "true":
            return web.json_response({"kind": "missing_header", "value": "no protocol header"}, status=400)
        node_id = body["client_params"]["id"]
        if request.path.endswith("/v1/pre-reboot"):
            if self.holder not in (None, node_id):
                return web.json_response({"kind": "lock_held", "value": f"held by {self.holder}"}, status=423)
            self.holder = node_id
        elif self.holder == node_id:
            self.holder = None
        return web.Response(status=200)


@pytest.fixture
async def fleetlock_server() -> AsyncIterator[tuple[FleetLockServer, str]]:
    server = FleetLockServer()
    app = web.Application()
    app.router.add_post("/fleet/v1/pre-reboot", server.handle)
    app.router.add_post("/fleet/v1/steady-state", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield server, f"http://127.0.0.1:{port}/fleet"  # no trailing slash: locksmithd adds it
    finally:
        await runner.cleanup()


async def test_fleet_lock(nodes: dict[str, Node], fleetlock_server: tuple[FleetLockServer, str]) -> None:
    server, url = fleetlock_server
    server.holder = "another-node"
    node = await nodes["a"].setup(status=NEED_REBOOT)
    env = {
        "REBOOT_STRATEGY": "fleet-lock",
        "LOCKSMITHD_FLEETLOCK_URL": url,
        "LOCKSMITHD_FLEETLOCK_GROUP": "workers",
    }
    daemon = await node.locksmithd(**env)
    await daemon.wait_for_log("code 423, lock_held: held by another-node. Retrying in")
    assert node.reboots == []
    server.holder = None
    await node.wait_for_reboot()
    assert server.holder == node.machine_id
    path, header, body = server.calls[-1]
    assert (path, header) == ("/fleet/v1/pre-reboot", "true")
    assert body == {"client_params": {"id": node.machine_id, "group": "workers"}}

    await daemon.stop()
    assert node.update_engine is not None
    await node.update_engine.set_status(IDLE, emit=False)
    await node.locksmithd(**env)
    await wait_until(lambda: server.holder is None, "the FleetLock slot is released")
    assert server.calls[-1][0] == "/fleet/v1/steady-state"


# ------------------------------------------------------------------------------------------------------------
# releasing the lock waits for boot-complete.target when systemd has it queued

async def test_lock_is_released_only_after_boot_complete(
    nodes: dict[str, Node], fleetlock_server: tuple[FleetLockServer, str]
) -> None:
    server, url = fleetlock_server
    node = await nodes["a"].setup()
    server.holder = node.machine_id  # still held from before the reboot
    assert node.bus is not None
    systemd_bus, unit = await start_systemd_standin(node.bus.address)
    try:
        daemon = await node.locksmithd(REBOOT_STRATEGY="fleet-lock", LOCKSMITHD_FLEETLOCK_URL=url)
        await daemon.wait_for_log(
            "Waiting for boot-complete.target (now inactive) before releasing the reboot lock"
        )
        assert server.holder == node.machine_id and server.calls == []
        unit.state = "active"
        await wait_until(lambda: server.holder is None, "the lock is released after boot-complete.target")
        assert "boot-complete.target is active" in daemon.log
        assert [call[0] for call in server.calls] == ["/fleet/v1/steady-state"]
    finally:
        systemd_bus.disconnect()


# ------------------------------------------------------------------------------------------------------------
# update-engine coming and going


async def test_update_engine_appearing_later_and_restarting(nodes: dict[str, Node]) -> None:
    node = await nodes["a"].setup()
    assert node.bus is not None and node.update_engine is not None
    await node.update_engine.stop()
    daemon = await node.locksmithd(REBOOT_STRATEGY="reboot")
    await daemon.wait_for_log("Cannot get update engine status")
    node.update_engine = await UpdateEngineStandIn(node.bus.address, IDLE).start()
    await daemon.wait_for_log('locksmithd starting currentOperation="UPDATE_STATUS_IDLE"')
    # update-engine restarts already in NEED_REBOOT and says nothing: locksmithd asks it.
    await node.update_engine.stop()
    node.update_engine = await UpdateEngineStandIn(node.bus.address, NEED_REBOOT).start()
    await node.wait_for_reboot()
    assert node.reboots == [False]


# ------------------------------------------------------------------------------------------------------------
# the reboot path, visible: STATUS=, the state file, locksmithctl status --json


def state_of(node: Node) -> dict[str, object] | None:
    path = node.root / "run/locksmithd/state.json"
    try:
        value = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):  # absent, or (never, being renamed into place) half-read
        return None
    assert isinstance(value, dict)
    return value


async def wait_for_state(node: Node, phase: str, timeout: float = WAIT) -> dict[str, object]:
    found: dict[str, object] = {}

    def reached() -> bool:
        nonlocal found
        found = state_of(node) or {}
        return found.get("phase") == phase

    await wait_until(reached, f"the state file says {phase} (last: {found})", timeout)
    return found


async def test_waiting_for_the_lock_is_visible_in_status_the_state_file_and_locksmithctl(
    nodes: dict[str, Node], etcd: EtcdCluster, notify_socket: socket.socket, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    other = "cccccccccccccccccccccccccccccccc"
    etcd.put(SEMAPHORE_KEY, json.dumps({"semaphore": 0, "max": 1, "holders": [other]}, separators=(",", ":")))
    node = await nodes["b"].setup(status=NEED_REBOOT)
    await node.locksmithd(
        REBOOT_STRATEGY="etcd-lock", LOCKSMITHD_ENDPOINT=etcd.endpoint(0), NOTIFY_SOCKET=str(tmp_path / "notify.sock")
    )
    state = await wait_for_state(node, "waiting-for-lock")
    await wait_until(lambda: (state_of(node) or {}).get("position") == 1, "the state file shows the place in line")
    state = state_of(node) or {}
    assert state["holders"] == [other] and state["state"] == "reboot-planned" and state["strategy"] == "etcd-lock"
    assert state["version"] == "3975.2.1" and state["machine_id"] == node.machine_id
    since = datetime.fromisoformat(str(state["since"]))
    assert abs((datetime.now(UTC) - since).total_seconds()) < WAIT
    assert "STATE=reboot-planned" in node.coordinator_state()

    loop = asyncio.get_running_loop()
    status = ""
    while "1st in line" not in status:
        message = (await asyncio.wait_for(loop.sock_recv(notify_socket, 4096), WAIT)).decode()
        status = next((line for line in message.splitlines() if line.startswith("STATUS=")), status)
    assert status.startswith("STATUS=Reboot planned: waiting for the reboot lock since ")
    assert status.endswith(f"1st in line (1 waiting); held by {other}")

    code = ctl.main(["-endpoint", etcd.endpoint(0), "-config-root", str(node.root), "status", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    local = json.loads(out)["local"]
    assert local["phase"] == "waiting-for-lock" and local["position"] == 1 and local["holders"] == [other]

    assert ctl.main(["-endpoint", etcd.endpoint(0), "unlock", other]) == 0
    await node.wait_for_reboot()
    await wait_until(lambda: (state_of(node) or {}).get("state") == "rebooting", "logind's acceptance is published")
    state = state_of(node) or {}
    assert state["phase"] == "rebooting" and state["accepted_at"]
    assert semaphore(etcd)["holders"] == [node.machine_id]


async def test_a_node_whose_logind_is_gone_gives_its_slot_back_and_takes_it_again_when_logind_returns(
    nodes: dict[str, Node], etcd: EtcdCluster
) -> None:
    node = await nodes["a"].setup()
    assert node.logind is not None and node.bus is not None and node.update_engine is not None
    node.logind.stop()
    await asyncio.wait_for(node.logind.bus.wait_for_disconnect(), WAIT)  # type: ignore[no-untyped-call]
    daemon = await node.locksmithd(
        REBOOT_STRATEGY="etcd-lock", LOCKSMITHD_ENDPOINT=etcd.endpoint(0), LOCKSMITHD_REBOOT_ATTEMPTS="2"
    )
    await daemon.wait_for_log("holds no reboot lock: nothing to release")
    await node.update_engine.set_status(NEED_REBOOT)
    await daemon.wait_for_log("logind refused to reboot: org.freedesktop.DBus.Error.ServiceUnknown")
    line = await daemon.wait_for_log("Gave the lock back: logind kept refusing to reboot.")
    assert "then taking the lock again" in line
    state = await wait_for_state(node, "waiting-for-logind-without-lock")
    assert semaphore(etcd)["holders"] == []  # no slot of the fleet held while logind cannot reboot
    await daemon.wait_for_log("logind cannot reboot yet: org.freedesktop.login1 is not on the bus")
    assert state["state"] == "reboot-planned"

    node.logind = await start_login1(node.bus.address)
    await node.wait_for_reboot()
    await daemon.wait_for_log("logind can reboot again: taking the reboot path from the window")
    assert semaphore(etcd)["holders"] == [node.machine_id]
    assert node.reboots == [False]


async def test_a_node_whose_logind_refuses_gives_its_slot_back_before_asking_again(
    nodes: dict[str, Node], etcd: EtcdCluster
) -> None:
    node = await nodes["a"].setup(status=NEED_REBOOT, logind_failures=3)
    daemon = await node.locksmithd(
        REBOOT_STRATEGY="etcd-lock", LOCKSMITHD_ENDPOINT=etcd.endpoint(0), LOCKSMITHD_REBOOT_ATTEMPTS="2"
    )
    await node.wait_for_reboot()
    assert node.logind is not None and len(node.logind.manager.refused) == 3
    lines = daemon.lines
    gave_back = next(i for i, line in enumerate(lines) if "Gave the lock back: logind kept refusing to reboot" in line)
    released = next(i for i, line in enumerate(lines) if f"Released the lock of {node.machine_id}" in line)
    taken_again = [i for i, line in enumerate(lines) if f"Lock taken for {node.machine_id}" in line]
    # Two refusals, the slot released, logind asked whether it can reboot, the slot taken again, one more
    # refusal (retried with the slot held this time), then the reboot.
    assert released < gave_back < taken_again[-1] and len(taken_again) == 2
    assert sum("logind refused to reboot: org.freedesktop.login1.OperationInProgress" in line for line in lines) == 2
    assert any("logind kept refusing to reboot (refused 2 times in a row, last: org.freedesktop.login1."
               "OperationInProgress" in line for line in lines)
    assert semaphore(etcd)["holders"] == [node.machine_id]


# ------------------------------------------------------------------------------------------------------------
# hooks around the reboot


def write_hook(directory: Path, name: str, body: str, mode: int = 0o755) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    path = directory / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(mode)
    return path


def hook_dirs(node: Node) -> tuple[Path, Path]:
    return node.root / "etc/locksmithd/pre-reboot.d", node.root / "etc/locksmithd/post-reboot.d"


async def test_pre_reboot_hooks_run_with_the_lock_held_and_their_context(
    nodes: dict[str, Node], etcd: EtcdCluster
) -> None:
    node = await nodes["a"].setup(status=NEED_REBOOT)
    pre, _ = hook_dirs(node)
    out = node.workdir / "hook-out"
    out.mkdir()
    write_hook(pre, "10-drain", f'env | grep ^LOCKSMITHD_HOOK | sort > {out}/env\necho "draining $(hostname)"\n')
    write_hook(pre, "20-record", f"cat {out}/env > /dev/null && echo second > {out}/order\n")
    daemon = await node.locksmithd(
        REBOOT_STRATEGY="etcd-lock", LOCKSMITHD_ENDPOINT=etcd.endpoint(0), LOCKSMITHD_GROUP="workers",
        LOCKSMITHD_ETCD_PASSWORD="not-for-hooks", LOCKSMITHD_ETCD_USERNAME="root",
    )
    await node.wait_for_reboot()
    env = dict(line.split("=", 1) for line in (out / "env").read_text().splitlines())
    assert env == {
        "LOCKSMITHD_HOOK": "pre-reboot",
        "LOCKSMITHD_HOOK_REASON": "reboot",
        "LOCKSMITHD_HOOK_STRATEGY": "etcd-lock",
        "LOCKSMITHD_HOOK_GROUP": "workers",
        "LOCKSMITHD_HOOK_NEW_VERSION": "3975.2.1",
        "LOCKSMITHD_HOOK_MACHINE_ID": node.machine_id,
    }
    assert (out / "order").read_text() == "second\n"
    assert f"[10-drain] draining {socket.gethostname()}" in daemon.log
    assert "pre-reboot hooks in" in daemon.log and "2 hook(s) passed" in daemon.log
    group_key = "coreos.com/updateengine/rebootlock/groups/workers/semaphore"
    raw = etcd.get(group_key)
    assert raw is not None and json.loads(raw)["holders"] == [node.machine_id]


async def test_a_failing_pre_reboot_hook_means_no_reboot_and_the_lock_back_after_the_post_reboot_hooks(
    nodes: dict[str, Node], etcd: EtcdCluster
) -> None:
    node = await nodes["a"].setup()
    assert node.update_engine is not None
    pre, post = hook_dirs(node)
    out = node.workdir / "hook-out"
    out.mkdir()
    write_hook(pre, "10-drain", 'echo "cannot evict pod web-1: disruption budget"; exit 3\n')
    write_hook(post, "10-uncordon", f'echo "$LOCKSMITHD_HOOK_REASON" >> {out}/post\n')
    daemon = await node.locksmithd(
        REBOOT_STRATEGY="etcd-lock", LOCKSMITHD_ENDPOINT=etcd.endpoint(0),
        LOCKSMITHD_BACKOFF_INITIAL="2s", LOCKSMITHD_BACKOFF_MAX="2s",  # a postponement long enough to look at
    )
    await daemon.wait_for_log("holds no reboot lock: nothing to release")
    assert (out / "post").read_text() == "boot\n"  # after every start, before the release
    await node.update_engine.set_status(NEED_REBOOT)
    line = await daemon.wait_for_log("Not rebooting now: a pre-reboot hook failed")
    assert "10-drain failed (exit status 3); last output: cannot evict pod web-1: disruption budget" in line
    state = await wait_for_state(node, "postponed")
    assert state["lock_held"] is False
    assert semaphore(etcd)["holders"] == []
    assert (out / "post").read_text() == "boot\npostponed\n"
    assert node.reboots == []

    write_hook(pre, "10-drain", "exit 0\n")  # the operator fixed what blocked the drain
    await node.wait_for_reboot()
    assert semaphore(etcd)["holders"] == [node.machine_id]


async def test_after_a_boot_the_lock_is_released_only_once_the_post_reboot_hooks_pass(
    nodes: dict[str, Node], etcd: EtcdCluster
) -> None:
    node = await nodes["a"].setup()
    etcd.put(SEMAPHORE_KEY, json.dumps({"semaphore": 0, "max": 1, "holders": [node.machine_id]},
                                       separators=(",", ":")))
    _, post = hook_dirs(node)
    write_hook(post, "50-health", 'echo "kubelet not ready"; exit 1\n')
    daemon = await node.locksmithd(REBOOT_STRATEGY="etcd-lock", LOCKSMITHD_ENDPOINT=etcd.endpoint(0))
    line = await daemon.wait_for_log("Post-reboot hooks failed")
    assert "kubelet not ready" in line and "Keeping the reboot lock" in line
    state = await wait_for_state(node, "releasing-after-boot")
    assert state["state"] == "running"
    assert semaphore(etcd)["holders"] == [node.machine_id]  # still counted against max while unhealthy

    write_hook(post, "50-health", "exit 0\n")
    await wait_until(lambda: semaphore(etcd)["holders"] == [], "the lock is released once the hooks pass")
    await wait_for_state(node, "waiting-for-update")


async def test_bad_hooks_are_bounded_or_refused_and_named(nodes: dict[str, Node]) -> None:
    node = await nodes["a"].setup(status=NEED_REBOOT)
    pre, _ = hook_dirs(node)
    hanging = write_hook(pre, "10-hang", "sleep 600\n")
    daemon = await node.locksmithd(REBOOT_STRATEGY="reboot", LOCKSMITHD_HOOK_TIMEOUT="300ms")
    line = await daemon.wait_for_log(f"hook {hanging} timed out (after 0.3 s)")
    assert node.reboots == []

    hanging.unlink()
    noisy = write_hook(pre, "20-noisy", "head -c 3000000 /dev/zero | tr '\\0' 'x'; echo; exit 1\n")
    line = await daemon.wait_for_log("bytes of output not logged")
    assert "[20-noisy]" in line
    assert max(len(line) for line in daemon.lines) < 10_000  # the journal never gets the megabytes

    noisy.unlink()
    writable = write_hook(pre, "30-writable", "exit 0\n", mode=0o777)
    line = await daemon.wait_for_log(f"Hook {writable} is writable by group or others (mode 0777): refused")
    assert node.reboots == []

    writable.chmod(0o755)
    await node.wait_for_reboot()
    assert node.reboots == [False]


# ------------------------------------------------------------------------------------------------------------
# metrics


async def scrape(path: Path) -> str:
    """One scrape of a metrics socket: connect, read to the end."""
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), WAIT)
    try:
        return (await asyncio.wait_for(reader.read(), WAIT)).decode()
    finally:
        writer.close()


def samples(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """What Prometheus reads from ``text``, with prometheus_client's own parser: name → labels → value."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        assert family.documentation, f"{family.name} has no HELP"
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: a Unix socket's path must fit in 108 bytes."""
    with tempfile.TemporaryDirectory(prefix="lsd-") as name:
        yield Path(name)


async def test_metrics_of_a_running_daemon_read_by_a_prometheus_parser(
    nodes: dict[str, Node], etcd: EtcdCluster, short_dir: Path
) -> None:
    other = "cccccccccccccccccccccccccccccccc"
    etcd.put(SEMAPHORE_KEY, json.dumps({"semaphore": 0, "max": 1, "holders": [other]}, separators=(",", ":")))
    node = await nodes["a"].setup(status=NEED_REBOOT)
    socket_path, textfile = short_dir / "metrics.promsock", node.workdir / "locksmithd.prom"
    await node.locksmithd(
        "--metrics-socket", str(socket_path), "--metrics-textfile", str(textfile),
        REBOOT_STRATEGY="etcd-lock", LOCKSMITHD_ENDPOINT=etcd.endpoint(0),
    )
    await wait_until(lambda: (state_of(node) or {}).get("position") == 1, "the node waits first in line")
    assert socket_path.stat().st_mode & 0o777 == 0o660
    values = samples(await scrape(socket_path))
    assert values["locksmithd_info"] == {
        (("group", ""), ("strategy", "etcd-lock"), ("version", __version__)): 1.0
    }
    assert values["locksmithd_reboot_needed"] == {(): 1.0}
    assert values["locksmithd_phase"][(("phase", "waiting-for-lock"),)] == 1.0
    assert sum(values["locksmithd_phase"].values()) == 1.0
    assert values["locksmithd_lock_waiting"] == {(): 1.0}
    waiting_since = values["locksmithd_lock_waiting_since_timestamp_seconds"][()]
    assert abs(waiting_since - time.time()) < WAIT
    assert values["locksmithd_lock_queue_position"] == {(): 1.0}
    assert values["locksmithd_lock_held"] == {(): 0.0}
    assert "locksmithd_lock_held_since_timestamp_seconds" not in values  # no sample while nothing is held
    assert values["locksmithd_reboot_window_open"] == {(): 1.0}  # no window: always open
    assert values["locksmithd_reboot_requests_total"] == {(("result", "accepted"),): 0.0,
                                                          (("result", "refused"),): 0.0}
    assert values["locksmithd_lock_backend_errors_total"][(("operation", "acquire"),)] == 0.0

    assert ctl.main(["-endpoint", etcd.endpoint(0), "unlock", other]) == 0
    await node.wait_for_reboot()
    await wait_until(lambda: (state_of(node) or {}).get("state") == "rebooting", "the reboot is published")
    values = samples(await scrape(socket_path))
    assert values["locksmithd_lock_held"] == {(): 1.0} and values["locksmithd_lock_waiting"] == {(): 0.0}
    assert values["locksmithd_lock_held_since_timestamp_seconds"][()] >= waiting_since
    assert values["locksmithd_reboot_requests_total"][(("result", "accepted"),)] == 1.0
    assert values["locksmithd_phase"][(("phase", "rebooting"),)] == 1.0
    assert values["locksmithd_hook_runs_total"][(("hooks", "pre-reboot"), ("result", "passed"))] == 1.0

    # The textfile follows (its writes are coalesced to one a second).
    await wait_until(lambda: textfile.exists() and "locksmithd_reboot_requests_total{result=\"accepted\"} 1"
                     in textfile.read_text(), "the textfile has the reboot request")
    assert samples(textfile.read_text())["locksmithd_phase"][(("phase", "rebooting"),)] == 1.0


async def test_metrics_show_a_slot_held_from_before_the_reboot_until_it_is_released(
    nodes: dict[str, Node], etcd: EtcdCluster, short_dir: Path
) -> None:
    node = await nodes["a"].setup()
    etcd.put(SEMAPHORE_KEY, json.dumps({"semaphore": 0, "max": 1, "holders": [node.machine_id]},
                                       separators=(",", ":")))
    taken = int(time.time()) - 600  # the slot was taken before the reboot, ten minutes ago
    etcd.put(f"{SEMAPHORE_KEY}/holders/{node.machine_id}", HolderRecord.at(taken, "node-a").encode())
    _, post = hook_dirs(node)
    write_hook(post, "50-health", 'echo "kubelet not ready"; exit 1\n')
    socket_path = short_dir / "metrics.promsock"
    daemon = await node.locksmithd(
        "--metrics-socket", str(socket_path), REBOOT_STRATEGY="etcd-lock", LOCKSMITHD_ENDPOINT=etcd.endpoint(0),
    )
    await daemon.wait_for_log("Post-reboot hooks failed")
    await wait_for_state(node, "releasing-after-boot")
    values: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}

    async def held() -> bool:
        nonlocal values
        values = samples(await scrape(socket_path))
        return values["locksmithd_lock_held"] == {(): 1.0}

    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while not await held():
        assert loop.time() < deadline, f"locksmithd_lock_held stayed {values['locksmithd_lock_held']}"
        await asyncio.sleep(0.05)
    assert values["locksmithd_lock_held_since_timestamp_seconds"] == {(): float(taken)}
    assert semaphore(etcd)["holders"] == [node.machine_id]

    write_hook(post, "50-health", "exit 0\n")
    await wait_until(lambda: semaphore(etcd)["holders"] == [], "the lock is released once the hooks pass")
    await wait_for_state(node, "waiting-for-update")
    values = samples(await scrape(socket_path))
    assert values["locksmithd_lock_held"] == {(): 0.0}
    assert "locksmithd_lock_held_since_timestamp_seconds" not in values


async def test_metrics_windows_and_ignored_signals(nodes: dict[str, Node], short_dir: Path) -> None:
    node = await nodes["a"].setup()
    assert node.bus is not None
    opens = (datetime.now(UTC) + timedelta(hours=3)).replace(second=0, microsecond=0)
    socket_path = short_dir / "m.sock"
    daemon = await node.locksmithd(
        "--metrics-socket", str(socket_path), REBOOT_STRATEGY="reboot", REBOOT_WINDOW_TIMEZONE="UTC",
        REBOOT_WINDOWS=f"{opens:%a %H:%M} 1h",
    )
    await daemon.wait_for_log("locksmithd starting")
    await emit_from_other_connection(node.bus.address, NEED_REBOOT)
    await daemon.wait_for_log("ignoring a StatusUpdate signal from")
    await wait_for_state(node, "waiting-for-update")
    values = samples(await scrape(socket_path))
    assert values["locksmithd_reboot_window_open"] == {(): 0.0}
    assert values["locksmithd_reboot_window_next_opening_timestamp_seconds"] == {(): opens.timestamp()}
    assert values["locksmithd_status_signals_ignored_total"][(("reason", "sender"),)] == 1.0
    assert values["locksmithd_reboot_needed"] == {(): 0.0}
    assert values["locksmithd_phase"][(("phase", "waiting-for-update"),)] == 1.0


async def test_a_metrics_socket_path_taken_by_something_else_is_named_and_the_daemon_goes_on(
    nodes: dict[str, Node], short_dir: Path
) -> None:
    node = await nodes["a"].setup(status=NEED_REBOOT)
    taken = short_dir / "metrics.promsock"
    taken.write_text("not a socket\n")
    daemon = await node.locksmithd("--metrics-socket", str(taken), REBOOT_STRATEGY="reboot")
    line = await daemon.wait_for_log("metrics are not served on a socket")
    assert f"metrics socket path {taken} exists and is not a socket: remove it or choose another path" in line
    await node.wait_for_reboot()  # the daemon carried on without the socket
    assert taken.read_text() == "not a socket\n"
