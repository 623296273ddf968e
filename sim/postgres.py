"""A private PostgreSQL 15 server for tests and benchmarks: ``initdb`` and ``pg_ctl`` from Debian's
``postgresql`` package, in a temporary directory, listening on 127.0.0.1 on a free port.

Rules: initdb refuses to run as root, so when we are root the server runs as the system user ``coreupdate-test``
(created on first use with ``useradd --system``) through ``runuser``.  Authentication is ``trust`` for that
loopback-only server; the database superuser is ``coreupdate``.  Every ``pg_ctl`` and ``psql`` call is bounded
(60 s to start or stop, 120 s per command).  ``start``/``stop`` may be called again to simulate an outage;
``close`` (or leaving ``with PostgresServer() as server``) stops it and removes its directory.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from sim.ports import free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")
TEST_USER = "coreupdate-test"
SUPERUSER = "coreupdate"


def _ensure_user() -> str | None:
    """The user to run PostgreSQL as: None when we are not root, else the test system user."""
    if os.geteuid() != 0:
        return None
    if subprocess.run(["id", "-u", TEST_USER], capture_output=True).returncode != 0:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin",
             TEST_USER],
            check=True, capture_output=True,
        )
    return TEST_USER


class PostgresServer:
    """One server; ``start``/``stop`` may be called again to simulate an outage (same port, same data)."""

    def __init__(self, *, extra_settings: dict[str, str] | None = None) -> None:
        if not (PG_BIN / "initdb").exists():
            raise RuntimeError(f"{PG_BIN}/initdb is missing: install the Debian package postgresql")
        self.user = _ensure_user()
        self.dir = Path(tempfile.mkdtemp(prefix="coreupdate-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.log = self.dir / "server.log"
        if self.user is not None:
            shutil.chown(self.dir, self.user)
        self._run([str(PG_BIN / "initdb"), "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
                   "--no-sync"])
        settings = {
            "listen_addresses": "'127.0.0.1'", "port": str(self.port), "unix_socket_directories": f"'{self.dir}'",
            "fsync": "off", "synchronous_commit": "off", "full_page_writes": "off", "max_connections": "200",
            **(extra_settings or {}),
        }
        with open(self.data / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        self.running = False

    def _run(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess[bytes]:
        if self.user is not None:
            argv = ["runuser", "-u", self.user, "--", *argv]
        result = subprocess.run(argv, capture_output=True, cwd=self.dir, timeout=120)
        if check and result.returncode != 0:
            raise RuntimeError(f"{argv} failed: {result.stderr.decode(errors='replace')}")
        return result

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg2://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        self._run([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start"])
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        if self.running:
            self._run([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop"], check=False)
            self.running = False

    def create_database(self, name: str) -> str:
        """A new empty database; returns its URL."""
        self._run([str(PG_BIN / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER, "-d", "postgres",
                   "-v", "ON_ERROR_STOP=1", "-q", "-c", f'CREATE DATABASE "{name}"'])
        return self.url(name)

    def close(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def wait_stopped(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    pass
            except OSError:
                return
            time.sleep(0.05)
