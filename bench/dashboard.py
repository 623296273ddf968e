#!/usr/bin/env python3
"""How long the dashboard's pages take with a large fleet, on SQLite and on PostgreSQL.

For each database: a fresh database filled through the storage layer (its engine and tables, in bulk) with
``--instances`` instances in five groups of different sizes (most in ``production``), three versions and every
status, check-ins spread over two days, ``--events`` events over 30 days (2 % failures with their error codes),
grants, seven days of hourly version snapshots and some activity, then VACUUM ANALYZE (PostgreSQL; what
autovacuum does to a running database) or ANALYZE (SQLite); then ``coreupdate serve`` on it, an admin
signs in, and each page is fetched ``--rounds`` times in turn.  Printed per page: the median of the server's
own time (its ``Server-Timing`` header: ``total``; ``cpu``, the server process's CPU time meanwhile, which does
not grow with the machine's load — on PostgreSQL the database server's CPU is not in it; and for the group page
the instance table's query ``instances``, which runs beside the page's other reads) and the median seen by the
client on loopback; full page loads, never the live refresh's shared counts, with the ratio to the goal
(overview and group pages <= 200 ms, instance table pages <= 100 ms).  Figures, not pass/fail; other jobs on the
machine move them.

    .venv/bin/python bench/dashboard.py [--instances 100000] [--events 1000000] [--rounds 15] [--only sqlite]
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from http.cookiejar import CookieJar
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sqlalchemy as sa

from coreupdate import COREOS_APP_ID
from coreupdate.accounts import Role, hash_password
from coreupdate.model import Group, GroupPolicy, InstanceStatus, Package
from coreupdate.storage import engine as db_engine
from coreupdate.storage import schema
from coreupdate.storage.accounts import AccountStore
from coreupdate.storage.store import Store
from sim.coreupdate import start_coreupdate
from sim.postgres import PostgresServer

DAY = 86400.0
GROUPS = (("production", 0.70), ("staging", 0.20), ("canary", 0.08), ("edge", 0.015), ("lab", 0.005))
VERSIONS = ("3510.2.8", "3602.2.3", "3815.2.5")
SHA256, SHA1 = "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=", "2jmj7l5rSw0yVb/vlWAYkK/YBwk="
CHUNK = 20_000
PASSWORD = "bench password"
GOALS_MS = {"overview": 200.0, "group": 200.0, "instances": 100.0}


def _chunks(rows: Iterator[dict[str, object]]) -> Iterator[list[dict[str, object]]]:
    chunk: list[dict[str, object]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def fill(url: str, instances: int, events: int) -> float:
    """Create the fleet of the module docstring; returns the seconds it took."""
    started = time.monotonic()
    rng = random.Random(42)
    now = time.time()
    store = Store(db_engine.create(url))
    store.migrate()
    for version in VERSIONS:
        store.add_package(Package(COREOS_APP_ID, version, 300 << 20, SHA256, SHA1, "update.gz"))
    store.set_channel(COREOS_APP_ID, "stable", VERSIONS[-1])
    groups = []
    for name, _share in GROUPS:
        groups.append(store.create_group(Group(name, COREOS_APP_ID, name, "stable", GroupPolicy(
            update_count=5, update_interval=timedelta(minutes=90), safe_mode=True,
            office_hours="Mon-Fri 09:00 8h", timezone="Europe/Berlin", failure_pause_count=50))))
    AccountStore(store.engine).add_user("bench", Role.ADMIN, hash_password(PASSWORD))
    weights = [share for _name, share in GROUPS]
    statuses = [(InstanceStatus.COMPLETE, 50), (InstanceStatus.UNDEFINED, 25), (InstanceStatus.ON_HOLD, 15),
                (InstanceStatus.UPDATE_GRANTED, 3), (InstanceStatus.DOWNLOADING, 2), (InstanceStatus.INSTALLED, 2),
                (InstanceStatus.ERROR, 2), (InstanceStatus.ROLLED_BACK, 1)]
    machine_groups: list[str] = []

    def instance_rows() -> Iterator[dict[str, object]]:
        for n in range(instances):
            group = rng.choices(groups, weights)[0]
            machine_groups.append(group.id)
            status = rng.choices([s for s, _ in statuses], [w for _, w in statuses])[0]
            version = VERSIONS[-1] if status == InstanceStatus.COMPLETE else rng.choice(VERSIONS[:2])
            seen = now - (rng.random() * DAY * 0.95 if rng.random() < 0.9 else DAY * (1 + rng.random()))
            granted = status not in (InstanceStatus.UNDEFINED, InstanceStatus.ON_HOLD)
            yield {"app_id": COREOS_APP_ID, "machine_id": f"{n:032x}", "alias": f"node-{n:06d}",
                   "ip": f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}", "version": version, "track": group.name,
                   "group_id": group.id, "oem": "", "board": "amd64-usr", "status": int(status), "status_at": seen,
                   "error_code": 10 if status == InstanceStatus.ERROR else None,
                   "granted_version": VERSIONS[-1] if granted else None, "granted_at": seen - 3600 if granted else None,
                   "first_seen_at": now - 60 * DAY, "last_check_at": seen}

    def event_rows() -> Iterator[dict[str, object]]:
        for _ in range(events):
            n = rng.randrange(instances)
            failed = rng.random() < 0.02
            kind = rng.choice(((13, 1, None, InstanceStatus.DOWNLOADING), (14, 1, None, InstanceStatus.DOWNLOADED),
                               (3, 1, None, InstanceStatus.INSTALLED)))
            if failed:
                kind = (3, 0, rng.choice((10, 12, 44)), InstanceStatus.ERROR)
            yield {"at": now - rng.random() * 30 * DAY, "app_id": COREOS_APP_ID, "machine_id": f"{n:032x}",
                   "group_id": machine_groups[n], "version": VERSIONS[1], "type": kind[0], "result": kind[1],
                   "error_code": kind[2], "previous_version": None, "status": int(kind[3])}

    def grant_rows() -> Iterator[dict[str, object]]:
        for n in range(0, instances, 3):
            yield {"at": now - rng.random() * 7 * DAY, "app_id": COREOS_APP_ID, "machine_id": f"{n:032x}",
                   "group_id": machine_groups[n], "version": VERSIONS[-1]}

    def snapshot_rows() -> Iterator[dict[str, object]]:
        hour = now - now % 3600
        for group, (_name, share) in zip(groups, GROUPS, strict=True):
            for h in range(7 * 24):
                done = min(1.0, h / (5 * 24))
                size = int(instances * share * 0.9)
                counts = {VERSIONS[0]: int(size * (1 - done) * 0.3), VERSIONS[1]: int(size * (1 - done) * 0.7)}
                counts[VERSIONS[2]] = size - sum(counts.values())
                for version, count in counts.items():
                    yield {"group_id": group.id, "at": hour - (7 * 24 - h) * 3600, "version": version,
                           "instances": count}

    def activity_rows() -> Iterator[dict[str, object]]:
        for i in range(2000):
            group = rng.choice(groups)
            yield {"at": now - rng.random() * 30 * DAY, "app_id": COREOS_APP_ID, "group_id": group.id,
                   "kind": "instance-failed", "version": VERSIONS[-1], "message": f"instance node-{i:06d} failed"}

    with store.engine.begin() as conn:
        for table, rows in ((schema.instances, instance_rows()), (schema.events, event_rows()),
                            (schema.grants, grant_rows()), (schema.version_snapshots, snapshot_rows()),
                            (schema.activity, activity_rows())):
            for chunk in _chunks(rows):
                conn.execute(sa.insert(table), chunk)
        for group in groups:
            conn.execute(sa.insert(schema.rollouts).values(group_id=group.id, version=VERSIONS[-1],
                                                           started_at=now - 5 * DAY, granted=1000, failed=20,
                                                           completed=900))
    # The statistics and visibility map a running database gets from autovacuum (SQLite: ANALYZE).
    with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE" if conn.dialect.name == "postgresql" else "ANALYZE")
    store.engine.dispose()
    return time.monotonic() - started


class Client:
    """A signed-in browser without JavaScript: cookies, and the server's Server-Timing of each page."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
        form = self.opener.open(base + "/login", timeout=60).read().decode()
        match = re.search(r'name="csrf_token" value="([^"]+)"', form)
        assert match is not None
        data = urllib.parse.urlencode({"csrf_token": match.group(1), "name": "bench", "password": PASSWORD,
                                       "next": "/"}).encode()
        self.opener.open(base + "/login", data, timeout=60).read()

    def get(self, path: str) -> tuple[dict[str, float], float]:
        started = time.perf_counter()
        with self.opener.open(self.base + path, timeout=60) as response:
            response.read()
            header = response.headers.get("Server-Timing", "")
        client_ms = (time.perf_counter() - started) * 1000
        timings = {name: float(dur) for name, dur in re.findall(r"([\w-]+);dur=([\d.]+)", header)}
        if "total" not in timings:
            raise RuntimeError(f"{path}: no Server-Timing (not signed in?)")
        return timings, client_ms


def measure(url: str | None, data_dir: Path, rounds: int) -> list[tuple[str, str, float, float, float, float]]:
    """[(page, what, server median ms, server CPU median ms, client median ms, goal ms)]"""
    group = f"/apps/{COREOS_APP_ID}/groups/production"
    pages = {
        "overview": "/",
        "group": group,
        "instances page 1": f"{group}?page=1",
        "instances page 700, by version": f"{group}?sort=version&order=asc&page=700",
        "instances Error, by machine": f"{group}?status=Error&sort=machine&order=asc",
        "instances 3602.2.3, page 20": f"{group}?version=3602.2.3&page=20",
    }
    results = []
    with start_coreupdate(data_dir, database=url) as server:
        client = Client(server.url)
        samples: dict[str, list[tuple[dict[str, float], float]]] = {name: [] for name in pages}
        for path in pages.values():  # warm the caches once
            client.get(path)
        for _ in range(rounds):
            for name, path in pages.items():
                samples[name].append(client.get(path))
        nan = float("nan")
        for name, runs in samples.items():
            total = statistics.median(t["total"] for t, _ in runs)
            cpu = statistics.median(t["cpu"] for t, _ in runs)
            seen = statistics.median(c for _, c in runs)
            results.append((name, "page", total, cpu, seen, GOALS_MS["overview" if name == "overview" else "group"]))
            if name.startswith("instances"):
                table = statistics.median(t["instances"] for t, _ in runs)
                results.append((name, "instance table", table, nan, nan, GOALS_MS["instances"]))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--only", choices=("sqlite", "postgresql"))
    args = parser.parse_args()
    with open("/proc/loadavg", encoding="ascii") as f:
        load = f.read().split()[:3]
    print(f"{args.instances} instances, {args.events} events; load average before: {' '.join(load)}")
    print(f"{'database':<11} {'page':<32} {'measured':<15} {'server p50':>10} {'its CPU':>9} {'client p50':>10} "
          f"{'goal':>6} {'p50/goal':>8}")
    for backend in ("sqlite", "postgresql"):
        if args.only and backend != args.only:
            continue
        with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as tmp:
            data = Path(tmp) / "srv"
            data.mkdir()
            pg = PostgresServer() if backend == "postgresql" else None
            try:
                if pg is not None:
                    pg.start()
                    url = pg.create_database("bench")
                else:
                    url = db_engine.sqlite_url(data)
                took = fill(url, args.instances, args.events)
                print(f"{backend}: filled in {took:.0f} s")
                rows = measure(url if pg else None, data, args.rounds)
            finally:
                if pg is not None:
                    pg.close()
        for page, what, server_ms, cpu_ms, client_ms, goal in rows:
            client = "" if client_ms != client_ms else f"{client_ms:.1f} ms"
            cpu = "" if cpu_ms != cpu_ms else f"{cpu_ms:.1f} ms"
            print(f"{backend:<11} {page:<32} {what:<15} {server_ms:>7.1f} ms {cpu:>9} {client:>10} {goal:>3.0f} ms "
                  f"{server_ms / goal:>8.2f}")
    with open("/proc/loadavg", encoding="ascii") as f:
        print(f"load average after: {' '.join(f.read().split()[:3])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
