"""The demo's summary: each node as it sees itself (the slot it booted and its GPT flags, update-engine's status)
next to the update server's record of it, the time per node and per phase, every revision of the semaphore, the
Omaha events per node, the invariants, and the verdict (exit status 0 only when every node reached its end state,
the update server agrees, and nothing was broken).

Rules: the summary reads the fleet's records, the server's view read once more as it starts, the nodes' disks and
etcd's history of the semaphore key; a problem it finds (an invalid or over-full revision, a history or a view that
cannot be read) makes the verdict a failure, named.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from demo.scenario import NEW_VERSION, OLD_VERSION, SEMAPHORE_MAX, DemoOptions, Outcome, end_state_missing
from demo.story import BAD, GOOD, NOTE, Console, describe_event
from locksmithd.semaphore import SEMAPHORE_KEY, Semaphore, SemaphoreError
from sim.disks import usr_flags
from sim.fleet.fleet import Fleet
from sim.fleet.node import FleetNode
from update_engine import gpt


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def span(start: float | None, end: float | None) -> str:
    return seconds(end - start if start is not None and end is not None else None)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns, two spaces apart."""
    lines = [header, *rows]
    widths = [max(len(r[i]) for r in lines) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in lines]


def _first(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def _last(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


@dataclass
class Report:
    """The summary of one run; ``print`` returns the exit status."""

    out: Console
    fleet: Fleet
    options: DemoOptions
    expected: Mapping[str, Outcome]
    setup_done_at: float | None
    promoted_at: float | None  # when the release was promoted to the group's channel (coreupdate only)
    finished_at: float | None

    def missing(self, node: FleetNode) -> list[str]:
        return end_state_missing(node.history, self.expected[node.name], on_coreupdate=self.options.on_coreupdate)

    def booted_text(self, node: FleetNode) -> str:
        """The slot running now, its version and its GPT flags, as the node's disk says."""
        history = node.history
        boot = history.current_boot
        if boot is None:
            return "-"
        try:
            flags = usr_flags(node.disk)[boot.choice.label]
            marks = "successful" if flags.successful else f"tries={flags.tries}, not successful"
        except (gpt.GptError, OSError) as exc:
            marks = f"flags unreadable: {exc}"
        if any(b.failed for b in history.boots):
            marks += "; after a failed boot"
        return f"{boot.choice.label} {boot.choice.version or '?'} ({marks})"

    def server_text(self, node: FleetNode) -> str:
        server = node.history.server
        if server is None:
            return "not known"
        code = f" (error {server.error_code})" if server.error_code is not None else ""
        return f"{server.status} on {server.version}{code}"

    def node_rows(self) -> list[list[str]]:
        rows = []
        for node in self.fleet.nodes:
            history, expected = node.history, self.expected[node.name]
            status = (history.operation or "-").removeprefix("UPDATE_STATUS_")
            reached = not self.missing(node) and not history.problems
            row = [node.name, f"{OLD_VERSION} → {history.version}", self.booted_text(node), status]
            if self.options.on_coreupdate:
                row.append(self.server_text(node))
            rows.append([*row, expected.value if reached else f"NOT {expected.value}"])
        return rows

    def time_rows(self) -> list[list[str]]:
        rows = []
        for node in self.fleet.nodes:
            history = node.history
            boot = history.current_boot
            reboot_at = history.reboot_calls[0] if history.reboot_calls else None
            healthy_at = boot.marked_good_at if boot and len(history.boots) > 1 else None
            row = [node.name, str(len(history.reboot_calls))]
            if self.options.on_coreupdate:
                row += [span(self.promoted_at, history.granted_at), span(history.granted_at, history.installed_at)]
            else:
                row.append(span(history.first_check_at, history.installed_at))
            rows.append([*row, span(history.installed_at, history.lock_taken_at), span(reboot_at, healthy_at)])
        return rows

    def phase_line(self) -> str:
        histories = [node.history for node in self.fleet.nodes]
        checks = _first([h.first_check_at for h in histories])
        installed = _last([h.installed_at for h in histories])
        taken = _first([h.lock_taken_at for h in histories])
        released = _last([h.lock_released_at for h in histories])
        return " · ".join([
            f"set-up {seconds(self.setup_done_at)}",
            f"first check → last installed {span(checks, installed)}",
            f"rolling reboot (first lock → last release) {span(taken, released)}",
            f"total {seconds(self.finished_at)}",
        ])  # fmt: skip

    async def print(self) -> int:
        out, fleet, coreupdate = self.out, self.fleet, self.options.on_coreupdate
        view_failures = []
        if coreupdate and await fleet.server_view() is None:
            view_failures.append("could not read the update server's view of the nodes (see demo.log)")
        out.plain()
        out.plain("Summary: each node as it sees itself" + (", and as the update server sees it" if coreupdate
                                                            else ""), NOTE)  # fmt: skip
        header = ["node", "version", "booted (GPT)", "update_engine", *(["server"] if coreupdate else []), "result"]
        for line in table(header, self.node_rows()):
            out.plain("  " + line)
        out.plain()
        out.plain("Time per node:")
        started = ["waiting for a grant", "granted→installed"] if coreupdate else ["check→installed"]
        header = ["node", "reboots", *started, "waiting for the lock", "reboot→healthy"]
        for line in table(header, self.time_rows()):
            out.plain("  " + line)
        out.plain("Time per phase: " + self.phase_line())
        out.plain()
        history, history_failures = await self.semaphore_revisions()
        out.plain()
        out.plain("Events the update server recorded (→ the status each set):" if coreupdate
                  else "Events the Omaha dev server received:")  # fmt: skip
        for node in fleet.nodes:
            by_version: dict[str, list[str]] = {}
            for event in node.history.omaha_events:
                text = describe_event(event) + (f" → {event.status}" if event.status else "")
                by_version.setdefault(event.app_version, []).append(text)
            if not by_version:
                out.plain(f"  {node.name:<7} none")
            for i, (version, texts) in enumerate(by_version.items()):
                out.plain(f"  {node.name if i == 0 else '':<7} from {version}: " + "; ".join(texts))

        failures = [f"{n.name} lacks: {', '.join(m)}" for n in fleet.nodes if (m := self.missing(n))]
        failures += [f"{n.name}: {p}" for n in fleet.nodes for p in n.history.problems]
        failures += fleet.violations + history_failures + view_failures
        out.plain()
        if not fleet.too_many_down:
            out.plain(f"Never more than {SEMAPHORE_MAX} node down at once (max {SEMAPHORE_MAX}); "
                      f"at most {fleet.max_down} was.", GOOD)  # fmt: skip
        if history and not any("holders" in v for v in fleet.violations + history_failures):
            out.plain(f"No revision of the semaphore had more than {SEMAPHORE_MAX} holder.", GOOD)
        if coreupdate and not view_failures and not any("the server's" in f for f in failures):
            out.plain(f"The update server agrees: {self.server_agreement()}.", GOOD)
        if failures:
            out.plain("FAILED:", BAD)
            for failure in failures:
                out.plain(f"  {failure}", BAD)
            return 1
        out.plain(f"OK: {self.options.scenario} scenario completed in {out.elapsed():.1f}s.", GOOD)
        return 0

    def server_agreement(self) -> str:
        """What the server's records show, in words (when they agree with the nodes)."""
        back = [n.name for n in self.fleet.nodes if self.expected[n.name] is Outcome.ROLLED_BACK]
        if not back:
            return f"every instance Complete on {NEW_VERSION}"
        statuses = ", ".join(f"{name} {n.history.server.status if n.history.server else '?'} on {OLD_VERSION}"
                             for name in back for n in self.fleet.nodes if n.name == name)  # fmt: skip
        return f"{statuses}; every other instance Complete on {NEW_VERSION}"

    async def semaphore_revisions(self) -> tuple[list[tuple[int, bytes | None]], list[str]]:
        """Print every revision of the semaphore key; return them and what was wrong with them."""
        out = self.out
        failures: list[str] = []
        out.plain(f"Semaphore {SEMAPHORE_KEY}, every revision:")
        try:
            history = await self.fleet.semaphore_history(10.0)
        except Exception as exc:
            failures.append(f"could not read the semaphore's history: {exc}")
            return [], failures
        for revision, value in history:
            if value is None:
                out.plain(f"  rev {revision:>4}  deleted")
                continue
            try:
                sem = Semaphore.decode(value)
            except SemaphoreError as exc:
                failures.append(f"semaphore revision {revision} is invalid: {exc}")
                out.plain(f"  rev {revision:>4}  invalid: {exc}", BAD)
                continue
            names = ", ".join(sorted(self.fleet.node_name(h) for h in sem.holders)) or "-"
            out.plain(f"  rev {revision:>4}  max={sem.max}  holders: {names}")
            if len(sem.holders) > sem.max:
                failures.append(f"semaphore revision {revision} has {len(sem.holders)} holders, max {sem.max}")
        return history, failures

