"""The package's import graph: no cycles, the math layer without the run store, torch-free leaves.

Edges are read from the source with ``ast`` (module-level and function-level imports alike), so a
cycle hidden behind a lazy import is caught too. The layering checks import in a fresh interpreter
and look at ``sys.modules``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "precompute"
MATH_LAYER = ("task", "curvature", "solvers", "training", "streaming", "scoring", "influence", "distributed")
TORCH_FREE = ("errors", "contract", "memmaps", "metrics", "runstore")


def import_graph() -> dict[str, set[str]]:
    """{module: the precompute modules it imports}, for every module of the package."""
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    graph = {}
    for name in modules:
        edges = set()
        for node in ast.walk(ast.parse((PACKAGE / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 and node.module:                       # from .x import y
                    edges.add(node.module.split(".")[0])
                elif node.level == 1:                                     # from . import x
                    edges.update(a.name for a in node.names)
                elif node.module and node.module.startswith("precompute."):
                    edges.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                edges.update(a.name.split(".")[1] for a in node.names if a.name.startswith("precompute."))
        graph[name] = (edges & modules) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}          # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_import_graph_has_no_cycle():
    graph = import_graph()
    assert {"influence", "curvature", "distributed", "runstore"} <= graph.keys()
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def loaded_after_import(modules: tuple[str, ...]) -> set[str]:
    code = (f"import sys\nfor m in {list(modules)!r}: __import__('precompute.' + m)\n"
            "print(' '.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True,
                         check=True).stdout
    return set(out.split())


def test_math_layer_does_not_import_the_run_store():
    loaded = loaded_after_import(MATH_LAYER)
    assert "precompute.influence" in loaded
    assert "precompute.runstore" not in loaded and "pandas" not in loaded


def test_contract_modules_are_torch_free():
    loaded = loaded_after_import(TORCH_FREE)
    assert {"precompute.contract", "precompute.metrics"} <= loaded
    assert "torch" not in loaded
