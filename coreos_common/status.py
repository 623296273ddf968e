"""The D-Bus contract of ``com.coreos.update1``: its names, the status strings and the status tuple.

Rules: the names, the eight ``UPDATE_STATUS_*`` strings and the ``(x d s s x)`` tuple of ``GetStatus`` and
``StatusUpdate`` are the original update_engine's, byte for byte (locksmith, Zincati's tooling and operators'
scripts match on them).  A body from the bus is decoded strictly: exactly five fields of exactly those types
(``StatusSnapshot.from_values``), anything else is a ValueError naming what came; callers check the message
signature first.  Everything here is pure.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

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
