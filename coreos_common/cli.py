"""What every command of the project does when the reader of its stdout goes away (``cmd | head -0``).

Rule: a closed pipe is not an error worth a traceback. The command stops writing, points stdout at /dev/null so
the interpreter's final flush cannot fail a second time, and exits as a shell reports a process killed by
SIGPIPE (128 + 13), unless the command documents another code. Every command takes the rule from here.
"""

from __future__ import annotations

import os
import sys

EXIT_BROKEN_PIPE = 128 + 13


def discard_stdout() -> None:
    """Send whatever is still buffered for stdout, and all later output, to /dev/null."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
