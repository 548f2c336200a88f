"""The package's import graph: acyclic, and each layer imports only the layers below it.

Layers, bottom to top: base helpers (errors, formatting, the training loss, op counting), ``runtime`` (what a
converted model executes), ``analysis`` (tracing, discovery, rules, audit), ``passes`` (surgery,
conversion, checkpointing, planning), ``memory``, the package facade, the command line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "revconvert"

BASE = {"revconvert.errors", "revconvert._format", "revconvert._loss", "revconvert._ops"}
LAYERS = ("base", "runtime", "analysis", "passes", "memory", "facade", "cli")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer(module: str) -> str:
    if module in BASE:
        return "base"
    if module == "revconvert":
        return "facade"
    if module in ("revconvert.cli", "revconvert.__main__") or module.startswith("revconvert._cli"):
        return "cli"
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ("runtime", "analysis", "passes", "memory"):
        return parts[1]
    raise AssertionError(f"{module} belongs to no layer; add it to a layer's folder or to BASE")


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom, known: set[str]) -> list[str]:
    """The package modules an ``ImportFrom`` names (``from .x import y`` may import module ``.x.y``)."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    found = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
    if target in known and len(found) < len(node.names):
        found.append(target)
    return found


def _imports(modules: dict[str, Path]) -> list[tuple[str, str, int, bool, str]]:
    """(importer, imported, line, inside a function, source line) for every import between package modules."""
    known = set(modules)
    edges = []
    for module, path in modules.items():
        source = path.read_text()
        lines = source.splitlines()
        tree = ast.parse(source)
        in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name in known]
            elif isinstance(node, ast.ImportFrom):
                targets = _resolve(module, path.name == "__init__.py", node, known)
            else:
                continue
            for target in targets:
                if target != module:
                    edges.append((module, target, node.lineno, id(node) in in_function, lines[node.lineno - 1]))
    return edges


def test_the_import_graph_is_acyclic():
    graph = nx.DiGraph()
    graph.add_edges_from((a, b) for a, b, *_ in _imports(_modules()))
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, f"import cycles: {cycles[:5]}"


def test_each_layer_imports_only_layers_below_it():
    upward = [(a, b, line) for a, b, line, *_ in _imports(_modules())
              if LAYERS.index(_layer(b)) > LAYERS.index(_layer(a))]
    assert not upward, f"imports from a higher layer (importer, imported, line): {upward}"


def test_runtime_imports_nothing_above_it():
    runtime = [(a, b) for a, b, *_ in _imports(_modules()) if _layer(a) == "runtime"]
    assert runtime, "the runtime's own imports were not found; the check reads nothing"
    assert all(_layer(b) in ("base", "runtime") for _, b in runtime), runtime


def test_imports_inside_functions_are_only_the_documented_lazy_ones():
    hidden = [(a, b, line) for a, b, line, inside, text in _imports(_modules())
              if inside and "lazy" not in text]
    assert not hidden, ("imports between package modules inside functions, without a '# lazy: why' "
                        f"comment: {hidden}")


@pytest.mark.parametrize("module", sorted(_modules()))
def test_every_module_has_a_layer(module):
    assert _layer(module) in LAYERS
