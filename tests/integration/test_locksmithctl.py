"""locksmithctl against real etcd and a private system bus: outputs, stderr lines and exit codes."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from coreos_common.status import INTERFACE, OBJECT_PATH
from locksmithd import __version__, ctl
from locksmithd.backends.etcd import EtcdSemaphoreStore
from locksmithd.backends.etcd_settings import EtcdSettings
from locksmithd.semaphore import key_for_group
from sim.bus import PrivateBus
from sim.etcd import EtcdCluster
from sim.ports import free_port
from sim.standins.login1 import Login1StandIn, start_login1
from tests.fixtures.etcd import start_cluster

pytestmark = pytest.mark.integration

MACHINE_ID = "0123456789abcdef0123456789abcdef"
_groups = iter(range(10**6))


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    cluster = start_cluster(1, tmp_path_factory.mktemp("etcd-ctl"))
    try:
        yield cluster
    finally:
        cluster.stop_all()


@pytest.fixture(autouse=True)
def _keep_logging_and_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """main() configures the root logger for a CLI; give the next test pytest's set-up back."""
    for name in list(os.environ):
        if name.startswith("LOCKSMITHCTL_"):
            monkeypatch.delenv(name)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A config root whose etc/machine-id names this test's machine."""
    (tmp_path / "root" / "etc").mkdir(parents=True)
    (tmp_path / "root" / "etc" / "machine-id").write_text(MACHINE_ID + "\n")
    return tmp_path / "root"


@pytest.fixture
def base(etcd: EtcdCluster, root: Path) -> list[str]:
    """Global flags reaching the test etcd with a group of this test's own."""
    return [f"-endpoint={etcd.endpoints[0]}", "-group", f"ctl-{next(_groups)}", "--config-root", str(root)]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = ctl.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def group_of(base: list[str]) -> str:
    return base[2]


# -- status, lock, unlock, set-max ---------------------------------------------------------------------------


def test_status_of_a_fresh_group(capsys: pytest.CaptureFixture[str], base: list[str]) -> None:
    assert run(capsys, *base, "status") == (0, "Available: 1\nMax: 1\n", "")


def test_lock_status_unlock_cycle(capsys: pytest.CaptureFixture[str], base: list[str]) -> None:
    assert run(capsys, *base, "lock") == (0, "", "")  # default id: etc/machine-id under --config-root
    assert run(capsys, *base, "status") == (0, f"Available: 0\nMax: 1\n\nMACHINE ID\n{MACHINE_ID}\n", "")
    assert run(capsys, *base, "lock", "other") == (1, "", "Error locking: semaphore is at 0\n")
    assert run(capsys, *base, "lock") == (0, "", "")  # the holder locking again is not an error
    assert run(capsys, *base, "unlock", "other") == (1, "", "Error unlocking: holder does not exist\n")
    assert run(capsys, *base, "unlock") == (0, "", "")
    assert run(capsys, *base, "status") == (0, "Available: 1\nMax: 1\n", "")


def test_set_max(capsys: pytest.CaptureFixture[str], base: list[str], etcd: EtcdCluster) -> None:
    assert run(capsys, *base, "lock", "a") == (0, "", "")
    assert run(capsys, *base, "set-max", "4") == (0, "Old-Max: 1\nMax: 4\n", "")
    assert run(capsys, *base, "status") == (0, "Available: 3\nMax: 4\n\nMACHINE ID\na\n", "")
    key = key_for_group(group_of(base))
    assert etcd.get(key) == b'{"semaphore":3,"max":4,"holders":["a"]}'
    assert run(capsys, *base, "set-max") == (1, "", "New maximum value must be set.\n")
    assert run(capsys, *base, "set-max", "x") == (1, "", "Invalid maximum value: x\n")
    code, _, err = run(capsys, *base, "set-max", "-1")
    assert code == 1 and err.startswith("Invalid maximum value: -1")
    assert etcd.get(key) == b'{"semaphore":3,"max":4,"holders":["a"]}'


def test_status_json(capsys: pytest.CaptureFixture[str], base: list[str]) -> None:
    run(capsys, *base, "lock", "b")
    run(capsys, *base, "set-max", "2")
    run(capsys, *base, "lock", "a")
    code, out, err = run(capsys, *base, "status", "--json")
    assert (code, err) == (0, "")
    assert json.loads(out) == {
        "group": group_of(base),
        "key": key_for_group(group_of(base)),
        "semaphore": 0,
        "max": 2,
        "holders": ["a", "b"],
    }


def test_group_after_the_subcommand_and_from_env(
    capsys: pytest.CaptureFixture[str], etcd: EtcdCluster, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    group = f"prod/database {next(_groups)}"
    ep = etcd.endpoints[0]
    assert run(capsys, "--endpoint", ep, "lock", "--group", group, "n1") == (0, "", "")
    assert etcd.get(key_for_group(group)) == b'{"semaphore":0,"max":1,"holders":["n1"]}'
    monkeypatch.setenv("LOCKSMITHCTL_ENDPOINT", ep)
    monkeypatch.setenv("LOCKSMITHCTL_GROUP", group)
    assert run(capsys, "status")[1].endswith("MACHINE ID\nn1\n")
    # A flag given on the command line beats the environment.
    assert run(capsys, "-group=elsewhere", "status") == (0, "Available: 1\nMax: 1\n", "")


def test_unreachable_etcd_is_one_clear_line(capsys: pytest.CaptureFixture[str], root: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    code, out, err = run(capsys, "-endpoint", dead, "status")
    assert (code, out) == (1, "")
    assert err == f"Error getting status: no etcd endpoint answered ({dead}: connection refused)\n"
    code, _, err = run(capsys, "-endpoint", dead, "set-max", "3")
    assert code == 1 and err.startswith("Error setting value: no etcd endpoint answered")


def test_bad_tls_settings_are_reported(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    code, out, err = run(capsys, "-etcd-certfile", str(cert), "status")
    assert (code, out) == (1, "")
    assert err == (
        "Error initializing etcd client: etcd client cert file given without a key file; both are needed\n"
    )


def test_the_holder_is_named_as_locksmithd_names_it(
    capsys: pytest.CaptureFixture[str], base: list[str], root: Path
) -> None:
    """An uppercase machine-id: locksmithd holds the lock as the lowercase id, so locksmithctl must too."""
    (root / "etc" / "machine-id").write_text(MACHINE_ID.upper() + "\n")
    assert run(capsys, *base, "lock") == (0, "", "")
    assert run(capsys, *base, "status") == (0, f"Available: 0\nMax: 1\n\nMACHINE ID\n{MACHINE_ID}\n", "")
    assert run(capsys, *base, "unlock", MACHINE_ID) == (0, "", "")


def test_missing_machine_id(capsys: pytest.CaptureFixture[str], etcd: EtcdCluster, tmp_path: Path) -> None:
    code, _, err = run(capsys, "-endpoint", etcd.endpoints[0], "-config-root", str(tmp_path), "lock")
    assert code == 1
    assert err.startswith(f"Cannot read machine-id: {tmp_path}/etc/machine-id:")


# -- usage ---------------------------------------------------------------------------------------------------


def test_help_and_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys)
    assert code == 0
    for heading in ("NAME:", "USAGE:", "VERSION:", "COMMANDS:", "GLOBAL OPTIONS:"):
        assert heading in out
    assert "\tset-max" in out and "-etcd-cafile" in out
    assert run(capsys, "help")[1] == out
    code, out, _ = run(capsys, "help", "set-max")
    assert code == 0 and "set-max [--group G] N" in out
    assert run(capsys, "help", "frobnicate") == (1, "", "Unrecognized command: frobnicate\n")
    assert run(capsys, "frobnicate") == (
        2,
        "",
        "locksmithctl: unknown subcommand: \"frobnicate\"\nRun 'locksmithctl help' for usage.\n",
    )
    code, out, err = run(capsys, "-no-such-flag", "status")
    assert (code, out) == (2, "")
    assert err.startswith("flag provided but not defined: -no-such-flag\nNAME:")
    code, _, err = run(capsys, "-endpoint")
    assert code == 2 and err.startswith("flag needs an argument: -endpoint")
    assert run(capsys, "-version") == (0, f"locksmithctl version {__version__}\n", "")
    assert run(capsys, "--version=true", "status") == (0, f"locksmithctl version {__version__}\n", "")


def test_console_entry_point_exit_status() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "locksmithd.ctl", "frobnicate"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert 'unknown subcommand: "frobnicate"' in proc.stderr


# -- D-Bus: send-need-reboot and reboot ----------------------------------------------------------------------


async def test_send_need_reboot_emits_status_update(
    capsys: pytest.CaptureFixture[str], private_bus: PrivateBus
) -> None:
    listener = await MessageBus(bus_address=private_bus.address).connect()
    received: list[Message] = []
    got = asyncio.Event()

    def on_message(message: Message) -> None:
        if message.message_type == MessageType.SIGNAL and message.member == "StatusUpdate":
            received.append(message)
            got.set()

    listener.add_message_handler(on_message)
    rule = f"type='signal',interface='{INTERFACE}',member='StatusUpdate'"
    reply = await listener.call(
        Message(
            destination="org.freedesktop.DBus",
            path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus",
            member="AddMatch",
            signature="s",
            body=[rule],
        )
    )
    assert reply is not None and reply.message_type == MessageType.METHOD_RETURN
    try:
        code = await asyncio.to_thread(ctl.main, ["-bus-address", private_bus.address, "send-need-reboot"])
        assert code == 0
        await asyncio.wait_for(got.wait(), 10)
    finally:
        listener.disconnect()
    signal = received[0]
    assert (signal.path, signal.interface, signal.signature) == (OBJECT_PATH, INTERFACE, "xdssx")
    assert signal.body[2] == "UPDATE_STATUS_UPDATED_NEED_REBOOT"
    assert capsys.readouterr() == ("", "")


async def test_send_need_reboot_without_a_bus(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = ["-bus-address", f"unix:path={tmp_path}/none", "send-need-reboot"]
    code = await asyncio.to_thread(ctl.main, argv)
    assert code == 1
    assert capsys.readouterr().err.startswith("error connecting to system dbus:")


def _needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("the bus policy lets only root own org.freedesktop.login1 (CI runs as root)")


async def test_reboot_takes_the_lock_then_asks_logind(
    capsys: pytest.CaptureFixture[str], base: list[str], private_bus: PrivateBus, etcd: EtcdCluster
) -> None:
    _needs_root()
    stand_in = await start_login1(private_bus.address)
    try:
        code = await asyncio.to_thread(ctl.main, [*base, "-bus-address", private_bus.address, "reboot"])
        assert (code, capsys.readouterr()) == (0, ("", ""))
        assert stand_in.manager.reboots == [False]
    finally:
        stand_in.stop()
    holders = json.loads(etcd.get(key_for_group(group_of(base))) or b"{}")["holders"]
    assert holders == [MACHINE_ID]


async def test_refused_reboot_releases_the_lock_it_took(
    capsys: pytest.CaptureFixture[str], base: list[str], private_bus: PrivateBus, etcd: EtcdCluster
) -> None:
    _needs_root()
    stand_in = await start_login1(private_bus.address, fail_times=1)
    try:
        code = await asyncio.to_thread(ctl.main, [*base, "-bus-address", private_bus.address, "reboot"])
        err = capsys.readouterr().err
        assert code == 1
        assert err.startswith("Error rebooting: org.freedesktop.login1.OperationInProgress")
        assert f"released the lock of {MACHINE_ID} again" in err
        assert stand_in.manager.refused == [("Reboot", False)]
        assert stand_in.manager.reboots == []
    finally:
        stand_in.stop()
    assert etcd.get(key_for_group(group_of(base))) == b'{"semaphore":1,"max":1,"holders":[]}'


async def test_refused_reboot_keeps_a_lock_held_before(
    capsys: pytest.CaptureFixture[str], base: list[str], private_bus: PrivateBus, etcd: EtcdCluster
) -> None:
    """The machine already held the lock (its daemon is mid-reboot): a failed ``reboot`` must not drop it."""
    _needs_root()
    store = EtcdSemaphoreStore(EtcdSettings(endpoints=tuple(etcd.endpoints), group=group_of(base)))
    store.update(lambda sem: sem.lock(MACHINE_ID))
    stand_in = await start_login1(private_bus.address, fail_times=1)
    try:
        code = await asyncio.to_thread(ctl.main, [*base, "-bus-address", private_bus.address, "reboot"])
        assert code == 1
        assert "released" not in capsys.readouterr().err
    finally:
        stand_in.stop()
    assert store.get()[0].holders == (MACHINE_ID,)
    store.close()


async def test_reboot_when_full_does_not_call_logind(
    capsys: pytest.CaptureFixture[str], base: list[str], private_bus: PrivateBus, login1: Login1StandIn
) -> None:
    _needs_root()
    assert await asyncio.to_thread(ctl.main, [*base, "lock", "someone-else"]) == 0
    code = await asyncio.to_thread(ctl.main, [*base, "-bus-address", private_bus.address, "reboot"])
    assert (code, capsys.readouterr().err) == (1, "Error locking: semaphore is at 0\n")
    assert login1.manager.calls == []


def test_reboot_needs_root(
    capsys: pytest.CaptureFixture[str], base: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert run(capsys, *base, "reboot") == (1, "", "Must be root to initiate reboot.\n")
