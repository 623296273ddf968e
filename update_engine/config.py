"""update-engine's settings from update.conf and the release files, the OEM release, and what a set-up lacks.

The lookup order and the ``KEY=value`` parser are ``coreos_common.updateconf`` (locksmithd reads the same
files); this module turns the merged keys into what one update check needs.  Defaults apply only when no file
names a key: an empty value stays empty.  ``describe_setup`` says in one line what the daemon will use and warns
about what is missing or defaulted and will bite later (no signing key, no update.conf, no release file).
Everything here is pure except ``load_oem_release``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from coreos_common.updateconf import (
    UPDATE_CONF_FILES,
    ConfigIssue,
    MergedConfig,
    SettingsFileError,
    load_key_value_files,
)
from update_engine.errors import ErrorCode, UpdateEngineError

OEM_RELEASE_FILES: tuple[str, ...] = (
    "etc/oem-release",
    "usr/share/oem/oem-release",
)

DEFAULT_SERVER = "https://public.update.flatcar-linux.net/v1/update/"
DEFAULT_GROUP = "stable"
DEFAULT_APP_ID = "{e96281a6-d1af-4bde-9a0a-97b76e56dc57}"
DEFAULT_VERSION = "0.0.0"
DEFAULT_BOARD = "amd64-usr"
SERVER_DISABLED = "disabled"


class ConfigError(UpdateEngineError):
    """The node's identity or OEM release cannot be read; without them no Omaha request can be built."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.OMAHA_REQUEST_ERROR, message)


@dataclass(frozen=True)
class UpdateSettings:
    """What one update check needs from the configuration, re-read before every check.

    ``keys`` and ``files`` say, for each field an update.conf or release file set, which key name set it (for the
    release keys, ``COREOS_RELEASE_*`` or ``FLATCAR_RELEASE_*``) and in which file; a default has neither.
    """

    server: str = DEFAULT_SERVER
    group: str = DEFAULT_GROUP
    app_id: str = DEFAULT_APP_ID
    version: str = DEFAULT_VERSION
    board: str = DEFAULT_BOARD
    machine_alias: str = ""
    download_user: str = ""
    download_password: str = dataclasses.field(default="", repr=False)
    keys: Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False, repr=False)
    files: Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @property
    def updates_disabled(self) -> bool:
        return self.server == SERVER_DISABLED

    @property
    def custom_server(self) -> bool:
        """True when SERVER is not the public one (Omaha error codes then carry the TestOmahaUrl flag)."""
        return self.server != DEFAULT_SERVER

    def origin(self, name: str) -> str:
        """Where field ``name`` came from, for log lines: ``KEY in FILE``, a command-line flag, or ``default``."""
        key = self.keys.get(name)
        if key is None:
            return "default"
        file = self.files.get(name)
        return f"{key} in {file}" if file else key

    @property
    def credential_problem(self) -> str | None:
        """Why DOWNLOAD_USER/DOWNLOAD_PASSWORD cannot be sent as HTTP basic authentication, naming the setting and
        never its value; None when they can (or are not set)."""
        if ":" in self.download_user:
            return (f"{self.origin('download_user')} contains ':', which HTTP basic authentication cannot carry in "
                    "a user name")
        for name in ("download_user", "download_password"):
            try:
                getattr(self, name).encode("latin-1")
            except UnicodeEncodeError:
                return (f"{self.origin(name)} has characters outside Latin-1, which HTTP basic authentication cannot "
                        "carry")
        return None

    def with_server_flag(self, server: str) -> UpdateSettings:
        """These settings with SERVER replaced by ``--server``."""
        return dataclasses.replace(self, server=server, keys={**self.keys, "server": "--server"},
                                   files={**self.files, "server": ""})


# Field → the key names that set it, in order of precedence within one file, and its default.
_SETTING_KEYS: Mapping[str, tuple[tuple[str, ...], str]] = {
    "server": (("SERVER",), DEFAULT_SERVER),
    "group": (("GROUP",), DEFAULT_GROUP),
    "app_id": (("COREOS_RELEASE_APPID", "FLATCAR_RELEASE_APPID"), DEFAULT_APP_ID),
    "version": (("COREOS_RELEASE_VERSION", "FLATCAR_RELEASE_VERSION"), DEFAULT_VERSION),
    "board": (("COREOS_RELEASE_BOARD", "FLATCAR_RELEASE_BOARD"), DEFAULT_BOARD),
    "machine_alias": (("MACHINE_ALIAS",), ""),
    "download_user": (("DOWNLOAD_USER",), ""),
    "download_password": (("DOWNLOAD_PASSWORD",), ""),
}
_SECRET_SETTINGS = frozenset({"download_password"})
# Keys the original reads that this implementation does not act on, and why (a start-up warning names them).
UNSUPPORTED_KEYS: Mapping[str, str] = {
    "PCR_POLICY_SERVER": "no TPM PCR policies are shipped with updates, so there is nothing to send",
}


def settings_from_config(cfg: MergedConfig) -> UpdateSettings:
    """Build the settings; defaults apply only when no file names the key (an empty value stays empty).

    Release keys exist as ``COREOS_RELEASE_*`` and ``FLATCAR_RELEASE_*``: the value comes from the earliest
    file in the lookup order that has either name, and within one file the COREOS_ name wins.
    """
    values: dict[str, str] = {}
    keys: dict[str, str] = {}
    files: dict[str, str] = {}
    for name, (names, default) in _SETTING_KEYS.items():
        key = cfg.first_key_of(*names)
        if key is None:
            values[name] = default
            continue
        values[name], keys[name], files[name] = cfg.values[key], key, cfg.sources[key]
    return UpdateSettings(**values, keys=keys, files=files)


def _show(value: str) -> str:
    return value if value else "(empty)"


def diff_settings(old: UpdateSettings, new: UpdateSettings) -> list[str]:
    """One line per changed setting, e.g. ``GROUP changed from stable to beta``, for the log at each check.

    A setting is named as the files spell it (``COREOS_RELEASE_VERSION`` when that key set it); secrets are
    reported as changed without their values.
    """
    changes: list[str] = []
    for name, (names, _default) in _SETTING_KEYS.items():
        before, after = getattr(old, name), getattr(new, name)
        if before == after:
            continue
        label = new.keys.get(name) or old.keys.get(name) or names[0]
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
    return oem_release_from_config(load_key_value_files(root, OEM_RELEASE_FILES, reported=reported))


def startup_refusal(exc: SettingsFileError) -> str:
    """The start-up error for settings files that exist but cannot be read: what is wrong and what to do."""
    return (
        f"Cannot read the update settings: {exc}. Not starting: acting on the defaults could undo what the file "
        "says (SERVER=disabled); fix or remove the file"
    )


UPDATE_CONF_PATHS = tuple(path for path in UPDATE_CONF_FILES if path.endswith("update.conf"))
RELEASE_PATHS = tuple(path for path in UPDATE_CONF_FILES if path.endswith("release"))


@dataclass(frozen=True)
class SetupReport:
    """What the daemon will use, in one line, and what is missing or defaulted, one warning each."""

    line: str
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class NodeFacts:
    """What the shell found on the node for ``describe_setup``: files present and problems met."""

    update_conf_found: bool
    public_key: Path
    public_key_problem: str | None = None  # None: the key file can be read
    identity_problem: str | None = None


def describe_setup(settings: UpdateSettings, cfg: MergedConfig, facts: NodeFacts, *, program: str) -> SetupReport:
    """The start-up line (server, group, running version, board, app id, key) and the warnings. Pure."""
    key_state = "" if facts.public_key_problem is None else " (missing)"
    line = (
        f"{program}: server {settings.server} ({settings.origin('server')}), group {settings.group} "
        f"({settings.origin('group')}), running version {settings.version} ({settings.origin('version')}), "
        f"board {settings.board} ({settings.origin('board')}), app id {settings.app_id} "
        f"({settings.origin('app_id')}), payload key {facts.public_key}{key_state}"
    )
    warnings: list[str] = []
    if facts.public_key_problem is not None:
        warnings.append(
            f"No payload signing key: {facts.public_key_problem}. Every offered update will be refused (error 18) "
            "until the key is installed there or --public-key names it"
        )
    if not facts.update_conf_found and "server" not in settings.keys:
        warnings.append(
            f"No update.conf ({', '.join('/' + path for path in UPDATE_CONF_PATHS)}): SERVER is the default "
            f"{settings.server} and GROUP {settings.group}"
        )
    if "version" not in settings.keys:
        warnings.append(
            f"No release file names COREOS_RELEASE_VERSION or FLATCAR_RELEASE_VERSION "
            f"({', '.join('/' + path for path in RELEASE_PATHS)}): the running version is reported as "
            f"{settings.version}, so the server may offer any version"
        )
    if settings.credential_problem is not None:
        warnings.append(f"{settings.credential_problem}: payload downloads fail until it is fixed")
    if settings.server == "":
        warnings.append(
            f"SERVER is empty ({settings.origin('server')}): no update check can be sent; remove the line for the "
            f"default server, or write SERVER={SERVER_DISABLED} to turn checks off"
        )
    for key, reason in UNSUPPORTED_KEYS.items():
        if key in cfg.values:
            warnings.append(f"{key} in {cfg.sources[key]} is not supported and ignored: {reason}")
    if facts.identity_problem is not None:
        warnings.append(f"Cannot read this node's identity ({facts.identity_problem}): every update check fails "
                        "until it is fixed")
    return SetupReport(line, tuple(warnings))
