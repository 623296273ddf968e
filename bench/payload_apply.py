#!/usr/bin/env python3
"""Payload apply speed and memory: ``update_engine --once`` vs the floor of ``openssl dgst`` + ``dd conv=fsync``.

For each size: builds a USR image of incompressible data and its signed payload, serves it from the dev server on
127.0.0.1, and times ``update_engine --once`` downloading, hashing (whole payload, each operation, the written
partition), verifying and writing it into the passive partition of a GPT image file. In the same run it times the
floor: ``openssl dgst -sha256 PAYLOAD`` followed by ``dd`` of the same image bytes into the same partition offset
with ``conv=notrunc,fsync``. Prints both, the ratio floor/ours (> 1 means we are faster than the two tools run one
after the other) and our peak RSS. Figures, not pass/fail.

Each timed phase starts with a clean page cache (``sync`` first): building the image and the payload leaves
gigabytes of dirty pages whose writeback would otherwise compete with whichever phase runs first.

    .venv/bin/python bench/payload_apply.py [--size-mib 1024] [--sizes 256,1024]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sim.devserver import start_devserver
from sim.disks import make_usr_disk, partition_range
from sim.node import make_node_root, update_engine_args
from sim.payload import key_files
from update_engine.payload.generate import generate_full_payload

USR_B = 4


@dataclass
class Figures:
    size_mib: int
    ours_s: float
    ours_rss_mib: float
    floor_hash_s: float
    floor_dd_s: float
    generate_s: float

    @property
    def floor_s(self) -> float:
        return self.floor_hash_s + self.floor_dd_s


def write_random_image(path: Path, size_mib: int) -> None:
    with path.open("wb") as f:
        for _ in range(size_mib):
            f.write(os.urandom(1 << 20))


def vm_hwm_kib(pid: int) -> int | None:
    """The process's peak RSS so far (VmHWM); rusage's ru_maxrss would include this script's RSS at fork time."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def timed(args: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one child process (RSS sampled from /proc every 20 ms)."""
    with tempfile.TemporaryFile() as err_file:
        start = time.perf_counter()
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err_file)
        peak = 0
        while True:
            hwm = vm_hwm_kib(proc.pid)
            if hwm is not None:
                peak = max(peak, hwm)
            pid, status = os.waitpid(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                break
            time.sleep(0.02)
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            err_file.seek(0)
            raise SystemExit(f"{args[0]} failed ({proc.returncode}): {err_file.read().decode()[-2000:]}")
    return elapsed, peak / 1024


def bench_size(workdir: Path, size_mib: int) -> Figures:
    d = workdir / f"{size_mib}m"
    d.mkdir(parents=True)
    image = d / "usr.img"
    write_random_image(image, size_mib)
    keys = key_files(d)
    payload = d / "update.gz"
    t0 = time.perf_counter()
    generate_full_payload(image, payload, keys.private.read_bytes())
    generate_s = time.perf_counter() - t0

    disk = make_usr_disk(d / "disk.img", usr_mib=size_mib + 2)
    with start_devserver(d / "srv", [(payload, "2.0.0", None)]) as server:
        node = make_node_root(d / "root", server=server.url)
        os.sync()
        ours_s, rss = timed(update_engine_args(node, disk, "USR-A", keys.public, "--once"))

    # The floor writes into a fresh image of the same layout, as ours did: same sparse, unallocated target.
    floor_disk = make_usr_disk(d / "floor-disk.img", usr_mib=size_mib + 2)
    offset, _ = partition_range(floor_disk, USR_B)
    os.sync()
    hash_s, _ = timed(["openssl", "dgst", "-sha256", str(payload)])
    dd_s, _ = timed([
        "dd", f"if={image}", f"of={floor_disk}", "bs=1M", f"seek={offset}", "oflag=seek_bytes",
        "conv=notrunc,fsync", "status=none",
    ])
    return Figures(size_mib, ours_s, rss, hash_s, dd_s, generate_s)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024, help="image size in MiB (default 1024)")
    parser.add_argument("--sizes", help="comma-separated sizes in MiB, overrides --size-mib (e.g. 256,1024)")
    parser.add_argument("--workdir", type=Path, help="scratch directory on disk (default: a temp dir in /var/tmp)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [args.size_mib]
    for tool in ("openssl", "dd", "sgdisk", "cgpt"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed")
    base = Path(tempfile.mkdtemp(prefix="payload-bench-", dir=args.workdir or "/var/tmp"))
    results = []
    try:
        for size in sizes:
            print(f"… {size} MiB: building image and payload, then applying", flush=True)
            results.append(bench_size(base, size))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print()
    print(f"{'size':>8} {'ours s':>8} {'MiB/s':>7} {'openssl s':>9} {'dd+fsync s':>10} {'floor s':>8} "
          f"{'floor/ours':>10} {'peak RSS':>9} {'generate s':>10}")
    for f in results:
        print(f"{f.size_mib:>5}MiB {f.ours_s:>8.2f} {f.size_mib / f.ours_s:>7.0f} {f.floor_hash_s:>9.2f} "
              f"{f.floor_dd_s:>10.2f} {f.floor_s:>8.2f} {f.floor_s / f.ours_s:>10.2f} {f.ours_rss_mib:>6.1f}MiB "
              f"{f.generate_s:>10.1f}")
    print(f"\n(cores: {os.cpu_count()}, this process's own RSS: "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
