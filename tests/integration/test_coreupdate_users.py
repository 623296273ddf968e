"""``coreupdate user add|list|delete|passwd``: passwords from stdin (never on the command line), scrypt hashes in
the database, exit codes, ``--json``, and no traceback, also on a closed pipe."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import sqlalchemy as sa

from coreupdate.accounts import verify_password
from coreupdate.storage import engine as db_engine
from sim.coreupdate import coreupdate_command

pytestmark = pytest.mark.integration


def user(data: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    done = subprocess.run(coreupdate_command("user", *args, "--data-dir", str(data)), input=stdin,
                          capture_output=True, text=True, timeout=60)
    assert "Traceback" not in done.stderr
    return done


def stored_hash(data: Path, name: str) -> str:
    engine = db_engine.create(db_engine.sqlite_url(data))
    try:
        with engine.connect() as conn:
            return str(conn.execute(sa.text("SELECT password_hash FROM users WHERE name = :n"), {"n": name}).scalar())
    finally:
        engine.dispose()


def test_users_are_added_listed_changed_and_deleted(tmp_path: Path) -> None:
    added = user(tmp_path, "add", "alice", "--role", "admin", stdin="first password\n")
    assert added.returncode == 0 and added.stdout == "user alice added (admin)\n"
    first = stored_hash(tmp_path, "alice")
    assert first.startswith("scrypt$32768$8$1$") and verify_password("first password", first)
    assert user(tmp_path, "add", "alice", "--role", "viewer", stdin="another one\n").returncode == 1
    assert user(tmp_path, "add", "bob", "--role", "root", stdin="whatever12\n").returncode == 2
    short = user(tmp_path, "add", "bob", "--role", "viewer", stdin="short\n")
    assert short.returncode == 1 and "at least 8 characters" in short.stderr
    assert user(tmp_path, "add", "bob", "--role", "viewer", stdin="").returncode == 1  # no password at all
    assert user(tmp_path, "add", "bob", "--role", "viewer", stdin="bob's password\n").returncode == 0
    listed = user(tmp_path, "list").stdout.splitlines()
    assert [line.split()[:2] for line in listed] == [["NAME", "ROLE"], ["alice", "admin"], ["bob", "viewer"]]
    as_json = json.loads(user(tmp_path, "list", "--json").stdout)
    assert [(u["name"], u["role"]) for u in as_json] == [("alice", "admin"), ("bob", "viewer")]
    assert "scrypt" not in user(tmp_path, "list", "--json").stdout
    assert user(tmp_path, "passwd", "alice", stdin="second password\n").returncode == 0
    assert verify_password("second password", stored_hash(tmp_path, "alice"))
    assert user(tmp_path, "passwd", "carol", stdin="whatever12\n").returncode == 1
    assert user(tmp_path, "delete", "bob").returncode == 0
    gone = user(tmp_path, "delete", "bob")
    assert gone.returncode == 1 and "no user bob" in gone.stderr


def test_a_closed_pipe_is_not_a_traceback(tmp_path: Path) -> None:
    assert user(tmp_path, "add", "alice", "--role", "admin", stdin="first password\n").returncode == 0
    done = subprocess.run(" ".join(coreupdate_command("user", "list", "--data-dir", str(tmp_path))) + " | head -0",
                          shell=True, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "Traceback" not in done.stderr and done.stderr == ""
