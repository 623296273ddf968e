"""The product's Omaha dev server, ``update-engine-devserver``, run as a process on 127.0.0.1.

It is the server the end-to-end tests, the demo and the benchmarks update nodes from: the same command a lab runs
(see the README), so they exercise it too. For misbehaving servers use :mod:`sim.omaha`'s stub instead.

Rules: a free port is chosen here and the call returns once the server accepts connections (at most 15 s); its
output goes to ``devserver-PORT.log`` in the work directory; :class:`DevServerProcess` is a context manager whose
exit stops it (SIGTERM, SIGKILL after 10 s).
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from sim.ports import free_port, wait_for_port
from sim.tools import VENV_BIN


@dataclass
class DevServerProcess:
    """``update-engine-devserver`` running on 127.0.0.1."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """What a node's ``SERVER=`` names."""
        return f"{self.base}/v1/update/"

    def events(self) -> list[dict[str, object]]:
        """Every Omaha event clients reported, oldest first (``GET /events``)."""
        with urllib.request.urlopen(f"{self.base}/events", timeout=10) as resp:
            data = json.load(resp)
        if not isinstance(data, list):
            raise ValueError(f"{self.base}/events answered {type(data).__name__}, not a list")
        return data

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def __enter__(self) -> DevServerProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_devserver(
    workdir: Path, releases: Sequence[tuple[Path, str, str | None]], *extra_args: str
) -> DevServerProcess:
    """Serve each ``(payload, version, track or None)`` of ``releases``; ``extra_args`` go to the command."""
    port = free_port()
    args = [str(VENV_BIN / "update-engine-devserver"), "--listen", f"127.0.0.1:{port}", *extra_args]
    for payload, version, track in releases:
        args += ["--payload", str(payload), "--version", version]
        if track:
            args += ["--track", track]
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"devserver-{port}.log"
    with log_path.open("wb") as logf:
        proc = subprocess.Popen(
            args, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    try:
        wait_for_port(port, proc)
    except BaseException:
        proc.kill()
        proc.wait(timeout=10)
        raise
    return DevServerProcess(proc, port, log_path)
