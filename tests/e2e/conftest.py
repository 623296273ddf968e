"""Fixtures of the end-to-end tests: a signed release, made once per module with the trusted ``keys``."""

from __future__ import annotations

import pytest

from sim.payload import Keys, Release, build_release


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Release:
    return build_release(tmp_path_factory.mktemp("release"), keys)
