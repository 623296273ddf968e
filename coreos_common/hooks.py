"""Hook directories: executables the operator drops in to run at fixed points of an update.

locksmithd runs ``pre-reboot.d/`` before it asks logind to reboot (drain the node) and ``post-reboot.d/`` before
it gives its lock back (uncordon, health checks); update-engine runs ``healthy-boot.d/`` before it marks a boot
good, and its post-install hook the same way. Rules of this file:

* **Which files run.** Regular files directly in the directory, in byte order of their names, skipping names
  that start with ``.`` or end in ``~``, ``.dpkg-old``/``-new``/``-dist``/``-tmp``, ``.rpmnew``/``.rpmsave``,
  ``.swp``. A file that is not executable is skipped with a warning (``chmod -x`` is how an operator disables a
  hook, as with run-parts). A missing directory means no hooks.
* **Which files are refused.** A hook, or its directory, that is writable by group or others, or owned by
  another user than root or the daemon's own: whoever could write it could run code as the daemon. A refused
  hook fails the run (fail closed: a drain that did not run must not be taken for a drain that passed), with a
  warning naming the file and what is wrong with it.
* **How they run.** One at a time, in a new session (so a timeout or a cancel kills the hook's whole process
  group: SIGTERM, then SIGKILL after a grace period), stdin from /dev/null, stdout and stderr together. The
  first hook that fails, times out or is refused ends the run; the caller decides what that means.
* **Output.** Every line goes to the journal prefixed with the hook's name, up to ``MAX_LOGGED_LINES`` lines and
  ``MAX_LOGGED_BYTES`` bytes per hook (lines cut at ``MAX_LINE_BYTES``); the rest is read and counted, never
  buffered, so a hook printing megabytes neither blocks nor floods. The last lines are kept for the caller's
  error message, each shortened there to ``TAIL_LINE_CHARS``.
* **Environment.** The daemon's own, minus variables whose names contain ``PASSWORD``, ``SECRET`` or ``TOKEN``,
  plus the context the caller gives (strategy, group, versions, machine id…), which wins over inherited names.

:func:`judge` is the pure decision for one directory entry; :func:`discover` and :func:`run_hooks` are the I/O.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import os
import signal
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MAX_LOGGED_LINES = 200
MAX_LOGGED_BYTES = 64 * 1024
MAX_LINE_BYTES = 4096
TAIL_LINES = 5
TAIL_LINE_CHARS = 300
KILL_GRACE_S = 5.0
_IGNORED_SUFFIXES = (
    "~", ".dpkg-old", ".dpkg-new", ".dpkg-dist", ".dpkg-tmp", ".rpmnew", ".rpmsave", ".swp",
)
_SECRET_MARKERS = ("PASSWORD", "SECRET", "TOKEN")


class Verdict(enum.Enum):
    """What to do with one directory entry."""

    RUN = "run"
    IGNORE = "ignore"  # backup and editor files: not hooks at all, nothing logged
    SKIP = "skip"  # not executable or not a regular file: logged, the run goes on
    REFUSE = "refuse"  # unsafe: logged, the run fails


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    reason: str = ""


def judge(name: str, st: os.stat_result, *, own_uid: int) -> Judgement:
    """Pure: may the entry ``name`` with status ``st`` (from ``lstat``) run as a hook of a daemon with ``own_uid``?"""
    if name.startswith(".") or name.endswith(_IGNORED_SUFFIXES):
        return Judgement(Verdict.IGNORE)
    if stat.S_ISLNK(st.st_mode):
        return Judgement(Verdict.REFUSE, "is a symbolic link (put the executable itself in the directory)")
    if not stat.S_ISREG(st.st_mode):
        return Judgement(Verdict.SKIP, "is not a regular file")
    if st.st_uid not in (0, own_uid):
        return Judgement(Verdict.REFUSE, f"is owned by uid {st.st_uid}, not by root or this daemon")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return Judgement(Verdict.REFUSE, f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})")
    if not st.st_mode & stat.S_IXUSR:
        return Judgement(Verdict.SKIP, "is not executable (chmod +x to enable it)")
    return Judgement(Verdict.RUN)


def judge_directory(st: os.stat_result, *, own_uid: int) -> str | None:
    """Pure: why a hook directory with status ``st`` is unsafe, or None."""
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid not in (0, own_uid):
        return f"is owned by uid {st.st_uid}, not by root or this daemon"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


@dataclass(frozen=True)
class Hook:
    path: Path

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class Refusal:
    """A hook (or a whole directory) that must not run, and why."""

    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path} {self.reason}"


@dataclass(frozen=True)
class Discovery:
    hooks: tuple[Hook, ...]
    refusals: tuple[Refusal, ...]


def discover(directory: Path) -> Discovery:
    """The hooks of ``directory`` in run order, and the entries that must not run. Logs skipped entries."""
    own_uid = os.geteuid()
    try:
        dir_stat = os.stat(directory)
    except FileNotFoundError:
        return Discovery((), ())
    except OSError as exc:
        return Discovery((), (Refusal(directory, f"cannot be read: {exc.strerror}"),))
    problem = judge_directory(dir_stat, own_uid=own_uid)
    if problem is not None:
        return Discovery((), (Refusal(directory, problem),))
    hooks: list[Hook] = []
    refusals: list[Refusal] = []
    try:
        names = sorted(os.listdir(directory), key=os.fsencode)
    except OSError as exc:
        return Discovery((), (Refusal(directory, f"cannot be listed: {exc.strerror}"),))
    for name in names:
        path = directory / name
        try:
            entry_stat = os.lstat(path)
        except FileNotFoundError:
            continue  # removed while we looked
        except OSError as exc:
            refusals.append(Refusal(path, f"cannot be examined: {exc.strerror}"))
            continue
        judgement = judge(name, entry_stat, own_uid=own_uid)
        if judgement.verdict is Verdict.RUN:
            hooks.append(Hook(path))
        elif judgement.verdict is Verdict.SKIP:
            log.warning("Hook %s %s; skipped", path, judgement.reason)
        elif judgement.verdict is Verdict.REFUSE:
            refusals.append(Refusal(path, judgement.reason))
    return Discovery(tuple(hooks), tuple(refusals))


class Outcome(enum.Enum):
    PASSED = "passed"
    FAILED = "failed"  # exited non-zero or was killed by a signal
    TIMED_OUT = "timed out"
    REFUSED = "refused"  # unsafe file or directory, or it could not be started


@dataclass(frozen=True)
class RunResult:
    """How a run of a hook directory ended; ``hook`` and ``detail`` name the one that ended it when it failed.

    ``returncode`` is the exit status of that hook when it exited by itself (negative: killed by that signal).
    """

    outcome: Outcome
    ran: tuple[str, ...] = ()
    hook: Path | None = None
    detail: str = ""
    tail: tuple[str, ...] = ()
    returncode: int | None = None

    @property
    def passed(self) -> bool:
        return self.outcome is Outcome.PASSED

    def describe(self) -> str:
        """One line for the journal: which hook, what happened, its last output."""
        if self.passed:
            return f"{len(self.ran)} hook(s) passed" if self.ran else "no hooks"
        text = f"hook {self.hook} {self.outcome.value}"
        if self.detail:
            text += f" ({self.detail})"
        if self.tail:
            text += "; last output: " + " | ".join(_shortened(line) for line in self.tail)
        return text


def _shortened(line: str) -> str:
    """A line of a hook's output as the one-line summary shows it (the journal has the lines themselves)."""
    return line if len(line) <= TAIL_LINE_CHARS else line[:TAIL_LINE_CHARS] + f"… ({len(line)} characters)"


def hook_environment(context: Mapping[str, str], base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The daemon's environment without secrets, plus ``context``."""
    inherited = os.environ if base is None else base
    env = {k: v for k, v in inherited.items() if not any(marker in k.upper() for marker in _SECRET_MARKERS)}
    env.update(context)
    return env


class _OutputLog:
    """Logs a hook's output lines within the per-hook budget and keeps the last few for error messages."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lines_logged = 0
        self.bytes_logged = 0
        self.dropped_bytes = 0
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)

    def line(self, raw: bytes) -> None:
        text = raw[:MAX_LINE_BYTES].decode("utf-8", "replace").rstrip("\r\n")
        text = text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text
        self.tail.append(text)
        if self.lines_logged >= MAX_LOGGED_LINES or self.bytes_logged + len(raw) > MAX_LOGGED_BYTES:
            self.dropped_bytes += len(raw)
            return
        self.lines_logged += 1
        self.bytes_logged += len(raw)
        log.info("[%s] %s", self.name, text)

    def finish(self) -> None:
        if self.dropped_bytes:
            log.warning("[%s] %d more bytes of output not logged (limit %d lines, %d bytes)",
                        self.name, self.dropped_bytes, MAX_LOGGED_LINES, MAX_LOGGED_BYTES)


async def _read_output(stream: asyncio.StreamReader, output: _OutputLog) -> None:
    """Read lines until EOF without ever holding more than one line (cut at MAX_LINE_BYTES) in memory."""
    pending = b""
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            break
        pending += chunk
        while True:
            newline = pending.find(b"\n")
            if newline < 0:
                break
            output.line(pending[: newline + 1])
            pending = pending[newline + 1:]
        if len(pending) > MAX_LINE_BYTES:  # a line without end: log its start, count the rest as it comes
            output.line(pending)
            pending = b""
    if pending:
        output.line(pending)


def _kill_group(process: asyncio.subprocess.Process, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


async def _stop(process: asyncio.subprocess.Process) -> None:
    """SIGTERM the hook's process group, SIGKILL it after the grace period, and reap the hook."""
    _kill_group(process, signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), KILL_GRACE_S)
    except TimeoutError:
        _kill_group(process, signal.SIGKILL)
        await process.wait()
    _kill_group(process, signal.SIGKILL)  # whatever the hook left behind in its group


async def run_hook(path: Path, *, env: Mapping[str, str], timeout: float, args: tuple[str, ...] = ()) -> RunResult:
    """Run one executable as a hook: bounded in time and output, killed with its group on timeout or cancel."""
    name = path.name
    output = _OutputLog(name)
    log.info("Running hook %s", path)
    starting = asyncio.ensure_future(asyncio.create_subprocess_exec(
        str(path), *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env=dict(env), start_new_session=True,
    ))
    try:
        process = await asyncio.shield(starting)
    except OSError as exc:
        return RunResult(Outcome.REFUSED, hook=path, detail=f"cannot be started: {exc.strerror}")
    except asyncio.CancelledError:
        # Cancelled while the process was being set up: asyncio alone would kill the hook but not what it started
        # already. Let the start finish, then stop the whole group as any cancel does.
        with contextlib.suppress(Exception):
            await asyncio.shield(_stop(await starting))
        raise
    assert process.stdout is not None
    reader = asyncio.ensure_future(_read_output(process.stdout, output))
    try:
        try:
            await asyncio.wait_for(asyncio.shield(process.wait()), timeout)
        except TimeoutError:
            await _stop(process)
            return RunResult(Outcome.TIMED_OUT, hook=path, detail=f"after {timeout:g} s", tail=tuple(output.tail))
        _kill_group(process, signal.SIGKILL)  # children the hook left running would hold the output open
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(reader), KILL_GRACE_S)
    except asyncio.CancelledError:
        await asyncio.shield(_stop(process))
        raise
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
        output.finish()
    code = process.returncode
    assert code is not None
    if code == 0:
        log.info("Hook %s passed", path)
        return RunResult(Outcome.PASSED, ran=(name,))
    detail = f"exit status {code}" if code > 0 else f"killed by signal {-code}"
    return RunResult(Outcome.FAILED, hook=path, detail=detail, tail=tuple(output.tail), returncode=code)


async def run_hooks(directory: Path, *, context: Mapping[str, str], timeout: float) -> RunResult:
    """Run every hook of ``directory`` in order; the first that does not pass ends the run."""
    discovery = discover(directory)
    if discovery.refusals:
        first = discovery.refusals[0]
        for refusal in discovery.refusals:
            log.warning("Hook %s: refused, nothing in %s runs until this is fixed", refusal, directory)
        return RunResult(Outcome.REFUSED, hook=first.path, detail=first.reason)
    env = hook_environment(context)
    ran: list[str] = []
    for hook in discovery.hooks:
        result = await run_hook(hook.path, env=env, timeout=timeout)
        if not result.passed:
            return RunResult(result.outcome, ran=tuple(ran), hook=result.hook, detail=result.detail,
                             tail=result.tail, returncode=result.returncode)
        ran.append(hook.name)
    return RunResult(Outcome.PASSED, ran=tuple(ran))
