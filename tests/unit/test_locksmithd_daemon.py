"""locksmithd's command line, its flag table, and the strategy built for each setting."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from locksmithd import __version__
from locksmithd.clock import SystemClock
from locksmithd.config import FLAGS, DaemonSettings, build_parser, flags_from_args, resolve_settings
from locksmithd.daemon import build_strategy, main
from locksmithd.strategies import STRATEGIES


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
    assert set(flags) == {flag.name for flag in FLAGS}
    assert flags["etcd-cafile"] == "/ca"
    assert flags["endpoint"] == "http://b:2"  # a repeated flag replaces the earlier value
    assert flags["accept-any-sender"] == "true"
    assert flags["group"] is None


def test_the_flag_table_and_the_settings_agree() -> None:
    """One field per flag, and each flag's default text parses to the field's default."""
    fields = {f.name: f for f in dataclasses.fields(DaemonSettings)}
    defaults = DaemonSettings()
    resolved = resolve_settings({}, {}, {})
    for flag in FLAGS:
        assert flag.field in fields, flag.name
        assert getattr(resolved, flag.field) == getattr(defaults, flag.field), flag.name


def test_help_lists_every_strategy_and_every_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "best-effort (default), etcd-lock, reboot, off, fleet-lock" in text
    assert "REBOOT_STRATEGY" in text and "LOCKSMITHD_REBOOT_WINDOW_START, REBOOT_WINDOW_START" in text


def test_unknown_flag_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--no-such-flag"])
    assert info.value.code == 2


@pytest.mark.parametrize("label", sorted(STRATEGIES))
def test_every_strategy_in_the_table_builds_under_its_own_label(label: str) -> None:
    flags = {"strategy": label, "fleetlock-url": "http://127.0.0.1:1/x"}
    settings = resolve_settings(flags, {}, {}, machine_id="a" * 32)
    built = build_strategy(settings, SystemClock())
    if label == "off":
        assert built is None
    else:
        assert built is not None and built.label == label


@pytest.mark.parametrize("flag", ["--version", "--help"])
def test_a_closed_stdout_is_no_traceback(flag: str) -> None:
    """``locksmithd --version | head -0``: the reader is gone before anything is written."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "locksmithd.daemon", flag], stdout=write_end, stderr=subprocess.PIPE,
            timeout=60, check=False,
        )
    finally:
        os.close(write_end)
    assert result.stderr == b""
    assert result.returncode in (0, 141)
