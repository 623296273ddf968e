"""The node's identities: machine id and boot id, read under a root, with errors that name the file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from coreos_common.identity import IdentityError, read_boot_id, read_hostname, read_machine_id
from tests.unit.test_updateconf import write


def test_machine_id_is_lowercased_for_every_program(tmp_path: Path) -> None:
    write(tmp_path, "etc/machine-id", "0123456789abcdef0123456789ABCDEF\n")
    assert read_machine_id(tmp_path) == "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize(
    "content", ["", "uninitialized\n", "0123456789abcdef", "g" * 32, "{" + "a" * 32 + "}"]
)
def test_bad_machine_id_is_a_clear_error(tmp_path: Path, content: str) -> None:
    path = write(tmp_path, "etc/machine-id", content)
    with pytest.raises(IdentityError) as info:
        read_machine_id(tmp_path)
    assert str(path) in info.value.message and "32 hexadecimal" in info.value.message


def test_missing_machine_id_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="machine-id"):
        read_machine_id(tmp_path)


def test_boot_id(tmp_path: Path) -> None:
    write(tmp_path, "proc/sys/kernel/random/boot_id", "6c1f8a2e-3b4d-4e5f-8a9b-0c1d2e3f4a5b\n")
    assert read_boot_id(tmp_path) == "6c1f8a2e-3b4d-4e5f-8a9b-0c1d2e3f4a5b"
    write(tmp_path, "proc/sys/kernel/random/boot_id", "not-a-uuid\n")
    with pytest.raises(IdentityError, match="not a boot id"):
        read_boot_id(tmp_path)


def test_real_boot_id_if_available() -> None:
    if not Path("/proc/sys/kernel/random/boot_id").exists():
        pytest.skip("no /proc")
    assert len(read_boot_id(Path("/"))) == 36


def test_hostname_is_the_kernels_node_name() -> None:
    assert read_hostname() == os.uname().nodename
