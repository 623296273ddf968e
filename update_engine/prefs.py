"""Persistent daemon state: one small file per key under ``/var/lib/update_engine/prefs``.

The layout is the original update_engine's (ints as decimal text without a newline); the key names, and
what each holds, are ``update_engine.engine.history``'s, the only place that names them.  Writes are atomic
and durable (``coreos_common.files``: temp file in the same directory, fsync, rename, fsync of the directory),
so a crash or power cut leaves either the old or the new value, never a torn one.  Temp files start with ``.``,
which no key can, so one left behind by a crash is never read as a key; ``discard_stale_temp_files`` removes
them.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from coreos_common.files import TEMPORARY_SUFFIX, replace_file, sync_directory
from update_engine.errors import ErrorCode, UpdateEngineError

log = logging.getLogger(__name__)

DEFAULT_PREFS_DIR = Path("/var/lib/update_engine/prefs")

_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_INT_RE = re.compile(r"-?[0-9]{1,19}")


class PrefsError(UpdateEngineError):
    """A pref could not be read or written (permissions, full disk, a directory in the way)."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.ERROR, message)


def _check_key(key: str) -> None:
    if not _KEY_RE.fullmatch(key):
        raise ValueError(f"invalid pref key {key!r}: keys are letters, digits, '_' and '-'")


class Prefs:
    """Key → value store in the directory ``root`` (created 0700 on the first write)."""

    def __init__(self, root: Path = DEFAULT_PREFS_DIR) -> None:
        self.root = root
        self._dir_ready = False

    def path(self, key: str) -> Path:
        _check_key(key)
        return self.root / key

    # -- reading -------------------------------------------------------------------------------------------

    def get_bytes(self, key: str) -> bytes | None:
        path = self.path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise PrefsError(f"cannot read pref {key} from {path}: {exc.strerror or exc}") from exc

    def get_str(self, key: str) -> str | None:
        data = self.get_bytes(key)
        return None if data is None else data.decode("utf-8", errors="replace")

    def get_int(self, key: str) -> int | None:
        """The stored integer; a value that is not one reads as missing (with a WARNING), as on a new node."""
        text = self.get_str(key)
        if text is None:
            return None
        if not _INT_RE.fullmatch(text.strip()):
            shown = text if len(text) <= 40 else text[:40] + "…"
            log.warning(
                "pref %s at %s holds %r, not an integer; treated as unset", key, self.root / key, shown
            )
            return None
        return int(text.strip())

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    # -- writing -------------------------------------------------------------------------------------------

    def set_bytes(self, key: str, value: bytes) -> None:
        path = self.path(key)
        self._ensure_dir()
        try:
            replace_file(path, value, 0o600, durable=True)
        except OSError as exc:
            raise PrefsError(f"cannot write pref {key} to {path}: {exc.strerror or exc}") from exc

    def set_str(self, key: str, value: str) -> None:
        self.set_bytes(key, value.encode("utf-8"))

    def set_int(self, key: str, value: int) -> None:
        self.set_str(key, str(int(value)))

    def delete(self, key: str) -> None:
        """Remove ``key``; removing a missing key is not an error."""
        path = self.path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise PrefsError(f"cannot delete pref {key} at {path}: {exc.strerror or exc}") from exc
        self._sync_dir()

    def discard_stale_temp_files(self) -> int:
        """Remove temp files left by writes that a crash interrupted; returns how many were removed."""
        removed = 0
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise PrefsError(f"cannot list the prefs directory {self.root}: {exc.strerror or exc}") from exc
        for entry in entries:
            if entry.name.startswith(".") and entry.name.endswith(TEMPORARY_SUFFIX) and entry.is_file():
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    log.warning("cannot remove stale pref temp file %s: %s", entry.path, exc.strerror or exc)
                    continue
                removed += 1
        if removed:
            log.warning("removed %d temp file(s) left in %s by an interrupted write", removed, self.root)
        return removed

    def _ensure_dir(self) -> None:
        if self._dir_ready:
            return
        try:
            self.root.parent.mkdir(parents=True, exist_ok=True)
            self.root.mkdir(mode=0o700)
            os.chmod(self.root, 0o700)  # mkdir's mode is filtered by the umask
        except FileExistsError:
            pass
        except OSError as exc:
            raise PrefsError(f"cannot create the prefs directory {self.root}: {exc.strerror or exc}") from exc
        # This process is the directory's writer: whatever temp file is there now was left by a crash.
        self.discard_stale_temp_files()
        self._dir_ready = True

    def _sync_dir(self) -> None:
        try:
            sync_directory(self.root)
        except OSError as exc:
            raise PrefsError(f"cannot sync the prefs directory {self.root}: {exc.strerror or exc}") from exc
