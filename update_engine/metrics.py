"""update-engine's Prometheus metrics: which families it exports and how the engine's state becomes them.

Rules of this file:

* Names are ``update_engine_*``, each with a HELP line; the text format, the Unix socket and the textfile are
  ``coreos_common.metrics`` (no second exporter here).
* Gauges are read at scrape time from what the engine publishes (``UpdateAttempter.details()``) and remembers
  (the install history): a scrape never waits for a check and costs a few small file reads.
* Counters are what happened since the daemon started: the shell hands every finished check to :meth:`observe`.
* Nothing here changes the engine: metrics only read.

Families (labels in brackets):

==========================================================  =========================================================
``update_engine_status{status}``                            1 for the current D-Bus status, 0 for the seven others
``update_engine_last_check_timestamp_seconds``              when the server last answered a check (0: none yet)
``update_engine_last_attempt_timestamp_seconds``            when the last attempt ended (0: none since start)
``update_engine_last_attempt_result{result}``               1 for how it ended: no_update, updated, failed, deferred
``update_engine_last_attempt_error_code``                   its Omaha error code, 0 unless it failed or was deferred
``update_engine_last_update_timestamp_seconds``             when an update was last installed here (0: none recorded)
``update_engine_last_update_info{version}``                 1, labelled with the version last installed
``update_engine_booted_slot_info{slot}``                    1, labelled with the USR partition this boot runs
``update_engine_reboot_pending``                            1 while an update or a rollback waits for the reboot
``update_engine_rollback_detected``                         1 while a version that failed to boot here is held back
``update_engine_setup_warnings``                            how many things the set-up lacks (``-status --json``)
``update_engine_payload_downloaded_bytes_total``            payload bytes downloaded since start
``update_engine_apply_duration_seconds``                    download, write and verification of the last payload
``update_engine_checks_total{result}``                      finished attempts since start, by result
``update_engine_errors_total{code,name}``                   failed attempts since start, by Omaha error code
==========================================================  =========================================================
"""

from __future__ import annotations

import logging
from pathlib import Path

from coreos_common.metrics import MetricsExporter, Registry
from coreos_common.status import UpdateStatus
from update_engine.engine.attempter import CheckOutcome, UpdateAttempter
from update_engine.engine.machine import AttemptKind
from update_engine.errors import describe

log = logging.getLogger(__name__)

METRICS_SOCKET_NAME = "metrics.promsock"
RESULTS = tuple(kind.value for kind in AttemptKind)


class EngineMetrics:
    """The registry of one update-engine and the functions that fill it."""

    def __init__(self, attempter: UpdateAttempter, *, booted_slot: str | None) -> None:
        self._attempter = attempter
        self._booted_slot = booted_slot
        r = self.registry = Registry()
        self.status = r.gauge("update_engine_status", "1 for the current D-Bus status, 0 for the others",
                              ("status",))
        self.last_check = r.gauge("update_engine_last_check_timestamp_seconds",
                                  "When the update server last answered a check (Unix time; 0: none since start)")
        self.last_attempt_time = r.gauge("update_engine_last_attempt_timestamp_seconds",
                                         "When the last update attempt ended (Unix time; 0: none since start)")
        self.last_attempt_result = r.gauge("update_engine_last_attempt_result",
                                           "1 for how the last update attempt ended", ("result",))
        self.last_error_code = r.gauge("update_engine_last_attempt_error_code",
                                       "Omaha error code of the last attempt; 0 unless it failed or was deferred")
        self.last_update_time = r.gauge("update_engine_last_update_timestamp_seconds",
                                        "When an update was last installed on this node (Unix time; 0: none recorded)")
        self.last_update = r.gauge("update_engine_last_update_info", "The version last installed on this node",
                                   ("version",))
        self.booted = r.gauge("update_engine_booted_slot_info", "The USR partition this boot runs", ("slot",))
        self.reboot_pending = r.gauge("update_engine_reboot_pending",
                                      "1 while an installed update or a rollback waits for the reboot")
        self.rollback = r.gauge("update_engine_rollback_detected",
                                "1 while a version that failed to boot on this node is held back")
        self.warnings = r.gauge("update_engine_setup_warnings",
                                "How many things the set-up lacks (update_engine_client -status --json lists them)")
        self.downloaded = r.counter("update_engine_payload_downloaded_bytes_total",
                                    "Payload bytes downloaded since update-engine started")
        self.apply_duration = r.gauge("update_engine_apply_duration_seconds",
                                      "How long the last payload took to download, write and verify")
        self.checks = r.counter("update_engine_checks_total", "Update attempts since start, by how they ended",
                                ("result",))
        self.errors = r.counter("update_engine_errors_total",
                                "Failed or deferred update attempts since start, by Omaha error code", ("code", "name"))
        self.downloaded.inc(0)
        for result in RESULTS:
            self.checks.inc(0, result=result)
        r.add_collector(self._collect)

    def observe(self, outcome: CheckOutcome) -> None:
        """A check ended: count it, its error and what it downloaded."""
        self.downloaded.inc(outcome.downloaded_bytes)
        if outcome.apply_seconds is not None:
            self.apply_duration.set(outcome.apply_seconds)
        last = self._attempter.machine.last_attempt
        if last is not None:
            self.checks.inc(result=last.kind.value)
        if outcome.error_code is not None:
            self.errors.inc(code=str(outcome.error_code), name=describe(outcome.error_code))

    def _collect(self) -> None:
        details = self._attempter.details()
        status = details.status
        self.status.set_one_hot("status", (s.value for s in UpdateStatus), status.current_operation)
        self.last_check.set(status.last_checked_time)
        self.last_attempt_time.set(details.last_attempt_time)
        self.last_attempt_result.set_one_hot("result", RESULTS, details.last_attempt_result or None)
        self.last_error_code.set(details.last_error_code)
        self.reboot_pending.set(int(bool(details.pending_reboot)))
        self.warnings.set(len(details.warnings))
        history = self._attempter.history
        installed = history.installed_update()
        self.last_update_time.set(installed.install_time if installed is not None else 0)
        self.last_update.clear()
        if installed is not None:
            self.last_update.set(1, version=installed.version)
        self.rollback.set(int(history.failed_boot_version() is not None))
        self.booted.clear()
        if self._booted_slot is not None:
            self.booted.set(1, slot=self._booted_slot)


def exporter(metrics: EngineMetrics, *, socket_path: Path | None, textfile: Path | None) -> MetricsExporter:
    """The socket and textfile outputs of ``metrics`` (either may be None)."""
    return MetricsExporter(metrics.registry, socket_path=socket_path, textfile=textfile)
