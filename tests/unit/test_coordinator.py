"""The coordinator file: content, state changes, and the lock that keeps a second locksmithd out."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from locksmithd.coordinator import Coordinator, CoordinatorError, CoordinatorState, render


def _locked_by_someone(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_render_is_stable() -> None:
    assert render("etcd-lock", CoordinatorState.REBOOT_PLANNED) == (
        "NAME=locksmithd\nSTRATEGY=etcd-lock\nSTATE=reboot-planned\n"
    )


def test_lifecycle(tmp_path: Path) -> None:
    coordinator = Coordinator(tmp_path, "reboot")
    coordinator.acquire()
    try:
        path = tmp_path / "run/update-engine/coordinator.conf"
        assert path.read_text() == "NAME=locksmithd\nSTRATEGY=reboot\nSTATE=starting\n"
        assert oct(path.stat().st_mode & 0o777) == "0o644"
        for state in (CoordinatorState.RUNNING, CoordinatorState.REBOOT_PLANNED, CoordinatorState.REBOOTING):
            coordinator.set_state(state)
            assert path.read_text().splitlines()[2] == f"STATE={state.value}"
            # Both the lock file and the current content file stay locked after each rename.
            assert _locked_by_someone(path)
            assert _locked_by_someone(tmp_path / "run/update-engine/coordinator.conf.lock")
        assert sorted(p.name for p in path.parent.iterdir()) == ["coordinator.conf", "coordinator.conf.lock"]
    finally:
        coordinator.release()
    assert not _locked_by_someone(tmp_path / "run/update-engine/coordinator.conf.lock")


def test_second_instance_is_refused(tmp_path: Path) -> None:
    first = Coordinator(tmp_path, "etcd-lock")
    first.acquire()
    try:
        second = Coordinator(tmp_path, "reboot")
        with pytest.raises(CoordinatorError, match="another locksmithd"):
            second.acquire()
        # The refused instance did not touch the file.
        assert "STRATEGY=etcd-lock" in (tmp_path / "run/update-engine/coordinator.conf").read_text()
    finally:
        first.release()
    after = Coordinator(tmp_path, "reboot")
    after.acquire()
    after.release()


def test_unwritable_directory_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "run").write_text("not a directory")
    with pytest.raises(CoordinatorError, match="unable to become 'update coordinator'"):
        Coordinator(tmp_path, "reboot").acquire()
