"""pytest fixtures for real etcd members: ``etcd_single`` (one member) and ``etcd_cluster3`` (three members).

The cluster class lives in ``tests.helpers.etcd_cluster`` so benchmarks can use it without pytest. Use the
fixtures from a test module with ``from tests.helpers.etcd import etcd_single, etcd_cluster3  # noqa: F401``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.helpers.etcd_cluster import EtcdCluster, ServerTls, free_port

__all__ = ["EtcdCluster", "ServerTls", "etcd_cluster3", "etcd_single", "free_port", "start_cluster"]


def start_cluster(size: int, workdir: Path, tls: ServerTls | None = None) -> EtcdCluster:
    """Start ``size`` members once etcd is known to be installed; the caller ``stop_all()``s in a finally."""
    require_tool("etcd")
    return EtcdCluster(size, workdir, tls=tls).start_all()


@pytest.fixture
def etcd_single(tmp_path: Path) -> Iterator[EtcdCluster]:
    """One etcd member on a free loopback port, stopped after the test."""
    cluster = start_cluster(1, tmp_path / "etcd")
    try:
        yield cluster
    finally:
        cluster.stop_all()


@pytest.fixture
def etcd_cluster3(tmp_path: Path) -> Iterator[EtcdCluster]:
    """Three etcd members (one Raft cluster) on free loopback ports, stopped after the test."""
    cluster = start_cluster(3, tmp_path / "etcd3")
    try:
        yield cluster
    finally:
        cluster.stop_all()
