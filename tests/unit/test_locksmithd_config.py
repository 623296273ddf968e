"""locksmithd settings: flag > environment > update.conf, defaults, and the start-up validation errors."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from coreos_common.backoff import BackoffPolicy
from locksmithd.config import FLAGS, SettingsError, env_name, load_settings, resolve_settings

MACHINE_ID = "0123456789abcdef0123456789abcdef"


def no_flags(**given: str) -> dict[str, str | None]:
    flags: dict[str, str | None] = dict.fromkeys(flag.name for flag in FLAGS)
    flags.update({name.replace("_", "-"): value for name, value in given.items()})
    return flags


def test_defaults() -> None:
    settings = resolve_settings(no_flags(), {}, {})
    assert settings.strategy == "best-effort"
    assert settings.windows is None
    assert settings.etcd.endpoints == ("http://127.0.0.1:2379", "http://127.0.0.1:4001")
    assert settings.etcd.group == ""
    assert settings.sources == {}
    assert settings.fleetlock_url is None and settings.fleetlock_group == "default"
    assert settings.accept_any_sender is False
    assert settings.backoff == BackoffPolicy(10.0, 300.0)
    assert settings.session_grace == timedelta(minutes=5)
    assert settings.config_root == Path("/")


def test_env_names() -> None:
    assert env_name("etcd-cafile") == "LOCKSMITHD_ETCD_CAFILE"
    assert env_name("reboot-window-start") == "LOCKSMITHD_REBOOT_WINDOW_START"


def test_flag_beats_environment_beats_update_conf() -> None:
    conf = {"LOCKSMITHD_GROUP": "from-conf", "LOCKSMITHD_ENDPOINT": "http://conf:2379"}
    env = {"LOCKSMITHD_GROUP": "from-env"}
    settings = resolve_settings(no_flags(), env, conf)
    assert settings.etcd.group == "from-env"
    assert settings.etcd.endpoints == ("http://conf:2379",)
    settings = resolve_settings(no_flags(group="from-flag"), env, conf)
    assert settings.etcd.group == "from-flag"


def test_empty_values_count_as_unset() -> None:
    settings = resolve_settings(
        no_flags(), {"LOCKSMITHD_GROUP": "", "REBOOT_STRATEGY": ""}, {"LOCKSMITHD_GROUP": "g"}
    )
    assert settings.etcd.group == "g"
    assert settings.strategy == "best-effort"


def test_strategy_sources() -> None:
    assert resolve_settings(no_flags(), {}, {"REBOOT_STRATEGY": "reboot"}).strategy == "reboot"
    assert resolve_settings(
        no_flags(), {"REBOOT_STRATEGY": "off"}, {"REBOOT_STRATEGY": "reboot"}
    ).strategy == "off"
    prefixed_first = {"LOCKSMITHD_STRATEGY": "etcd-lock", "REBOOT_STRATEGY": "reboot"}
    assert resolve_settings(no_flags(), prefixed_first, {}).strategy == "etcd-lock"
    assert resolve_settings(no_flags(strategy="off"), prefixed_first, {}).strategy == "off"


def test_prefixed_window_names_come_first() -> None:
    env = {
        "REBOOT_WINDOW_START": "Mon 1:00",
        "REBOOT_WINDOW_LENGTH": "1h",
        "LOCKSMITHD_REBOOT_WINDOW_START": "Thu 04:00",
        "LOCKSMITHD_REBOOT_WINDOW_LENGTH": "30m",
    }
    settings = resolve_settings(no_flags(), env, {})
    assert settings.windows is not None and settings.windows.text == "Thu 04:00 30m"
    assert settings.describe_windows() == 'Reboot window start is "Thu 04:00" and length is "30m"'


def test_window_from_update_conf() -> None:
    windows = resolve_settings(
        no_flags(), {}, {"REBOOT_WINDOW_START": "4:00", "REBOOT_WINDOW_LENGTH": "1h"}
    ).windows
    assert windows is not None and windows.windows[0].length == timedelta(hours=1)


def test_unknown_strategy_lists_valid_ones() -> None:
    with pytest.raises(SettingsError) as info:
        resolve_settings(no_flags(), {"REBOOT_STRATEGY": "sometimes"}, {})
    text = str(info.value)
    assert "REBOOT_STRATEGY (environment)" in text and "'sometimes'" in text
    for name in ("best-effort", "etcd-lock", "reboot", "off", "fleet-lock"):
        assert name in text


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"REBOOT_WINDOW_START": "14", "REBOOT_WINDOW_LENGTH": "1h"}, "'14'"),
        ({"REBOOT_WINDOW_START": "4:00", "REBOOT_WINDOW_LENGTH": "1d"}, "'1d'"),
        ({"REBOOT_WINDOW_START": "4:00"}, "Either both or neither"),
        ({"LOCKSMITHD_REBOOT_WINDOW_LENGTH": "1h"}, "LOCKSMITHD_REBOOT_WINDOW_LENGTH (environment)"),
        ({"REBOOT_WINDOW_START": "4:00", "REBOOT_WINDOW_LENGTH": "25h"}, "shorter than 24h0m0s"),
        ({"REBOOT_WINDOW_START": "4:00", "REBOOT_WINDOW_LENGTH": "0"}, "'0': must be at least 1s"),
        ({"REBOOT_WINDOW_START": "Sun 4:00", "REBOOT_WINDOW_LENGTH": "500ms"}, "'500ms': must be at least 1s"),
    ],
)
def test_window_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match="invalid reboot window") as info:
        resolve_settings(no_flags(), env, {})
    assert message in str(info.value)


def test_several_windows_in_a_time_zone() -> None:
    env = {"REBOOT_WINDOWS": "Mon,Wed 04:00 1h; Sat 22:00 3h", "REBOOT_WINDOW_TIMEZONE": "Europe/Berlin"}
    settings = resolve_settings(no_flags(), env, {})
    windows = settings.windows
    assert windows is not None and str(windows.zone) == "Europe/Berlin"
    assert [(w.days, w.hour, w.length) for w in windows.windows] == [
        (frozenset({1, 3}), 4, timedelta(hours=1)), (frozenset({6}), 22, timedelta(hours=3))
    ]
    assert settings.describe_windows() == (
        'Reboot windows are "Mon,Wed 04:00 1h; Sat 22:00 3h" (time zone Europe/Berlin)'
    )
    # Saturday 22:00 in Berlin (summer) is 20:00 UTC: the window's zone decides, whatever zone ``now`` is in.
    assert windows.contains(datetime(2026, 6, 6, 20, 0, tzinfo=UTC))
    assert not windows.contains(datetime(2026, 6, 6, 19, 59, tzinfo=UTC))
    assert not windows.contains(datetime(2026, 6, 6, 23, 0, 1, tzinfo=UTC))
    flagged = resolve_settings(no_flags(reboot_windows="Sun 1:00 1h", reboot_window_timezone="UTC"), {}, {})
    assert flagged.windows is not None and flagged.windows.text == "Sun 1:00 1h"
    prefixed = resolve_settings(no_flags(), {"LOCKSMITHD_REBOOT_WINDOWS": "3:00 1h"}, {"REBOOT_WINDOWS": "4:00 1h"})
    assert prefixed.windows is not None and prefixed.windows.text == "3:00 1h"


def test_the_windows_are_in_the_local_zone_unless_told() -> None:
    pair = {"REBOOT_WINDOW_START": "4:00", "REBOOT_WINDOW_LENGTH": "1h"}
    local = resolve_settings(no_flags(), pair, {}, local_zone=ZoneInfo("America/New_York")).windows
    assert local is not None and str(local.zone) == "America/New_York"
    told = resolve_settings(no_flags(), {**pair, "REBOOT_WINDOW_TIMEZONE": "Asia/Tokyo"}, {},
                            local_zone=ZoneInfo("America/New_York")).windows
    assert told is not None and str(told.zone) == "Asia/Tokyo"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"REBOOT_WINDOWS": "Sat 22:00 3h", "REBOOT_WINDOW_START": "Sun 4:00", "REBOOT_WINDOW_LENGTH": "1h"},
            "REBOOT_WINDOWS (environment) and REBOOT_WINDOW_START (environment) and REBOOT_WINDOW_LENGTH "
            "(environment) both set reboot windows",
        ),
        ({"REBOOT_WINDOWS": "Sat 22:00 3h", "LOCKSMITHD_REBOOT_WINDOW_LENGTH": "1h"}, "both set reboot windows"),
        ({"REBOOT_WINDOWS": "Mon 04:00 1h; Sat 25:00 3h"}, "REBOOT_WINDOWS (environment)): window 'Sat 25:00 3h'"),
        ({"REBOOT_WINDOWS": "Mon 04:00 0s"}, "window 'Mon 04:00 0s': length '0s' must be at least 1s"),
        ({"REBOOT_WINDOWS": "Mon 04:00 100ms"}, "must be at least 1s"),
        ({"REBOOT_WINDOWS": "Funday 04:00 1h"}, "unknown day 'funday'"),
        ({"REBOOT_WINDOWS": "Mon 4:00 1h", "REBOOT_WINDOW_TIMEZONE": "Mars/Olympus"},
         "REBOOT_WINDOW_TIMEZONE (environment): time zone 'Mars/Olympus' is not a known IANA time zone"),
        ({"REBOOT_WINDOWS": " ; "}, "has no windows"),
    ],
)
def test_window_list_errors_name_the_failing_part(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as info:
        resolve_settings(no_flags(), env, {})
    assert message in str(info.value)


def test_window_errors_even_for_the_reboot_strategy_at_start_up() -> None:
    with pytest.raises(SettingsError):
        resolve_settings(
            no_flags(strategy="reboot"), {"REBOOT_WINDOW_START": "25:00", "REBOOT_WINDOW_LENGTH": "1h"}, {}
        )


def test_fleetlock_url_gets_a_trailing_slash() -> None:
    settings = resolve_settings(
        no_flags(strategy="fleet-lock", fleetlock_url="http://127.0.0.1:8080/fleet"), {}, {}
    )
    assert settings.fleetlock_url == "http://127.0.0.1:8080/fleet/"
    settings = resolve_settings(
        no_flags(strategy="fleet-lock"), {"LOCKSMITHD_FLEETLOCK_URL": "https://h/"}, {}
    )
    assert settings.fleetlock_url == "https://h/"
    assert settings.fleetlock_group == "default"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"strategy": "fleet-lock"}, "needs the FleetLock server's base URL"),
        ({"strategy": "fleet-lock", "fleetlock_url": "ftp://h/"}, "must start with http:// or https://"),
        ({"strategy": "fleet-lock", "fleetlock_url": "http:///x"}, "has no host"),
        ({"strategy": "fleet-lock", "fleetlock_url": "http://h:99999/"}, "malformed"),
        (
            {"strategy": "fleet-lock", "fleetlock_url": "http://h/", "fleetlock_group": "a b"},
            "FleetLock group 'a b'",
        ),
        (
            {"strategy": "fleet-lock", "fleetlock_url": "http://h/", "fleetlock_group": "ü"},
            "--fleetlock-group",
        ),
    ],
)
def test_fleetlock_errors(flags: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        resolve_settings(no_flags(**flags), {}, {})


def test_fleetlock_group_only_checked_for_fleet_lock() -> None:
    assert resolve_settings(no_flags(fleetlock_group="a b"), {}, {}).strategy == "best-effort"


def test_etcd_settings_from_environment() -> None:
    env = {
        "LOCKSMITHD_ENDPOINT": " http://a:2379 , http://b:2379",
        "LOCKSMITHD_ETCD_CAFILE": "/ca.pem",
        "LOCKSMITHD_ETCD_CERTFILE": "/c.pem",
        "LOCKSMITHD_ETCD_KEYFILE": "/k.pem",
        "LOCKSMITHD_ETCD_USERNAME": "u",
        "LOCKSMITHD_ETCD_PASSWORD": "p",
        "LOCKSMITHD_GROUP": "prod/db",
    }
    etcd = resolve_settings(no_flags(), env, {}).etcd
    assert etcd.endpoints == ("http://a:2379", "http://b:2379")
    assert (etcd.ca_file, etcd.cert_file, etcd.key_file) == ("/ca.pem", "/c.pem", "/k.pem")
    assert (etcd.username, etcd.password, etcd.group) == ("u", "p", "prod/db")


def test_etcd_v2_compatibility_mode() -> None:
    assert resolve_settings(no_flags(), {}, {}).etcd.v2_compat is False
    assert resolve_settings(no_flags(), {"LOCKSMITHD_ETCD_V2_COMPAT": "true"}, {}).etcd.v2_compat is True
    assert resolve_settings(no_flags(), {}, {"LOCKSMITHD_ETCD_V2_COMPAT": "1"}).etcd.v2_compat is True
    assert resolve_settings(no_flags(etcd_v2_compat="true"), {}, {}).etcd.v2_compat is True
    with pytest.raises(SettingsError, match=r"LOCKSMITHD_ETCD_V2_COMPAT.*'sometimes' is not a boolean"):
        resolve_settings(no_flags(), {"LOCKSMITHD_ETCD_V2_COMPAT": "sometimes"}, {})


def test_test_knobs() -> None:
    env = {
        "LOCKSMITHD_BACKOFF_INITIAL": "200ms",
        "LOCKSMITHD_BACKOFF_MAX": "1s",
        "LOCKSMITHD_SESSION_GRACE": "0s",
        "LOCKSMITHD_ACCEPT_ANY_SENDER": "true",
    }
    settings = resolve_settings(no_flags(), env, {})
    assert settings.backoff == BackoffPolicy(0.2, 1.0)
    assert list(zip(range(4), settings.backoff.delays(), strict=False)) == [
        (0, 0.2),
        (1, 0.4),
        (2, 0.8),
        (3, 1.0),
    ]
    assert settings.session_grace == timedelta(0)
    assert settings.accept_any_sender is True
    # A short first delay alone keeps the default cap.
    assert resolve_settings(no_flags(backoff_initial="1s"), {}, {}).backoff == BackoffPolicy(1.0, 300.0)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LOCKSMITHD_BACKOFF_INITIAL": "0s"}, "longer than 0s"),
        ({"LOCKSMITHD_BACKOFF_INITIAL": "ten"}, "LOCKSMITHD_BACKOFF_INITIAL"),
        ({"LOCKSMITHD_BACKOFF_INITIAL": "10s", "LOCKSMITHD_BACKOFF_MAX": "1s"}, "shorter than the first"),
        ({"LOCKSMITHD_SESSION_GRACE": "-1s"}, "must not be negative"),
        ({"LOCKSMITHD_ACCEPT_ANY_SENDER": "maybe"}, "not a boolean"),
    ],
)
def test_knob_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        resolve_settings(no_flags(), env, {})


def _root(tmp_path: Path, machine_id: str | None = MACHINE_ID, conf: str | None = None) -> Path:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    if machine_id is not None:
        (root / "etc/machine-id").write_text(machine_id + "\n")
    if conf is not None:
        (root / "etc/flatcar").mkdir()
        (root / "etc/flatcar/update.conf").write_text(conf)
    return root


def test_load_reads_update_conf_and_machine_id(tmp_path: Path) -> None:
    root = _root(
        tmp_path,
        MACHINE_ID.upper(),
        "GROUP=stable\nREBOOT_STRATEGY=reboot\nREBOOT_WINDOW_START=4:00\nREBOOT_WINDOW_LENGTH=1h\n",
    )
    (root / "usr/share/flatcar").mkdir(parents=True)
    (root / "usr/share/flatcar/update.conf").write_text("REBOOT_STRATEGY=etcd-lock\n")
    settings = load_settings(no_flags(config_root=str(root)), {})
    assert settings.strategy == "reboot"  # /etc before /usr/share
    assert settings.windows is not None
    assert settings.machine_id == MACHINE_ID
    assert settings.config_root == root
    assert settings.etcd.group == ""  # update-engine's GROUP is not locksmithd's


def test_load_config_root_from_environment(tmp_path: Path) -> None:
    root = _root(tmp_path, conf="REBOOT_STRATEGY=reboot\n")
    settings = load_settings(no_flags(), {"LOCKSMITHD_CONFIG_ROOT": str(root)})
    assert settings.strategy == "reboot"


def test_missing_machine_id(tmp_path: Path) -> None:
    root = _root(tmp_path, machine_id=None)
    with pytest.raises(SettingsError, match="Cannot read machine-id"):
        load_settings(no_flags(config_root=str(root), strategy="reboot"), {})


def test_off_needs_no_machine_id(tmp_path: Path) -> None:
    root = _root(tmp_path, machine_id=None)
    assert load_settings(no_flags(config_root=str(root), strategy="off"), {}).strategy == "off"


def test_unreadable_tls_file_is_named(tmp_path: Path) -> None:
    root = _root(tmp_path)
    env = {"LOCKSMITHD_ETCD_CAFILE": str(tmp_path / "missing-ca.pem")}
    with pytest.raises(SettingsError, match=r"missing-ca\.pem"):
        load_settings(no_flags(config_root=str(root), strategy="etcd-lock"), env)
    # The reboot strategy does not talk to etcd, so etcd files are not its concern.
    assert load_settings(no_flags(config_root=str(root), strategy="reboot"), env).strategy == "reboot"


def test_half_a_client_certificate_is_refused(tmp_path: Path) -> None:
    root = _root(tmp_path)
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    with pytest.raises(SettingsError, match="etcd settings"):
        load_settings(no_flags(config_root=str(root), strategy="best-effort", etcd_certfile=str(cert)), {})


def test_hook_logind_and_metrics_settings() -> None:
    defaults = resolve_settings(no_flags(config_root="/node"), {}, {})
    assert defaults.pre_reboot_hooks == Path("/node/etc/locksmithd/pre-reboot.d")  # defaults under the root
    assert defaults.post_reboot_hooks == Path("/node/etc/locksmithd/post-reboot.d")
    assert defaults.metrics_socket == Path("/node/run/locksmithd/metrics.promsock")
    assert defaults.metrics_textfile is None and defaults.hook_timeout == timedelta(minutes=10)
    assert defaults.reboot_attempts == 5 and defaults.pre_reboot_failure.value == "release-lock"
    env = {
        "LOCKSMITHD_PRE_REBOOT_HOOKS": "/opt/drain.d",  # given paths are used as given
        "LOCKSMITHD_HOOK_TIMEOUT": "90s",
        "LOCKSMITHD_REBOOT_ATTEMPTS": "2",
        "LOCKSMITHD_PRE_REBOOT_FAILURE": "keep-lock",
        "LOCKSMITHD_METRICS_SOCKET": "none",
        "LOCKSMITHD_METRICS_TEXTFILE": "/var/lib/node_exporter/locksmithd.prom",
    }
    settings = resolve_settings(no_flags(config_root="/node"), env, {})
    assert settings.pre_reboot_hooks == Path("/opt/drain.d") and settings.hook_timeout == timedelta(seconds=90)
    assert settings.reboot_attempts == 2 and settings.pre_reboot_failure.value == "keep-lock"
    assert settings.metrics_socket is None
    assert settings.metrics_textfile == Path("/var/lib/node_exporter/locksmithd.prom")
    path = settings.path
    assert (path.reboot_attempts, path.pre_reboot_failure) == (2, settings.pre_reboot_failure)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LOCKSMITHD_REBOOT_ATTEMPTS": "0"}, "LOCKSMITHD_REBOOT_ATTEMPTS (environment): '0' is not a whole number"),
        ({"LOCKSMITHD_REBOOT_ATTEMPTS": "many"}, "'many' is not a whole number of 1 or more"),
        ({"LOCKSMITHD_PRE_REBOOT_FAILURE": "ignore"}, "'ignore' is not one of release-lock, keep-lock"),
        ({"LOCKSMITHD_HOOK_TIMEOUT": "0s"}, "LOCKSMITHD_HOOK_TIMEOUT (environment): '0s' must be longer than 0s"),
    ],
)
def test_hook_and_logind_setting_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as info:
        resolve_settings(no_flags(), env, {})
    assert message in str(info.value)
