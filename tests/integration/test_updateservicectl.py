"""``updateservicectl`` and ``coreupdate``'s admin commands against a running server: outputs, ``--json``,
exit codes scripts rely on, signed-payload checks, simulated clients, ``watch``, and no traceback anywhere
(also on a closed pipe)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from sim.coreupdate import COREOS_APP_ID, CoreUpdateServer, coreupdate_command, start_coreupdate
from sim.payload import Keys, key_pair, write_sparse_payload
from sim.tools import VENV_BIN
from update_engine.payload.generate import generate_full_payload

pytestmark = pytest.mark.integration

APP_ARG = "{" + COREOS_APP_ID.upper() + "}"  # braces and upper case are accepted


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory, keys: Keys, other_keys: Keys) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("payload")
    image = d / "usr.img"
    image.write_bytes(os.urandom(8192) + b"usr " * 4096)
    generate_full_payload(image, d / "update.gz", keys.private.read_bytes())
    return {"payload": d / "update.gz", "public": keys.public, "other": other_keys.public}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoreUpdateServer]:
    srv = start_coreupdate(tmp_path_factory.mktemp("srv"))
    try:
        yield srv
    finally:
        srv.stop()


def ctl(server: CoreUpdateServer | None, *args: str, key: str | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = [str(VENV_BIN / "updateservicectl")]
    if server is not None:
        base += ["--server", server.url, "--key", server.token if key is None else key]
    return subprocess.run(base + list(args), capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def ok(server: CoreUpdateServer, *args: str) -> str:
    result = ctl(server, *args)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


def test_a_rollout_driven_from_the_command_line(server: CoreUpdateServer, signed: dict[str, Path]) -> None:
    refused = ctl(server, "package", "create", "--app-id", APP_ARG, "--version", "2.0.0",
                  "--file", str(signed["payload"]), "--public-key", str(signed["other"]))
    assert refused.returncode == 1
    assert "is not a valid payload signed by --public-key" in refused.stderr and "Traceback" not in refused.stderr
    out = ok(server, "package", "create", "--app-id", APP_ARG, "--version", "2.0.0", "--file",
             str(signed["payload"]), "--public-key", str(signed["public"]))
    assert out.splitlines()[0].split() == ["Version", "Size", "Sha256", "Url"]
    assert f"/v1/packages/{COREOS_APP_ID}/2.0.0/update.gz" in out
    ok(server, "package", "create", "--app-id", COREOS_APP_ID, "--version", "2.1.0", "--file",
       str(signed["payload"]), "--public-key", str(signed["public"]), "--url", "https://mirror.example/x/u.gz")
    ok(server, "channel", "create", "--app-id", COREOS_APP_ID, "--channel", "edge", "--version", "2.0.0")
    ok(server, "group", "create", "--app-id", COREOS_APP_ID, "--channel", "edge", "--group-id", "canary",
       "--label", "Canary")
    out = ok(server, "group", "update", "--app-id", COREOS_APP_ID, "--group-id", "canary",
             "--update-count", "2", "--update-interval", "5400", "--failure-pause-count", "3",
             "--office-hours", "Mon-Sun 0:00 24h", "--timezone", "Europe/Berlin")
    header, row = out.splitlines()
    assert header.split() == ["Label", "App", "Channel", "Id", "UpdatesPaused", "UpdateCount", "UpdateInterval",
                              "Rollout"]
    assert row.split()[:7] == ["Canary", COREOS_APP_ID, "edge", "canary", "false", "2", "5400"]
    # Aligned columns: every row's cells start where the header's do.
    assert row.index(COREOS_APP_ID) == header.index("App")

    fake = ok(server, "instance", "fake", "--app-id", COREOS_APP_ID, "--group-id", "canary", "--version", "1.0.0",
              "--clients-per-app", "3", "--min-sleep", "0", "--max-sleep", "0")
    assert fake.splitlines() == ["{fake-client-000}: updated from 1.0.0 to 2.0.0",
                                 "{fake-client-001}: updated from 1.0.0 to 2.0.0", "{fake-client-002}: noupdate"]
    # Events are written behind the answers: wait (bounded) until the last ones are in.
    deadline = time.monotonic() + 20
    while True:
        listed = json.loads(ok(server, "--json", "instance", "list", "--app-id", COREOS_APP_ID, "--group-id",
                               "canary"))
        statuses = {i["machine_id"]: i["status"] for i in listed["instances"]}
        if statuses.get("fake-client-001") == "Complete" or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert statuses["fake-client-000"] == "Complete" and statuses["fake-client-001"] == "Complete"
    assert statuses["fake-client-002"] == "OnHold"
    versions = ok(server, "instance", "list-app-versions", "--app-id", COREOS_APP_ID, "--group-id", "canary")
    assert versions.splitlines()[1].split() == ["2.0.0", "2"]

    ok(server, "group", "pause", "--app-id", COREOS_APP_ID, "--group-id", "canary", "--reason", "freeze")
    groups = json.loads(ok(server, "group", "list", "--app-id", COREOS_APP_ID, "--json"))
    canary = next(g for g in groups if g["id"] == "canary")
    assert canary["updates_paused"] and canary["pause_reason"] == "freeze"
    assert canary["rollout"]["granted"] == 2 and canary["rollout"]["completed"] == 2
    ok(server, "group", "unpause", "--app-id", COREOS_APP_ID, "--group-id", "canary")
    daily = ok(server, "group", "versions", "--app-id", COREOS_APP_ID, "--group-id", "canary", "--resolution", "86400")
    assert daily.splitlines()[0].split() == ["Time", "Version", "Instances"]
    activity = ok(server, "activity", "list", "--app-id", COREOS_APP_ID)
    assert "group-unpaused" in activity and "group-paused" in activity and "rollout-started" in activity


def wait_for_json(server: CoreUpdateServer, done: Callable[[Any], bool], *args: str) -> Any:
    """The JSON of an updateservicectl command, once ``done`` accepts it (check-ins are written behind the
    answers); at most 20 s."""
    deadline = time.monotonic() + 20
    while True:
        answer = json.loads(ok(server, "--json", *args))
        if done(answer) or time.monotonic() > deadline:
            return answer
        time.sleep(0.05)


def test_updates_over_time_and_the_end_of_a_rollout(server: CoreUpdateServer, signed: dict[str, Path]) -> None:
    app = "1b9bd9d7-5a4c-4a52-9d2c-6e1f4f3e6a10"  # an application of its own: fake clients' ids are per app
    ok(server, "app", "create", "--app-id", app, "--label", "Updates")
    ok(server, "package", "create", "--app-id", app, "--version", "2.0.0", "--file", str(signed["payload"]),
       "--public-key", str(signed["public"]), "--url", "https://mirror.example/2.0.0/update.gz")
    ok(server, "channel", "create", "--app-id", app, "--channel", "stable", "--version", "2.0.0")
    ok(server, "group", "create", "--app-id", app, "--channel", "stable", "--group-id", "prod", "--label", "Prod")
    before = time.time() - 1
    ok(server, "instance", "fake", "--app-id", app, "--group-id", "prod", "--version", "1.0.0",
       "--clients-per-app", "2", "--min-sleep", "0", "--max-sleep", "0")
    groups = wait_for_json(server, lambda gs: gs[0]["rollout"]["outcome"] is not None, "group", "list",
                           "--app-id", app)
    assert groups[0]["rollout"]["outcome"] == "completed" and groups[0]["rollout"]["ended_at"] >= before
    assert ", completed 20" in ok(server, "group", "list", "--app-id", app).splitlines()[1]
    activity = json.loads(ok(server, "--json", "activity", "list", "--app-id", app))
    assert [a["kind"] for a in activity if a["kind"].startswith("rollout-")] == ["rollout-completed",
                                                                                 "rollout-started"]
    assert activity[0]["message"] == ("rollout of 2.0.0 to group Prod completed: all 2 instance(s) seen in the "
                                      "last day run 2.0.0 (2 granted, 2 complete, 0 failed)")

    table = ok(server, "instance", "list-updates", "--app-id", app, "--group-id", "prod").splitlines()
    assert table[0].split() == ["AppID", "ClientID", "Version", "LastSeen", "Group", "Status", "OEM", "Granted"]
    rows = sorted(row.split() for row in table[1:])
    assert [(r[0], r[1], r[2], r[4], r[5], r[6]) for r in rows] == [
        (app, f"fake-client-00{i}", "2.0.0", "Prod", "Complete", "-") for i in range(2)]
    updates = json.loads(ok(server, "--json", "instance", "list-updates", "--app-id", app, "--start",
                            datetime.fromtimestamp(before, UTC).isoformat()))
    assert updates["total"] == 2 and {u["granted_version"] for u in updates["updates"]} == {"2.0.0"}
    later = str(time.time() + 3600)
    empty = ok(server, "instance", "list-updates", "--app-id", app, "--start", later, "--end", str(time.time() + 7200))
    assert [line.split() for line in empty.splitlines()] == [table[0].split()]
    assert ok(server, "instance", "list-app-versions", "--app-id", app, "--start", later).split() == [
        "Version", "Instances"]
    assert ok(server, "instance", "list-app-versions", "--app-id", app, "--start", str(before),
              "--end", later).splitlines()[1].split() == ["2.0.0", "2"]
    for bad, message in ((("--start", "yesterday"), "neither seconds since the epoch nor an ISO 8601 time"),
                         (("--start", later, "--end", str(before)), "is after end")):
        result = ctl(server, "instance", "list-updates", "--app-id", app, *bad)
        assert result.returncode in (1, 2) and message in result.stderr and "Traceback" not in result.stderr


def peak_rss_kib(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), in KiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))


def ctl_peak_rss(server: CoreUpdateServer, tmp_path: Path, *args: str) -> tuple[int, str, int]:
    """Exit code, stderr and peak resident memory (KiB, from wait4) of one updateservicectl run."""
    err = tmp_path / "stderr"
    with err.open("w") as errf:
        proc = subprocess.Popen([str(VENV_BIN / "updateservicectl"), "--server", server.url, "--key", server.token,
                                 *args], stdout=subprocess.DEVNULL, stderr=errf)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, err.read_text(), usage.ru_maxrss


def test_a_large_payload_is_uploaded_and_stored_in_flat_memory(
    server: CoreUpdateServer, signed: dict[str, Path], tmp_path: Path
) -> None:
    """200 MiB (a sparse file: cheap to make and read) cost the command and the server about what a tiny payload
    costs: the file is sent a piece at a time and written to disk as it arrives, never held whole."""
    big = tmp_path / "big.gz"
    size = write_sparse_payload(big, 200 << 20, key_pair("main"))
    code, err, small_rss = ctl_peak_rss(server, tmp_path, "package", "create", "--app-id", COREOS_APP_ID,
                                        "--version", "7.0.0", "--file", str(signed["payload"]),
                                        "--public-key", str(signed["public"]))
    assert code == 0, err
    server_before = peak_rss_kib(server.process.pid)
    code, err, big_rss = ctl_peak_rss(server, tmp_path, "package", "create", "--app-id", COREOS_APP_ID,
                                      "--version", "7.1.0", "--file", str(big), "--public-key", str(signed["public"]))
    assert code == 0, err
    server_growth = peak_rss_kib(server.process.pid) - server_before
    try:
        stored = server.data_dir / "packages" / COREOS_APP_ID / "7.1.0" / "big.gz"
        assert stored.stat().st_size == size
        assert big_rss - small_rss < 32 << 10, f"{size >> 20} MiB cost the command {(big_rss - small_rss) >> 10} MiB"
        assert server_growth < 64 << 10, f"{size >> 20} MiB cost the server {server_growth >> 10} MiB"
    finally:
        ok(server, "package", "delete", "--app-id", COREOS_APP_ID, "--version", "7.1.0")


def test_watch_runs_the_program_with_the_groups_version(server: CoreUpdateServer, tmp_path: Path) -> None:
    out = tmp_path / "seen"
    ok(server, "watch", "--group-id", "stable", "--max-runs", "1", "--interval", "0.1", sys.executable, "-c",
       f"import os; open({str(out)!r}, 'w').write(os.environ['UPDATE_SERVICE_GROUP'] + ' ' + "
       "os.environ['UPDATE_SERVICE_CHANNEL'] + ' ' + os.environ['UPDATE_SERVICE_VERSION'])")
    assert out.read_text() == "stable stable "


@pytest.mark.parametrize(
    ("args", "key", "code", "message"),
    [
        (("app", "list"), "", 4, "no API key"),
        (("app", "list"), "cu_nope", 4, "401"),
        (("group", "pause", "--app-id", COREOS_APP_ID, "--group-id", "nope"), None, 1, "404"),
        (("group", "update", "--app-id", COREOS_APP_ID, "--group-id", "stable", "--update-count", "0"), None, 1,
         "update_count"),
        (("group", "update", "--app-id", COREOS_APP_ID, "--group-id", "stable"), None, 2, "nothing to change"),
        (("group", "list"), None, 2, "--app-id"),
        (("channel", "update", "--app-id", "not an id!", "--channel", "x", "--version", "1"), None, 2, "--app-id"),
        (("package", "create", "--app-id", COREOS_APP_ID, "--version", "3.0.0", "--file", "/nonexistent"), None, 1,
         "cannot read --file"),
    ],
)
def test_exit_codes(server: CoreUpdateServer, args: tuple[str, ...], key: str | None, code: int,
                    message: str) -> None:
    result = ctl(server, *args, key=key)
    assert result.returncode == code, (result.stdout, result.stderr)
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (("--user", "admin", "app", "list"), {}, "--user is not supported: coreupdate's API tokens name their owner"),
        (("app", "list"), {"UPDATECTL_USER": "admin"}, "UPDATECTL_USER is set, but a user name is not supported"),
        (("package", "create", "--app-id", COREOS_APP_ID, "--version", "3.0.0", "--file", "update.gz",
          "--no-verify", "--meta", "meta.json"), {}, "--meta is not supported"),
    ],
)
def test_the_originals_user_and_meta_are_refused_not_ignored(args: tuple[str, ...], env: dict[str, str],
                                                              message: str) -> None:
    """Refused before anything is sent (the server named here does not even answer), with what to do instead."""
    result = ctl(None, "--server", "http://127.0.0.1:9", "--key", "k", *args, env=env)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_unreachable_server_and_environment_variables(server: CoreUpdateServer) -> None:
    result = ctl(None, "app", "list", env={"UPDATECTL_SERVER": "http://127.0.0.1:9", "UPDATECTL_KEY": "k"})
    assert result.returncode == 3 and "cannot reach http://127.0.0.1:9" in result.stderr
    result = ctl(None, "--json", "app", "list", env={"UPDATECTL_SERVER": server.url, "UPDATECTL_KEY": server.token})
    assert result.returncode == 0 and json.loads(result.stdout)[0]["id"] == COREOS_APP_ID


def test_a_closed_pipe_is_not_a_traceback(server: CoreUpdateServer) -> None:
    shell = (f"{VENV_BIN}/updateservicectl --server {server.url} --key {server.token} group list "
             f"--app-id {COREOS_APP_ID} | head -c0; echo rc=${{PIPESTATUS[0]}}")
    result = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "rc=0" and result.stderr == ""


def test_coreupdate_admin_commands(tmp_path: Path) -> None:
    made = subprocess.run(coreupdate_command("token", "create", "--data-dir", str(tmp_path), "--name", "ci"),
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0 and made.stdout.startswith("cu_") and len(made.stdout.splitlines()) == 1
    listed = subprocess.run(coreupdate_command("token", "list", "--data-dir", str(tmp_path)), capture_output=True,
                            text=True, timeout=60)
    assert listed.stdout.splitlines()[1].split()[:2] == ["1", "ci"] and made.stdout.strip() not in listed.stdout
    bad = subprocess.run(coreupdate_command("serve", "--database", "mysql://x/y", "--data-dir", str(tmp_path)),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "use sqlite:///PATH or postgresql://" in bad.stderr
    assert "Traceback" not in bad.stderr
    down = subprocess.run(coreupdate_command("token", "create", "--database",
                                             "postgresql://nobody:secret@127.0.0.1:9/none"),
                          capture_output=True, text=True, timeout=60)
    assert down.returncode == 3 and "cannot open the database" in down.stderr and "secret" not in down.stderr
    assert "Traceback" not in down.stderr
