"""update-engine's D-Bus service, its policy and update_engine_client on a real private system-like dbus-daemon.

The service runs in the test's event loop in front of a scripted stand-in for the update attempter; the tools
(busctl, gdbus, update_engine_client) run as subprocesses, some as the unprivileged user ``nobody``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from coreos_common.status import BUS_NAME, INTERFACE, OBJECT_PATH, StatusDetails, StatusSnapshot, UpdateStatus
from sim.bus import PrivateBus, start_private_bus
from tests.conftest import require_tool
from update_engine.dbus_service import (
    ManagerService,
    NameNotAcquired,
    connect_bus,
    serve,
)
from update_engine.engine.errors import ResetNotAllowed, RollbackRefused

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="owning com.coreos.update1 and setpriv need root (CI runs as root)"),
]

REPO = Path(__file__).resolve().parents[2]
POLICY = REPO / "units" / "com.coreos.update1.conf"
CLIENT = Path(sys.prefix) / "bin" / "update_engine_client"
AS_NOBODY = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")
TIMEOUT = 20.0

S = UpdateStatus
VERSION = "3815.2.0"
SIZE = 461373440
CHECK_TIME = 1700000000
ROLLBACK_TARGET = "USR-A (/dev/vda3), version 3760.2.0"


def status(op: UpdateStatus, progress: float = 0.0, checked: int = CHECK_TIME) -> StatusSnapshot:
    if op in (S.IDLE, S.CHECKING_FOR_UPDATE):
        return StatusSnapshot(checked, progress, op.value)
    return StatusSnapshot(checked, progress, op.value, VERSION, SIZE)


INSTALLS = [
    status(S.UPDATE_AVAILABLE),
    status(S.DOWNLOADING, 0.0),
    status(S.DOWNLOADING, 0.5),
    status(S.DOWNLOADING, 1.0),
    status(S.FINALIZING),
    status(S.UPDATED_NEED_REBOOT),
]
FAILS_DOWNLOAD = [
    status(S.UPDATE_AVAILABLE),
    status(S.DOWNLOADING, 0.0),
    status(S.DOWNLOADING, 0.3),
    status(S.REPORTING_ERROR_EVENT, 0.3),
    status(S.IDLE, checked=CHECK_TIME),
]
FINDS_NOTHING = [status(S.IDLE, checked=CHECK_TIME)]


class ScriptedAttempter:
    """Stand-in for the update attempter (``update_engine.engine.attempter``) honouring the UpdateManager contract.

    ``attempt_update`` in IDLE switches to CHECKING_FOR_UPDATE before returning, then plays ``script`` from a worker
    thread, reporting each snapshot to the listeners from that thread (as the real download does). ResetStatus is
    allowed from IDLE and UPDATED_NEED_REBOOT only; Rollback returns ``rollback_target`` or refuses with
    ``refusal`` when the target is None.
    """

    def __init__(
        self,
        script: Sequence[StatusSnapshot] = (),
        initial: StatusSnapshot | None = None,
        rollback_target: str | None = ROLLBACK_TARGET,
        refusal: str = "USR-A never booted successfully; refusing to arm it",
    ) -> None:
        self._lock = threading.Lock()
        self._state = initial if initial is not None else status(S.IDLE, checked=0)
        self._script = list(script)
        self._listeners: list[Callable[[StatusSnapshot], None]] = []
        self._threads: list[threading.Thread] = []
        self.rollback_target = rollback_target
        self.refusal = refusal
        self.attempts = 0
        self.rollbacks = 0
        self.resets = 0
        self.extra_details: dict[str, object] = {}

    def snapshot(self) -> StatusSnapshot:
        with self._lock:
            return self._state

    def attempt_update(self) -> None:
        with self._lock:
            if self._state.current_operation != S.IDLE.value:
                return
            self.attempts += 1
            checked = self._state.last_checked_time
        self.report(status(S.CHECKING_FOR_UPDATE, checked=checked))
        self.play(self._script)

    def reset_status(self) -> None:
        current = self.snapshot()
        if current.current_operation not in (S.IDLE.value, S.UPDATED_NEED_REBOOT.value):
            raise ResetNotAllowed(f"ResetStatus is not allowed in {current.current_operation}")
        self.resets += 1
        self.report(status(S.IDLE, checked=current.last_checked_time))

    def rollback(self) -> str:
        if self.rollback_target is None:
            raise RollbackRefused(self.refusal)
        self.rollbacks += 1
        return self.rollback_target

    def add_status_listener(self, listener: Callable[[StatusSnapshot], None]) -> None:
        self._listeners.append(listener)

    def details(self) -> StatusDetails:
        return StatusDetails(status=self.snapshot(), **self.extra_details)  # type: ignore[arg-type]

    def report(self, snapshot: StatusSnapshot) -> None:
        """Make ``snapshot`` current and tell the listeners, on the calling thread."""
        with self._lock:
            self._state = snapshot
        for listener in self._listeners:
            listener(snapshot)

    def play(self, snapshots: Sequence[StatusSnapshot], pause: float = 0.01) -> None:
        """Report ``snapshots`` one after another from a new worker thread."""

        def run() -> None:
            for snapshot in snapshots:
                time.sleep(pause)
                self.report(snapshot)

        thread = threading.Thread(target=run, name="scripted-attempt", daemon=True)
        self._threads.append(thread)
        thread.start()

    def join(self) -> None:
        for thread in self._threads:
            thread.join(timeout=TIMEOUT)


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


async def run_tool(*argv: str | Path, env: dict[str, str] | None = None, timeout: float = TIMEOUT) -> Result:
    """Run a command without blocking the loop (the service under test lives in it); killed if it hangs."""
    proc = await asyncio.create_subprocess_exec(
        *(str(a) for a in argv),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env if env is not None else CLIENT_ENV,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"{argv} did not finish within {timeout} s")
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


@pytest.fixture
def bus_dir() -> Iterator[Path]:
    """A directory outside pytest's 0700 temp root, so ``nobody`` can reach the bus socket."""
    path = Path(tempfile.mkdtemp(prefix="ue-dbus-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def wait_until_listening(bus: PrivateBus) -> None:
    """The socket file appears at bind(), a moment before dbus-daemon listens; connect only once it does."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(bus.socket_path))
                return
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
        time.sleep(0.01)


@contextlib.contextmanager
def policy_bus(directory: Path, extra_policies: Sequence[Path] = ()) -> Iterator[PrivateBus]:
    """A private system-like bus with our policy (and any extra policy files after it)."""
    require_tool("dbus-daemon")
    bus = start_private_bus(directory, [POLICY, *extra_policies])
    try:
        wait_until_listening(bus)
        yield bus
    finally:
        bus.stop()


@pytest.fixture
def bus(bus_dir: Path) -> Iterator[PrivateBus]:
    with policy_bus(bus_dir / "bus") as private_bus:
        yield private_bus


@dataclass
class Harness:
    """Starts the service in front of an attempter and cleans everything up after the test."""

    bus: PrivateBus
    connections: list[MessageBus] = field(default_factory=list)
    services: list[ManagerService] = field(default_factory=list)
    attempters: list[ScriptedAttempter] = field(default_factory=list)

    async def connect(self) -> MessageBus:
        connection = await connect_bus(self.bus.address)
        self.connections.append(connection)
        return connection

    async def serve(
        self, attempter: ScriptedAttempter, clock: Callable[[], float] = time.monotonic
    ) -> ManagerService:
        self.attempters.append(attempter)
        service = await serve(await self.connect(), attempter, clock=clock)
        self.services.append(service)
        return service

    async def close(self) -> None:
        for service in self.services:
            await service.close()
        for connection in self.connections:
            connection.disconnect()
        for attempter in self.attempters:
            attempter.join()


@pytest.fixture
async def harness(bus: PrivateBus) -> AsyncIterator[Harness]:
    h = Harness(bus)
    try:
        yield h
    finally:
        await h.close()


async def call(connection: MessageBus, member: str) -> Message:
    reply = await asyncio.wait_for(
        connection.call(Message(destination=BUS_NAME, path=OBJECT_PATH, interface=INTERFACE, member=member)),
        TIMEOUT,
    )
    assert reply is not None
    return reply


async def subscribe(connection: MessageBus) -> asyncio.Queue[Message]:
    """Every StatusUpdate signal this connection receives, in order."""
    queue: asyncio.Queue[Message] = asyncio.Queue()

    def handler(message: Message) -> None:
        if message.message_type is MessageType.SIGNAL and message.member == "StatusUpdate":
            queue.put_nowait(message)

    connection.add_message_handler(handler)
    rule = f"type='signal',sender='{BUS_NAME}',interface='{INTERFACE}',member='StatusUpdate'"
    reply = await connection.call(
        Message(
            destination="org.freedesktop.DBus",
            path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus",
            member="AddMatch",
            signature="s",
            body=[rule],
        )
    )
    assert reply is not None and reply.message_type is MessageType.METHOD_RETURN
    return queue


async def signals_until(queue: asyncio.Queue[Message], done: Callable[[StatusSnapshot], bool]) -> list[Message]:
    received: list[Message] = []
    while True:
        message = await asyncio.wait_for(queue.get(), TIMEOUT)
        received.append(message)
        if done(StatusSnapshot.from_values(message.body)):
            return received


def busctl(bus: PrivateBus, *args: str) -> list[str]:
    return [require_tool("busctl"), f"--address={bus.address}", *args]


def busctl_call(bus: PrivateBus, member: str) -> list[str]:
    return busctl(bus, "call", BUS_NAME, OBJECT_PATH, INTERFACE, member)


DEBUG_ENV = {**os.environ, "SYSTEMD_LOG_LEVEL": "debug"}
# The client runs from its installed entry point but imports the tree under test, however the venv was installed.
CLIENT_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def client(bus: PrivateBus, *args: str) -> list[str]:
    if not CLIENT.exists():
        pytest.fail(f"{CLIENT} is missing; install the project into the venv (pip install -e .)")
    return [str(CLIENT), "--bus-address", bus.address, *args]


# --- the service ---------------------------------------------------------------------------------------------


async def test_get_status_returns_the_snapshot_with_the_strict_signature(harness: Harness) -> None:
    await harness.serve(ScriptedAttempter(initial=status(S.DOWNLOADING, 0.25)))
    reply = await call(await harness.connect(), "GetStatus")
    assert reply.message_type is MessageType.METHOD_RETURN
    assert reply.signature == "xdssx"
    assert reply.body == [CHECK_TIME, 0.25, "UPDATE_STATUS_DOWNLOADING", VERSION, SIZE]


async def test_status_is_signalled_at_start_up(harness: Harness) -> None:
    queue = await subscribe(await harness.connect())
    await harness.serve(ScriptedAttempter())
    (first,) = await signals_until(queue, lambda s: True)
    assert first.signature == "xdssx"
    assert first.body == [0, 0.0, "UPDATE_STATUS_IDLE", "0.0.0", 0]


async def test_signals_from_a_worker_thread_follow_the_rate_rule(harness: Harness) -> None:
    frozen_clock = 5000.0  # no 10 s silence ever passes: only the 1 % rule and status changes count
    attempter = ScriptedAttempter()
    service = await harness.serve(attempter, clock=lambda: frozen_clock)
    listener = await harness.connect()
    queue = await subscribe(listener)
    downloads = [status(S.DOWNLOADING, n / 1000) for n in range(0, 31)]
    attempter.play([*downloads, status(S.FINALIZING)], pause=0)
    received = await signals_until(queue, lambda s: s.current_operation == S.FINALIZING.value)
    assert all(m.signature == "xdssx" and m.path == OBJECT_PATH and m.interface == INTERFACE for m in received)
    assert {m.sender for m in received} == {service.bus.unique_name}
    snapshots = [StatusSnapshot.from_values(m.body) for m in received]
    assert [(s.current_operation, s.progress) for s in snapshots] == [
        ("UPDATE_STATUS_DOWNLOADING", 0.0),
        ("UPDATE_STATUS_DOWNLOADING", 0.01),
        ("UPDATE_STATUS_DOWNLOADING", 0.02),
        ("UPDATE_STATUS_DOWNLOADING", 0.03),
        ("UPDATE_STATUS_FINALIZING", 0.0),
    ]


async def test_attempt_update_starts_a_check_only_when_idle(harness: Harness) -> None:
    idle = ScriptedAttempter(script=FINDS_NOTHING)
    await harness.serve(idle)
    caller = await harness.connect()
    queue = await subscribe(caller)
    reply = await call(caller, "AttemptUpdate")
    assert reply.message_type is MessageType.METHOD_RETURN
    received = await signals_until(queue, lambda s: s.current_operation == S.IDLE.value)
    assert [StatusSnapshot.from_values(m.body).current_operation for m in received] == [
        "UPDATE_STATUS_CHECKING_FOR_UPDATE",
        "UPDATE_STATUS_IDLE",
    ]
    assert idle.attempts == 1


async def test_attempt_update_is_a_silent_no_op_when_an_update_waits_for_reboot(harness: Harness) -> None:
    waiting = ScriptedAttempter(initial=status(S.UPDATED_NEED_REBOOT))
    await harness.serve(waiting)
    reply = await call(await harness.connect(), "AttemptUpdate")
    assert reply.message_type is MessageType.METHOD_RETURN
    assert waiting.attempts == 0
    assert waiting.snapshot().current_operation == S.UPDATED_NEED_REBOOT.value


async def test_reset_status_outside_idle_or_need_reboot_is_a_named_error(harness: Harness) -> None:
    busy = ScriptedAttempter(initial=status(S.DOWNLOADING, 0.4))
    await harness.serve(busy)
    reply = await call(await harness.connect(), "ResetStatus")
    assert reply.message_type is MessageType.ERROR
    assert reply.error_name == "com.coreos.update1.Error.ResetNotAllowed"
    assert reply.body == ["ResetStatus is not allowed in UPDATE_STATUS_DOWNLOADING"]
    assert busy.snapshot().current_operation == S.DOWNLOADING.value


async def test_reset_status_from_need_reboot_goes_idle_and_says_so(harness: Harness) -> None:
    waiting = ScriptedAttempter(initial=status(S.UPDATED_NEED_REBOOT))
    await harness.serve(waiting)
    caller = await harness.connect()
    queue = await subscribe(caller)
    reply = await call(caller, "ResetStatus")
    assert reply.message_type is MessageType.METHOD_RETURN
    (signal_,) = await signals_until(queue, lambda s: True)
    assert signal_.body == [CHECK_TIME, 0.0, "UPDATE_STATUS_IDLE", "0.0.0", 0]
    assert (await call(caller, "GetStatus")).body[2] == "UPDATE_STATUS_IDLE"


async def test_rollback_returns_what_will_boot_or_the_refusal(harness: Harness) -> None:
    attempter = ScriptedAttempter()
    await harness.serve(attempter)
    caller = await harness.connect()
    reply = await call(caller, "Rollback")
    assert (reply.message_type, reply.signature, reply.body) == (MessageType.METHOD_RETURN, "s", [ROLLBACK_TARGET])
    attempter.rollback_target = None
    refused = await call(caller, "Rollback")
    assert refused.error_name == "com.coreos.update1.Error.RollbackRefused"
    assert refused.body == [attempter.refusal]


async def test_a_second_instance_on_the_same_bus_fails_clearly(harness: Harness) -> None:
    await harness.serve(ScriptedAttempter())
    with pytest.raises(NameNotAcquired, match="another update-engine is running"):
        await serve(await harness.connect(), ScriptedAttempter())


SERVE_AS_CALLER = """
import asyncio, sys
from update_engine.dbus_service import NameNotAcquired, connect_bus, serve
from coreos_common.status import StatusSnapshot

class Idle:
    def snapshot(self): return StatusSnapshot()
    def attempt_update(self): pass
    def reset_status(self): pass
    def rollback(self): return ""
    def add_status_listener(self, listener): pass

async def main():
    bus = await connect_bus(None)
    try:
        await serve(bus, Idle())
    except NameNotAcquired as exc:
        print(exc)
        return 3
    finally:
        bus.disconnect()
    return 0

sys.exit(asyncio.run(main()))
"""


async def test_only_root_may_own_the_name(bus: PrivateBus) -> None:
    env = {**CLIENT_ENV, "DBUS_SYSTEM_BUS_ADDRESS": bus.address}
    result = await run_tool(*AS_NOBODY, sys.executable, "-c", SERVE_AS_CALLER, env=env)
    assert result.returncode == 3, result.stderr
    assert result.stdout.startswith("the bus refused to give com.coreos.update1 to this process")
    assert "org.freedesktop.DBus.Error.AccessDenied" in result.stdout


async def test_introspection_with_busctl_and_gdbus(harness: Harness) -> None:
    await harness.serve(ScriptedAttempter())
    as_root = await run_tool(*busctl(harness.bus, "introspect", BUS_NAME, OBJECT_PATH))
    assert as_root.returncode == 0, as_root.stderr
    rows = {line.split()[0]: line.split()[1:4] for line in as_root.stdout.splitlines() if line.startswith(".")}
    assert rows[".GetStatus"] == ["method", "-", "xdssx"]
    assert rows[".StatusUpdate"] == ["signal", "xdssx", "-"]
    assert rows[".Rollback"] == ["method", "-", "s"]
    assert rows[".AttemptUpdate"] == ["method", "-", "-"]
    assert rows[".ResetStatus"] == ["method", "-", "-"]
    as_nobody = await run_tool(*AS_NOBODY, *busctl(harness.bus, "introspect", BUS_NAME, OBJECT_PATH))
    assert as_nobody.returncode == 0, as_nobody.stderr
    assert ".GetStatus" in as_nobody.stdout

    gdbus = require_tool("gdbus")
    result = await run_tool(
        gdbus, "introspect", "--address", harness.bus.address, "--dest", BUS_NAME, "--object-path", OBJECT_PATH
    )
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "interface com.coreos.update1.Manager {" in text
    assert (
        "GetStatus(out x last_checked_time, out d progress, out s current_operation, "
        "out s new_version, out x new_size);" in text
    )
    assert "StatusUpdate(x last_checked_time, d progress, s current_operation, s new_version, x new_size);" in text


# --- the policy ----------------------------------------------------------------------------------------------


async def test_unprivileged_user_may_read_status_but_not_act(harness: Harness) -> None:
    attempter = ScriptedAttempter(initial=status(S.UPDATED_NEED_REBOOT))
    await harness.serve(attempter)
    read = await run_tool(*AS_NOBODY, *busctl_call(harness.bus, "GetStatus"))
    assert read.returncode == 0, read.stderr
    assert read.stdout.strip() == f'xdssx {CHECK_TIME} 0 "UPDATE_STATUS_UPDATED_NEED_REBOOT" "{VERSION}" {SIZE}'
    for member in ("AttemptUpdate", "ResetStatus", "Rollback"):
        denied = await run_tool(*AS_NOBODY, *busctl_call(harness.bus, member), env=DEBUG_ENV)
        assert denied.returncode != 0, member
        assert "error-name=org.freedesktop.DBus.Error.AccessDenied" in denied.stderr, (member, denied.stderr)
    assert (attempter.attempts, attempter.resets, attempter.rollbacks) == (0, 0, 0)
    # root may do all of it.
    allowed = await run_tool(*busctl_call(harness.bus, "ResetStatus"))
    assert allowed.returncode == 0, allowed.stderr
    assert attempter.resets == 1


async def test_rollback_checks_the_callers_uid_even_if_the_policy_lets_it_through(bus_dir: Path) -> None:
    loosened = bus_dir / "loosened.conf"
    loosened.write_text(
        """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <policy user="nobody">
    <allow send_destination="com.coreos.update1" send_interface="com.coreos.update1.Manager"/>
  </policy>
</busconfig>
"""
    )
    with policy_bus(bus_dir / "bus", [loosened]) as private_bus:
        h = Harness(private_bus)
        try:
            attempter = ScriptedAttempter()
            await h.serve(attempter)
            denied = await run_tool(*AS_NOBODY, *busctl_call(private_bus, "Rollback"), env=DEBUG_ENV)
            assert denied.returncode != 0
            assert "error-name=com.coreos.update1.Error.AccessDenied" in denied.stderr, denied.stderr
            assert "Rollback is allowed to root only (caller uid 65534)" in denied.stderr
            assert attempter.rollbacks == 0
            # The loosened policy does delegate AttemptUpdate: the daemon leaves that to the policy.
            started = await run_tool(*AS_NOBODY, *busctl_call(private_bus, "AttemptUpdate"))
            assert started.returncode == 0, started.stderr
            assert attempter.attempts == 1
        finally:
            await h.close()


# --- update_engine_client ------------------------------------------------------------------------------------


async def test_client_status_prints_the_block(harness: Harness) -> None:
    await harness.serve(ScriptedAttempter(initial=status(S.DOWNLOADING, 0.5)))
    result = await run_tool(*client(harness.bus, "-status"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        f"LAST_CHECKED_TIME={CHECK_TIME}\nPROGRESS=0.500000\nCURRENT_OP=UPDATE_STATUS_DOWNLOADING\n"
        f"NEW_VERSION={VERSION}\nNEW_SIZE={SIZE}\nLAST_ERROR=\n"
    )


async def test_client_status_json_as_nobody_via_the_environment(harness: Harness) -> None:
    await harness.serve(ScriptedAttempter(initial=status(S.UPDATED_NEED_REBOOT)))
    env = {**CLIENT_ENV, "DBUS_SYSTEM_BUS_ADDRESS": harness.bus.address}
    result = await run_tool(*AS_NOBODY, CLIENT, "--status", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(
        f'{{"last_checked_time": {CHECK_TIME}, "progress": 0.0, '
        f'"current_operation": "UPDATE_STATUS_UPDATED_NEED_REBOOT", "new_version": "{VERSION}", '
        f'"new_size": {SIZE}, "last_attempt": null, '
    )


async def test_client_check_for_update_starts_a_check(harness: Harness) -> None:
    attempter = ScriptedAttempter(script=FINDS_NOTHING)
    await harness.serve(attempter)
    result = await run_tool(*client(harness.bus, "-check_for_update"))
    assert result.returncode == 0, result.stderr
    assert result.stderr == "Initiated update check.\n"
    assert attempter.attempts == 1


async def test_client_check_for_update_as_nobody_is_denied(harness: Harness) -> None:
    attempter = ScriptedAttempter()
    await harness.serve(attempter)
    result = await run_tool(*AS_NOBODY, *client(harness.bus, "-check_for_update"))
    assert result.returncode == 1
    assert result.stderr.startswith("AttemptUpdate: access denied; only root may call it")
    assert attempter.attempts == 0


async def test_client_reset_status(harness: Harness) -> None:
    attempter = ScriptedAttempter(initial=status(S.UPDATED_NEED_REBOOT))
    await harness.serve(attempter)
    result = await run_tool(*client(harness.bus, "-reset_status"))
    assert result.returncode == 0, result.stderr
    assert "disarmed the boot flags" in result.stderr
    assert attempter.snapshot().current_operation == S.IDLE.value
    attempter.report(status(S.FINALIZING))
    refused = await run_tool(*client(harness.bus, "-reset_status"))
    assert refused.returncode == 1
    assert refused.stderr == "ResetStatus refused: ResetStatus is not allowed in UPDATE_STATUS_FINALIZING\n"


async def test_client_rollback(harness: Harness) -> None:
    attempter = ScriptedAttempter()
    await harness.serve(attempter)
    armed = await run_tool(*client(harness.bus, "-rollback"))
    assert armed.returncode == 0, armed.stderr
    assert armed.stdout == f"Rollback armed; next boot: {ROLLBACK_TARGET}\n"
    attempter.rollback_target = None
    refused = await run_tool(*client(harness.bus, "-rollback"))
    assert refused.returncode == 1
    assert refused.stderr == f"Rollback refused: {attempter.refusal}\n"


async def test_client_says_when_update_engine_is_not_running(bus: PrivateBus) -> None:
    for action in ("-status", "-check_for_update", "-update", "-watch_for_updates"):
        result = await run_tool(*client(bus, action))
        assert (result.returncode, result.stdout) == (1, ""), action
        assert result.stderr == "update-engine is not running on this bus (com.coreos.update1 has no owner)\n"


async def test_client_waits_for_update_engine_to_appear(harness: Harness) -> None:
    waiting = asyncio.ensure_future(run_tool(*client(harness.bus, "-status", "--wait", "15")))
    await asyncio.sleep(0.5)
    assert not waiting.done()
    await harness.serve(ScriptedAttempter())
    result = await waiting
    assert result.returncode == 0, result.stderr
    assert "CURRENT_OP=UPDATE_STATUS_IDLE\n" in result.stdout


async def test_client_cannot_reach_the_bus(bus_dir: Path) -> None:
    result = await run_tool(CLIENT, "--bus-address", f"unix:path={bus_dir}/absent", "-status")
    assert result.returncode == 1
    assert result.stderr.startswith(f"cannot connect to unix:path={bus_dir}/absent: ")


def blocks(stdout: str) -> list[dict[str, str]]:
    parsed = []
    for chunk in stdout.strip().split("LAST_CHECKED_TIME=")[1:]:
        lines = ("LAST_CHECKED_TIME=" + chunk).splitlines()
        parsed.append(dict(line.split("=", 1) for line in lines))
    return parsed


async def run_update(harness: Harness, attempter: ScriptedAttempter) -> Result:
    await harness.serve(attempter)
    return await run_tool(*client(harness.bus, "-update", "--poll-interval", "0.2"))


async def test_client_update_follows_an_install_to_need_reboot(harness: Harness) -> None:
    result = await run_update(harness, ScriptedAttempter(script=INSTALLS))
    assert result.returncode == 0, result.stderr
    printed = blocks(result.stdout)
    assert printed, result.stdout
    assert printed[-1]["CURRENT_OP"] == "UPDATE_STATUS_UPDATED_NEED_REBOOT"
    assert printed[-1]["NEW_VERSION"] == VERSION
    assert result.stderr.endswith(f"Update installed ({VERSION}); reboot needed to use it.\n")


async def test_client_update_reports_a_failed_attempt(harness: Harness) -> None:
    result = await run_update(harness, ScriptedAttempter(script=FAILS_DOWNLOAD))
    assert result.returncode == 1
    assert blocks(result.stdout)[-1]["CURRENT_OP"] == "UPDATE_STATUS_IDLE"
    assert "Update failed (" in result.stderr
    assert "UPDATE_STATUS_REPORTING_ERROR_EVENT → UPDATE_STATUS_IDLE)" in result.stderr


async def test_client_update_without_an_update(harness: Harness) -> None:
    result = await run_update(harness, ScriptedAttempter(script=FINDS_NOTHING))
    assert result.returncode == 0, result.stderr
    assert result.stderr.endswith("No update available\n")


async def test_client_update_when_an_update_already_waits(harness: Harness) -> None:
    attempter = ScriptedAttempter(initial=status(S.UPDATED_NEED_REBOOT))
    result = await run_update(harness, attempter)
    assert result.returncode == 0, result.stderr
    assert f"An update to {VERSION} is already installed; reboot needed." in result.stderr
    assert attempter.attempts == 0


async def wait_for_text(stream: asyncio.StreamReader, text: str) -> str:
    seen = ""
    while text not in seen:
        chunk = await asyncio.wait_for(stream.read(4096), TIMEOUT)
        if not chunk:
            pytest.fail(f"stream ended before {text!r}; got {seen!r}")
        seen += chunk.decode()
    return seen


async def keep_reporting(attempter: ScriptedAttempter) -> None:
    for step in range(int(TIMEOUT * 10)):
        attempter.report(status(S.DOWNLOADING, (step % 100) / 100))
        await asyncio.sleep(0.1)


async def test_client_watch_prints_each_signal_until_interrupted(harness: Harness) -> None:
    attempter = ScriptedAttempter()
    await harness.serve(attempter)
    proc = await asyncio.create_subprocess_exec(
        *client(harness.bus, "-watch_for_updates"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=CLIENT_ENV,
    )
    try:
        assert proc.stderr is not None
        # The watcher prints nothing until a signal arrives, and it subscribes some time after starting: keep
        # changing the status (1 % steps, each one signalled) until its first entry shows.
        reporter = asyncio.ensure_future(keep_reporting(attempter))
        try:
            seen = await wait_for_text(proc.stderr, "  new_size: ")
        finally:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
        assert seen.startswith("Got status update:\n  last_checked_time: 1700000000\n  progress: ")
        assert "  current_operation: UPDATE_STATUS_DOWNLOADING\n" in seen
        assert "  new_version: 3815.2.0\n" in seen
        assert proc.returncode is None
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), TIMEOUT) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

