"""Fleet reboot benchmark: N simulated nodes take turns through the etcd reboot semaphore.

Starts a real single-member etcd on 127.0.0.1, then runs the same fleet twice with the real EtcdLockBackend:

* ``watch``: waiters follow the key with an etcd watch (this project's behaviour);
* ``poll``: waiters only retry with locksmith's backoff (10 s doubling to 5 min).

Each node acquires a slot, "reboots" (sleeps ``--reboot-s``), and releases. Real durations are scaled down by
``scale = reboot_s / real_reboot_s`` (default 0.2 s standing for a 60 s reboot, so 1/300): the polling
backoff 10 s → 5 min becomes 33 ms → 1 s, and the watch fallback uses the same scaled backoff. The hand-off
delay (a few hundred ms on a real node) is network-scale, not reboot-scale, and is set with
``--handoff-jitter``.

Prints per mode: total time against the ideal ``ceil(N / max) × reboot_s``, hand-off latency (release of a
slot → the next node holding it) p50/p99, the number of writes, and violations found by reading every revision
of the key from etcd's history (more holders than ``max``, or ``semaphore != max - len(holders)``). These are
figures to compare, not pass/fail checks.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from locksmithd.backends.etcd import EtcdLockBackend, EtcdSemaphoreStore, EtcdSettings
from locksmithd.semaphore import Semaphore, SemaphoreError
from tests.helpers.etcd_cluster import EtcdCluster


@dataclass
class RunResult:
    mode: str
    nodes: int
    max_slots: int
    total: float
    ideal: float
    handoffs: list[float]
    writes: int
    requests: int
    over_max: int
    broken_invariant: int


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))
    return ordered[index]


async def run_fleet(cluster: EtcdCluster, args: argparse.Namespace, mode: str) -> RunResult:
    group = f"bench-{mode}"
    settings = EtcdSettings(endpoints=tuple(cluster.endpoints), group=group)
    store = EtcdSemaphoreStore(settings)
    store.update(lambda sem: sem.set_max(args.max))
    store.close()
    scale = args.reboot_s / args.real_reboot_s
    acquired: list[float] = []
    released: list[float] = []
    requests = 0

    async def node(i: int) -> None:
        nonlocal requests
        backend = EtcdLockBackend(
            settings,
            use_watch=mode == "watch",
            first_backoff=10.0 * scale,
            max_backoff=300.0 * scale,
            handoff_jitter=args.handoff_jitter,
            max_handoff_jitter=args.max_handoff_jitter,
        )
        machine_id = f"node-{i:05d}"
        try:
            await backend.acquire(machine_id)
            acquired.append(time.monotonic())
            await asyncio.sleep(args.reboot_s)
            await backend.release(machine_id)
            released.append(time.monotonic())
        finally:
            requests += backend.store.requests_sent
            await backend.close()

    start = time.monotonic()
    await asyncio.gather(*(node(i) for i in range(args.nodes)))
    total = time.monotonic() - start

    # The k-th acquisition after the first `max` could only happen once the (k - max)-th release was done.
    acquired.sort()
    released.sort()
    handoffs = [a - r for a, r in zip(acquired[args.max :], released, strict=False)]

    over = broken = 0
    history = await asyncio.to_thread(cluster.key_history, settings.key, 300.0)
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
        total=total,
        ideal=math.ceil(args.nodes / args.max) * args.reboot_s,
        handoffs=handoffs,
        writes=len(history),
        requests=requests,
        over_max=over,
        broken_invariant=broken,
    )


def report(result: RunResult) -> None:
    p50 = percentile(result.handoffs, 50) * 1000
    p99 = percentile(result.handoffs, 99) * 1000
    mean = statistics.fmean(result.handoffs) * 1000 if result.handoffs else float("nan")
    print(
        f"{result.mode:>5}: total {result.total:7.2f} s  ideal {result.ideal:6.2f} s  "
        f"ratio {result.total / result.ideal:5.2f}  hand-off p50 {p50:7.1f} ms  p99 {p99:7.1f} ms  "
        f"mean {mean:7.1f} ms  etcd requests {result.requests}  writes {result.writes}  "
        f"over-max {result.over_max}  "
        f"invalid {result.broken_invariant}",
        flush=True,
    )


async def main_async(args: argparse.Namespace) -> int:
    with (
        tempfile.TemporaryDirectory(prefix="fleet-bench-") as workdir,
        EtcdCluster(1, Path(workdir)) as cluster,
    ):
        scale = args.reboot_s / args.real_reboot_s
        print(
            f"fleet: {args.nodes} nodes, max {args.max}, reboot {args.reboot_s} s "
            f"(stands for {args.real_reboot_s:g} s: time scale 1/{1 / scale:g}; polling backoff "
            f"{10 * scale * 1000:.0f} ms doubling to {300 * scale:.2f} s); hand-off jitter "
            f"{args.handoff_jitter} s (cap {args.max_handoff_jitter} s); etcd at {cluster.endpoints[0]}",
            flush=True,
        )
        violations = 0
        for mode in args.modes.split(","):
            result = await run_fleet(cluster, args, mode)
            report(result)
            violations += result.over_max + result.broken_invariant
        return 1 if violations else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--nodes", type=int, default=200, help="simulated nodes (default 200)")
    parser.add_argument("--max", type=int, default=10, help="semaphore slots (default 10)")
    parser.add_argument("--reboot-s", type=float, default=0.2, help="simulated reboot duration (default 0.2)")
    parser.add_argument(
        "--real-reboot-s", type=float, default=60.0, help="real reboot the simulated one stands for (60)"
    )
    parser.add_argument("--handoff-jitter", type=float, default=0.01, help="initial hand-off delay (0.01 s)")
    parser.add_argument("--max-handoff-jitter", type=float, default=0.2, help="hand-off delay cap (0.2 s)")
    parser.add_argument("--modes", default="watch,poll", help="comma-separated: watch, poll")
    args = parser.parse_args(argv)
    if args.nodes < 1 or args.max < 1 or args.reboot_s <= 0:
        parser.error("--nodes and --max must be >= 1 and --reboot-s > 0")
    logging.basicConfig(level=logging.ERROR, format="%(asctime)s %(levelname)s %(message)s")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
