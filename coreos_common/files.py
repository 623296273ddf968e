"""Files replaced whole: readers see the old content or the new one, never half of either.

Rules: the new content goes to a temporary file created beside the target (same directory, so the rename stays on
one file system; a caller may name another directory of the same file system), under a fresh name (``.<name>.
<random><suffix>``, created exclusively, so never through a link), written in full (``os.write`` may write less
than asked). It gets the final mode (whatever the umask) and, when the caller needs it to survive a power cut, an
fsync before the rename over the target and an fsync of the target's directory after it. On any failure before
the rename the temporary file is removed and the OSError goes to the caller, who names the file in its own error.
This module is the one place that writes files this way: prefs, the reboot marker, state and metrics files, the
new kernel, generated and uploaded payloads.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from types import TracebackType

# How the temporary files end unless the caller says otherwise; what a sweep of crash leftovers looks for.
TEMPORARY_SUFFIX = ".tmp"


def sync_directory(directory: Path) -> None:
    """fsync ``directory``: a rename or unlink in it survives a power cut."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class NewFile:
    """The next content of ``path``, written to a temporary file that :meth:`commit` renames over ``path``.

    For content written piece by piece or at offsets (:attr:`fd` takes ``os.pwrite``), or checked before it
    replaces the old. Use it as a context manager: leaving the block closes it, and removes the temporary file
    unless it was committed.
    """

    def __init__(
        self, path: Path, mode: int = 0o644, *, suffix: str = TEMPORARY_SUFFIX, directory: Path | None = None
    ) -> None:
        """Create the temporary file (``directory``: where, if not beside ``path``; the same file system)."""
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=directory or path.parent)
        self.path = path
        self.mode = mode
        self.temporary = Path(name)
        self.committed = False
        self._fd = fd

    @property
    def fd(self) -> int:
        """The temporary file's descriptor; -1 once closed."""
        return self._fd

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append all of ``data``."""
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def commit(self, *, durable: bool = False) -> None:
        """Give the file its mode and rename it over ``path``; ``durable`` fsyncs the data before the rename and
        the directory after it. The descriptor stays open until :meth:`close`."""
        os.fchmod(self._fd, self.mode)
        if durable:
            os.fsync(self._fd)
        os.replace(self.temporary, self.path)
        self.committed = True
        if durable:
            sync_directory(self.path.parent)

    def close(self) -> None:
        """Close the descriptor and remove the temporary file unless it was committed; safe to call twice."""
        fd, self._fd = self._fd, -1
        try:
            if fd >= 0:
                os.close(fd)
        finally:
            if not self.committed:
                with contextlib.suppress(FileNotFoundError):
                    self.temporary.unlink()

    def __enter__(self) -> NewFile:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def replace_file(path: Path, data: bytes, mode: int = 0o644, *, durable: bool = False) -> None:
    """Replace ``path`` with ``data`` atomically; ``durable`` fsyncs the data and the directory."""
    with NewFile(path, mode) as new:
        new.write(data)
        new.commit(durable=durable)
