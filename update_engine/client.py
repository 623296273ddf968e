"""``update_engine_client``: the operator's command line over update-engine's D-Bus API.

Flags are gflags-style booleans, as in the original: ``-status``, ``--status``, ``-status=true``, ``-nostatus``.
One action runs, chosen by precedence: reset_status > status > rollback > check_for_update/update >
watch_for_updates. ``-rollback`` sits after ``-status`` (printing the status never changes anything) and before a
check (an explicit rollback is a deliberate act that must not be swallowed by an update request).

Outputs: ``-status`` prints the original's KEY=VALUE block on stdout (``--json``: one JSON object); ``-update``
prints that block on every poll and a closing line on stderr; ``-watch_for_updates`` logs every StatusUpdate
signal to stderr as the original does (``--json``: one JSON object per signal on stdout). Exit 1 whenever the
daemon is unreachable, refuses, or an update attempt fails.

How ``-update`` tells the outcome (the D-Bus status carries no error code): it subscribes to StatusUpdate before
calling AttemptUpdate, so it sees every state the attempt passes through, and polls GetStatus as the original does.
The attempt has *failed* when it passed through REPORTING_ERROR_EVENT, or returned to IDLE after an update was
found (UPDATE_AVAILABLE, DOWNLOADING, VERIFYING or FINALIZING), or returned to IDLE without recording a successful
check (last_checked_time unchanged). It found *no update* when it returned to IDLE with a new last_checked_time
and nothing else, and *succeeded* at UPDATED_NEED_REBOOT.
"""

from __future__ import annotations

import asyncio
import enum
import json
import shlex
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import TextIO

from dbus_fast import AuthError, BusType, InvalidAddressError, Message, MessageType
from dbus_fast.aio import MessageBus

from coreos_common.boolean import parse_bool
from coreos_common.cli import EXIT_BROKEN_PIPE, discard_stdout
from coreos_common.dbus import ERROR_ACCESS_DENIED, DBusCallError, bus_method, call
from coreos_common.logs import escape_control
from coreos_common.status import (
    BUS_NAME,
    DETAILS_SIGNATURE,
    INTERFACE,
    OBJECT_PATH,
    STATUS_SIGNATURE,
    StatusDetails,
    StatusSnapshot,
    UpdateStatus,
)
from update_engine import __version__

PROG = "update_engine_client"
CALL_TIMEOUT_SECONDS = 25.0
NOT_RUNNING = f"update-engine is not running on this bus ({BUS_NAME} has no owner)"
# GetStatusDetails is ours: an older update-engine does not know it, an older bus policy may not allow it.
_DETAILS_UNAVAILABLE = frozenset({"org.freedesktop.DBus.Error.UnknownMethod", ERROR_ACCESS_DENIED})
# Polls that may still show IDLE before the attempt shows up; after that the request counts as ignored.
MAX_POLLS_BEFORE_START = 3

USAGE = f"""\
usage: {PROG} ACTION [--json] [--bus-address ADDRESS] [--wait SECONDS]

actions (the first one in this list that is given runs):
  -reset_status        go back to IDLE from UPDATED_NEED_REBOOT, abandoning the installed update (or rollback)
  -status              print the current status and the last attempt's error
  -rollback            boot the other /usr partition next time
  -check_for_update    start an update check and return
  -update              start an update check and follow it until it ends
  -watch_for_updates   print the status, then every change, until interrupted or update-engine stops

options:
  --json               print status as JSON (-status, -update, -watch_for_updates)
  --bus-address ADDR   D-Bus address (default: $DBUS_SYSTEM_BUS_ADDRESS or the system bus)
  --wait SECONDS       wait up to SECONDS for update-engine to appear on the bus
  --version            print the version and exit

Flags take one or two dashes and an optional =true/=false; -noFLAG turns FLAG off.
"""


class UsageError(Exception):
    """A command line the client cannot act on; the message names the offending argument."""


class ClientError(Exception):
    """Something the operator must be told, after which the client exits 1."""


class NotRunningError(ClientError):
    """Nobody owns com.coreos.update1 on the bus."""

    def __init__(self) -> None:
        super().__init__(NOT_RUNNING)


class Action(enum.Enum):
    """What one invocation does; declared in precedence order."""

    RESET_STATUS = "reset_status"
    STATUS = "status"
    ROLLBACK = "rollback"
    UPDATE = "update"
    CHECK_FOR_UPDATE = "check_for_update"
    WATCH_FOR_UPDATES = "watch_for_updates"
    NONE = "none"


_BOOLEAN_FLAGS = (
    "check_for_update",
    "status",
    "update",
    "watch_for_updates",
    "reset_status",
    "rollback",
    "json",
    "help",
    "version",
)
_VALUE_FLAGS = ("bus_address", "wait", "poll_interval")


@dataclass(frozen=True)
class ClientOptions:
    """The parsed command line; ``poll_interval`` is a hidden option (tests shorten the 5 s -update poll)."""

    check_for_update: bool = False
    status: bool = False
    update: bool = False
    watch_for_updates: bool = False
    reset_status: bool = False
    rollback: bool = False
    json: bool = False
    help: bool = False
    version: bool = False
    bus_address: str | None = None
    wait: float = 0.0
    poll_interval: float = 5.0

    def action(self) -> Action:
        """The one action to run: the first given flag in :class:`Action` order."""
        for action in Action:
            if action is not Action.NONE and getattr(self, action.value):
                return action
        return Action.NONE

    def ignored_actions(self) -> list[str]:
        """Action flags given but not run because another one takes precedence."""
        chosen = self.action()
        ignored = [a.value for a in Action if a is not Action.NONE and a is not chosen and getattr(self, a.value)]
        if chosen is Action.UPDATE and "check_for_update" in ignored:
            ignored.remove("check_for_update")  # -update includes the check
        return ignored


def _parse_bool(name: str, text: str) -> bool:
    try:
        return parse_bool(text)
    except ValueError:
        raise UsageError(f"-{name}={text}: expected true or false") from None


def _parse_seconds(name: str, text: str, minimum_exclusive: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"--{name.replace('_', '-')} {text!r}: expected a number of seconds") from None
    if value != value or value < 0 or (minimum_exclusive and value == 0) or value == float("inf"):
        raise UsageError(f"--{name.replace('_', '-')} {text!r}: expected a positive number of seconds")
    return value


def parse_args(argv: Sequence[str]) -> ClientOptions:
    """Parse gflags-style arguments (``-flag``, ``--flag``, ``-flag=true``, ``-noflag``, ``--name value``)."""
    values: dict[str, object] = {}
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            if i < len(args):
                raise UsageError(f"unexpected argument {args[i]!r}")
            break
        if not arg.startswith("-") or arg == "-" or arg.startswith("---"):
            raise UsageError(f"unexpected argument {arg!r}")
        body = arg[2:] if arg.startswith("--") else arg[1:]
        name, has_value, text = body.partition("=")
        name = name.replace("-", "_")
        if name == "h":
            name = "help"
        if name in _BOOLEAN_FLAGS:
            values[name] = _parse_bool(name, text) if has_value else True
        elif name.startswith("no") and name[2:] in _BOOLEAN_FLAGS and not has_value:
            values[name[2:]] = False
        elif name in _VALUE_FLAGS:
            if not has_value:
                if i >= len(args):
                    raise UsageError(f"{arg} needs a value")
                text = args[i]
                i += 1
            if name == "bus_address":
                if not text:
                    raise UsageError(f"{arg}: empty bus address")
                values[name] = text
            else:
                values[name] = _parse_seconds(name, text, minimum_exclusive=name == "poll_interval")
        else:
            raise UsageError(f"unknown flag {arg!r}")
    return ClientOptions(**values)  # type: ignore[arg-type]


def format_status(snapshot: StatusSnapshot) -> str:
    """The original's -status block (``%f`` progress, as C prints it)."""
    return (
        f"LAST_CHECKED_TIME={snapshot.last_checked_time}\n"
        f"PROGRESS={snapshot.progress:f}\n"
        f"CURRENT_OP={snapshot.current_operation}\n"
        f"NEW_VERSION={snapshot.new_version}\n"
        f"NEW_SIZE={snapshot.new_size}\n"
    )


def format_status_json(snapshot: StatusSnapshot) -> str:
    """One JSON object with the five D-Bus fields under their D-Bus argument names."""
    return json.dumps({f.name: getattr(snapshot, f.name) for f in fields(snapshot)}) + "\n"


def format_last_error(details: StatusDetails) -> str:
    """The ``LAST_ERROR=`` line: empty unless the last attempt failed, else shell-quoted so ``eval`` reads it."""
    if not details.last_error_code:
        return "LAST_ERROR=\n"
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(details.last_attempt_time))
    text = f"{details.last_error_code} {details.last_error_name} at {when}: {details.last_error_reason}"
    return f"LAST_ERROR={shlex.quote(escape_control(text))}\n"


def format_details(details: StatusDetails) -> str:
    """-status: the original's block, then what it cannot say (the last attempt's error)."""
    return format_status(details.status) + format_last_error(details)


def format_details_json(details: StatusDetails) -> str:
    """-status --json: the five D-Bus fields, the last attempt, what is pending, warnings and the settings used."""
    values: dict[str, object] = {f.name: getattr(details.status, f.name) for f in fields(details.status)}
    failed = bool(details.last_error_code)
    values["last_attempt"] = None if not details.last_attempt_result else {
        "result": details.last_attempt_result,
        "time": details.last_attempt_time,
        "error_code": details.last_error_code if failed else None,
        "error_name": details.last_error_name if failed else None,
        "reason": details.last_error_reason if failed else None,
    }
    values["pending_reboot"] = details.pending_reboot or None
    values["warnings"] = list(details.warnings)
    values["settings"] = {
        "server": details.server, "group": details.group, "current_version": details.current_version,
        "board": details.board, "app_id": details.app_id, "public_key": details.public_key,
    }
    return json.dumps(values) + "\n"


def format_watch(snapshot: StatusSnapshot) -> str:
    """The original's -watch_for_updates log entry (progress as a C++ stream prints a double)."""
    return (
        "Got status update:\n"
        f"  last_checked_time: {snapshot.last_checked_time}\n"
        f"  progress: {snapshot.progress:g}\n"
        f"  current_operation: {snapshot.current_operation}\n"
        f"  new_version: {snapshot.new_version}\n"
        f"  new_size: {snapshot.new_size}\n"
    )


class Outcome(enum.Enum):
    """Where an -update run stands."""

    RUNNING = "running"
    NO_UPDATE = "no update"
    NEED_REBOOT = "need reboot"
    FAILED = "failed"
    CHECK_FAILED = "check failed"
    IGNORED = "ignored"


_FOUND_UPDATE_STATES = frozenset(
    {
        UpdateStatus.UPDATE_AVAILABLE.value,
        UpdateStatus.DOWNLOADING.value,
        UpdateStatus.VERIFYING.value,
        UpdateStatus.FINALIZING.value,
    }
)


class UpdateFollower:
    """Judges an -update run from the snapshots it observes (signals and polls, in arrival order); pure."""

    def __init__(self, before: StatusSnapshot) -> None:
        self._before = before
        self.seen: list[str] = []
        self._started = before.current_operation not in (
            UpdateStatus.IDLE.value,
            UpdateStatus.UPDATED_NEED_REBOOT.value,
        )
        if self._started:
            self.seen.append(before.current_operation)
        self._idle_polls = 0

    def observe(self, snapshot: StatusSnapshot, polled: bool = False) -> Outcome:
        op = snapshot.current_operation
        if op == UpdateStatus.UPDATED_NEED_REBOOT.value:
            return Outcome.NEED_REBOOT
        if op != UpdateStatus.IDLE.value:
            self._started = True
            if not self.seen or self.seen[-1] != op:
                self.seen.append(op)
            return Outcome.RUNNING
        checked = snapshot.last_checked_time != self._before.last_checked_time
        if not self._started and not checked:
            if polled:
                self._idle_polls += 1
                if self._idle_polls >= MAX_POLLS_BEFORE_START:
                    return Outcome.IGNORED
            return Outcome.RUNNING
        if UpdateStatus.REPORTING_ERROR_EVENT.value in self.seen or _FOUND_UPDATE_STATES.intersection(self.seen):
            return Outcome.FAILED
        if not checked:
            return Outcome.CHECK_FAILED
        return Outcome.NO_UPDATE


def _call_error(member: str, error: DBusCallError) -> ClientError:
    name, text = error.name, error.text
    if error.no_service:
        return NotRunningError()
    if name in (ERROR_ACCESS_DENIED, "com.coreos.update1.Error.AccessDenied"):
        return ClientError(f"{member}: access denied; only root may call it ({text})")
    if name == "com.coreos.update1.Error.ResetNotAllowed":
        return ClientError(f"ResetStatus refused: {text}")
    if name == "com.coreos.update1.Error.RollbackRefused":
        return ClientError(f"Rollback refused: {text}")
    return ClientError(f"{member} failed: {name}: {text}")


class ManagerClient:
    """Thin async wrapper over com.coreos.update1.Manager for one bus connection."""

    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus

    async def _call(self, message: Message, member: str, passed_on: frozenset[str] = frozenset()) -> Message:
        """The reply; a ClientError saying what went wrong, except for D-Bus errors named in ``passed_on``."""
        try:
            return await asyncio.wait_for(call(self.bus, message), CALL_TIMEOUT_SECONDS)
        except TimeoutError:
            raise ClientError(f"{member}: no reply from update-engine within {CALL_TIMEOUT_SECONDS:g} s") from None
        except DBusCallError as exc:
            if exc.name in passed_on:
                raise
            raise _call_error(member, exc) from None

    async def _manager_call(self, member: str, passed_on: frozenset[str] = frozenset()) -> Message:
        return await self._call(
            Message(destination=BUS_NAME, path=OBJECT_PATH, interface=INTERFACE, member=member), member, passed_on
        )

    async def _bus_call(self, member: str, signature: str, body: list[object]) -> Message:
        return await self._call(bus_method(member, signature, body), member)

    async def is_running(self) -> bool:
        reply = await self._bus_call("NameHasOwner", "s", [BUS_NAME])
        return bool(reply.body[0])

    async def get_status(self) -> StatusSnapshot:
        reply = await self._manager_call("GetStatus")
        if reply.signature != STATUS_SIGNATURE:
            raise ClientError(f"GetStatus: expected ({STATUS_SIGNATURE}), got ({reply.signature})")
        try:
            return StatusSnapshot.from_values(reply.body)
        except ValueError as exc:
            raise ClientError(f"GetStatus: {exc}") from exc

    async def get_details(self) -> StatusDetails | None:
        """GetStatusDetails, or None from an update-engine without it (or whose bus policy does not allow it)."""
        try:
            reply = await self._manager_call("GetStatusDetails", _DETAILS_UNAVAILABLE)
        except DBusCallError:
            return None
        if reply.signature != DETAILS_SIGNATURE:
            raise ClientError(f"GetStatusDetails: expected ({DETAILS_SIGNATURE}), got ({reply.signature})")
        entries = reply.body[0] if reply.body and isinstance(reply.body[0], dict) else {}
        try:
            return StatusDetails.from_values({name: getattr(value, "value", value) for name, value in entries.items()})
        except ValueError as exc:
            raise ClientError(f"GetStatusDetails: {exc}") from exc

    async def watch_owner(self, on_gone: Callable[[], None]) -> None:
        """Call ``on_gone`` when com.coreos.update1 loses its owner (update-engine stopped or crashed)."""

        def handler(message: Message) -> None:
            if (
                message.message_type is MessageType.SIGNAL
                and message.member == "NameOwnerChanged"
                and message.signature == "sss"
                and message.body[0] == BUS_NAME
                and not message.body[2]
            ):
                on_gone()

        self.bus.add_message_handler(handler)
        rule = (
            "type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
            f"member='NameOwnerChanged',arg0='{BUS_NAME}'"
        )
        await self._bus_call("AddMatch", "s", [rule])

    async def attempt_update(self) -> None:
        await self._manager_call("AttemptUpdate")

    async def reset_status(self) -> None:
        await self._manager_call("ResetStatus")

    async def rollback(self) -> str:
        reply = await self._manager_call("Rollback")
        return str(reply.body[0]) if reply.body else ""

    async def subscribe(self, on_status: Callable[[StatusSnapshot], None]) -> None:
        """Deliver every well-formed StatusUpdate signal from update-engine to ``on_status``."""

        def handler(message: Message) -> None:
            if (
                message.message_type is MessageType.SIGNAL
                and message.interface == INTERFACE
                and message.member == "StatusUpdate"
                and message.path == OBJECT_PATH
                and message.signature == STATUS_SIGNATURE
            ):
                try:
                    on_status(StatusSnapshot.from_values(message.body))
                except ValueError:
                    return

        self.bus.add_message_handler(handler)
        rule = (
            f"type='signal',sender='{BUS_NAME}',path='{OBJECT_PATH}',"
            f"interface='{INTERFACE}',member='StatusUpdate'"
        )
        await self._bus_call("AddMatch", "s", [rule])


async def _connect(options: ClientOptions) -> MessageBus:
    """Connect, retrying until ``--wait`` runs out; a clear ClientError when the bus cannot be reached."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + options.wait
    while True:
        try:
            return await MessageBus(bus_address=options.bus_address, bus_type=BusType.SYSTEM).connect()
        except InvalidAddressError as exc:
            raise ClientError(f"invalid bus address {options.bus_address!r}: {exc}") from exc
        except (OSError, AuthError) as exc:
            if loop.time() >= deadline:
                where = options.bus_address or "the system bus"
                raise ClientError(f"cannot connect to {where}: {exc}") from exc
            await asyncio.sleep(min(1.0, max(0.0, deadline - loop.time())))


async def _wait_until_running(client: ManagerClient, wait: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while not await client.is_running():
        if loop.time() >= deadline:
            raise NotRunningError()
        await asyncio.sleep(min(0.5, max(0.0, deadline - loop.time())))


def _write(stream: TextIO, text: str) -> None:
    stream.write(text)
    stream.flush()


class _Interrupted:
    """Queue item standing for SIGINT/SIGTERM, or (``_GONE``) for update-engine leaving the bus."""


_INTERRUPTED = _Interrupted()
_GONE = _Interrupted()


def _drain(queue: asyncio.Queue[StatusSnapshot | _Interrupted]) -> list[StatusSnapshot | _Interrupted]:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


def _queue_with_interrupts() -> asyncio.Queue[StatusSnapshot | _Interrupted]:
    queue: asyncio.Queue[StatusSnapshot | _Interrupted] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, queue.put_nowait, _INTERRUPTED)
    return queue


async def _run_update(client: ManagerClient, options: ClientOptions, out: TextIO, err: TextIO) -> int:
    block = format_status_json if options.json else format_status
    queue = _queue_with_interrupts()
    await client.subscribe(queue.put_nowait)
    before = await client.get_status()
    if before.current_operation == UpdateStatus.UPDATED_NEED_REBOOT.value:
        _write(out, block(before))
        _write(err, f"An update to {before.new_version} is already installed; reboot needed.\n")
        return 0
    follower = UpdateFollower(before)
    await client.attempt_update()
    _write(err, "Initiated update check and install; waiting for it to finish.\n")
    loop = asyncio.get_running_loop()
    next_poll = loop.time()
    while True:
        try:
            item: StatusSnapshot | _Interrupted | None = await asyncio.wait_for(
                queue.get(), max(0.0, next_poll - loop.time())
            )
        except TimeoutError:
            item = None
        if isinstance(item, _Interrupted):
            return _interrupted(err)
        if item is not None:
            outcome = follower.observe(item)
            if outcome is not Outcome.RUNNING:
                _write(out, block(item))
                return _report_outcome(outcome, item, follower, err)
            continue
        polled = await client.get_status()
        _write(out, block(polled))
        # Signals queued while waiting for the reply are judged first: those sent before it are older.
        while not queue.empty():
            queued = queue.get_nowait()
            if isinstance(queued, _Interrupted):
                return _interrupted(err)
            outcome = follower.observe(queued)
            if outcome is not Outcome.RUNNING:
                _write(out, block(queued))
                return _report_outcome(outcome, queued, follower, err)
        outcome = follower.observe(polled, polled=True)
        if outcome is not Outcome.RUNNING:
            return _report_outcome(outcome, polled, follower, err)
        next_poll = loop.time() + options.poll_interval


def _interrupted(err: TextIO) -> int:
    _write(err, "Interrupted; update-engine carries on with the update.\n")
    return 130


def _report_outcome(outcome: Outcome, last: StatusSnapshot, follower: UpdateFollower, err: TextIO) -> int:
    path = " → ".join([*follower.seen, last.current_operation])
    if outcome is Outcome.NEED_REBOOT:
        _write(err, f"Update installed ({last.new_version}); reboot needed to use it.\n")
        return 0
    if outcome is Outcome.NO_UPDATE:
        _write(err, "No update available\n")
        return 0
    if outcome is Outcome.IGNORED:
        _write(err, "update-engine did not start an update check (it stayed UPDATE_STATUS_IDLE)\n")
        return 1
    if outcome is Outcome.CHECK_FAILED:
        _write(err, f"Update check failed ({path}); see the update-engine log (journalctl -u update-engine)\n")
        return 1
    _write(err, f"Update failed ({path}); see the update-engine log (journalctl -u update-engine)\n")
    return 1


async def _run_watch(client: ManagerClient, options: ClientOptions, out: TextIO, err: TextIO) -> int:
    """The status now, then every signal, until interrupted (0) or update-engine leaves the bus (1)."""
    queue = _queue_with_interrupts()
    await client.subscribe(queue.put_nowait)
    await client.watch_owner(lambda: queue.put_nowait(_GONE))
    current = await client.get_status()
    # A bus delivers in order: signals queued before the reply are older than it, and it says all they say.
    pending = [item for item in _drain(queue) if not isinstance(item, StatusSnapshot)]
    queue.put_nowait(current)
    for waiting in pending:
        queue.put_nowait(waiting)
    while True:
        item = await queue.get()
        if item is _GONE:
            _write(err, f"update-engine left the bus ({BUS_NAME} has no owner any more): it stopped or crashed; "
                        "see journalctl -u update-engine\n")
            return 1
        if isinstance(item, _Interrupted):
            return 0
        if options.json:
            _write(out, format_status_json(item))
        else:
            _write(err, format_watch(item))


async def _run_reset(client: ManagerClient, err: TextIO) -> int:
    """ResetStatus, saying what it undid: an installed update, a rollback, or (when idle) held-back versions."""
    details = await client.get_details()
    before = details.status if details is not None else await client.get_status()
    await client.reset_status()
    if before.current_operation == UpdateStatus.IDLE.value:
        _write(err, "Status is UPDATE_STATUS_IDLE; nothing was armed for the next boot. update-engine forgot any "
                    "version held back after a failed boot and any backoff of a failing payload.\n")
    elif details is not None and details.pending_reboot == "rollback":
        _write(err, "Status reset to UPDATE_STATUS_IDLE. The rollback is cancelled: update-engine made the running "
                    "/usr partition the next boot again; no cgpt command is needed.\n")
    else:
        _write(err, "Status reset to UPDATE_STATUS_IDLE. update-engine also disarmed the boot flags it had set for "
                    "the installed update, so the next boot uses the running /usr partition; no cgpt command is "
                    "needed.\n")
    return 0


async def _run_check(client: ManagerClient, err: TextIO) -> int:
    before = await client.get_status()
    await client.attempt_update()
    op = before.current_operation
    if op == UpdateStatus.IDLE.value:
        _write(err, "Initiated update check.\n")
    elif op == UpdateStatus.UPDATED_NEED_REBOOT.value:
        _write(err, f"An update to {before.new_version} is already installed; reboot needed (no check started).\n")
    else:
        _write(err, f"update-engine is busy ({op}); no new check started.\n")
    return 0


async def run(options: ClientOptions, out: TextIO, err: TextIO) -> int:
    """Run the chosen action against the bus; returns the exit status."""
    action = options.action()
    if action is Action.NONE:
        raise UsageError("no action given")
    for flag in options.ignored_actions():
        _write(err, f"Ignoring -{flag}: only one action runs and -{action.value} takes precedence.\n")
    bus = await _connect(options)
    try:
        client = ManagerClient(bus)
        await _wait_until_running(client, options.wait)
        if action is Action.STATUS:
            details = await client.get_details()
            if details is None:  # an update-engine without GetStatusDetails
                snapshot = await client.get_status()
                _write(out, format_status_json(snapshot) if options.json else format_status(snapshot))
            else:
                _write(out, format_details_json(details) if options.json else format_details(details))
            return 0
        if action is Action.RESET_STATUS:
            return await _run_reset(client, err)
        if action is Action.ROLLBACK:
            next_boot = await client.rollback()
            _write(out, f"Rollback armed; next boot: {next_boot}\n")
            return 0
        if action is Action.CHECK_FOR_UPDATE:
            return await _run_check(client, err)
        if action is Action.UPDATE:
            return await _run_update(client, options, out, err)
        return await _run_watch(client, options, out, err)
    finally:
        bus.disconnect()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``update_engine_client``."""
    try:
        code = _main(sys.argv[1:] if argv is None else list(argv))
        sys.stdout.flush()
    except BrokenPipeError:
        discard_stdout()
        return EXIT_BROKEN_PIPE
    return code


def _main(args: list[str]) -> int:
    try:
        options = parse_args(args)
    except UsageError as exc:
        sys.stderr.write(f"{PROG}: {exc}\n{USAGE}")
        return 2
    if options.help:
        sys.stdout.write(USAGE)
        return 0
    if options.version:
        sys.stdout.write(f"{PROG} {__version__}\n")
        return 0
    if options.action() is Action.NONE:
        sys.stderr.write(f"{PROG}: no action given\n{USAGE}")
        return 2
    try:
        return asyncio.run(run(options, sys.stdout, sys.stderr))
    except ClientError as exc:
        sys.stderr.write(f"{escape_control(str(exc))}\n")
        return 1
    except KeyboardInterrupt:
        return 130

if __name__ == "__main__":
    sys.exit(main())
