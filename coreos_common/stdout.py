"""Commands whose reader went away (``cmd | head -0``): no traceback, no error from the interpreter's last flush.

Rules: a command catches ``BrokenPipeError`` once, around everything it prints, and calls :func:`reader_gone`;
then it exits with the code it documents for that case (:data:`EXIT_READER_GONE`, what a shell reports for a
command killed by SIGPIPE, unless it says otherwise).
"""

from __future__ import annotations

import os
import sys

EXIT_READER_GONE = 141  # 128 + SIGPIPE


def reader_gone() -> None:
    """Point stdout at /dev/null: whatever is still buffered is dropped instead of failing at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
