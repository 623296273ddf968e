"""Logging for journald: syslog priority prefixes under systemd, timestamps on a terminal, values escaped.

Rules:
* One decision, one line.  The values a message carries (the arguments of ``log.info("… %s", value)``: a
  server's answer, a file's content, an exception's text) are escaped before they are put into the message:
  control characters, including newline and carriage return, become ``\\n``, ``\\r``, ``\\x1b``… and the Unicode
  line separators ``\\u2028``/``\\u2029`` likewise, so no input can end the line and forge another (with its own
  ``<N>`` priority under journald) or repaint a terminal.  The message format itself is the program's and is
  left alone; a traceback keeps its lines, each with the record's priority.
* Under journald (``JOURNAL_STREAM`` names our stderr) every line starts with ``<N>``, the syslog priority
  journald reads (sd-daemon(3)); on a terminal lines carry a timestamp, the program and the level.
* A warning that anyone can provoke at will (a forged D-Bus signal) goes through ``RepeatedWarning``: the
  first of a burst is logged in full, the rest are counted and summed up in one line per interval while they
  keep coming, so a flood costs a few lines a minute, not one line per message.
"""

from __future__ import annotations

import asyncio
import logging
import numbers
import os
import re
import sys
from collections.abc import Mapping

from coreos_common.goduration import format_go_duration

_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_character(match: re.Match[str]) -> str:
    char = match.group()
    short = _SHORT_ESCAPES.get(char)
    if short is not None:
        return short
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def escape_control(text: str) -> str:
    """``text`` with every control character and line separator written as a backslash escape."""
    return _CONTROL.sub(_escape_character, text)


class _EscapedValue:
    """Stands for one logged value in ``%`` formatting: its ``str`` and ``repr`` come out escaped."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __str__(self) -> str:
        return escape_control(str(self.value))

    def __repr__(self) -> str:
        return escape_control(repr(self.value))


def _escaped_arg(value: object) -> object:
    # Numbers cannot carry a line break, and %d / %.1f need the number itself.
    return value if isinstance(value, numbers.Number) else _EscapedValue(value)


def escaped_record(record: logging.LogRecord) -> logging.LogRecord:
    """A copy of ``record`` whose message is formatted with escaped values (the record itself if it has none)."""
    args = record.args
    if not args and isinstance(record.msg, str):
        return record
    try:
        if not args:
            message = escape_control(str(record.msg))  # a value logged on its own, e.g. log.error(exc)
        elif isinstance(args, Mapping):
            message = str(record.msg) % {key: _escaped_arg(value) for key, value in args.items()}
        else:
            message = str(record.msg) % tuple(_escaped_arg(value) for value in args)
    except (TypeError, ValueError, KeyError):
        # A conversion the stand-in cannot serve: format as logging would, then escape the whole line.
        message = escape_control(record.getMessage())
    copy = logging.makeLogRecord(record.__dict__)
    copy.msg, copy.args = message, None
    return copy


class EscapingFormatter(logging.Formatter):
    """A Formatter that escapes the values of each message (see the module's rules)."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(escaped_record(record))


class JournalPrefixFormatter(EscapingFormatter):
    """``<N>message``: journald reads the prefix as the line's priority (sd-daemon(3))."""

    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        text = super().format(record)
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines() or [""])


def under_journald() -> bool:
    """True when stderr is connected to the journal (systemd sets JOURNAL_STREAM=dev:inode)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    if not stream:
        return False
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return st.st_dev == dev and st.st_ino == ino


def setup(program: str, verbose: bool = False) -> None:
    """Configure the root logger once for a daemon or CLI named ``program``."""
    handler = logging.StreamHandler(sys.stderr)
    if under_journald():
        handler.setFormatter(JournalPrefixFormatter("%(message)s"))
    else:
        handler.setFormatter(EscapingFormatter(f"%(asctime)s {program} %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # Libraries chatter at INFO; the journal wants our decisions, not their connection pools.
    for noisy in ("aiohttp.access", "urllib3", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class RepeatedWarning:
    """One kind of warning, logged in full once per burst and then counted (see the module's rules).

    ``warn`` is called for each occurrence from the event loop; while a burst lasts, every ``interval`` seconds
    one line says how many more came and shows the last of them. ``total`` counts every occurrence (metrics).
    """

    def __init__(self, logger: logging.Logger, what: str, interval: float = 60.0) -> None:
        self.logger = logger
        self.what = what
        self.interval = interval
        self.total = 0
        self._counted = 0
        self._last = ""
        self._timer: asyncio.TimerHandle | None = None

    def warn(self, message: str, *args: object) -> None:
        self.total += 1
        if self._timer is None:
            self.logger.warning(message, *args)
            self._timer = asyncio.get_running_loop().call_later(self.interval, self._summarize)
            return
        self._counted += 1
        self._last = message % args if args else message

    def _summarize(self) -> None:
        if not self._counted:
            self._timer = None  # the burst is over: the next one is logged in full again
            self.logger.debug("No more %s for %s: the next one is logged in full", self.what,
                              format_go_duration(self.interval))
            return
        self.logger.warning(
            "%d more %s in the last %s; the last: %s", self._counted, self.what, format_go_duration(self.interval),
            self._last,
        )
        self._counted = 0
        self._timer = asyncio.get_running_loop().call_later(self.interval, self._summarize)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
