"""The D-Bus contract of ``com.coreos.update1``: its names, the status strings and the status tuple.

Rules: the names, the eight ``UPDATE_STATUS_*`` strings and the ``(x d s s x)`` tuple of ``GetStatus`` and
``StatusUpdate`` are the original update_engine's, byte for byte (locksmith, Zincati's tooling and operators'
scripts match on them).  What that tuple cannot carry (the last attempt's error, the set-up's warnings) comes from
our own ``GetStatusDetails() → a{sv}`` (:class:`StatusDetails`), to which entries may be added but never changed.
A body from the bus is decoded strictly: exactly five fields of exactly those types (``StatusSnapshot.from_values``),
anything else is a ValueError naming what came; callers check the message signature first.  Everything here is
pure.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

BUS_NAME = "com.coreos.update1"
OBJECT_PATH = "/com/coreos/update1"
INTERFACE = "com.coreos.update1.Manager"
STATUS_SIGNATURE = "xdssx"


class UpdateStatus(enum.Enum):
    """The attempter's states; the values are the exact strings published on D-Bus."""

    IDLE = "UPDATE_STATUS_IDLE"
    CHECKING_FOR_UPDATE = "UPDATE_STATUS_CHECKING_FOR_UPDATE"
    UPDATE_AVAILABLE = "UPDATE_STATUS_UPDATE_AVAILABLE"
    DOWNLOADING = "UPDATE_STATUS_DOWNLOADING"
    VERIFYING = "UPDATE_STATUS_VERIFYING"
    FINALIZING = "UPDATE_STATUS_FINALIZING"
    UPDATED_NEED_REBOOT = "UPDATE_STATUS_UPDATED_NEED_REBOOT"
    REPORTING_ERROR_EVENT = "UPDATE_STATUS_REPORTING_ERROR_EVENT"


@dataclass(frozen=True)
class StatusSnapshot:
    """The ``(x d s s x)`` tuple of GetStatus and StatusUpdate."""

    last_checked_time: int = 0
    progress: float = 0.0
    current_operation: str = UpdateStatus.IDLE.value
    new_version: str = "0.0.0"
    new_size: int = 0

    def as_tuple(self) -> tuple[int, float, str, str, int]:
        return (self.last_checked_time, self.progress, self.current_operation, self.new_version, self.new_size)

    @classmethod
    def from_values(cls, values: object) -> StatusSnapshot:
        """Strictly typed construction from a D-Bus body; ValueError on anything but (int, float, str, str, int)."""
        if not isinstance(values, (list, tuple)) or len(values) != 5:
            raise ValueError(f"status must have 5 fields (x d s s x), got {values!r}")
        t, p, op, ver, size = values
        if (
            not isinstance(t, int)
            or isinstance(t, bool)
            or not isinstance(p, float)
            or not isinstance(op, str)
            or not isinstance(ver, str)
            or not isinstance(size, int)
            or isinstance(size, bool)
        ):
            raise ValueError(f"status fields must be (x d s s x), got {values!r}")
        return cls(t, p, op, ver, size)


# --- GetStatusDetails ---------------------------------------------------------------------------------------------

DETAILS_SIGNATURE = "a{sv}"


@dataclass(frozen=True)
class StatusDetails:
    """``GetStatusDetails() → a{sv}``: what ``GetStatus`` says, and what it cannot say without changing its tuple.

    Every field is one dictionary entry named as the field, with the D-Bus type of :data:`DETAILS_TYPES`:

    * ``last_checked_time`` … ``new_size``: the five ``GetStatus`` fields.
    * ``last_attempt_result``: how the last attempt since the daemon started ended: ``no_update``, ``updated``,
      ``failed``, ``deferred`` (backoff, or a version that failed to boot), or empty before the first;
      ``last_attempt_time`` (Unix s, 0 before the first).
    * ``last_error_code``, ``last_error_name``, ``last_error_reason``: the Omaha code, its name and a one-line
      reason when that attempt failed or was deferred (0 and empty otherwise).
    * ``pending_reboot``: ``update`` or ``rollback`` while UPDATED_NEED_REBOOT, else empty.
    * ``warnings``: what the daemon's set-up lacks (no signing key, no update.conf, no release file, …).
    * ``server``, ``group``, ``current_version``, ``board``, ``app_id``, ``public_key``: what it uses.

    A reader ignores entries it does not know, so entries may be added later.
    """

    status: StatusSnapshot = field(default_factory=StatusSnapshot)
    last_attempt_result: str = ""
    last_attempt_time: int = 0
    last_error_code: int = 0
    last_error_name: str = ""
    last_error_reason: str = ""
    pending_reboot: str = ""
    warnings: tuple[str, ...] = ()
    server: str = ""
    group: str = ""
    current_version: str = ""
    board: str = ""
    app_id: str = ""
    public_key: str = ""

    def as_values(self) -> dict[str, object]:
        """Entry name → plain value (int, float, str or list of str), in :data:`DETAILS_TYPES` order."""
        values: dict[str, object] = dict(zip(_STATUS_NAMES, self.status.as_tuple(), strict=True))
        for name in DETAILS_TYPES:
            if name not in values:
                value = getattr(self, name)
                values[name] = list(value) if isinstance(value, tuple) else value
        return values

    @classmethod
    def from_values(cls, values: object) -> StatusDetails:
        """Strict decoding of a dictionary of plain values; ValueError naming an entry of the wrong type.

        Entries that are missing take their defaults and unknown ones are ignored (an older or newer daemon).
        """
        if not isinstance(values, dict):
            raise ValueError(f"status details must be a dictionary, got {type(values).__name__}")
        fields: dict[str, object] = {}
        for name, signature in DETAILS_TYPES.items():
            if name not in values:
                continue
            value = values[name]
            if not _has_type(value, signature):
                raise ValueError(f"status details entry {name} must be of D-Bus type {signature}, got {value!r}")
            fields[name] = tuple(value) if signature == "as" and isinstance(value, list | tuple) else value
        status_fields = {name: fields.pop(name) for name in _STATUS_NAMES if name in fields}
        return cls(status=StatusSnapshot(**status_fields), **fields)  # type: ignore[arg-type]


_STATUS_NAMES = ("last_checked_time", "progress", "current_operation", "new_version", "new_size")

# Entry name → D-Bus type of its value.
DETAILS_TYPES: dict[str, str] = {
    "last_checked_time": "x",
    "progress": "d",
    "current_operation": "s",
    "new_version": "s",
    "new_size": "x",
    "last_attempt_result": "s",
    "last_attempt_time": "x",
    "last_error_code": "x",
    "last_error_name": "s",
    "last_error_reason": "s",
    "pending_reboot": "s",
    "warnings": "as",
    "server": "s",
    "group": "s",
    "current_version": "s",
    "board": "s",
    "app_id": "s",
    "public_key": "s",
}


def _has_type(value: object, signature: str) -> bool:
    if signature == "x":
        return isinstance(value, int) and not isinstance(value, bool)
    if signature == "d":
        return isinstance(value, float)
    if signature == "s":
        return isinstance(value, str)
    return isinstance(value, list | tuple) and all(isinstance(item, str) for item in value)
