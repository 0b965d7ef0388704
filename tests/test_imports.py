"""The package's import graph: no cycles, floors only downward, the math layer without the run store,
torch-free leaves.

Edges are read from the source with ``ast``: module-level and function-level imports alike, and the
dynamic ones (``importlib.import_module`` / ``__import__`` with a literal, an f-string or a sum of
them, or a lookup in a module-level dict of module names such as ``precompute/__init__.py``'s
``_EXPORTS``), so a cycle hidden behind a lazy import is caught too. A subpackage (``data/``) is one
node. The layering checks import in a fresh interpreter and look at ``sys.modules``.
"""

from __future__ import annotations

import ast
import itertools
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "precompute"
MATH_LAYER = ("task", "curvature", "solvers", "training", "streaming", "scoring", "influence", "distributed")
TORCH_FREE = ("errors", "contract", "memmaps", "metrics", "manifest", "run_schema", "runstore", "run_writer")
RUN_STORE = ("manifest", "run_schema", "runstore", "run_writer", "run_commit")

# Floors, lowest first: a module may import modules of its own floor or of lower floors, never of a
# higher one (cycles within a floor are caught by the cycle check). The torch-free run store sits
# below the math; the two meet in the run commit (processes), the checks and the pipeline.
FLOORS: tuple[tuple[str, ...], ...] = (
    ("errors", "contract", "memmaps", "metrics", "progress", "models", "manifest"),   # nothing of the package
    ("config", "run_schema"),                    # every knob; the run directory's schema
    ("runstore",),                               # the reader (the explorer's import)
    ("run_writer",),                             # atomic writes (replaces only what the reader opens)
    ("data", "task", "streaming", "layers", "layer_scores"),   # inputs, the task, measurements
    ("distributed", "run_commit"),               # processes; the run committed after a barrier
    ("curvature",),                              # Hessian-vector products
    ("solvers", "lowrank", "certificate", "ekfac", "solver_registry", "training"),   # solves, training
    ("scoring", "influence"),                    # the one influence path
    ("multistage",),                             # the user façade
    ("retraining", "scratch_retraining", "validation", "baselines", "cleaning", "fd_check", "guards", "agreement"),   # ground truth, checks
    ("presets", "pipeline", "cli", "__init__", "__main__"),
)


# ---- reading the edges ------------------------------------------------------------------------------

def _dicts_of_strings(tree: ast.Module) -> dict[str, list[str]]:
    """Module-level ``NAME = {...}`` literals: NAME -> the dict's string values."""
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            values = [v.value for v in node.value.values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
            found.update((t.id, values) for t in node.targets if isinstance(t, ast.Name))
    return found


def _strings(expr: ast.expr, dicts: dict[str, list[str]], package: str) -> list[str] | None:
    """Every string ``expr`` can evaluate to, where the source says (None: it does not)."""
    if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
        return [expr.value]
    if isinstance(expr, ast.Name) and expr.id in ("__name__", "__package__"):
        return [package]
    if isinstance(expr, ast.FormattedValue):
        return _strings(expr.value, dicts, package)
    if isinstance(expr, ast.JoinedStr):                                   # f"{__name__}.{_EXPORTS[name]}"
        parts = [_strings(v, dicts, package) for v in expr.values]
        return None if None in parts else ["".join(p) for p in itertools.product(*parts)]
    if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Add):     # "precompute." + name
        left, right = _strings(expr.left, dicts, package), _strings(expr.right, dicts, package)
        return None if left is None or right is None else [a + b for a in left for b in right]
    if isinstance(expr, ast.Subscript) and isinstance(expr.value, ast.Name):          # _EXPORTS[name]
        return dicts.get(expr.value.id)
    if (isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute) and expr.func.attr == "get"
            and isinstance(expr.func.value, ast.Name)):                               # _EXPORTS.get(name)
        return dicts.get(expr.func.value.id)
    return None


def imported_modules(source: str, package: str = "precompute", depth: int = 0) -> set[str]:
    """Names of the top-level modules of ``package`` that ``source`` imports, statically or
    dynamically; ``depth`` 1 for a file of a subpackage (its ``..x`` is the package's ``x``).
    Names that are not modules (``from precompute import MultiStageInfluence``) are left in: the
    caller keeps those that are modules."""
    tree = ast.parse(source)
    dicts = _dicts_of_strings(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == depth + 1 and node.module:                    # from .x import y
                found.add(node.module.split(".")[0])
            elif node.level == depth + 1 or (node.level == 0 and node.module == package):   # from . import x
                found.update(a.name for a in node.names)
            elif node.level == 0 and node.module and node.module.startswith(package + "."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith(package + "."))
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name not in ("import_module", "__import__"):
                continue
            for target in _strings(node.args[0], dicts, package) or ():
                if target.startswith(package + "."):
                    found.add(target.split(".")[1])
                elif name == "import_module" and target.startswith(".") and depth == 0:   # (".x", __package__)
                    found.add(target[1:].split(".")[0])
    return found


def import_graph() -> dict[str, set[str]]:
    """{module: the precompute modules it imports}, for every module and subpackage of the package."""
    sources = {p.stem: [(p, 0)] for p in PACKAGE.glob("*.py")}
    sources.update({d.name: [(p, 1) for p in d.rglob("*.py")] for d in PACKAGE.iterdir()
                    if (d / "__init__.py").is_file()})
    graph = {}
    for name, files in sources.items():
        edges = set().union(*(imported_modules(p.read_text(), depth=depth) for p, depth in files))
        graph[name] = (edges & sources.keys()) - {name}
    return graph


# ---- checks on a graph -------------------------------------------------------------------------------

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


def upward_edges(graph: dict[str, set[str]], floors: tuple[tuple[str, ...], ...]) -> list[str]:
    """Every edge from a module to one of a higher floor, as "a (floor i) -> b (floor j)"."""
    floor_of = {m: i for i, floor in enumerate(floors) for m in floor}
    return [f"{a} (floor {floor_of[a]}) -> {b} (floor {floor_of[b]})"
            for a in sorted(graph) for b in sorted(graph[a]) if floor_of[b] > floor_of[a]]


def test_find_cycle_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_upward_edges_are_found():
    floors = (("a",), ("b", "c"), ("d",))
    assert upward_edges({"a": set(), "b": {"a", "c"}, "c": set(), "d": {"b"}}, floors) == []
    assert upward_edges({"a": {"c"}, "b": {"d"}, "c": set(), "d": {"a"}}, floors) == \
        ["a (floor 0) -> c (floor 1)", "b (floor 1) -> d (floor 2)"]


def test_imported_modules_sees_dynamic_imports():
    source = '''
import importlib
from importlib import import_module
_EXPORTS = {"A": "task", "B": "training"}

def __getattr__(name):
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)

def lazy():
    importlib.import_module("precompute.runstore")
    import_module(".metrics", __package__)
    __import__("precompute.cli")
    importlib.import_module("precompute." + "memmaps")
    importlib.import_module(some_variable)          # unknown: no edge
    importlib.import_module("numpy")                # not the package
'''
    assert imported_modules(source) == {"task", "training", "runstore", "metrics", "cli", "memmaps"}
    assert imported_modules("from ..errors import X\nfrom .examples import Y\n", depth=1) == {"errors"}


def test_import_graph_has_no_cycle():
    graph = import_graph()
    assert {"influence", "curvature", "distributed", "runstore", "run_schema", "run_writer", "run_commit",
            "data"} <= graph.keys()
    assert {"multistage", "task", "training", "config", "errors"} <= graph["__init__"]   # via _EXPORTS
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_modules_import_only_their_floor_or_lower():
    graph = import_graph()
    placed = [m for floor in FLOORS for m in floor]
    assert len(placed) == len(set(placed)), "a module is on two floors"
    assert not (unplaced := sorted(graph.keys() - set(placed))), f"put {unplaced} on a floor in FLOORS"
    assert upward_edges(graph, FLOORS) == []


def loaded_after_import(modules: tuple[str, ...]) -> set[str]:
    code = (f"import sys\nfor m in {list(modules)!r}: __import__('precompute.' + m)\n"
            "print(' '.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True,
                         check=True).stdout
    return set(out.split())


def test_math_layer_does_not_import_the_run_store():
    loaded = loaded_after_import(MATH_LAYER)
    assert "precompute.influence" in loaded
    assert not {f"precompute.{m}" for m in RUN_STORE} & loaded and "pandas" not in loaded


def test_contract_modules_are_torch_free():
    loaded = loaded_after_import(TORCH_FREE)
    assert {"precompute.contract", "precompute.metrics", "precompute.run_writer"} <= loaded
    assert "torch" not in loaded
