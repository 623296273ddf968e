"""``locksmithctl``: show and change the cluster reboot semaphore, fake a reboot signal, reboot under it.

Command line as locksmith's: Go-style global flags before the subcommand (``-flag value``, ``-flag=value``,
one or two dashes; ``-h``/``-help`` print the usage and succeed), ``LOCKSMITHCTL_<FLAG>`` environment variables
for flags not given (a value that does not parse is ignored, as Go's ``flag.Set`` errors were), then
``status``/``lock``/``unlock``/``set-max``/``send-need-reboot``/``reboot``/``help``. Output lines, error
prefixes and exit codes are locksmith's (a failure to reach etcd is ``Error initializing etcd client: …``),
except that every failure is one clear line on stderr and exit status 1 (locksmith panicked on a failed
``status`` read and exited 0 after a failed ``set-max`` write), a holder locking again succeeds, ``reboot``
releases the lock it took when logind refuses to reboot, ``status`` shows how long each holder has held its
slot and on which host, and ``unlock --older-than`` releases the holders older than a duration. The README
lists every difference.

Rules of this file: a command imports only what it uses (``--version`` and ``status`` must start in tens of
milliseconds: the etcd commands use the blocking etcd shell and never load asyncio or D-Bus); a reader that
closes stdout early (``locksmithctl status | head -0``) ends the command quietly with status 141, as a
process killed by SIGPIPE; nothing ever shows a Python traceback.
"""

from __future__ import annotations

import os
import sys

from coreos_common.cli import EXIT_BROKEN_PIPE, discard_stdout
from locksmithd import __version__

# ``typing`` alone costs a few milliseconds at start; the annotations below are only read by mypy.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from pathlib import Path
    from typing import TypeVar

    from dbus_fast.aio import MessageBus

    from locksmithd.backends.etcd.gateway import Procedure
    from locksmithd.backends.etcd.ops import SemaphoreKeys, Snapshot, Update
    from locksmithd.backends.etcd.sync import SyncEtcdClient
    from locksmithd.backends.etcd.v2 import V2Session, V2Snapshot, V2Update
    from locksmithd.backends.etcd_settings import EtcdSettings
    from locksmithd.semaphore import HolderRecord, Semaphore

    T = TypeVar("T")

PROGRAM = "locksmithctl"
ENV_PREFIX = "LOCKSMITHCTL_"


class UsageError(Exception):
    """Bad command line: printed with the usage, exit status 2."""


class CommandFailed(Exception):
    """A command's failure: the message is printed on stderr, exit status 1."""


class Flag:
    """One flag: its name, help, default (None: the etcd default endpoints) and whether it is a boolean."""

    __slots__ = ("boolean", "default", "help", "name")

    def __init__(self, name: str, help: str, default: str | None = "", boolean: bool = False) -> None:
        self.name, self.help, self.default, self.boolean = name, help, default, boolean

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper().replace("-", "_")


GLOBAL_FLAGS: tuple[Flag, ...] = (
    Flag("debug", "Print debug information to stderr.", "false", boolean=True),
    Flag("endpoint", "etcd endpoint(s) for locksmith, comma-separated.", None),
    Flag("etcd-cafile", "etcd CA file (alone: verify the server only)."),
    Flag("etcd-certfile", "etcd client certificate file (needs -etcd-keyfile)."),
    Flag("etcd-keyfile", "etcd client key file (needs -etcd-certfile)."),
    Flag("etcd-username", "etcd user name for authentication."),
    Flag("etcd-password", "etcd password for authentication."),
    Flag("group", "Reboot group (default: the cluster-wide semaphore)."),
    Flag(
        "etcd-v2-compat",
        "Also use locksmith's etcd v2 semaphore (lock it first, unlock it last), while nodes still run locksmith.",
        "false",
        boolean=True,
    ),
    Flag("config-root", "Root directory holding etc/machine-id.", "/"),
    Flag("bus-address", "D-Bus address of the system bus (default: the system bus)."),
    Flag("version", "Print the version and exit.", "false", boolean=True),
)
HELP_FLAGS = frozenset({"h", "help"})


class Command:
    __slots__ = ("flags", "name", "summary", "usage")

    def __init__(self, name: str, usage: str, summary: str, flags: tuple[Flag, ...] = ()) -> None:
        self.name, self.usage, self.summary, self.flags = name, usage, summary, flags


_GROUP_FLAG = Flag("group", "Reboot group (overrides the global -group).")
COMMANDS: tuple[Command, ...] = (
    Command("help", "help [command]", "Show a list of commands or help for one command."),
    Command(
        "status",
        "status [--json] [--group G]",
        "Show the semaphore: free slots, maximum, holders (with how long and where they hold a slot).",
        (Flag("json", "Print one JSON object.", "false", boolean=True), _GROUP_FLAG),
    ),
    Command("lock", "lock [--group G] [id]", "Take a slot for id (default: this machine).", (_GROUP_FLAG,)),
    Command(
        "unlock",
        "unlock [--group G] [id] | unlock --older-than DURATION",
        "Release id's slot (default: this machine), or every slot held for longer than DURATION (e.g. 6h).",
        (_GROUP_FLAG, Flag("older-than", "Release the holders that took their slot longer ago than this.")),
    ),
    Command("set-max", "set-max [--group G] N", "Set the number of slots to N.", (_GROUP_FLAG,)),
    Command(
        "send-need-reboot",
        "send-need-reboot",
        "Emit an UPDATE_STATUS_UPDATED_NEED_REBOOT StatusUpdate signal, as update-engine does.",
    ),
    Command("reboot", "reboot", "Take this machine's slot and reboot through logind (root only)."),
)
_COMMANDS = {c.name: c for c in COMMANDS}


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")


# -- flags ---------------------------------------------------------------------------------------------------


def _parse_bool(text: str, where: str) -> bool:
    from coreos_common.boolean import parse_bool

    try:
        return parse_bool(text)
    except ValueError:
        raise UsageError(f"invalid boolean value {text!r} for {where}") from None


def _is_number(token: str) -> bool:
    return token.startswith("-") and token[1:].isdigit()


class HelpRequested(Exception):
    """``-h``/``-help``: print the usage and succeed, as Go's flag package does."""


def parse_flags(
    args: Sequence[str], flags: Sequence[Flag], *, interspersed: bool
) -> tuple[dict[str, str], list[str]]:
    """Go ``flag`` syntax. Returns the flags given and the positional arguments.

    With ``interspersed=False`` parsing stops at the first positional argument (global flags before the
    subcommand); otherwise flags may come anywhere until ``--``.
    """
    table = {f.name: f for f in flags}
    given: dict[str, str] = {}
    positional: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        i += 1
        if token == "--":
            positional.extend(args[i:])
            break
        if not token.startswith("-") or token == "-" or _is_number(token):
            positional.append(token)
            if not interspersed:
                positional.extend(args[i:])
                break
            continue
        body = token[2:] if token.startswith("--") else token[1:]
        if not body or body.startswith("-") or body.startswith("="):
            raise UsageError(f"bad flag syntax: {token}")
        name, eq, value = body.partition("=")
        flag = table.get(name)
        if flag is None:
            if name in HELP_FLAGS:
                raise HelpRequested
            raise UsageError(f"flag provided but not defined: -{name}")
        if flag.boolean:
            given[name] = str(_parse_bool(value, f"-{name}")).lower() if eq else "true"
        elif eq:
            given[name] = value
        elif i < len(args):
            given[name] = args[i]
            i += 1
        else:
            raise UsageError(f"flag needs an argument: -{name}")
    return given, positional


class Options:
    """The global flags' values, resolved."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = values

    def get(self, name: str) -> str:
        return self.values[name]

    def flag(self, name: str) -> bool:
        return self.values[name] == "true"


def _default(flag: Flag) -> str:
    if flag.default is not None:
        return flag.default
    from locksmithd.backends.etcd_settings import DEFAULT_ENDPOINTS

    return ",".join(DEFAULT_ENDPOINTS)


def resolve_globals(given: Mapping[str, str], environ: Mapping[str, str]) -> Options:
    """Command line > non-empty ``LOCKSMITHCTL_<FLAG>`` > default; an environment value that does not parse
    is ignored, as locksmith's ``flagsFromEnv`` ignored it."""
    values: dict[str, str] = {}
    for flag in GLOBAL_FLAGS:
        if flag.name in given:
            values[flag.name] = given[flag.name]
            continue
        env_value = environ.get(flag.env, "")
        value = _default(flag)
        if env_value and flag.name != "version":
            if not flag.boolean:
                value = env_value
            else:
                import contextlib

                with contextlib.suppress(UsageError):
                    value = str(_parse_bool(env_value, flag.env)).lower()
        values[flag.name] = value
    return Options(values)


# -- help ----------------------------------------------------------------------------------------------------


def _columns(rows: Sequence[tuple[str, str]]) -> list[str]:
    width = max(len(a) for a, _ in rows) + 2
    return [f"\t{a.ljust(width)}{b}" for a, b in rows]


def usage_text() -> str:
    lines = [
        "NAME:",
        f"\t{PROGRAM} - Manage the cluster-wide reboot lock.",
        "",
        "USAGE:",
        f"\t{PROGRAM} [global options] <command> [command options] [arguments...]",
        "",
        "VERSION:",
        f"\t{__version__}",
        "",
        "COMMANDS:",
        *_columns([(c.name, c.summary) for c in COMMANDS]),
        "",
        "GLOBAL OPTIONS:",
        *_columns([(f"-{f.name}={_default(f)}" if _default(f) else f"-{f.name}", f.help) for f in GLOBAL_FLAGS]),
        "",
        f"Flags not given on the command line are read from {ENV_PREFIX}<FLAG> (e.g. {ENV_PREFIX}ENDPOINT).",
        f"Run '{PROGRAM} help <command>' for more information on a command.",
    ]
    return "\n".join(lines)


def command_help(command: Command) -> str:
    lines = [
        "NAME:",
        f"\t{PROGRAM} {command.name} - {command.summary}",
        "",
        "USAGE:",
        f"\t{PROGRAM} [global options] {command.usage}",
    ]
    if command.flags:
        lines += ["", "OPTIONS:", *_columns([(f"--{f.name}", f.help) for f in command.flags])]
    return "\n".join(lines)


# -- the semaphore -------------------------------------------------------------------------------------------


def machine_id_of(root: Path) -> str:
    """This machine's id, as locksmithd names its lock holder (coreos_common.identity's one rule)."""
    from coreos_common.identity import IdentityError, read_machine_id

    try:
        return read_machine_id(root)
    except IdentityError as exc:
        raise CommandFailed(f"Cannot read machine-id: {exc.message}") from None


def _settings(opts: Options, group: str) -> EtcdSettings:
    from locksmithd.backends.etcd_settings import EtcdSettings, parse_endpoints

    return EtcdSettings(
        endpoints=parse_endpoints(opts.get("endpoint")),
        ca_file=opts.get("etcd-cafile"),
        cert_file=opts.get("etcd-certfile"),
        key_file=opts.get("etcd-keyfile"),
        username=opts.get("etcd-username"),
        password=opts.get("etcd-password"),
        group=group,
        v2_compat=opts.flag("etcd-v2-compat"),
    )


class Cluster:
    """The group's semaphore through the blocking etcd client; failures become locksmith's error lines.

    A failure before etcd ever answered (unreachable, refused, not etcd) is locksmith's ``Error initializing
    etcd client: …``; later ones carry the command's own prefix.
    """

    def __init__(self, opts: Options, group: str) -> None:
        from locksmithd.backends import LockBackendError
        from locksmithd.backends.etcd.sync import SyncEtcdClient

        self.group = group
        try:
            settings = _settings(opts, group)
            self.client: SyncEtcdClient = SyncEtcdClient(settings)
        except LockBackendError as exc:
            raise CommandFailed(f"Error initializing etcd client: {exc}") from None
        self.keys: SemaphoreKeys = self.client.keys
        self.v2: V2Session | None = None
        if settings.v2_compat:
            from locksmithd.backends.etcd.v2 import V2Session

            self.v2 = V2Session(settings)

    def run(self, procedure: Procedure[T], prefix: str) -> T:
        from locksmithd.backends import LockBackendError
        from locksmithd.backends.etcd.gateway import EtcdRefused, EtcdUnavailable
        from locksmithd.semaphore import SemaphoreError

        try:
            result = self.client.run(procedure)
        except (LockBackendError, SemaphoreError) as exc:
            reached = self._contacted or self.client.session.contacted
            if isinstance(exc, EtcdUnavailable | EtcdRefused) and not reached:
                raise CommandFailed(f"Error initializing etcd client: {exc}") from None
            raise CommandFailed(f"{prefix}: {exc}") from None
        self._contacted = True
        return result

    _contacted = False

    def v2_read(self) -> V2Snapshot:
        from locksmithd.backends.etcd import v2

        assert self.v2 is not None
        return self.run(v2.read(self.v2), "Error getting status")

    def v2_apply(self, change: Callable[[Semaphore], Semaphore], prefix: str) -> V2Update:
        from locksmithd.backends.etcd import v2

        assert self.v2 is not None
        return self.run(v2.apply(self.v2, change), prefix)

    def status(self) -> tuple[Snapshot, dict[str, HolderRecord]]:
        from locksmithd.backends.etcd import ops

        return self.run(ops.status(self.client.session, self.keys), "Error getting status")

    def apply(
        self, change: Callable[[Semaphore], Semaphore], prefix: str, records: Mapping[str, HolderRecord] | None = None
    ) -> Update:
        from locksmithd.backends.etcd import ops

        return self.run(ops.apply(self.client.session, self.keys, change, records=records), prefix)

    def close(self) -> None:
        self.client.close()


def _group(opts: Options, local: dict[str, str]) -> str:
    return local.get("group", opts.get("group"))


def _record(opts: Options, holder: str, group: str) -> HolderRecord:
    """What ``lock`` records: the time, the group, and this host's name when the slot is this machine's."""
    import time

    from coreos_common.identity import read_hostname
    from locksmithd.semaphore import HolderRecord

    own = holder == _own_id_or_none(opts)
    return HolderRecord.at(time.time(), read_hostname() if own else "", group)


def _own_id_or_none(opts: Options) -> str | None:
    from pathlib import Path

    try:
        return machine_id_of(Path(opts.get("config-root")))
    except CommandFailed:
        return None


def _local_state(opts: Options) -> dict[str, object] | None:
    """This node's locksmithd state (``locksmithd.state``), None when it is not running; a bad file is named on
    stderr and shown as None."""
    from pathlib import Path

    from locksmithd.state import StateFileError, read_state

    try:
        return read_state(Path(opts.get("config-root")))
    except StateFileError as exc:
        _err(f"Cannot show this node's locksmithd state: {exc}")
        return None


def _show_age(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    from coreos_common.goduration import format_go_duration

    return format_go_duration(round(seconds))


# -- commands ------------------------------------------------------------------------------------------------


def cmd_status(opts: Options, local: dict[str, str], args: list[str]) -> int:
    import time

    if args:
        raise UsageError(f"status takes no arguments, got {' '.join(args)}")
    cluster = Cluster(opts, _group(opts, local))
    try:
        snapshot, records = cluster.status()
        old = cluster.v2_read().semaphore if cluster.v2 is not None else None
    finally:
        cluster.close()
    sem, now = snapshot.semaphore, time.time()
    if local.get("json") == "true":
        import json

        details = []
        for holder in sem.holders:
            record = records.get(holder)
            details.append(
                {"id": holder, "since": None, "age_seconds": None, "hostname": None, "group": None, "version": None}
                if record is None
                else {
                    "id": holder,
                    "since": record.since,
                    "age_seconds": None if (age := record.age(now)) is None else round(age),
                    "hostname": record.hostname,
                    "group": record.group,
                    "version": record.version,
                }
            )
        doc = {
            "group": cluster.group,
            "key": cluster.keys.semaphore,
            "semaphore": sem.semaphore,
            "max": sem.max,
            "holders": list(sem.holders),
            "holder_details": details,
        }
        if old is not None:
            doc["v2"] = {"semaphore": old.semaphore, "max": old.max, "holders": list(old.holders)}
        doc["local"] = _local_state(opts)
        _out(json.dumps(doc))
        return 0
    _out(f"Available: {sem.semaphore}")
    _out(f"Max: {sem.max}")
    if sem.holders:
        rows = [("MACHINE ID", "AGE", "HOST")]
        for holder in sem.holders:
            record = records.get(holder)
            shown = _show_age(record.age(now)) if record is not None else "unknown"
            rows.append((holder, shown, record.hostname if record is not None else ""))
        widths = [max(len(row[i]) for row in rows) for i in range(2)]
        _out()
        for holder, shown, host in rows:
            _out(f"{holder.ljust(widths[0])}  {shown.ljust(widths[1])}  {host}".rstrip())
    if old is not None and old != sem:
        _out()
        _out("The etcd v2 semaphore (locksmith's) differs:")
        _out(f"Available: {old.semaphore}")
        _out(f"Max: {old.max}")
        if old.holders:
            _out()
            _out("MACHINE ID")
            for holder in old.holders:
                _out(holder)
    return 0


def _one_id(opts: Options, args: list[str], command: str) -> str:
    from pathlib import Path

    if len(args) > 1:
        raise UsageError(f"{command} takes at most one id, got {' '.join(args)}")
    return args[0] if args else machine_id_of(Path(opts.get("config-root")))


def cmd_lock(opts: Options, local: dict[str, str], args: list[str]) -> int:
    holder = _one_id(opts, args, "lock")
    group = _group(opts, local)
    cluster = Cluster(opts, group)
    try:
        # The v2 slot first, so that locksmith's nodes never see a reboot they do not count.
        took_v2 = cluster.v2 is not None and cluster.v2_apply(lambda sem: sem.lock(holder), "Error locking").written
        try:
            cluster.apply(lambda sem: sem.lock(holder), "Error locking", {holder: _record(opts, holder, group)})
        except CommandFailed:
            if took_v2:
                cluster.v2_apply(lambda sem: sem.unlock_if_held(holder), "Error unlocking")
            raise
    finally:
        cluster.close()
    return 0


def cmd_unlock(opts: Options, local: dict[str, str], args: list[str]) -> int:
    if "older-than" in local:
        if args:
            raise UsageError("unlock --older-than takes no id")
        return _unlock_older_than(opts, _group(opts, local), local["older-than"])
    holder = _one_id(opts, args, "unlock")
    cluster = Cluster(opts, _group(opts, local))
    try:
        if cluster.v2 is None:
            cluster.apply(lambda sem: sem.unlock(holder), "Error unlocking")
            return 0
        # Compatibility mode: the v3 slot, then the v2 one; an error only when neither was held.
        released = cluster.apply(lambda sem: sem.unlock_if_held(holder), "Error unlocking").written
        released = cluster.v2_apply(lambda sem: sem.unlock_if_held(holder), "Error unlocking").written or released
        if not released:
            raise CommandFailed("Error unlocking: holder does not exist")
    finally:
        cluster.close()
    return 0


def _unlock_older_than(opts: Options, group: str, text: str) -> int:
    """Release every holder whose record says it took its slot longer ago than ``text`` (a Go duration);
    holders without a record (old locksmith, v2) have no known age and keep their slots."""
    import functools
    import time

    from coreos_common.goduration import DurationError, format_go_duration, parse_go_duration
    from locksmithd.backends.etcd import ops

    try:
        limit = parse_go_duration(text).total_seconds()
    except DurationError as exc:
        raise UsageError(f"--older-than: {exc}") from None
    if limit < 0:
        raise UsageError(f"--older-than must not be negative, got {text}")
    cluster = Cluster(opts, group)
    try:
        for _ in range(ops.MAX_CONFLICT_RETRIES):
            snapshot, records = cluster.status()
            now = time.time()
            ages = {h: r.age(now) for h, r in records.items()}
            old = {h: age for h, age in ages.items() if age is not None and age > limit}
            unknown = [h for h in snapshot.semaphore.holders if ages.get(h) is None]
            if not old:
                break
            release = frozenset(old)
            new = snapshot.semaphore
            for holder in sorted(release):
                new = new.unlock(holder)
            written = cluster.run(
                ops.compare_and_swap(cluster.client.session, cluster.keys, snapshot, new), "Error unlocking"
            )
            if written.ok:
                if cluster.v2 is not None:
                    cluster.v2_apply(functools.partial(_without, holders=release), "Error unlocking")
                for holder in sorted(release):
                    record = records[holder]
                    host = f", host {record.hostname}" if record.hostname else ""
                    _out(f"Unlocked {holder} (held since {record.since}, {_show_age(old[holder])}{host})")
                break
            # Another writer came first: the records read may be stale, read everything again.
        else:
            raise CommandFailed(f"Error unlocking: gave up after {ops.MAX_CONFLICT_RETRIES} conflicting writes")
    finally:
        cluster.close()
    if not old:
        _out(f"No holder has held its slot for longer than {format_go_duration(limit)}.")
    for holder in unknown:
        _err(f"Kept {holder}: no record of when it took its slot (an old locksmith, or the v2 semaphore)")
    return 0


def _without(sem: Semaphore, holders: frozenset[str]) -> Semaphore:
    for holder in sorted(holders):
        sem = sem.unlock_if_held(holder)
    return sem


def _parse_max(text: str) -> int:
    """A decimal integer within locksmith's int64, as Go's strconv.Atoi reads it."""
    from locksmithd.semaphore import MAX_SLOTS

    body = text[1:] if text[:1] in "+-" else text
    if not body.isascii() or not body.isdigit():
        raise CommandFailed(f"Invalid maximum value: {text}")
    value = int(text)
    if value > MAX_SLOTS or value < -MAX_SLOTS - 1:
        raise CommandFailed(f"Invalid maximum value: {text}")
    if value < 0:
        raise CommandFailed(f"Invalid maximum value: {text} (must be 0 or more)")
    return value


def cmd_set_max(opts: Options, local: dict[str, str], args: list[str]) -> int:
    if not args:
        raise CommandFailed("New maximum value must be set.")
    if len(args) > 1:
        raise UsageError(f"set-max takes one value, got {' '.join(args)}")
    new_max = _parse_max(args[0])
    cluster = Cluster(opts, _group(opts, local))
    try:
        update = cluster.apply(lambda sem: sem.set_max(new_max), "Error setting value")
        if cluster.v2 is not None:
            cluster.v2_apply(lambda sem: sem.set_max(new_max), "Error setting value")
    finally:
        cluster.close()
    _out(f"Old-Max: {update.before.semaphore.max}")
    _out(f"Max: {update.after.semaphore.max}")
    return 0


async def _connect_system_bus(address: str) -> MessageBus:
    from dbus_fast import BusType
    from dbus_fast.aio import MessageBus

    try:
        return await MessageBus(bus_address=address or None, bus_type=BusType.SYSTEM).connect()
    except Exception as exc:
        raise CommandFailed(f"error connecting to system dbus: {exc}") from None


async def _send_need_reboot(address: str) -> None:
    from dbus_fast import Message

    from coreos_common.status import INTERFACE, OBJECT_PATH, STATUS_SIGNATURE, StatusSnapshot, UpdateStatus

    bus = await _connect_system_bus(address)
    try:
        body = list(StatusSnapshot(current_operation=UpdateStatus.UPDATED_NEED_REBOOT.value).as_tuple())
        signal = Message.new_signal(OBJECT_PATH, INTERFACE, "StatusUpdate", STATUS_SIGNATURE, body)
        try:
            await bus.send(signal)
        except Exception as exc:
            raise CommandFailed(f"error emitting signal: {exc}") from None
    finally:
        bus.disconnect()


def cmd_send_need_reboot(opts: Options, local: dict[str, str], args: list[str]) -> int:
    import asyncio

    if args:
        raise UsageError(f"send-need-reboot takes no arguments, got {' '.join(args)}")
    asyncio.run(_send_need_reboot(opts.get("bus-address")))
    return 0


async def _reboot(opts: Options, holder: str) -> None:
    import asyncio

    from coreos_common.dbus import DBusCallError
    from locksmithd.login1 import request_reboot

    group = opts.get("group")
    cluster = Cluster(opts, group)
    try:
        bus = await _connect_system_bus(opts.get("bus-address"))
        try:
            record = {holder: _record(opts, holder, group)}
            result = await asyncio.to_thread(cluster.apply, lambda sem: sem.lock(holder), "Error locking", record)
            try:
                await request_reboot(bus)
            except (DBusCallError, OSError, EOFError) as exc:
                problem = f"Error rebooting: {exc}"
                if result.written:
                    try:
                        await asyncio.to_thread(cluster.apply, lambda sem: sem.unlock_if_held(holder), "Error")
                        problem += f" (released the lock of {holder} again)"
                    except CommandFailed as unlock_exc:
                        problem += f"; and releasing the lock failed: {unlock_exc}"
                raise CommandFailed(problem) from None
        finally:
            bus.disconnect()
    finally:
        cluster.close()


def cmd_reboot(opts: Options, local: dict[str, str], args: list[str]) -> int:
    import asyncio
    from pathlib import Path

    if args:
        raise UsageError(f"reboot takes no arguments, got {' '.join(args)}")
    if os.geteuid() != 0:
        raise CommandFailed("Must be root to initiate reboot.")
    holder = machine_id_of(Path(opts.get("config-root")))
    asyncio.run(_reboot(opts, holder))
    return 0


_HANDLERS: dict[str, Callable[[Options, dict[str, str], list[str]], int]] = {
    "status": cmd_status,
    "lock": cmd_lock,
    "unlock": cmd_unlock,
    "set-max": cmd_set_max,
    "send-need-reboot": cmd_send_need_reboot,
    "reboot": cmd_reboot,
}


# -- entry point ---------------------------------------------------------------------------------------------


def _run(args: list[str]) -> int:
    try:
        given, rest = parse_flags(args, GLOBAL_FLAGS, interspersed=False)
        if "version" in given and given["version"] == "true":
            _out(f"{PROGRAM} version {__version__}")
            return 0
        opts = resolve_globals(given, os.environ)
    except HelpRequested:
        _out(usage_text())
        return 0
    except UsageError as exc:
        _err(str(exc))
        _err(usage_text())
        return 2

    if opts.flag("debug"):
        from coreos_common import logs

        logs.setup(PROGRAM, verbose=True)

    if not rest:
        _out(usage_text())
        return 0
    name, sub_args = rest[0], rest[1:]
    if name == "help":
        if not sub_args:
            _out(usage_text())
            return 0
        command = _COMMANDS.get(sub_args[0])
        if command is None:
            _err(f"Unrecognized command: {sub_args[0]}")
            return 1
        _out(command_help(command))
        return 0
    command = _COMMANDS.get(name)
    if command is None:
        _err(f'{PROGRAM}: unknown subcommand: "{name}"')
        _err(f"Run '{PROGRAM} help' for usage.")
        return 2
    try:
        local, positional = parse_flags(sub_args, command.flags, interspersed=True)
        return _HANDLERS[name](opts, local, positional)
    except HelpRequested:
        _out(command_help(command))
        return 0
    except UsageError as exc:
        _err(f"{PROGRAM} {name}: {exc}")
        _err(command_help(command))
        return 2
    except CommandFailed as exc:
        _err(str(exc))
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _run(list(sys.argv[1:] if argv is None else argv))
        sys.stdout.flush()
    except BrokenPipeError:
        discard_stdout()  # say nothing more, and keep the interpreter's final flush from failing too
        return EXIT_BROKEN_PIPE
    return code


if __name__ == "__main__":
    sys.exit(main())
