"""coreos_common.files: whole-file replacement, in one piece or streamed, with the mode, the order of fsyncs and
renames, and the clean-up of the temporary file on every failure."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from coreos_common.files import NewFile, replace_file


def test_replace_file_gives_the_mode_whatever_the_umask(tmp_path: Path) -> None:
    target = tmp_path / "state"
    old_umask = os.umask(0o077)
    try:
        replace_file(target, b"one", 0o644)
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"one"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    replace_file(target, b"two", 0o600)
    assert target.read_bytes() == b"two"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["state"]


def test_durable_syncs_the_file_before_the_rename_and_the_directory_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "key"
    target.write_bytes(b"old")
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def recording_fsync(fd: int) -> None:
        events.append("fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file")
        real_fsync(fd)

    def recording_replace(src: str | Path, dst: str | Path) -> None:
        # Until the rename, readers see the whole old content; the new one is complete beside it.
        assert Path(src).parent == tmp_path and Path(src).read_bytes() not in (b"", target.read_bytes())
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    replace_file(target, b"new", durable=True)
    assert events == ["fsync-file", "rename", "fsync-dir"]
    events.clear()
    replace_file(target, b"newer")
    assert events == ["rename"]
    assert target.read_bytes() == b"newer"


def test_a_failed_write_keeps_the_old_content_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "key"
    target.write_bytes(b"old")

    def full_disk(fd: int, data: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(OSError, match="No space left"):
        replace_file(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["key"]


def test_a_new_file_left_uncommitted_is_removed(tmp_path: Path) -> None:
    with NewFile(tmp_path / "vmlinuz", suffix=".partial") as new:
        os.pwrite(new.fd, b"kernel", 4096)
        assert new.temporary.name.startswith(".vmlinuz.") and new.temporary.name.endswith(".partial")
        assert new.temporary.exists()
    assert os.listdir(tmp_path) == []
    new.close()  # twice is harmless


def test_a_new_file_streamed_from_another_directory(tmp_path: Path) -> None:
    incoming = tmp_path / ".incoming"
    incoming.mkdir()
    final = tmp_path / "app" / "1.0.0" / "update.gz"
    final.parent.mkdir(parents=True)
    with NewFile(final, 0o600, directory=incoming) as new:
        for piece in (b"a" * 70000, b"b" * 3):
            new.write(piece)
        assert new.temporary.parent == incoming
        assert new.temporary.read_bytes() == b"a" * 70000 + b"bbb"  # readable before the commit (verification)
        assert not final.exists()
        new.commit(durable=True)
    assert final.read_bytes() == b"a" * 70000 + b"bbb"
    assert stat.S_IMODE(final.stat().st_mode) == 0o600
    assert os.listdir(incoming) == []
