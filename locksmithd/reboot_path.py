"""locksmithd's reboot path, from start-up to the reboot, as a state machine without I/O.

Rules of this file (after h11's ``_state.py`` and Zincati's ``update_agent``):

1. Everything that decides what locksmithd does next lives here. The machine is in one phase at a time (the
   dataclasses below, each carrying what an operator asks about it: since when, until when, where in line, why);
   it says what it needs done next as an Action and learns what came of it from the Event passed to ``handle``.
2. No I/O and no clock of its own: the daemon (``locksmithd.daemon``) performs the actions, passes the time in,
   and publishes every new phase (``systemctl status``'s STATUS= line, ``coordinator.conf``, the state file
   ``locksmithctl status --json`` reads, metrics). Reboot windows are evaluated here, from the time given.
3. One action is outstanding at a time. Actions marked ``interruptible`` (waiting for an update, everything done
   after a boot) end early when update-engine says a reboot is needed: the daemon cancels them and passes
   ``NeedReboot``. The wait for the lock is never cancelled: a request cut off in flight may still be granted.
4. Retries follow the one backoff policy (``coreos_common.backoff``): the n-th failure in a row waits
   ``backoff.delay(n)``. The strategy retries its own lock service's failures inside ``TakeLock``/``ReleaseLock``.

Theory of operation::

    start ─ no reboot needed ─► AfterBoot: steady? → post-reboot.d → give the lock back ─► Idle
      │                          (a hook fails: the lock is kept and the hooks retried)      │
      │ reboot needed          ◄──────── update-engine: reboot needed (interrupts these) ────┘
      ▼
    WaitingForWindow ─► WaitingForLock ─► window still open? ─ no ─► GivingBack (release) ─► WaitingForWindow
                                              │ yes
                                              ▼
                            WarningUsers (grace) ─► PreRebootHooks ─ pass ─► Rebooting (logind accepted)
                                                        │ fail                  ▲         │ refused
                           keep-lock: Postponed ◄───────┤                       │         ▼
                           release-lock: GivingBack ────┘             LogindRefusing (retry with backoff)
                             (post-reboot.d, release) ─► Postponed              │ reboot_attempts refusals
                                                          │                     ▼
                                        WaitingForWindow ◄┘   GivingBack ─► LogindUnavailable (probe with backoff)
                                                                                │ logind can reboot
                                                                                ▼
                                                                          WaitingForWindow …

The lock is given back only after post-reboot.d passed, once pre-reboot.d ran: a node that drained stays counted
against the fleet's ``max`` until it is healthy again (after its boot, or after a failed attempt). A node that
gives up on logind does not hold a slot while it waits for logind: it takes one again when logind can reboot.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from coreos_common.backoff import BackoffPolicy
from coreos_common.window import WindowList
from locksmithd.backends import LockPhase, LockProgress
from locksmithd.clock import seconds_between, show_delay, show_time, utc
from locksmithd.coordinator import CoordinatorState

# ---------------------------------------------------------------------------------------------------------------
# Phases


class PhaseName(enum.Enum):
    """The phases' names, as the state file, metrics and logs show them."""

    STARTING = "starting"
    AFTER_BOOT = "releasing-after-boot"
    IDLE = "waiting-for-update"
    WAITING_FOR_WINDOW = "waiting-for-window"
    WAITING_FOR_LOCK = "waiting-for-lock"
    GIVING_BACK = "giving-back-lock"
    WARNING_USERS = "warning-users"
    PRE_REBOOT_HOOKS = "running-pre-reboot-hooks"
    POSTPONED = "postponed"
    REBOOTING = "rebooting"
    LOGIND_REFUSING = "waiting-for-logind"
    LOGIND_UNAVAILABLE = "waiting-for-logind-without-lock"


def _ordinal(number: int) -> str:
    suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"


@dataclass(frozen=True)
class Starting:
    """Asking update-engine for its status; nothing is decided yet."""

    since: datetime
    name = PhaseName.STARTING
    coordinator = CoordinatorState.STARTING

    def describe(self) -> str:
        return "Starting: asking update-engine for its status"

    def fields(self) -> dict[str, object]:
        return {}


class AfterBootStep(enum.Enum):
    WAITING_FOR_STEADY = "waiting-for-steady"
    POST_REBOOT_HOOKS = "running-post-reboot-hooks"
    RELEASING = "releasing"


@dataclass(frozen=True)
class AfterBoot:
    """Entered at start-up when no reboot is needed: the node is back (from its reboot, or locksmithd restarted).

    Waits until the node is steady (update-engine idle, ``boot-complete.target`` reached), runs post-reboot.d,
    then gives back a slot the node may still hold. ``failures`` counts post-reboot.d failures in a row;
    ``retry_at`` is when the hooks run again after one.
    """

    since: datetime
    step: AfterBootStep = AfterBootStep.WAITING_FOR_STEADY
    failures: int = 0
    retry_at: datetime | None = None
    last_failure: str = ""
    name = PhaseName.AFTER_BOOT
    coordinator = CoordinatorState.RUNNING

    def describe(self) -> str:
        if self.retry_at is not None:
            return (f"Back after a reboot: post-reboot hooks failed {self.failures} time(s) ({self.last_failure}); "
                    f"the lock is kept, hooks run again at {show_time(self.retry_at)}")
        return {
            AfterBootStep.WAITING_FOR_STEADY: "Back after a reboot: waiting for the node to be steady",
            AfterBootStep.POST_REBOOT_HOOKS: "Back after a reboot: running post-reboot hooks before releasing the lock",
            AfterBootStep.RELEASING: "Back after a reboot: releasing the reboot lock",
        }[self.step]

    def fields(self) -> dict[str, object]:
        return {"step": self.step.value, "failures": self.failures, "retry_at": self.retry_at,
                "last_failure": self.last_failure or None}


@dataclass(frozen=True)
class Idle:
    """Waiting for update-engine to install an update (``UPDATE_STATUS_UPDATED_NEED_REBOOT``)."""

    since: datetime
    name = PhaseName.IDLE
    coordinator = CoordinatorState.RUNNING

    def describe(self) -> str:
        return "Waiting for an update to be installed"

    def fields(self) -> dict[str, object]:
        return {}


@dataclass(frozen=True)
class WaitingForWindow:
    """A reboot is needed and no reboot window is open: sleeping until ``opens`` (the window closes at ``closes``)."""

    since: datetime
    opens: datetime
    closes: datetime
    name = PhaseName.WAITING_FOR_WINDOW
    coordinator = CoordinatorState.REBOOT_PLANNED

    def describe(self) -> str:
        return f"Reboot planned: waiting for the reboot window, which opens at {show_time(self.opens)}"

    def fields(self) -> dict[str, object]:
        return {"until": self.opens, "window_closes": self.closes}


@dataclass(frozen=True)
class WaitingForLock:
    """Asking the strategy for permission (the lock), since ``since``; ``progress`` is where the request stands.

    ``window_closes`` is the end of the window this attempt started in (None without windows): permission that
    comes after it is given back.
    """

    since: datetime
    window_closes: datetime | None
    progress: LockProgress | None = None
    name = PhaseName.WAITING_FOR_LOCK
    coordinator = CoordinatorState.REBOOT_PLANNED

    def describe(self) -> str:
        text = f"Reboot planned: waiting for the reboot lock since {show_time(self.since)}"
        progress = self.progress
        if progress is None or progress.phase is not LockPhase.WAITING:
            return text
        if progress.position is not None:
            text += f", {'at least ' if progress.position_is_lower_bound else ''}{_ordinal(progress.position)} in line"
        if progress.waiting is not None:
            text += f" ({progress.waiting} waiting)"
        if progress.holders:
            text += f"; held by {', '.join(progress.holders)}"
        return text

    def fields(self) -> dict[str, object]:
        progress = self.progress or LockProgress(LockPhase.ASKING)
        return {
            "lock": progress.phase.value,
            "position": progress.position,
            "position_is_lower_bound": progress.position_is_lower_bound,
            "waiting": progress.waiting,
            "holders": list(progress.holders),
            "slots": progress.slots,
            "window_closes": self.window_closes,
        }


class GiveBackReason(enum.Enum):
    """Why a node gives back its lock before rebooting, and what it does next."""

    WINDOW_CLOSED = "the reboot window closed"
    PRE_REBOOT_HOOKS_FAILED = "a pre-reboot hook failed"
    LOGIND_REFUSED = "logind kept refusing to reboot"


@dataclass(frozen=True)
class GivingBack:
    """Giving back the lock without rebooting (``reason``). Once pre-reboot.d ran (``run_hooks``), post-reboot.d runs
    first and must pass: until it does, the lock is kept and the hooks retried (``failures``, ``retry_at``)."""

    since: datetime
    reason: GiveBackReason
    detail: str
    run_hooks: bool
    releasing: bool = False
    failures: int = 0
    retry_at: datetime | None = None
    name = PhaseName.GIVING_BACK
    coordinator = CoordinatorState.REBOOT_PLANNED

    def describe(self) -> str:
        text = f"Reboot put off ({self.reason.value}: {self.detail})"
        if self.retry_at is not None:
            return text + (f"; post-reboot hooks failed {self.failures} time(s), the lock is kept, hooks run again "
                           f"at {show_time(self.retry_at)}")
        return text + ("; releasing the lock" if self.releasing or not self.run_hooks
                       else "; running post-reboot hooks before releasing the lock")

    def fields(self) -> dict[str, object]:
        return {"reason": self.reason.name.lower().replace("_", "-"), "detail": self.detail,
                "failures": self.failures, "retry_at": self.retry_at}


@dataclass(frozen=True)
class WarningUsers:
    """Logged-in users were told the node reboots; waiting ``until`` so they can save their work (lock held)."""

    since: datetime
    until: datetime
    ttys: tuple[str, ...]
    name = PhaseName.WARNING_USERS
    coordinator = CoordinatorState.REBOOT_PLANNED

    def describe(self) -> str:
        return f"Rebooting at {show_time(self.until)}: users are logged in on {', '.join(self.ttys)}"

    def fields(self) -> dict[str, object]:
        return {"until": self.until, "ttys": list(self.ttys)}


@dataclass(frozen=True)
class PreRebootHooks:
    """The lock is held and the window open: running pre-reboot.d (drain the node) before asking logind."""

    since: datetime
    name = PhaseName.PRE_REBOOT_HOOKS
    coordinator = CoordinatorState.REBOOT_PLANNED

    def describe(self) -> str:
        return "Reboot planned: running pre-reboot hooks"

    def fields(self) -> dict[str, object]:
        return {}


@dataclass(frozen=True)
class Postponed:
    """A reboot attempt failed (``reason``): sleeping ``until`` before starting again from the window.
    ``lock_held`` says whether the node kept its slot meanwhile."""

    since: datetime
    until: datetime
    reason: str
    lock_held: bool
    name = PhaseName.POSTPONED
    coordinator = CoordinatorState.REBOOT_PLANNED

    def describe(self) -> str:
        held = "the lock is kept" if self.lock_held else "the lock was released"
        return f"Reboot postponed until {show_time(self.until)} ({self.reason}); {held}"

    def fields(self) -> dict[str, object]:
        return {"until": self.until, "reason": self.reason, "lock_held": self.lock_held}


@dataclass(frozen=True)
class Rebooting:
    """Asking logind to reboot; once it accepted (``accepted_at``), the node goes down any moment, and logind is
    asked again at ``ask_again_at`` if it is still up."""

    since: datetime
    accepted_at: datetime | None = None
    ask_again_at: datetime | None = None
    name = PhaseName.REBOOTING

    @property
    def coordinator(self) -> CoordinatorState:
        return CoordinatorState.REBOOTING if self.accepted_at is not None else CoordinatorState.REBOOT_PLANNED

    def describe(self) -> str:
        if self.accepted_at is None:
            return "Rebooting: asking logind"
        return f"Rebooting (logind accepted at {show_time(self.accepted_at)})"

    def fields(self) -> dict[str, object]:
        return {"accepted_at": self.accepted_at, "until": self.ask_again_at}


@dataclass(frozen=True)
class LogindRefusing:
    """logind refused ``Reboot`` (or is absent) ``refusals`` times in a row; asking again at ``retry_at`` with the
    lock held, until ``RebootPath.reboot_attempts`` refusals, when the lock is given back."""

    since: datetime
    refusals: int
    last_error: str
    retry_at: datetime
    name = PhaseName.LOGIND_REFUSING
    coordinator = CoordinatorState.REBOOT_PLANNED

    def describe(self) -> str:
        return (f"Reboot planned: logind refused {self.refusals} time(s) ({self.last_error}); asking again at "
                f"{show_time(self.retry_at)}")

    def fields(self) -> dict[str, object]:
        return {"refusals": self.refusals, "last_error": self.last_error, "retry_at": self.retry_at}


@dataclass(frozen=True)
class LogindUnavailable:
    """The node gave its lock back because logind would not reboot: asking logind whether it can reboot now,
    ``probes`` times so far, next at ``retry_at``; once it can, the path starts again from the window."""

    since: datetime
    probes: int
    last_error: str
    retry_at: datetime
    name = PhaseName.LOGIND_UNAVAILABLE
    coordinator = CoordinatorState.REBOOT_PLANNED

    def describe(self) -> str:
        return (f"Reboot put off: logind cannot reboot ({self.last_error}); the lock was released; asking logind "
                f"again at {show_time(self.retry_at)}")

    def fields(self) -> dict[str, object]:
        return {"probes": self.probes, "last_error": self.last_error, "retry_at": self.retry_at}


Phase = (
    Starting | AfterBoot | Idle | WaitingForWindow | WaitingForLock | GivingBack | WarningUsers | PreRebootHooks
    | Postponed | Rebooting | LogindRefusing | LogindUnavailable
)


def phase_document(phase: Phase) -> dict[str, object]:
    """The phase as JSON values: its name, since, the status line, and its own fields (times as ISO 8601)."""
    doc: dict[str, object] = {
        "phase": phase.name.value,
        "since": phase.since,
        "state": phase.coordinator.value,
        "status": phase.describe(),
    }
    doc.update(phase.fields())
    return {key: value.isoformat() if isinstance(value, datetime) else value for key, value in doc.items()}


# ---------------------------------------------------------------------------------------------------------------
# Actions (what the daemon does next) and events (what came of it)


class HookKind(enum.Enum):
    PRE_REBOOT = "pre-reboot"
    POST_REBOOT = "post-reboot"


@dataclass(frozen=True)
class Action:
    interruptible: bool = field(default=False, kw_only=True)


@dataclass(frozen=True)
class AwaitNeedReboot(Action):
    """Wait until update-engine says a reboot is needed."""


@dataclass(frozen=True)
class WaitUntilSteady(Action):
    """Wait until update-engine is idle and the boot is complete."""


@dataclass(frozen=True)
class RunHooks(Action):
    """Run the hook directory of ``kind``; ``reason`` goes to the hooks' environment."""

    kind: HookKind
    reason: str


@dataclass(frozen=True)
class ReleaseLock(Action):
    """Give the lock back: ``after_boot`` through the strategy's ``report_steady``, else its ``abandon``."""

    after_boot: bool


@dataclass(frozen=True)
class SleepUntil(Action):
    when: datetime


@dataclass(frozen=True)
class TakeLock(Action):
    """Ask the strategy for permission to reboot into ``version`` (waits for the lock)."""

    version: str


@dataclass(frozen=True)
class WarnUsers(Action):
    """Tell logged-in users the node reboots in ``grace``; answers which terminals were reached."""

    grace: timedelta


@dataclass(frozen=True)
class AskLogind(Action):
    """One ``Reboot(false)`` call."""


@dataclass(frozen=True)
class ProbeLogind(Action):
    """Ask logind whether it can reboot now, without rebooting."""


@dataclass(frozen=True)
class Event:
    pass


@dataclass(frozen=True)
class Started(Event):
    need_reboot: bool
    version: str = ""


@dataclass(frozen=True)
class NeedReboot(Event):
    version: str


@dataclass(frozen=True)
class Steady(Event):
    pass


@dataclass(frozen=True)
class HooksDone(Event):
    passed: bool
    description: str = ""


@dataclass(frozen=True)
class LockReleased(Event):
    pass


@dataclass(frozen=True)
class TimeReached(Event):
    pass


@dataclass(frozen=True)
class LockTaken(Event):
    pass


@dataclass(frozen=True)
class UsersWarned(Event):
    ttys: tuple[str, ...]


@dataclass(frozen=True)
class RebootAccepted(Event):
    pass


@dataclass(frozen=True)
class RebootRefused(Event):
    error: str


@dataclass(frozen=True)
class LogindProbed(Event):
    """``problem`` is None when logind can reboot now, else why not."""

    problem: str | None


# ---------------------------------------------------------------------------------------------------------------
# The machine


class PreRebootFailure(enum.Enum):
    """What a failed pre-reboot hook does to the lock (``--pre-reboot-failure``)."""

    RELEASE_LOCK = "release-lock"
    KEEP_LOCK = "keep-lock"


class UnexpectedEvent(Exception):
    """An event the current phase does not expect: a bug in the daemon's shell."""


@dataclass(frozen=True)
class PathSettings:
    """What the machine needs from the settings."""

    windows: WindowList | None = None
    windows_description: str = "No configured reboot window"
    backoff: BackoffPolicy = field(default_factory=BackoffPolicy)
    session_grace: timedelta = timedelta(minutes=5)
    reboot_retry_interval: timedelta = timedelta(hours=1)
    reboot_attempts: int = 5
    pre_reboot_failure: PreRebootFailure = PreRebootFailure.RELEASE_LOCK


class RebootPath:
    """The machine. ``phase`` is where the node stands; ``version`` the version a reboot would boot into;
    ``failed_attempts`` counts reboot attempts in a row that ended without a reboot (for their backoff)."""

    def __init__(self, settings: PathSettings, now: datetime) -> None:
        self.settings = settings
        self.phase: Phase = Starting(now)
        self.version = ""
        self.failed_attempts = 0
        self.history: list[Phase] = []
        self.notes: list[tuple[int, str]] = []

    # -- helpers ------------------------------------------------------------------------------------------------

    def _note(self, level: int, text: str) -> None:
        """A decision for the journal, with the values that led to it (the daemon logs and clears the notes)."""
        self.notes.append((level, text))

    def take_notes(self) -> list[tuple[int, str]]:
        notes, self.notes = self.notes, []
        return notes

    def _enter(self, phase: Phase) -> None:
        self.history.append(self.phase)
        del self.history[:-20]
        self.phase = phase

    def _delay(self, failures: int) -> timedelta:
        """The wait after the ``failures``-th failure in a row (1 for the first)."""
        return timedelta(seconds=self.settings.backoff.delay(max(0, failures - 1)))

    def _plan(self, now: datetime) -> Action:
        """Start (or start again) from the window: sleep until it opens, or ask for the lock at once."""
        windows = self.settings.windows
        if windows is None:
            self._note(logging.INFO, "No configured reboot window")
            self._enter(WaitingForLock(now, None))
            return TakeLock(self.version)
        current = windows.current(now)
        if current is not None:
            self._enter(WaitingForLock(now, current[1]))
            return TakeLock(self.version)
        opening = windows.next_opening(now)
        assert opening is not None  # a window list from the settings is never empty
        self._note(logging.INFO, self.settings.windows_description)
        self._note(logging.INFO, f"Next window begins at {show_time(opening[0])} and ends at {show_time(opening[1])}")
        self._note(logging.INFO, f"Waiting for {show_delay(round(seconds_between(now, opening[0])))} to reboot.")
        self._enter(WaitingForWindow(now, opening[0], opening[1]))
        return SleepUntil(opening[0])

    def _window_open(self, now: datetime) -> bool:
        return self.settings.windows is None or self.settings.windows.contains(now)

    def _after_lock(self, phase: WaitingForLock, now: datetime) -> Action:
        """The lock is held: the window must still be open, then users are warned and the hooks run."""
        if phase.window_closes is not None and utc(now) > utc(phase.window_closes):
            detail = f"it closed at {show_time(phase.window_closes)}, the lock came at {show_time(now)}"
            self._note(logging.INFO, f"The reboot window ended at {show_time(phase.window_closes)} while this node "
                       f"waited for permission to reboot (now {show_time(now)}): giving the lock back and waiting "
                       "for the next window")
            self._enter(GivingBack(now, GiveBackReason.WINDOW_CLOSED, detail, run_hooks=False, releasing=True))
            return ReleaseLock(after_boot=False)
        grace = self.settings.session_grace
        if grace > timedelta(0):
            self._enter(WarningUsers(now, now + grace, ()))
            return WarnUsers(grace)
        return self._pre_reboot_hooks(now)

    def _pre_reboot_hooks(self, now: datetime) -> Action:
        self._enter(PreRebootHooks(now))
        return RunHooks(HookKind.PRE_REBOOT, "reboot")

    def _give_back(self, reason: GiveBackReason, detail: str, now: datetime) -> Action:
        """After pre-reboot.d ran: post-reboot.d first, the lock only once it passed."""
        self._note(logging.ERROR, f"Not rebooting now: {reason.value} ({detail}); running the post-reboot hooks, "
                   "then giving the lock back")
        self._enter(GivingBack(now, reason, detail, run_hooks=True))
        return RunHooks(HookKind.POST_REBOOT, "postponed")

    def _after_give_back(self, phase: GivingBack, now: datetime) -> Action:
        if phase.reason is GiveBackReason.WINDOW_CLOSED:
            return self._plan(now)
        self.failed_attempts += 1
        until = now + self._delay(self.failed_attempts)
        if phase.reason is GiveBackReason.LOGIND_REFUSED:
            self._note(logging.WARNING, f"Gave the lock back: {phase.reason.value}. Asking logind whether it can "
                       f"reboot at {show_time(until)}, then taking the lock again")
            self._enter(LogindUnavailable(now, 0, phase.detail, until))
        else:
            self._note(logging.WARNING, f"Gave the lock back: {phase.reason.value}. Trying again at {show_time(until)}")
            self._enter(Postponed(now, until, f"{phase.reason.value}: {phase.detail}", lock_held=False))
        return SleepUntil(until)

    # -- the transitions ----------------------------------------------------------------------------------------

    def handle(self, event: Event, now: datetime) -> Action:
        """The next action, after ``event`` in the current phase."""
        phase = self.phase
        match phase, event:
            case Starting(), Started(need_reboot=True, version=version):
                self.version = version
                return self._plan(now)
            case Starting(), Started():
                self._enter(AfterBoot(now))
                return WaitUntilSteady(interruptible=True)
            case AfterBoot() | Idle(), NeedReboot(version=version):
                self.version = version
                return self._plan(now)
            case AfterBoot(step=AfterBootStep.WAITING_FOR_STEADY), Steady():
                self._enter(replace(phase, since=now, step=AfterBootStep.POST_REBOOT_HOOKS))
                return RunHooks(HookKind.POST_REBOOT, "boot", interruptible=True)
            case AfterBoot(step=AfterBootStep.POST_REBOOT_HOOKS, retry_at=None), HooksDone(passed=True):
                self._enter(replace(phase, step=AfterBootStep.RELEASING))
                return ReleaseLock(after_boot=True, interruptible=True)
            case AfterBoot(step=AfterBootStep.POST_REBOOT_HOOKS, retry_at=None), HooksDone(description=why):
                failures = phase.failures + 1
                self._note(logging.ERROR, f"Post-reboot hooks failed: {why}. Keeping the reboot lock (this node still "
                           f"counts as rebooting); running them again in {show_delay(self._delay(failures))}")
                self._enter(replace(phase, failures=failures, retry_at=now + self._delay(failures), last_failure=why))
                return SleepUntil(now + self._delay(failures), interruptible=True)
            case AfterBoot(retry_at=datetime()), TimeReached():
                self._enter(replace(phase, retry_at=None))
                return RunHooks(HookKind.POST_REBOOT, "boot", interruptible=True)
            case AfterBoot(step=AfterBootStep.RELEASING), LockReleased():
                self._enter(Idle(now))
                return AwaitNeedReboot(interruptible=True)
            case WaitingForWindow(), TimeReached():
                return self._plan(now)
            case WaitingForLock(), LockTaken():
                return self._after_lock(phase, now)
            case WarningUsers(), UsersWarned(ttys=()):
                return self._pre_reboot_hooks(now)
            case WarningUsers(), UsersWarned(ttys=ttys):
                self._enter(WarningUsers(now, now + self.settings.session_grace, ttys))
                return SleepUntil(now + self.settings.session_grace)
            case WarningUsers(), TimeReached():
                return self._pre_reboot_hooks(now)
            case PreRebootHooks(), HooksDone(passed=True):
                self._enter(Rebooting(now))
                return AskLogind()
            case PreRebootHooks(), HooksDone(description=why):
                if self.settings.pre_reboot_failure is PreRebootFailure.KEEP_LOCK:
                    self.failed_attempts += 1
                    until = now + self._delay(self.failed_attempts)
                    self._note(logging.ERROR, f"Not rebooting now: a pre-reboot hook failed ({why}); keeping the lock "
                               f"(--pre-reboot-failure=keep-lock), trying again at {show_time(until)}")
                    self._enter(Postponed(now, until, f"{GiveBackReason.PRE_REBOOT_HOOKS_FAILED.value}: {why}",
                                          lock_held=True))
                    return SleepUntil(until)
                return self._give_back(GiveBackReason.PRE_REBOOT_HOOKS_FAILED, why, now)
            case Rebooting() | LogindRefusing(), RebootAccepted():
                self.failed_attempts = 0
                ask_again = now + self.settings.reboot_retry_interval
                if isinstance(phase, Rebooting) and phase.accepted_at is not None:
                    self._note(logging.ERROR, f"Tried to reboot but did not! Still running "
                               f"{show_delay(seconds_between(phase.accepted_at, now))} later; logind accepted again")
                else:
                    self._note(logging.INFO, "Reboot sent. Going to sleep.")
                self._enter(Rebooting(phase.since, now, ask_again))
                return SleepUntil(ask_again)
            case Rebooting(), TimeReached():
                return AskLogind()
            case Rebooting(), RebootRefused(error=error):
                return self._refused(1, error, now)
            case LogindRefusing(), RebootRefused(error=error):
                return self._refused(phase.refusals + 1, error, now)
            case LogindRefusing(), TimeReached():
                return AskLogind()
            case GivingBack(retry_at=None, releasing=False), HooksDone(passed=True):
                self._enter(replace(phase, releasing=True))
                return ReleaseLock(after_boot=False)
            case GivingBack(retry_at=None, releasing=False), HooksDone(description=why):
                failures = phase.failures + 1
                self._note(logging.ERROR, f"Post-reboot hooks failed: {why}. Keeping the reboot lock until they pass; "
                           f"running them again in {show_delay(self._delay(failures))}")
                self._enter(replace(phase, failures=failures, retry_at=now + self._delay(failures)))
                return SleepUntil(now + self._delay(failures))
            case GivingBack(retry_at=datetime()), TimeReached():
                self._enter(replace(phase, retry_at=None))
                return RunHooks(HookKind.POST_REBOOT, "postponed")
            case GivingBack(releasing=True), LockReleased():
                return self._after_give_back(phase, now)
            case Postponed(lock_held=True), TimeReached() if not self._window_open(now):
                # Kept through a failed attempt, but the window has closed: no waiting for the next one with it.
                return self._give_back(GiveBackReason.WINDOW_CLOSED, "it closed while the reboot was postponed", now)
            case Postponed(), TimeReached():
                return self._plan(now)
            case LogindUnavailable(), TimeReached():
                return ProbeLogind()
            case LogindUnavailable(), LogindProbed(problem=None):
                self._note(logging.INFO, "logind can reboot again: taking the reboot path from the window")
                return self._plan(now)
            case LogindUnavailable(), LogindProbed(problem=str(problem)):
                probes = phase.probes + 1
                until = now + self._delay(self.failed_attempts + probes)
                self._note(logging.WARNING, f"logind cannot reboot yet: {problem}. Asking again in "
                           f"{show_delay(seconds_between(now, until))}")
                self._enter(LogindUnavailable(phase.since, probes, problem, until))
                return SleepUntil(until)
        raise UnexpectedEvent(f"{type(event).__name__} in phase {phase.name.value}")

    def _refused(self, refusals: int, error: str, now: datetime) -> Action:
        if refusals >= self.settings.reboot_attempts:
            detail = f"refused {refusals} times in a row, last: {error}"
            return self._give_back(GiveBackReason.LOGIND_REFUSED, detail, now)
        retry_at = now + self._delay(refusals)
        self._note(logging.ERROR, f"logind refused to reboot: {error}. Retrying in {show_delay(self._delay(refusals))} "
                   f"({refusals} of {self.settings.reboot_attempts} attempts before the lock is given back).")
        self._enter(LogindRefusing(now, refusals, error, retry_at))
        return SleepUntil(retry_at)

    def lock_progress(self, progress: LockProgress) -> bool:
        """Where the lock request stands (while ``TakeLock`` runs); True when the phase changed."""
        phase = self.phase
        if not isinstance(phase, WaitingForLock) or phase.progress == progress:
            return False
        self.phase = replace(phase, progress=progress)
        return True

    def phases(self) -> Iterator[Phase]:
        """The last phases, oldest first, then the current one (for tests and debugging)."""
        yield from self.history
        yield self.phase
