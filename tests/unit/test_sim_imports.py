"""The simulation harness and the demo run without pytest: importing every ``sim`` module, and the demo's entry
module, loads no pytest module (checked in a fresh interpreter, since this one has pytest loaded)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_PROBE = """
import importlib, json, pkgutil, sys
import sim
names = [m.name for m in pkgutil.walk_packages(sim.__path__, "sim.")]
for name in [*names, *sys.argv[1:]]:
    importlib.import_module(name)
loaded = sorted(m for m in sys.modules if m == "pytest" or m.startswith(("pytest.", "_pytest")))
print(json.dumps({"modules": names, "pytest": loaded}))
"""


def probe(*extra_modules: str) -> dict[str, list[str]]:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, *extra_modules], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    doc: dict[str, list[str]] = json.loads(result.stdout)
    return doc


def test_no_sim_module_imports_pytest() -> None:
    found = probe()
    assert "sim.bus" in found["modules"] and "sim.standins.login1" in found["modules"]
    assert found["pytest"] == []


def test_the_demo_imports_no_pytest() -> None:
    assert probe("demo.fleet")["pytest"] == []
