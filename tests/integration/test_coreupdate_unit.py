"""``units/coreupdate.service`` checked with systemd's own tools, like the node units in test_units.py."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

from coreupdate import cli
from tests.conftest import require_tool
from tests.integration.test_units import UNITS, console_scripts, exposure, service, system_unit_dir

NAME = "coreupdate.service"
EXPOSURE_BUDGET = 1.5


def test_sandbox_exposure_within_budget() -> None:
    score = exposure(UNITS / NAME)
    assert score <= EXPOSURE_BUDGET, f"{NAME} scores {score}, budget {EXPOSURE_BUDGET}"


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(system_unit_dir(), root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNITS / NAME, root / "etc/systemd/system" / NAME)
    stand_in = root / "usr/bin/coreupdate"
    stand_in.parent.mkdir(parents=True, exist_ok=True)
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    result = subprocess.run([require_tool("systemd-analyze"), "verify", f"--root={root}", NAME],
                            capture_output=True, text=True, timeout=120)
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if NAME in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr


def test_exec_start_is_the_serve_command_on_its_state_directory() -> None:
    unit = service(NAME)
    argv = shlex.split(unit.value("Service", "ExecStart").replace("$COREUPDATE_OPTS", ""))
    assert argv[0] == "/usr/bin/coreupdate" and "coreupdate" in console_scripts()
    args = cli._parser().parse_args(argv[1:])
    assert args.command == "serve"
    assert args.data_dir == "/var/lib/" + unit.value("Service", "StateDirectory")
    assert unit.value("Service", "User") == "coreupdate"
    assert unit.value("Service", "Type") == "notify" and unit.value("Service", "WatchdogSec")
    assert unit.value("Service", "CapabilityBoundingSet") == ""
