"""The product's update server, ``coreupdate serve``, run as a process on 127.0.0.1, and its API.

Rules: a free port and the data directory given (SQLite there, or ``database``) with one API token named
``test``; the call returns once the server logs that it serves Omaha (at most 30 s) and fails with its log
otherwise; :class:`CoreUpdateServer` is a context manager whose exit stops it (SIGTERM, SIGKILL after 20 s).
API calls are bounded (30 s by default).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from sim.ports import free_port
from sim.tools import VENV_BIN

COREOS_APP_ID = "e96281a6-d1af-4bde-9a0a-97b76e56dc57"

# An update check exactly as the original C++ update_engine writes it (4/8-space indents, its attribute order,
# the space before ">" of <app>, the post-reboot event); fill in machine, track and version.
CPP_UPDATE_CHECK = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    '<request protocol="3.0" version="update_engine-0.4.10" updaterversion="update_engine-0.4.10" '
    'installsource="scheduler" ismachine="1">\n'
    '    <os version="Chateau" platform="CoreOS" sp="{version}_x86_64"></os>\n'
    '    <app appid="{{e96281a6-d1af-4bde-9a0a-97b76e56dc57}}" version="{version}" track="{track}" '
    'bootid="{{7e4a8f33-7bd5-4a36-9a6a-3b4f2b0e5d11}}" oem="ami" oemversion="0.1.2-r1" alephversion="1.0.0" '
    'machineid="{machine}" machinealias="web-1" lang="en-US" board="amd64-usr" hardware_class="" '
    'delta_okay="false" >\n'
    '        <ping active="1"></ping>\n'
    '        <updatecheck></updatecheck>\n'
    '        <event eventtype="3" eventresult="2" previousversion=""></event>\n'
    '    </app>\n'
    '</request>\n'
)


def cpp_update_check(machine: str, track: str = "stable", version: str = "1.0.0") -> bytes:
    return CPP_UPDATE_CHECK.format(machine=machine, track=track, version=version).encode()


@dataclass
class CoreUpdateServer:
    """A running ``coreupdate serve``: its Omaha URL for nodes, and its API for the test or demo."""

    process: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    token: str
    log_path: Path
    database: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def omaha_url(self) -> str:
        return f"{self.url}/v1/update/"

    def request(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
                token: str | None = None, timeout: float = 30) -> tuple[int, Any]:
        """(status, decoded JSON or text) of an API call; ``path`` starts with ``/``."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token if token is None else token}")
        if raw is not None:
            req.add_header("Content-Type", "application/octet-stream")
        elif body is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, payload = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, payload = exc.code, exc.read()
        try:
            return status, json.loads(payload)
        except ValueError:
            return status, payload.decode(errors="replace")

    def api(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        """An API call that must succeed; raises RuntimeError with the server's message otherwise."""
        status, answer = self.request(method, "/api/v1" + path, body, **kwargs)
        if status >= 300:
            raise RuntimeError(f"{method} {path}: HTTP {status}: {answer}")
        return answer

    def omaha(self, body: bytes, timeout: float = 30) -> tuple[int, bytes]:
        req = urllib.request.Request(self.omaha_url, data=body, method="POST",
                                     headers={"Content-Type": "text/xml"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log_text():
                return
            time.sleep(0.05)
        raise TimeoutError(f"{text!r} not in the coreupdate log after {timeout} s:\n{self.log_text()[-3000:]}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)
        return int(self.process.returncode)

    def __enter__(self) -> CoreUpdateServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def coreupdate_command(*args: str) -> list[str]:
    return [str(VENV_BIN / "coreupdate"), *args]


def start_coreupdate(data_dir: Path, *, database: str | None = None, extra_args: tuple[str, ...] = (),
                     token: str | None = None) -> CoreUpdateServer:
    """A running server (migrated database, one token named ``test``) listening on 127.0.0.1."""
    data_dir.mkdir(parents=True, exist_ok=True)
    db_args = ["--data-dir", str(data_dir)] + (["--database", database] if database else [])
    if token is None:
        made = subprocess.run(coreupdate_command("token", "create", "--name", "test", *db_args),
                              capture_output=True, text=True, timeout=60)
        if made.returncode != 0:
            raise RuntimeError(f"coreupdate token create failed: {made.stderr}")
        token = made.stdout.strip()
    port = free_port()
    log_path = data_dir / f"coreupdate-{port}.log"
    with log_path.open("wb") as logf:
        proc = subprocess.Popen(
            coreupdate_command("serve", "--listen", f"127.0.0.1:{port}", *db_args, *extra_args),
            stdout=logf, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    server = CoreUpdateServer(proc, port, data_dir, token, log_path, database)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"coreupdate exited with {proc.returncode}:\n{server.log_text()}")
        if "Serving Omaha on" in server.log_text():
            return server
        time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"coreupdate did not start within 30 s:\n{server.log_text()}")
