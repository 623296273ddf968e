#!/usr/bin/env python3
"""Payload apply: ``update_engine --once`` beside bunzip2 on one and on all cores, RAUC 1.8 and SWUpdate 2022.12,
and what an apply costs a busy node.

Five parts, each printed as a table (figures, not pass/fail):

* **startup** — ``update_engine --once`` until its first request and its first payload byte (from its log's
  timestamps), the whole of a 4 MiB update, and the daemon until it tells systemd READY=1, beside
  ``python -c pass``.

* **realistic** — an ext4 image of real files (hard links to part of this machine's ``/usr``, ``mkfs.ext4 -d``)
  and its payload from ``update-payload generate`` (mostly REPLACE_BZ operations, as Flatcar's are). Ours
  downloads it from the dev server on 127.0.0.1, checks every hash and the signature and writes the passive
  partition of a GPT image; beside it, ``bzip2 -dc``, ``lbzip2 -dc`` and ``pbzip2 -dc`` of the same payload's
  bzip2 blobs to /dev/null (decompression alone, nothing checked or written). Goal: ours at least 1.8 times
  faster than one core's ``bzip2 -dc``.
* **incompressible** — random data (REPLACE operations): ours against RAUC (a ``plain`` bundle signed by a
  throw-away CA, installed by its D-Bus service on a private bus into a ``raw`` slot on an image file) and
  SWUpdate (a ``raw`` image in a ``.swu`` with a CMS-signed ``sw-description``, streamed over HTTP from
  127.0.0.1 with ``-d "-u URL"``). Both get an fsync of their slot afterwards, as ours does before it reports
  success. Goal: faster than both, peak RSS at most 48 MiB.
* **generate** — ``generate_full_payload`` of the realistic image on one thread and on all CPUs.
* **polite** — busy loops on every CPU, alone and beside an apply run as the unit runs it (``nice -n 10``,
  ``ionice -c 2 -n 7``) and beside one at normal priority: the busy loops' throughput and the apply's time.

Every contender runs ``--runs`` times (default 3), the contenders taking turns, and the medians are printed:
wall seconds, CPU seconds (user + system, children included) and CPU seconds per GiB of image, and peak RSS
(the sum over the contender's process tree, sampled every 20 ms; for RAUC, its service). Each timed run starts
with a ``sync``, so writeback left by the previous one does not land on it.

    .venv/bin/python bench/payload_apply.py [--sizes 256,1024] [--runs 3] [--parts realistic,incompressible,...]

Needs: sgdisk, cgpt, mkfs.ext4, bzip2, lbzip2, pbzip2, rauc and mksquashfs (squashfs-tools), swupdate,
openssl, dbus-daemon, nice, ionice. Contenders whose tools are missing are left out, saying so.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sim.bus import start_private_bus
from sim.devserver import start_devserver
from sim.disks import make_usr_disk
from sim.node import NodeRoot, make_node_root, update_engine_args
from sim.payload import Keys, key_files
from sim.ports import free_port
from sim.tools import UPDATE_ENGINE_POLICY
from update_engine.payload import update_metadata_pb2 as pb
from update_engine.payload.format import flatten_operations, parse_header, parse_manifest
from update_engine.payload.generate import generate_full_payload
from update_engine.payload.pipeline import usable_cpus

MIB = 1 << 20
SAMPLE_S = 0.02
UNIT_PRIORITY = ["nice", "-n", "10", "ionice", "-c", "2", "-n", "7"]  # units/update-engine.service's Nice/IO

RAUC_POLICY = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <policy user="root">
    <allow own="de.pengutronix.rauc"/>
    <allow send_destination="de.pengutronix.rauc"/>
  </policy>
</busconfig>
"""


# --- measuring ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    wall: float
    cpu: float
    rss_mib: float


def tree_rss_kib(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants now (0 once gone)."""
    total = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            with open(f"/proc/{current}/status") as status:
                total += next((int(line.split()[1]) for line in status if line.startswith("VmRSS:")), 0)
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as children:
                    pending.extend(int(child) for child in children.read().split())
        except (OSError, ValueError):
            continue
    return total


class RssSampler:
    """Samples :func:`tree_rss_kib` of a process in a thread, keeping the peak."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, tree_rss_kib(self._pid))
            self._stop.wait(SAMPLE_S)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_kib / 1024


def cpu_seconds(pid: int) -> float:
    """User + system time of a live process and its reaped children so far (from /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    ticks = sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def measure(args: Sequence[str], *, env: dict[str, str] | None = None, stdout: int = subprocess.DEVNULL) -> Run:
    """Run ``args`` to its end: wall, CPU (with its reaped children), peak RSS of its process tree."""
    os.sync()
    with tempfile.TemporaryFile() as errors:
        start = time.perf_counter()
        proc = subprocess.Popen(list(args), stdout=stdout, stderr=errors, env=env)
        sampler = RssSampler(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        rss = sampler.stop()
        if os.waitstatus_to_exitcode(status) != 0:
            errors.seek(0)
            raise SystemExit(f"{args[0]} failed ({status}): {errors.read().decode(errors='replace')[-2000:]}")
    return Run(wall, usage.ru_utime + usage.ru_stime, rss)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Contender:
    name: str
    verifies: str
    run: Callable[[int], Run]
    runs: list[Run] = field(default_factory=list)

    def median(self) -> Run:
        return Run(
            statistics.median(r.wall for r in self.runs),
            statistics.median(r.cpu for r in self.runs),
            statistics.median(r.rss_mib for r in self.runs),
        )


def take_turns(contenders: list[Contender], runs: int) -> None:
    for turn in range(runs):
        for contender in contenders:
            contender.runs.append(contender.run(turn))
            last = contender.runs[-1]
            print(f"    {contender.name:<28} run {turn + 1}: {last.wall:6.2f} s wall, {last.cpu:6.2f} s CPU, "
                  f"{last.rss_mib:5.1f} MiB", flush=True)


def print_table(title: str, size_mib: int, contenders: list[Contender], baseline: str) -> None:
    """A Markdown table of the medians; "speed" is the baseline's wall time over the contender's."""
    gib = size_mib / 1024
    base = next(c.median().wall for c in contenders if c.name == baseline)
    print(f"\n{title}, {size_mib} MiB image, medians of {len(contenders[0].runs)}:")
    print(f"| contender | wall s | speed vs {baseline} | CPU s | CPU s/GiB | peak RSS MiB | verifies |")
    print("|---|---|---|---|---|---|---|")
    for contender in contenders:
        m = contender.median()
        print(f"| {contender.name} | {m.wall:.2f} | {base / m.wall:.2f}x | {m.cpu:.2f} | {m.cpu / gib:.2f} | "
              f"{m.rss_mib:.1f} | {contender.verifies} |")


# --- material ----------------------------------------------------------------------------------------------------


def write_random_image(path: Path, size_mib: int) -> None:
    with path.open("wb") as stream:
        for _ in range(size_mib):
            stream.write(os.urandom(MIB))


def build_usr_image(path: Path, size_mib: int, source: Path = Path("/usr")) -> None:
    """An ext4 image of ``size_mib`` filled to ~80 % with real files: hard links to ``source``'s regular files
    (copies where a link is not possible), taken in sorted order."""
    staging = Path(tempfile.mkdtemp(prefix="usr-files-", dir=path.parent))
    budget = size_mib * MIB * 80 // 100
    used = 0
    try:
        for root, dirs, files in os.walk(source):
            dirs.sort()
            relative = Path(root).relative_to(source)
            (staging / relative).mkdir(parents=True, exist_ok=True)
            for name in sorted(files):
                src = Path(root) / name
                if src.is_symlink() or not src.is_file() or used + src.stat().st_size > budget:
                    continue
                try:
                    os.link(src, staging / relative / name)
                except OSError:
                    shutil.copy2(src, staging / relative / name)
                used += src.stat().st_size
            if used > budget * 0.98:
                break
        with path.open("wb") as image:
            image.truncate(size_mib * MIB)
        # No journal: a /usr image is read-only, and a journal would take a large share of a small image.
        subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-m", "0", "-O", "^has_journal", "-d", str(staging),
                        str(path)], check=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def bzip2_blobs(payload: Path, out: Path) -> int:
    """The payload's REPLACE_BZ blobs, back to back (one multi-stream .bz2 file); how many there are."""
    data = payload.read_bytes()
    header = parse_header(data[:20])
    manifest = parse_manifest(data[20 : header.metadata_size])
    count = 0
    with out.open("wb") as stream:
        for planned in flatten_operations(manifest):
            if planned.operation.type == pb.InstallOperation.REPLACE_BZ:
                start = header.metadata_size + planned.data_offset
                stream.write(data[start : start + planned.data_length])
                count += 1
    return count


def cpio_crc(out: Path, members: Sequence[Path]) -> None:
    """A ``cpio -H crc`` archive (what SWUpdate reads) of ``members``, in order."""

    def padded(data: bytes) -> bytes:
        return data + bytes(-len(data) % 4)

    with out.open("wb") as stream:
        for inode, path in enumerate([*members, None], start=1):
            name = (path.name if path is not None else "TRAILER!!!").encode() + b"\0"
            data = path.read_bytes() if path is not None else b""
            checksum = sum(data) & 0xFFFFFFFF
            mode = 0o100644 if path is not None else 0
            fields = [inode, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name), checksum]
            stream.write(padded(b"070702" + b"".join(b"%08X" % value for value in fields) + name))
            stream.write(padded(data))


def throwaway_ca(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate and its key: the signer and the keyring of RAUC and SWUpdate here."""
    key, cert = directory / "ca.key.pem", directory / "ca.cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-subj", "/CN=payload-bench", "-days", "2"], check=True, capture_output=True)
    return key, cert


# --- contenders --------------------------------------------------------------------------------------------------


def ours(
    d: Path, payload: Path, public_key: Path, size_mib: int, *, prefix: Sequence[str] = ()
) -> Callable[[int], Run]:
    """update_engine --once from a dev server started here, into a fresh GPT image per run."""

    def run(turn: int) -> Run:
        disk = make_usr_disk(d / f"disk-{turn}.img", usr_mib=size_mib + 2)
        with start_devserver(d / f"srv-{turn}", [(payload, "2.0.0", None)]) as server:
            node = make_node_root(d / f"root-{turn}", server=server.url)
            try:
                return measure([*prefix, *update_engine_args(node, disk, "USR-A", public_key, "--once")])
            finally:
                disk.unlink()
                shutil.rmtree(node.root, ignore_errors=True)

    return run


def command(args: Sequence[str]) -> Callable[[int], Run]:
    def run(turn: int) -> Run:
        return measure(args)

    return run


def rauc(d: Path, image: Path, size_mib: int) -> Callable[[int], Run] | None:
    if not (shutil.which("rauc") and shutil.which("mksquashfs")):
        print("    (RAUC left out: rauc or mksquashfs is not installed)")
        return None
    work = d / "rauc"
    content = work / "content"
    content.mkdir(parents=True)
    key, cert = throwaway_ca(work)
    os.link(image, content / "usr.img")
    (content / "manifest.raucm").write_text(
        "[update]\ncompatible=payload-bench\nversion=2.0\n\n[bundle]\nformat=plain\n\n[image.rootfs]\nfilename=usr.img\n"
    )
    bundle = work / "update.raucb"
    subprocess.run(["rauc", "bundle", f"--cert={cert}", f"--key={key}", str(content), str(bundle)], check=True,
                   capture_output=True)
    (work / "policy.conf").write_text(RAUC_POLICY)

    def run(turn: int) -> Run:
        slots = [work / f"slot-{turn}-{n}.img" for n in (0, 1)]
        for slot in slots:
            with slot.open("wb") as stream:
                stream.truncate(size_mib * MIB)
        (work / "data").mkdir(exist_ok=True)
        (work / "mnt").mkdir(exist_ok=True)
        conf = work / "system.conf"
        conf.write_text(
            f"[system]\ncompatible=payload-bench\nbootloader=noop\nbundle-formats=plain\n"
            f"max-bundle-download-size={8 * size_mib * MIB}\ndata-directory={work / 'data'}\n\n"
            f"[keyring]\npath={cert}\n\n"
            f"[slot.rootfs.0]\ndevice={slots[0]}\ntype=raw\nbootname=A\n\n"
            f"[slot.rootfs.1]\ndevice={slots[1]}\ntype=raw\nbootname=B\n"
        )
        with start_private_bus(work / "bus", [work / "policy.conf"], stand_ins=False) as bus:
            env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": bus.address}
            service = subprocess.Popen(
                ["rauc", "--conf", str(conf), "--mount", str(work / "mnt"), "service", "--override-boot-slot=A"],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            try:
                deadline = time.monotonic() + 10
                while subprocess.run(["rauc", "--conf", str(conf), "status"], env=env, capture_output=True,
                                     check=False).returncode != 0:
                    if time.monotonic() > deadline:
                        raise SystemExit("rauc service did not come up on the private bus within 10 s")
                    time.sleep(0.1)
                sampler = RssSampler(service.pid)
                cpu_before = cpu_seconds(service.pid)
                client = measure(["rauc", "--conf", str(conf), "install", str(bundle)], env=env)
                start = time.perf_counter()
                fsync_path(slots[1])
                fsync_s = time.perf_counter() - start
                cpu = cpu_seconds(service.pid) - cpu_before + client.cpu
                rss = max(sampler.stop(), client.rss_mib)
            finally:
                service.terminate()
                service.wait(timeout=30)
        if not filecmp_prefix(slots[1], image):
            raise SystemExit("RAUC did not write the image to slot B")
        for slot in slots:
            slot.unlink()
        return Run(client.wall + fsync_s, cpu, rss)

    return run


def swupdate(d: Path, image: Path, size_mib: int) -> Callable[[int], Run] | None:
    if not shutil.which("swupdate"):
        print("    (SWUpdate left out: swupdate is not installed)")
        return None
    work = d / "swupdate"
    work.mkdir()
    key, cert = throwaway_ca(work)
    slot = work / "slot.img"
    digest = hashlib.sha256()
    with image.open("rb") as stream:
        while block := stream.read(MIB):
            digest.update(block)
    description = work / "sw-description"
    description.write_text(
        'software =\n{\n\tversion = "2.0";\n\thardware-compatibility = [ "rev1" ];\n\timages: (\n\t\t{\n'
        f'\t\t\tfilename = "usr.img";\n\t\t\tdevice = "{slot}";\n\t\t\ttype = "raw";\n'
        f'\t\t\tsha256 = "{digest.hexdigest()}";\n\t\t}}\n\t);\n}}\n'
    )
    signature = work / "sw-description.sig"
    subprocess.run(["openssl", "cms", "-sign", "-in", str(description), "-out", str(signature), "-signer",
                    str(cert), "-inkey", str(key), "-outform", "DER", "-nosmimecap", "-binary"], check=True)
    served = work / "www"
    served.mkdir()
    os.link(image, work / "usr.img")
    cpio_crc(served / "update.swu", [description, signature, work / "usr.img"])
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(served),
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    SERVERS.append(server)

    def run(turn: int) -> Run:
        with slot.open("wb") as stream:
            stream.truncate(size_mib * MIB)
        result = measure(["swupdate", "-k", str(cert), "-H", "board:rev1", "-d",
                          f"-u http://127.0.0.1:{port}/update.swu"])
        start = time.perf_counter()
        fsync_path(slot)
        fsync_s = time.perf_counter() - start
        if not filecmp_prefix(slot, image):
            raise SystemExit("SWUpdate did not write the image to its slot")
        slot.unlink()
        return Run(result.wall + fsync_s, result.cpu, result.rss_mib)

    return run


SERVERS: list[subprocess.Popen[bytes]] = []


def filecmp_prefix(written: Path, image: Path) -> bool:
    with written.open("rb") as a, image.open("rb") as b:
        while block := b.read(MIB):
            if a.read(len(block)) != block:
                return False
    return True


# --- parts -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Material:
    directory: Path
    image: Path
    keys: Keys
    payload: Path


def material(base: Path, part: str, size_mib: int, *, real_files: bool, generate: bool = True) -> Material:
    """A scratch directory with an image (real files, or random data), a signing key and the image's payload."""
    d = base / f"{part}-{size_mib}"
    d.mkdir(parents=True)
    image = d / "usr.img"
    if real_files:
        build_usr_image(image, size_mib)
    else:
        write_random_image(image, size_mib)
    keys = key_files(d)
    payload = d / "update.gz"
    if generate:
        generate_full_payload(image, payload, keys.private.read_bytes())
    return Material(d, image, keys, payload)

OURS_VERIFIES = ("RSA signature over the payload, its SHA-256 from Omaha, each operation's SHA-256 before its "
                 "write, the written partition's SHA-256")


def part_realistic(base: Path, size_mib: int, runs: int) -> None:
    m = material(base, "realistic", size_mib, real_files=True, generate=False)
    d, image, keys, payload = m.directory, m.image, m.keys, m.payload
    jobs = usable_cpus()
    generated = {}
    for threads in sorted({1, jobs}):
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        result = generate_full_payload(image, payload, keys.private.read_bytes(), jobs=threads)
        after = resource.getrusage(resource.RUSAGE_SELF)
        generated[threads] = (time.perf_counter() - start, after.ru_utime + after.ru_stime - before.ru_utime
                              - before.ru_stime)
    blobs = d / "blobs.bz2"
    count = bzip2_blobs(payload, blobs)
    print(f"  {size_mib} MiB of /usr files: payload {result.size / MIB:.1f} MiB, {result.operations} operations, "
          f"{count} REPLACE_BZ", flush=True)
    contenders = [Contender("update_engine --once", OURS_VERIFIES, ours(d, payload, keys.public, size_mib)),
                  Contender("bzip2 -dc", "nothing (decompression only)", command(["bzip2", "-dc", str(blobs)]))]
    if shutil.which("lbzip2"):
        contenders.append(Contender(f"lbzip2 -dc -n {jobs}", "nothing (decompression only)",
                                    command(["lbzip2", "-dc", "-n", str(jobs), str(blobs)])))
    if shutil.which("pbzip2"):
        contenders.append(Contender(f"pbzip2 -dc -p{jobs}", "nothing (decompression only)",
                                    command(["pbzip2", "-dc", f"-p{jobs}", str(blobs)])))
    take_turns(contenders, runs)
    print_table("Realistic payload", size_mib, contenders, "bzip2 -dc")
    print(f"\ngenerate, {size_mib} MiB of /usr files: " + ", ".join(
        f"{threads} thread{'s' if threads > 1 else ''} {wall:.1f} s wall / {cpu:.1f} s CPU"
        for threads, (wall, cpu) in generated.items()))
    shutil.rmtree(d, ignore_errors=True)


def part_incompressible(base: Path, size_mib: int, runs: int) -> None:
    m = material(base, "incompressible", size_mib, real_files=False)
    d, image, keys, payload = m.directory, m.image, m.keys, m.payload
    contenders = [Contender("update_engine --once", OURS_VERIFIES, ours(d, payload, keys.public, size_mib))]
    rauc_run = rauc(d, image, size_mib)
    if rauc_run is not None:
        contenders.append(Contender("RAUC 1.8 (plain bundle, local file)",
                                    "CMS signature over the whole bundle, read in full before installing",
                                    rauc_run))
    swupdate_run = swupdate(d, image, size_mib)
    if swupdate_run is not None:
        contenders.append(Contender("SWUpdate 2022.12 (streamed)",
                                    "CMS signature of sw-description; the image's SHA-256, known only after it "
                                    "is written", swupdate_run))
    take_turns(contenders, runs)
    print_table("Incompressible payload", size_mib, contenders, "update_engine --once")
    shutil.rmtree(d, ignore_errors=True)


# Counts until SIGTERM, then prints the count: a CPU-bound workload that knows nothing of the apply.
BUSY_LOOP = """
import signal, sys
n = 0
def stop(*_):
    print(n, flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
while True:
    n += 1
"""


def busy_rate(during: Callable[[], float], idle_s: float) -> tuple[float, float]:
    """Busy loops on every usable CPU while ``during`` runs (or for ``idle_s``): their total count per second
    and what ``during`` returned."""
    loops = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP], stdout=subprocess.PIPE, text=True)
             for _ in range(usable_cpus())]
    time.sleep(0.5)  # let them start counting
    start = time.perf_counter()
    try:
        if idle_s > 0:
            time.sleep(idle_s)
            value = 0.0
        else:
            value = during()
    finally:
        elapsed = time.perf_counter() - start
        for loop in loops:
            loop.terminate()
        counts = [int(loop.communicate(timeout=30)[0] or 0) for loop in loops]
    return sum(counts) / (elapsed + 0.5), value


def part_polite(base: Path, size_mib: int, runs: int) -> None:
    """Busy loops' throughput alone, beside an apply at the unit's priority and beside one at normal priority."""
    m = material(base, "polite", size_mib, real_files=True)
    d, keys, payload = m.directory, m.keys, m.payload
    rows: dict[str, list[tuple[float, float]]] = {"no apply": [], "unit priority": [], "normal priority": []}
    for turn in range(runs):
        for label in rows:
            prefix = UNIT_PRIORITY if label == "unit priority" else []
            apply = ours(d, payload, keys.public, size_mib, prefix=prefix)
            if label == "no apply":
                rate, wall = busy_rate(float, idle_s=8.0)
            else:
                rate, wall = busy_rate(functools.partial(lambda run, n: run(n).wall, apply, turn), idle_s=0)
            rows[label].append((rate, wall))
            print(f"    {label:<16} run {turn + 1}: busy loops {rate / 1e6:.2f} M/s, apply {wall:.2f} s", flush=True)
    alone = statistics.median(rate for rate, _ in rows["no apply"])
    print(f"\nPolite, {size_mib} MiB of /usr files, {usable_cpus()} busy loops, medians of {runs}:")
    print("| apply | busy loops' throughput | apply wall s |")
    print("|---|---|---|")
    for label, values in rows.items():
        rate = statistics.median(v[0] for v in values)
        wall = statistics.median(v[1] for v in values)
        shown = f"{wall:.2f}" if label != "no apply" else "–"
        print(f"| {label} | {rate / alone:.0%} | {shown} |")
    shutil.rmtree(d, ignore_errors=True)


# The environment of a command that starts as an installed one does: with the bytecode caches written.
CACHED_BYTECODE = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def _log_time(log: str, marker: str) -> float | None:
    """The wall-clock time of the first log line containing ``marker`` (``%Y-%m-%d %H:%M:%S,mmm`` first)."""
    for line in log.splitlines():
        if marker in line:
            stamp, _, millis = line[:23].partition(",")
            return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000
    return None


def part_startup(base: Path, size_mib: int, runs: int) -> None:
    """Start-up: ``update_engine --once`` until its first request and its first payload byte, and the daemon
    until READY=1, beside ``python -c pass``; ten runs each after one not counted, medians, with bytecode caches
    written as an installed package has them (size-independent: the first size only)."""
    if (base / "startup").exists():
        return
    m = material(base, "startup", 4, real_files=False)
    d = m.directory
    floor, first_request, first_byte, whole, ready = [], [], [], [], []
    for turn in range(11):
        if turn == 1:  # the first run wrote the bytecode caches
            floor, first_request, first_byte, whole, ready = [], [], [], [], []
        start = time.time()
        subprocess.run([sys.executable, "-c", "pass"], check=True, env=CACHED_BYTECODE)
        floor.append(time.time() - start)
        disk = make_usr_disk(d / f"disk-{turn}.img", usr_mib=6)
        with start_devserver(d / f"srv-{turn}", [(m.payload, "2.0.0", None)]) as server:
            node = make_node_root(d / f"root-{turn}", server=server.url)
            start = time.time()
            done = subprocess.run(update_engine_args(node, disk, "USR-A", m.keys.public, "--once"),
                                  capture_output=True, text=True, check=True, env=CACHED_BYTECODE)
            whole.append(time.time() - start)
            asked, downloading = _log_time(done.stderr, "Checking for update at"), _log_time(done.stderr, "Downloading")
            if asked is None or downloading is None:
                raise SystemExit(f"update_engine --once did not log its request:\n{done.stderr[-2000:]}")
            first_request.append(asked - start)
            first_byte.append(downloading - start)
        ready.append(_time_to_ready(d / f"daemon-{turn}", node, disk, m.keys.public))
        disk.unlink()
        shutil.rmtree(node.root, ignore_errors=True)
    ms = lambda values: f"{statistics.median(values) * 1000:.0f} ms"  # noqa: E731
    print("\nStart-up, medians of 10 (log timestamps have millisecond resolution):")
    print(f"| python -c pass | {ms(floor)} |")
    print(f"| update_engine --once: its first request | {ms(first_request)} |")
    print(f"| update_engine --once: its first payload byte | {ms(first_byte)} |")
    print(f"| update_engine --once: the whole 4 MiB update | {ms(whole)} |")
    print(f"| update_engine daemon: READY=1 | {ms(ready)} |")


def _time_to_ready(d: Path, node: NodeRoot, disk: Path, public_key: Path) -> float:
    """Seconds from starting the daemon (private bus) until it tells systemd READY=1."""
    d.mkdir()
    bus = start_private_bus(d / "dbus", [UPDATE_ENGINE_POLICY])
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(d / "notify"))
    notify.settimeout(30)
    try:
        start = time.time()
        daemon = subprocess.Popen(
            [*update_engine_args(node, disk, "USR-A", public_key), "--bus-address", bus.address,
             "--first-check-delay", "3600"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**CACHED_BYTECODE, "NOTIFY_SOCKET": str(d / "notify")},
        )
        try:
            while b"READY=1" not in notify.recv(4096):
                pass
            return time.time() - start
        finally:
            daemon.terminate()
            daemon.wait(timeout=30)
    finally:
        notify.close()
        bus.stop()


PARTS = {
    "startup": part_startup, "realistic": part_realistic, "incompressible": part_incompressible,
    "polite": part_polite,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="256,1024", help="image sizes in MiB, comma-separated (default 256,1024)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each contender (default 3)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"which parts (default {','.join(PARTS)})")
    parser.add_argument("--workdir", type=Path, help="scratch directory on disk (default: a temp dir in /var/tmp)")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    parts = [part.strip() for part in args.parts.split(",")]
    for tool in ("sgdisk", "cgpt", "mkfs.ext4", "bzip2", "openssl", "dbus-daemon", "nice", "ionice"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed")
    base = Path(tempfile.mkdtemp(prefix="payload-bench-", dir=args.workdir or "/var/tmp"))
    with open("/proc/loadavg") as loadavg:
        load = loadavg.read().split()[:3]
    print(f"{os.cpu_count()} CPUs ({usable_cpus()} usable), load average {' '.join(load)} at the start")
    try:
        for part in parts:
            for size in sizes:
                print(f"… {part}, {size} MiB", flush=True)
                PARTS[part](base, size, args.runs)
    finally:
        for server in SERVERS:
            server.terminate()
            server.wait(timeout=30)
        shutil.rmtree(base, ignore_errors=True)
    with open("/proc/loadavg") as loadavg:
        print(f"\nload average {' '.join(loadavg.read().split()[:3])} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
