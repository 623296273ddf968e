"""The engine's refusals: requests it will not carry out, each saying why.

They belong to the engine, not to any transport: the D-Bus adapter turns them into
``com.coreos.update1.Error.*`` replies (the engine never imports the adapter).
"""

from __future__ import annotations


class ResetNotAllowed(Exception):
    """The engine refuses ResetStatus (outside IDLE / UPDATED_NEED_REBOOT, or the disarm failed); says why."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class RollbackRefused(Exception):
    """Rollback cannot be armed (e.g. the other partition never booted successfully); ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
