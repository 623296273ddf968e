"""The demo's printed story: one time-stamped line per thing that happens to the fleet.

:class:`Console` prints (time since the start, a node-aligned label, the text; colour only on a terminal and not
with ``NO_COLOR``); :class:`Story` is the fleet's observer and turns each :mod:`sim.fleet.events` value into its
line. The update server's view of a node is told as ``server: <status>`` lines, with the event that moved it; an
event that set no status is told as such (``Omaha event …``), once while it repeats; a check that found what the
node's check before found (no update for the same version) is not told again.

Rules: the story reads the fleet's records but never changes them; the only state it keeps is its own (how far each
node's download progress has been shown, the last event and check outcome told per node, a check line held until
its outcome is known).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Mapping
from typing import TextIO

from coreos_common.status import UpdateStatus
from sim.disks import usr_flags
from sim.fleet.events import (
    BootCompleted,
    Booted,
    DaemonDied,
    FleetEvent,
    KernelPanic,
    LockReleased,
    LockTaken,
    MarkedGood,
    NoReleaseFile,
    NothingBootable,
    OmahaEventSeen,
    PowerCut,
    RebootIgnored,
    RebootRequested,
    ServerStatusChanged,
    StatusChanged,
    TooManyDown,
    TooManyHolders,
    WatchdogReset,
)
from sim.fleet.fleet import Fleet
from sim.fleet.omaha import OmahaEventRecord
from sim.standins.bootloader import RELEASE_KEY
from update_engine import gpt
from update_engine.errors import describe as describe_code
from update_engine.omaha import EventResult, EventType

GOOD, BAD, NOTE, DIM = "32", "31;1", "1", "2"  # SGR colour codes
MIB = 1 << 20
PROGRESS_STEP = 20  # percent between two progress lines (update-engine delivers about 1 MiB at a time)


class Console:
    """Time-stamped, node-aligned lines; colour only on a terminal (and not with NO_COLOR set).

    When the reader of the stream goes away (``demo/run | head``), the stream is pointed at /dev/null, nothing more
    is printed, and ``on_reader_gone`` is called once (the demo stops).
    """

    _NODE_COLOURS = ("36", "35", "33", "34", "32", "96", "95", "93", "94")

    def __init__(self, stream: TextIO, start: float) -> None:
        self.stream = stream
        self.start = start
        self.colour = stream.isatty() and not os.environ.get("NO_COLOR")
        self.reader_gone = False
        self.on_reader_gone: Callable[[], object] | None = None

    def write(self, text: str) -> None:
        if self.reader_gone:
            return
        try:
            print(text, file=self.stream, flush=True)
        except BrokenPipeError:
            self.reader_gone = True
            # The interpreter flushes the stream again at exit: let that go to /dev/null, not to a closed pipe.
            with contextlib.suppress(OSError, ValueError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, self.stream.fileno())
                os.close(devnull)
            if self.on_reader_gone is not None:
                self.on_reader_gone()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def paint(self, text: str, code: str | None) -> str:
        return f"\033[{code}m{text}\033[0m" if self.colour and code else text

    def label_colour(self, label: str) -> str:
        if label.startswith("node-") and label[5:].isdigit():
            return self._NODE_COLOURS[(int(label[5:]) - 1) % len(self._NODE_COLOURS)]
        return NOTE

    def line(self, label: str, text: str, style: str | None = None) -> None:
        head = self.paint(f"{label:<7}", self.label_colour(label))
        self.write(f"{self.elapsed():6.1f}s  {head} {self.paint(text, style)}")

    def plain(self, text: str = "", style: str | None = None) -> None:
        self.write(self.paint(text, style))


def flags_text(flags: gpt.PartitionFlags) -> str:
    return f"priority={flags.priority} tries={flags.tries} successful={int(flags.successful)}"


def other_slot(label: str) -> str:
    return "USR-B" if label == "USR-A" else "USR-A"


_EVENT_MEANINGS: Mapping[tuple[int, int], str] = {
    (EventType.UPDATE_DOWNLOAD_STARTED, EventResult.SUCCESS): "download started",
    (EventType.UPDATE_DOWNLOAD_FINISHED, EventResult.SUCCESS): "download finished",
    (EventType.UPDATE_COMPLETE, EventResult.SUCCESS): "update installed",
    (EventType.UPDATE_COMPLETE, EventResult.SUCCESS_REBOOT): "up after boot",
    (EventType.UPDATE_COMPLETE, EventResult.ERROR): "update failed",
    (EventType.UPDATE_COMPLETE, EventResult.UPDATE_DEFERRED): "update deferred",
}


# What a check that finds nothing to do goes through, from CHECKING_FOR_UPDATE back to IDLE.
_CHECK_CYCLE = frozenset({UpdateStatus.REPORTING_ERROR_EVENT.value, UpdateStatus.IDLE.value})
_SERVER_STATUS_STYLES: Mapping[str, str | None] = {
    "UpdateGranted": NOTE, "OnHold": None, "Complete": GOOD, "RolledBack": BAD, "Error": BAD,
}


def describe_event(event: OmahaEventRecord) -> str:
    """``3/0 update failed, errorcode 44 ROLLBACK_ERROR`` and the like."""
    key = (event.event_type, event.event_result)
    meaning = _EVENT_MEANINGS.get(key)
    if meaning is None:
        try:
            meaning = f"{EventType(key[0]).name.lower()} {EventResult(key[1]).name.lower()}"
        except ValueError:
            meaning = "unknown event"
    text = f"{key[0]}/{key[1]} {meaning}"
    if key == (EventType.UPDATE_COMPLETE, EventResult.SUCCESS_REBOOT):
        previous = event.previous_version or "0.0.0.0"
        text += " (no update before)" if previous == "0.0.0.0" else f" (previous version {previous})"
    if event.error_code is not None:
        text += f", errorcode {event.base_code} {describe_code(event.error_code)}"
    return text


class Story:
    """The fleet's observer: prints each event as the line a person follows the run by."""

    def __init__(self, out: Console, rollout: str = "") -> None:
        self.out = out
        self.rollout = rollout  # the update server's rate limit in words, for the lines of nodes it holds back
        self.fleet: Fleet | None = None
        self.progress_shown: dict[str, int] = {}
        self.last_event: dict[str, tuple[str, int, int, int | None]] = {}
        # node → the lines of a check under way (status, text, style), told once its outcome is known
        self.pending_check: dict[str, list[tuple[str, str, str | None]]] = {}
        self.last_cycle: dict[str, tuple[str, tuple[str, ...]]] = {}  # node → (version, statuses) of its last check
        self.quiet = False  # set once the summary starts: the nodes keep running, the story is over

    def say(self, who: str, text: str, style: str | None = None) -> None:
        self.out.line(who, text, style)

    def __call__(self, event: FleetEvent) -> None:
        if self.quiet:
            return
        match event:
            case Booted(node, choice):
                self.say(node, choice.describe(), NOTE)
            case NothingBootable(node):
                self.say(node, "bootloader: no bootable USR partition", BAD)
            case KernelPanic(node, choice):
                self.say(node, f"kernel panic: {choice.label} does not come up, no daemon starts", BAD)
            case WatchdogReset(node):
                self.say(node, "reset by the watchdog: back to the bootloader")
            case NoReleaseFile(node, choice):
                self.say(node, f"{choice.label} holds no {RELEASE_KEY}: it cannot boot", BAD)
            case BootCompleted(node, after_reboot):
                self.say(node, "boot-complete.target reached" + (": the node is back" if after_reboot else ""))
            case MarkedGood(node, label, flags, after_reboot):
                if after_reboot:
                    self.say(node, f"marked good: {label} {flags_text(flags)}", GOOD)
            case DaemonDied(node, daemon, code, log_tail):
                self.say(node, f"{daemon} exited by itself with status {code}; the end of its log:", BAD)
                for line in log_tail:
                    self.out.plain(f"          {line}", DIM)
            case RebootIgnored(node, member):
                self.say(node, f"{member} requested again while the node is going down: ignored", BAD)
            case TooManyDown(node, down):
                self.say(node, f"INVARIANT BROKEN: {', '.join(down)} is down too", BAD)
            case RebootRequested(node, member):
                self.say(node, f"reboot requested (logind {member})", NOTE)
            case PowerCut(node):
                self.say(node, "power cut: update_engine and locksmithd killed", DIM)
            case StatusChanged():
                self.status(event)
            case LockTaken(node, holders, maximum):
                self.say(node, f"lock taken (holders: {', '.join(holders) or 'none'}, {len(holders)}/{maximum})",
                         NOTE)  # fmt: skip
            case LockReleased(node, holders, maximum):
                self.say(node, f"lock released (holders: {', '.join(holders) or 'none'}, {len(holders)}/{maximum})",
                         GOOD)  # fmt: skip
            case TooManyHolders(_, count, maximum):
                self.say("fleet", f"INVARIANT BROKEN: {count} holders, max {maximum}", BAD)
            case OmahaEventSeen(node, record):
                self.omaha_event(node, record)
            case ServerStatusChanged():
                self.server_status(event)

    def omaha_event(self, node: str, record: OmahaEventRecord) -> None:
        """An event that set no status on the server (the status line tells those), once while it repeats."""
        key = (record.app_version, record.event_type, record.event_result, record.error_code)
        if record.status is not None or self.last_event.get(node) == key:
            return
        self.last_event[node] = key
        style = BAD if record.error_code is not None else DIM
        self.say(node, f"Omaha event {describe_event(record)}", style)

    def server_status(self, event: ServerStatusChanged) -> None:
        """``server: UpdateGranted 2.0.0`` and the like: the update server's decisions and records as they come."""
        step, instance = event.step, event.instance
        status = step.status
        style = _SERVER_STATUS_STYLES.get(status, DIM)
        if step.cause is not None:
            text = f"{status}, after {describe_event(step.cause)}"
        elif status == "Undefined" and step.previous is None:
            text = f"checked in running {instance.version} (Undefined), nothing to grant"
        elif status == "UpdateGranted":
            text = f"{status} {instance.granted_version}"
        elif status == "OnHold":
            text = f"{status}, held back by the rollout's limit: {self.rollout}"
        else:
            text = f"{status}, running {instance.version}"
        self.say(event.node, f"server: {text}", style)

    def status(self, event: StatusChanged) -> None:
        """update-engine's status: each change once, the download every PROGRESS_STEP percent."""
        assert self.fleet is not None
        name, snap, previous = event.node, event.snapshot, event.previous
        node = next(n for n in self.fleet.nodes if n.name == name)
        op = snap.current_operation
        short = op.removeprefix("UPDATE_STATUS_")
        if op == UpdateStatus.DOWNLOADING.value:
            percent = int(snap.progress * 100)
            if previous != op:
                self.progress_shown[name] = -PROGRESS_STEP
            shown = self.progress_shown.get(name, -PROGRESS_STEP)
            # One line per PROGRESS_STEP at most; 95-99 % is skipped so that the last line says 100 %.
            due = percent >= shown + PROGRESS_STEP and not 95 <= percent < 100
            if due or (percent == 100 and shown < 100):
                self.progress_shown[name] = percent
                done, total = snap.progress * snap.new_size / MIB, snap.new_size / MIB
                self.say(name, f"{short} {percent:3d}% ({done:.1f} of {total:.1f} MiB)")
            return
        if op == previous:
            return
        cycle = self.pending_check.get(name)
        if cycle is not None and op in _CHECK_CYCLE and previous is not None:
            # A check that ends as the one before it did (no update for the same version, or the same refusal)
            # is not news: it is told once.
            cycle.append((op, short, BAD if op == UpdateStatus.REPORTING_ERROR_EVENT.value else None))
            if op != UpdateStatus.IDLE.value:
                return
            del self.pending_check[name]
            signature = (node.history.version, tuple(step for step, _, _ in cycle))
            if self.last_cycle.get(name) == signature:
                return
            self.last_cycle[name] = signature
            if previous == UpdateStatus.CHECKING_FOR_UPDATE.value:
                cycle[-1] = (op, f"{short}: no update for {node.history.version}", None)
            for _, text, style in cycle:
                self.say(name, text, style)
            return
        if cycle is not None:  # the check led somewhere: tell it, and what follows
            del self.pending_check[name]
            self.last_cycle.pop(name, None)
            for _, text, style in cycle:
                self.say(name, text, style)
        if op == UpdateStatus.CHECKING_FOR_UPDATE.value and previous is not None:
            self.pending_check[name] = [(op, f"{short} (running {node.history.version})", None)]
            return
        if previous is None:
            self.say(name, f"update_engine up: {short}", DIM)
        elif op == UpdateStatus.UPDATE_AVAILABLE.value:
            self.say(name, f"{short}: {snap.new_version}, {snap.new_size / MIB:.1f} MiB")
        elif op == UpdateStatus.VERIFYING.value:
            self.say(name, f"{short} (size, SHA-256, signature, partition hash)")
        elif op == UpdateStatus.UPDATED_NEED_REBOOT.value:
            self.say(name, f"{short} {snap.new_version}", GOOD)
            boot = node.history.current_boot
            target = other_slot(boot.choice.label if boot else "USR-A")
            try:
                self.say(name, f"flags armed: {target} {flags_text(usr_flags(node.disk)[target])}")
            except gpt.GptError as exc:
                self.say(name, f"cannot read the flags: {exc}", BAD)
        else:
            self.say(name, short, BAD if op == UpdateStatus.REPORTING_ERROR_EVENT.value else None)
