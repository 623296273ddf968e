"""Fakes for locksmithd's reboot path: a clock that moves only when slept on, a lock backend that records its calls,
and a driver that performs the reboot path's actions the way the daemon does, with those fakes and scripted
answers for hooks and logind (the daemon's own shell is tested against real components in the integration tests).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo

from coreos_common.backoff import BackoffPolicy
from locksmithd.backends import LockPhase, LockProgress, ProgressCallback, SlotHolding
from locksmithd.clock import seconds_between
from locksmithd.reboot_path import (
    Action,
    AskLogind,
    AwaitNeedReboot,
    Event,
    HookKind,
    HooksDone,
    LockReleased,
    LockTaken,
    LogindProbed,
    NeedReboot,
    PathSettings,
    Phase,
    ProbeLogind,
    RebootAccepted,
    Rebooting,
    RebootPath,
    RebootRefused,
    ReleaseLock,
    RunHooks,
    SleepUntil,
    Started,
    Steady,
    TakeLock,
    TimeReached,
    UsersWarned,
    WaitUntilSteady,
    WarnUsers,
)
from locksmithd.strategies import NullObserver, RebootStrategy
from locksmithd.strategies.slots import SlotKeeper, SlotStrategy

MACHINE = "0123456789abcdef0123456789abcdef"
BACKOFF = BackoffPolicy(10.0, 300.0)


class FakeClock:
    """Time moves only when someone sleeps; ``zone`` is the zone ``now()`` answers in (as the system clock's)."""

    def __init__(self, now: datetime, zone: tzinfo | None = None) -> None:
        self.current = now
        self.zone = zone
        self.sleeps: list[float] = []

    def now(self) -> datetime:
        return self.current if self.zone is None else self.current.astimezone(self.zone)

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.current += timedelta(seconds=seconds)


class FakeBackend:
    """Records calls; ``acquire_plan`` lists, per call, how long the lock wait lasts or what it raises."""

    name = "fake"

    def __init__(self, clock: FakeClock, *, reachable: bool = True) -> None:
        self.clock = clock
        self.is_reachable = reachable
        self.calls: list[str] = []
        self.versions: list[str] = []
        self.acquire_plan: list[float | Exception] = []
        self.release_plan: list[bool | Exception] = []
        self.held = False

    async def reachable(self) -> bool:
        self.calls.append("reachable")
        return self.is_reachable

    async def acquire(
        self, machine_id: str, *, version: str = "", on_progress: ProgressCallback | None = None
    ) -> None:
        assert machine_id == MACHINE
        self.calls.append("acquire")
        self.versions.append(version)
        step = self.acquire_plan.pop(0) if self.acquire_plan else 0.0
        if isinstance(step, Exception):
            raise step
        if on_progress is not None:
            on_progress(LockProgress(LockPhase.WAITING, position=2, waiting=3, holders=("other",), slots=1))
        if step:
            await self.clock.sleep(step)
        self.held = True

    async def holding(self, machine_id: str) -> SlotHolding:
        self.calls.append("holding")
        return SlotHolding(self.held)

    async def release(self, machine_id: str) -> bool:
        self.calls.append("release")
        step = self.release_plan.pop(0) if self.release_plan else self.held
        if isinstance(step, Exception):
            raise step
        self.held = False
        return step

    async def close(self) -> None:
        self.calls.append("close")


def etcd_lock(backend: FakeBackend, clock: FakeClock) -> SlotStrategy:
    return SlotStrategy("etcd-lock", SlotKeeper(backend, MACHINE, BACKOFF, clock, NullObserver()), "")


@dataclass
class Driver:
    """Performs the machine's actions as the daemon does. ``hooks`` and ``logind``/``probes`` script the answers
    (a hook run passes unless told; logind accepts unless told: a string is a refusal's error)."""

    settings: PathSettings
    clock: FakeClock
    strategy: RebootStrategy
    hooks: dict[HookKind, list[bool]] = field(default_factory=dict)
    logind: list[str | None] = field(default_factory=list)
    probes: list[str | None] = field(default_factory=list)
    ttys: tuple[str, ...] = ()
    version: str = "3975.2.1"
    actions: list[Action] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    hook_reasons: list[tuple[HookKind, str]] = field(default_factory=list)
    machine: RebootPath | None = None

    async def run(
        self, *, need_reboot: bool = True, until: Callable[[Phase], bool] | None = None, steps: int = 200
    ) -> RebootPath:
        """Start and perform actions until ``until(phase)`` (default: logind accepted) or ``steps`` actions."""
        stop = until or (lambda phase: isinstance(phase, Rebooting) and phase.accepted_at is not None)
        machine = self.machine = RebootPath(self.settings, self.clock.now())
        action = machine.handle(Started(need_reboot, self.version if need_reboot else ""), self.clock.now())
        for _ in range(steps):
            self.notes += [text for _, text in machine.take_notes()]
            if stop(machine.phase):
                return machine
            self.actions.append(action)
            event = await self.perform(action)
            action = machine.handle(event, self.clock.now())
        raise AssertionError(f"still in {machine.phase} after {steps} actions: {self.actions[-5:]}")

    async def perform(self, action: Action) -> Event:
        match action:
            case AwaitNeedReboot():
                return NeedReboot(self.version)
            case WaitUntilSteady():
                return Steady()
            case RunHooks(kind=kind, reason=reason):
                self.hook_reasons.append((kind, reason))
                plan = self.hooks.get(kind, [])
                passed = plan.pop(0) if plan else True
                return HooksDone(passed, "" if passed else f"hook /hooks/{kind.value}.d/10-test failed (exit status 1)")
            case ReleaseLock(after_boot=True):
                await self.strategy.report_steady()
                return LockReleased()
            case ReleaseLock():
                await self.strategy.abandon()
                return LockReleased()
            case SleepUntil(when=when):
                remaining = seconds_between(self.clock.now(), when)
                if remaining > 0:
                    await self.clock.sleep(remaining)
                return TimeReached()
            case TakeLock(version=version):
                await self.strategy.can_finalize(version)
                return LockTaken()
            case WarnUsers():
                return UsersWarned(self.ttys)
            case AskLogind():
                answer = self.logind.pop(0) if self.logind else None
                return RebootAccepted() if answer is None else RebootRefused(answer)
            case ProbeLogind():
                return LogindProbed(self.probes.pop(0) if self.probes else None)
        raise AssertionError(f"cannot perform {action}")
