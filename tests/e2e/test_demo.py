"""The README's first command without its set-up part: ``python -m demo.fleet``, both scenarios, and Ctrl-C.

Each run starts a real etcd, the dev server and three nodes with the real daemons; the checks read the demo's
output as a user would, and then look for any process still running from the demo's work directory.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import require_tool

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
RUN_LIMIT = 170  # the demo gives up by itself after 110 s, then stops everything


@pytest.fixture(autouse=True)
def _tools() -> None:
    for tool in ("etcd", "dbus-daemon", "sgdisk"):
        require_tool(tool)


def demo_command(workdir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "demo.fleet", "--workdir", str(workdir), *args]


def demo_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DBUS_", "LOCKSMITHD_", "NOTIFY_SOCKET"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_demo(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        demo_command(workdir, *args), cwd=REPO, env=demo_env(), capture_output=True, text=True,
        timeout=RUN_LIMIT, check=False,
    )  # fmt: skip
    print(result.stdout)
    print(result.stderr, file=sys.stderr)
    return result


def leftover_processes(workdir: Path) -> list[str]:
    """Command lines of running processes that mention ``workdir`` (daemons, buses, etcd, dev server)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(workdir) in cmdline and "-m demo.fleet" not in cmdline:
            found.append(f"{proc.name}: {cmdline.strip()}")
    return found


def node_line(output: str, node: str, pattern: str) -> bool:
    """Whether a time-stamped line of ``node`` matches ``pattern``."""
    return re.search(rf"^\s*[\d.]+s\s+{node}\s+{pattern}", output, re.MULTILINE) is not None


def summary_row(output: str, node: str) -> str:
    summary = output.split("Summary", 1)[-1]
    rows = [line for line in summary.splitlines() if line.strip().startswith(node + " ")]
    assert rows, f"no summary row for {node}"
    return rows[0]


def check_updated(output: str, node: str) -> None:
    assert node_line(output, node, r"flags armed: USR-B priority=2 tries=1 successful=0")
    assert node_line(output, node, r"lock taken \(holders: " + node + r", 1/1\)")
    assert node_line(output, node, r"reboot requested \(logind Reboot\)")
    assert node_line(output, node, r"boot USR-B 2\.0\.0 \(tries 1→0\)")
    assert node_line(output, node, r"marked good: USR-B priority=\d+ tries=0 successful=1")
    assert node_line(output, node, r"lock released \(holders: none, 0/1\)")
    assert re.search(rf"{node}\s+1\.0\.0 → 2\.0\.0\s+USR-B\s+1\s.*\supdated$", summary_row(output, node))


def test_update_scenario_updates_every_node_one_reboot_at_a_time(tmp_path: Path) -> None:
    result = run_demo(tmp_path, "--scenario", "update")
    assert result.returncode == 0, result.stdout[-3000:]
    out = result.stdout
    for node in ("node-1", "node-2", "node-3"):
        assert node_line(out, node, r"DOWNLOADING 100%")
        assert node_line(out, node, r"VERIFYING")
        check_updated(out, node)
    assert "Never more than 1 node down at once (max 1)" in out
    assert "No revision of the semaphore had more than 1 holder." in out
    # Every revision of the key: each node took the lock once and gave it back.
    revisions = re.findall(r"^\s+rev\s+\d+\s+max=1\s+holders: (.*)$", out, re.MULTILINE)
    assert sorted(h for h in revisions if h != "-") == ["node-1", "node-2", "node-3"]
    assert revisions[-1] == "-"
    assert "OK: update scenario completed" in out
    assert leftover_processes(tmp_path) == []
    assert list(tmp_path.iterdir()) == []  # the work directory is removed after a successful run


def test_rollback_scenario_falls_back_and_the_others_update(tmp_path: Path) -> None:
    result = run_demo(tmp_path, "--scenario", "rollback")
    assert result.returncode == 0, result.stdout[-3000:]
    out = result.stdout
    assert node_line(out, "node-1", r"boot USR-B 2\.0\.0 \(tries 1→0\)")
    assert node_line(out, "node-1", r"kernel panic")
    assert node_line(out, "node-1", r"boot USR-A 1\.0\.0")
    assert node_line(out, "node-1", r"Omaha event 3/0 update failed, errorcode 44 ROLLBACK_ERROR")
    assert node_line(out, "node-1", r"Omaha event 3/9 update deferred, errorcode 36 OMAHA_UPDATE_DEFERRED")
    assert node_line(out, "node-1", r"lock released \(holders: none, 0/1\)")
    assert re.search(r"node-1\s+1\.0\.0 → 1\.0\.0\s+USR-A \(after a failed boot\)\s.*\srolled back$",
                     summary_row(out, "node-1"))  # fmt: skip
    for node in ("node-2", "node-3"):
        check_updated(out, node)
    assert "Never more than 1 node down at once (max 1)" in out
    assert "OK: rollback scenario completed" in out
    assert leftover_processes(tmp_path) == []


def test_ctrl_c_stops_everything_the_demo_started(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        demo_command(tmp_path, "--scenario", "update"), cwd=REPO, env=demo_env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    seen = []
    deadline = time.monotonic() + 60
    try:
        # Interrupt once the daemons of some node run, so every kind of process exists.
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 1)
            if not ready:
                continue
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if "update_engine up" in line:
                break
        assert any("update_engine up" in line for line in seen), "".join(seen)
        assert leftover_processes(tmp_path) != []
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, "".join(seen) + rest
    assert "interrupted; everything the demo started is stopped" in rest
    assert leftover_processes(tmp_path) == []


def test_a_reader_that_goes_away_stops_the_demo_quietly(tmp_path: Path) -> None:
    """``demo/run | head -0``: no traceback, everything stopped, the exit status of a writer whose pipe closed."""
    proc = subprocess.Popen(
        demo_command(tmp_path, "--scenario", "update"), cwd=REPO, env=demo_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    proc.stdout.close()  # the reader is gone before the first line
    try:
        _, err = proc.communicate(timeout=RUN_LIMIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in err, err
    assert proc.returncode == 141, err
    assert leftover_processes(tmp_path) == []
