"""The reboot path's state machine, driven with fakes: windows, the lock, hooks, logind refusing, the steps after a
boot, and what is published about each phase."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from locksmithd.backends import LockPhase, LockProgress
from locksmithd.clock import sleep_until
from locksmithd.config import DaemonSettings, resolve_settings
from locksmithd.coordinator import CoordinatorState
from locksmithd.reboot_path import (
    AfterBoot,
    AfterBootStep,
    AskLogind,
    GivingBack,
    HookKind,
    HooksDone,
    Idle,
    LockReleased,
    LockTaken,
    LogindProbed,
    LogindRefusing,
    LogindUnavailable,
    NeedReboot,
    PathSettings,
    Phase,
    Postponed,
    PreRebootFailure,
    PreRebootHooks,
    ProbeLogind,
    RebootAccepted,
    Rebooting,
    RebootPath,
    RebootRefused,
    ReleaseLock,
    RunHooks,
    SleepUntil,
    Started,
    TakeLock,
    TimeReached,
    UnexpectedEvent,
    WaitingForLock,
    WaitingForWindow,
    WaitUntilSteady,
    WarningUsers,
    phase_document,
)
from locksmithd.strategies.reboot import RebootStrategy
from tests.unit.reboot_fakes import BACKOFF, Driver, FakeBackend, FakeClock, etcd_lock

NOON = datetime(2024, 5, 2, 12, 0, tzinfo=UTC)  # a Thursday
NO_GRACE = timedelta(0)


def path_settings(settings: DaemonSettings | None = None, **overrides: object) -> PathSettings:
    base = (settings or DaemonSettings()).path
    values = {**base.__dict__, "backoff": BACKOFF, "session_grace": NO_GRACE, **overrides}
    return PathSettings(**values)  # type: ignore[arg-type]


def windowed(start: str, length: str, **overrides: object) -> PathSettings:
    settings = resolve_settings({"reboot-window-start": start, "reboot-window-length": length}, {}, {})
    return path_settings(settings, **overrides)


def names(machine: RebootPath) -> list[str]:
    return [phase.name.value for phase in machine.phases()]


# -- windows and the lock ----------------------------------------------------------------------------------------


async def test_no_window_takes_the_lock_runs_the_hooks_and_reboots() -> None:
    clock = FakeClock(NOON)
    backend = FakeBackend(clock)
    driver = Driver(path_settings(), clock, etcd_lock(backend, clock))
    machine = await driver.run()
    assert names(machine) == ["starting", "waiting-for-lock", "running-pre-reboot-hooks", "rebooting", "rebooting"]
    assert driver.notes == ["No configured reboot window", "Reboot sent. Going to sleep."]
    assert backend.calls == ["acquire"] and backend.versions == ["3975.2.1"]
    assert driver.hook_reasons == [(HookKind.PRE_REBOOT, "reboot")]
    assert clock.sleeps == []


async def test_inside_the_window_no_wait() -> None:
    clock = FakeClock(datetime(2024, 5, 2, 4, 30, tzinfo=UTC))
    driver = Driver(windowed("4:00", "1h"), clock, RebootStrategy())
    await driver.run()
    assert clock.sleeps == [] and driver.notes == ["Reboot sent. Going to sleep."]


async def test_closed_window_waits_for_the_next_opening() -> None:
    clock = FakeClock(datetime(2024, 5, 2, 0, 57, 59, tzinfo=UTC))
    driver = Driver(windowed("Thu 04:00", "1h"), clock, RebootStrategy())
    machine = await driver.run()
    assert clock.current == datetime(2024, 5, 2, 4, 0, tzinfo=UTC)
    assert driver.notes[:3] == [
        'Reboot window start is "Thu 04:00" and length is "1h"',
        "Next window begins at 2024-05-02 04:00:00 +0000 UTC and ends at 2024-05-02 05:00:00 +0000 UTC",
        "Waiting for 3h2m1s to reboot.",
    ]
    assert names(machine)[:3] == ["starting", "waiting-for-window", "waiting-for-lock"]


async def test_long_sleeps_are_cut_into_pieces_so_clock_steps_are_noticed() -> None:
    clock = FakeClock(NOON)
    await sleep_until(clock, NOON + timedelta(hours=1))
    assert clock.current == NOON + timedelta(hours=1)
    assert len(clock.sleeps) == 12 and max(clock.sleeps) <= 300


async def test_lock_wait_past_the_window_gives_the_lock_back() -> None:
    """coreos/bugs#1886: a long lock wait must not end in a reboot outside the window."""
    clock = FakeClock(datetime(2024, 5, 2, 4, 30, tzinfo=UTC))
    backend = FakeBackend(clock)
    backend.acquire_plan = [3 * 3600.0, 60.0]  # first wait ends at 07:30, the next one a minute after 04:00
    driver = Driver(windowed("4:00", "1h"), clock, etcd_lock(backend, clock))
    machine = await driver.run()
    assert backend.calls == ["acquire", "release", "acquire"]
    assert clock.current == datetime(2024, 5, 3, 4, 1, tzinfo=UTC)
    assert any("The reboot window ended at 2024-05-02 05:00:00 +0000 UTC" in note for note in driver.notes)
    assert "giving-back-lock" in names(machine)
    # The window closed before any hook ran: nothing to undo, so no post-reboot hooks.
    assert driver.hook_reasons == [(HookKind.PRE_REBOOT, "reboot")]


async def test_a_lock_granted_a_second_after_the_window_closed_waits_for_the_next_one() -> None:
    clock = FakeClock(datetime(2024, 5, 2, 4, 0, tzinfo=UTC))
    backend = FakeBackend(clock)
    backend.acquire_plan = [61.0, 0.0]
    await Driver(windowed("4:00", "1m"), clock, etcd_lock(backend, clock)).run()
    assert backend.calls == ["acquire", "release", "acquire"]
    assert clock.current == datetime(2024, 5, 3, 4, 0, tzinfo=UTC)


async def test_logged_in_users_get_their_grace_before_the_hooks() -> None:
    clock = FakeClock(NOON)
    driver = Driver(path_settings(session_grace=timedelta(minutes=5)), clock, RebootStrategy(), ttys=("pts/0",))
    machine = await driver.run()
    phases = list(machine.phases())
    warning = next(p for p in phases if isinstance(p, WarningUsers) and p.ttys)
    assert warning.until == NOON + timedelta(minutes=5)
    hooks = next(p for p in phases if isinstance(p, PreRebootHooks))
    assert hooks.since == NOON + timedelta(minutes=5)


# -- pre-reboot hooks --------------------------------------------------------------------------------------------


async def test_a_failing_pre_reboot_hook_releases_the_lock_after_the_post_reboot_hooks() -> None:
    clock = FakeClock(NOON)
    backend = FakeBackend(clock)
    driver = Driver(path_settings(), clock, etcd_lock(backend, clock), hooks={HookKind.PRE_REBOOT: [False]})
    machine = await driver.run()
    assert driver.hook_reasons == [
        (HookKind.PRE_REBOOT, "reboot"), (HookKind.POST_REBOOT, "postponed"), (HookKind.PRE_REBOOT, "reboot")
    ]
    assert backend.calls == ["acquire", "release", "acquire"]
    postponed = next(p for p in machine.phases() if isinstance(p, Postponed))
    assert postponed.until == NOON + timedelta(seconds=10) and not postponed.lock_held
    assert "a pre-reboot hook failed: hook /hooks/pre-reboot.d/10-test failed (exit status 1)" in postponed.reason
    assert any(note.startswith("Not rebooting now: a pre-reboot hook failed") for note in driver.notes)


async def test_a_failing_pre_reboot_hook_may_keep_the_lock() -> None:
    clock = FakeClock(NOON)
    backend = FakeBackend(clock)
    settings = path_settings(pre_reboot_failure=PreRebootFailure.KEEP_LOCK)
    driver = Driver(settings, clock, etcd_lock(backend, clock), hooks={HookKind.PRE_REBOOT: [False, False]})
    machine = await driver.run()
    assert backend.calls == ["acquire"] * 3  # never released; asking again is harmless (the lock is recursive)
    assert [kind for kind, _ in driver.hook_reasons] == [HookKind.PRE_REBOOT] * 3
    waits = [p.until - p.since for p in machine.phases() if isinstance(p, Postponed)]
    assert waits == [timedelta(seconds=10), timedelta(seconds=20)]  # backoff across failed attempts
    assert all(p.lock_held for p in machine.phases() if isinstance(p, Postponed))


async def test_a_kept_lock_is_not_held_through_the_wait_for_the_next_window() -> None:
    clock = FakeClock(datetime(2024, 5, 2, 4, 59, 55, tzinfo=UTC))
    backend = FakeBackend(clock)
    settings = windowed("4:00", "1h", pre_reboot_failure=PreRebootFailure.KEEP_LOCK)
    driver = Driver(settings, clock, etcd_lock(backend, clock), hooks={HookKind.PRE_REBOOT: [False]})
    await driver.run()
    # The retry comes 10 s later, after the window closed: post-reboot.d, the lock back, the next window.
    assert backend.calls == ["acquire", "release", "acquire"]
    assert driver.hook_reasons == [
        (HookKind.PRE_REBOOT, "reboot"), (HookKind.POST_REBOOT, "postponed"), (HookKind.PRE_REBOOT, "reboot")
    ]
    assert clock.current == datetime(2024, 5, 3, 4, 0, tzinfo=UTC)
    assert any("the reboot window closed (it closed while the reboot was postponed)" in n for n in driver.notes)


async def test_the_lock_is_kept_until_the_post_reboot_hooks_pass() -> None:
    clock = FakeClock(NOON)
    backend = FakeBackend(clock)
    hooks = {HookKind.PRE_REBOOT: [False], HookKind.POST_REBOOT: [False, False, True]}
    driver = Driver(path_settings(), clock, etcd_lock(backend, clock), hooks=hooks)
    machine = await driver.run()
    releases = [i for i, action in enumerate(driver.actions) if isinstance(action, ReleaseLock)]
    post_runs = [i for i, a in enumerate(driver.actions) if isinstance(a, RunHooks) and a.kind is HookKind.POST_REBOOT]
    assert len(post_runs) == 3 and len(releases) == 1 and releases[0] > post_runs[-1]
    retries = [p for p in machine.phases() if isinstance(p, GivingBack) and p.retry_at is not None]
    # Each failure waits longer: 10 s after the first, 20 s after the second.
    assert [p.retry_at for p in retries] == [NOON + timedelta(seconds=10), NOON + timedelta(seconds=30)]


# -- logind ------------------------------------------------------------------------------------------------------


async def test_logind_refusing_is_retried_then_the_lock_is_given_back_and_taken_again() -> None:
    clock = FakeClock(NOON)
    backend = FakeBackend(clock)
    refusal = "org.freedesktop.login1.OperationInProgress: There's already a shutdown operation in progress"
    absent = "org.freedesktop.login1 is not on the bus"
    driver = Driver(
        path_settings(reboot_attempts=3), clock, etcd_lock(backend, clock),
        logind=[refusal, refusal, refusal], probes=[absent, None],
    )
    machine = await driver.run()
    phases = list(machine.phases())
    refusing = [p for p in phases if isinstance(p, LogindRefusing)]
    assert [(p.refusals, p.retry_at - p.since) for p in refusing] == [(1, timedelta(seconds=10)),
                                                                     (2, timedelta(seconds=20))]
    assert "logind refused to reboot: " + refusal + ". Retrying in 10s (1 of 3 attempts" in " ".join(driver.notes)
    # The third refusal gives the lock back (after the post-reboot hooks), and no slot is held while logind
    # cannot reboot: the probes come between the release and the next lock request.
    kinds = [type(action).__name__ for action in driver.actions]
    release, second_take = kinds.index("ReleaseLock"), len(kinds) - 1 - kinds[::-1].index("TakeLock")
    assert kinds[release + 1:second_take].count("ProbeLogind") == 2
    assert backend.calls == ["acquire", "release", "acquire"]
    unavailable = [p for p in phases if isinstance(p, LogindUnavailable)]
    assert unavailable[-1].last_error == absent and unavailable[-1].probes == 1
    assert driver.hook_reasons.count((HookKind.POST_REBOOT, "postponed")) == 1


async def test_still_running_long_after_logind_accepted_asks_again() -> None:
    clock = FakeClock(NOON)
    settings = path_settings(reboot_retry_interval=timedelta(hours=1))
    driver = Driver(settings, clock, RebootStrategy())
    machine = await driver.run()
    # The node did not go down: an hour later logind is asked again.
    assert isinstance(machine.handle(TimeReached(), NOON + timedelta(hours=1)), AskLogind)
    machine.handle(RebootAccepted(), NOON + timedelta(hours=1))
    assert machine.take_notes()[-1][1] == (
        "Tried to reboot but did not! Still running 1h0m0s later; logind accepted again"
    )
    assert isinstance(machine.phase, Rebooting) and machine.phase.coordinator is CoordinatorState.REBOOTING


# -- after a boot --------------------------------------------------------------------------------------------------


async def test_after_a_boot_the_post_reboot_hooks_run_before_the_lock_is_released() -> None:
    clock = FakeClock(NOON)
    backend = FakeBackend(clock)
    backend.held = True
    driver = Driver(path_settings(), clock, etcd_lock(backend, clock))
    machine = await driver.run(need_reboot=False, until=lambda phase: isinstance(phase, Idle))
    assert [type(a).__name__ for a in driver.actions] == ["WaitUntilSteady", "RunHooks", "ReleaseLock"]
    assert all(action.interruptible for action in driver.actions)
    assert driver.hook_reasons == [(HookKind.POST_REBOOT, "boot")]
    assert backend.calls == ["release"] and not backend.held
    assert names(machine)[1:] == ["releasing-after-boot"] * 3 + ["waiting-for-update"]


async def test_after_a_boot_failing_post_reboot_hooks_keep_the_node_counted() -> None:
    clock = FakeClock(NOON)
    backend = FakeBackend(clock)
    backend.held = True
    driver = Driver(path_settings(), clock, etcd_lock(backend, clock), hooks={HookKind.POST_REBOOT: [False, False]})
    machine = await driver.run(need_reboot=False, until=lambda phase: isinstance(phase, Idle))
    failing = [p for p in machine.phases() if isinstance(p, AfterBoot) and p.retry_at is not None]
    assert [(p.failures, p.retry_at) for p in failing] == [
        (1, NOON + timedelta(seconds=10)), (2, NOON + timedelta(seconds=30))
    ]
    assert "Keeping the reboot lock (this node still counts as rebooting)" in driver.notes[0]
    assert backend.calls == ["release"]  # once, after the third run passed
    assert clock.current == NOON + timedelta(seconds=30)


def test_an_update_interrupts_the_steps_after_a_boot() -> None:
    machine = RebootPath(path_settings(), NOON)
    assert isinstance(machine.handle(Started(False), NOON), WaitUntilSteady)
    action = machine.handle(NeedReboot("3975.2.1"), NOON)
    assert isinstance(action, TakeLock) and action.version == "3975.2.1"
    assert isinstance(machine.phase, WaitingForLock)


def test_an_event_the_phase_does_not_expect_is_a_bug() -> None:
    machine = RebootPath(path_settings(), NOON)
    with pytest.raises(UnexpectedEvent, match="LockTaken in phase starting"):
        machine.handle(LockTaken(), NOON)


# -- what is published ----------------------------------------------------------------------------------------------


def test_lock_progress_shows_in_the_phase_and_its_status_line() -> None:
    machine = RebootPath(path_settings(), NOON)
    machine.handle(Started(True, "3975.2.1"), NOON)
    progress = LockProgress(LockPhase.WAITING, position=2, waiting=3, holders=("aaaa", "bbbb"), slots=2)
    assert machine.lock_progress(progress)
    assert not machine.lock_progress(progress)  # nothing new: nothing to publish
    phase = machine.phase
    assert isinstance(phase, WaitingForLock)
    assert phase.describe() == (
        "Reboot planned: waiting for the reboot lock since 2024-05-02 12:00:00 +0000 UTC, 2nd in line (3 waiting); "
        "held by aaaa, bbbb"
    )
    document = phase_document(phase)
    assert json.loads(json.dumps(document)) == {
        "phase": "waiting-for-lock", "since": "2024-05-02T12:00:00+00:00", "state": "reboot-planned",
        "status": phase.describe(), "lock": "waiting", "position": 2, "position_is_lower_bound": False,
        "waiting": 3, "holders": ["aaaa", "bbbb"], "slots": 2, "window_closes": None,
    }


@pytest.mark.parametrize(
    ("phase", "state"),
    [
        (AfterBoot(NOON), CoordinatorState.RUNNING),
        (Idle(NOON), CoordinatorState.RUNNING),
        (WaitingForWindow(NOON, NOON, NOON), CoordinatorState.REBOOT_PLANNED),
        (PreRebootHooks(NOON), CoordinatorState.REBOOT_PLANNED),
        (Rebooting(NOON), CoordinatorState.REBOOT_PLANNED),
        (Rebooting(NOON, NOON, NOON), CoordinatorState.REBOOTING),
        (LogindUnavailable(NOON, 1, "gone", NOON), CoordinatorState.REBOOT_PLANNED),
    ],
)
def test_coordinator_conf_keeps_the_originals_states(phase: Phase, state: CoordinatorState) -> None:
    assert phase.coordinator is state
    assert phase_document(phase)["state"] == state.value


def test_every_phase_says_what_it_waits_for() -> None:
    later = NOON + timedelta(hours=2)
    assert WaitingForWindow(NOON, later, later).describe() == (
        "Reboot planned: waiting for the reboot window, which opens at 2024-05-02 14:00:00 +0000 UTC"
    )
    assert AfterBoot(NOON, AfterBootStep.POST_REBOOT_HOOKS).describe() == (
        "Back after a reboot: running post-reboot hooks before releasing the lock"
    )
    assert LogindRefusing(NOON, 2, "refused", later).describe() == (
        "Reboot planned: logind refused 2 time(s) (refused); asking again at 2024-05-02 14:00:00 +0000 UTC"
    )
    assert phase_document(LogindRefusing(NOON, 2, "refused", later))["retry_at"] == "2024-05-02T14:00:00+00:00"


def test_the_machine_alone_walks_a_logind_outage() -> None:
    machine = RebootPath(path_settings(reboot_attempts=1), NOON)
    assert isinstance(machine.handle(Started(True, "1"), NOON), TakeLock)
    assert isinstance(machine.handle(LockTaken(), NOON), RunHooks)
    machine.handle(HooksDone(True), NOON)
    assert isinstance(machine.handle(RebootRefused("no logind"), NOON), RunHooks)  # post-reboot hooks first
    assert isinstance(machine.handle(HooksDone(True), NOON), ReleaseLock)
    sleep = machine.handle(LockReleased(), NOON)
    assert isinstance(sleep, SleepUntil) and sleep.when == NOON + timedelta(seconds=10)
    assert isinstance(machine.handle(TimeReached(), sleep.when), ProbeLogind)
    again = machine.handle(LogindProbed("still gone"), sleep.when)
    assert isinstance(again, SleepUntil) and again.when == sleep.when + timedelta(seconds=20)
    assert isinstance(machine.handle(TimeReached(), again.when), ProbeLogind)
    assert isinstance(machine.handle(LogindProbed(None), again.when), TakeLock)
