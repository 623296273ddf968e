"""Log lines as journald and a terminal show them: priority prefixes under systemd, timestamped lines elsewhere."""

from __future__ import annotations

import io
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from coreos_common import logs


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, restored after the test (``setup`` replaces its handlers)."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    noisy = {name: logging.getLogger(name).level for name in ("aiohttp.access", "urllib3", "asyncio")}
    try:
        yield root
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        for name, level in noisy.items():
            logging.getLogger(name).setLevel(level)


def record(level: int, message: str) -> logging.LogRecord:
    return logging.LogRecord("update_engine", level, __file__, 1, message, None, None)


@pytest.mark.parametrize(
    ("level", "prefix"),
    [
        (logging.CRITICAL, "<2>"),
        (logging.ERROR, "<3>"),
        (logging.WARNING, "<4>"),
        (logging.INFO, "<6>"),
        (logging.DEBUG, "<7>"),
        (25, "<6>"),  # a custom level between INFO and WARNING reads as info
        (35, "<3>"),  # one above WARNING reads as an error
    ],
)
def test_journal_prefix_is_the_syslog_priority(level: int, prefix: str) -> None:
    text = logs.JournalPrefixFormatter("%(message)s").format(record(level, "Update check failed"))
    assert text == f"{prefix}Update check failed"


def test_every_line_of_a_multi_line_message_keeps_its_priority() -> None:
    text = logs.JournalPrefixFormatter("%(message)s").format(record(logging.ERROR, "first\nsecond\nthird"))
    assert text.splitlines() == ["<3>first", "<3>second", "<3>third"]


def test_traceback_lines_are_prefixed_too() -> None:
    try:
        raise RuntimeError("disk went away")
    except RuntimeError:
        rec = logging.LogRecord("update_engine", logging.ERROR, __file__, 1, "attempt failed", None, sys.exc_info())
    lines = logs.JournalPrefixFormatter("%(message)s").format(rec).splitlines()
    assert lines[0] == "<3>attempt failed"
    assert lines[-1] == "<3>RuntimeError: disk went away"
    assert all(line.startswith("<3>") for line in lines)


def test_empty_message_still_carries_a_priority() -> None:
    assert logs.JournalPrefixFormatter("%(message)s").format(record(logging.WARNING, "")) == "<4>"


def _stream_id(stream: io.TextIOBase) -> str:
    st = os.fstat(stream.fileno())
    return f"{st.st_dev}:{st.st_ino}"


def test_journald_is_detected_only_when_stderr_is_the_journal_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with (tmp_path / "journal").open("w") as journal, (tmp_path / "other").open("w") as other:
        monkeypatch.setattr(sys, "stderr", journal)
        monkeypatch.setenv("JOURNAL_STREAM", _stream_id(journal))
        assert logs.under_journald()
        # stderr redirected elsewhere (e.g. `update_engine 2>file` run from a unit's shell): not the journal.
        monkeypatch.setenv("JOURNAL_STREAM", _stream_id(other))
        assert not logs.under_journald()


@pytest.mark.parametrize("value", ["", "garbage", "1:2:3", "12:"])
def test_missing_or_malformed_journal_stream_means_a_terminal(
    value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with (tmp_path / "stderr").open("w") as stream:
        monkeypatch.setattr(sys, "stderr", stream)
        monkeypatch.setenv("JOURNAL_STREAM", value)
        assert not logs.under_journald()


def test_stderr_without_a_file_descriptor_is_not_the_journal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.setenv("JOURNAL_STREAM", "1:1")
    assert not logs.under_journald()


def test_setup_under_journald_writes_priority_prefixed_lines(
    root_logger: logging.Logger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "journal"
    with path.open("w") as journal:
        monkeypatch.setattr(sys, "stderr", journal)
        monkeypatch.setenv("JOURNAL_STREAM", _stream_id(journal))
        logs.setup("update_engine")
        logging.getLogger("update_engine").warning("Omaha server %s unreachable", "example.test")
        logging.getLogger("update_engine").debug("not shown without --verbose")
        journal.flush()
    assert path.read_text() == "<4>Omaha server example.test unreachable\n"


def test_setup_on_a_terminal_names_the_program_and_the_level(
    root_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    logs.setup("locksmithd")
    logging.getLogger("locksmithd").info("Reboot strategy: %s", "etcd-lock")
    line = out.getvalue()
    assert line.endswith(" locksmithd INFO Reboot strategy: etcd-lock\n")
    assert line[:4].isdigit()  # begins with the timestamp (year)


def test_verbose_shows_debug_lines(root_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    logs.setup("update_engine", verbose=True)
    logging.getLogger("update_engine").debug("response body: <response/>")
    assert "update_engine DEBUG response body: <response/>" in out.getvalue()


def test_setup_twice_does_not_duplicate_lines(root_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    logs.setup("update_engine")
    logs.setup("update_engine")
    logging.getLogger("update_engine").info("Status UPDATE_STATUS_IDLE")
    assert out.getvalue().count("Status UPDATE_STATUS_IDLE") == 1


def test_library_chatter_below_warning_is_kept_out(
    root_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    logs.setup("update_engine", verbose=True)
    logging.getLogger("aiohttp.access").info("127.0.0.1 GET /v1/update/ 200")
    logging.getLogger("asyncio").debug("Using selector: EpollSelector")
    logging.getLogger("urllib3").warning("Connection pool is full")
    assert "GET /v1/update/" not in out.getvalue()
    assert "EpollSelector" not in out.getvalue()
    assert "Connection pool is full" in out.getvalue()


# -- values cannot forge lines -------------------------------------------------------------------------------


def formatted(fmt: logging.Formatter, message: str, *args: object) -> str:
    return fmt.format(logging.LogRecord("update_engine", logging.INFO, __file__, 1, message, args, None))


FORGERY = "stable\n<3>update_engine: Update installed, rebooting now"


@pytest.mark.parametrize(
    "formatter",
    [logs.JournalPrefixFormatter("%(message)s"), logs.EscapingFormatter("%(asctime)s locksmithd %(message)s")],
)
def test_a_value_cannot_end_the_line_and_forge_another(formatter: logging.Formatter) -> None:
    text = formatted(formatter, "GROUP changed to %s", FORGERY)
    assert len(text.splitlines()) == 1
    assert text.endswith("GROUP changed to stable\\n<3>update_engine: Update installed, rebooting now")


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("a\rb", "a\\rb"),
        ("tab\there", "tab\\there"),
        ("\x1b[2J\x1b[31mred", "\\x1b[2J\\x1b[31mred"),
        ("nul\x00", "nul\\x00"),
        ("del\x7f c1\x85", "del\\x7f c1\\x85"),
        ("line\u2028sep\u2029para", "line\\u2028sep\\u2029para"),
        ("plain ünïcode, quotes ' \" and \\ stay", "plain ünïcode, quotes ' \" and \\ stay"),
    ],
)
def test_control_characters_in_values_are_escaped(value: str, shown: str) -> None:
    assert formatted(logs.JournalPrefixFormatter("%(message)s"), "got %s", value) == f"<6>got {shown}"


def test_every_kind_of_value_is_escaped_and_numbers_keep_their_format() -> None:
    fmt = logs.JournalPrefixFormatter("%(message)s")
    error = ValueError("bad answer\nforged")
    assert formatted(fmt, "%s: %r after %d tries (%.1f s)", error, "x\ny", 3, 2.25) == (
        "<6>bad answer\\nforged: 'x\\ny' after 3 tries (2.2 s)"
    )
    assert formatted(fmt, "from %s", Path("/etc/a\nb")) == "<6>from /etc/a\\nb"
    rec = logging.LogRecord("u", logging.INFO, __file__, 1, "%(who)s at %(n)d", ({"who": "a\nb", "n": 7},), None)
    assert fmt.format(rec) == "<6>a\\nb at 7"
    rec = logging.LogRecord("u", logging.ERROR, __file__, 1, error, None, None)  # log.error(exc)
    assert fmt.format(rec) == "<3>bad answer\\nforged"


def test_the_message_format_and_a_traceback_keep_their_lines() -> None:
    fmt = logs.JournalPrefixFormatter("%(message)s")
    assert formatted(fmt, "first %s\nsecond", "x").splitlines() == ["<6>first x", "<6>second"]
    try:
        raise RuntimeError("disk went away")
    except RuntimeError:
        rec = logging.LogRecord("u", logging.ERROR, __file__, 1, "failed: %s", ("a\nb",), sys.exc_info())
    lines = fmt.format(rec).splitlines()
    assert lines[0] == "<3>failed: a\\nb" and lines[-1] == "<3>RuntimeError: disk went away" and len(lines) > 2


def test_setup_escapes_values_in_what_the_daemons_write(
    root_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    logs.setup("update_engine")
    logging.getLogger("update_engine").warning("Omaha answered %s", FORGERY)
    assert len(out.getvalue().splitlines()) == 1
