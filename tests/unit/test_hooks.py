"""Hook directories: which files run, in which order, bounded in time and output, killed on cancel."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from pathlib import Path

import pytest

from coreos_common import hooks
from coreos_common.hooks import Outcome, Verdict, judge, run_hook, run_hooks


def write_hook(directory: Path, name: str, body: str, mode: int = 0o755) -> Path:
    directory.mkdir(mode=0o755, exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(mode)
    return path


def fake_stat(mode: int, uid: int = 0) -> os.stat_result:
    return os.stat_result((mode, 0, 0, 1, uid, 0, 0, 0, 0, 0))


@pytest.mark.parametrize(("name", "mode", "uid", "verdict"), [
    ("10-drain", stat.S_IFREG | 0o755, 0, Verdict.RUN),
    ("10-drain", stat.S_IFREG | 0o700, 1000, Verdict.RUN),  # the daemon's own uid (1000 below)
    ("10-drain", stat.S_IFREG | 0o644, 0, Verdict.SKIP),
    ("10-drain", stat.S_IFDIR | 0o755, 0, Verdict.SKIP),
    ("10-drain", stat.S_IFREG | 0o775, 0, Verdict.REFUSE),
    ("10-drain", stat.S_IFREG | 0o757, 0, Verdict.REFUSE),
    ("10-drain", stat.S_IFREG | 0o755, 4242, Verdict.REFUSE),
    ("10-drain", stat.S_IFLNK | 0o777, 0, Verdict.REFUSE),
    (".hidden", stat.S_IFREG | 0o755, 0, Verdict.IGNORE),
    ("10-drain~", stat.S_IFREG | 0o755, 0, Verdict.IGNORE),
    ("10-drain.dpkg-old", stat.S_IFREG | 0o755, 0, Verdict.IGNORE),
])
def test_judge(name: str, mode: int, uid: int, verdict: Verdict) -> None:
    assert judge(name, fake_stat(mode, uid), own_uid=1000).verdict is verdict


async def test_hooks_run_in_name_order_with_their_context(tmp_path: Path) -> None:
    hook_dir = tmp_path / "pre-reboot.d"
    record = tmp_path / "record"
    for name in ("20-second", "10-first", "9-last-in-byte-order"):
        write_hook(hook_dir, name, f'echo "{name} $HOOK_VERSION" >> {record}')
    write_hook(hook_dir, "15-disabled", f"echo disabled >> {record}", mode=0o644)
    result = await run_hooks(hook_dir, context={"HOOK_VERSION": "2.0.0"}, timeout=10)
    assert result.passed
    assert result.ran == ("10-first", "20-second", "9-last-in-byte-order")
    assert record.read_text().splitlines() == [
        "10-first 2.0.0", "20-second 2.0.0", "9-last-in-byte-order 2.0.0"]


async def test_missing_directory_is_no_hooks(tmp_path: Path) -> None:
    result = await run_hooks(tmp_path / "absent.d", context={}, timeout=1)
    assert result.passed and result.ran == ()


async def test_first_failure_ends_the_run_with_its_output(tmp_path: Path) -> None:
    hook_dir = tmp_path / "hooks"
    write_hook(hook_dir, "10-fails", 'echo "node busy: 3 pods left"; exit 3')
    write_hook(hook_dir, "20-never", f"touch {tmp_path / 'ran'}")
    result = await run_hooks(hook_dir, context={}, timeout=10)
    assert result.outcome is Outcome.FAILED
    assert result.hook == hook_dir / "10-fails"
    assert result.detail == "exit status 3"
    assert result.tail == ("node busy: 3 pods left",)
    assert "10-fails failed (exit status 3); last output: node busy: 3 pods left" in result.describe()
    assert not (tmp_path / "ran").exists()


async def test_unsafe_hooks_fail_the_run_before_anything_runs(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    hook_dir = tmp_path / "hooks"
    write_hook(hook_dir, "10-safe", f"touch {tmp_path / 'ran'}")
    writable = write_hook(hook_dir, "20-writable", "true", mode=0o777)
    os.chmod(writable, 0o777)
    result = await run_hooks(hook_dir, context={}, timeout=10)
    assert result.outcome is Outcome.REFUSED
    assert result.hook == writable
    assert "writable by group or others" in caplog.text and str(writable) in caplog.text
    assert not (tmp_path / "ran").exists()


async def test_a_world_writable_directory_is_refused(tmp_path: Path) -> None:
    hook_dir = tmp_path / "hooks"
    write_hook(hook_dir, "10-ok", "true")
    hook_dir.chmod(0o777)
    result = await run_hooks(hook_dir, context={}, timeout=10)
    assert result.outcome is Outcome.REFUSED and result.hook == hook_dir


class LoopClock:
    """The running loop's clock, moved on when the test says: a hook's timeout then passes once the test has seen
    what it needs, not whenever a loaded machine happens to be slow to start the hook."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        loop = asyncio.get_running_loop()
        real = loop.time
        self.offset = 0.0
        monkeypatch.setattr(loop, "time", lambda: real() + self.offset)

    def advance(self, seconds: float) -> None:
        self.offset += seconds


async def wait_for_pid(pid_file: Path) -> int:
    """The pid a hook wrote to ``pid_file`` (written whole: the hook renames it into place); bounded wait."""
    async with asyncio.timeout(30):
        while not pid_file.exists():
            await asyncio.sleep(0.02)
    return int(pid_file.read_text())


async def wait_gone(pid: int) -> None:
    """Return once ``pid`` has died: a killed process goes a moment after the signal, not with it (bounded; the
    hooks' children sleep 300 s, so one that was not killed is not taken for gone)."""
    async with asyncio.timeout(10):
        while process_alive(pid):
            await asyncio.sleep(0.01)


async def test_a_hanging_hook_is_killed_with_its_children(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = LoopClock(monkeypatch)
    hook_dir = tmp_path / "hooks"
    pid_file = tmp_path / "child.pid"
    write_hook(hook_dir, "10-hangs", f"sleep 300 & echo $! > {pid_file}.new; mv {pid_file}.new {pid_file}; wait")
    run = asyncio.ensure_future(run_hooks(hook_dir, context={}, timeout=60))
    child = await wait_for_pid(pid_file)
    assert process_alive(child)
    clock.advance(60)  # the hook's time is up: only now, with its child started
    result = await run
    assert result.outcome is Outcome.TIMED_OUT
    await wait_gone(child)


async def test_cancelling_the_caller_kills_the_hook(tmp_path: Path) -> None:
    hook_dir = tmp_path / "hooks"
    pid_file = tmp_path / "hook.pid"
    write_hook(hook_dir, "10-hangs", f"echo $$ > {pid_file}.new; mv {pid_file}.new {pid_file}; exec sleep 300")
    task = asyncio.ensure_future(run_hooks(hook_dir, context={}, timeout=600))
    hook = await wait_for_pid(pid_file)
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < hooks.KILL_GRACE_S + 5  # not the hook's 300 s or the 600 s timeout
    assert not process_alive(hook)


async def test_megabytes_of_output_are_counted_not_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    hook_dir = tmp_path / "hooks"
    write_hook(hook_dir, "10-chatty", "yes 'a line of output' | head -c 5000000; printf 'no newline at end'")
    caplog.set_level("INFO")
    result = await run_hooks(hook_dir, context={}, timeout=30)
    assert result.passed
    logged = [r for r in caplog.records if r.levelname == "INFO" and r.getMessage().startswith("[10-chatty] ")]
    assert len(logged) == hooks.MAX_LOGGED_LINES
    assert "more bytes of output not logged" in caplog.text


async def test_secrets_are_not_passed_to_hooks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCKSMITHD_ETCD_PASSWORD", "hunter2")
    monkeypatch.setenv("SOME_API_TOKEN", "abc")
    monkeypatch.setenv("KUBECONFIG", "/etc/kubernetes/kubelet.conf")
    hook_dir = tmp_path / "hooks"
    out = tmp_path / "env"
    write_hook(hook_dir, "10-env", f"env > {out}")
    assert (await run_hooks(hook_dir, context={"LOCKSMITHD_GROUP": "workers"}, timeout=10)).passed
    env = dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)
    assert "LOCKSMITHD_ETCD_PASSWORD" not in env and "SOME_API_TOKEN" not in env
    assert env["KUBECONFIG"] == "/etc/kubernetes/kubelet.conf"
    assert env["LOCKSMITHD_GROUP"] == "workers"


async def test_a_hook_killed_by_a_signal_fails(tmp_path: Path) -> None:
    hook_dir = tmp_path / "hooks"
    write_hook(hook_dir, "10-segv", "kill -SEGV $$")
    result = await run_hooks(hook_dir, context={}, timeout=10)
    assert result.outcome is Outcome.FAILED and result.detail == "killed by signal 11"


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie not yet reaped by its (dead) parent's reaper counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _processes_running(*argv: str) -> list[int]:
    """Processes (not zombies) whose command line is ``argv``."""
    wanted = "\0".join(argv) + "\0"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "cmdline").read_text() == wanted and (entry / "stat").read_text().split()[2] != "Z":
                found.append(int(entry.name))
        except (OSError, IndexError):
            continue
    return found


async def test_a_cancel_while_the_hook_is_starting_still_stops_its_whole_group(tmp_path: Path) -> None:
    """Before, a cancel that came while asyncio was still setting the process up killed the hook alone (asyncio's
    transport sends SIGKILL to its pid): what the hook had started ran on."""
    marker = str(4000 + os.getpid() % 1000)
    hook = write_hook(tmp_path / "hooks", "10-spawns", f"sleep {marker} &\nsleep {marker} &\nwait")
    for _ in range(5):
        task = asyncio.create_task(run_hook(hook, env={"PATH": os.environ["PATH"]}, timeout=60))
        await asyncio.sleep(0)  # the hook is forked; asyncio now waits for its pipes to be connected
        time.sleep(0.05)  # not yielding: the shell starts its children while that wait is still pending
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with asyncio.timeout(10):
            while _processes_running("sleep", marker):
                await asyncio.sleep(0.02)
