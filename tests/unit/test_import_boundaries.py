"""Import boundaries between the packages, checked on the source: every import statement of every module,
including the ones inside functions and ``if TYPE_CHECKING:`` blocks, and ``importlib.import_module("…")`` with a
literal name, found by walking each module's AST (nothing is imported to check it).

The rules (README's module map and DESIGN §3):
* ``coreos_common`` is shared by everything and imports none of ``update_engine``, ``locksmithd``, ``coreupdate``.
* The daemons never import each other, nor the server.
* update-engine's engine (every module of ``update_engine.engine`` and everything it imports, transitively) never
  imports its D-Bus adapter ``update_engine.dbus_service``: the adapter drives the engine, not the other way round.
* ``coreupdate`` imports, of the daemons, only update-engine's codecs: Omaha (``update_engine.omaha`` with the
  error codes its events carry, ``update_engine.errors``) and the payload format and verification
  (``update_engine.payload.format``, ``update_engine.payload.files`` and the ``VerifiedPayload`` it returns,
  ``update_engine.payload.verify``), and those never pull in a daemon shell.
* No product package imports the development harness (``sim``, ``tests``, ``demo``, ``bench``): the Debian
  package does not ship it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("coreos_common", "update_engine", "locksmithd", "coreupdate")
HARNESS = ("sim", "tests", "demo", "bench")

# What coreupdate may import of the daemons, and what those modules may never bring along with them.
SERVER_MAY_IMPORT = frozenset(
    {"update_engine", "update_engine.omaha", "update_engine.errors", "update_engine.payload",
     "update_engine.payload.format", "update_engine.payload.files", "update_engine.payload.verify"}
)  # fmt: skip
ENGINE = "update_engine.engine"
DAEMON_SHELLS = frozenset(
    {"update_engine.engine", "update_engine.service", "update_engine.daemon", "update_engine.dbus_service",
     "update_engine.client", "update_engine.devserver", "update_engine.http", "update_engine.partitions",
     "update_engine.gpt", "update_engine.prefs", "update_engine.scheduler", "update_engine.payload_state",
     "update_engine.payload.cli", "update_engine.payload.generate"}
)  # fmt: skip


@dataclass(frozen=True)
class Import:
    """``importer`` imports ``module`` at ``line`` (a name that may or may not be one of ours)."""

    importer: str
    module: str
    line: int

    def __str__(self) -> str:
        return f"{self.importer}:{self.line} imports {self.module}"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules_under(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            found[module_name(path, root)] = path
    return found


def _absolute(importer: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute module a ``from .x import y`` names, relative to ``importer``."""
    if level == 0:
        return name or ""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, name] if name else base)


def imports_of(name: str, path: Path, known: set[str]) -> Iterator[Import]:
    """Every module ``name`` imports: ``import a.b``, ``from a import b`` (``a.b`` when that is a module), and
    ``importlib.import_module("a.b")`` with a literal."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(name, alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(name, is_package, node.level, node.module)
            yield Import(name, source, node.lineno)
            for alias in node.names:
                candidate = f"{source}.{alias.name}"
                if candidate in known:
                    yield Import(name, candidate, node.lineno)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield Import(name, node.args[0].value, node.lineno)


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


@dataclass
class ImportGraph:
    modules: dict[str, Path]
    edges: dict[str, list[Import]]

    @classmethod
    def of(cls, root: Path, packages: Iterable[str] = PACKAGES) -> ImportGraph:
        modules = modules_under(root, packages)
        known = set(modules)
        edges = {name: list(imports_of(name, path, known)) for name, path in modules.items()}
        return cls(modules, edges)

    def closure(self, start: str) -> dict[str, Import | None]:
        """Every project module reachable from ``start``, each with the import that first reached it."""
        reached: dict[str, Import | None] = {start: None}
        pending = [start]
        while pending:
            current = pending.pop()
            for edge in self.edges.get(current, []):
                # Importing a.b.c runs a/__init__ and a/b/__init__ first.
                parts = edge.module.split(".")
                for end in range(1, len(parts) + 1):
                    target = ".".join(parts[:end])
                    if target in self.modules and target not in reached:
                        reached[target] = edge
                        pending.append(target)
        return reached

    def path_to(self, start: str, goal: str) -> str:
        reached = self.closure(start)
        chain = [goal]
        while (edge := reached[chain[-1]]) is not None:
            chain.append(edge.importer)
        return " -> ".join(reversed(chain))


def violations(graph: ImportGraph) -> list[str]:
    """Every broken rule, one line each, naming the importing module and line."""
    problems: list[str] = []
    for importer, edges in sorted(graph.edges.items()):
        for edge in edges:
            target = edge.module
            if any(in_package(target, harness) for harness in HARNESS):
                problems.append(f"{edge}: the product imports nothing of the development harness")
            elif in_package(importer, "coreos_common"):
                if any(in_package(target, p) for p in ("update_engine", "locksmithd", "coreupdate")):
                    problems.append(f"{edge}: coreos_common imports no daemon and not the server")
            elif in_package(importer, "update_engine"):
                if any(in_package(target, p) for p in ("locksmithd", "coreupdate")):
                    problems.append(f"{edge}: update_engine imports neither locksmithd nor the server")
            elif in_package(importer, "locksmithd"):
                if any(in_package(target, p) for p in ("update_engine", "coreupdate")):
                    problems.append(f"{edge}: locksmithd imports neither update_engine nor the server")
            elif in_package(importer, "coreupdate"):
                if in_package(target, "locksmithd"):
                    problems.append(f"{edge}: the server imports nothing of locksmithd")
                elif in_package(target, "update_engine") and target not in SERVER_MAY_IMPORT:
                    problems.append(f"{edge}: the server imports only update_engine's Omaha and payload codecs")
    for start in sorted(m for m in graph.modules if in_package(m, ENGINE)):
        if "update_engine.dbus_service" in graph.closure(start):
            chain = graph.path_to(start, "update_engine.dbus_service")
            problems.append(f"the engine reaches its D-Bus adapter: {chain}")
    for allowed in sorted(SERVER_MAY_IMPORT & set(graph.modules)):
        reached = graph.closure(allowed)
        for shell in sorted(m for m in reached if any(in_package(m, s) for s in DAEMON_SHELLS)):
            problems.append(f"{allowed}, which the server may import, reaches {shell}: {graph.path_to(allowed, shell)}")
    return problems


def test_the_tree_keeps_its_import_boundaries() -> None:
    graph = ImportGraph.of(ROOT)
    assert {m.split(".")[0] for m in graph.modules} == set(PACKAGES)
    assert violations(graph) == []


# -- the checker itself, on a small made-up tree -------------------------------------------------------------


def make_tree(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for package in PACKAGES:
        (root / package).mkdir(exist_ok=True)
        (root / package / "__init__.py").touch()
    return root


CLEAN = {
    "update_engine/engine/__init__.py": "",
    "update_engine/engine/attempter.py": "from update_engine import errors\n",
    "update_engine/errors.py": "",
    "update_engine/omaha.py": "from update_engine.errors import x\n",
    "update_engine/dbus_service.py": "from update_engine.engine.attempter import A\n",
    "coreupdate/api.py": "from update_engine import omaha\nimport coreos_common.logs\n",
    "coreos_common/logs.py": "",
}


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            {"coreos_common/logs.py": "def f():\n    from update_engine import errors\n"},
            "coreos_common.logs:2 imports update_engine.errors: coreos_common imports no daemon",
        ),
        (
            {"locksmithd/ctl.py": "import typing\nif typing.TYPE_CHECKING:\n    import update_engine.omaha\n"},
            "locksmithd.ctl:3 imports update_engine.omaha: locksmithd imports neither update_engine",
        ),
        (
            {"update_engine/client.py": "from locksmithd import ctl\n", "locksmithd/ctl.py": ""},
            "update_engine.client:1 imports locksmithd: update_engine imports neither locksmithd",
        ),
        (
            {"update_engine/errors.py": "def f():\n    from . import dbus_service\n"},
            "the engine reaches its D-Bus adapter: update_engine.engine.attempter -> update_engine.errors -> "
            "update_engine.dbus_service",
        ),
        (
            {"update_engine/devserver.py": "def f():\n    from sim.omaha import OmahaStub\n"},
            "update_engine.devserver:2 imports sim.omaha: the product imports nothing of the development harness",
        ),
        (
            {"coreupdate/api.py": "from update_engine.gpt import GptDisk\n", "update_engine/gpt.py": ""},
            "coreupdate.api:1 imports update_engine.gpt: the server imports only",
        ),
        (
            {
                "update_engine/omaha.py": "import importlib\nimportlib.import_module('update_engine.http')\n",
                "update_engine/http.py": "",
            },
            "update_engine.omaha, which the server may import, reaches update_engine.http",
        ),
    ],
)
def test_each_rule_catches_its_violation(tmp_path: Path, extra: dict[str, str], expected: str) -> None:
    assert violations(ImportGraph.of(make_tree(tmp_path / "clean", CLEAN))) == []
    found = violations(ImportGraph.of(make_tree(tmp_path / "broken", {**CLEAN, **extra})))
    assert any(line.startswith(expected) for line in found), found
