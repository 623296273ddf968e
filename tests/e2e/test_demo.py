"""The README's first command without its set-up part: ``python -m demo.fleet``, both scenarios on coreupdate (the
update scenario with ``--serve``, whose server is then asked through its API), the dev server, and Ctrl-C.

Each run starts a real etcd, the update server and three nodes with the real daemons; the checks read the demo's
output as a user would (and the API), and then look for any process still running from the demo's work directory.
"""

from __future__ import annotations

import contextlib
import http.cookiejar
import itertools
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_tool

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
RUN_LIMIT = 170  # the demo gives up by itself after 110 s, then stops everything
APP = "e96281a6-d1af-4bde-9a0a-97b76e56dc57"
NODES = ("node-1", "node-2", "node-3")


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


class Lines:
    """The lines of a running demo's output, read by a thread as they come (a select() on the pipe would miss the
    lines already in the reader's buffer)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        self.proc, self.stdout = proc, proc.stdout
        self.queue: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.stdout:
            self.queue.put(line)

    def until(self, text: str, timeout: float) -> str:
        """Everything read until a line holding ``text`` (or the deadline, or the end of the output)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not (self.seen and text in self.seen[-1]):
            with contextlib.suppress(queue.Empty):
                self.seen.append(self.queue.get(timeout=1))
                continue
            if not self.thread.is_alive() and self.queue.empty():
                break
        return "".join(self.seen)

    def rest(self) -> str:
        """What follows, once the process has ended."""
        self.thread.join(timeout=30)
        return "".join(self.queue.get_nowait() for _ in range(self.queue.qsize()))


def stop(proc: subprocess.Popen[str]) -> None:
    """After a failed check: SIGTERM first, so that the demo stops what it started (SIGKILL would orphan it)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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


def check_updated(output: str, node: str, *, server: bool = True) -> None:
    assert node_line(output, node, r"DOWNLOADING 100%")
    assert node_line(output, node, r"VERIFYING")
    assert node_line(output, node, r"flags armed: USR-B priority=2 tries=1 successful=0")
    assert node_line(output, node, r"lock taken \(holders: " + node + r", 1/1\)")
    assert node_line(output, node, r"reboot requested \(logind Reboot\)")
    assert node_line(output, node, r"boot USR-B 2\.0\.0 \(tries 1→0\)")
    assert node_line(output, node, r"marked good: USR-B priority=\d+ tries=0 successful=1")
    assert node_line(output, node, r"lock released \(holders: none, 0/1\)")
    row = summary_row(output, node)
    assert re.search(rf"{node}\s+1\.0\.0 → 2\.0\.0\s+USR-B 2\.0\.0 \(successful\)\s+IDLE\s", row), row
    assert row.endswith(" updated"), row
    if server:
        assert node_line(output, node, r"server: checked in running 1\.0\.0 \(Undefined\), nothing to grant")
        assert node_line(output, node, r"server: UpdateGranted 2\.0\.0")
        assert node_line(output, node, r"server: Downloading, after 13/1 download started")
        assert node_line(output, node, r"server: Installed, after 3/1 update installed")
        assert node_line(output, node, r"server: Complete, after 3/2 up after boot \(previous version 1\.0\.0\)")
        assert re.search(r"\sComplete on 2\.0\.0\s+updated$", row), row


def check_one_reboot_at_a_time(output: str) -> None:
    assert "Never more than 1 node down at once (max 1)" in output
    assert "No revision of the semaphore had more than 1 holder." in output
    # Every revision of the key: each node took the lock once and gave it back.
    revisions = re.findall(r"^\s+rev\s+\d+\s+max=1\s+holders: (.*)$", output, re.MULTILINE)
    assert sorted(h for h in revisions if h != "-") == list(NODES)
    assert revisions[-1] == "-"


def operator_line(output: str, command: str) -> bool:
    return re.search(rf"^\s*[\d.]+s\s+admin\s+\$ {command}", output, re.MULTILINE) is not None


def dashboard_page(base: str, user: str, password: str, path: str) -> str:
    """A dashboard page, after signing in as a browser would (the form's token, its cookie, the session)."""
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    with opener.open(f"{base}/login", timeout=30) as response:
        form = response.read().decode()
    token = re.search(r'name="csrf_token" value="([^"]+)"', form)
    assert token, form
    data = urllib.parse.urlencode({"csrf_token": token[1], "name": user, "password": password, "next": path})
    with opener.open(f"{base}/login", data.encode(), timeout=30) as response:
        return str(response.read().decode())


def api(url: str, token: str, path: str) -> Any:
    request = urllib.request.Request(f"{url}api/v1{path}", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


def test_update_scenario_rolls_out_on_coreupdate_one_node_at_a_time_then_serves(tmp_path: Path) -> None:
    """The default: coreupdate set up with the operator's commands, the rollout paced by the group's limit;
    ``--serve`` then keeps the server up, whose API agrees, until SIGTERM stops everything."""
    proc = subprocess.Popen(
        demo_command(tmp_path, "--scenario", "update", "--serve"), cwd=REPO, env=demo_env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines = Lines(proc)
    try:
        out = lines.until("Ctrl-C or SIGTERM stops everything.", RUN_LIMIT)
        print(out)
        assert "Ctrl-C or SIGTERM stops everything." in out, out[-3000:]
        assert operator_line(out, r"coreupdate token create --data-dir coreupdate --name demo")
        assert operator_line(out, r"coreupdate serve --listen 127\.0\.0\.1:\d+ --data-dir coreupdate "
                                  r"--payload-public-key release/key\.pub\.pem --history-resolution 5 &")  # fmt: skip
        assert operator_line(out, r"coreupdate user add admin --role admin --data-dir coreupdate")
        assert operator_line(out, r"updateservicectl group create --app-id \$APP --group-id demo-fleet .*"
                                  r"--channel stable --update-count 1 --update-interval 10")  # fmt: skip
        assert operator_line(out, r"updateservicectl package create --app-id \$APP --version 2\.0\.0 "
                                  r"--file release/update-2\.0\.0\.gz --public-key release/key\.pub\.pem")  # fmt: skip
        assert operator_line(out, r"updateservicectl channel update --app-id \$APP --channel stable --version 2\.0\.0")
        for node in NODES:
            check_updated(out, node)
        # One node at a time: the two that asked while another was in flight were held back first.
        held = {node for node in NODES if node_line(out, node, r"server: OnHold, held back by the rollout's limit")}
        assert len(held) == 2, out
        check_one_reboot_at_a_time(out)
        assert "The update server agrees: every instance Complete on 2.0.0." in out
        assert "OK: update scenario completed" in out

        url = re.search(r"coreupdate keeps serving at (http://127\.0\.0\.1:\d+/)", out)
        token = re.search(r"API token:\s+(\S+)", out)
        assert url and token, out
        instances = api(url[1], token[1], f"/apps/{APP}/instances?group=demo-fleet")["instances"]
        assert [(i["status"], i["version"]) for i in instances] == [("Complete", "2.0.0")] * 3
        # The group's limit as the server applied it: each grant 10 s or more after the one before, and only
        # once the one before was complete (its status set no later than the next grant).
        grants = sorted(instances, key=lambda i: i["granted_at"])
        for before, after in itertools.pairwise(grants):
            assert after["granted_at"] - before["granted_at"] >= 10, grants
            assert before["status_at"] <= after["granted_at"], grants
        # The dashboard, with the account the demo printed: the group's rollout is complete.
        dashboard = re.search(r"dashboard:\s+(http://127\.0\.0\.1:\d+)/", out)
        sign_in = re.search(r"sign in:\s+(\S+) / (\S+)", out)
        assert dashboard and sign_in, out
        overview = dashboard_page(dashboard[1], sign_in[1], sign_in[2], "/")
        assert "demo-fleet" in overview and "Complete" in overview and "3 of 3 (100 %)" in overview

        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        rest = lines.rest()
    finally:
        stop(proc)
    assert proc.returncode == 0, rest
    assert "stopping the fleet and coreupdate" in rest
    assert "Traceback" not in rest, rest
    assert leftover_processes(tmp_path) == []
    assert list(tmp_path.iterdir()) == []  # the work directory is removed after a successful run


def test_rollback_scenario_falls_back_the_server_records_it_and_the_others_update(tmp_path: Path) -> None:
    result = run_demo(tmp_path, "--scenario", "rollback")
    assert result.returncode == 0, result.stdout[-3000:]
    out = result.stdout
    assert node_line(out, "node-1", r"boot USR-B 2\.0\.0 \(tries 1→0\)")
    assert node_line(out, "node-1", r"kernel panic")
    assert node_line(out, "node-1", r"boot USR-A 1\.0\.0")
    assert node_line(out, "node-1", r"lock released \(holders: none, 0/1\)")
    assert node_line(out, "node-1", r"server: RolledBack, after 3/0 update failed, errorcode 44 ROLLBACK_ERROR")
    # The server grants node-1 nothing more: 2.0.0 is never offered to it again, so it never declines it.
    assert len(re.findall(r"^\s*[\d.]+s\s+node-1\s+server: UpdateGranted", out, re.MULTILINE)) == 1
    assert not node_line(out, "node-1", r"Omaha event 3/9")
    row = summary_row(out, "node-1")
    assert re.search(r"node-1\s+1\.0\.0 → 1\.0\.0\s+USR-A 1\.0\.0 \(successful; after a failed boot\)\s+IDLE\s+"
                     r"RolledBack on 1\.0\.0 \(error 44\)\s+rolled back$", row), row  # fmt: skip
    for node in ("node-2", "node-3"):
        check_updated(out, node)
    check_one_reboot_at_a_time(out)
    assert "The update server agrees: node-1 RolledBack on 1.0.0; every other instance Complete on 2.0.0." in out
    assert "OK: rollback scenario completed" in out
    assert leftover_processes(tmp_path) == []


def test_the_dev_server_offers_the_release_to_every_node_at_once(tmp_path: Path) -> None:
    """``--server devserver``: no operator, no server view; every node downloads at its first check, and the etcd
    lock alone paces the reboots."""
    result = run_demo(tmp_path, "--scenario", "update", "--server", "devserver")
    assert result.returncode == 0, result.stdout[-3000:]
    out = result.stdout
    assert "Omaha dev server at http://127.0.0.1:" in out
    assert not re.search(r"^\s*[\d.]+s\s+admin\s", out, re.MULTILINE)
    for node in NODES:
        check_updated(out, node, server=False)
        assert node_line(out, node, r"Omaha event 3/2 up after boot \(previous version 1\.0\.0\)")
        assert not node_line(out, node, r"server: ")
    check_one_reboot_at_a_time(out)
    assert "Events the Omaha dev server received:" in out
    assert "OK: update scenario completed" in out
    assert leftover_processes(tmp_path) == []


def test_ctrl_c_stops_everything_the_demo_started(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        demo_command(tmp_path, "--scenario", "update"), cwd=REPO, env=demo_env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines = Lines(proc)
    try:
        # Interrupt once the daemons of some node run, so every kind of process exists.
        seen = lines.until("update_engine up", 90)
        assert "update_engine up" in seen, seen
        assert leftover_processes(tmp_path) != []
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        rest = lines.rest()
    finally:
        stop(proc)
    assert proc.returncode == 130, seen + rest
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
        stop(proc)
    assert "Traceback" not in err, err
    assert proc.returncode == 141, err
    assert leftover_processes(tmp_path) == []
