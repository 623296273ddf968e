"""Settings fail closed: an update.conf that exists but cannot be read whole stops both daemons from acting on
the defaults.

At start-up update-engine (daemon and ``--once``) and locksmithd refuse to start, naming the file and its problem
(systemd restarts them until the file is fixed); when update-engine re-reads its settings before a check, it keeps
the settings it had. Each kind of unreadable file is made for real: a directory, a FIFO, a symlink to /dev/zero, a
file over 64 KiB, a path through a regular file, and a file without read permission (read by an unprivileged child
process, since root reads any file). A missing file is still fine. The Omaha server is a stub on 127.0.0.1 that
counts what it is asked.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from coreos_common.updateconf import MAX_CONFIG_FILE_BYTES, SettingsFileError, load_update_conf
from locksmithd import daemon as locksmithd_daemon
from sim.node import NodeRoot, make_node_root
from sim.omaha import OmahaStub
from sim.ports import free_port
from update_engine import daemon as update_engine_daemon
from update_engine.engine.attempter import EngineOptions, UpdateAttempter
from update_engine.http_rules import HttpLimits

NOBODY = 65534
CONF = "etc/coreos/update.conf"
# What the lost file said: both daemons must not act as if it were absent.
SAYS = "SERVER=disabled\nREBOOT_STRATEGY=off\n"

KINDS: dict[str, tuple[Callable[[Path], None], str]] = {
    "directory": (lambda path: path.mkdir(), "is a directory, not a regular file"),
    "fifo": (lambda path: os.mkfifo(path), "is a FIFO, not a regular file"),
    "symlink to /dev/zero": (lambda path: path.symlink_to("/dev/zero"), "is a character device, not a regular file"),
    "oversized": (
        lambda path: path.write_text(SAYS + "#" * MAX_CONFIG_FILE_BYTES + "\n"),
        f"is larger than {MAX_CONFIG_FILE_BYTES} bytes",
    ),
    "path through a file": (
        lambda path: (shutil.rmtree(path.parent), path.parent.write_text(SAYS)),  # type: ignore[func-returns-value]
        "cannot be opened: Not a directory",
    ),
    "no read permission": (lambda path: (path.write_text(SAYS), path.chmod(0)), "cannot be opened: Permission denied"),
}  # fmt: skip


@pytest.fixture
def node() -> Iterator[NodeRoot]:
    """A node root that an unprivileged process can walk (pytest's own tmp directories are root's alone)."""
    directory = Path(tempfile.mkdtemp(prefix="settings-"))
    try:
        directory.chmod(0o755)
        root = make_node_root(directory / "root", server=f"http://127.0.0.1:{free_port()}/v1/update/")
        (root.root / "usr/share/coreos/update.conf").write_text("GROUP=stable\n")
        yield root
    finally:
        shutil.rmtree(directory)


def make_unreadable(node: NodeRoot, kind: str) -> tuple[Path, str]:
    path = node.root / CONF
    path.unlink()
    make, problem = KINDS[kind]
    make(path)
    return path, problem


def run_unprivileged_if_needed(kind: str, node: NodeRoot, main: Callable[[], int]) -> tuple[int, str]:
    """Run a daemon's ``main`` and return its exit status and what it wrote on stderr.

    For "no read permission" under root, ``main`` runs in a forked child that has become an unprivileged user
    owning the node's files, because root may read a file without read permission."""
    if kind != "no read permission" or os.geteuid() != 0:
        return _run_here(main)
    for dirpath, dirnames, filenames in os.walk(node.root.parent):
        for name in [*dirnames, *filenames]:
            os.lchown(os.path.join(dirpath, name), NOBODY, NOBODY)
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop root, run, report through the pipe, never return into pytest
        status = 70
        try:
            os.close(reader)
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            sys.stderr = io.TextIOWrapper(os.fdopen(writer, "wb", buffering=0), write_through=True)
            status = main()
        finally:
            os._exit(status)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        err = pipe.read().decode()
    _, wait_status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(wait_status), err


def _run_here(main: Callable[[], int]) -> tuple[int, str]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    saved, sys.stderr = sys.stderr, io.StringIO()
    try:
        status = main()
        return status, sys.stderr.getvalue()
    finally:
        sys.stderr = saved
        root.handlers[:] = handlers
        root.setLevel(level)


NO_BUS = "unix:path=/nonexistent/bus"


def locksmithd_main(node: NodeRoot) -> Callable[[], int]:
    return lambda: locksmithd_daemon.main(["--config-root", str(node.root), "--bus-address", NO_BUS])


def update_engine_main(node: NodeRoot, *extra: str) -> Callable[[], int]:
    return lambda: update_engine_daemon.main([
        *extra, "--config-root", str(node.root), "--state-dir", str(node.state_dir), "--run-dir",
        str(node.run_dir), "--disk", str(node.root / "no-disk.img"), "--booted", "USR-A", "--bus-address", NO_BUS,
    ])  # fmt: skip


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("program", ["locksmithd", "update_engine", "update_engine --once"])
def test_a_settings_file_that_cannot_be_read_stops_the_daemon_at_start_up(
    node: NodeRoot, kind: str, program: str
) -> None:
    path, problem = make_unreadable(node, kind)
    main = locksmithd_main(node) if program == "locksmithd" else update_engine_main(node, *program.split()[1:])
    status, err = run_unprivileged_if_needed(kind, node, main)
    assert status == 1, err
    assert f"{path}: {problem}" in err
    assert "Not starting: acting on the defaults could undo what the file says" in err
    assert "fix or remove the file" in err


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_loader_names_each_unreadable_file(node: NodeRoot, kind: str) -> None:
    path, problem = make_unreadable(node, kind)
    status, err = run_unprivileged_if_needed(kind, node, lambda: _load_and_report(node.root))
    assert status == 3 and err.startswith(f"{path}: {problem}") and err.count("\n") == 1, err


def _load_and_report(root: Path) -> int:
    try:
        load_update_conf(root, reported=set())
    except SettingsFileError as exc:
        print(exc, file=sys.stderr)
        return 3
    return 0


def test_a_missing_settings_file_is_still_fine(node: NodeRoot) -> None:
    (node.root / CONF).unlink()
    assert load_update_conf(node.root, reported=set()).values["GROUP"] == "stable"


# -- SERVER=disabled in a file that became unreadable never leads to a check ---------------------------------


@pytest.fixture
async def stub() -> AsyncIterator[OmahaStub]:
    server = await OmahaStub().start()
    try:
        yield server
    finally:
        await server.stop()


def attempter_for(node: NodeRoot) -> UpdateAttempter:
    return UpdateAttempter(
        EngineOptions(
            config_root=node.root, state_dir=node.state_dir, run_dir=node.run_dir, disk=node.root / "no-disk.img",
            booted="USR-A", http=HttpLimits(connect_timeout=5, omaha_total_timeout=10),
        )
    )  # fmt: skip


async def test_server_disabled_in_an_oversized_file_sends_no_check_at_start_up(
    node: NodeRoot, stub: OmahaStub
) -> None:
    (node.root / "usr/share/coreos/update.conf").write_text(f"SERVER={stub.url}\n")
    (node.root / CONF).write_text(SAYS + "#" * MAX_CONFIG_FILE_BYTES + "\n")
    assert await update_engine_daemon.run_once(attempter_for(node).options) == 1
    assert stub.requests == 0


async def test_a_re_read_keeps_the_last_good_settings(
    node: NodeRoot, stub: OmahaStub, caplog: pytest.LogCaptureFixture
) -> None:
    (node.root / "usr/share/coreos/update.conf").write_text(f"SERVER={stub.url}\n")
    (node.root / CONF).write_text(SAYS)
    attempter = attempter_for(node)
    assert attempter.load_settings().updates_disabled  # start-up
    path, problem = make_unreadable(node, "oversized")
    with caplog.at_level(logging.INFO):
        outcome = await attempter.check_and_update(interactive=True)
    assert stub.requests == 0 and outcome.error_code is None
    assert "Updates are disabled (SERVER=disabled); no check sent" in caplog.text
    error = next(r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    assert error.startswith(f"Cannot read the update settings: {path}: {problem}")
    assert "Keeping the settings read before (SERVER=disabled, GROUP=stable)" in error
    # Once the file is readable again, it is read again.
    (node.root / CONF).unlink()
    (node.root / CONF).write_text(f"SERVER={stub.url}\n")
    await attempter.check_and_update(interactive=True)
    assert stub.requests == 1
