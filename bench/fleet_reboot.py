"""Fleet reboot benchmark: N simulated nodes take turns through the etcd reboot semaphore.

Starts a real single-member etcd on 127.0.0.1, then runs the same fleet in each mode, one client per node:

* ``watch``: the real EtcdLockBackend: waiters queue in the waiting line and only the front few of them
  watch the key (this project's behaviour);
* ``crowd``: the real EtcdLockBackend started without the line, so every waiter watches the key (what a
  node does when etcd refuses the line's leases);
* ``poll``: locksmith's way, written here from the same etcd operations: try, and while the semaphore is
  full sleep with locksmith's backoff (10 s doubling to 5 min) and try again.

Each node acquires a slot, "reboots" (sleeps ``--reboot-s``), and releases. Real durations are scaled down by
``scale = reboot_s / real_reboot_s`` (default 0.2 s standing for a 60 s reboot, so 1/300): the polling
backoff 10 s → 5 min becomes 33 ms → 1 s, and retries after failures use the same scaled backoff. The hand-off
delay (a few hundred ms on a real node) is network-scale, not reboot-scale, and is set with
``--handoff-jitter``.

A real fleet runs one node per machine; here the nodes are spread over ``--procs`` worker processes (each
node keeps its own client, HTTP connections and watches, as on a real node), which start
together at a time the parent gives them and report when each node took and released its slot
(``time.monotonic`` is system-wide on Linux, so the times of all workers compare).

Prints per mode: total time against the ideal ``ceil(N / max) × reboot_s``, hand-off latency (release of a
slot → the next node holding it) p50/p99, HTTP requests, lost compare-and-swaps, watch events received,
writes, and violations found by reading every revision of the key from etcd's history (more holders than
``max``, or a value that is not a valid semaphore), and how many nodes watched the semaphore key at
once (sampled every 0.1 s: peak, and mean over the samples with anyone waiting). Then the CPU seconds etcd
and the simulator used against what the machine had (cores × wall time): when that is near 100 %, the
machine, not the protocol, sets the pace. These are figures to compare, not pass/fail checks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coreos_common.backoff import BackoffPolicy
from locksmithd.backends import LockBackendUnavailable
from locksmithd.backends.etcd import ops
from locksmithd.backends.etcd.backend import EtcdLockBackend
from locksmithd.backends.etcd.gateway import EtcdStats
from locksmithd.backends.etcd.sync import SyncEtcdClient
from locksmithd.backends.etcd.waiter import AtFront, Following, Held, Tuning
from locksmithd.backends.etcd_settings import EtcdSettings
from locksmithd.semaphore import Semaphore, SemaphoreError
from sim.etcd import EtcdCluster

# Seconds between "every worker is ready" and the common start, so that all of them are asleep waiting for it.
START_MARGIN = 0.5


@dataclass
class WorkerReport:
    """What one worker process measured; times are ``time.monotonic`` values."""

    acquired: list[float] = field(default_factory=list)
    released: list[float] = field(default_factory=list)
    release_calls: list[float] = field(default_factory=list)  # how long each release call took
    requests: int = 0
    conflicts: int = 0
    watch_events: int = 0
    release_retries: int = 0
    semaphore_watches: int = 0
    line_watches: int = 0
    # Per sample (every 0.1 s): nodes following the semaphore key, and nodes waiting at all.
    following: list[int] = field(default_factory=list)
    waiting: list[int] = field(default_factory=list)
    cpu: float = 0.0
    threads: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass
class RunResult:
    mode: str
    nodes: int
    max_slots: int
    procs: int
    total: float
    ideal: float
    handoffs: list[float]
    release_calls: list[float]
    writes: int
    requests: int
    conflicts: int
    watch_events: int
    release_retries: int
    semaphore_watches: int
    line_watches: int
    following_peak: int
    following_mean: float
    over_max: int
    broken_invariant: int
    etcd_cpu: float
    sim_cpu: float
    machine_cpu: float
    threads: int
    errors: list[str]


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))
    return ordered[index]


def machine_busy() -> float:
    """CPU seconds the whole machine has spent busy (every process, all cores), from /proc/stat."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (from /proc)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- worker process ------------------------------------------------------------------------------------------


async def poll_for_slot(backend: EtcdLockBackend, machine_id: str, backoff: BackoffPolicy) -> None:
    """locksmith's wait: read, try; while full, sleep the next backoff delay and try again."""
    client = backend.client
    delays = backoff.delays()
    while True:
        start = await client.run(ops.read(client.session, client.keys))
        attempt = await client.run(ops.try_take(client.session, client.keys, machine_id, start))
        if attempt.acquired:
            return
        await asyncio.sleep(next(delays))


async def run_nodes(config: dict[str, Any], start_at: float) -> WorkerReport:
    """Run this worker's share of the fleet, every node starting at ``start_at``."""
    indices: list[int] = config["indices"]
    settings = EtcdSettings(endpoints=tuple(config["endpoints"]), group=config["group"])
    scale = config["reboot_s"] / config["real_reboot_s"]
    backoff = BackoffPolicy(10.0 * scale, 300.0 * scale)
    tuning = Tuning(config["handoff_jitter"], config["max_handoff_jitter"], line=config["mode"] == "watch")
    report = WorkerReport()
    stats = [EtcdStats() for _ in indices]
    backends = [EtcdLockBackend(settings, tuning=tuning, stats=counters) for counters in stats]

    async def node(i: int, backend: EtcdLockBackend) -> None:
        machine_id = f"node-{i:05d}"
        try:
            # Like the strategy: a failure of etcd is retried with the backoff.
            for delay in backoff.delays():
                try:
                    if config["mode"] == "poll":
                        await poll_for_slot(backend, machine_id, backoff)
                    else:
                        await backend.acquire(machine_id)
                    break
                except LockBackendUnavailable:
                    await asyncio.sleep(delay)
            report.acquired.append(time.monotonic())
            await asyncio.sleep(config["reboot_s"])
            asked = time.monotonic()
            # Like the daemon's unlock loop: a release that etcd could not take now is retried with backoff.
            for delay in backoff.delays():
                try:
                    await backend.release(machine_id)
                    break
                except LockBackendUnavailable as exc:
                    report.release_retries += 1
                    if report.release_retries <= 3:
                        logging.getLogger("fleet").error("%s: release failed (%s); retrying", machine_id, exc)
                    await asyncio.sleep(delay)
            report.released.append(time.monotonic())
            report.release_calls.append(report.released[-1] - asked)
        except Exception as exc:  # reported to the parent, which counts it against the run
            report.errors.append(f"{machine_id}: {exc}")

    async def sample() -> None:
        while True:
            report.threads = max(report.threads, threading.active_count())
            report.following.append(sum(1 for b in backends if isinstance(b.phase, AtFront | Following)))
            report.waiting.append(sum(1 for b in backends if b.phase is not None and not isinstance(b.phase, Held)))
            await asyncio.sleep(0.1)

    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    cpu_start = time.process_time()
    sampler = asyncio.create_task(sample())
    await asyncio.gather(*(node(i, b) for i, b in zip(indices, backends, strict=True)))
    sampler.cancel()
    report.cpu = time.process_time() - cpu_start
    for counters in stats:
        report.requests += counters.requests
        report.conflicts += counters.conflicts
        report.watch_events += counters.watch_events
        report.semaphore_watches += counters.semaphore_watches
        report.line_watches += counters.line_watches
    await asyncio.gather(*(b.close() for b in backends))
    return report


def worker_main(config_json: str) -> int:
    """Worker: say ``ready``, read the common start time from stdin, run, print the report as JSON."""
    config = json.loads(config_json)
    logging.basicConfig(level=logging.ERROR, format="%(asctime)s %(levelname)s %(message)s")
    print("ready", flush=True)
    line = sys.stdin.readline()
    if not line:
        return 1
    report = asyncio.run(run_nodes(config, float(line)))
    print(json.dumps(report.__dict__), flush=True)
    return 0


# -- parent --------------------------------------------------------------------------------------------------


def run_workers(
    cluster: EtcdCluster, args: argparse.Namespace, mode: str, group: str
) -> tuple[list[WorkerReport], float, float, float, float]:
    """Start the workers, release them together.

    Returns their reports, the start and end times, the CPU seconds of etcd and of the whole machine.
    """
    shares = [list(range(p, args.nodes, args.procs)) for p in range(args.procs)]
    shares = [share for share in shares if share]
    workers: list[subprocess.Popen[str]] = []
    try:
        for share in shares:
            config = {
                "endpoints": cluster.endpoints,
                "group": group,
                "mode": mode,
                "indices": share,
                "reboot_s": args.reboot_s,
                "real_reboot_s": args.real_reboot_s,
                "handoff_jitter": args.handoff_jitter,
                "max_handoff_jitter": args.max_handoff_jitter,
            }
            workers.append(
                subprocess.Popen(
                    [sys.executable, __file__, "--worker", json.dumps(config)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        for worker in workers:
            assert worker.stdout is not None
            if worker.stdout.readline().strip() != "ready":
                raise RuntimeError(f"worker {worker.pid} did not start")
        etcd_pid = cluster.members[0].process.pid  # type: ignore[union-attr]
        start = time.monotonic() + START_MARGIN
        etcd_cpu_start = process_cpu(etcd_pid)
        machine_start = machine_busy()
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write(f"{start!r}\n")
            worker.stdin.close()
        reports = []
        for worker in workers:
            assert worker.stdout is not None
            out = worker.stdout.read()
            if worker.wait() != 0 or not out.strip():
                raise RuntimeError(f"worker {worker.pid} failed (exit {worker.returncode})")
            reports.append(WorkerReport(**json.loads(out)))
        etcd_cpu = process_cpu(etcd_pid) - etcd_cpu_start
        machine = machine_busy() - machine_start
        end = max(r.released[-1] if r.released else start for r in reports)
        return reports, start, end, etcd_cpu, machine
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()


def run_fleet(cluster: EtcdCluster, args: argparse.Namespace, mode: str) -> RunResult:
    group = f"bench-{mode}"
    settings = EtcdSettings(endpoints=tuple(cluster.endpoints), group=group)
    store = SyncEtcdClient(settings)
    store.run(ops.apply(store.session, store.keys, lambda sem: sem.set_max(args.max)))
    store.close()

    reports, start, end, etcd_cpu, machine_cpu = run_workers(cluster, args, mode, group)
    acquired = sorted(t for r in reports for t in r.acquired)
    released = sorted(t for r in reports for t in r.released)
    # The k-th acquisition after the first `max` could only happen once the (k - max)-th release was done.
    handoffs = [a - r for a, r in zip(acquired[args.max :], released, strict=False)]

    # Workers sample on their own clocks; sample i of each worker is about the same moment.
    samples = min(len(r.following) for r in reports)
    following = [sum(r.following[i] for r in reports) for i in range(samples)]
    waiting = [sum(r.waiting[i] for r in reports) for i in range(samples)]
    busy = [f for f, w in zip(following, waiting, strict=True) if w]

    over = broken = 0
    history = cluster.key_history(settings.key, 300.0)
    for _, raw in history:
        if raw is None:
            continue
        try:
            sem = Semaphore.decode(raw)
        except SemaphoreError:
            broken += 1
            continue
        if len(sem.holders) > sem.max or sem.max > args.max:
            over += 1
    return RunResult(
        mode=mode,
        nodes=args.nodes,
        max_slots=args.max,
        procs=len(reports),
        total=end - start,
        ideal=math.ceil(args.nodes / args.max) * args.reboot_s,
        handoffs=handoffs,
        release_calls=[t for r in reports for t in r.release_calls],
        writes=len(history),
        requests=sum(r.requests for r in reports),
        conflicts=sum(r.conflicts for r in reports),
        watch_events=sum(r.watch_events for r in reports),
        release_retries=sum(r.release_retries for r in reports),
        semaphore_watches=sum(r.semaphore_watches for r in reports),
        line_watches=sum(r.line_watches for r in reports),
        following_peak=max(following, default=0),
        following_mean=sum(busy) / len(busy) if busy else 0.0,
        over_max=over,
        broken_invariant=broken,
        etcd_cpu=etcd_cpu,
        sim_cpu=sum(r.cpu for r in reports),
        machine_cpu=machine_cpu,
        threads=sum(r.threads for r in reports),
        errors=[e for r in reports for e in r.errors],
    )


def report(result: RunResult) -> None:
    p50 = percentile(result.handoffs, 50) * 1000
    p99 = percentile(result.handoffs, 99) * 1000
    handoffs = max(1, len(result.handoffs))
    capacity = (os.cpu_count() or 1) * result.total
    print(
        f"{result.mode:>5}: total {result.total:7.2f} s  ideal {result.ideal:6.2f} s  "
        f"ratio {result.total / result.ideal:5.2f}  hand-off p50 {p50:7.1f} ms  p99 {p99:7.1f} ms  "
        f"release call p50 {percentile(result.release_calls, 50) * 1000:.1f} ms "
        f"(retried {result.release_retries})  "
        f"etcd requests {result.requests} ({result.requests / handoffs:.1f}/hand-off)  "
        f"lost CAS {result.conflicts} ({result.conflicts / handoffs:.1f}/hand-off)  "
        f"watch events {result.watch_events}  writes {result.writes}  "
        f"semaphore watchers peak {result.following_peak} mean {result.following_mean:.1f}  "
        f"watches opened: semaphore {result.semaphore_watches} line {result.line_watches}  "
        f"over-max {result.over_max}  invalid {result.broken_invariant}  errors {len(result.errors)}",
        flush=True,
    )
    print(
        f"       cpu: etcd {result.etcd_cpu:6.1f} s  simulator {result.sim_cpu:6.1f} s "
        f"({result.procs} procs, {result.threads} threads at most)  of {capacity:6.1f} s available "
        f"({os.cpu_count()} cores × wall): {100 * (result.etcd_cpu + result.sim_cpu) / capacity:3.0f} % used by "
        f"the benchmark, {100 * result.machine_cpu / capacity:3.0f} % by the whole machine",
        flush=True,
    )
    for error in result.errors[:5]:
        print(f"       error: {error}", flush=True)


def main_parent(args: argparse.Namespace) -> int:
    with (
        tempfile.TemporaryDirectory(prefix="fleet-bench-") as workdir,
        EtcdCluster(1, Path(workdir)) as cluster,
    ):
        scale = args.reboot_s / args.real_reboot_s
        print(
            f"fleet: {args.nodes} nodes in {args.procs} processes, max {args.max}, reboot {args.reboot_s} s "
            f"(stands for {args.real_reboot_s:g} s: time scale 1/{1 / scale:g}; polling backoff "
            f"{10 * scale * 1000:.0f} ms doubling to {300 * scale:.2f} s); hand-off jitter "
            f"{args.handoff_jitter} s (cap {args.max_handoff_jitter} s); etcd at {cluster.endpoints[0]}",
            flush=True,
        )
        violations = 0
        for mode in args.modes.split(","):
            result = run_fleet(cluster, args, mode)
            report(result)
            violations += result.over_max + result.broken_invariant + len(result.errors)
        return 1 if violations else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"] and len(argv) == 2:
        return worker_main(argv[1])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--nodes", type=int, default=200, help="simulated nodes (default 200)")
    parser.add_argument("--max", type=int, default=10, help="semaphore slots (default 10)")
    parser.add_argument("--reboot-s", type=float, default=0.2, help="simulated reboot duration (default 0.2)")
    parser.add_argument(
        "--real-reboot-s", type=float, default=60.0, help="real reboot the simulated one stands for (60)"
    )
    parser.add_argument("--handoff-jitter", type=float, default=0.01, help="initial hand-off delay (0.01 s)")
    parser.add_argument("--max-handoff-jitter", type=float, default=0.2, help="hand-off delay cap (0.2 s)")
    parser.add_argument("--modes", default="watch,poll", help="comma-separated: watch, crowd, poll")
    parser.add_argument(
        "--procs",
        type=int,
        default=os.cpu_count() or 1,
        help="worker processes the nodes are spread over (default: the number of cores)",
    )
    args = parser.parse_args(argv)
    if args.nodes < 1 or args.max < 1 or args.reboot_s <= 0 or args.procs < 1:
        parser.error("--nodes, --max and --procs must be >= 1 and --reboot-s > 0")
    for mode in args.modes.split(","):
        if mode not in ("watch", "crowd", "poll"):
            parser.error(f"unknown mode {mode!r}: use watch, crowd, poll")
    return main_parent(args)


if __name__ == "__main__":
    sys.exit(main())
