#!/usr/bin/env python3
"""Idle footprint of the daemons: memory and wake-ups while there is nothing to do.

Starts ``update_engine`` (and ``locksmithd`` with the ``reboot`` strategy, waiting for an update) on a private
system-like bus with a GPT image, lets them settle, then watches them for ``--seconds`` (default 60): RSS and PSS
from ``/proc/PID/smaps_rollup`` at the end, and the voluntary context switches during the window (each one is a
wake-up). An idle daemon should sleep until its next timer: a handful of switches at most, not one per second.
Figures, not pass/fail.

    .venv/bin/python bench/idle_footprint.py [--seconds 60]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers.dbus import start_private_bus
from tests.helpers.disks import make_usr_disk
from tests.helpers.node import VENV_BIN, make_node_root

POLICY = Path(__file__).resolve().parent.parent / "units" / "com.coreos.update1.conf"


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
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="idle-bench-"))
    bus = start_private_bus(work / "dbus", [POLICY])
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        node = make_node_root(work / "root", server="http://127.0.0.1:9/v1/update/")
        disk = make_usr_disk(work / "disk.img")
        key = work / "unused.pub.pem"
        key.write_text("")
        common = ["--bus-address", bus.address, "--config-root", str(node.root)]
        logs = {name: (work / f"{name}.log").open("wb") for name in ("update_engine", "locksmithd")}
        procs["update_engine"] = subprocess.Popen(
            [str(VENV_BIN / "update_engine"), *common, "--disk", str(disk), "--booted", "USR-A",
             "--public-key", str(key), "--state-dir", str(node.state_dir), "--run-dir", str(node.run_dir),
             "--kernel-dir", str(node.kernel_dir), "--first-check-delay", "3600", "--healthy-boot-delay", "1"],
            stdout=logs["update_engine"], stderr=subprocess.STDOUT,
        )
        time.sleep(1.0)
        procs["locksmithd"] = subprocess.Popen(
            [str(VENV_BIN / "locksmithd"), *common, "--strategy", "reboot"],
            stdout=logs["locksmithd"], stderr=subprocess.STDOUT,
        )
        time.sleep(args.settle)
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise SystemExit(f"{name} exited with {proc.returncode}; see {work}/{name}.log")
        before = {name: sample(p.pid) for name, p in procs.items()}
        print(f"… watching for {args.seconds:.0f} s", flush=True)
        time.sleep(args.seconds)
        after = {name: sample(p.pid) for name, p in procs.items()}
        print(f"\n{'daemon':<14} {'RSS MiB':>8} {'PSS MiB':>8} {'wake-ups':>9} {'per minute':>10}")
        for name in procs:
            a, b = after[name], before[name]
            wakeups = a.voluntary - b.voluntary
            print(f"{name:<14} {a.rss_kib / 1024:>8.1f} {a.pss_kib / 1024:>8.1f} {wakeups:>9} "
                  f"{wakeups * 60 / args.seconds:>10.1f}")
    finally:
        for proc in procs.values():
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        bus.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
