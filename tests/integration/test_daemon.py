"""The real ``update_engine`` daemon on a private system-like bus with our D-Bus policy, a GPT image made by sgdisk,
the dev server and a signed payload: statuses and signals, ResetStatus, the reboot-pending marker across a restart,
healthy-boot marking, rollback, and the policy for unprivileged callers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from coreos_common.status import BUS_NAME, INTERFACE, OBJECT_PATH
from sim.bus import PrivateBus, start_private_bus
from sim.devserver import DevServerProcess, start_devserver
from sim.disks import cgpt_flags, make_usr_disk, partition_bytes
from sim.node import NodeRoot, make_node_root
from sim.payload import Keys, Release, build_release
from sim.standins.systemd import start_systemd_standin
from sim.tools import UPDATE_ENGINE_POLICY as POLICY
from sim.tools import VENV_BIN

USR_A, USR_B = 3, 4
S = "UPDATE_STATUS_"


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Release:
    return build_release(tmp_path_factory.mktemp("release"), keys)


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[PrivateBus]:
    with start_private_bus(tmp_path / "dbus", [POLICY]) as b:
        yield b


@pytest.fixture
def devserver(tmp_path: Path, release: Release) -> Iterator[DevServerProcess]:
    with start_devserver(tmp_path / "srv", [(release.payload, "2.0.0", None)]) as server:
        yield server


@dataclass
class Daemon:
    """One ``update_engine`` process; its log is kept for assertions and failure reports."""

    args: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = field(default=0)

    def start(self) -> None:
        self.starts += 1
        logf = self.log_path.open("ab")
        self.process = subprocess.Popen(self.args, stdout=logf, stderr=subprocess.STDOUT)
        logf.close()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def make_daemon(tmp_path: Path, node: NodeRoot, disk: Path, bus: PrivateBus, keys: Keys, booted: str = "USR-A",
                healthy_delay: float = 3600) -> Daemon:
    args = [
        str(VENV_BIN / "update_engine"), "--bus-address", bus.address, "--disk", str(disk), "--booted", booted,
        "--public-key", str(keys.public), "--state-dir", str(node.state_dir), "--run-dir", str(node.run_dir),
        "--config-root", str(node.root), "--kernel-dir", str(node.kernel_dir),
        "--first-check-delay", "3600", "--healthy-boot-delay", str(healthy_delay),
    ]
    return Daemon(args, tmp_path / "update_engine.log")


async def connect(bus: PrivateBus) -> MessageBus:
    return await MessageBus(bus_address=bus.address).connect()


async def wait_for_owner(client: MessageBus, daemon: Daemon, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reply = await client.call(Message(
            destination="org.freedesktop.DBus", path="/org/freedesktop/DBus", interface="org.freedesktop.DBus",
            member="NameHasOwner", signature="s", body=[BUS_NAME],
        ))
        if reply is not None and reply.body and reply.body[0]:
            return
        assert daemon.process is not None
        if daemon.process.poll() is not None:
            raise AssertionError(f"update_engine exited with {daemon.process.returncode}:\n{daemon.log()}")
        await asyncio.sleep(0.05)
    raise AssertionError(f"update_engine did not own {BUS_NAME} within {timeout} s:\n{daemon.log()}")


async def call(client: MessageBus, member: str) -> Message:
    reply = await client.call(Message(destination=BUS_NAME, path=OBJECT_PATH, interface=INTERFACE, member=member))
    assert reply is not None
    return reply


async def get_status(client: MessageBus) -> list[object]:
    reply = await call(client, "GetStatus")
    assert reply.message_type is MessageType.METHOD_RETURN, reply.body
    assert reply.signature == "xdssx"
    return list(reply.body)


class SignalRecorder:
    """Every StatusUpdate body, as a plain subscriber (as locksmithd is) sees it."""

    def __init__(self, client: MessageBus) -> None:
        self.bodies: list[list[object]] = []
        self.signatures: list[str] = []
        self.changed = asyncio.Event()
        self._client = client
        client.add_message_handler(self._on_message)

    def _on_message(self, msg: Message) -> None:
        if msg.message_type is MessageType.SIGNAL and msg.member == "StatusUpdate" and msg.interface == INTERFACE:
            self.bodies.append(list(msg.body))
            self.signatures.append(msg.signature)
            self.changed.set()

    def statuses(self) -> list[str]:
        out: list[str] = []
        for body in self.bodies:
            op = str(body[2]).removeprefix(S)
            if not out or out[-1] != op:
                out.append(op)
        return out

    async def wait_for(self, status: str, timeout: float = 60) -> None:
        await self._wait(lambda: (S + status) in [b[2] for b in self.bodies], f"no {status} signal", timeout)

    async def wait_for_any(self, timeout: float = 60) -> None:
        await self._wait(lambda: bool(self.bodies), "no StatusUpdate signal", timeout)

    async def _wait(self, seen: Callable[[], bool], what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not seen():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{what}; saw {self.statuses()}")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)

    def close(self) -> None:
        self._client.remove_message_handler(self._on_message)


async def subscribe(client: MessageBus) -> SignalRecorder:
    recorder = SignalRecorder(client)
    reply = await client.call(Message(
        destination="org.freedesktop.DBus", path="/org/freedesktop/DBus", interface="org.freedesktop.DBus",
        member="AddMatch", signature="s",
        body=[f"type='signal',interface='{INTERFACE}',member='StatusUpdate'"],
    ))
    assert reply is not None and reply.message_type is MessageType.METHOD_RETURN
    return recorder


async def wait_for_start_up(client: MessageBus, daemon: Daemon, announced: SignalRecorder) -> None:
    """Wait for ``daemon`` to own its name and for its start-up StatusUpdate (it announces its status once, just
    after taking the name), which ``announced``, subscribed before the daemon started, receives.

    A recorder subscribed after this never sees that signal; one subscribed as soon as the name appears may or may
    not, depending on which of the daemon and the test the machine runs first.
    """
    try:
        await wait_for_owner(client, daemon)
        await announced.wait_for_any()
    finally:
        announced.close()


@pytest.fixture
async def running(
    tmp_path: Path, bus: PrivateBus, devserver: DevServerProcess, keys: Keys
) -> AsyncIterator[tuple[Daemon, MessageBus, NodeRoot, Path]]:
    node = make_node_root(tmp_path / "root", server=devserver.url)
    disk = make_usr_disk(tmp_path / "disk.img")
    daemon = make_daemon(tmp_path, node, disk, bus, keys)
    client = await connect(bus)
    announced = await subscribe(client)
    daemon.start()
    try:
        await wait_for_start_up(client, daemon, announced)
        yield daemon, client, node, disk
    finally:
        daemon.stop()
        client.disconnect()


async def test_attempt_update_walks_every_status_and_signals_each(
    running: tuple[Daemon, MessageBus, NodeRoot, Path], release: Release
) -> None:
    daemon, client, _node, disk = running
    assert (await get_status(client))[2] == S + "IDLE"
    recorder = await subscribe(client)

    reply = await call(client, "AttemptUpdate")
    assert reply.message_type is MessageType.METHOD_RETURN
    await recorder.wait_for("UPDATED_NEED_REBOOT")

    assert recorder.statuses() == [
        "CHECKING_FOR_UPDATE", "UPDATE_AVAILABLE", "DOWNLOADING", "VERIFYING", "FINALIZING", "UPDATED_NEED_REBOOT",
    ]
    assert set(recorder.signatures) == {"xdssx"}
    progress = [float(b[1]) for b in recorder.bodies if b[2] == S + "DOWNLOADING"]
    assert progress == sorted(progress) and all(0.0 <= p <= 1.0 for p in progress)
    last_checked, prog, op, version, size = await get_status(client)
    assert op == S + "UPDATED_NEED_REBOOT"
    assert version == "2.0.0"
    assert size == release.payload.stat().st_size
    assert isinstance(last_checked, int) and abs(last_checked - time.time()) < 120
    assert prog == 0.0
    assert cgpt_flags(disk, USR_B) == (2, 1, 0)
    assert partition_bytes(disk, USR_B)[: release.image.stat().st_size] == release.image.read_bytes()

    # AttemptUpdate is a no-op while a reboot is pending: no new download. The daemon decides before it replies.
    before = len(recorder.bodies)
    await call(client, "AttemptUpdate")
    assert "AttemptUpdate ignored: status is UPDATE_STATUS_UPDATED_NEED_REBOOT" in daemon.log()
    assert (await get_status(client))[2] == S + "UPDATED_NEED_REBOOT"
    assert all(b[2] == S + "UPDATED_NEED_REBOOT" for b in recorder.bodies[before:])


async def test_reset_status_disarms_the_update_and_signals(
    running: tuple[Daemon, MessageBus, NodeRoot, Path],
) -> None:
    _daemon, client, node, disk = running
    recorder = await subscribe(client)
    await call(client, "AttemptUpdate")
    await recorder.wait_for("UPDATED_NEED_REBOOT")
    assert cgpt_flags(disk, USR_B) == (2, 1, 0)

    before = len(recorder.bodies)
    reply = await call(client, "ResetStatus")
    assert reply.message_type is MessageType.METHOD_RETURN, reply.body
    await recorder.wait_for("IDLE")
    assert any(b[2] == S + "IDLE" for b in recorder.bodies[before:])
    assert (await get_status(client))[2:] == [S + "IDLE", "0.0.0", 0]
    assert cgpt_flags(disk, USR_B)[0] == 0  # the abandoned update will not boot
    assert cgpt_flags(disk, USR_A) == (1, 0, 1)
    assert not (node.run_dir / "update_engine_autoupdate_completed").exists()


async def test_reboot_pending_survives_a_daemon_restart(
    running: tuple[Daemon, MessageBus, NodeRoot, Path], devserver: DevServerProcess
) -> None:
    daemon, client, _node, disk = running
    recorder = await subscribe(client)
    await call(client, "AttemptUpdate")
    await recorder.wait_for("UPDATED_NEED_REBOOT")
    assert daemon.stop() == 0
    daemon.start()
    await wait_for_owner(client, daemon)
    assert (await get_status(client))[2] == S + "UPDATED_NEED_REBOOT"
    downloads = [e for e in devserver.events() if e["event_type"] == 13]
    assert len(downloads) == 1
    assert cgpt_flags(disk, USR_B) == (2, 1, 0)


async def test_a_restart_with_a_reboot_pending_still_shows_the_installed_update(
    running: tuple[Daemon, MessageBus, NodeRoot, Path], release: Release
) -> None:
    """Before, a restarted daemon said NEW_VERSION=0.0.0, NEW_SIZE=0, LAST_CHECKED_TIME=0, and -update answered
    "An update to 0.0.0 is already installed"."""
    daemon, client, _node, _disk = running
    recorder = await subscribe(client)
    await call(client, "AttemptUpdate")
    await recorder.wait_for("UPDATED_NEED_REBOOT")
    installed = await get_status(client)
    assert installed[3:] == ["2.0.0", release.payload.stat().st_size] and installed[0] > 0
    assert daemon.stop() == 0
    daemon.start()
    await wait_for_owner(client, daemon)

    assert await get_status(client) == installed
    client_args = [str(VENV_BIN / "update_engine_client"), "--bus-address", daemon.args[2]]
    status = subprocess.run([*client_args, "-status"], capture_output=True, text=True, timeout=30)
    assert f"LAST_CHECKED_TIME={installed[0]}\n" in status.stdout
    assert f"NEW_VERSION=2.0.0\nNEW_SIZE={installed[4]}\n" in status.stdout
    update = subprocess.run([*client_args, "-update"], capture_output=True, text=True, timeout=30)
    assert update.returncode == 0
    assert "An update to 2.0.0 is already installed; reboot needed." in update.stderr


async def test_rollback_needs_a_known_good_partition(
    running: tuple[Daemon, MessageBus, NodeRoot, Path],
) -> None:
    daemon, client, _node, disk = running
    # USR-B of a fresh image never booted: refused, with the reason.
    reply = await call(client, "Rollback")
    assert reply.message_type is MessageType.ERROR
    assert reply.error_name == "com.coreos.update1.Error.RollbackRefused"
    assert "USR-B" in str(reply.body[0])
    assert cgpt_flags(disk, USR_B) == (0, 0, 0)

    subprocess.run(["cgpt", "add", "-i", str(USR_B), "-S", "1", "-P", "0", "-T", "0", str(disk)], check=True)
    result = subprocess.run(
        [str(VENV_BIN / "update_engine_client"), "-rollback", "--bus-address", daemon.args[2]],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "USR-B" in result.stdout + result.stderr
    prio_b, _, ok_b = cgpt_flags(disk, USR_B)
    assert ok_b == 1 and prio_b > cgpt_flags(disk, USR_A)[0]
    assert (await get_status(client))[2] == S + "UPDATED_NEED_REBOOT"


async def test_healthy_boot_marks_the_running_partition_good(
    tmp_path: Path, bus: PrivateBus, devserver: DevServerProcess, keys: Keys
) -> None:
    """The node just booted USR-B after an update (GRUB spent its try): it becomes successful once healthy."""
    node = make_node_root(tmp_path / "root", server=devserver.url)
    disk = make_usr_disk(tmp_path / "disk.img")
    subprocess.run(["cgpt", "add", "-i", str(USR_B), "-P", "2", "-T", "0", "-S", "0", str(disk)], check=True)
    daemon = make_daemon(tmp_path, node, disk, bus, keys, booted="USR-B", healthy_delay=1)
    client = await connect(bus)
    daemon.start()
    try:
        await wait_for_owner(client, daemon)
        deadline = time.monotonic() + 20
        while cgpt_flags(disk, USR_B) != (2, 0, 1) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert cgpt_flags(disk, USR_B) == (2, 0, 1)
        assert cgpt_flags(disk, USR_A) == (1, 0, 1)
        assert "marked good" in daemon.log()
        # Once per boot: a restart within the same boot leaves the flags alone and says so.
        daemon.stop()
        subprocess.run(["cgpt", "add", "-i", str(USR_B), "-T", "1", str(disk)], check=True)
        daemon.start()
        await wait_for_owner(client, daemon)
        async with asyncio.timeout(20):
            while "already marked good during this boot" not in daemon.log():
                await asyncio.sleep(0.05)
        assert cgpt_flags(disk, USR_B) == (2, 1, 1)
    finally:
        daemon.stop()
        client.disconnect()


def as_nobody(bus: PrivateBus, member: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "busctl", "--address", bus.address,
         "call", BUS_NAME, OBJECT_PATH, INTERFACE, member],
        capture_output=True, text=True, timeout=30,
    )


async def test_policy_lets_anyone_read_and_only_root_act(
    running: tuple[Daemon, MessageBus, NodeRoot, Path], bus: PrivateBus
) -> None:
    _daemon, client, _node, _disk = running
    status = as_nobody(bus, "GetStatus")
    assert status.returncode == 0, status.stderr
    assert "UPDATE_STATUS_IDLE" in status.stdout
    for member in ("AttemptUpdate", "ResetStatus", "Rollback"):
        denied = as_nobody(bus, member)
        assert denied.returncode != 0
        assert "denied" in denied.stderr.lower() or "AccessDenied" in denied.stderr
    # Each refusal was answered before the next call: a check they had started would show here.
    assert (await get_status(client))[2] == S + "IDLE"


async def test_client_update_follows_the_attempt_to_the_end(
    running: tuple[Daemon, MessageBus, NodeRoot, Path],
) -> None:
    daemon, _client, _node, _disk = running
    result = await asyncio.to_thread(
        subprocess.run,
        [str(VENV_BIN / "update_engine_client"), "-update", "--bus-address", daemon.args[2]],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "CURRENT_OP=UPDATE_STATUS_UPDATED_NEED_REBOOT" in result.stdout
    status = subprocess.run(
        [str(VENV_BIN / "update_engine_client"), "-status", "--bus-address", daemon.args[2]],
        capture_output=True, text=True, timeout=30,
    )
    assert "NEW_VERSION=2.0.0" in status.stdout


def test_daemon_stops_cleanly_on_sigterm(tmp_path: Path, bus: PrivateBus, keys: Keys) -> None:
    node = make_node_root(tmp_path / "root", server="http://127.0.0.1:9/v1/update/")
    disk = make_usr_disk(tmp_path / "disk.img")
    daemon = make_daemon(tmp_path, node, disk, bus, keys)
    daemon.start()
    deadline = time.monotonic() + 30  # SIGTERM is handled once the daemon says it started
    while "update-engine started" not in daemon.log() and time.monotonic() < deadline:
        assert daemon.process is not None and daemon.process.poll() is None, daemon.log()
        time.sleep(0.05)
    assert daemon.process is not None and daemon.process.poll() is None, daemon.log()
    assert daemon.stop(signal.SIGTERM) == 0
    assert "Stopping" in daemon.log()
    assert os.path.exists(disk)


async def test_healthy_boot_waits_for_boot_complete_target(
    tmp_path: Path, bus: PrivateBus, devserver: DevServerProcess, keys: Keys
) -> None:
    """With boot-complete.target queued, the running partition is marked good only once the target is active."""
    node = make_node_root(tmp_path / "root", server=devserver.url)
    disk = make_usr_disk(tmp_path / "disk.img")
    subprocess.run(["cgpt", "add", "-i", str(USR_B), "-P", "2", "-T", "0", "-S", "0", str(disk)], check=True)
    systemd_bus, unit = await start_systemd_standin(bus.address)
    daemon = make_daemon(tmp_path, node, disk, bus, keys, booted="USR-B", healthy_delay=0.2)
    daemon.args += ["--boot-complete-poll", "0.2"]
    client = await connect(bus)
    daemon.start()
    try:
        await wait_for_owner(client, daemon)
        async with asyncio.timeout(20):
            while unit.state_reads < 3:  # several polls of the unit's state, each still "inactive"
                await asyncio.sleep(0.05)
        assert "Waiting for boot-complete.target" in daemon.log()
        assert cgpt_flags(disk, USR_B) == (2, 0, 0)  # not yet: the boot is not complete
        unit.state = "active"
        deadline = time.monotonic() + 20
        while cgpt_flags(disk, USR_B) != (2, 0, 1) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert cgpt_flags(disk, USR_B) == (2, 0, 1)
        assert "boot-complete.target is active" in daemon.log()
    finally:
        daemon.stop()
        client.disconnect()
        systemd_bus.disconnect()
