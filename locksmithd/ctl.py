"""``locksmithctl``: show and change the cluster reboot semaphore, fake a reboot signal, reboot under it.

Command line as locksmith's: Go-style global flags before the subcommand (``-flag value``, ``-flag=value``,
one or two dashes), ``LOCKSMITHCTL_<FLAG>`` environment variables for flags not given, then
``status``/``lock``/``unlock``/``set-max``/``send-need-reboot``/``reboot``/``help``. Output lines and exit
codes are locksmith's, except that every failure is one clear line on stderr and exit status 1 (locksmith
panicked on a failed ``status`` read and exited 0 after a failed ``set-max`` write), a holder locking again
succeeds, and ``reboot`` releases the lock it took when logind refuses to reboot.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dbus_fast import BusType, Message
from dbus_fast.aio import MessageBus

from coreos_common import logs
from coreos_common.boolean import parse_bool
from coreos_common.identity import IdentityError, read_machine_id
from coreos_common.status import INTERFACE, OBJECT_PATH, STATUS_SIGNATURE, StatusSnapshot, UpdateStatus
from locksmithd import __version__
from locksmithd.backends import LockBackendError
from locksmithd.backends.etcd import EtcdSemaphoreStore
from locksmithd.backends.etcd_settings import DEFAULT_ENDPOINTS, EtcdSettings, parse_endpoints
from locksmithd.semaphore import Semaphore, SemaphoreError

PROGRAM = "locksmithctl"
ENV_PREFIX = "LOCKSMITHCTL_"


class UsageError(Exception):
    """Bad command line: printed with the usage, exit status 2."""


@dataclass(frozen=True)
class Flag:
    name: str
    help: str
    default: str = ""
    boolean: bool = False

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper().replace("-", "_")


GLOBAL_FLAGS: tuple[Flag, ...] = (
    Flag("debug", "Print debug information to stderr.", "false", boolean=True),
    Flag("endpoint", "etcd endpoint(s) for locksmith, comma-separated.", ",".join(DEFAULT_ENDPOINTS)),
    Flag("etcd-cafile", "etcd CA file (alone: verify the server only)."),
    Flag("etcd-certfile", "etcd client certificate file (needs -etcd-keyfile)."),
    Flag("etcd-keyfile", "etcd client key file (needs -etcd-certfile)."),
    Flag("etcd-username", "etcd user name for authentication."),
    Flag("etcd-password", "etcd password for authentication."),
    Flag("group", "Reboot group (default: the cluster-wide semaphore)."),
    Flag("config-root", "Root directory holding etc/machine-id.", "/"),
    Flag("bus-address", "D-Bus address of the system bus (default: the system bus)."),
    Flag("version", "Print the version and exit.", "false", boolean=True),
)


@dataclass(frozen=True)
class Command:
    name: str
    usage: str
    summary: str
    flags: tuple[Flag, ...] = ()


_GROUP_FLAG = Flag("group", "Reboot group (overrides the global -group).")
COMMANDS: tuple[Command, ...] = (
    Command("help", "help [command]", "Show a list of commands or help for one command."),
    Command(
        "status",
        "status [--json] [--group G]",
        "Show the semaphore: free slots, maximum and holders.",
        (Flag("json", "Print one JSON object.", "false", boolean=True), _GROUP_FLAG),
    ),
    Command("lock", "lock [--group G] [id]", "Take a slot for id (default: this machine).", (_GROUP_FLAG,)),
    Command(
        "unlock", "unlock [--group G] [id]", "Release id's slot (default: this machine).", (_GROUP_FLAG,)
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
    print(text, file=sys.stdout)


def _err(text: str) -> None:
    print(text, file=sys.stderr)


# -- flags ---------------------------------------------------------------------------------------------------

def _parse_bool(text: str, where: str) -> bool:
    try:
        return parse_bool(text)
    except ValueError:
        raise UsageError(f"invalid boolean value {text!r} for {where}") from None


def _is_number(token: str) -> bool:
    return token.startswith("-") and token[1:].isdigit()


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


@dataclass
class Options:
    values: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> str:
        return self.values[name]

    def flag(self, name: str) -> bool:
        return self.values[name] == "true"


def resolve_globals(given: Mapping[str, str], environ: Mapping[str, str]) -> Options:
    """Command line > non-empty ``LOCKSMITHCTL_<FLAG>`` > default."""
    values: dict[str, str] = {}
    for flag in GLOBAL_FLAGS:
        if flag.name in given:
            values[flag.name] = given[flag.name]
            continue
        env_value = environ.get(flag.env, "")
        if env_value and flag.name != "version":
            values[flag.name] = str(_parse_bool(env_value, flag.env)).lower() if flag.boolean else env_value
        else:
            values[flag.name] = flag.default
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
        *_columns([(f"-{f.name}={f.default}" if f.default else f"-{f.name}", f.help) for f in GLOBAL_FLAGS]),
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


# -- commands ------------------------------------------------------------------------------------------------


class CommandFailed(Exception):
    """A command's failure: the message is printed on stderr, exit status 1."""


def machine_id_of(root: Path) -> str:
    """This machine's id, as locksmithd names its lock holder (coreos_common.identity's one rule)."""
    try:
        return read_machine_id(root)
    except IdentityError as exc:
        raise CommandFailed(f"Cannot read machine-id: {exc.message}") from None


def _settings(opts: Options, group: str) -> EtcdSettings:
    return EtcdSettings(
        endpoints=parse_endpoints(opts.get("endpoint")),
        ca_file=opts.get("etcd-cafile"),
        cert_file=opts.get("etcd-certfile"),
        key_file=opts.get("etcd-keyfile"),
        username=opts.get("etcd-username"),
        password=opts.get("etcd-password"),
        group=group,
    )


def _store(opts: Options, group: str) -> EtcdSemaphoreStore:
    try:
        return EtcdSemaphoreStore(_settings(opts, group))
    except LockBackendError as exc:
        raise CommandFailed(f"Error initializing etcd client: {exc}") from None


def _group(opts: Options, local: dict[str, str]) -> str:
    return local.get("group", opts.get("group"))


def cmd_status(opts: Options, local: dict[str, str], args: list[str]) -> int:
    if args:
        raise UsageError(f"status takes no arguments, got {' '.join(args)}")
    group = _group(opts, local)
    store = _store(opts, group)
    try:
        sem, _ = store.get()
    except LockBackendError as exc:
        raise CommandFailed(f"Error getting status: {exc}") from None
    finally:
        store.close()
    if local.get("json") == "true":
        doc = {
            "group": group,
            "key": store.key,
            "semaphore": sem.semaphore,
            "max": sem.max,
            "holders": list(sem.holders),
        }
        _out(json.dumps(doc))
        return 0
    _out(f"Available: {sem.semaphore}")
    _out(f"Max: {sem.max}")
    if sem.holders:
        _out()
        _out("MACHINE ID")
        for holder in sem.holders:
            _out(holder)
    return 0


def _one_id(opts: Options, args: list[str], command: str) -> str:
    if len(args) > 1:
        raise UsageError(f"{command} takes at most one id, got {' '.join(args)}")
    return args[0] if args else machine_id_of(Path(opts.get("config-root")))


def _apply(store: EtcdSemaphoreStore, fn: Callable[[Semaphore], Semaphore], prefix: str) -> Semaphore:
    try:
        return store.apply(fn).current
    except (SemaphoreError, LockBackendError) as exc:
        raise CommandFailed(f"{prefix}: {exc}") from None
    finally:
        store.close()


def cmd_lock(opts: Options, local: dict[str, str], args: list[str]) -> int:
    holder = _one_id(opts, args, "lock")
    _apply(_store(opts, _group(opts, local)), lambda sem: sem.lock(holder), "Error locking")
    return 0


def cmd_unlock(opts: Options, local: dict[str, str], args: list[str]) -> int:
    holder = _one_id(opts, args, "unlock")
    _apply(_store(opts, _group(opts, local)), lambda sem: sem.unlock(holder), "Error unlocking")
    return 0


def cmd_set_max(opts: Options, local: dict[str, str], args: list[str]) -> int:
    if not args:
        raise CommandFailed("New maximum value must be set.")
    if len(args) > 1:
        raise UsageError(f"set-max takes one value, got {' '.join(args)}")
    try:
        new_max = int(args[0], 10)
    except ValueError:
        raise CommandFailed(f"Invalid maximum value: {args[0]}") from None
    if new_max < 0:
        raise CommandFailed(f"Invalid maximum value: {args[0]} (must be 0 or more)")
    seen: list[Semaphore] = []

    def set_max(sem: Semaphore) -> Semaphore:
        seen.append(sem)
        return sem.set_max(new_max)

    result = _apply(_store(opts, _group(opts, local)), set_max, "Error setting value")
    _out(f"Old-Max: {seen[-1].max}")
    _out(f"Max: {result.max}")
    return 0


async def _connect_system_bus(address: str) -> MessageBus:
    try:
        return await MessageBus(bus_address=address or None, bus_type=BusType.SYSTEM).connect()
    except Exception as exc:
        raise CommandFailed(f"error connecting to system dbus: {exc}") from None


async def _send_need_reboot(address: str) -> None:
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
    if args:
        raise UsageError(f"send-need-reboot takes no arguments, got {' '.join(args)}")
    asyncio.run(_send_need_reboot(opts.get("bus-address")))
    return 0


async def _reboot(opts: Options, holder: str) -> None:
    from coreos_common.dbus import DBusCallError
    from locksmithd.login1 import request_reboot

    store = _store(opts, opts.get("group"))
    try:
        bus = await _connect_system_bus(opts.get("bus-address"))
        try:
            try:
                result = await asyncio.to_thread(store.apply, lambda sem: sem.lock(holder))
            except (SemaphoreError, LockBackendError) as exc:
                raise CommandFailed(f"Error locking: {exc}") from None
            took_lock = result.written
            try:
                await request_reboot(bus)
            except (DBusCallError, OSError, EOFError) as exc:
                problem = f"Error rebooting: {exc}"
                if took_lock:
                    try:
                        await asyncio.to_thread(store.apply, lambda sem: sem.unlock_if_held(holder))
                        problem += f" (released the lock of {holder} again)"
                    except (SemaphoreError, LockBackendError) as unlock_exc:
                        problem += f"; and releasing the lock failed: {unlock_exc}"
                raise CommandFailed(problem) from None
        finally:
            bus.disconnect()
    finally:
        store.close()


def cmd_reboot(opts: Options, local: dict[str, str], args: list[str]) -> int:
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


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        given, rest = parse_flags(args, GLOBAL_FLAGS, interspersed=False)
        if "version" in given and given["version"] == "true":
            _out(f"{PROGRAM} version {__version__}")
            return 0
        opts = resolve_globals(given, os.environ)
    except UsageError as exc:
        _err(str(exc))
        _err(usage_text())
        return 2

    logs.setup(PROGRAM, verbose=opts.flag("debug"))
    if not opts.flag("debug"):
        # A command's result is its output; the library's INFO decisions belong to the daemon's journal.
        logging.getLogger().setLevel(logging.WARNING)

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
    except UsageError as exc:
        _err(f"{PROGRAM} {name}: {exc}")
        _err(command_help(command))
        return 2
    except CommandFailed as exc:
        _err(str(exc))
        return 1


if __name__ == "__main__":
    sys.exit(main())
