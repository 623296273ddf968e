"""update.conf and its kin: the file lookup order and the literal ``KEY=value`` parser both daemons use.

Rules: the files are literal ``KEY=value`` lists, read the way the original update_engine reads them: the first
file in the lookup order that names a key decides its value, even when that value is empty (``SERVER=``
really means an empty server).  We add comments and blank lines, and we report malformed lines with
``file:line`` instead of silently inventing keys from them.  A value is never repeated in a message (it may be
a password).

Fail closed: a file of the lookup that is missing is simply not there, but one that exists and cannot be read
whole (unreadable, a directory, a FIFO, a device, a symlink to ``/dev/zero``, larger than 64 KiB) raises
``SettingsFileError``: its ``SERVER=disabled`` or ``REBOOT_STRATEGY=off`` must not be lost by acting on the
defaults.  Reads are bounded and never block (``O_NONBLOCK``, ``fstat``, regular files only).

The parsing and merging are pure; ``load_key_value_files`` and ``load_update_conf`` are the thin I/O shells
around them.  Every path is relative to a ``root`` so tests and the demo can use a temporary tree.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

# Overrides before defaults; within a level the CoreOS path before the Flatcar one.
UPDATE_CONF_FILES: tuple[str, ...] = (
    "etc/coreos/update.conf",
    "etc/flatcar/update.conf",
    "usr/share/coreos/update.conf",
    "usr/share/flatcar/update.conf",
    "usr/share/coreos/release",
    "usr/share/flatcar/release",
)

# A configuration file larger than this is a mistake (or a device), not configuration.
MAX_CONFIG_FILE_BYTES = 64 * 1024

_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class ConfigIssue:
    """A problem in one configuration file; ``line`` is 1-based, 0 when it concerns the whole file."""

    source: str
    line: int
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line else self.source
        return f"{where}: {self.message}"


@dataclass(frozen=True)
class ParsedFile:
    source: str
    values: dict[str, str]
    issues: list[ConfigIssue] = field(default_factory=list)


@dataclass(frozen=True)
class MergedConfig:
    """Key values after the first-file-wins merge, with the file each one came from.

    ``ranks`` holds the position of that file in the merged sequence, so that a setting spelled two ways
    (``COREOS_RELEASE_VERSION`` / ``FLATCAR_RELEASE_VERSION``) can still follow the first-file-wins rule.
    """

    values: dict[str, str] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    issues: list[ConfigIssue] = field(default_factory=list)

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.values.get(key, default)

    def first_of(self, *names: str) -> str | None:
        """Value of the first of ``names`` by file order; within one file the earlier name wins."""
        key = self.first_key_of(*names)
        return None if key is None else self.values[key]

    def first_key_of(self, *names: str) -> str | None:
        """Which of ``names`` decides (see ``first_of``), or None when no file names any of them."""
        candidates = [(self.ranks[name], i, name) for i, name in enumerate(names) if name in self.values]
        if not candidates:
            return None
        return min(candidates)[2]


def _describe_bad_key(key: str) -> str:
    shown = key if len(key) <= 40 else key[:40] + "…"
    stripped = key.strip()
    if stripped.startswith("export ") and _KEY_RE.fullmatch(stripped[len("export ") :].strip()):
        return f"invalid key {shown!r}: 'export' is not supported, write KEY=value"
    if stripped != key and _KEY_RE.fullmatch(stripped):
        return f"invalid key {shown!r}: no spaces are allowed around the key or '=', write {stripped}=value"
    return f"invalid key {shown!r}: keys are letters, digits and '_', not starting with a digit"


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def parse_key_values(text: str, source: str) -> ParsedFile:
    """Parse literal ``KEY=value`` lines; never raises, malformed lines become issues and are skipped.

    Values are not trimmed (``A= b`` is `` b``); one pair of matching quotes around the whole value is
    removed; the last occurrence of a key wins.  Messages about malformed lines never repeat the value, which
    may be a password.
    """
    values: dict[str, str] = {}
    issues: list[ConfigIssue] = []
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw[:-1] if raw.endswith("\r") else raw
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            issues.append(ConfigIssue(source, number, "line has no '='; expected KEY=value"))
            continue
        if not key:
            issues.append(ConfigIssue(source, number, "line starts with '='; expected KEY=value"))
            continue
        if not _KEY_RE.fullmatch(key):
            issues.append(ConfigIssue(source, number, _describe_bad_key(key)))
            continue
        values[key] = _unquote(value)
    return ParsedFile(source=source, values=values, issues=issues)


def merge_first_wins(files: Sequence[ParsedFile]) -> MergedConfig:
    """For every key the first file (in the given order) containing it decides, even with an empty value."""
    merged = MergedConfig()
    for rank, parsed in enumerate(files):
        merged.issues.extend(parsed.issues)
        for key, value in parsed.values.items():
            if key not in merged.values:
                merged.values[key] = value
                merged.sources[key] = parsed.source
                merged.ranks[key] = rank
    return merged


# Issues already logged by this process: the configuration is re-read at every check and one warning per
# problem is enough.
_reported_issues: set[ConfigIssue] = set()


def _report(issues: Sequence[ConfigIssue], reported: set[ConfigIssue]) -> None:
    for issue in issues:
        if issue not in reported:
            reported.add(issue)
            log.warning("configuration problem: %s", issue)


class SettingsFileError(Exception):
    """Settings files that exist but cannot be read whole; ``issues`` names each file and its problem.

    Acting on the defaults instead would silently drop what those files say (``SERVER=disabled``,
    ``REBOOT_STRATEGY=off``), so a caller must not go on as if they were absent.
    """

    def __init__(self, issues: Sequence[ConfigIssue]) -> None:
        self.issues = tuple(issues)
        super().__init__("; ".join(str(issue) for issue in self.issues))


_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _kind_of(mode: int) -> str:
    return next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")


def _read_text_file(path: Path, limit: int) -> tuple[str | None, list[ConfigIssue], ConfigIssue | None]:
    """Text of ``path`` (None when there is no such file), warnings, and why it cannot be read whole, if so.

    Never blocks: the file is opened with O_NONBLOCK and must be a regular file of at most ``limit`` bytes, so a
    FIFO, a device or a symlink to ``/dev/zero`` is refused without being read.
    """
    source = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        return None, [], None
    except OSError as exc:
        return None, [], ConfigIssue(source, 0, f"cannot be opened: {exc.strerror or exc}")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, [], ConfigIssue(source, 0, f"is {_kind_of(st.st_mode)}, not a regular file")
        if st.st_size > limit:
            return None, [], ConfigIssue(source, 0, f"is larger than {limit} bytes ({st.st_size})")
        chunks: list[bytes] = []
        total = 0
        while total <= limit:
            chunk = os.read(fd, limit + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as exc:
        return None, [], ConfigIssue(source, 0, f"cannot be read: {exc.strerror or exc}")
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:  # it grew while being read
        return None, [], ConfigIssue(source, 0, f"is larger than {limit} bytes")
    try:
        return data.decode("utf-8"), [], None
    except UnicodeDecodeError as exc:
        issue = ConfigIssue(source, 0, f"not valid UTF-8 (byte {exc.start}); undecodable bytes replaced")
        return data.decode("utf-8", errors="replace"), [issue], None


def load_key_value_files(
    root: Path, relative_paths: Sequence[str], *, reported: set[ConfigIssue] | None = None
) -> MergedConfig:
    """Read the files of ``relative_paths`` that exist under ``root`` and merge them (first file wins).

    A missing file is fine (every one is optional).  A file that exists but cannot be read whole (unreadable,
    not a regular file, larger than MAX_CONFIG_FILE_BYTES) raises SettingsFileError naming every such file.
    Other problems (malformed lines, invalid UTF-8) are logged as a WARNING once per process (or once per
    ``reported`` set, for tests) and the rest of the file is used.
    """
    parsed: list[ParsedFile] = []
    issues: list[ConfigIssue] = []
    unreadable: list[ConfigIssue] = []
    for relative in relative_paths:
        path = root / relative
        text, read_issues, problem = _read_text_file(path, MAX_CONFIG_FILE_BYTES)
        issues.extend(read_issues)
        if problem is not None:
            unreadable.append(problem)
        if text is not None:
            parsed.append(parse_key_values(text, str(path)))
    if unreadable:
        raise SettingsFileError(unreadable)
    merged = merge_first_wins(parsed)
    merged.issues[:0] = issues
    _report(merged.issues, _reported_issues if reported is None else reported)
    return merged


def load_update_conf(root: Path = Path("/"), *, reported: set[ConfigIssue] | None = None) -> MergedConfig:
    """Read the update.conf/release files that exist under ``root`` and merge them (first file wins).

    SettingsFileError when one of them exists but cannot be read whole (see ``load_key_value_files``).
    """
    merged = load_key_value_files(root, UPDATE_CONF_FILES, reported=reported)
    log.debug("update configuration read: %s", {k: merged.sources[k] for k in sorted(merged.sources)})
    return merged
