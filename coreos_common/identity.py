"""The node's identities: the machine id (who holds a reboot lock, who asks Omaha), this boot's id, the host name.

Rules: every path is relative to a ``root`` so tests and the demo can use a temporary tree; a file that is
missing, unreadable or does not hold the expected form raises ``IdentityError`` (``<file>: <problem>``), never
returns a guess.  The machine id is validated (32 hexadecimal digits) and lowercased, for every program.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

MACHINE_ID_FILE = "etc/machine-id"
BOOT_ID_FILE = "proc/sys/kernel/random/boot_id"

_MACHINE_ID_RE = re.compile(r"[0-9a-fA-F]{32}")
_BOOT_ID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


class IdentityError(Exception):
    """An identity file cannot be read or does not hold an identity; the message names the file."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _read_identity_file(path: Path, what: str, form: re.Pattern[str], expected: str) -> str:
    """The stripped text of ``path`` if it matches ``form``; IdentityError ``<path>: <problem>`` otherwise."""
    try:
        with path.open("rb") as handle:
            data = handle.read(4097)
    except OSError as exc:
        raise IdentityError(f"{path}: {exc.strerror or exc}") from exc
    try:
        value = data.decode("ascii").strip()
    except UnicodeDecodeError as exc:
        raise IdentityError(f"{path}: not ASCII text, so not a {what}") from exc
    if not form.fullmatch(value):
        shown = value if len(value) <= 40 else value[:40] + "…"
        raise IdentityError(f"{path}: {shown!r} is not a {what} ({expected})")
    return value


def read_machine_id(root: Path = Path("/")) -> str:
    """The machine id, lowercased: who asks Omaha (``machineid``) and who holds a reboot lock.

    machine-id(5) says lowercase hexadecimal; a file written in uppercase by hand still names the same machine,
    so every program reads it the same way here and the lock holder, the Omaha id and ``locksmithctl`` agree.
    """
    value = _read_identity_file(root / MACHINE_ID_FILE, "machine id", _MACHINE_ID_RE, "32 hexadecimal digits")
    return value.lower()


def read_boot_id(root: Path = Path("/")) -> str:
    """This boot's id (a UUID from the kernel), sent in braces as ``bootid``."""
    return _read_identity_file(root / BOOT_ID_FILE, "boot id", _BOOT_ID_RE, "a UUID")


def read_hostname() -> str:
    """This host's name as the kernel knows it (``uname -n``), recorded beside a lock holder for people to read.

    Unlike the machine id it identifies nothing (two nodes may share a name), so it is never validated.
    """
    return socket.gethostname()
