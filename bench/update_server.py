#!/usr/bin/env python3
"""Update checks per second against ``coreupdate serve``, on SQLite and on PostgreSQL, driven by ``wrk``.

For each database: a fresh server with ``--instances`` registered instances (written straight into its database
before it starts, as a fleet that has checked in before), a package on the ``stable`` channel that every
instance is older than, and the ``stable`` group in a rollout limited to 10 grants per hour — the state a large
fleet spends most of a rollout in.  Then ``wrk`` (one thread, ``--connections`` connections, ``--seconds``) posts
update checks shaped like update-engine's, each from a random registered machine id (a Lua script), and we
print checks/s, latency p50/p99 (wrk's), the server's RSS at the end and its peak, and how many of the checks
were written (the write-behind queue is flushed before the server's figures are read).  Figures, not
pass/fail; the goal on a 2-core machine with the generator on it: >= 2,000 checks/s on SQLite with p99 <= 50 ms,
>= 1,000 on PostgreSQL, RSS <= 150 MiB.

    .venv/bin/python bench/update_server.py [--instances 100000] [--seconds 20] [--connections 32] [--only sqlite]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coreupdate import COREOS_APP_ID
from coreupdate.storage import engine as db_engine
from coreupdate.storage.store import CheckIn, Store
from sim.coreupdate import CPP_UPDATE_CHECK, start_coreupdate
from sim.postgres import PostgresServer

LUA = """
math.randomseed(os.time())
request = function()
  local n = math.random(0, COUNT - 1)
  local body = string.format([==[TEMPLATE]==], n)
  return wrk.format("POST", "/v1/update/", {["Content-Type"] = "text/xml"}, body)
end
"""

# The goal's rate for each database: the paced run's target.
GOAL_RATE = {"sqlite": 2000, "postgresql": 1000}

# The original client's update check, with a Lua format directive for the machine id.
TEMPLATE = CPP_UPDATE_CHECK.format(machine="bench%08d", track="stable", version="1.0.0")


def register(url: str, count: int) -> float:
    store = Store(db_engine.create(url))
    store.migrate()
    started = time.monotonic()
    group = store.get_group(COREOS_APP_ID, "stable")
    now = time.time()
    batch = 10_000
    for first in range(0, count, batch):
        store.record([CheckIn(COREOS_APP_ID, f"bench{n:08d}", "1.0.0", "stable", group.id, now)
                      for n in range(first, min(count, first + batch))], [])
    store.engine.dispose()
    return time.monotonic() - started


def rss_kib(pid: int) -> tuple[int, int]:
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0])
    return fields["VmRSS"], fields["VmHWM"]


def parse_ms(text: str) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def run(name: str, database: str | None, workdir: Path, args: argparse.Namespace) -> list[dict[str, object]]:
    data_dir = workdir / name
    data_dir.mkdir()
    url = database or db_engine.sqlite_url(data_dir)
    reg_s = register(url, args.instances)
    server = start_coreupdate(data_dir, database=database)
    try:
        payload = b"bench"
        server.api("POST", f"/apps/{COREOS_APP_ID}/packages", {
            "version": "2.0.0", "url": "https://mirror.example/2.0.0/update.gz", "size": 1000,
            "sha256": base64.b64encode(hashlib.sha256(payload).digest()).decode(),
            "sha1": base64.b64encode(hashlib.sha1(payload).digest()).decode()})
        server.api("PUT", f"/apps/{COREOS_APP_ID}/channels/stable", {"version": "2.0.0"})
        server.api("PATCH", f"/apps/{COREOS_APP_ID}/groups/stable", {"update_count": 10, "update_interval": 3600})
        script = workdir / f"{name}.lua"
        script.write_text(LUA.replace("COUNT", str(args.instances)).replace("TEMPLATE", TEMPLATE))
        subprocess.run(["wrk", "-t1", "-c8", "-d2s", "-s", str(script), server.url], capture_output=True,
                       check=True)  # warm-up
        rss_before, _ = rss_kib(server.process.pid)
        results = []
        # Paced at the goal's rate (the latency there: each connection waits connections / rate after each
        # answer, so the rate is a little under it), then as fast as the connections go (what the server
        # sustains; its backlog would delay a run after it).
        for load, delay_ms in ((f"paced at {GOAL_RATE[name]}/s", args.connections * 1000 / GOAL_RATE[name]),
                               ("saturating", 0.0)):
            paced = workdir / f"{name}-{delay_ms:.0f}.lua"
            paced.write_text(script.read_text() + f"delay = function() return {delay_ms:.1f} end\n")
            out = subprocess.run(["wrk", "-t1", f"-c{args.connections}", f"-d{args.seconds}s", "--latency",
                                  "-s", str(paced), server.url], capture_output=True, text=True, check=True).stdout
            rss, peak = rss_kib(server.process.pid)
            rate = float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))  # type: ignore[union-attr]
            p50 = parse_ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
            p99 = parse_ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
            errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
            granted = server.api("GET", f"/apps/{COREOS_APP_ID}/instances?status=UpdateGranted&limit=1")["total"]
            results.append({"database": name, "load": load, "registered_s": reg_s, "checks_s": rate, "p50_ms": p50,
                            "p99_ms": p99, "rss_mib": rss / 1024, "peak_mib": peak / 1024,
                            "rss_before_mib": rss_before / 1024,
                            "non_2xx": int(errors.group(1)) if errors else 0, "granted": granted})
        return results
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=100_000)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--only", choices=("sqlite", "postgresql"))
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="coreupdate-bench-") as tmp:
        workdir = Path(tmp)
        if args.only in (None, "sqlite"):
            results.extend(run("sqlite", None, workdir, args))
        if args.only in (None, "postgresql"):
            pg = PostgresServer()
            pg.start()
            try:
                results.extend(run("postgresql", pg.create_database("bench" + uuid.uuid4().hex[:8]), workdir, args))
            finally:
                pg.close()
    print(f"{args.instances} registered instances, wrk 1 thread, {args.connections} connections, {args.seconds} s")
    print(f"{'database':<11} {'load':<18} {'checks/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'RSS before':>10} "
          f"{'RSS MiB':>8} {'peak MiB':>9} {'non-2xx':>8} {'granted':>8} {'register s':>11}")
    for r in results:
        print(f"{r['database']:<11} {r['load']:<18} {r['checks_s']:>9.0f} {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} "
              f"{r['rss_before_mib']:>10.1f} {r['rss_mib']:>8.1f} {r['peak_mib']:>9.1f} {r['non_2xx']:>8} "
              f"{r['granted']:>8} {r['registered_s']:>11.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
