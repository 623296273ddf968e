"""What both of coreupdate's commands need to behave at the terminal: exit codes, errors without tracebacks,
and a quiet exit when the reader of stdout went away (``cmd | head -0``)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from coreos_common.cli import discard_stdout

# Exit codes (documented in the README): scripts may rely on them.
EXIT_OK = 0
EXIT_FAILED = 1  # the server or the database refused: not found, conflict, invalid input
EXIT_USAGE = 2  # bad command line
EXIT_UNREACHABLE = 3  # the server or the database cannot be reached, or answered 5xx
EXIT_AUTH = 4  # no token, or the token was refused


class CliError(Exception):
    """Print ``message`` on stderr and exit with ``code``."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def run_cli(prog: str, body: Callable[[], int]) -> int:
    """Run a command's body: CliError → message and its code; a closed stdout → exit quietly; ^C → 130."""
    try:
        code = body()
        sys.stdout.flush()
        return code
    except CliError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return exc.code
    except BrokenPipeError:
        discard_stdout()
        return EXIT_OK  # coreupdate's own code for it: the work is done, only its report went unread
    except KeyboardInterrupt:
        return 130
