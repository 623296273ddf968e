"""locksmithd's Prometheus metrics: what they are, and how the daemon's state becomes their values.

Rules: every family is declared here, once, with its HELP text; names start with ``locksmithd_``; times are Unix
timestamps in seconds (``*_timestamp_seconds``), a sample that has no value now (no lock held, no place in line
known) is left out rather than given a made-up one. The registry and text format are ``coreos_common.metrics``
(written by hand, so that metrics cost an idle daemon no extra library); the daemon calls the ``note_*`` methods
as things happen, and values that depend on the time (is a window open, when does the next open) are computed
at each scrape.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime

from coreos_common.metrics import Registry
from coreos_common.window import WindowList
from locksmithd import __version__
from locksmithd.backends import LockPhase
from locksmithd.reboot_path import Phase, PhaseName, WaitingForLock


def _timestamp(moment: datetime) -> float:
    return moment.timestamp()


class DaemonMetrics:
    """The families and the daemon's hooks into them."""

    def __init__(
        self, *, strategy: str, group: str, windows: WindowList | None, now: Callable[[], datetime],
        ignored_signals: Callable[[], Mapping[str, int]],
    ) -> None:
        self.registry = registry = Registry()
        self._windows = windows
        self._now = now
        self._ignored_signals = ignored_signals
        registry.gauge(
            "locksmithd_info", "locksmithd's version, reboot strategy and lock group (always 1).",
            ("version", "strategy", "group"),
        ).set(1, version=__version__, strategy=strategy, group=group)
        self.reboot_needed = registry.gauge(
            "locksmithd_reboot_needed", "1 when update-engine has installed an update that needs a reboot.")
        self.phase = registry.gauge("locksmithd_phase", "The reboot path's current phase (1 for the current one).",
                                    ("phase",))
        self.phase_since = registry.gauge(
            "locksmithd_phase_since_timestamp_seconds", "When the current phase began.")
        self.lock_held = registry.gauge(
            "locksmithd_lock_held", "1 while this node holds a slot of the reboot lock that it took.")
        self.lock_held_since = registry.gauge(
            "locksmithd_lock_held_since_timestamp_seconds", "When this node took the slot it holds.")
        self.lock_waiting = registry.gauge(
            "locksmithd_lock_waiting", "1 while this node waits for a slot of the reboot lock.")
        self.lock_waiting_since = registry.gauge(
            "locksmithd_lock_waiting_since_timestamp_seconds", "When this node began to wait for a slot.")
        self.lock_position = registry.gauge(
            "locksmithd_lock_queue_position",
            "This node's place in the waiting line (1: next), when the lock service keeps a line.")
        self.window_open = registry.gauge(
            "locksmithd_reboot_window_open", "1 when a reboot window is open now (always 1 without windows).")
        self.window_next = registry.gauge(
            "locksmithd_reboot_window_next_opening_timestamp_seconds",
            "When the next reboot window opens (absent without windows).")
        self.reboot_requests = registry.counter(
            "locksmithd_reboot_requests_total", "Reboot requests to logind, by its answer.", ("result",))
        self.backend_errors = registry.counter(
            "locksmithd_lock_backend_errors_total", "Failures of the lock service (etcd, FleetLock), by operation.",
            ("operation",))
        self.hook_runs = registry.counter(
            "locksmithd_hook_runs_total", "Runs of a hook directory, by directory and result.", ("hooks", "result"))
        self.ignored_signals = registry.counter(
            "locksmithd_status_signals_ignored_total",
            "StatusUpdate signals dropped: from a sender that does not own com.coreos.update1, or malformed.",
            ("reason",))
        self.lock_held.set(0)
        self.lock_waiting.set(0)
        self.reboot_needed.set(0)
        for result in ("accepted", "refused"):
            self.reboot_requests.inc(0, result=result)
        for operation in ("acquire", "release"):
            self.backend_errors.inc(0, operation=operation)
        registry.add_collector(self._collect)

    # -- what the daemon tells ---------------------------------------------------------------------------------

    def note_phase(self, phase: Phase, reboot_needed: bool) -> None:
        self.phase.set_one_hot("phase", [name.value for name in PhaseName], phase.name.value)
        self.phase_since.set(_timestamp(phase.since))
        self.reboot_needed.set(1 if reboot_needed else 0)
        waiting = isinstance(phase, WaitingForLock) and (phase.progress is None
                                                         or phase.progress.phase is not LockPhase.HELD)
        self.lock_waiting.set(1 if waiting else 0)
        self.lock_waiting_since.clear()
        self.lock_position.clear()
        if isinstance(phase, WaitingForLock) and waiting:
            self.lock_waiting_since.set(_timestamp(phase.since))
            if phase.progress is not None and phase.progress.position is not None:
                self.lock_position.set(phase.progress.position)

    def note_lock_held(self, held: bool, now: datetime) -> None:
        if held and self.lock_held.samples.get(()) == 1:
            return  # asked again while holding: still held since the first time
        self.lock_held.set(1 if held else 0)
        self.lock_held_since.clear()
        if held:
            self.lock_held_since.set(_timestamp(now))

    def note_slot_read(self, held: bool, since: float | None) -> None:
        """What the lock service said at start-up: a slot taken before the reboot counts from the start, with
        the time it was taken when the service recorded one (no sample otherwise)."""
        self.lock_held.set(1 if held else 0)
        self.lock_held_since.clear()
        if held and since is not None:
            self.lock_held_since.set(since)

    def note_reboot_request(self, accepted: bool) -> None:
        self.reboot_requests.inc(result="accepted" if accepted else "refused")

    def note_backend_error(self, operation: str) -> None:
        self.backend_errors.inc(operation=operation)

    def note_hooks(self, hooks: str, passed: bool) -> None:
        self.hook_runs.inc(hooks=hooks, result="passed" if passed else "failed")

    # -- computed at each scrape -------------------------------------------------------------------------------

    def _collect(self) -> None:
        for reason, count in self._ignored_signals().items():
            self.ignored_signals.samples[(reason,)] = float(count)
        windows = self._windows
        if windows is None:
            self.window_open.set(1)
            self.window_next.clear()
            return
        now = self._now()
        self.window_open.set(1 if windows.contains(now) else 0)
        opening = windows.next_opening(now)
        if opening is not None:
            self.window_next.set(_timestamp(opening[0]))
