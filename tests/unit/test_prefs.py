"""The prefs directory: file-per-key layout, atomic writes, crash leftovers, key validation."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from update_engine.engine.history import (
    BACKOFF_EXPIRY_TIME,
    FULL_RESPONSE,
    PAYLOAD_ATTEMPT_NUMBER,
    PREVIOUS_VERSION,
    UPDATE_STATE_NEXT_DATA_OFFSET,
)
from update_engine.prefs import Prefs, PrefsError


@pytest.fixture
def prefs(tmp_path: Path) -> Prefs:
    return Prefs(tmp_path / "var/lib/update_engine/prefs")


def test_missing_keys_read_as_none(prefs: Prefs) -> None:
    assert prefs.get_str(PREVIOUS_VERSION) is None
    assert prefs.get_int(PAYLOAD_ATTEMPT_NUMBER) is None
    assert not prefs.exists(PREVIOUS_VERSION)
    assert not prefs.root.exists()  # reading does not create the directory


def test_layout_is_one_file_per_key_without_newline(prefs: Prefs) -> None:
    prefs.set_str(PREVIOUS_VERSION, "3815.2.5")
    prefs.set_int(UPDATE_STATE_NEXT_DATA_OFFSET, -1)
    prefs.set_int(BACKOFF_EXPIRY_TIME, 1_700_000_000)
    assert (prefs.root / "previous-version").read_bytes() == b"3815.2.5"
    assert (prefs.root / "update-state-next-data-offset").read_bytes() == b"-1"
    assert (prefs.root / "backoff-expiry-time").read_bytes() == b"1700000000"
    assert prefs.get_str(PREVIOUS_VERSION) == "3815.2.5"
    assert prefs.get_int(UPDATE_STATE_NEXT_DATA_OFFSET) == -1
    assert prefs.get_int(BACKOFF_EXPIRY_TIME) == 1_700_000_000
    assert sorted(os.listdir(prefs.root)) == [
        "backoff-expiry-time",
        "previous-version",
        "update-state-next-data-offset",
    ]


def test_empty_string_is_distinct_from_missing(prefs: Prefs) -> None:
    prefs.set_str(PREVIOUS_VERSION, "")
    assert prefs.exists(PREVIOUS_VERSION)
    assert prefs.get_str(PREVIOUS_VERSION) == ""


def test_overwrite_delete_and_bytes(prefs: Prefs) -> None:
    prefs.set_str(FULL_RESPONSE, "<response>old</response>")
    prefs.set_str(FULL_RESPONSE, "<response>new</response>")
    assert prefs.get_str(FULL_RESPONSE) == "<response>new</response>"
    prefs.set_bytes("update-state-sha-256-context", bytes(range(256)) * 4)
    assert prefs.get_bytes("update-state-sha-256-context") == bytes(range(256)) * 4
    prefs.delete(FULL_RESPONSE)
    assert not prefs.exists(FULL_RESPONSE)
    prefs.delete(FULL_RESPONSE)  # deleting a missing key is fine


def test_directory_is_created_private(prefs: Prefs) -> None:
    old_umask = os.umask(0o022)
    try:
        prefs.set_int(PAYLOAD_ATTEMPT_NUMBER, 1)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(prefs.root.stat().st_mode) == 0o700
    assert stat.S_IMODE((prefs.root / PAYLOAD_ATTEMPT_NUMBER).stat().st_mode) == 0o600


@pytest.mark.parametrize("content", [b"abc", b"", b"1.5", b"1_000", b"12abc", b"99999999999999999999999"])
def test_corrupt_int_reads_as_missing_with_warning(
    prefs: Prefs, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    prefs.root.mkdir(parents=True)
    (prefs.root / PAYLOAD_ATTEMPT_NUMBER).write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="update_engine.prefs"):
        assert prefs.get_int(PAYLOAD_ATTEMPT_NUMBER) is None
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert PAYLOAD_ATTEMPT_NUMBER in record.getMessage()


def test_int_written_by_hand_with_newline_is_read(prefs: Prefs) -> None:
    prefs.root.mkdir(parents=True)
    (prefs.root / PAYLOAD_ATTEMPT_NUMBER).write_text("3\n")
    assert prefs.get_int(PAYLOAD_ATTEMPT_NUMBER) == 3


@pytest.mark.parametrize("key", ["", ".hidden", "../etc/passwd", "a/b", "with space", "é", "a.tmp", "x\n"])
def test_invalid_keys_are_refused(prefs: Prefs, key: str) -> None:
    for call in (
        lambda: prefs.get_str(key),
        lambda: prefs.set_str(key, "v"),
        lambda: prefs.set_int(key, 1),
        lambda: prefs.delete(key),
        lambda: prefs.exists(key),
    ):
        with pytest.raises(ValueError, match="invalid pref key"):
            call()
    assert not prefs.root.exists()


def test_stale_temp_file_from_a_crash_is_ignored_then_cleaned(prefs: Prefs) -> None:
    # A crash between writing the temp file and renaming it leaves the old value plus a temp file.
    prefs.set_str(PREVIOUS_VERSION, "old")
    stale = prefs.root / ".previous-version.a1b2c3.tmp"
    stale.write_text("torn ne")
    fresh = Prefs(prefs.root)  # the daemon restarts
    assert fresh.get_str(PREVIOUS_VERSION) == "old"
    assert stale.exists()
    fresh.set_str(PAYLOAD_ATTEMPT_NUMBER, "1")  # the first write of the new process cleans up
    assert not stale.exists()
    assert sorted(os.listdir(prefs.root)) == [PAYLOAD_ATTEMPT_NUMBER, PREVIOUS_VERSION]


def test_discard_stale_temp_files_explicitly(prefs: Prefs) -> None:
    assert prefs.discard_stale_temp_files() == 0  # no directory yet
    prefs.set_int(PAYLOAD_ATTEMPT_NUMBER, 2)
    (prefs.root / ".full-response.x.tmp").write_text("partial")
    (prefs.root / ".keep-me").write_text("not ours")
    assert prefs.discard_stale_temp_files() == 1
    assert sorted(os.listdir(prefs.root)) == [".keep-me", PAYLOAD_ATTEMPT_NUMBER]


def test_failed_write_keeps_the_old_value_and_leaves_no_temp_file(
    prefs: Prefs, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefs.set_str(PREVIOUS_VERSION, "old")

    def failing_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(PrefsError, match=r"previous-version.*No space left"):
        prefs.set_str(PREVIOUS_VERSION, "new")
    monkeypatch.undo()
    assert prefs.get_str(PREVIOUS_VERSION) == "old"
    assert os.listdir(prefs.root) == [PREVIOUS_VERSION]


def test_write_is_a_rename_of_a_synced_temp_file(prefs: Prefs, monkeypatch: pytest.MonkeyPatch) -> None:
    prefs.set_str(PREVIOUS_VERSION, "old")
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def recording_fsync(fd: int) -> None:
        events.append("fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file")
        real_fsync(fd)

    def recording_replace(src: str, dst: Path) -> None:
        # Until the rename, readers still see the complete old value.
        assert Prefs(prefs.root).get_str(PREVIOUS_VERSION) == "old"
        assert Path(src).parent == prefs.root and Path(src).read_text() == "new"
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    prefs.set_str(PREVIOUS_VERSION, "new")
    assert events == ["fsync-file", "rename", "fsync-dir"]
    assert prefs.get_str(PREVIOUS_VERSION) == "new"


def test_unwritable_location_is_a_prefs_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    broken = Prefs(tmp_path / "file" / "prefs")
    with pytest.raises(PrefsError, match="prefs directory"):
        broken.set_int(PAYLOAD_ATTEMPT_NUMBER, 1)


def test_directory_in_place_of_a_key_is_a_prefs_error(prefs: Prefs) -> None:
    (prefs.root / PREVIOUS_VERSION).mkdir(parents=True)
    with pytest.raises(PrefsError, match="previous-version"):
        prefs.get_str(PREVIOUS_VERSION)
    assert not prefs.exists(PREVIOUS_VERSION)
