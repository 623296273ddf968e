"""A simulated node's file system root and the dev server process, shared by the e2e tests, the daemon tests and
the demo."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


@dataclass
class NodeRoot:
    """The files update-engine reads on a node, under one directory."""

    root: Path
    machine_id: str

    @property
    def state_dir(self) -> Path:
        return self.root / "var/lib/update_engine"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def kernel_dir(self) -> Path:
        return self.root / "boot/flatcar"

    def set_update_conf(self, **values: str) -> None:
        conf = self.root / "etc/coreos/update.conf"
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text("".join(f"{k}={v}\n" for k, v in values.items()))

    def set_version(self, version: str) -> None:
        release = self.root / "usr/share/coreos/release"
        release.parent.mkdir(parents=True, exist_ok=True)
        release.write_text(
            f"COREOS_RELEASE_VERSION={version}\nCOREOS_RELEASE_BOARD=amd64-usr\n"
            "COREOS_RELEASE_APPID={e96281a6-d1af-4bde-9a0a-97b76e56dc57}\n"
        )

    def new_boot(self) -> None:
        """What a reboot changes for the update-engine: a new kernel boot id (the caller empties /run)."""
        (self.root / "proc/sys/kernel/random/boot_id").write_text(str(uuid.uuid4()) + "\n")

    def prefs(self, key: str) -> str | None:
        path = self.state_dir / "prefs" / key
        return path.read_text() if path.exists() else None


def make_node_root(root: Path, *, version: str = "1.0.0", server: str | None = None,
                   group: str = "stable") -> NodeRoot:
    machine_id = uuid.uuid4().hex
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "etc/machine-id").write_text(machine_id + "\n")
    boot_id = root / "proc/sys/kernel/random/boot_id"
    boot_id.parent.mkdir(parents=True, exist_ok=True)
    boot_id.write_text(str(uuid.uuid4()) + "\n")
    node = NodeRoot(root, machine_id)
    node.set_version(version)
    conf = {"GROUP": group}
    if server:
        conf["SERVER"] = server
    node.set_update_conf(**conf)
    node.kernel_dir.mkdir(parents=True, exist_ok=True)
    return node


@dataclass
class DevServerProcess:
    """``update-engine-devserver`` running on 127.0.0.1."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/update/"

    def events(self) -> list[dict[str, object]]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/events", timeout=10) as resp:
            data = json.load(resp)
        assert isinstance(data, list)
        return data

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_devserver(
    workdir: Path, releases: list[tuple[Path, str, str | None]], *extra_args: str
) -> DevServerProcess:
    port = free_port()
    args = [str(VENV_BIN / "update-engine-devserver"), "--listen", f"127.0.0.1:{port}", *extra_args]
    for payload, version, track in releases:
        args += ["--payload", str(payload), "--version", version]
        if track:
            args += ["--track", track]
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"devserver-{port}.log"
    logf = log_path.open("wb")
    proc = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    logf.close()
    try:
        wait_for_port(port, proc)
    except Exception:
        proc.kill()
        proc.wait()
        raise
    return DevServerProcess(proc, port, log_path)
