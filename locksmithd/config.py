"""locksmithd's settings from flags, ``LOCKSMITHD_*`` environment and update.conf, checked at start-up.

Every flag ``--some-flag`` can also be given as ``LOCKSMITHD_SOME_FLAG``.  For each setting the first source
that has a non-empty value decides: the command line, then the process environment, then update.conf (the same
files and parser as update-engine, ``/etc/{coreos,flatcar}/update.conf`` before ``/usr/share/…``), then the
default. Within one source the ``LOCKSMITHD_`` name comes before the historical unprefixed one:
``LOCKSMITHD_STRATEGY`` before ``REBOOT_STRATEGY``, ``LOCKSMITHD_REBOOT_WINDOW_START`` before
``REBOOT_WINDOW_START`` (and ``_LENGTH``). Empty values count as not set, as they did when update.conf was
read through systemd's EnvironmentFile=.

Unlike the original, which accepted any strategy and parsed the reboot window only after an update was
installed (and then crash-looped), everything is checked here, before the daemon does anything, and each error
names the input that is wrong.  The default strategy is ``best-effort``.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from coreos_common.backoff import BackoffPolicy
from coreos_common.boolean import parse_bool
from coreos_common.goduration import DurationError, parse_go_duration
from coreos_common.identity import IdentityError, read_machine_id
from coreos_common.updateconf import SettingsFileError, load_update_conf
from coreos_common.window import RebootWindow, WindowError, parse_reboot_window
from locksmithd.backends import LockBackendError
from locksmithd.backends.etcd_settings import DEFAULT_ENDPOINTS, EtcdSettings, parse_endpoints

ENV_PREFIX = "LOCKSMITHD_"
DEFAULT_FLEETLOCK_GROUP = "default"
FLEETLOCK_GROUP_PATTERN = re.compile(r"[a-zA-Z0-9.-]+")


class Strategy(enum.Enum):
    """``REBOOT_STRATEGY`` values."""

    BEST_EFFORT = "best-effort"
    ETCD_LOCK = "etcd-lock"
    REBOOT = "reboot"
    OFF = "off"
    FLEET_LOCK = "fleet-lock"


DEFAULT_STRATEGY = Strategy.BEST_EFFORT

# Flag names (without ``--``) whose values are strings; each also reads ``LOCKSMITHD_<NAME>``.
STRING_FLAGS: tuple[str, ...] = (
    "strategy",
    "endpoint",
    "etcd-cafile",
    "etcd-certfile",
    "etcd-keyfile",
    "etcd-username",
    "etcd-password",
    "group",
    "reboot-window-start",
    "reboot-window-length",
    "fleetlock-url",
    "fleetlock-group",
    "accept-any-sender",
    "etcd-v2-compat",
    "backoff-initial",
    "backoff-max",
    "session-grace",
    "reboot-retry-interval",
    "config-root",
    "bus-address",
)
# Settings that also have a historical name without the prefix, read after the prefixed one.
LEGACY_NAMES: Mapping[str, str] = {
    "strategy": "REBOOT_STRATEGY",
    "reboot-window-start": "REBOOT_WINDOW_START",
    "reboot-window-length": "REBOOT_WINDOW_LENGTH",
}
DEFAULT_BACKOFF_INITIAL = timedelta(seconds=10)
DEFAULT_BACKOFF_MAX = timedelta(minutes=5)
DEFAULT_SESSION_GRACE = timedelta(minutes=5)
DEFAULT_REBOOT_RETRY_INTERVAL = timedelta(hours=1)


class SettingsError(ValueError):
    """A setting is missing, malformed or unusable; the message names the setting and where it came from."""


def env_name(flag: str) -> str:
    """``etcd-cafile`` → ``LOCKSMITHD_ETCD_CAFILE``."""
    return ENV_PREFIX + flag.upper().replace("-", "_")


@dataclass(frozen=True)
class SettingValue:
    """A resolved raw value and where it came from, for error messages."""

    value: str
    source: str


@dataclass(frozen=True)
class DaemonSettings:
    strategy: Strategy = DEFAULT_STRATEGY
    window: RebootWindow | None = None
    etcd: EtcdSettings = field(default_factory=EtcdSettings)
    fleetlock_url: str | None = None
    fleetlock_group: str = DEFAULT_FLEETLOCK_GROUP
    machine_id: str = ""
    config_root: Path = Path("/")
    bus_address: str | None = None
    accept_any_sender: bool = False
    backoff: BackoffPolicy = field(default_factory=BackoffPolicy)  # 10s doubling to 5m0s, the defaults below
    session_grace: timedelta = DEFAULT_SESSION_GRACE
    reboot_retry_interval: timedelta = DEFAULT_REBOOT_RETRY_INTERVAL

    @property
    def uses_etcd(self) -> bool:
        return self.strategy in (Strategy.ETCD_LOCK, Strategy.BEST_EFFORT)


class _Sources:
    """Looks settings up in flag → environment → update.conf order."""

    def __init__(
        self,
        flags: Mapping[str, str | None],
        environ: Mapping[str, str],
        conf: Mapping[str, str],
        conf_name: str,
    ) -> None:
        self.flags = flags
        self.environ = environ
        self.conf = conf
        self.conf_name = conf_name

    def get(self, flag: str) -> SettingValue | None:
        given = self.flags.get(flag)
        if given is not None:
            return SettingValue(given, f"--{flag}")
        names = [env_name(flag)]
        if flag in LEGACY_NAMES:
            names.append(LEGACY_NAMES[flag])
        for source, values in (("environment", self.environ), (self.conf_name, self.conf)):
            for name in names:
                value = values.get(name)
                if value:
                    return SettingValue(value, f"{name} ({source})")
        return None

    def text(self, flag: str, default: str = "") -> str:
        found = self.get(flag)
        return default if found is None else found.value


def _duration(sources: _Sources, flag: str, default: timedelta, *, allow_zero: bool) -> timedelta:
    found = sources.get(flag)
    if found is None:
        return default
    try:
        value = parse_go_duration(found.value.strip())
    except DurationError as exc:
        raise SettingsError(f"{found.source}: {exc}") from None
    if value < timedelta(0):
        raise SettingsError(f"{found.source}: {found.value!r} must not be negative")
    if value == timedelta(0) and not allow_zero:
        raise SettingsError(f"{found.source}: {found.value!r} must be longer than 0s")
    return value


def _boolean(sources: _Sources, flag: str) -> bool:
    found = sources.get(flag)
    if found is None:
        return False
    try:
        return parse_bool(found.value.strip())
    except ValueError:
        raise SettingsError(f"{found.source}: {found.value!r} is not a boolean (use true or false)") from None


def _strategy(sources: _Sources) -> Strategy:
    found = sources.get("strategy")
    if found is None:
        return DEFAULT_STRATEGY
    try:
        return Strategy(found.value.strip())
    except ValueError:
        valid = ", ".join(s.value for s in Strategy)
        raise SettingsError(
            f"{found.source}: unknown reboot strategy {found.value!r}; valid: {valid}"
        ) from None


def _window(sources: _Sources) -> RebootWindow | None:
    start, length = sources.get("reboot-window-start"), sources.get("reboot-window-length")
    try:
        return parse_reboot_window(start.value if start else None, length.value if length else None)
    except WindowError as exc:
        where = [s.source for s in (start, length) if s is not None]
        raise SettingsError(f"invalid reboot window ({', '.join(where)}): {exc}") from None


def normalize_fleetlock_url(found: SettingValue) -> str:
    """Check the FleetLock base URL and make it end with ``/`` so ``v1/pre-reboot`` is joined below it."""
    url = found.value.strip()
    try:
        parts = urllib.parse.urlsplit(url)
        _ = parts.port  # raises ValueError for a malformed port
    except ValueError as exc:
        raise SettingsError(f"{found.source}: FleetLock URL {url!r} is malformed: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise SettingsError(f"{found.source}: FleetLock URL {url!r} must start with http:// or https://")
    if not parts.hostname:
        raise SettingsError(f"{found.source}: FleetLock URL {url!r} has no host")
    if parts.query or parts.fragment:
        raise SettingsError(f"{found.source}: FleetLock URL {url!r} must not have a query or fragment")
    return url if url.endswith("/") else url + "/"


def resolve_settings(
    flags: Mapping[str, str | None],
    environ: Mapping[str, str],
    conf: Mapping[str, str],
    *,
    conf_name: str = "update.conf",
    machine_id: str = "",
) -> DaemonSettings:
    """Build and check the settings from already-read inputs (pure: reads no file).

    ``flags`` maps flag names (``etcd-cafile``) to the command-line value or None when not given.
    """
    sources = _Sources(flags, environ, conf, conf_name)
    strategy = _strategy(sources)
    window = _window(sources)

    endpoint = sources.get("endpoint")
    etcd = EtcdSettings(
        endpoints=parse_endpoints(endpoint.value) if endpoint else DEFAULT_ENDPOINTS,
        ca_file=sources.text("etcd-cafile") or None,
        cert_file=sources.text("etcd-certfile") or None,
        key_file=sources.text("etcd-keyfile") or None,
        username=sources.text("etcd-username") or None,
        password=sources.text("etcd-password") or None,
        group=sources.text("group"),
        v2_compat=_boolean(sources, "etcd-v2-compat"),
    )
    if endpoint is not None and not etcd.endpoints:
        raise SettingsError(f"{endpoint.source}: no etcd endpoint in {endpoint.value!r}")

    fleetlock_url: str | None = None
    url = sources.get("fleetlock-url")
    if url is not None:
        fleetlock_url = normalize_fleetlock_url(url)
    group = sources.get("fleetlock-group")
    fleetlock_group = group.value.strip() if group else DEFAULT_FLEETLOCK_GROUP
    if strategy is Strategy.FLEET_LOCK:
        if fleetlock_url is None:
            raise SettingsError(
                f"the fleet-lock strategy needs the FleetLock server's base URL: set --fleetlock-url or "
                f"{env_name('fleetlock-url')}"
            )
        if not FLEETLOCK_GROUP_PATTERN.fullmatch(fleetlock_group):
            where = group.source if group else "default"
            raise SettingsError(
                f"{where}: FleetLock group {fleetlock_group!r} is invalid: use letters, digits, '.' and '-'"
            )

    initial = _duration(sources, "backoff-initial", DEFAULT_BACKOFF_INITIAL, allow_zero=False)
    maximum = _duration(sources, "backoff-max", max(DEFAULT_BACKOFF_MAX, initial), allow_zero=False)
    if maximum < initial:
        raise SettingsError(
            f"the maximum retry delay ({maximum.total_seconds():g}s) is shorter than the first one "
            f"({initial.total_seconds():g}s)"
        )
    bus = sources.get("bus-address")
    root = sources.get("config-root")
    return DaemonSettings(
        strategy=strategy,
        window=window,
        etcd=etcd,
        fleetlock_url=fleetlock_url,
        fleetlock_group=fleetlock_group,
        machine_id=machine_id,
        config_root=Path(root.value) if root else Path("/"),
        bus_address=bus.value if bus else None,
        accept_any_sender=_boolean(sources, "accept-any-sender"),
        backoff=BackoffPolicy(initial.total_seconds(), maximum.total_seconds()),
        session_grace=_duration(sources, "session-grace", DEFAULT_SESSION_GRACE, allow_zero=True),
        reboot_retry_interval=_duration(
            sources, "reboot-retry-interval", DEFAULT_REBOOT_RETRY_INTERVAL, allow_zero=False
        ),
    )


def load_settings(flags: Mapping[str, str | None], environ: Mapping[str, str]) -> DaemonSettings:
    """Read update.conf and the machine id under the config root; check the files the strategy uses."""
    root_value = _Sources(flags, environ, {}, "").get("config-root")
    root = Path(root_value.value) if root_value else Path("/")
    try:
        conf = load_update_conf(root)
    except SettingsFileError as exc:
        raise SettingsError(
            f"Cannot read the settings: {exc}. Not starting: acting on the defaults could undo what the file "
            "says (REBOOT_STRATEGY=off); fix or remove the file"
        ) from None
    settings = resolve_settings(flags, environ, conf.values, conf_name="update.conf")
    if settings.strategy is Strategy.OFF:
        return settings
    try:
        machine_id = read_machine_id(root)
    except IdentityError as exc:
        raise SettingsError(f"Cannot read machine-id: {exc.message}") from None
    if settings.uses_etcd:
        try:
            settings.etcd.validate()
        except LockBackendError as exc:
            raise SettingsError(f"etcd settings: {exc}") from None
    return dataclasses.replace(settings, machine_id=machine_id)
