"""Shared fixtures: every test works under its own temporary root.

The fixtures over the simulation harness (:mod:`sim`) live in ``tests/fixtures/`` and are registered here for
every test: ask for them by name (``private_bus``, ``login1``, ``etcd_single``, ``etcd_cluster3``, ``usr_disk``,
``keys``, ``other_keys``, ``postgres_server``, ``chromium``).
"""

from __future__ import annotations

import shutil

import pytest

pytest_plugins = [
    "tests.fixtures.browser",
    "tests.fixtures.bus",
    "tests.fixtures.disks",
    "tests.fixtures.etcd",
    "tests.fixtures.payload",
    "tests.fixtures.postgres",
    "tests.fixtures.standins",
]


def require_tool(name: str) -> str:
    """Path of an external tool the test needs; fails (not skips) so a missing install step is noticed."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")
    if path is None:
        pytest.fail(f"{name} is not installed; .ci/run installs it")
    return path

