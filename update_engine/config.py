"""update-engine's settings from update.conf and the release files, and the OEM release.

The lookup order and the ``KEY=value`` parser are ``coreos_common.updateconf`` (locksmithd reads the same
files); this module turns the merged keys into what one update check needs.  Defaults apply only when no file
names a key: an empty value stays empty.  Everything here is pure except ``load_oem_release``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from coreos_common.updateconf import ConfigIssue, MergedConfig, SettingsFileError, load_key_value_files
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
    return oem_release_from_config(load_key_value_files(root, OEM_RELEASE_FILES, reported=reported))


def startup_refusal(exc: SettingsFileError) -> str:
    """The start-up error for settings files that exist but cannot be read: what is wrong and what to do."""
    return (
        f"Cannot read the update settings: {exc}. Not starting: acting on the defaults could undo what the file "
        "says (SERVER=disabled); fix or remove the file"
    )
