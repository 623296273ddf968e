"""update_engine_client without a bus: flag parsing, action precedence, output formats, -update's verdict."""

from __future__ import annotations

import json

import pytest

from coreos_common.status import StatusDetails, StatusSnapshot, UpdateStatus
from update_engine import __version__
from update_engine.client import (
    Action,
    ClientOptions,
    Outcome,
    UpdateFollower,
    UsageError,
    format_details,
    format_details_json,
    format_status,
    format_status_json,
    format_watch,
    main,
    parse_args,
)

S = UpdateStatus


def snap(op: UpdateStatus, last_checked: int = 1700000000, progress: float = 0.0) -> StatusSnapshot:
    return StatusSnapshot(last_checked, progress, op.value, "3815.2.0" if op is not S.IDLE else "0.0.0", 0)


@pytest.mark.parametrize("arg", ["-status", "--status", "-status=true", "--status=1", "-status=True", "-status=yes"])
def test_boolean_flags_take_every_gflags_spelling(arg: str) -> None:
    assert parse_args([arg]).status


@pytest.mark.parametrize("args", [["-status=false"], ["--status=0"], ["-status", "-nostatus"], ["--nostatus"]])
def test_boolean_flags_can_be_turned_off(args: list[str]) -> None:
    assert not parse_args(args).status


def test_every_action_flag_is_known() -> None:
    options = parse_args(
        ["-check_for_update", "-status", "-update", "-watch_for_updates", "-reset_status", "-rollback", "--json"]
    )
    assert options == ClientOptions(
        check_for_update=True,
        status=True,
        update=True,
        watch_for_updates=True,
        reset_status=True,
        rollback=True,
        json=True,
    )


@pytest.mark.parametrize(
    "args",
    [["--bus-address", "unix:path=/x"], ["--bus-address=unix:path=/x"], ["-bus_address", "unix:path=/x"]],
)
def test_bus_address_takes_a_separate_or_attached_value(args: list[str]) -> None:
    assert parse_args(args).bus_address == "unix:path=/x"


def test_wait_and_hidden_poll_interval_are_seconds() -> None:
    options = parse_args(["--wait", "2.5", "--poll-interval=0.1"])
    assert options.wait == 2.5
    assert options.poll_interval == 0.1
    assert parse_args([]).poll_interval == 5.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-frobnicate"], "unknown flag '-frobnicate'"),
        (["status"], "unexpected argument 'status'"),
        (["-status=maybe"], "-status=maybe: expected true or false"),
        (["--wait", "soon"], "--wait 'soon'"),
        (["--wait", "-1"], "--wait '-1'"),
        (["--poll-interval", "0"], "--poll-interval '0'"),
        (["--bus-address"], "--bus-address needs a value"),
        (["---status"], "unexpected argument '---status'"),
    ],
)
def test_bad_arguments_are_named(args: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_args(args)


@pytest.mark.parametrize(
    ("flags", "action"),
    [
        ([], Action.NONE),
        (["-reset_status", "-status", "-rollback", "-update", "-watch_for_updates"], Action.RESET_STATUS),
        (["-status", "-rollback", "-update", "-check_for_update"], Action.STATUS),
        (["-rollback", "-update", "-watch_for_updates"], Action.ROLLBACK),
        (["-check_for_update", "-update"], Action.UPDATE),
        (["-check_for_update", "-watch_for_updates"], Action.CHECK_FOR_UPDATE),
        (["-watch_for_updates", "--json"], Action.WATCH_FOR_UPDATES),
    ],
)
def test_one_action_runs_by_the_originals_precedence(flags: list[str], action: Action) -> None:
    assert parse_args(flags).action() is action


def test_ignored_actions_are_listed_but_update_includes_the_check() -> None:
    assert parse_args(["-status", "-check_for_update"]).ignored_actions() == ["check_for_update"]
    assert parse_args(["-update", "-check_for_update"]).ignored_actions() == []


def test_status_block_matches_the_original_printf_format() -> None:
    snapshot = StatusSnapshot(1700000000, 0.5, "UPDATE_STATUS_DOWNLOADING", "3815.2.0", 461373440)
    assert format_status(snapshot) == (
        "LAST_CHECKED_TIME=1700000000\n"
        "PROGRESS=0.500000\n"
        "CURRENT_OP=UPDATE_STATUS_DOWNLOADING\n"
        "NEW_VERSION=3815.2.0\n"
        "NEW_SIZE=461373440\n"
    )
    assert "PROGRESS=0.000000\n" in format_status(StatusSnapshot())
    assert "PROGRESS=0.333333\n" in format_status(StatusSnapshot(progress=1 / 3))


def test_status_json_is_one_object_with_the_five_fields() -> None:
    text = format_status_json(StatusSnapshot(1700000000, 0.25, "UPDATE_STATUS_DOWNLOADING", "3815.2.0", 10))
    assert text.endswith("\n") and text.count("\n") == 1
    assert json.loads(text) == {
        "last_checked_time": 1700000000,
        "progress": 0.25,
        "current_operation": "UPDATE_STATUS_DOWNLOADING",
        "new_version": "3815.2.0",
        "new_size": 10,
    }


def test_watch_entry_matches_the_original_log_lines() -> None:
    assert format_watch(StatusSnapshot(1700000000, 0.123456789, "UPDATE_STATUS_DOWNLOADING", "3815.2.0", 7)) == (
        "Got status update:\n"
        "  last_checked_time: 1700000000\n"
        "  progress: 0.123457\n"
        "  current_operation: UPDATE_STATUS_DOWNLOADING\n"
        "  new_version: 3815.2.0\n"
        "  new_size: 7\n"
    )
    assert "  progress: 0\n" in format_watch(StatusSnapshot())
    assert "  progress: 1\n" in format_watch(StatusSnapshot(progress=1.0))


def follow(before: StatusSnapshot, *observed: StatusSnapshot) -> list[Outcome]:
    follower = UpdateFollower(before)
    return [follower.observe(s) for s in observed]


def test_update_that_installs_ends_at_need_reboot() -> None:
    outcomes = follow(
        snap(S.IDLE, 0),
        snap(S.CHECKING_FOR_UPDATE, 0),
        snap(S.UPDATE_AVAILABLE),
        snap(S.DOWNLOADING, progress=0.5),
        snap(S.FINALIZING),
        snap(S.UPDATED_NEED_REBOOT),
    )
    assert outcomes == [Outcome.RUNNING] * 4 + [Outcome.NEED_REBOOT]


def test_check_without_update_ends_idle_with_a_new_check_time() -> None:
    assert follow(snap(S.IDLE, 100), snap(S.CHECKING_FOR_UPDATE, 100), snap(S.IDLE, 200))[-1] is Outcome.NO_UPDATE
    # Even when the whole check happened before the first observation.
    assert follow(snap(S.IDLE, 100), snap(S.IDLE, 200)) == [Outcome.NO_UPDATE]


def test_back_to_idle_after_an_update_was_found_is_a_failure() -> None:
    outcomes = follow(snap(S.IDLE, 100), snap(S.UPDATE_AVAILABLE, 200), snap(S.DOWNLOADING, 200), snap(S.IDLE, 200))
    assert outcomes[-1] is Outcome.FAILED


def test_reporting_an_error_event_is_a_failure() -> None:
    outcomes = follow(
        snap(S.IDLE, 100), snap(S.CHECKING_FOR_UPDATE, 100), snap(S.REPORTING_ERROR_EVENT, 200), snap(S.IDLE, 200)
    )
    assert outcomes == [Outcome.RUNNING, Outcome.RUNNING, Outcome.FAILED]


def test_back_to_idle_without_a_successful_check_is_a_failed_check() -> None:
    assert follow(snap(S.IDLE, 100), snap(S.CHECKING_FOR_UPDATE, 100), snap(S.IDLE, 100))[-1] is Outcome.CHECK_FAILED


def test_an_attempt_already_running_is_followed_to_its_end() -> None:
    assert follow(snap(S.DOWNLOADING, 100, 0.3), snap(S.IDLE, 100)) == [Outcome.FAILED]
    assert follow(snap(S.FINALIZING, 100), snap(S.UPDATED_NEED_REBOOT, 100)) == [Outcome.NEED_REBOOT]


def test_idle_polls_before_the_attempt_shows_up_are_tolerated_then_reported() -> None:
    follower = UpdateFollower(snap(S.IDLE, 100))
    assert follower.observe(snap(S.IDLE, 100)) is Outcome.RUNNING  # a signal, not a poll
    assert [follower.observe(snap(S.IDLE, 100), polled=True) for _ in range(3)] == [
        Outcome.RUNNING,
        Outcome.RUNNING,
        Outcome.IGNORED,
    ]


def test_main_reports_usage_errors_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-bogus"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("update_engine_client: unknown flag '-bogus'\nusage: update_engine_client")


def test_main_help_prints_usage_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "-check_for_update" in out and "-watch_for_updates" in out and "--json" in out
    assert "poll-interval" not in out


def test_main_without_action_prints_usage_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """Before, no action printed "Done." and exited 0, as if something had been done."""
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("update_engine_client: no action given\nusage: update_engine_client ACTION")


def test_main_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"update_engine_client {__version__}\n"


FAILED = StatusDetails(
    status=StatusSnapshot(1700000000, 0.0, S.IDLE.value, "0.0.0", 0), last_attempt_result="failed",
    last_attempt_time=1700000100, last_error_code=2000, last_error_name="OMAHA_REQUEST_HTTP_RESPONSE_BASE",
    last_error_reason="Omaha server 10.0.0.1:8080 unreachable: don't know; $(reboot)", warnings=("No key",),
    server="http://10.0.0.1:8080/v1/update/", group="beta", current_version="1.0.0", board="amd64-usr",
    app_id="{x}", public_key="/k.pem",
)


def test_status_adds_the_last_error_after_the_originals_lines_quoted_for_the_shell() -> None:
    assert format_details(FAILED) == (
        format_status(FAILED.status)
        + "LAST_ERROR='2000 OMAHA_REQUEST_HTTP_RESPONSE_BASE at 2023-11-14T22:15:00Z: Omaha server 10.0.0.1:8080 "
        "unreachable: don'\"'\"'t know; $(reboot)'\n"
    )
    assert format_details(StatusDetails(last_attempt_result="no_update", last_attempt_time=5)).endswith(
        "NEW_SIZE=0\nLAST_ERROR=\n"
    )


def test_a_reason_cannot_add_a_line_to_the_status_block() -> None:
    forged = StatusDetails(last_error_code=10, last_error_name="X", last_error_reason="a\nCURRENT_OP=IDLE")
    assert format_details(forged).count("\n") == 6
    assert "a\\nCURRENT_OP=IDLE" in format_details(forged)


def test_status_json_carries_the_last_attempt_warnings_and_settings() -> None:
    document = json.loads(format_details_json(FAILED))
    assert document["current_operation"] == "UPDATE_STATUS_IDLE"
    assert document["last_attempt"] == {
        "result": "failed", "time": 1700000100, "error_code": 2000, "error_name": "OMAHA_REQUEST_HTTP_RESPONSE_BASE",
        "reason": FAILED.last_error_reason,
    }
    assert document["warnings"] == ["No key"] and document["pending_reboot"] is None
    assert document["settings"]["group"] == "beta"
    nothing_yet = json.loads(format_details_json(StatusDetails()))
    assert nothing_yet["last_attempt"] is None and nothing_yet["warnings"] == []
