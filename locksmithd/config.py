"""locksmithd's settings: one table of flags, from which the command line, the environment and update.conf
lookups and the checks are all made.

Each ``Flag`` is one setting: ``--name`` on the command line, ``LOCKSMITHD_NAME`` and its historical names
(``REBOOT_STRATEGY``, ``REBOOT_WINDOW_START``…) in the environment and in update.conf, a parser that turns the
text into a value (or a SettingsError naming where the text came from), the default as text (parsed by the same
parser, so it is spelled once) and the help line. ``DaemonSettings`` has one field per flag, of the same name.

For each setting the first source with a non-empty value decides: the command line, then the process
environment, then update.conf (the same files and parser as update-engine, ``/etc/{coreos,flatcar}/update.conf``
before ``/usr/share/…``), then the default. Within one source the ``LOCKSMITHD_`` name comes before the
historical one. Empty values count as not set, as they did when update.conf was read through systemd's
EnvironmentFile=. Paths whose default is an absolute path (hook directories, the metrics socket) are taken
under ``--config-root`` when defaulted, as a given path is used as given.

Unlike the original, which accepted any strategy and parsed the reboot window only after an update was
installed (and then crash-looped), everything is checked here, before the daemon does anything, and each error
names the input that is wrong. The strategies (``locksmithd.strategies``) own the list of valid strategy names
and the checks of the settings each of them uses.
"""

from __future__ import annotations

import argparse
import dataclasses
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, timedelta, tzinfo
from pathlib import Path
from typing import Any

from coreos_common.backoff import BackoffPolicy
from coreos_common.boolean import parse_bool
from coreos_common.goduration import DurationError, format_go_duration, parse_go_duration
from coreos_common.identity import IdentityError, read_machine_id
from coreos_common.updateconf import SettingsFileError, load_update_conf
from coreos_common.window import WindowError, WindowList, parse_reboot_window, parse_window_list, zone_named
from locksmithd import strategies
from locksmithd.backends.etcd_settings import EtcdSettings, parse_endpoints
from locksmithd.reboot_path import PathSettings, PreRebootFailure

ENV_PREFIX = "LOCKSMITHD_"
DEFAULT_SOURCE = "default"


class SettingsError(ValueError):
    """A setting is missing, malformed or unusable; the message names the setting and where it came from."""


def env_name(flag: str) -> str:
    """``etcd-cafile`` → ``LOCKSMITHD_ETCD_CAFILE``."""
    return ENV_PREFIX + flag.upper().replace("-", "_")


# -- parsers: (text, where it came from) -> value ------------------------------------------------------------

Parser = Callable[[str, str], Any]


def _text(value: str, source: str) -> str:
    return value.strip()


def _raw(value: str, source: str) -> str:
    """Kept exactly as given (passwords, bus addresses)."""
    return value


def _optional(value: str, source: str) -> str | None:
    return value.strip() or None


def _path(value: str, source: str) -> Path:
    return Path(value.strip())


def _path_or_none(value: str, source: str) -> Path | None:
    """A path, or ``none`` for "do not"."""
    text = value.strip()
    return None if text.lower() == "none" else Path(text)


def _boolean(value: str, source: str) -> bool:
    try:
        return parse_bool(value.strip())
    except ValueError:
        raise SettingsError(f"{source}: {value!r} is not a boolean (use true or false)") from None


def _duration(*, allow_zero: bool) -> Parser:
    def parse(value: str, source: str) -> timedelta:
        try:
            parsed = parse_go_duration(value.strip())
        except DurationError as exc:
            raise SettingsError(f"{source}: {exc}") from None
        if parsed < timedelta(0):
            raise SettingsError(f"{source}: {value!r} must not be negative")
        if parsed == timedelta(0) and not allow_zero:
            raise SettingsError(f"{source}: {value!r} must be longer than 0s")
        return parsed

    return parse


def _positive_count(value: str, source: str) -> int:
    text = value.strip()
    if not text.isascii() or not text.isdigit() or int(text) < 1:
        raise SettingsError(f"{source}: {value!r} is not a whole number of 1 or more")
    return int(text)


def _pre_reboot_failure(value: str, source: str) -> PreRebootFailure:
    try:
        return PreRebootFailure(value.strip())
    except ValueError:
        valid = ", ".join(choice.value for choice in PreRebootFailure)
        raise SettingsError(f"{source}: {value!r} is not one of {valid}") from None


def _strategy(value: str, source: str) -> str:
    label = value.strip()
    if label not in strategies.STRATEGIES:
        valid = ", ".join(strategies.STRATEGIES)
        raise SettingsError(f"{source}: unknown reboot strategy {value!r}; valid: {valid}")
    return label


def _endpoints(value: str, source: str) -> tuple[str, ...]:
    endpoints = parse_endpoints(value)
    if not endpoints:
        raise SettingsError(f"{source}: no etcd endpoint in {value!r}")
    return endpoints


def _fleetlock_url(value: str, source: str) -> str:
    """Check the FleetLock base URL and make it end with ``/`` so ``v1/pre-reboot`` is joined below it."""
    url = value.strip()
    try:
        parts = urllib.parse.urlsplit(url)
        _ = parts.port  # raises ValueError for a malformed port
    except ValueError as exc:
        raise SettingsError(f"{source}: FleetLock URL {url!r} is malformed: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise SettingsError(f"{source}: FleetLock URL {url!r} must start with http:// or https://")
    if not parts.hostname:
        raise SettingsError(f"{source}: FleetLock URL {url!r} has no host")
    if parts.query or parts.fragment:
        raise SettingsError(f"{source}: FleetLock URL {url!r} must not have a query or fragment")
    return url if url.endswith("/") else url + "/"


# -- the table -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flag:
    """One setting. ``default`` is text for ``parse`` (None: not set); ``boolean`` flags are switches on the
    command line (``--flag`` alone means true); ``in_update_conf`` is False for settings of the process itself
    (where its files and bus are), which update.conf cannot move; ``under_root`` re-roots a defaulted path
    under ``--config-root``."""

    name: str
    help: str
    parse: Parser = _text
    default: str | None = None
    legacy: tuple[str, ...] = ()
    boolean: bool = False
    in_update_conf: bool = True
    under_root: bool = False

    @property
    def field(self) -> str:
        """The DaemonSettings field (and argparse destination) of this flag."""
        return self.name.replace("-", "_")

    @property
    def env_names(self) -> tuple[str, ...]:
        """Names looked up in the environment and update.conf, first wins."""
        return (env_name(self.name), *self.legacy)


def _strategy_help() -> str:
    labels = [f"{label} (default)" if label == strategies.DEFAULT else label for label in strategies.STRATEGIES]
    return f"reboot strategy: {', '.join(labels)}"


FLAGS: tuple[Flag, ...] = (
    Flag("strategy", _strategy_help(), _strategy, strategies.DEFAULT, legacy=("REBOOT_STRATEGY",)),
    Flag("endpoint", "etcd endpoints, comma-separated", _endpoints, "http://127.0.0.1:2379,http://127.0.0.1:4001"),
    Flag("etcd-cafile", "CA certificate to verify etcd's TLS certificate", _optional),
    Flag("etcd-certfile", "client certificate for etcd", _optional),
    Flag("etcd-keyfile", "client key for etcd", _optional),
    Flag("etcd-username", "etcd user name", _optional),
    Flag("etcd-password", "etcd password", _optional),
    Flag("group", "etcd lock group (default: the cluster-wide semaphore)", _text, ""),
    Flag(
        "etcd-v2-compat",
        "also hold locksmith's etcd v2 semaphore (taken first, released last), while some nodes of the fleet "
        "still run locksmith",
        _boolean, "false", boolean=True,
    ),
    Flag("reboot-window-start", "reboot window start, 'H:MM' or 'Ddd H:MM'", _optional,
         legacy=("REBOOT_WINDOW_START",)),
    Flag("reboot-window-length", "reboot window length, e.g. 1h30m", _optional, legacy=("REBOOT_WINDOW_LENGTH",)),
    Flag("reboot-windows", "several reboot windows, e.g. 'Mon,Wed 04:00 1h; Sat 22:00 3h' (not with "
         "--reboot-window-start/-length)", _optional, legacy=("REBOOT_WINDOWS",)),
    Flag("reboot-window-timezone", "IANA time zone of the reboot windows, e.g. Europe/Berlin (default: the local "
         "zone)", _optional, legacy=("REBOOT_WINDOW_TIMEZONE",)),
    Flag("fleetlock-url", "FleetLock server base URL (fleet-lock strategy)", _fleetlock_url),
    Flag("fleetlock-group", "FleetLock group", _text, "default"),
    Flag(
        "accept-any-sender",
        "accept StatusUpdate signals from any sender (as locksmithctl send-need-reboot sends), not only from "
        "update-engine",
        _boolean, "false", boolean=True,
    ),
    Flag("backoff-initial", "first retry delay", _duration(allow_zero=False), "10s"),
    Flag("backoff-max", "longest retry delay (when not given and the first delay is longer: the first delay)",
         _duration(allow_zero=False), "5m"),
    Flag("session-grace", "delay before rebooting when users are logged in", _duration(allow_zero=True), "5m"),
    Flag("reboot-retry-interval", "ask logind again if still running this long after a reboot",
         _duration(allow_zero=False), "1h"),
    Flag("reboot-attempts", "logind refusals in a row before the lock is given back (taken again once logind "
         "can reboot)", _positive_count, "5"),
    Flag("pre-reboot-hooks", "directory of executables run before the reboot, lock held (drain the node)", _path,
         "/etc/locksmithd/pre-reboot.d", under_root=True),
    Flag("post-reboot-hooks", "directory of executables run once the node is back and steady, before the lock is "
         "released (uncordon, health checks)", _path, "/etc/locksmithd/post-reboot.d", under_root=True),
    Flag("hook-timeout", "time limit of each hook", _duration(allow_zero=False), "10m"),
    Flag("pre-reboot-failure", "what a failing pre-reboot hook does to the lock: release-lock (after the "
         "post-reboot hooks passed) or keep-lock", _pre_reboot_failure, "release-lock"),
    Flag("metrics-socket", "Unix socket serving Prometheus metrics (mode 0660, group metrics), or none",
         _path_or_none, "/run/locksmithd/metrics.promsock", under_root=True),
    Flag("metrics-textfile", "also write the metrics to this file (for node_exporter's textfile collector; "
         "ends in .prom)", _path_or_none),
    Flag("config-root", "root directory for update.conf, machine-id, utmp and /run", _path, "/",
         in_update_conf=False),
    Flag("bus-address", "D-Bus address of the system bus (default: the system bus)", _raw, in_update_conf=False),
)
FLAGS_BY_NAME: Mapping[str, Flag] = {flag.name: flag for flag in FLAGS}


@dataclass(frozen=True)
class DaemonSettings:
    """One field per flag (same name, ``-`` → ``_``), then what is derived from them at start-up."""

    strategy: str = strategies.DEFAULT
    endpoint: tuple[str, ...] = ("http://127.0.0.1:2379", "http://127.0.0.1:4001")
    etcd_cafile: str | None = None
    etcd_certfile: str | None = None
    etcd_keyfile: str | None = None
    etcd_username: str | None = None
    etcd_password: str | None = None
    group: str = ""
    etcd_v2_compat: bool = False
    reboot_window_start: str | None = None
    reboot_window_length: str | None = None
    reboot_windows: str | None = None
    reboot_window_timezone: str | None = None
    fleetlock_url: str | None = None
    fleetlock_group: str = "default"
    accept_any_sender: bool = False
    backoff_initial: timedelta = timedelta(seconds=10)
    backoff_max: timedelta = timedelta(minutes=5)
    session_grace: timedelta = timedelta(minutes=5)
    reboot_retry_interval: timedelta = timedelta(hours=1)
    reboot_attempts: int = 5
    pre_reboot_hooks: Path = Path("/etc/locksmithd/pre-reboot.d")
    post_reboot_hooks: Path = Path("/etc/locksmithd/post-reboot.d")
    hook_timeout: timedelta = timedelta(minutes=10)
    pre_reboot_failure: PreRebootFailure = PreRebootFailure.RELEASE_LOCK
    metrics_socket: Path | None = Path("/run/locksmithd/metrics.promsock")
    metrics_textfile: Path | None = None
    config_root: Path = Path("/")
    bus_address: str | None = None
    # Derived: the reboot windows (None: reboot at any time), and the machine id read under the config root.
    windows: WindowList | None = None
    machine_id: str = ""
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def etcd(self) -> EtcdSettings:
        return EtcdSettings(
            endpoints=self.endpoint,
            ca_file=self.etcd_cafile,
            cert_file=self.etcd_certfile,
            key_file=self.etcd_keyfile,
            username=self.etcd_username,
            password=self.etcd_password,
            group=self.group,
            v2_compat=self.etcd_v2_compat,
        )

    @property
    def backoff(self) -> BackoffPolicy:
        """The one retry policy: ``backoff-initial`` doubling up to ``backoff-max``."""
        return BackoffPolicy(self.backoff_initial.total_seconds(), self.backoff_max.total_seconds())

    @property
    def path(self) -> PathSettings:
        """What the reboot path's machine needs."""
        return PathSettings(
            windows=self.windows,
            windows_description=self.describe_windows(),
            backoff=self.backoff,
            session_grace=self.session_grace,
            reboot_retry_interval=self.reboot_retry_interval,
            reboot_attempts=self.reboot_attempts,
            pre_reboot_failure=self.pre_reboot_failure,
        )

    def describe_windows(self) -> str:
        """The windows as the operator wrote them, for log lines (locksmith's line for its pair)."""
        if self.windows is None:
            return "No configured reboot window"
        zone = f" (time zone {self.windows.zone})"
        if self.reboot_window_start:
            pair = f'Reboot window start is "{self.reboot_window_start}" and length is "{self.reboot_window_length}"'
            return pair + (zone if self.reboot_window_timezone else "")
        return f'Reboot windows are "{self.windows.text}"{zone}'

    def source(self, name: str) -> str:
        """Where the flag ``name`` was set (``--name``, ``NAME (environment)``…), or ``default``."""
        return self.sources.get(name, DEFAULT_SOURCE)


# -- lookup and checks ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SettingValue:
    """A raw value and where it came from, for error messages."""

    value: str
    source: str


def lookup(
    flag: Flag, given: Mapping[str, str | None], environ: Mapping[str, str], conf: Mapping[str, str],
    conf_name: str = "update.conf",
) -> SettingValue | None:
    """The first non-empty value of ``flag``: command line, environment, update.conf."""
    value = given.get(flag.name)
    if value is not None:
        return SettingValue(value, f"--{flag.name}")
    sources = [("environment", environ)]
    if flag.in_update_conf:
        sources.append((conf_name, conf))
    for where, values in sources:
        for name in flag.env_names:
            found = values.get(name)
            if found:
                return SettingValue(found, f"{name} ({where})")
    return None


def _windows(settings: DaemonSettings, local_zone: tzinfo) -> WindowList | None:
    """The reboot windows from either spelling, in their time zone; a SettingsError names the failing part."""
    pair = ("reboot-window-start", "reboot-window-length")
    given = [name for name in pair if settings.source(name) != DEFAULT_SOURCE]
    if settings.reboot_windows and given:
        raise SettingsError(
            f"{settings.source('reboot-windows')} and {' and '.join(settings.source(n) for n in given)} both set "
            "reboot windows: give either the list of windows or the start and length of one window, not both"
        )
    zone = local_zone
    if settings.reboot_window_timezone:
        try:
            zone = zone_named(settings.reboot_window_timezone)
        except WindowError as exc:
            raise SettingsError(f"{settings.source('reboot-window-timezone')}: {exc}") from None
    if settings.reboot_windows:
        try:
            return parse_window_list(settings.reboot_windows, zone)
        except WindowError as exc:
            raise SettingsError(f"invalid reboot windows ({settings.source('reboot-windows')}): {exc}") from None
    try:
        entry = parse_reboot_window(settings.reboot_window_start, settings.reboot_window_length)
    except WindowError as exc:
        raise SettingsError(f"invalid reboot window ({', '.join(settings.source(n) for n in given)}): {exc}") from None
    return None if entry is None else WindowList((entry,), zone, entry.text)


def _check(settings: DaemonSettings, local_zone: tzinfo) -> DaemonSettings:
    """What no single flag can check: pairs of settings, the strategy's own needs."""
    if settings.backoff_max < settings.backoff_initial:
        if settings.source("backoff-max") == DEFAULT_SOURCE:
            settings = dataclasses.replace(settings, backoff_max=settings.backoff_initial)
        else:
            raise SettingsError(
                f"the maximum retry delay ({settings.source('backoff-max')}: "
                f"{format_go_duration(settings.backoff_max)}) is shorter than the first one "
                f"({format_go_duration(settings.backoff_initial)})"
            )
    try:
        strategies.STRATEGIES[settings.strategy].check(settings)
    except strategies.StrategySettingsError as exc:
        raise SettingsError(str(exc)) from None
    return dataclasses.replace(settings, windows=_windows(settings, local_zone))


def resolve_settings(
    flags: Mapping[str, str | None],
    environ: Mapping[str, str],
    conf: Mapping[str, str],
    *,
    conf_name: str = "update.conf",
    machine_id: str = "",
    local_zone: tzinfo = UTC,
) -> DaemonSettings:
    """Build and check the settings from already-read inputs (pure: reads no file).

    ``flags`` maps flag names (``etcd-cafile``) to the command-line value, or None (or no key) when not given;
    ``local_zone`` is the zone of reboot windows when ``--reboot-window-timezone`` is not set.
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    root_found = lookup(FLAGS_BY_NAME["config-root"], flags, environ, conf, conf_name)
    root = Path(root_found.value) if root_found else Path("/")
    for flag in FLAGS:
        found = lookup(flag, flags, environ, conf, conf_name)
        if found is None:
            value = None if flag.default is None else flag.parse(flag.default, f"the default of --{flag.name}")
            if flag.under_root and isinstance(value, Path):
                value = root / value.relative_to("/")
        else:
            value = flag.parse(found.value, found.source)
            sources[flag.name] = found.source
        values[flag.field] = value
    settings = DaemonSettings(**values, machine_id=machine_id, sources=sources)
    return _check(settings, local_zone)


def load_settings(
    flags: Mapping[str, str | None], environ: Mapping[str, str], local_zone: tzinfo = UTC
) -> DaemonSettings:
    """Read update.conf and the machine id under the config root; check the files the strategy uses."""
    root_value = lookup(FLAGS_BY_NAME["config-root"], flags, environ, {})
    root = Path(root_value.value) if root_value else Path("/")
    try:
        conf = load_update_conf(root)
    except SettingsFileError as exc:
        raise SettingsError(
            f"Cannot read the settings: {exc}. Not starting: acting on the defaults could undo what the file "
            "says (REBOOT_STRATEGY=off); fix or remove the file"
        ) from None
    settings = resolve_settings(flags, environ, conf.values, conf_name="update.conf", local_zone=local_zone)
    spec = strategies.STRATEGIES[settings.strategy]
    if not spec.runs:
        return settings
    try:
        machine_id = read_machine_id(root)
    except IdentityError as exc:
        raise SettingsError(f"Cannot read machine-id: {exc.message}") from None
    try:
        spec.check_files(settings)
    except strategies.StrategySettingsError as exc:
        raise SettingsError(str(exc)) from None
    return dataclasses.replace(settings, machine_id=machine_id)


# -- the command line ----------------------------------------------------------------------------------------


def _help(flag: Flag) -> str:
    parts = [flag.help]
    if flag.default and flag.name != "strategy":
        parts.append(f"(default {flag.default})")
    parts.append("(env " + ", ".join(flag.env_names) + ")")
    return " ".join(parts).replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="locksmithd",
        description="Reboot the node after update-engine installed an update, as the reboot strategy allows. "
        "Every flag can also be set as LOCKSMITHD_<FLAG> (e.g. LOCKSMITHD_ETCD_CAFILE), in the environment or in "
        "update.conf.",
    )
    for flag in FLAGS:
        if flag.boolean:
            parser.add_argument(
                f"--{flag.name}", dest=flag.field, action="store_const", const="true", default=None, help=_help(flag)
            )
        else:
            parser.add_argument(f"--{flag.name}", dest=flag.field, default=None, metavar="VALUE", help=_help(flag))
    parser.add_argument("--debug", action="store_true", help="log debug messages")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    return parser


def flags_from_args(args: argparse.Namespace) -> dict[str, str | None]:
    """The command line's values by flag name, None for flags not given."""
    return {flag.name: getattr(args, flag.field) for flag in FLAGS}
