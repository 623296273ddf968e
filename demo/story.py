"""The demo's printed story: one time-stamped line per thing that happens to the fleet.

:class:`Console` prints (time since the start, a node-aligned label, the text; colour only on a terminal and not
with ``NO_COLOR``); :class:`Story` is the fleet's observer and turns each :mod:`sim.fleet.events` value into its
line. Rules: the story reads the fleet's records but never changes them; the only state it keeps is its own (how
far each node's download progress has been shown).
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

    def __init__(self, out: Console) -> None:
        self.out = out
        self.fleet: Fleet | None = None
        self.progress_shown: dict[str, int] = {}

    def say(self, who: str, text: str, style: str | None = None) -> None:
        self.out.line(who, text, style)

    def __call__(self, event: FleetEvent) -> None:
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
                style = BAD if record.error_code is not None else DIM
                self.say(node, f"Omaha event {describe_event(record)}", style)

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
        if previous is None:
            self.say(name, f"update_engine up: {short}", DIM)
        elif op == UpdateStatus.CHECKING_FOR_UPDATE.value:
            self.say(name, f"{short} (running {node.history.version})")
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
        elif op == UpdateStatus.IDLE.value and previous == UpdateStatus.CHECKING_FOR_UPDATE.value:
            self.say(name, f"{short}: no update for {node.history.version}")
        else:
            self.say(name, short, BAD if op == UpdateStatus.REPORTING_ERROR_EVENT.value else None)
