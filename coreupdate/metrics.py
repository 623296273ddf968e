"""The server's Prometheus metrics (``/metrics``), on ``prometheus_client``: it brings histograms for request
latency, which the node daemons' small text writer (``coreos_common.metrics``) does not need.

Counters and histograms are updated by the handlers; the instance gauges (instances per group, version and
status) are read from the database when scraped, at most every ``INSTANCE_GAUGE_TTL`` seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class InstanceCollector:
    """``coreupdate_instances{app,group,version,status}`` from a callable returning (labels, count) rows."""

    def __init__(self, rows: Callable[[], Iterable[tuple[str, str, str, str, int]]]) -> None:
        self._rows = rows

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "coreupdate_instances", "Instances per application, group, version and status",
            labels=["app", "group", "version", "status"],
        )
        for app, group, version, status, count in self._rows():
            family.add_metric([app, group, version, status], count)
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.omaha_requests = Counter(
            "coreupdate_omaha_requests", "Omaha requests answered, by outcome", ["outcome"], registry=self.registry
        )
        self.omaha_refused = Counter(
            "coreupdate_omaha_refused_requests", "Omaha requests refused as malformed, oversized or unanswerable",
            ["reason"], registry=self.registry,
        )
        self.update_checks = Counter(
            "coreupdate_update_checks", "Update checks by decision (grant, or the refusal's reason)", ["decision"],
            registry=self.registry,
        )
        self.grants = Counter(
            "coreupdate_grants", "Updates granted, by group and version", ["group", "version"], registry=self.registry
        )
        self.errors = Counter(
            "coreupdate_instance_errors", "Failure events reported by instances, by error code", ["code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "coreupdate_request_duration_seconds", "Request latency by endpoint", ["endpoint"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry,
        )
        self.dropped_writes = Counter(
            "coreupdate_writebehind_dropped", "Check-ins or events dropped while the database was away",
            registry=self.registry,
        )

    def add_instance_collector(self, rows: Callable[[], Iterable[tuple[str, str, str, str, int]]]) -> None:
        self.registry.register(InstanceCollector(rows))

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))

