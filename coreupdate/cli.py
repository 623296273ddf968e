"""``coreupdate``: run the update server (``serve``) and administer it (``token``, ``user``, ``migrate``).

Every sub-command opens the same database: ``--database URL`` (``postgresql://…``), else the SQLite file in
``--data-dir`` (default ``$STATE_DIRECTORY`` under systemd, else ``/var/lib/coreupdate``).  The schema is
migrated before anything else.  ``token create`` prints the new token alone on stdout.  ``user add|passwd`` read
the password from stdin (typed twice at a terminal), so scripts can pipe it and it never shows in ``ps``.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from coreos_common import logs
from coreupdate import accounts
from coreupdate.cliutil import EXIT_UNREACHABLE, EXIT_USAGE, CliError, run_cli
from coreupdate.model import DAY
from coreupdate.storage import engine as db_engine
from coreupdate.storage.accounts import AccountStore
from coreupdate.storage.migrations import SchemaTooNew
from coreupdate.storage.store import Conflict, NotFound, Store

PROG = "coreupdate"
DEFAULT_DATA_DIR = Path("/var/lib/coreupdate")
DEFAULT_LISTEN = "127.0.0.1:8080"

log = logging.getLogger(PROG)


def _data_dir(args: argparse.Namespace) -> Path:
    if args.data_dir:
        return Path(args.data_dir)
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(state) if state else DEFAULT_DATA_DIR


def open_store(args: argparse.Namespace) -> Store:
    """The migrated store of ``--database`` or ``--data-dir``; CliError with what to do otherwise."""
    data_dir = _data_dir(args)
    url = args.database
    if not url:
        try:
            data_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        except OSError as exc:
            raise CliError(f"cannot create the data directory {data_dir}: {exc.strerror}; give --data-dir") from None
        url = db_engine.sqlite_url(data_dir)
    try:
        store = Store(db_engine.create(url))
        store.migrate()
    except db_engine.DatabaseUrlError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    except SchemaTooNew as exc:
        raise CliError(str(exc)) from None
    except ModuleNotFoundError as exc:
        raise CliError(f"--database needs the Python module {exc.name} (Debian: python3-psycopg2)") from None
    except Exception as exc:
        if db_engine.is_unavailable(exc):
            where = db_engine.shown_url(url)
            raise CliError(f"cannot open the database {where}: {str(exc).splitlines()[0]}", EXIT_UNREACHABLE) from None
        raise
    if not args.database:
        _give_to_directory_owner(data_dir)
    return store


def _give_to_directory_owner(data_dir: Path) -> None:
    """Run as root on the service's directory (``coreupdate token create`` after install), files the command
    created would belong to root and the server (user coreupdate) could not write them: hand them over."""
    if os.geteuid() != 0:
        return
    try:
        owner = data_dir.stat()
        for path in data_dir.glob(db_engine.SQLITE_FILE + "*"):
            if path.stat().st_uid != owner.st_uid:
                os.chown(path, owner.st_uid, owner.st_gid)
    except OSError as exc:
        log.warning("Cannot give the database files in %s to their directory's owner: %s", data_dir, exc.strerror)


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise CliError(f"--listen {text!r} is not HOST:PORT (e.g. 0.0.0.0:8080 or [::]:8080)", EXIT_USAGE)
    return host.strip("[]") or "0.0.0.0", int(port)


def _days(value: str) -> float:
    try:
        days = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of days") from None
    if not days > 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be more than 0 days")
    return days * DAY


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not 1 <= seconds <= 86400:
        raise argparse.ArgumentTypeError(f"{value!r} must be between 1 and 86400 seconds")
    return seconds


def _cmd_serve(args: argparse.Namespace) -> int:
    # Imported here: the server's modules (aiohttp, the API, the dashboard) cost seconds on a busy machine, and
    # the administration commands do not need them.
    from coreupdate.server import Server, ServerConfig, serve

    host, port = _listen(args.listen)
    key = None
    if args.payload_public_key:
        try:
            key = Path(args.payload_public_key).read_bytes()
        except OSError as exc:
            raise CliError(f"cannot read --payload-public-key {args.payload_public_key}: {exc.strerror}") from None
    store = open_store(args)
    config = ServerConfig(
        data_dir=_data_dir(args), public_url=args.public_url, payload_public_key=key,
        events_retention_s=args.events_retention, history_retention_s=args.history_retention,
        instances_retention_s=args.instances_retention, behind_tls_proxy=args.behind_tls_proxy,
        history_resolution_s=args.history_resolution,
    )
    log.info("Database: %s; data directory %s", db_engine.shown_url(str(store.engine.url)), config.data_dir)
    try:
        asyncio.run(serve(Server(config, store), host, port))
    except OSError as exc:
        raise CliError(f"cannot listen on {args.listen}: {exc.strerror or exc}", EXIT_UNREACHABLE) from None
    return 0


def _cmd_token_create(args: argparse.Namespace) -> int:
    token = open_store(args).create_token(args.name)
    print(token)
    return 0


def _cmd_token_list(args: argparse.Namespace) -> int:
    tokens = open_store(args).list_tokens()
    if args.json:
        print(json.dumps([t.__dict__ for t in tokens]))
        return 0

    _table([("ID", "NAME", "CREATED", "REVOKED")]
           + [(str(t.id), t.name, _when(t.created_at), _when(t.revoked_at)) for t in tokens])
    return 0


def _when(t: float | None) -> str:
    return "-" if t is None else datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _cmd_token_revoke(args: argparse.Namespace) -> int:
    try:
        count = open_store(args).revoke_token(args.token)
    except NotFound as exc:
        raise CliError(str(exc)) from None
    print(f"revoked {count} token(s)")
    return 0


def _read_password(prompt: str) -> str:
    """The new password: typed twice at a terminal, else the first line of stdin (for scripts)."""
    if sys.stdin.isatty():
        first = getpass.getpass(f"{prompt}: ")
        if getpass.getpass(f"{prompt} again: ") != first:
            raise CliError("the two passwords differ; nothing was changed")
        password = first
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    try:
        return accounts.check_new_password(password)
    except accounts.AccountError as exc:
        raise CliError(f"{exc} (read from {'the terminal' if sys.stdin.isatty() else 'stdin'})") from None


def _cmd_user_add(args: argparse.Namespace) -> int:
    try:
        name, role = accounts.user_name(args.name), accounts.role(args.role)
    except accounts.AccountError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    store = AccountStore(open_store(args).engine)
    if store.find_user(name) is not None:
        raise CliError(f"user {name} already exists (change the password with 'coreupdate user passwd {name}')")
    password_hash = accounts.hash_password(_read_password(f"Password for {name}"))
    try:
        store.add_user(name, role, password_hash)
    except Conflict as exc:
        raise CliError(str(exc)) from None
    print(f"user {name} added ({role})")
    return 0


def _cmd_user_list(args: argparse.Namespace) -> int:
    users = AccountStore(open_store(args).engine).list_users()
    if args.json:
        print(json.dumps([{"name": u.user.name, "role": str(u.user.role), "created_at": u.created_at,
                           "password_changed_at": u.password_changed_at} for u in users]))
        return 0
    _table([("NAME", "ROLE", "CREATED", "PASSWORD CHANGED")]
           + [(u.user.name, str(u.user.role), _when(u.created_at), _when(u.password_changed_at)) for u in users])
    return 0


def _cmd_user_delete(args: argparse.Namespace) -> int:
    try:
        AccountStore(open_store(args).engine).delete_user(args.name)
    except NotFound as exc:
        raise CliError(str(exc)) from None
    print(f"user {args.name} deleted; their sessions are ended")
    return 0


def _cmd_user_passwd(args: argparse.Namespace) -> int:
    store = AccountStore(open_store(args).engine)
    if store.find_user(args.name) is None:
        raise CliError(f"no user {args.name}")
    password_hash = accounts.hash_password(_read_password(f"New password for {args.name}"))
    try:
        store.set_password(args.name, password_hash)
    except NotFound as exc:
        raise CliError(str(exc)) from None
    print(f"password of {args.name} changed; their sessions are ended")
    return 0


def _cmd_migrate(args: argparse.Namespace) -> int:
    open_store(args)
    print("database schema is current")
    return 0


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", help="state directory (SQLite database, stored payloads); default "
                                           "$STATE_DIRECTORY or /var/lib/coreupdate")
    common.add_argument("--database", help="database URL, e.g. postgresql://coreupdate@db.example/coreupdate "
                                           "(default: SQLite in --data-dir)")
    common.add_argument("--verbose", action="store_true", help="debug logging")
    parser = argparse.ArgumentParser(prog=PROG, description="The fleet's update server (Omaha, groups, rollouts).")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", parents=[common], help="run the server")
    s.add_argument("--listen", default=DEFAULT_LISTEN, help=f"HOST:PORT (default {DEFAULT_LISTEN})")
    s.add_argument("--public-url", help="base URL nodes use to reach this server, for payload URLs "
                                        "(default: from each request's Host header)")
    s.add_argument("--payload-public-key", help="PEM public key: uploaded payloads must be signed by it")
    s.add_argument("--events-retention", type=_days, default=30 * DAY, metavar="DAYS",
                   help="keep events and the activity log this long (default 30)")
    s.add_argument("--history-retention", type=_days, default=90 * DAY, metavar="DAYS",
                   help="keep the versions-over-time history this long (default 90)")
    s.add_argument("--instances-retention", type=_days, default=180 * DAY, metavar="DAYS",
                   help="forget instances not seen for this long (default 180)")
    s.add_argument("--behind-tls-proxy", action="store_true",
                   help="browsers reach the dashboard through a TLS proxy: mark its cookies Secure and take the "
                        "client's address from X-Forwarded-For")
    s.add_argument("--history-resolution", type=_seconds, default=3600.0, metavar="SECONDS",
                   help="period of the versions-over-time history (default 3600: hourly)")
    s.set_defaults(handler=_cmd_serve)
    token = sub.add_parser("token", help="API tokens").add_subparsers(dest="token_command", required=True)
    tc = token.add_parser("create", parents=[common], help="make a token; prints it alone on stdout")
    tc.add_argument("--name", default="admin", help="a name to recognise it by (default admin)")
    tc.set_defaults(handler=_cmd_token_create)
    tl = token.add_parser("list", parents=[common], help="list tokens (never their secrets)")
    tl.add_argument("--json", action="store_true")
    tl.set_defaults(handler=_cmd_token_list)
    tr = token.add_parser("revoke", parents=[common], help="revoke a token by id, or all tokens of a name")
    tr.add_argument("token", metavar="ID|NAME")
    tr.set_defaults(handler=_cmd_token_revoke)
    user = sub.add_parser("user", help="dashboard users").add_subparsers(dest="user_command", required=True)
    ua = user.add_parser("add", parents=[common], help="add a user; the password is read from stdin (typed twice "
                                                      "at a terminal)")
    ua.add_argument("name")
    ua.add_argument("--role", required=True, choices=[str(r) for r in accounts.Role],
                    help="viewer: read every page; admin: also change groups, channels and packages")
    ua.set_defaults(handler=_cmd_user_add)
    ul = user.add_parser("list", parents=[common], help="list users (never their password hashes)")
    ul.add_argument("--json", action="store_true")
    ul.set_defaults(handler=_cmd_user_list)
    ud = user.add_parser("delete", parents=[common], help="delete a user and end their sessions")
    ud.add_argument("name")
    ud.set_defaults(handler=_cmd_user_delete)
    up = user.add_parser("passwd", parents=[common], help="set a user's password (from stdin) and end their "
                                                          "sessions")
    up.add_argument("name")
    up.set_defaults(handler=_cmd_user_passwd)
    m = sub.add_parser("migrate", parents=[common], help="bring the database schema up to date and exit")
    m.set_defaults(handler=_cmd_migrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        args = _parser().parse_args(argv)
        logs.setup(PROG, verbose=args.verbose)
        return int(args.handler(args))

    return run_cli(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
