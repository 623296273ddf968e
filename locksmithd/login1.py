"""Talking to logind on the bus, and to the people logged in, before a reboot.

* logind ``org.freedesktop.login1.Manager.Reboot(false)``: one call, whose reply is checked (the original ignored
  it, so a refused reboot left the node waiting for a week); the reboot path decides when to ask again.
* whether logind could reboot now, without rebooting: someone owns ``org.freedesktop.login1`` and its
  ``CanReboot()`` answers ``yes`` or ``challenge`` (a logind without that method counts as able).
* interactive sessions from utmp: each gets a wall-style notice on its terminal, and the caller waits a grace
  period (with the lock held) so people can save their work.

Paths are under a configurable root (``/`` on a node) so tests can provide their own utmp and terminals.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path, PurePosixPath

from dbus_fast import Message
from dbus_fast.aio import MessageBus

from coreos_common.dbus import DBusCallError, call, get_name_owner

log = logging.getLogger(__name__)

LOGIN1_NAME = "org.freedesktop.login1"
LOGIN1_PATH = "/org/freedesktop/login1"
LOGIN1_MANAGER = "org.freedesktop.login1.Manager"
UTMP_FILE = "run/utmp"
USER_PROCESS = 7
# glibc's struct utmp on Linux (64-bit and 32-bit alike): ut_type, pad, ut_pid, ut_line[32], ut_id[4],
# ut_user[32], ut_host[256], ut_exit, ut_session, ut_tv (two int32), ut_addr_v6[4], reserved[20].
UTMP_RECORD = struct.Struct("=h2xi32s4s32s256shhi2i4i20s")
assert UTMP_RECORD.size == 384

ERROR_UNKNOWN_METHOD = "org.freedesktop.DBus.Error.UnknownMethod"


async def request_reboot(bus: MessageBus) -> None:
    """One ``Reboot(false)`` call; DBusCallError when logind refuses or is absent."""
    await call(
        bus,
        Message(
            destination=LOGIN1_NAME,
            path=LOGIN1_PATH,
            interface=LOGIN1_MANAGER,
            member="Reboot",
            signature="b",
            body=[False],
        ),
    )


async def reboot_problem(bus: MessageBus) -> str | None:
    """Why logind could not reboot now (absent, or ``CanReboot`` says no), or None when it could."""
    try:
        if await get_name_owner(bus, LOGIN1_NAME) is None:
            return f"{LOGIN1_NAME} is not on the bus"
        reply = await call(
            bus,
            Message(destination=LOGIN1_NAME, path=LOGIN1_PATH, interface=LOGIN1_MANAGER, member="CanReboot"),
            signature="s",
        )
    except DBusCallError as exc:
        if exc.name == ERROR_UNKNOWN_METHOD:
            return None
        return str(exc)
    except (OSError, EOFError) as exc:
        return f"the bus connection failed: {exc}"
    answer = reply.body[0]
    return None if answer in ("yes", "challenge") else f"logind's CanReboot answers {answer!r}"


@dataclass(frozen=True)
class UtmpEntry:
    type: int
    pid: int
    line: str
    user: str


def _c_string(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")


def parse_utmp(data: bytes) -> list[UtmpEntry]:
    """Decode whole utmp records; a trailing partial record is ignored."""
    entries = []
    for offset in range(0, len(data) - UTMP_RECORD.size + 1, UTMP_RECORD.size):
        fields = UTMP_RECORD.unpack_from(data, offset)
        entries.append(
            UtmpEntry(type=fields[0], pid=fields[1], line=_c_string(fields[2]), user=_c_string(fields[4]))
        )
    return entries


def interactive_ttys(entries: list[UtmpEntry]) -> list[str]:
    """Terminal lines (``pts/0``, ``tty1``) of logged-in users, without duplicates or unsafe paths."""
    lines: list[str] = []
    for entry in entries:
        if entry.type != USER_PROCESS or not entry.line:
            continue
        path = PurePosixPath(entry.line)
        if path.is_absolute() or ".." in path.parts or entry.line in lines:
            continue
        lines.append(entry.line)
    return lines


def wall_message(now: datetime, grace: timedelta) -> str:
    minutes = max(1, round(grace.total_seconds() / 60))
    when = f"{minutes} minute{'s' if minutes != 1 else ''}"
    header = f"Broadcast message from locksmithd at {now:%Y-%m-%d %H:%M:%S %Z}:"
    return f"\r\n{header}\a\a\r\n\r\nSystem reboot in {when}!\r\n"


def logged_in_ttys(root: Path) -> list[str]:
    """Lines of interactive sessions from ``<root>/run/utmp``; none when the file is missing or unreadable."""
    path = root / UTMP_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("cannot read %s to look for logged-in users: %s", path, exc.strerror or exc)
        return []
    return interactive_ttys(parse_utmp(data))


def notify_sessions(root: Path, lines: list[str], message: str) -> list[str]:
    """Write ``message`` to each existing ``<root>/dev/<line>``; returns the lines that were reached."""
    reached = []
    for line in lines:
        path = root / "dev" / line
        try:
            # No O_CREAT: only existing terminals. O_NONBLOCK: a stuck terminal must not stall the reboot.
            fd = os.open(path, os.O_WRONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_APPEND | os.O_CLOEXEC)
        except OSError as exc:
            log.warning("cannot write the reboot notice to %s: %s", path, exc.strerror or exc)
            continue
        try:
            os.write(fd, message.encode())
            reached.append(line)
        except OSError as exc:
            if exc.errno != errno.EAGAIN:
                log.warning("cannot write the reboot notice to %s: %s", path, exc.strerror or exc)
        finally:
            os.close(fd)
    return reached
