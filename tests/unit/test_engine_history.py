"""The install history: typed prefs in the original's layout, and the reboot marker's two lifetimes."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from update_engine.engine.history import InstalledUpdate, InstallHistory, PendingReboot
from update_engine.engine.machine import PendingKind
from update_engine.payload_state import PayloadState
from update_engine.prefs import Prefs


@pytest.fixture
def history(tmp_path: Path) -> InstallHistory:
    return InstallHistory(Prefs(tmp_path / "prefs"), tmp_path / "run" / "update_engine_autoupdate_completed")


def test_an_install_is_recorded_in_the_originals_layout_and_read_back_typed(history: InstallHistory) -> None:
    history.record_install(InstalledUpdate("2.0.0", 1234, install_time=1700000100), running_version="1.0.0",
                           boot_id="b1", response_signature="sig")
    root = history.prefs.root
    assert (root / "previous-version").read_bytes() == b"1.0.0"
    assert (root / "installed-version").read_bytes() == b"2.0.0"
    assert (root / "installed-size").read_bytes() == b"1234"
    assert history.installed_update() == InstalledUpdate("2.0.0", 1234, install_time=1700000100)
    assert history.installed_boot_id() == "b1"
    # The attempts at the installed payload are forgotten, its response kept as the current one.
    assert history.payload_state() == PayloadState(response_signature="sig")


def test_a_node_without_an_install_has_no_installed_update(history: InstallHistory) -> None:
    assert history.installed_update() is None
    assert history.previous_version() is None
    assert history.last_check_time() == 0


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("update USR-B\n", PendingReboot(PendingKind.UPDATE, "USR-B")),
        ("rollback USR-A\n", PendingReboot(PendingKind.ROLLBACK, "USR-A")),
        ("", PendingReboot(PendingKind.UPDATE)),  # the original's marker is empty
    ],
)
def test_the_reboot_marker_says_what_is_pending(history: InstallHistory, content: str,
                                                expected: PendingReboot) -> None:
    history.reboot_marker.parent.mkdir(parents=True)
    history.reboot_marker.write_text(content)
    assert history.pending_reboot() == expected


def test_an_unknown_marker_is_taken_for_an_update_with_a_warning(
    history: InstallHistory, caplog: pytest.LogCaptureFixture
) -> None:
    history.reboot_marker.parent.mkdir(parents=True)
    history.reboot_marker.write_text("reinstall USR-B\n")
    with caplog.at_level(logging.WARNING):
        assert history.pending_reboot() == PendingReboot(PendingKind.UPDATE, "USR-B")
    assert "names 'reinstall', neither update nor rollback" in caplog.text


def test_the_marker_is_written_whole_and_private_and_cleared(history: InstallHistory) -> None:
    history.write_pending_reboot(PendingReboot(PendingKind.ROLLBACK, "USR-B"))
    assert history.reboot_marker.read_text() == "rollback USR-B\n"
    assert history.reboot_marker.stat().st_mode & 0o777 == 0o600
    assert history.pending_reboot() == PendingReboot(PendingKind.ROLLBACK, "USR-B")
    history.clear_pending_reboot()
    history.clear_pending_reboot()  # twice is fine
    assert history.pending_reboot() is None


def test_a_number_that_does_not_parse_reads_as_unset(history: InstallHistory) -> None:
    history.prefs.set_str("installed-version", "2.0.0")
    history.prefs.set_str("installed-size", "lots")
    assert history.installed_update() == InstalledUpdate("2.0.0", 0, install_time=0)


def test_a_version_that_failed_to_boot_is_remembered_until_forgotten(history: InstallHistory) -> None:
    assert history.forget_failed_boot() is None
    history.remember_failed_boot("2.0.0")
    assert history.failed_boot_version() == "2.0.0"
    assert history.forget_failed_boot() == "2.0.0"
    assert history.failed_boot_version() is None
