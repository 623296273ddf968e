"""utmp parsing and the wall-style reboot notice written to logged-in users' terminals."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from locksmithd.login1 import (
    USER_PROCESS,
    UTMP_RECORD,
    UtmpEntry,
    interactive_ttys,
    logged_in_ttys,
    notify_sessions,
    parse_utmp,
    wall_message,
)

LOGIN_PROCESS = 6
BOOT_TIME = 2
DEAD_PROCESS = 8


def utmp_record(kind: int, line: str, user: str = "core", pid: int = 100) -> bytes:
    return UTMP_RECORD.pack(
        kind, pid, line.encode(), b"ts/0", user.encode(), b"host", 0, 0, 0, 1_700_000_000, 0, 0, 0, 0, 0, b""
    )


def test_utmp_records() -> None:
    data = (
        utmp_record(BOOT_TIME, "~", "reboot")
        + utmp_record(LOGIN_PROCESS, "tty1", "LOGIN")
        + utmp_record(USER_PROCESS, "pts/0")
        + utmp_record(DEAD_PROCESS, "pts/1")
        + utmp_record(USER_PROCESS, "tty2", "root")
    )
    entries = parse_utmp(data + b"\0" * 17)  # a torn record at the end is ignored
    assert [e.line for e in entries] == ["~", "tty1", "pts/0", "pts/1", "tty2"]
    assert entries[2] == UtmpEntry(USER_PROCESS, 100, "pts/0", "core")
    assert interactive_ttys(entries) == ["pts/0", "tty2"]


def test_unsafe_or_duplicate_lines_are_skipped() -> None:
    entries = [
        UtmpEntry(USER_PROCESS, 1, "../etc/passwd", "x"),
        UtmpEntry(USER_PROCESS, 1, "/dev/tty1", "x"),
        UtmpEntry(USER_PROCESS, 1, "", "x"),
        UtmpEntry(USER_PROCESS, 1, "pts/3", "x"),
        UtmpEntry(USER_PROCESS, 2, "pts/3", "y"),
    ]
    assert interactive_ttys(entries) == ["pts/3"]


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=3 * UTMP_RECORD.size + 50))
def test_parse_utmp_never_raises(data: bytes) -> None:
    for line in interactive_ttys(parse_utmp(data)):
        assert not line.startswith("/") and ".." not in line.split("/")


def test_wall_message() -> None:
    text = wall_message(datetime(2024, 5, 2, 4, 0, tzinfo=UTC), timedelta(minutes=5))
    assert "Broadcast message from locksmithd at 2024-05-02 04:00:00 UTC:\a\a" in text
    assert "System reboot in 5 minutes!" in text
    assert "System reboot in 1 minute!" in wall_message(
        datetime(2024, 5, 2, tzinfo=UTC), timedelta(seconds=1)
    )


def test_notice_reaches_existing_terminals_only(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "dev/pts").mkdir(parents=True)
    (tmp_path / "dev/pts/0").write_text("")
    (tmp_path / "run/utmp").write_bytes(
        utmp_record(USER_PROCESS, "pts/0") + utmp_record(USER_PROCESS, "pts/7")
    )
    lines = logged_in_ttys(tmp_path)
    assert lines == ["pts/0", "pts/7"]
    reached = notify_sessions(tmp_path, lines, "reboot soon\n")
    assert reached == ["pts/0"]
    assert (tmp_path / "dev/pts/0").read_text() == "reboot soon\n"
    assert not (tmp_path / "dev/pts/7").exists()


def test_no_utmp_means_no_sessions(tmp_path: Path) -> None:
    assert logged_in_ttys(tmp_path) == []
