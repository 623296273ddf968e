"""Files replaced whole: readers see the old content or the new one, never half of either.

Rules: the new content goes to a temporary file beside the target (same directory, so the rename stays on one
file system), created with ``O_NOFOLLOW`` and the final mode, written in full (``os.write`` may write less than
asked), fsynced when the caller needs it to survive a power cut, then renamed over the target. On any failure the
temporary file is removed and the OSError goes to the caller, who names the file in its own error.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def replace_file(path: Path, data: bytes, mode: int = 0o644, *, durable: bool = False) -> None:
    """Replace ``path`` with ``data`` atomically; ``durable`` fsyncs the data before the rename."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        try:
            os.fchmod(fd, mode)  # whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except OSError:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
