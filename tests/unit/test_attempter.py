"""The attempter's state machine as the D-Bus status a user sees, its paths, its clean-up of unfinished kernels, and
the parts of ``UpdateAttempter`` that run without an Omaha server (a temp root; at most a closed local port)."""

from __future__ import annotations

import itertools
import logging
import subprocess
from pathlib import Path

import pytest

from coreos_common.status import StatusSnapshot, UpdateStatus
from sim.disks import cgpt_flags, craft_table, make_usr_disk, moved
from sim.node import NodeRoot, make_node_root
from sim.ports import free_port
from tests.conftest import require_tool
from update_engine.engine.attempter import (
    REBOOT_MARKER_NAME,
    CheckOutcome,
    EngineOptions,
    UpdateAttempter,
    describe_outcome,
)
from update_engine.engine.errors import ResetNotAllowed, RollbackRefused
from update_engine.engine.history import InstalledUpdate, PendingReboot
from update_engine.engine.machine import AttemptMachine, InvalidTransition, PendingKind, Trigger
from update_engine.errors import ErrorCode
from update_engine.gpt import GptTableInvalid
from update_engine.http_rules import HttpLimits
from update_engine.payload.target import remove_partial_kernels

S = UpdateStatus
T = Trigger
USR_A, USR_B = 3, 4

# The theory of operation, written out: every (status, trigger) the machine accepts and where it leads.
ALLOWED: dict[tuple[UpdateStatus, Trigger], UpdateStatus] = {
    (S.IDLE, T.CHECK): S.CHECKING_FOR_UPDATE,
    (S.IDLE, T.RESET): S.IDLE,
    (S.IDLE, T.REBOOT_PENDING_FOUND): S.UPDATED_NEED_REBOOT,
    (S.IDLE, T.ROLLBACK_ARMED): S.UPDATED_NEED_REBOOT,
    (S.CHECKING_FOR_UPDATE, T.CHECKED): S.CHECKING_FOR_UPDATE,
    (S.CHECKING_FOR_UPDATE, T.NO_UPDATE): S.IDLE,
    (S.CHECKING_FOR_UPDATE, T.UPDATE_FOUND): S.UPDATE_AVAILABLE,
    (S.CHECKING_FOR_UPDATE, T.FAILED): S.REPORTING_ERROR_EVENT,
    (S.UPDATE_AVAILABLE, T.DOWNLOAD_STARTED): S.DOWNLOADING,
    (S.UPDATE_AVAILABLE, T.FAILED): S.REPORTING_ERROR_EVENT,
    (S.DOWNLOADING, T.PROGRESS): S.DOWNLOADING,
    (S.DOWNLOADING, T.DOWNLOAD_FINISHED): S.VERIFYING,
    (S.DOWNLOADING, T.FAILED): S.REPORTING_ERROR_EVENT,
    (S.VERIFYING, T.VERIFIED): S.FINALIZING,
    (S.VERIFYING, T.FAILED): S.REPORTING_ERROR_EVENT,
    (S.FINALIZING, T.FINALIZED): S.UPDATED_NEED_REBOOT,
    (S.FINALIZING, T.FAILED): S.REPORTING_ERROR_EVENT,
    (S.UPDATED_NEED_REBOOT, T.RESET): S.IDLE,
    (S.REPORTING_ERROR_EVENT, T.ERROR_REPORTED): S.IDLE,
}
REFUSED = [pair for pair in itertools.product(UpdateStatus, Trigger) if pair not in ALLOWED]


def _id(pair: tuple[UpdateStatus, Trigger]) -> str:
    return f"{pair[0].name}-{pair[1].value}"


# --- AttemptMachine ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pair", list(ALLOWED), ids=_id)
def test_every_allowed_trigger_publishes_the_next_status(pair: tuple[UpdateStatus, Trigger]) -> None:
    state, trigger = pair
    machine = AttemptMachine(status=state)
    assert machine.can(trigger)
    assert machine.fire(trigger) is ALLOWED[pair]
    assert machine.snapshot().current_operation == ALLOWED[pair].value


@pytest.mark.parametrize("pair", REFUSED, ids=_id)
def test_a_trigger_the_status_does_not_accept_is_refused_and_changes_nothing(
    pair: tuple[UpdateStatus, Trigger],
) -> None:
    state, trigger = pair
    machine = AttemptMachine(status=state, last_checked_time=1700000000, progress=0.25, new_version="2.0.0",
                             new_size=99)
    before = machine.snapshot()
    assert not machine.can(trigger)
    with pytest.raises(InvalidTransition) as refused:
        machine.fire(trigger)
    assert str(refused.value) == f"{trigger.value} is not allowed in {state.value}"
    assert machine.snapshot() == before


def test_an_update_walks_the_statuses_in_order() -> None:
    machine = AttemptMachine()
    seen = [machine.fire(t).value for t in (T.CHECK, T.UPDATE_FOUND, T.DOWNLOAD_STARTED, T.DOWNLOAD_FINISHED,
                                            T.VERIFIED, T.FINALIZED)]
    assert seen == [
        "UPDATE_STATUS_CHECKING_FOR_UPDATE",
        "UPDATE_STATUS_UPDATE_AVAILABLE",
        "UPDATE_STATUS_DOWNLOADING",
        "UPDATE_STATUS_VERIFYING",
        "UPDATE_STATUS_FINALIZING",
        "UPDATE_STATUS_UPDATED_NEED_REBOOT",
    ]


def test_need_reboot_accepts_nothing_but_reset() -> None:
    machine = AttemptMachine(status=S.UPDATED_NEED_REBOOT)
    assert [t for t in Trigger if machine.can(t)] == [T.RESET]


def test_progress_and_version_follow_the_download_as_a_client_sees_them() -> None:
    machine = AttemptMachine(status=S.DOWNLOADING, last_checked_time=1700000000, progress=0.7,
                             new_version="2.0.0", new_size=1234)
    machine.fire(T.DOWNLOAD_FINISHED)
    assert machine.snapshot() == StatusSnapshot(1700000000, 1.0, "UPDATE_STATUS_VERIFYING", "2.0.0", 1234)
    machine.fire(T.VERIFIED)
    assert machine.snapshot() == StatusSnapshot(1700000000, 0.0, "UPDATE_STATUS_FINALIZING", "2.0.0", 1234)
    machine.fire(T.FINALIZED)
    # The pending version stays visible while the node waits for its reboot.
    assert machine.snapshot() == StatusSnapshot(1700000000, 0.0, "UPDATE_STATUS_UPDATED_NEED_REBOOT", "2.0.0", 1234)
    machine.fire(T.RESET)
    assert machine.snapshot() == StatusSnapshot(1700000000, 0.0, "UPDATE_STATUS_IDLE", "0.0.0", 0)


def test_a_failed_download_ends_idle_without_the_abandoned_version() -> None:
    machine = AttemptMachine(status=S.DOWNLOADING, last_checked_time=5, progress=0.4, new_version="2.0.0",
                             new_size=1234)
    machine.fire(T.FAILED)
    assert machine.snapshot().current_operation == "UPDATE_STATUS_REPORTING_ERROR_EVENT"
    machine.fire(T.ERROR_REPORTED)
    assert machine.snapshot() == StatusSnapshot(5, 0.0, "UPDATE_STATUS_IDLE", "0.0.0", 0)


# --- describe_outcome -------------------------------------------------------------------------------------------


def test_outcome_without_error_is_the_status_string() -> None:
    assert describe_outcome(CheckOutcome(S.UPDATED_NEED_REBOOT)) == "UPDATE_STATUS_UPDATED_NEED_REBOOT"
    assert describe_outcome(CheckOutcome(S.IDLE, poll_interval=600)) == "UPDATE_STATUS_IDLE"


def test_outcome_with_error_names_the_code_and_the_reason() -> None:
    outcome = CheckOutcome(S.IDLE, error_code=int(ErrorCode.DOWNLOAD_HASH_MISMATCH),
                           error_message="payload SHA-256 does not match the Omaha response")
    assert describe_outcome(outcome) == (
        "error 10 DOWNLOAD_HASH_MISMATCH: payload SHA-256 does not match the Omaha response"
    )
    assert describe_outcome(CheckOutcome(S.IDLE, error_code=2503, error_message="server busy")) == (
        "error 2503 HTTP_503: server busy"
    )


# --- EngineOptions ----------------------------------------------------------------------------------------------


def test_reboot_marker_lives_in_the_run_dir(tmp_path: Path) -> None:
    options = EngineOptions(config_root=tmp_path / "root", run_dir=tmp_path / "run")
    assert options.reboot_marker == tmp_path / "run" / "update_engine_autoupdate_completed"
    assert EngineOptions().reboot_marker == Path("/run/update_engine_autoupdate_completed")


def test_public_key_defaults_under_the_config_root_and_can_be_overridden(tmp_path: Path) -> None:
    assert EngineOptions(config_root=tmp_path).public_key_path == (
        tmp_path / "usr/share/update_engine/update-payload-key.pub.pem"
    )
    assert EngineOptions().public_key_path == Path("/usr/share/update_engine/update-payload-key.pub.pem")
    own = tmp_path / "keys/test.pub.pem"
    assert EngineOptions(config_root=tmp_path, public_key=own).public_key_path == own


@pytest.mark.parametrize(
    ("present", "chosen"),
    [
        ((), "boot/flatcar"),
        (("boot/flatcar",), "boot/flatcar"),
        (("boot/coreos",), "boot/coreos"),
        (("boot/flatcar", "boot/coreos"), "boot/flatcar"),
    ],
)
def test_kernel_dir_prefers_flatcar_then_coreos(tmp_path: Path, present: tuple[str, ...], chosen: str) -> None:
    for name in present:
        (tmp_path / name).mkdir(parents=True)
    assert EngineOptions(config_root=tmp_path).resolved_kernel_dir() == tmp_path / chosen


def test_a_file_named_like_the_kernel_dir_is_not_taken_for_it(tmp_path: Path) -> None:
    (tmp_path / "boot").mkdir()
    (tmp_path / "boot/flatcar").write_text("not a directory")
    (tmp_path / "boot/coreos").mkdir()
    assert EngineOptions(config_root=tmp_path).resolved_kernel_dir() == tmp_path / "boot/coreos"


def test_explicit_kernel_dir_wins(tmp_path: Path) -> None:
    (tmp_path / "boot/flatcar").mkdir(parents=True)
    esp = tmp_path / "esp/EFI/flatcar"
    assert EngineOptions(config_root=tmp_path, kernel_dir=esp).resolved_kernel_dir() == esp


# --- remove_partial_kernels -------------------------------------------------------------------------------------


def test_only_unfinished_files_of_this_kernel_are_removed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    kept = {
        "vmlinuz-b": b"the installed kernel",
        "vmlinuz-a": b"the running kernel",
        ".vmlinuz-a.k3j2h1.partial": b"the other slot's unfinished file",
        "vmlinuz-b.partial": b"no leading dot: not ours",
        ".vmlinuz-b.k3j2h1": b"no .partial suffix: not ours",
        ".vmlinuz-bx.k3j2h1.partial": b"another kernel whose name starts alike",
    }
    for name, data in kept.items():
        (tmp_path / name).write_bytes(data)
    stale = [".vmlinuz-b.abc123.partial", ".vmlinuz-b.zz_9.partial"]
    for name in stale:
        (tmp_path / name).write_bytes(b"half a kernel")
    with caplog.at_level(logging.INFO, logger="update_engine.payload.target"):
        remove_partial_kernels(tmp_path / "vmlinuz-b")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    assert all((tmp_path / name).read_bytes() == data for name, data in kept.items())
    for name in stale:
        assert f"Removed {tmp_path / name}, an unfinished kernel file" in caplog.text


def test_nothing_to_clean_leaves_the_kernel_alone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "vmlinuz-a").write_bytes(b"kernel")
    with caplog.at_level(logging.INFO, logger="update_engine.payload.target"):
        remove_partial_kernels(tmp_path / "vmlinuz-a")
        remove_partial_kernels(tmp_path / "vmlinuz-b")  # not installed yet: nothing to do either
    assert [p.name for p in tmp_path.iterdir()] == ["vmlinuz-a"]
    assert "Removed" not in caplog.text


def test_an_unremovable_leftover_is_reported_and_the_rest_still_cleaned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / ".vmlinuz-b.dir.partial").mkdir()  # cannot be unlinked: a directory
    (tmp_path / ".vmlinuz-b.file.partial").write_bytes(b"x")
    with caplog.at_level(logging.INFO, logger="update_engine.payload.target"):
        remove_partial_kernels(tmp_path / "vmlinuz-b")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".vmlinuz-b.dir.partial"]
    assert f"Cannot remove the unfinished kernel file {tmp_path / '.vmlinuz-b.dir.partial'}" in caplog.text
    assert "remove it by hand" in caplog.text


# --- UpdateAttempter without a server ---------------------------------------------------------------------------


@pytest.fixture
def node(tmp_path: Path) -> NodeRoot:
    return make_node_root(tmp_path / "root")


def attempter_for(node: NodeRoot, **overrides: object) -> UpdateAttempter:
    values: dict[str, object] = {
        "config_root": node.root, "state_dir": node.state_dir, "run_dir": node.run_dir,
        "disk": node.root / "no-disk.img", "booted": "USR-A",
        "http": HttpLimits(connect_timeout=5, omaha_total_timeout=10),
    }
    values.update(overrides)
    return UpdateAttempter(EngineOptions(**values))  # type: ignore[arg-type]


def recorded(attempter: UpdateAttempter) -> list[str]:
    seen: list[str] = []
    attempter.add_status_listener(lambda snap: seen.append(snap.current_operation))
    return seen


def test_no_marker_means_idle_at_start(node: NodeRoot) -> None:
    attempter = attempter_for(node)
    assert not attempter.restore_reboot_pending()
    assert attempter.snapshot().current_operation == "UPDATE_STATUS_IDLE"


@pytest.mark.parametrize("content", ["update USR-B\n", ""])
def test_marker_restores_need_reboot_after_a_restart(
    node: NodeRoot, content: str, caplog: pytest.LogCaptureFixture
) -> None:
    node.run_dir.mkdir(parents=True, exist_ok=True)
    (node.run_dir / REBOOT_MARKER_NAME).write_text(content)
    attempter = attempter_for(node)
    seen = recorded(attempter)
    with caplog.at_level(logging.INFO, logger="update_engine"):
        assert attempter.restore_reboot_pending()
    assert seen == ["UPDATE_STATUS_UPDATED_NEED_REBOOT"]
    assert "an update is pending, status restored to UPDATE_STATUS_UPDATED_NEED_REBOOT" in caplog.text
    assert str(node.run_dir / REBOOT_MARKER_NAME) in caplog.text


def test_restored_rollback_is_logged_as_a_rollback(node: NodeRoot, caplog: pytest.LogCaptureFixture) -> None:
    node.run_dir.mkdir(parents=True, exist_ok=True)
    (node.run_dir / REBOOT_MARKER_NAME).write_text("rollback USR-B\n")
    with caplog.at_level(logging.INFO, logger="update_engine"):
        assert attempter_for(node).restore_reboot_pending()
    assert "a rollback is pending" in caplog.text


def test_attempt_update_shows_checking_at_once_and_only_once(
    node: NodeRoot, caplog: pytest.LogCaptureFixture
) -> None:
    attempter = attempter_for(node)
    seen = recorded(attempter)
    with caplog.at_level(logging.INFO, logger="update_engine"):
        attempter.attempt_update()
        attempter.attempt_update()
    assert seen == ["UPDATE_STATUS_CHECKING_FOR_UPDATE"]
    assert attempter.check_requested.is_set()
    assert "AttemptUpdate ignored: status is UPDATE_STATUS_CHECKING_FOR_UPDATE" in caplog.text
    assert attempter.take_interactive_request()
    assert not attempter.take_interactive_request()


def test_attempt_update_while_a_reboot_is_pending_is_ignored(node: NodeRoot) -> None:
    node.run_dir.mkdir(parents=True, exist_ok=True)
    (node.run_dir / REBOOT_MARKER_NAME).write_text("update USR-B\n")
    attempter = attempter_for(node)
    attempter.restore_reboot_pending()
    attempter.attempt_update()
    assert attempter.snapshot().current_operation == "UPDATE_STATUS_UPDATED_NEED_REBOOT"
    assert not attempter.check_requested.is_set()


def test_reset_during_a_check_is_refused_naming_the_status(node: NodeRoot) -> None:
    attempter = attempter_for(node)
    attempter.attempt_update()
    with pytest.raises(ResetNotAllowed, match="not UPDATE_STATUS_CHECKING_FOR_UPDATE"):
        attempter.reset_status()
    assert attempter.snapshot().current_operation == "UPDATE_STATUS_CHECKING_FOR_UPDATE"


def test_rollback_during_a_check_is_refused_naming_the_status(node: NodeRoot) -> None:
    attempter = attempter_for(node)
    attempter.attempt_update()
    with pytest.raises(RollbackRefused, match="only possible while idle, status is UPDATE_STATUS_CHECKING"):
        attempter.rollback()


def test_reset_when_idle_forgets_the_version_that_failed_to_boot(
    node: NodeRoot, caplog: pytest.LogCaptureFixture
) -> None:
    attempter = attempter_for(node)
    attempter.prefs.set_str("failed-boot-version", "2.0.0")
    with caplog.at_level(logging.INFO, logger="update_engine"):
        attempter.reset_status()
    assert node.prefs("failed-boot-version") is None
    assert "version 2.0.0, which failed to boot earlier, may be installed again" in caplog.text
    assert attempter.snapshot().current_operation == "UPDATE_STATUS_IDLE"


async def test_disabled_updates_send_nothing_and_end_idle(node: NodeRoot, caplog: pytest.LogCaptureFixture) -> None:
    node.set_update_conf(SERVER="disabled")
    attempter = attempter_for(node)
    seen = recorded(attempter)
    with caplog.at_level(logging.INFO, logger="update_engine"):
        outcome = await attempter.check_and_update()
    assert outcome == CheckOutcome(S.IDLE)
    assert seen == ["UPDATE_STATUS_CHECKING_FOR_UPDATE", "UPDATE_STATUS_IDLE"]
    assert "Updates are disabled (SERVER=disabled); no check sent" in caplog.text
    assert attempter.snapshot().last_checked_time == 0


async def test_unreachable_server_is_a_network_error_and_the_node_returns_to_idle(node: NodeRoot) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1/update/"
    node.set_update_conf(SERVER=url)
    attempter = attempter_for(node)
    seen = recorded(attempter)
    outcome = await attempter.check_and_update()
    assert seen == [
        "UPDATE_STATUS_CHECKING_FOR_UPDATE",
        "UPDATE_STATUS_REPORTING_ERROR_EVENT",
        "UPDATE_STATUS_IDLE",
    ]
    assert outcome.status is S.IDLE
    assert outcome.error_code == 2000 and outcome.network_error and outcome.http_status is None
    assert describe_outcome(outcome).startswith("error 2000 OMAHA_REQUEST_HTTP_RESPONSE_BASE: ")
    assert url.split("/")[2] in describe_outcome(outcome)
    assert not node.run_dir.joinpath(REBOOT_MARKER_NAME).exists()


async def test_a_failed_check_names_its_error_code_once(node: NodeRoot) -> None:
    node.set_update_conf(SERVER=f"http://127.0.0.1:{free_port()}/v1/update/")
    outcome = await attempter_for(node).check_and_update()
    assert describe_outcome(outcome).count("OMAHA_REQUEST_HTTP_RESPONSE_BASE") == 1


def test_rollback_pending_across_a_restart_is_cancelled_by_reset(
    tmp_path: Path, node: NodeRoot, caplog: pytest.LogCaptureFixture
) -> None:
    """The marker remembers *what* is pending: a reset after a restart undoes a rollback, not an update."""
    cgpt = require_tool("cgpt")
    disk = make_usr_disk(tmp_path / "disk.img")
    subprocess.run([cgpt, "add", "-i", str(USR_B), "-S", "1", "-P", "0", "-T", "0", str(disk)], check=True)
    first = attempter_for(node, disk=disk)
    assert "USR-B will boot next (rollback from USR-A)" in first.rollback()
    assert cgpt_flags(disk, USR_B)[0] > cgpt_flags(disk, USR_A)[0]
    assert node.run_dir.joinpath(REBOOT_MARKER_NAME).read_text() == "rollback USR-B\n"

    restarted = attempter_for(node, disk=disk)
    assert restarted.restore_reboot_pending()
    with caplog.at_level(logging.INFO, logger="update_engine"):
        restarted.reset_status()
    assert "rollback cancelled, USR-A stays the next boot" in caplog.text
    assert restarted.snapshot().current_operation == "UPDATE_STATUS_IDLE"
    assert not node.run_dir.joinpath(REBOOT_MARKER_NAME).exists()
    prio_a, tries_a, ok_a = cgpt_flags(disk, USR_A)
    prio_b, _, ok_b = cgpt_flags(disk, USR_B)
    assert prio_a > prio_b and ok_a == 1 and tries_a == 0
    assert ok_b == 1  # the known-good other system is left as it was, not disarmed like an update


def test_rollback_reset_and_mark_good_on_an_invalid_table_are_refused_with_the_table_named(
    tmp_path: Path, node: NodeRoot
) -> None:
    """USR-B overlapping USR-A: nothing is changed, and the D-Bus calls get their own refusal, not a traceback."""
    cgpt = require_tool("cgpt")
    disk = make_usr_disk(tmp_path / "disk.img")
    subprocess.run([cgpt, "add", "-i", str(USR_B), "-S", "1", "-P", "0", "-T", "0", str(disk)], check=True)
    craft_table(disk, entries=moved(USR_B, first=20000))
    before = disk.read_bytes()
    attempter = attempter_for(node, disk=disk)
    with pytest.raises(RollbackRefused, match=rf"partition table of {disk} is invalid.*partition 4 \(USR-B\)"):
        attempter.rollback()
    with pytest.raises(GptTableInvalid, match=r"overlaps partition 3 \(USR-A\)"):
        attempter.mark_running_good()
    node.run_dir.mkdir(parents=True, exist_ok=True)
    (node.run_dir / REBOOT_MARKER_NAME).write_text("update USR-B\n")
    assert attempter.restore_reboot_pending()
    with pytest.raises(ResetNotAllowed, match=r"cannot undo what was armed.*overlaps partition 3"):
        attempter.reset_status()
    assert attempter.snapshot().current_operation == "UPDATE_STATUS_UPDATED_NEED_REBOOT"
    assert disk.read_bytes() == before


def test_a_restart_with_a_pending_update_restores_its_version_size_and_check_time(node: NodeRoot) -> None:
    first = attempter_for(node)
    first.history.record_check_time(1700000000)
    first.history.record_install(InstalledUpdate("2.0.0", 4321, install_time=1700000050), running_version="1.0.0",
                                 boot_id="boot", response_signature="")
    first.history.write_pending_reboot(PendingReboot(PendingKind.UPDATE, "USR-B"))
    restarted = attempter_for(node)
    assert restarted.restore_reboot_pending()
    assert restarted.snapshot() == StatusSnapshot(1700000000, 0.0, S.UPDATED_NEED_REBOOT.value, "2.0.0", 4321)
    assert restarted.machine.pending is PendingKind.UPDATE


def test_a_restart_with_a_pending_rollback_shows_no_new_version(node: NodeRoot) -> None:
    first = attempter_for(node)
    first.history.record_install(InstalledUpdate("2.0.0", 4321, install_time=1), running_version="1.0.0",
                                 boot_id="boot", response_signature="")
    first.history.write_pending_reboot(PendingReboot(PendingKind.ROLLBACK, "USR-B"))
    restarted = attempter_for(node)
    assert restarted.restore_reboot_pending()
    assert restarted.snapshot().new_version == "0.0.0"
    assert restarted.machine.pending is PendingKind.ROLLBACK


async def test_a_refused_http_server_is_said_in_words_without_a_tls_setting(node: NodeRoot) -> None:
    """Before: "Omaha server 127.0.0.1:N unreachable: Cannot connect to host 127.0.0.1:N ssl:default [...]"."""
    port = free_port()
    node.set_update_conf(SERVER=f"http://127.0.0.1:{port}/v1/update/")
    attempter = attempter_for(node)
    outcome = await attempter.check_and_update()
    assert outcome.error_message == (
        f"Omaha server 127.0.0.1:{port} unreachable: connection refused"
    )
    details = attempter.details()
    assert (details.last_attempt_result, details.last_error_code, details.last_error_reason) == (
        "failed", 2000, outcome.error_message,
    )
    assert details.last_error_name == "OMAHA_REQUEST_HTTP_RESPONSE_BASE"
