"""``/run/locksmithd/state.json``: where this node's reboot path stands, for ``locksmithctl status --json``.

The daemon rewrites the file (atomically: a temporary file renamed over it, mode 0644) each time its phase
changes (``locksmithd.reboot_path.phase_document``: phase, since, the status line and the phase's own fields,
with the strategy and update-engine's status beside them), and removes it when it stops. Readers get the last
complete document, or None when locksmithd is not running. This module imports nothing heavy, as
``locksmithctl`` must start fast.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from coreos_common.files import replace_file

STATE_FILE = "run/locksmithd/state.json"
# The document's own version, for readers: bumped only when a field changes meaning or goes away.
FORMAT = 1


class StateFileError(Exception):
    """The state file exists but cannot be read or is not a JSON object; the message names it."""


def state_path(root: Path) -> Path:
    return root / STATE_FILE


def write_state(path: Path, document: Mapping[str, object]) -> None:
    """Replace the file with ``document`` (plus ``format``); OSError when it cannot be written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, json.dumps({"format": FORMAT, **document}, sort_keys=True).encode() + b"\n")


def remove_state(path: Path) -> None:
    path.unlink(missing_ok=True)


def read_state(root: Path) -> dict[str, object] | None:
    """The local locksmithd's last published state, or None when it is not running (no file)."""
    path = state_path(root)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise StateFileError(f"{path} is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise StateFileError(f"{path} does not hold a JSON object")
    return document
