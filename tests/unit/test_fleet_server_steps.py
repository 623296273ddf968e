"""The simulated fleet's reading of the update server: from two snapshots of an instance to the steps it took."""

from __future__ import annotations

from sim.fleet.omaha import GRANTED, OmahaEventRecord, ServerInstance, ServerStep, server_steps


def instance(status: str, granted_at: float | None = None) -> ServerInstance:
    return ServerInstance("m1", "1.0.0", status, "2.0.0" if granted_at else None, granted_at)


def event(kind: int, result: int, status: str | None) -> OmahaEventRecord:
    return OmahaEventRecord("m1", "1.0.0", kind, result, None, None, status)


def test_first_check_in_then_on_hold_then_a_grant() -> None:
    assert server_steps(None, None, instance("Undefined"), []) == [ServerStep("Undefined", None)]
    assert server_steps("Undefined", instance("Undefined"), instance("OnHold"), []) == [
        ServerStep("OnHold", "Undefined")
    ]
    assert server_steps("OnHold", instance("OnHold"), instance(GRANTED, 10.0), []) == [ServerStep(GRANTED, "OnHold")]


def test_a_grant_and_the_download_between_two_snapshots_are_both_told() -> None:
    started = event(13, 1, "Downloading")
    steps = server_steps("OnHold", instance("OnHold"), instance("Downloading", 10.0), [started])
    assert steps == [ServerStep(GRANTED, "OnHold"), ServerStep("Downloading", GRANTED, started)]


def test_every_event_that_set_a_status_is_a_step_and_others_are_not() -> None:
    finished, installed = event(14, 1, "Downloaded"), event(3, 1, "Installed")
    deferred = event(3, 9, None)
    steps = server_steps("Downloading", instance("Downloading", 10.0), instance("Installed", 10.0),
                         [finished, deferred, installed])  # fmt: skip
    assert steps == [
        ServerStep("Downloaded", "Downloading", finished), ServerStep("Installed", "Downloaded", installed)
    ]


def test_a_status_read_before_newer_events_is_not_told_as_a_step_back() -> None:
    # The instance was read Installed, its events after it already hold the rollback: RolledBack, not Installed.
    rolled_back = event(3, 0, "RolledBack")
    steps = server_steps("Installed", instance("Installed", 10.0), instance("Installed", 10.0), [rolled_back])
    assert steps == [ServerStep("RolledBack", "Installed", rolled_back)]
    assert server_steps("RolledBack", instance("Installed", 10.0), instance("RolledBack", 10.0), []) == []


def test_complete_by_a_check_in_without_an_event() -> None:
    steps = server_steps("Installed", instance("Installed", 10.0), instance("Complete", 10.0), [])
    assert steps == [ServerStep("Complete", "Installed")]
