"""locksmithctl against real etcd and a private system bus: outputs, stderr lines and exit codes."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from coreos_common.status import INTERFACE, OBJECT_PATH
from locksmithd import __version__, ctl
from locksmithd.backends.etcd import ops
from locksmithd.backends.etcd.sync import SyncEtcdClient
from locksmithd.backends.etcd_settings import EtcdSettings
from locksmithd.semaphore import HolderRecord, Semaphore, holder_key, key_for_group
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


def holders_of(out: str) -> list[tuple[str, str, str]]:
    """The holder rows of ``status``: (machine id, age, host), checking the header and the age's form."""
    _, _, table = out.partition("\n\n")
    lines = table.splitlines()
    assert lines[0].split() == ["MACHINE", "ID", "AGE", "HOST"], out
    rows = []
    for line in lines[1:]:
        holder, age, *host = line.split()
        assert re.fullmatch(r"(\d+[hms])+|unknown", age), line
        rows.append((holder, age, " ".join(host)))
    return rows


# -- status, lock, unlock, set-max ---------------------------------------------------------------------------


def test_status_of_a_fresh_group(capsys: pytest.CaptureFixture[str], base: list[str]) -> None:
    assert run(capsys, *base, "status") == (0, "Available: 1\nMax: 1\n", "")


def test_lock_status_unlock_cycle(capsys: pytest.CaptureFixture[str], base: list[str]) -> None:
    assert run(capsys, *base, "lock") == (0, "", "")  # default id: etc/machine-id under --config-root
    code, out, err = run(capsys, *base, "status")
    assert (code, err) == (0, "") and out.startswith("Available: 0\nMax: 1\n\nMACHINE ID")
    assert [(h, host) for h, _, host in holders_of(out)] == [(MACHINE_ID, socket.gethostname())]
    assert run(capsys, *base, "lock", "other") == (1, "", "Error locking: semaphore is at 0\n")
    assert run(capsys, *base, "lock") == (0, "", "")  # the holder locking again is not an error
    assert run(capsys, *base, "unlock", "other") == (1, "", "Error unlocking: holder does not exist\n")
    assert run(capsys, *base, "unlock") == (0, "", "")
    assert run(capsys, *base, "status") == (0, "Available: 1\nMax: 1\n", "")


def test_set_max(capsys: pytest.CaptureFixture[str], base: list[str], etcd: EtcdCluster) -> None:
    assert run(capsys, *base, "lock", "a") == (0, "", "")
    assert run(capsys, *base, "set-max", "4") == (0, "Old-Max: 1\nMax: 4\n", "")
    code, out, _ = run(capsys, *base, "status")
    assert code == 0 and out.startswith("Available: 3\nMax: 4\n\n")
    assert [(h, host) for h, _, host in holders_of(out)] == [("a", "")]  # not this machine: no host
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
    doc = json.loads(out)
    details = doc.pop("holder_details")
    assert doc == {
        "group": group_of(base),
        "key": key_for_group(group_of(base)),
        "semaphore": 0,
        "max": 2,
        "holders": ["a", "b"],
        "local": None,  # no locksmithd runs under this root
    }
    assert [d["id"] for d in details] == ["a", "b"]
    for detail in details:
        assert detail["group"] == group_of(base) and detail["hostname"] == "" and detail["version"] == ""
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", detail["since"])
        assert 0 <= detail["age_seconds"] < 600


def test_status_json_shows_the_local_locksmithds_state(
    capsys: pytest.CaptureFixture[str], base: list[str], root: Path
) -> None:
    state = {"format": 1, "phase": "waiting-for-lock", "since": "2024-05-02T12:00:00+00:00", "position": 2}
    (root / "run/locksmithd").mkdir(parents=True)
    (root / "run/locksmithd/state.json").write_text(json.dumps(state))
    code, out, err = run(capsys, *base, "status", "--json")
    assert (code, err) == (0, "") and json.loads(out)["local"] == state
    (root / "run/locksmithd/state.json").write_text("{half")
    code, out, err = run(capsys, *base, "status", "--json")
    assert code == 0 and json.loads(out)["local"] is None
    assert err.startswith(f"Cannot show this node's locksmithd state: {root}/run/locksmithd/state.json is not JSON")


def test_group_after_the_subcommand_and_from_env(
    capsys: pytest.CaptureFixture[str], etcd: EtcdCluster, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    group = f"prod/database {next(_groups)}"
    ep = etcd.endpoints[0]
    assert run(capsys, "--endpoint", ep, "lock", "--group", group, "n1") == (0, "", "")
    assert etcd.get(key_for_group(group)) == b'{"semaphore":0,"max":1,"holders":["n1"]}'
    monkeypatch.setenv("LOCKSMITHCTL_ENDPOINT", ep)
    monkeypatch.setenv("LOCKSMITHCTL_GROUP", group)
    assert [h for h, _, _ in holders_of(run(capsys, "status")[1])] == ["n1"]
    # A flag given on the command line beats the environment.
    assert run(capsys, "-group=elsewhere", "status") == (0, "Available: 1\nMax: 1\n", "")


def test_unreachable_etcd_is_one_clear_line(capsys: pytest.CaptureFixture[str], root: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    code, out, err = run(capsys, "-endpoint", dead, "status")
    assert (code, out) == (1, "")
    assert err == f"Error initializing etcd client: no etcd endpoint answered ({dead}: connection refused)\n"


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
    assert [h for h, _, _ in holders_of(run(capsys, *base, "status")[1])] == [MACHINE_ID]
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
    store = SyncEtcdClient(EtcdSettings(endpoints=tuple(etcd.endpoints), group=group_of(base)))
    store.run(ops.apply(store.session, store.keys, lambda sem: sem.lock(MACHINE_ID)))
    stand_in = await start_login1(private_bus.address, fail_times=1)
    try:
        code = await asyncio.to_thread(ctl.main, [*base, "-bus-address", private_bus.address, "reboot"])
        assert code == 1
        assert "released" not in capsys.readouterr().err
    finally:
        stand_in.stop()
    assert store.run(ops.read(store.session, store.keys)).semaphore.holders == (MACHINE_ID,)
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


# -- contracts with scripts ----------------------------------------------------------------------------------


def locksmithctl(*argv: str, env: dict[str, str] | None = None, stdout: int | None = None) -> subprocess.Popen[str]:
    """The installed console script, as an operator runs it."""
    script = Path(sys.executable).with_name("locksmithctl")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LOCKSMITHCTL_")}
    environ.update(env or {})
    return subprocess.Popen(
        [str(script), *argv],
        stdout=subprocess.PIPE if stdout is None else stdout,
        stderr=subprocess.PIPE,
        text=True,
        env=environ,
    )


@pytest.mark.parametrize("flag", ["-h", "--help", "-help"])
def test_help_flag_prints_the_usage_and_succeeds(flag: str) -> None:
    proc = locksmithctl(flag)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, err) == (0, "")
    assert "GLOBAL OPTIONS:" in out and "flag provided but not defined" not in out


@pytest.mark.parametrize("argv", [("status",), ("status", "--json"), ("help",), ("-version",), ("help", "lock")])
def test_a_closed_stdout_ends_the_command_quietly(base: list[str], argv: tuple[str, ...]) -> None:
    """``locksmithctl status | head -0``: the reader is gone before anything is written."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = locksmithctl(*base, *argv, stdout=write_end)
    finally:
        os.close(write_end)
    _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err and "Error" not in err, err
    assert err == ""


def test_set_max_refuses_values_beyond_int64(
    capsys: pytest.CaptureFixture[str], base: list[str], etcd: EtcdCluster
) -> None:
    too_big = str(2**63)
    assert run(capsys, *base, "set-max", too_big) == (1, "", f"Invalid maximum value: {too_big}\n")
    assert etcd.get(key_for_group(group_of(base))) in (None, b'{"semaphore":1,"max":1,"holders":[]}')
    assert run(capsys, *base, "set-max", str(2**63 - 1))[0] == 0


def test_an_endpoint_that_is_not_etcd_is_one_line(capsys: pytest.CaptureFixture[str], root: Path) -> None:
    """A web server answering with an HTML error page: the endpoint and the HTTP status, not the page."""
    import http.server
    import threading

    class NotEtcd(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            page = b"<html>\n<head><title>404 Not Found</title></head>\n<body>\n" + b"<p>nothing here</p>\n" * 200
            self.send_response(404)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotEtcd)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        code, out, err = run(capsys, "-endpoint", endpoint, "status")
    finally:
        server.shutdown()
        server.server_close()
    assert (code, out) == (1, "")
    assert err.count("\n") == 1, err
    assert endpoint in err and "404" in err and "<" not in err


def test_unreachable_cluster_keeps_locksmiths_prefix(capsys: pytest.CaptureFixture[str], root: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    for argv in (("status",), ("lock", "x"), ("unlock", "x"), ("set-max", "2")):
        code, out, err = run(capsys, "-endpoint", dead, *argv)
        assert (code, out) == (1, "")
        assert err.startswith("Error initializing etcd client: ") and dead in err, err


def test_an_unparsable_debug_variable_is_not_fatal(
    capsys: pytest.CaptureFixture[str], base: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOCKSMITHCTL_DEBUG", "maybe")
    assert run(capsys, *base, "status") == (0, "Available: 1\nMax: 1\n", "")


def test_default_endpoints_are_locksmiths(capsys: pytest.CaptureFixture[str]) -> None:
    """locksmith tries etcd's client port, then etcd 2's; both in the usage and in what is reached."""
    code, out, _ = run(capsys, "help")
    assert code == 0 and "-endpoint=http://127.0.0.1:2379,http://127.0.0.1:4001" in out
    assert ctl.resolve_globals({}, {}).get("endpoint") == "http://127.0.0.1:2379,http://127.0.0.1:4001"


@pytest.mark.parametrize(
    "value",
    [b"[" * 100_000 + b"]" * 100_000, b'{"semaphore":1,"max":1,"holders":[' + b"[" * 50_000 + b"]" * 50_000 + b"]}",
     b'{"semaphore":1,"max":1,"holders":[],"pad":"' + b"x" * 1_200_000 + b'"}'],
    ids=["nested", "nested-holders", "huge"],
)
def test_a_corrupt_value_is_one_line_not_a_traceback(
    capsys: pytest.CaptureFixture[str], base: list[str], etcd: EtcdCluster, value: bytes
) -> None:
    """Deeply nested JSON (json.loads raises RecursionError) and values far beyond any semaphore."""
    key = key_for_group(group_of(base))
    etcd.put(key, value)
    for argv in (("status",), ("lock", "x"), ("unlock", "x"), ("set-max", "3")):
        code, out, err = run(capsys, *base, *argv)
        assert (code, out) == (1, ""), argv
        assert err.count("\n") == 1 and "corrupt" in err and key in err, err
        assert len(err) < 1000
    assert etcd.get(key) == value  # reported, never overwritten


# -- who holds the lock, since when ------------------------------------------------------------------------


def put_record(etcd: EtcdCluster, group: str, holder: str, seconds_ago: float, host: str) -> None:
    record = HolderRecord.at(time.time() - seconds_ago, host, group, "3975.2.1")
    etcd.put(holder_key(key_for_group(group), holder), record.encode())


def test_status_shows_each_holders_age_and_host(
    capsys: pytest.CaptureFixture[str], base: list[str], etcd: EtcdCluster
) -> None:
    """Records beside the semaphore give age and host; a holder without one (locksmith's, v2) is unknown."""
    group = group_of(base)
    etcd.put(key_for_group(group), Semaphore(0, 3, ("legacy", "new", "old")).encode())
    put_record(etcd, group, "old", 7 * 3600 + 5, "node-old")
    put_record(etcd, group, "new", 60, "node-new")
    put_record(etcd, group, "gone", 60, "node-gone")  # not a holder: never shown
    code, out, _ = run(capsys, *base, "status")
    assert code == 0
    rows = holders_of(out)
    assert [(h, host) for h, _, host in rows] == [("legacy", ""), ("new", "node-new"), ("old", "node-old")]
    ages = {h: age for h, age, _ in rows}
    assert ages["legacy"] == "unknown" and ages["old"].startswith("7h0m") and ages["new"].startswith("1m")
    details = {d["id"]: d for d in json.loads(run(capsys, *base, "status", "--json")[1])["holder_details"]}
    assert details["legacy"] == {
        "id": "legacy", "since": None, "age_seconds": None, "hostname": None, "group": None, "version": None
    }
    assert details["old"]["hostname"] == "node-old" and details["old"]["version"] == "3975.2.1"
    assert 7 * 3600 <= details["old"]["age_seconds"] < 7 * 3600 + 600


def test_unlock_older_than_releases_only_old_holders(
    capsys: pytest.CaptureFixture[str], base: list[str], etcd: EtcdCluster
) -> None:
    group = group_of(base)
    key = key_for_group(group)
    etcd.put(key, Semaphore(0, 3, ("legacy", "new", "old")).encode())
    put_record(etcd, group, "old", 7 * 3600, "node-old")
    put_record(etcd, group, "new", 60, "node-new")
    code, out, err = run(capsys, *base, "unlock", "--older-than", "6h")
    assert code == 0
    assert re.fullmatch(r"Unlocked old \(held since \S+Z, 7h0m\d+s, host node-old\)\n", out), out
    assert "Kept legacy: no record of when it took its slot" in err
    assert etcd.get(key) == b'{"semaphore":1,"max":3,"holders":["legacy","new"]}'
    assert etcd.get(holder_key(key, "old")) is None  # removed with the slot
    assert etcd.get(holder_key(key, "new")) is not None
    # In one transaction: the record's deletion has the revision of the semaphore's write.
    deleted = [rev for rev, value in etcd.key_history(holder_key(key, "old")) if value is None]
    assert deleted == [etcd.key_history(key)[-1][0]]
    assert run(capsys, *base, "unlock", "--older-than", "6h") == (
        0, "No holder has held its slot for longer than 6h0m0s.\n", "Kept legacy: no record of when it took "
        "its slot (an old locksmith, or the v2 semaphore)\n",
    )  # fmt: skip
    code, _, err = run(capsys, *base, "unlock", "--older-than", "soon")
    assert code == 2 and "--older-than" in err
    code, _, err = run(capsys, *base, "unlock", "--older-than", "1h", "someone")
    assert code == 2


def test_lock_and_unlock_write_and_remove_the_record_with_the_slot(
    capsys: pytest.CaptureFixture[str], base: list[str], etcd: EtcdCluster
) -> None:
    key = key_for_group(group_of(base))
    assert run(capsys, *base, "lock") == (0, "", "")
    record = HolderRecord.decode(etcd.get(holder_key(key, MACHINE_ID)) or b"")
    assert record is not None and record.hostname == socket.gethostname() and record.group == group_of(base)
    assert etcd.key_history(holder_key(key, MACHINE_ID))[-1][0] == etcd.key_history(key)[-1][0]
    assert run(capsys, *base, "unlock") == (0, "", "")
    assert etcd.get(holder_key(key, MACHINE_ID)) is None
