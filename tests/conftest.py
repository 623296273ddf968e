"""Shared fixtures: every test works under its own temporary root."""

from __future__ import annotations

import shutil

import pytest


def require_tool(name: str) -> str:
    """Path of an external tool the test needs; fails (not skips) so a missing install step is noticed."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")
    if path is None:
        pytest.fail(f"{name} is not installed; .ci/run installs it")
    return path


@pytest.fixture(scope="session")
def postgres_server():  # type: ignore[no-untyped-def]
    """One private PostgreSQL server for the whole run (each test makes its own database)."""
    from tests.helpers.postgres import PostgresServer

    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.close()
