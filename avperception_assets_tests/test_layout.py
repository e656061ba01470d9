"""The package's layout: stages as subpackages that import only the stages below them (the table
`ALLOWED`), no import cycle between modules (imports inside functions count too), and a code
location that loads without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import avperception_assets

PACKAGE = Path(avperception_assets.__file__).parent
NAME = "avperception_assets"


def _module_name(path: Path) -> str:
    parts = [NAME, *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _resolve(current: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = current.split(".")
    base = base if is_package else base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """Module → the package modules it imports anywhere in its body."""
    modules = _modules()
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node)
                # `from pkg import mod` imports the module when it is one, else a name of pkg.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, …, a], or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == "open":
                return stack[stack.index(child):] + [child]
            if child not in state and (cycle := visit(child)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


# Which units each unit may import: a unit is a subpackage, or a module at the top of the package.
# Lower rows never import higher ones; `defs` (the Dagster layer) and the entry points may import
# anything below them.
STAGES = ("patches", "workspace", "cluster", "storage", "formats", "tracking", "ingest", "model", "evaluation", "discovery",
          "failure_modes", "curation", "slices", "deployment")
ALLOWED: dict[str, set[str]] = {
    "patches": set(),
    "workspace": set(),
    "cluster": {"patches", "workspace"},
    "storage": {"patches", "workspace", "cluster"},
    "formats": {"storage"},
    "tracking": {"formats", "storage"},
    "ingest": {"formats", "storage"},
    "model": {"formats", "storage"},
    "evaluation": {"tracking", "model", "formats", "storage"},
    "discovery": {"evaluation", "model", "tracking", "formats", "storage", "cluster"},
    "failure_modes": {"discovery", "formats", "storage"},
    "curation": {"failure_modes", "discovery", "model", "formats", "storage", "cluster", "patches"},
    "slices": {"failure_modes", "discovery", "model", "formats", "storage", "cluster", "patches"},
    "deployment": {"evaluation", "model", "formats", "storage"},
    "synthetic": {"ingest", "formats", "workspace"},
    "defs": set(STAGES),
    "definitions": {"defs", "patches", "workspace"},
    # Command-line entry points kept under their historical names: each wraps one stage, after the
    # patches its processes need; those that need the data location read the workspace for it.
    "search": {"discovery", "patches", "workspace"},
    "exports": {"slices", "storage", "patches", "workspace"},
    "onnx_export": {"deployment", "patches"},
    "summary": {"evaluation", "storage", "workspace"},
    "training_worker": {"model", "patches"},
    "geneva_workarounds": {"patches"},
    "ray_head": {"cluster", "workspace"},
    "clean": {"storage", "workspace"},
}


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def forbidden_imports(graph: dict[str, set[str]], allowed: dict[str, set[str]] = ALLOWED) -> list[str]:
    """Every import from one unit into another that the table does not allow, as "a -> b"."""
    bad = []
    for module, targets in graph.items():
        unit = unit_of(module)
        for target in targets:
            other = unit_of(target)
            if other not in (unit, "") and other not in allowed.get(unit, set()):
                bad.append(f"{module} -> {target}")
    return sorted(bad)


def test_every_unit_of_the_package_is_in_the_dependency_table():
    units = {unit_of(m) for m in import_graph()} - {""}
    assert units == set(ALLOWED), f"add to ALLOWED: {sorted(units - set(ALLOWED))}; gone: {sorted(set(ALLOWED) - units)}"


def test_subpackages_import_only_what_the_table_allows():
    assert forbidden_imports(import_graph()) == []


def test_the_table_check_catches_a_planted_import_inside_a_function():
    graph = import_graph()
    planted = {**graph, f"{NAME}.model.detector": graph[f"{NAME}.model.detector"] | {f"{NAME}.discovery.search"}}
    assert forbidden_imports(planted) == [f"{NAME}.model.detector -> {NAME}.discovery.search"]


def test_no_import_cycle_between_modules():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_the_cycle_finder_sees_imports_inside_functions():
    graph = import_graph()
    assert f"{NAME}.model.detector" in graph[f"{NAME}.curation.columns"]  # imported inside a function body only
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_production_code_never_imports_the_synthetic_generator():
    importers = {m for m, targets in import_graph().items() if f"{NAME}.synthetic" in targets}
    assert importers == set()


@pytest.mark.fresh_interpreter
def test_the_code_location_loads_without_torch():
    probe = "import sys, avperception_assets.definitions; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=300)
    assert result.stdout.strip() == "False"
