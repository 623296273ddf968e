"""update.conf, release and oem-release files, and the node's identity.

The files are literal ``KEY=value`` lists, read the way the original update_engine reads them: the first
file in the lookup order that names a key decides its value, even when that value is empty (``SERVER=``
really means an empty server).  We add comments and blank lines, and we report malformed lines with
``file:line`` instead of silently inventing keys from them.

The parsing and merging are pure; ``load_update_conf``, ``load_oem_release`` and the identity readers are the
thin I/O shells around them.  Every path is relative to a ``root`` so tests and the demo can use a
temporary tree.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from update_engine.errors import ErrorCode, UpdateEngineError

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

OEM_RELEASE_FILES: tuple[str, ...] = (
    "etc/oem-release",
    "usr/share/oem/oem-release",
)

MACHINE_ID_FILE = "etc/machine-id"
BOOT_ID_FILE = "proc/sys/kernel/random/boot_id"

# A configuration file larger than this is a mistake (or a device), not configuration.
MAX_CONFIG_FILE_BYTES = 64 * 1024

DEFAULT_SERVER = "https://public.update.flatcar-linux.net/v1/update/"
DEFAULT_GROUP = "stable"
DEFAULT_APP_ID = "{e96281a6-d1af-4bde-9a0a-97b76e56dc57}"
DEFAULT_VERSION = "0.0.0"
DEFAULT_BOARD = "amd64-usr"
SERVER_DISABLED = "disabled"

_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MACHINE_ID_RE = re.compile(r"[0-9a-fA-F]{32}")
_BOOT_ID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


class ConfigError(UpdateEngineError):
    """The node's identity cannot be read; without it no Omaha request can be built."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.OMAHA_REQUEST_ERROR, message)


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
        candidates = [(self.ranks[name], i, name) for i, name in enumerate(names) if name in self.values]
        if not candidates:
            return None
        return self.values[min(candidates)[2]]


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


def _read_text_file(path: Path, limit: int) -> tuple[str | None, list[ConfigIssue]]:
    """Text of ``path`` or None when absent; unusable files give an issue instead of an exception."""
    source = str(path)
    try:
        # O_NONBLOCK: a FIFO planted at a config path must not hang the daemon.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        return None, []
    except OSError as exc:
        return None, [ConfigIssue(source, 0, f"cannot open: {exc.strerror or exc}; file ignored")]
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, [ConfigIssue(source, 0, "not a regular file; ignored")]
        chunks: list[bytes] = []
        total = 0
        while total <= limit:
            chunk = os.read(fd, limit + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as exc:
        return None, [ConfigIssue(source, 0, f"cannot read: {exc.strerror or exc}; file ignored")]
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        return None, [ConfigIssue(source, 0, f"larger than {limit} bytes; file ignored")]
    try:
        return data.decode("utf-8"), []
    except UnicodeDecodeError as exc:
        issue = ConfigIssue(source, 0, f"not valid UTF-8 (byte {exc.start}); undecodable bytes replaced")
        return data.decode("utf-8", errors="replace"), [issue]


def _load_files(root: Path, relative_paths: Sequence[str], reported: set[ConfigIssue] | None) -> MergedConfig:
    parsed: list[ParsedFile] = []
    issues: list[ConfigIssue] = []
    for relative in relative_paths:
        path = root / relative
        text, read_issues = _read_text_file(path, MAX_CONFIG_FILE_BYTES)
        issues.extend(read_issues)
        if text is not None:
            parsed.append(parse_key_values(text, str(path)))
    merged = merge_first_wins(parsed)
    merged.issues[:0] = issues
    _report(merged.issues, _reported_issues if reported is None else reported)
    return merged


def load_update_conf(root: Path = Path("/"), *, reported: set[ConfigIssue] | None = None) -> MergedConfig:
    """Read the update.conf/release files that exist under ``root`` and merge them (first file wins).

    Each issue is logged as a WARNING once per process (or once per ``reported`` set, for tests).
    """
    merged = _load_files(root, UPDATE_CONF_FILES, reported)
    log.debug("update configuration read: %s", {k: merged.sources[k] for k in sorted(merged.sources)})
    return merged


@dataclass(frozen=True)
class UpdateSettings:
    """What one update check needs from the configuration, re-read before every check."""

    server: str = DEFAULT_SERVER
    group: str = DEFAULT_GROUP
    app_id: str = DEFAULT_APP_ID
    version: str = DEFAULT_VERSION
    board: str = DEFAULT_BOARD
    machine_alias: str = ""
    download_user: str = ""
    download_password: str = dataclasses.field(default="", repr=False)
    pcr_policy_server: str = ""

    @property
    def updates_disabled(self) -> bool:
        return self.server == SERVER_DISABLED

    @property
    def custom_server(self) -> bool:
        """True when SERVER is not the public one (Omaha error codes then carry the TestOmahaUrl flag)."""
        return self.server != DEFAULT_SERVER


def settings_from_config(cfg: MergedConfig) -> UpdateSettings:
    """Build the settings; defaults apply only when no file names the key (an empty value stays empty).

    Release keys exist as ``COREOS_RELEASE_*`` and ``FLATCAR_RELEASE_*``: the value comes from the earliest
    file in the lookup order that has either name, and within one file the COREOS_ name wins.
    """

    def pick(default: str, *names: str) -> str:
        value = cfg.first_of(*names)
        return default if value is None else value

    return UpdateSettings(
        server=pick(DEFAULT_SERVER, "SERVER"),
        group=pick(DEFAULT_GROUP, "GROUP"),
        app_id=pick(DEFAULT_APP_ID, "COREOS_RELEASE_APPID", "FLATCAR_RELEASE_APPID"),
        version=pick(DEFAULT_VERSION, "COREOS_RELEASE_VERSION", "FLATCAR_RELEASE_VERSION"),
        board=pick(DEFAULT_BOARD, "COREOS_RELEASE_BOARD", "FLATCAR_RELEASE_BOARD"),
        machine_alias=pick("", "MACHINE_ALIAS"),
        download_user=pick("", "DOWNLOAD_USER"),
        download_password=pick("", "DOWNLOAD_PASSWORD"),
        pcr_policy_server=pick("", "PCR_POLICY_SERVER"),
    )


# Field → the name an operator writes in update.conf; secrets are reported as changed without their values.
_SETTING_NAMES: Mapping[str, str] = {
    "server": "SERVER",
    "group": "GROUP",
    "app_id": "FLATCAR_RELEASE_APPID",
    "version": "FLATCAR_RELEASE_VERSION",
    "board": "FLATCAR_RELEASE_BOARD",
    "machine_alias": "MACHINE_ALIAS",
    "download_user": "DOWNLOAD_USER",
    "download_password": "DOWNLOAD_PASSWORD",
    "pcr_policy_server": "PCR_POLICY_SERVER",
}
_SECRET_SETTINGS = frozenset({"download_password"})


def _show(value: str) -> str:
    return value if value else "(empty)"


def diff_settings(old: UpdateSettings, new: UpdateSettings) -> list[str]:
    """One line per changed setting, e.g. ``GROUP changed from stable to beta``, for the log at each check."""
    changes: list[str] = []
    for name, label in _SETTING_NAMES.items():
        before, after = getattr(old, name), getattr(new, name)
        if before == after:
            continue
        if name in _SECRET_SETTINGS:
            changes.append(f"{label} changed")
        else:
            changes.append(f"{label} changed from {_show(before)} to {_show(after)}")
    return changes


@dataclass(frozen=True)
class OemRelease:
    """``ID``/``VERSION_ID`` of the OEM (cloud or hardware flavour), sent as ``oem``/``oemversion``."""

    id: str = ""
    version_id: str = ""


def oem_release_from_config(cfg: MergedConfig) -> OemRelease:
    return OemRelease(id=cfg.get("ID") or "", version_id=cfg.get("VERSION_ID") or "")


def load_oem_release(root: Path = Path("/"), *, reported: set[ConfigIssue] | None = None) -> OemRelease:
    """``etc/oem-release`` then ``usr/share/oem/oem-release``, first file with a key wins; empty if none."""
    return oem_release_from_config(_load_files(root, OEM_RELEASE_FILES, reported))


def _read_identity_file(path: Path, what: str) -> str:
    try:
        with path.open("rb") as handle:
            data = handle.read(4097)
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} from {path}: {exc.strerror or exc}") from exc
    try:
        return data.decode("ascii").strip()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} does not hold a {what}: it is not ASCII text") from exc


def read_machine_id(root: Path = Path("/")) -> str:
    """The machine id (32 hex digits, see machine-id(5)), sent without braces as ``machineid``."""
    path = root / MACHINE_ID_FILE
    value = _read_identity_file(path, "machine id")
    if not _MACHINE_ID_RE.fullmatch(value):
        shown = value if len(value) <= 40 else value[:40] + "…"
        raise ConfigError(f"{path} does not hold a machine id: {shown!r} is not 32 hexadecimal digits")
    return value


def read_boot_id(root: Path = Path("/")) -> str:
    """This boot's id (a UUID from the kernel), sent in braces as ``bootid``."""
    path = root / BOOT_ID_FILE
    value = _read_identity_file(path, "boot id")
    if not _BOOT_ID_RE.fullmatch(value):
        shown = value if len(value) <= 40 else value[:40] + "…"
        raise ConfigError(f"{path} does not hold a boot id: {shown!r} is not a UUID")
    return value
