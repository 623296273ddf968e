#!/usr/bin/env python3
"""Start-up time of ``locksmithctl``: ``--version`` and ``status`` against one real etcd, with peers.

Starts a single etcd member on 127.0.0.1 with a semaphore that has a holder, then times with hyperfine
(``--runs 20`` after 3 warm-ups, no shell, medians; with bytecode caches written, as an installed package has
them): this tree's ``locksmithctl --version`` and ``status``,
Python doing nothing (the floor any Python command pays), and ``etcdctl get`` of the same key (a Go one-shot
client, like the original locksmithctl). With ``--before DIR`` it also times the ``locksmithctl`` of another
checkout (``DIR`` holding ``locksmithd/``), run by the same interpreter, so a change can be compared in the
same run. Printed: the median wall time, and the mean CPU time (user + system), which a loaded machine inflates
less. Figures, not pass/fail; on a shared machine, read them with the load printed beside them.

    .venv/bin/python bench/locksmithctl_startup.py [--runs 20] [--before /path/to/old/checkout]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from locksmithd.semaphore import Semaphore, key_for_group  # noqa: E402
from sim.etcd import EtcdCluster  # noqa: E402


def hyperfine(commands: dict[str, list[str]], runs: int, env: dict[str, str]) -> dict[str, tuple[float, float]]:
    """Per command name: the median wall time and the mean CPU time (user + system), in seconds."""
    tool = shutil.which("hyperfine")
    if tool is None:
        raise SystemExit("hyperfine is not installed (apt-get install hyperfine)")
    with tempfile.NamedTemporaryFile(suffix=".json") as export:
        argv = [tool, "-N", "--warmup", "3", "--runs", str(runs), "--export-json", export.name, "--style", "none"]
        for name, command in commands.items():
            argv += ["--command-name", name, shlex.join(command)]
        subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
        results = json.loads(Path(export.name).read_text())["results"]
    return {r["command"]: (float(r["median"]), float(r["user"]) + float(r["system"])) for r in results}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20, help="timed runs per command (default 20)")
    parser.add_argument("--before", type=Path, help="another checkout whose locksmithctl is timed too")
    args = parser.parse_args()
    python = sys.executable
    ctl = str(Path(python).with_name("locksmithctl"))
    etcdctl = shutil.which("etcdctl")
    with tempfile.TemporaryDirectory(prefix="ctl-bench-") as work, EtcdCluster(1, Path(work)) as cluster:
        endpoint = cluster.endpoints[0]
        cluster.put(key_for_group(""), Semaphore(0, 1, ("0123456789abcdef0123456789abcdef",)).encode())
        # As on an installed node, modules run from their compiled bytecode: the warm-up runs write it.
        env = {
            k: v for k, v in os.environ.items() if not k.startswith("LOCKSMITHCTL_") and k != "PYTHONDONTWRITEBYTECODE"
        }
        for command in ([ctl, "-endpoint", endpoint, "status"],):
            check = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
            if check.returncode != 0 or "MACHINE ID" not in check.stdout:
                raise SystemExit(f"{' '.join(command)} failed: {check.stdout}{check.stderr}")
        commands = {
            "python -c pass": [python, "-c", "pass"],
            "locksmithctl --version": [ctl, "--version"],
            "locksmithctl status": [ctl, "-endpoint", endpoint, "status"],
        }
        if args.before is not None:
            shim = (
                f"import sys; sys.path.insert(0, {str(args.before)!r}); "
                "from locksmithd.ctl import main; sys.exit(main())"
            )
            commands["before: locksmithctl --version"] = [python, "-c", shim, "--version"]
            commands["before: locksmithctl status"] = [python, "-c", shim, "-endpoint", endpoint, "status"]
        if etcdctl is not None:
            commands["etcdctl get (Go)"] = [etcdctl, f"--endpoints={endpoint}", "get", key_for_group("")]
            env["ETCDCTL_API"] = "3"
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        medians = hyperfine(commands, args.runs, env)
        load_after = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    floor, floor_cpu = medians["python -c pass"]
    print(f"{args.runs} runs each; load average {load} before, {load_after} after ({os.cpu_count()} cores)")
    print(f"{'command':<34} {'median':>9} {'over python':>12} {'CPU':>9} {'over python':>12}")
    for name, (seconds, cpu) in medians.items():
        print(
            f"{name:<34} {seconds * 1000:>6.1f} ms {(seconds - floor) * 1000:>9.1f} ms {cpu * 1000:>6.1f} ms "
            f"{(cpu - floor_cpu) * 1000:>9.1f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
