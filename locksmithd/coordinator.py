"""``/run/update-engine/coordinator.conf``: which program coordinates reboots on this node, and where it is.

Only one reboot coordinator may run per node, so the file is guarded by a non-blocking exclusive ``flock``: a
second locksmithd fails at start-up instead of racing the first one to the reboot.

Each write goes to a temporary file that is renamed over ``coordinator.conf``, so readers never see half a
file. A rename replaces the inode, and a lock on the old inode would no longer guard the path; therefore the
lock that decides who the coordinator is lives on ``coordinator.conf.lock`` beside it, which is never renamed
and is held for the daemon's whole life.  Every new ``coordinator.conf`` is also flocked before it is renamed
into place and kept open until the next write, so a tool that tries to flock ``coordinator.conf`` itself (as
the original locksmithd did) still finds it held.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

COORDINATOR_DIR = "run/update-engine"
COORDINATOR_FILE = "coordinator.conf"
LOCK_SUFFIX = ".lock"
PROGRAM_NAME = "locksmithd"


class CoordinatorState(enum.Enum):
    """The daemon's phase, published as ``STATE=``."""

    STARTING = "starting"
    RUNNING = "running"
    REBOOT_PLANNED = "reboot-planned"
    REBOOTING = "rebooting"


class CoordinatorError(Exception):
    """The coordinator file cannot be taken (another instance holds it) or written."""


def render(strategy: str, state: CoordinatorState) -> str:
    """The file's content, always in the same order."""
    return f"NAME={PROGRAM_NAME}\nSTRATEGY={strategy}\nSTATE={state.value}\n"


class Coordinator:
    """Holds the coordinator lock and rewrites the file on each state change."""

    def __init__(self, config_root: Path, strategy: str) -> None:
        self.directory = config_root / COORDINATOR_DIR
        self.path = self.directory / COORDINATOR_FILE
        self.lock_path = self.directory / (COORDINATOR_FILE + LOCK_SUFFIX)
        self.strategy = strategy
        self.state = CoordinatorState.STARTING
        self._lock_fd: int | None = None
        self._content_fd: int | None = None

    def acquire(self) -> None:
        """Take the lock and write ``STATE=starting``; CoordinatorError if another coordinator runs."""
        try:
            self.directory.mkdir(mode=0o755, parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise CoordinatorError(
                f"unable to become 'update coordinator': cannot open {self.lock_path}: {exc.strerror or exc}"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise CoordinatorError(
                    f"unable to become 'update coordinator': {self.lock_path} is locked by another process "
                    f"(is another locksmithd running?)"
                ) from exc
            raise CoordinatorError(
                f"unable to become 'update coordinator': cannot lock {self.lock_path}: {exc.strerror or exc}"
            ) from exc
        self._lock_fd = fd
        try:
            os.fchmod(fd, 0o644)  # readable by other tools whatever the umask
            self._write(CoordinatorState.STARTING)
        except OSError as exc:
            self.release()
            raise CoordinatorError(f"cannot set the mode of {self.lock_path}: {exc.strerror or exc}") from exc
        except CoordinatorError:
            self.release()
            raise

    def set_state(self, state: CoordinatorState) -> None:
        """Publish a new state; a write failure is logged, not fatal (the lock still protects the node)."""
        if self._lock_fd is None:
            raise CoordinatorError("the coordinator lock is not held")
        try:
            self._write(state)
        except CoordinatorError as exc:
            log.error("%s", exc)

    def _write(self, state: CoordinatorState) -> None:
        temp = self.directory / f".{COORDINATOR_FILE}.{os.getpid()}.tmp"
        data = render(self.strategy, state).encode()
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise CoordinatorError(f"cannot write {temp}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.fchmod(fd, 0o644)
            os.write(fd, data)
            os.fsync(fd)
            os.rename(temp, self.path)
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise CoordinatorError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
        previous, self._content_fd = self._content_fd, fd
        if previous is not None:
            os.close(previous)
        self.state = state

    def release(self) -> None:
        """Drop the locks (the file stays; its content describes the last state)."""
        for fd in (self._content_fd, self._lock_fd):
            if fd is not None:
                os.close(fd)
        self._content_fd = None
        self._lock_fd = None
