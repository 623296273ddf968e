#!/usr/bin/env python3
"""Idle footprint of the daemons: memory and wake-ups while there is nothing to do.

Starts ``update_engine`` and two ``locksmithd`` waiting for an update on a private system-like bus with a GPT image
and a dev server on 127.0.0.1 that has no update to offer: one with the ``reboot`` strategy (no lock client at
all) and one with the default strategy, ``best-effort``, against a real etcd on 127.0.0.1 (it loads the etcd
client, finds etcd reachable and releases any slot it held, as a node does after booting). It lets them settle, then
watches them for ``--seconds`` (default 60) twice: before update-engine's first check, and again after it made one
check (``update_engine_client -update``: the server answers "no update"), which is the state a node spends its life
in between hourly checks. For each window: RSS and PSS from ``/proc/PID/smaps_rollup`` at its end, and the
voluntary context switches during it (each one is a wake-up). An idle daemon should sleep until its next timer: a
handful of switches at most, not one per second. Figures, not pass/fail.

    .venv/bin/python bench/idle_footprint.py [--seconds 60] [--baseline CHECKOUT]

``--baseline CHECKOUT`` also runs the ``update_engine`` of another checkout of this repository (say a worktree of
the previous main) beside this one, on its own private bus and node root, through the same windows: both are
measured in the same run, under the same load.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sim.bus import start_private_bus
from sim.devserver import DevServerProcess, start_devserver
from sim.disks import make_usr_disk
from sim.etcd import EtcdCluster
from sim.node import make_node_root
from sim.tools import UPDATE_ENGINE_POLICY as POLICY
from sim.tools import VENV_BIN


@dataclass
class Sample:
    rss_kib: int
    pss_kib: int
    voluntary: int
    involuntary: int


def sample(pid: int) -> Sample:
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if parts and parts[0] in ("Rss:", "Pss:"):
                fields[parts[0]] = int(parts[1])
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                key, value = line.split(":")
                fields[key] = int(value)
    return Sample(fields["Rss:"], fields["Pss:"], fields["voluntary_ctxt_switches"],
                  fields["nonvoluntary_ctxt_switches"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="observation window (default 60)")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds before the window starts (default 5)")
    parser.add_argument("--baseline", type=Path, help="a checkout whose update_engine runs beside this one's")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="idle-bench-"))
    bus = start_private_bus(work / "dbus", [POLICY])
    baseline_bus = start_private_bus(work / "dbus-baseline", [POLICY]) if args.baseline else None
    procs: dict[str, subprocess.Popen[bytes]] = {}
    devserver: DevServerProcess | None = None
    etcd: EtcdCluster | None = None
    try:
        # The only release is on another track: every check of this "stable" node is answered "no update".
        other_track = work / "beta.payload"
        other_track.write_bytes(b"not offered to this node")
        devserver = start_devserver(work / "devserver", [(other_track, "9.9.9", "beta")])
        node = make_node_root(work / "root", server=devserver.url)
        disk = make_usr_disk(work / "disk.img")
        key = work / "unused.pub.pem"
        key.write_text("")
        common = ["--bus-address", bus.address, "--config-root", str(node.root)]
        names = ("update_engine", "update_engine (baseline)", "locksmithd (reboot)", "locksmithd (best-effort)")
        logs = {name: (work / f"{name.split()[0]}-{len(name)}.log").open("wb") for name in names}
        engines = [("update_engine", bus.address, node, disk, dict(os.environ))]
        if args.baseline is not None and baseline_bus is not None:
            base_node = make_node_root(work / "root-baseline", server=devserver.url)
            engines.append(("update_engine (baseline)", baseline_bus.address, base_node,
                            make_usr_disk(work / "disk-baseline.img"),
                            {**os.environ, "PYTHONPATH": str(args.baseline.resolve())}))
        for name, address, root, image, env in engines:
            procs[name] = subprocess.Popen(
                [str(VENV_BIN / "update_engine"), "--bus-address", address, "--config-root", str(root.root),
                 "--disk", str(image), "--booted", "USR-A", "--public-key", str(key), "--state-dir",
                 str(root.state_dir), "--run-dir", str(root.run_dir), "--kernel-dir", str(root.kernel_dir),
                 "--first-check-delay", "3600", "--healthy-boot-delay", "1"],
                stdout=logs[name], stderr=subprocess.STDOUT, env=env,
            )
        time.sleep(1.0)
        procs["locksmithd (reboot)"] = subprocess.Popen(
            [str(VENV_BIN / "locksmithd"), *common, "--strategy", "reboot"],
            stdout=logs["locksmithd (reboot)"], stderr=subprocess.STDOUT,
        )
        etcd = EtcdCluster(1, work / "etcd").start_all()
        # A node root of its own: each locksmithd is the update coordinator of its root.
        other = make_node_root(work / "root-best-effort", server=devserver.url)
        procs["locksmithd (best-effort)"] = subprocess.Popen(
            [str(VENV_BIN / "locksmithd"), "--bus-address", bus.address, "--config-root", str(other.root),
             "--endpoint", etcd.endpoints[0]],
            stdout=logs["locksmithd (best-effort)"], stderr=subprocess.STDOUT,
        )
        print(f"{'daemon':<24} {'window':<26} {'RSS MiB':>8} {'PSS MiB':>8} {'wake-ups':>9} {'per minute':>10}")
        for window in ("before the first check", "after a no-update check"):
            if window.startswith("after"):
                for _name, address, *_rest in engines:
                    check = subprocess.run(
                        [str(VENV_BIN / "update_engine_client"), "-update", "--bus-address", address],
                        capture_output=True, text=True, timeout=120,
                    )
                    if "UPDATE_STATUS_IDLE" not in check.stdout + check.stderr:
                        raise SystemExit(f"the check did not end in IDLE: {check.stdout}{check.stderr}")
            time.sleep(args.settle)
            for name, proc in procs.items():
                if proc.poll() is not None:
                    raise SystemExit(f"{name} exited with {proc.returncode}; see the logs in {work}")
            before = {name: sample(p.pid) for name, p in procs.items()}
            time.sleep(args.seconds)
            after = {name: sample(p.pid) for name, p in procs.items()}
            for name in procs:
                a, b = after[name], before[name]
                wakeups = a.voluntary - b.voluntary
                print(f"{name:<24} {window:<26} {a.rss_kib / 1024:>8.1f} {a.pss_kib / 1024:>8.1f} {wakeups:>9} "
                      f"{wakeups * 60 / args.seconds:>10.1f}", flush=True)
    finally:
        for proc in procs.values():
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if devserver is not None:
            devserver.stop()
        if etcd is not None:
            etcd.stop_all()
        bus.stop()
        if baseline_bus is not None:
            baseline_bus.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
