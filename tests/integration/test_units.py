"""The systemd units, tmpfiles entry and sample update.conf in ``units/``, checked with systemd's own tools.

``systemd-analyze verify`` runs offline against a temporary root holding a copy of this system's unit
directory (for the targets the units refer to), the units, and stand-in executables at their ExecStart paths;
``systemd-analyze security --offline=true`` scores the sandboxing, and a weaker sandbox fails the test.
"""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from coreos_common import updateconf
from locksmithd import config as locksmithd_config
from locksmithd.coordinator import COORDINATOR_DIR
from locksmithd.state import STATE_FILE
from tests.conftest import require_tool
from update_engine import config as ue_config
from update_engine import daemon as ue_daemon

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "units"
SERVICES = ("update-engine.service", "locksmithd.service")
# Highest acceptable `systemd-analyze security` exposure per unit; the originals score 9.6.
EXPOSURE_BUDGET = {"update-engine.service": 4.5, "locksmithd.service": 2.5}
SYSTEM_UNIT_DIRS = (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))


@dataclass
class UnitFile:
    """A unit file as systemd reads it: each assignment of a key in order (DeviceAllow= and others repeat)."""

    path: Path
    sections: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> UnitFile:
        unit = cls(path)
        section: dict[str, list[str]] | None = None
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("[") and line.endswith("]"):
                section = unit.sections.setdefault(line[1:-1], {})
                continue
            assert section is not None, f"{path}: assignment outside a section: {line}"
            key, _, value = line.partition("=")
            section.setdefault(key.strip(), []).append(value.strip())
        return unit

    def values(self, section: str, key: str) -> list[str]:
        return self.sections.get(section, {}).get(key, [])

    def value(self, section: str, key: str) -> str:
        found = self.values(section, key)
        assert len(found) == 1, f"{self.path.name}: expected one {key}=, found {found}"
        return found[0]


def service(name: str) -> UnitFile:
    return UnitFile.read(UNITS / name)


def console_scripts() -> set[str]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = cfg["options.entry_points"]["console_scripts"].strip().splitlines()
    return {line.split("=", 1)[0].strip() for line in lines if line.strip()}


def system_unit_dir() -> Path:
    for candidate in SYSTEM_UNIT_DIRS:
        if (candidate / "multi-user.target").exists():
            return candidate.resolve()
    pytest.fail("no systemd unit directory with multi-user.target; install the systemd package")


@pytest.fixture
def verify_root(tmp_path: Path) -> Path:
    """A root where `systemd-analyze verify --root` finds systemd's units, ours and the programs they run."""
    root = tmp_path / "root"
    shutil.copytree(system_unit_dir(), root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for name in SERVICES:
        shutil.copy(UNITS / name, root / "etc/systemd/system" / name)
        program = shlex.split(service(name).value("Service", "ExecStart"))[0]
        stand_in = root / program.lstrip("/")
        stand_in.parent.mkdir(parents=True, exist_ok=True)
        stand_in.write_text("#!/bin/sh\nexit 0\n")
        stand_in.chmod(0o755)
    return root


def test_units_pass_systemd_analyze_verify(verify_root: Path) -> None:
    analyze = require_tool("systemd-analyze")
    result = subprocess.run(
        [analyze, "verify", f"--root={verify_root}", *SERVICES], capture_output=True, text=True, timeout=120
    )
    # verify exits 0 on unknown keys and invalid values, it only prints them: any line about our units fails.
    complaints = [
        line for line in (result.stdout + result.stderr).splitlines()
        if any(name in line for name in SERVICES)
    ]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr


def test_verify_notices_a_missing_program(verify_root: Path) -> None:
    """Guards the check above: without the program at its ExecStart path verify must fail."""
    analyze = require_tool("systemd-analyze")
    (verify_root / "usr/bin/locksmithd").unlink()
    result = subprocess.run(
        [analyze, "verify", f"--root={verify_root}", "locksmithd.service"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "/usr/bin/locksmithd" in result.stdout + result.stderr


def exposure(unit_path: Path) -> float:
    analyze = require_tool("systemd-analyze")
    result = subprocess.run(
        [analyze, "security", "--offline=true", str(unit_path)], capture_output=True, text=True, timeout=120
    )
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout + result.stderr)
    assert match, result.stdout + result.stderr
    return float(match.group(1))


@pytest.mark.parametrize("name", SERVICES)
def test_sandbox_exposure_within_budget(name: str) -> None:
    score = exposure(UNITS / name)
    assert score <= EXPOSURE_BUDGET[name], f"{name} scores {score}, budget {EXPOSURE_BUDGET[name]}"


def test_exposure_score_rises_when_sandboxing_is_removed(tmp_path: Path) -> None:
    """Guards the budget test: the parser reads a score that really reflects the unit's directives."""
    text = (UNITS / "locksmithd.service").read_text()
    stripped = "\n".join(
        line for line in text.splitlines()
        if not re.match(r"(Protect|Private|Restrict|SystemCall|Capability|NoNewPrivileges)", line)
    )
    weak = tmp_path / "locksmithd.service"
    weak.write_text(stripped + "\n")
    assert exposure(weak) > EXPOSURE_BUDGET["locksmithd.service"] + 3


@pytest.mark.parametrize("name", SERVICES)
def test_exec_start_runs_an_installed_program(name: str) -> None:
    program = shlex.split(service(name).value("Service", "ExecStart"))[0]
    assert program.startswith("/usr/bin/")
    assert Path(program).name in console_scripts()


def test_update_engine_flags_are_accepted_and_match_its_directories() -> None:
    unit = service("update-engine.service")
    argv = shlex.split(unit.value("Service", "ExecStart"))
    args = ue_daemon.build_parser().parse_args(argv[1:])
    # The reboot markers live in the RuntimeDirectory= that systemd keeps across restarts.
    assert str(args.run_dir) == "/run/" + unit.value("Service", "RuntimeDirectory")
    assert unit.value("Service", "RuntimeDirectoryPreserve") == "yes"
    assert str(args.state_dir) == "/var/lib/" + unit.value("Service", "StateDirectory")
    assert unit.value("Service", "BusName") == "com.coreos.update1"


def test_locksmithd_runtime_directories_are_the_coordinator_and_state_directories_not_update_engines() -> None:
    locksmithd = service("locksmithd.service").value("Service", "RuntimeDirectory").split()
    update_engine = service("update-engine.service").value("Service", "RuntimeDirectory")
    assert sorted("run/" + name for name in locksmithd) == sorted(
        [COORDINATOR_DIR, str(Path(STATE_FILE).parent)]
    )
    assert update_engine not in locksmithd


def test_locksmithd_environment_files_let_etc_win_as_update_engine_does() -> None:
    """systemd lets the last EnvironmentFile= win; update-engine's lookup lets the first file win."""
    files = [f.removeprefix("-") for f in service("locksmithd.service").values("Service", "EnvironmentFile")]
    assert all(f.startswith("/") for f in files)
    update_conf_first_wins = ["/" + p for p in updateconf.UPDATE_CONF_FILES if p.endswith("update.conf")]
    assert list(reversed(files)) == update_conf_first_wins
    assert files[-1].startswith("/etc/")


@pytest.mark.parametrize("name", SERVICES)
def test_both_daemons_are_notify_services_with_a_watchdog_skipped_in_containers(name: str) -> None:
    unit = service(name)
    assert unit.value("Service", "Type") == "notify"
    assert unit.value("Service", "NotifyAccess") == "main"
    assert unit.value("Service", "WatchdogSec")
    assert unit.value("Unit", "ConditionVirtualization") == "!container"
    assert unit.value("Unit", "ConditionPathExists") == "!/usr/.noupdate"
    assert unit.value("Install", "WantedBy") == "multi-user.target"


def test_update_engine_yields_the_cpu_and_the_disk_to_other_services_but_is_never_starved() -> None:
    """The apply decompresses on every CPU: below other services (weights under the default 100, Nice=, the
    lowest best-effort I/O priority), never in the idle classes, where a busy node would never finish it."""
    unit = service("update-engine.service")
    assert int(unit.value("Service", "CPUWeight")) < 100
    assert int(unit.value("Service", "IOWeight")) < 100
    assert int(unit.value("Service", "Nice")) > 0
    assert unit.value("Service", "IOSchedulingClass") == "best-effort"
    assert unit.value("Service", "IOSchedulingPriority") == "7"
    assert not unit.values("Service", "CPUSchedulingPolicy")


def test_tmpfiles_entry_creates_the_state_directory(tmp_path: Path) -> None:
    tmpfiles = require_tool("systemd-tmpfiles")
    result = subprocess.run(
        [tmpfiles, f"--root={tmp_path}", "--create", str(UNITS / "update-engine.tmpfiles")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    state = tmp_path / "var/lib/update_engine"
    assert state.is_dir()
    assert state.stat().st_mode & 0o7777 == 0o755
    assert Path("/var/lib/update_engine") == ue_daemon.build_parser().parse_args([]).state_dir


def sample_lines() -> list[str]:
    """The ``#KEY=value`` lines of the sample with the ``#`` removed."""
    text = (UNITS / "update.conf.sample").read_text()
    return re.findall(r"^#([A-Z][A-Z0-9_]*=.*)$", text, flags=re.MULTILINE)


def test_sample_update_conf_lists_every_key() -> None:
    keys = {line.split("=", 1)[0] for line in sample_lines()}
    update_engine_keys = {"SERVER", "GROUP", "DOWNLOAD_USER", "DOWNLOAD_PASSWORD", "MACHINE_ALIAS",
                          "FLATCAR_RELEASE_VERSION", "FLATCAR_RELEASE_BOARD", "FLATCAR_RELEASE_APPID"}
    assert update_engine_keys <= keys
    # Nothing reads it (no PCR policies are shipped): the sample does not promise it.
    assert "PCR_POLICY_SERVER" not in keys
    for flag in locksmithd_config.FLAGS:
        if not flag.in_update_conf:
            continue
        assert set(flag.env_names) & keys, f"update.conf.sample does not mention {sorted(flag.env_names)}"


def test_sample_update_conf_defaults_are_the_programs_defaults() -> None:
    """Uncommenting every line of the sample must change nothing: the values shown are the real defaults."""
    parsed = updateconf.parse_key_values("\n".join(sample_lines()), "update.conf.sample")
    assert parsed.issues == []
    merged = updateconf.merge_first_wins([parsed])
    assert ue_config.settings_from_config(merged) == ue_config.UpdateSettings()
    defaults = locksmithd_config.resolve_settings({}, {}, {})
    assert locksmithd_config.resolve_settings({}, {}, parsed.values) == defaults
