"""The package's layers import downward only, and no module imports itself back through others.

Layers, lowest first: the foundation modules (errors, config, config_versions, rundir, runtime, sealed), then data → models →
training → privacy → federated → metrics → report → workflows → the entry points (apps, cli). Every
import counts, also those inside functions: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "medsyngan"
LAYERS = ["data", "models", "training", "privacy", "federated", "metrics", "report", "workflows"]
ENTRY_POINTS = {"apps", "cli"}
FOUNDATION = {"errors", "config", "config_versions", "rundir", "runtime", "sealed"}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _owner(name: str) -> str | None:
    """The module of ours that an imported name lives in (a package's names live in its __init__)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str | None] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(_owner(alias.name) for alias in node.names if alias.name.startswith("medsyngan"))
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            source = ".".join(base + ([node.module] if node.module else []))
            if source.split(".")[0] != "medsyngan":
                continue
            # `from medsyngan.federated import protocol` imports a module; `from x import Name` imports x.
            found.update(f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else _owner(source)
                         for a in node.names)
    return {m for m in found if m is not None and m != module}


GRAPH = {module: imports_of(module) for module in MODULES}


def layer(module: str) -> int:
    """Rank of a module's layer: -1 for the foundation (and the bare package), len(LAYERS) for entry points."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in FOUNDATION:
        return -1
    if parts[1] in ENTRY_POINTS:
        return len(LAYERS)
    if parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    raise AssertionError(f"{module} belongs to no layer; add it to the list in {__name__}")


def test_every_module_belongs_to_a_layer():
    assert {m: layer(m) for m in MODULES}


def test_no_module_imports_a_higher_layer():
    upward = sorted(f"{m} imports {t}" for m, targets in GRAPH.items() for t in targets if layer(t) > layer(m))
    assert upward == []


def test_no_import_cycles():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:  # Tarjan's strongly connected components
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in GRAPH[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    assert cycles == []


@pytest.mark.parametrize(("source", "expected"), [
    ("from medsyngan.federated import protocol as p", {"medsyngan.federated.protocol"}),
    ("from medsyngan.federated.protocol import Job", {"medsyngan.federated.protocol"}),
    ("import medsyngan.workflows.federation", {"medsyngan.workflows.federation"}),
    ("from .server_state import ServerState", {"medsyngan.federated.server_state"}),
    ("def f():\n    from medsyngan.metrics import evaluate_images", {"medsyngan.metrics"}),
])
def test_the_graph_sees_every_form_of_import(tmp_path, monkeypatch, source, expected):
    probe = tmp_path / "probe.py"
    probe.write_text(source + "\n")
    monkeypatch.setitem(MODULES, "medsyngan.federated.probe", probe)
    assert imports_of("medsyngan.federated.probe") == expected
