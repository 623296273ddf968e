"""sd_notify for both daemons: what reaches systemd's notify socket, and when the watchdog is ours to ping."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import tempfile
from collections.abc import Iterator

import pytest

from coreos_common.notify import SystemdNotifier, watchdog_interval

WAIT = 10.0  # bound on any single wait; passing runs take a fraction of it


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket standing where systemd's notify socket would be (short path: AF_UNIX limit)."""
    for name in ("WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    with tempfile.TemporaryDirectory(prefix="notify-") as directory:
        path = f"{directory}/s"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(WAIT)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        try:
            yield sock
        finally:
            sock.close()


def received(sock: socket.socket) -> list[str]:
    """Every datagram waiting on the socket now."""
    messages = []
    sock.setblocking(False)
    try:
        while True:
            messages.append(sock.recv(4096).decode())
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(WAIT)
    return messages


def test_ready_status_and_stopping_reach_systemd(notify_socket: socket.socket) -> None:
    notifier = SystemdNotifier()
    notifier.ready("UPDATE_STATUS_IDLE")
    notifier.status("UPDATE_STATUS_IDLE")  # already told with READY
    notifier.status("UPDATE_STATUS_CHECKING_FOR_UPDATE")
    notifier.stopping()
    notifier.ready()
    assert received(notify_socket) == [
        "READY=1\nSTATUS=UPDATE_STATUS_IDLE",
        "STATUS=UPDATE_STATUS_CHECKING_FOR_UPDATE",
        "STOPPING=1",
        "READY=1",
    ]


def test_status_is_sent_only_when_its_text_changes(notify_socket: socket.socket) -> None:
    notifier = SystemdNotifier()
    for text in ("DOWNLOADING 10%", "DOWNLOADING 10%", "DOWNLOADING 11%", "DOWNLOADING 11%", "IDLE", "IDLE"):
        notifier.status(text)
    assert received(notify_socket) == ["STATUS=DOWNLOADING 10%", "STATUS=DOWNLOADING 11%", "STATUS=IDLE"]


def test_nothing_is_sent_when_not_started_by_systemd(
    notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET")
    notifier = SystemdNotifier()
    notifier.ready("x")
    notifier.status("y")
    assert not notifier.enabled
    assert received(notify_socket) == []


async def test_watchdog_pings_at_half_the_interval_systemd_asked_for(
    notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = SystemdNotifier()
    with caplog.at_level(logging.INFO):
        task = asyncio.create_task(notifier.run_watchdog())
        try:
            pings = [await asyncio.to_thread(notify_socket.recv, 64) for _ in range(3)]
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    assert pings == [b"WATCHDOG=1"] * 3
    assert "systemd watchdog enabled: pinging every 0.1 s" in caplog.text


@pytest.mark.parametrize(
    "variables",
    [
        {},
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": ""},
        {"WATCHDOG_USEC": "twenty"},
        {"WATCHDOG_USEC": "-5"},
        # systemd sets WATCHDOG_PID to the main process: a child or an exec'd helper that inherited the
        # variables must not keep a dead daemon's watchdog happy.
        {"WATCHDOG_USEC": "100000", "WATCHDOG_PID": "1"},
    ],
)
async def test_no_watchdog_unless_systemd_asks_this_process_for_one(
    variables: dict[str, str], notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    await asyncio.wait_for(SystemdNotifier().run_watchdog(), WAIT)  # returns at once instead of looping
    assert received(notify_socket) == []


def test_watchdog_interval_rule() -> None:
    asked = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "20000000"}
    assert watchdog_interval(asked, 42) == 10.0
    assert watchdog_interval({**asked, "WATCHDOG_PID": "42"}, 42) == 10.0
    assert watchdog_interval({**asked, "WATCHDOG_PID": "1"}, 42) is None
    assert watchdog_interval({"WATCHDOG_USEC": "20000000"}, 42) is None  # nowhere to send the pings
    assert watchdog_interval({}, 42) is None
