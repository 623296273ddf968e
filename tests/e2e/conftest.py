"""Fixtures of the end-to-end tests: a signing key pair and a signed release, made once per module."""

from __future__ import annotations

import pytest

from tests.e2e.test_once import Keys, Release, build_release
from update_engine.payload.generate import make_key_pair


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    d = tmp_path_factory.mktemp("keys")
    make_key_pair(d / "key.pem", d / "key.pub.pem")
    return Keys(d / "key.pem", d / "key.pub.pem")


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Release:
    return build_release(tmp_path_factory.mktemp("release"), keys)
