"""Opening the database: the SQLite file under the data directory (WAL) or a PostgreSQL URL.

SQLite: WAL so readers never wait for the writer, ``synchronous=NORMAL`` (WAL's safe setting), a busy timeout
for the moments two transactions meet, and every transaction started with ``BEGIN IMMEDIATE`` so a
read-then-write transaction (a grant) takes the write lock before it reads and can never be overtaken.
PostgreSQL: connections are checked before use (``pool_pre_ping``), so a restarted server is reconnected
to without restarting coreupdate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import QueuePool

SQLITE_FILE = "coreupdate.db"
BUSY_TIMEOUT_MS = 30_000


class DatabaseUrlError(ValueError):
    """A --database value coreupdate cannot use."""


def sqlite_url(data_dir: Path) -> str:
    return f"sqlite:///{data_dir / SQLITE_FILE}"


def create(url: str) -> Engine:
    """An engine for ``url`` (``sqlite:///…`` or ``postgresql://…``), set up as the module docstring says."""
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError as exc:
        raise DatabaseUrlError(f"--database is not a database URL: {exc}") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        engine = sa.create_engine(
            url,
            future=True,
            poolclass=QueuePool,
            pool_size=4,
            max_overflow=4,
            connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT_MS / 1000},
        )
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    if backend == "postgresql":
        # Name the driver: SQLAlchemy 2.1 made psycopg 3 the default for postgresql://, Debian ships psycopg2.
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg2")
        if parsed.get_driver_name() != "psycopg2":
            raise DatabaseUrlError(f"--database {shown_url(url)}: only the psycopg2 driver is supported")
        return sa.create_engine(parsed, future=True, pool_pre_ping=True, pool_size=8, max_overflow=8)
    raise DatabaseUrlError(f"--database {shown_url(url)}: use sqlite:///PATH or postgresql://USER@HOST/DB")


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let the 'begin' event start transactions (pysqlite's own implicit BEGIN is DEFERRED).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin(conn: Any) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def shown_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        return str(sa.engine.make_url(url).render_as_string(hide_password=True))
    except sa.exc.ArgumentError:
        return "(unparseable database URL)"


def is_unavailable(exc: BaseException) -> bool:
    """True for "the database cannot be reached or is restarting" (answered with 503, retried later)."""
    return isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError) or (
        isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated
    )
