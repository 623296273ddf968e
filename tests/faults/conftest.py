"""Fault-injection tests: the ``faults`` marker and the end-of-session table of trial counts."""

from __future__ import annotations

import pytest
from _pytest.terminal import TerminalReporter

from sim.payload import Keys, Release, build_release
from tests.faults import figures
from tests.faults.support import KIB


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "faults: fault injection (kill -9, power cut, corrupt and hostile input, etcd outages, fuzzing)"
    )


def pytest_terminal_summary(terminalreporter: TerminalReporter, exitstatus: int, config: pytest.Config) -> None:
    lines = figures.table()
    if not lines:
        return
    terminalreporter.section("fault injection figures")
    for line in lines:
        terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def small_release(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Release:
    """A 256 KiB image in 64 KiB operations and a 9000-byte kernel: a payload of about 140 KiB."""
    return build_release(tmp_path_factory.mktemp("small-release"), keys, image_size=256 * KIB, chunk_size=64 * KIB,
                         kernel_size=9000, seed=1)
