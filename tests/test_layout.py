"""The shape of core/: imports in one direction, between modules and between its subpackages,
counting those inside functions, and no module too long to read in one sitting."""

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "core"
MAX_LINES = 400
# core's subpackages from the bottom up: each imports only those below it (and core's top-level
# modules: errors, flags, device, progress), so the tree reads as the architecture.
LAYERS = ["runs", "data", "models", "report", "train", "cli"]


def module_name(path):
    parts = path.relative_to(CORE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(path):
    return module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]


def core_imports(source, package):
    """The core modules that ``source``, a module of ``package``, imports anywhere in its body,
    functions included."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "core"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            if base.split(".")[0] == "core":
                # ``from . import plots`` names a module; ``from .data import Split`` names a member
                found |= {f"{base}.{alias.name}" for alias in node.names} | {base}
    return found


def import_graph():
    modules = {module_name(p): p for p in CORE.rglob("*.py")}
    return {name: {m for m in core_imports(path.read_text(), package_of(path)) if m in modules and m != name}
            for name, path in modules.items()}


def test_the_import_walker_sees_imports_inside_functions():
    source = "def f():\n    from .plots import plot_curves\n    from . import data\n    from ..loader import x\n"
    assert {"core.models.plots", "core.models.data", "core.loader"} <= core_imports(source, "core.models")
    assert "core.train.recipes" in import_graph()["core.cli.parsers"]


def test_core_has_no_import_cycle():
    graph = import_graph()
    state = {}

    def visit(node, path):
        if state.get(node) == "open":
            cycle = path[path.index(node):] + [node]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if state.get(node) == "done":
            return
        state[node] = "open"
        for nxt in sorted(graph[node]):
            visit(nxt, path + [node])
        state[node] = "done"

    for node in sorted(graph):
        visit(node, [])


def test_each_subpackage_imports_only_those_below_it():
    level = {name: i for i, name in enumerate(LAYERS)}
    upward = []
    for module, imported in import_graph().items():
        here = module.split(".")[1] if module.count(".") else None
        for target in imported:
            there = target.split(".")[1] if target.count(".") else None
            if there in level and (here not in level or level[there] > level[here]):
                upward.append(f"{module} -> {target}")
    assert not upward, upward


@pytest.mark.parametrize("path", sorted(CORE.rglob("*.py")), ids=lambda p: str(p.relative_to(CORE)))
def test_no_core_module_is_over_the_limit(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES
