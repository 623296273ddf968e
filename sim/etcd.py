"""Real ``etcd`` members on 127.0.0.1 for tests, the demo and benchmarks: one member or a Raft cluster, TLS.

``EtcdCluster(n, workdir)`` starts ``n`` members with free ports, data directories and log files under
``workdir``, waits until every member reports healthy, and offers fault injection: ``kill(i)`` (SIGKILL),
``stop(i)`` (SIGTERM), ``start(i)`` (restart with the member's data directory). ``key_history`` reads every
value a key ever had from etcd's MVCC history, so a test can check an invariant in every revision, not just
the last. With ``tls`` (see :mod:`sim.tls`) the client URLs are https.

Rules: use it as a context manager (or ``start_all``/``stop_all`` in a ``finally``); a member that does not
answer ``/health`` within 30 s is an error carrying the end of its log; every stop is SIGTERM, then SIGKILL
after 10 s. Reads and writes through ``put``/``get`` bypass the code under test on purpose.
"""

from __future__ import annotations

import base64
import contextlib
import json
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from sim.ports import free_port
from sim.tls import ServerTls
from sim.tools import find_tool

__all__ = ["EtcdCluster", "ServerTls"]

HEALTH_TIMEOUT = 30.0


@dataclass
class _Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_file: Path
    process: subprocess.Popen[bytes] | None = None


@dataclass
class EtcdCluster:
    """``size`` etcd members on loopback; use as a context manager or call ``start_all``/``stop_all``."""

    size: int
    workdir: Path
    tls: ServerTls | None = None
    extra_args: Sequence[str] = ()
    members: list[_Member] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self._binary = find_tool("etcd")
        self.workdir.mkdir(parents=True, exist_ok=True)
        for i in range(self.size):
            self.members.append(
                _Member(
                    name=f"m{i}",
                    client_port=free_port(),
                    peer_port=free_port(),
                    data_dir=self.workdir / f"m{i}.etcd",
                    log_file=self.workdir / f"m{i}.log",
                )
            )
        self._token = f"test-{uuid.uuid4().hex[:12]}"

    # -- addresses -------------------------------------------------------------------------------------------

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def endpoint(self, index: int) -> str:
        return f"{self.scheme}://127.0.0.1:{self.members[index].client_port}"

    @property
    def endpoints(self) -> list[str]:
        return [self.endpoint(i) for i in range(self.size)]

    def _peer_url(self, member: _Member) -> str:
        return f"http://127.0.0.1:{member.peer_port}"

    # -- processes -------------------------------------------------------------------------------------------

    def _command(self, member: _Member) -> list[str]:
        initial = ",".join(f"{m.name}={self._peer_url(m)}" for m in self.members)
        client_url = f"{self.scheme}://127.0.0.1:{member.client_port}"
        cmd = [
            self._binary,
            "--name", member.name,
            "--data-dir", str(member.data_dir),
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", self._peer_url(member),
            "--initial-advertise-peer-urls", self._peer_url(member),
            "--initial-cluster", initial,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", self._token,
            "--logger", "zap",
            "--log-level", "error",
        ]  # fmt: skip
        if self.tls:
            cmd += ["--cert-file", str(self.tls.cert_file), "--key-file", str(self.tls.key_file)]
        cmd += list(self.extra_args)
        return cmd

    def _spawn(self, index: int) -> None:
        member = self.members[index]
        if member.process is not None and member.process.poll() is None:
            return
        with open(member.log_file, "ab") as log:
            member.process = subprocess.Popen(
                self._command(member), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def start_all(self) -> EtcdCluster:
        try:
            for i in range(self.size):
                self._spawn(i)
            for i in range(self.size):
                self.wait_healthy(i)
        except BaseException:
            self.stop_all()
            raise
        return self

    def start(self, index: int) -> None:
        """Restart member ``index`` with its existing data directory and wait until it is healthy."""
        self._spawn(index)
        self.wait_healthy(index)

    def kill(self, index: int) -> None:
        self._signal(index, signal.SIGKILL)

    def stop(self, index: int) -> None:
        self._signal(index, signal.SIGTERM)

    def _signal(self, index: int, sig: signal.Signals) -> None:
        process = self.members[index].process
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def running(self, index: int) -> bool:
        process = self.members[index].process
        return process is not None and process.poll() is None

    def stop_all(self) -> None:
        for i in range(self.size):
            with contextlib.suppress(Exception):
                self.stop(i)

    def __enter__(self) -> EtcdCluster:
        return self.start_all()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_all()

    # -- queries ---------------------------------------------------------------------------------------------

    def _context(self) -> ssl.SSLContext | None:
        """The cluster's CA, and its client certificate when it has one (for members that ask for it)."""
        if self.tls is None:
            return None
        context = ssl.create_default_context(cafile=str(self.tls.ca_file))
        if self.tls.client_cert_file is not None and self.tls.client_key_file is not None:
            context.load_cert_chain(self.tls.client_cert_file, self.tls.client_key_file)
        return context

    def _open(self, url: str, body: dict[str, Any] | None, timeout: float) -> Any:
        """urlopen ``url`` (POSTing ``body`` as JSON when given) with the cluster's CA."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        return urllib.request.urlopen(request, timeout=timeout, context=self._context())

    def wait_healthy(self, index: int, timeout: float = HEALTH_TIMEOUT) -> None:
        """Block until member ``index`` answers ``/health`` with ``true`` (bounded by ``timeout``)."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            process = self.members[index].process
            if process is None or process.poll() is not None:
                raise RuntimeError(
                    f"etcd member {index} exited ({self.members[index].log_file}): {self.log_tail(index)}"
                )
            try:
                with self._open(f"{self.endpoint(index)}/health", None, 1.0) as resp:
                    text = resp.read().decode(errors="replace")
                if json.loads(text).get("health") == "true":
                    return
                last = text
            except (OSError, ValueError) as exc:
                last = str(exc)
            time.sleep(0.05)
        raise RuntimeError(f"etcd member {index} not healthy after {timeout:.0f}s: {last}")

    def log_tail(self, index: int, lines: int = 5) -> str:
        try:
            return "\n".join(self.members[index].log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _post(self, index: int, path: str, body: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        with self._open(f"{self.endpoint(index)}/v3/{path}", body, timeout) as resp:
            doc: dict[str, Any] = json.loads(resp.read())
        return doc

    def leader_index(self) -> int | None:
        """Index of the current leader among the running members, or None if none is known."""
        ids: dict[str, int] = {}
        leader: str | None = None
        for i in range(self.size):
            if not self.running(i):
                continue
            try:
                status = self._post(i, "maintenance/status", {}, timeout=2)
            except OSError:
                continue
            ids[str(status["header"]["member_id"])] = i
            leader = str(status.get("leader", "")) or leader
        return ids.get(leader) if leader else None

    def put(self, key: str, value: bytes | str, index: int | None = None) -> int:
        """Write ``key`` directly (bypassing the code under test); returns the new revision."""
        data = value.encode() if isinstance(value, str) else value
        i = self._any_running() if index is None else index
        doc = self._post(i, "kv/put", {"key": _b64(key.encode()), "value": _b64(data)})
        return int(doc["header"]["revision"])

    def get(self, key: str) -> bytes | None:
        doc = self._post(self._any_running(), "kv/range", {"key": _b64(key.encode())})
        kvs = doc.get("kvs") or []
        return base64.b64decode(kvs[0].get("value", "")) if kvs else None

    def _any_running(self) -> int:
        for i in range(self.size):
            if self.running(i):
                return i
        raise RuntimeError("no etcd member is running")

    def key_history(self, key: str, timeout: float = 60.0) -> list[tuple[int, bytes | None]]:
        """Every ``(mod_revision, value)`` the key had, oldest first (``None``: deleted), from a watch at
        revision 1.

        Reads until the event of the key's current revision; for a key that does not exist now, until the
        stream has been quiet for a second.
        """
        index = self._any_running()
        head = self._post(index, "kv/range", {"key": _b64(key.encode())})
        kvs = head.get("kvs") or []
        target = int(kvs[0]["mod_revision"]) if kvs else None
        body: dict[str, Any] = {"create_request": {"key": _b64(key.encode()), "start_revision": 1}}
        history: list[tuple[int, bytes | None]] = []
        deadline = time.monotonic() + timeout
        read_timeout = timeout if target is not None else 1.0
        try:
            with self._open(f"{self.endpoint(index)}/v3/watch", body, read_timeout) as resp:
                for line in resp:
                    if not line.strip():
                        continue
                    result = json.loads(line).get("result", {})
                    if result.get("canceled"):
                        raise RuntimeError(f"history of {key!r} is not available: {result}")
                    for event in result.get("events") or []:
                        kv = event["kv"]
                        deleted = event.get("type") == "DELETE"
                        value = None if deleted else base64.b64decode(kv.get("value", ""))
                        history.append((int(kv["mod_revision"]), value))
                    if target is not None and history and history[-1][0] >= target:
                        return history
                    if time.monotonic() > deadline:
                        break
        except (TimeoutError, urllib.error.URLError):
            if target is None:
                return history  # quiet for read_timeout: everything there is has arrived
            raise
        raise RuntimeError(f"history of {key!r} incomplete after {timeout:.0f}s (have {len(history)} values)")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
