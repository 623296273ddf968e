"""A simulated node's two daemons, ``update_engine`` and ``locksmithd``, as subprocesses of the fleet.

Rules: each boot starts both with a banner line in their log files (``update_engine.log``, ``locksmithd.log`` in
the node's directory, appended across boots); a power cut SIGKILLs both (:meth:`NodeDaemons.kill`: nothing is shut
down cleanly, as when the power goes); a daemon that exits any other way is reported through ``on_exit`` with the
end of its log; :meth:`NodeDaemons.stop` is the clean end (SIGTERM, SIGKILL after 5 s). They run in their own
session, so a Ctrl-C reaches the fleet's process alone and the fleet stops them itself. The environment is the
fleet's without the variables that would reach a real bus, systemd or another configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

_FOREIGN_ENV = ("LOCKSMITHD_", "REBOOT_", "NOTIFY_SOCKET", "WATCHDOG_", "DBUS_")


def daemon_env() -> dict[str, str]:
    """This process's environment without what would point a daemon elsewhere; unbuffered, in UTC."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN_ENV)}
    env.update(PYTHONUNBUFFERED="1", TZ="UTC")
    return env


class NodeDaemons:
    """The daemon processes of one node; ``on_exit(name, code, log_tail)`` hears of unexpected exits."""

    def __init__(self, workdir: Path, on_exit: Callable[[str, int, tuple[str, ...]], None]) -> None:
        self.workdir = workdir
        self.on_exit = on_exit
        self.processes: dict[str, asyncio.subprocess.Process] = {}
        self.watchers: set[asyncio.Task[None]] = set()
        self._expected: set[asyncio.subprocess.Process] = set()  # killed or stopped on purpose
        self._stopping = False

    def log_path(self, daemon: str) -> Path:
        return self.workdir / f"{daemon}.log"

    async def start(self, commands: Mapping[str, Sequence[str]], banner: str) -> None:
        """Start each ``name: argv``; ``banner`` opens this boot's part of each log."""
        env = daemon_env()
        for name, args in commands.items():
            with self.log_path(name).open("ab") as logf:
                logf.write(banner.encode())
                logf.flush()
                proc = await asyncio.create_subprocess_exec(
                    *args, stdin=asyncio.subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, env=env,
                    start_new_session=True,
                )  # fmt: skip
            self.processes[name] = proc
            watcher = asyncio.get_running_loop().create_task(self._watch(name, proc))
            self.watchers.add(watcher)
            watcher.add_done_callback(self.watchers.discard)

    async def _watch(self, name: str, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if proc in self._expected or self._stopping:
            return
        try:
            lines = self.log_path(name).read_text(errors="replace").splitlines()[-5:]
        except OSError as exc:
            lines = [f"(log unreadable: {exc})"]
        self.on_exit(name, code, tuple(lines))

    async def kill(self) -> None:
        """SIGKILL both and wait for them: a power cut."""
        for proc in self.processes.values():
            self._expected.add(proc)
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        for proc in self.processes.values():
            await proc.wait()

    def expect_exit(self) -> None:
        """From now on an exit is not news (the fleet is shutting down)."""
        self._stopping = True

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s; the exits are expected."""
        self._stopping = True
        for proc in self.processes.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        for proc in self.processes.values():
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        for watcher in list(self.watchers):
            watcher.cancel()
        await asyncio.gather(*self.watchers, return_exceptions=True)
