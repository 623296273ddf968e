"""locksmithd's command line and the strategy chosen for each setting."""

from __future__ import annotations

import dataclasses

import pytest

from locksmithd import __version__
from locksmithd.config import STRING_FLAGS, DaemonSettings, Strategy, resolve_settings
from locksmithd.daemon import build_parser, build_strategy, flags_from_args, main
from locksmithd.strategies import SystemClock


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"locksmithd version {__version__}\n"


def test_every_setting_has_a_flag() -> None:
    args = build_parser().parse_args(
        [
            "--etcd-cafile",
            "/ca",
            "--endpoint",
            "http://a:1",
            "--endpoint",
            "http://b:2",
            "--accept-any-sender",
        ]
    )
    flags = flags_from_args(args)
    assert set(flags) == set(STRING_FLAGS)
    assert flags["etcd-cafile"] == "/ca"
    assert flags["endpoint"] == "http://b:2"  # a repeated flag replaces the earlier value
    assert flags["accept-any-sender"] == "true"
    assert flags["group"] is None


def test_unknown_flag_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--no-such-flag"])
    assert info.value.code == 2


@pytest.mark.parametrize(
    ("strategy", "name", "keeps_running"),
    [
        (Strategy.REBOOT, "reboot", True),
        (Strategy.OFF, "off", False),
        (Strategy.ETCD_LOCK, "etcd-lock", True),
        (Strategy.BEST_EFFORT, "best-effort", True),
    ],
)
def test_build_strategy(strategy: Strategy, name: str, keeps_running: bool) -> None:
    settings = dataclasses.replace(DaemonSettings(), strategy=strategy, machine_id="a" * 32)
    built = build_strategy(settings, SystemClock())
    assert (built.name, built.keeps_running) == (name, keeps_running)


def test_build_fleet_lock_strategy() -> None:
    settings = resolve_settings(
        {"strategy": "fleet-lock", "fleetlock-url": "http://127.0.0.1:1/x"}, {}, {}, machine_id="a" * 32
    )
    assert build_strategy(settings, SystemClock()).name == "fleet-lock"


