"""The package's structure: folders as layers that import only downwards, no two folders tied
both ways, no import cycles, no stage importing another stage, every stage in the registry and
one module, and short functions.

The graph is read from the source with ``ast`` (nothing is imported), counting every ``import``
and ``from ... import`` wherever it sits: at module level, inside functions (lazy imports) and
under ``if TYPE_CHECKING``. A lazy import inside a function still ties two modules together;
hiding a cycle that way is what this test is meant to catch.
"""

from __future__ import annotations

import ast
from pathlib import Path

from instanas import stage_specs
from instanas.stages import registry

PACKAGE = "instanas"
ROOT = Path(__file__).resolve().parents[1] / "src" / PACKAGE
# The stage modules are the registry's; every other module under stages/ is a helper that any
# stage may use (the loop, resume, common run-directory I/O, ...).
STAGE_MODULES = {module.__name__ for module in registry.MODULES.values()}

# The layers, bottom to top (docs/design.md, "Code layout"). A unit is a folder under
# src/instanas/ or a top-level module; "instanas" is the package's facade (__init__.py). A unit
# may import only units of lower layers (and itself); the units of one layer do not import each
# other. A new folder or top-level module must be placed here before the tests pass.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "version", "distributed", "space"),  # import nothing of the package
    ("utils", "provenance", "runtime"),  # runtime: the torch-free deployed model (errors only)
    ("checkpoint",),  # weights and their metadata on disk
    ("nn",),  # building blocks: candidate modules, row gathers, BatchNorm helpers
    ("models",),  # networks: meta-graph, controller, the deployed predictor
    ("latency",),  # what the networks cost: the table, end-to-end timing, FLOPs
    ("data",),
    ("config",),
    ("stage_specs",),  # the stages as data: what a run directory holds
    ("budgets", "report"),  # report reads run files only, never the models
    ("run_context",),
    ("training",),
    ("search",),  # the algorithm: reward, policies, controller steps
    ("evaluation",),
    ("deploy",),
    ("stages",),
    ("pipeline",),
    ("cli", "kernel_check"),  # the command-line tools
    ("__main__", "instanas"),
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def _resolve_from(node: ast.ImportFrom, name: str, is_package: bool) -> str | None:
    """The absolute module a ``from X import ...`` names, or None when it is outside the package."""
    if node.level == 0:
        return node.module
    base = name.split(".") if is_package else name.split(".")[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules that module ``name`` imports."""
    found: set[str] = set()
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = _resolve_from(node, name, path.name == "__init__.py")
            if module is None:
                continue
            # `from . import space` imports the submodule; `from . import __version__` the package.
            targets = [
                f"{module}.{alias.name}" if f"{module}.{alias.name}" in known else module
                for alias in node.names
            ]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = modules()
    known = set(paths)
    return {name: imports_of(name, path, known) for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None. Depth-first search with colours."""
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_graph_reader_sees_relative_and_lazy_imports(tmp_path):
    graph = import_graph()
    assert f"{PACKAGE}.stages.common" in graph[f"{PACKAGE}.stages.pretrain"]  # from .common
    assert f"{PACKAGE}.models.metagraph" in graph[f"{PACKAGE}.stages.pretrain"]  # from ..models
    assert f"{PACKAGE}.cli" in graph[f"{PACKAGE}.__main__"]
    source = tmp_path / "module.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from ..models import metagraph\n"
        "def f():\n    from ..report.document import write_report\n"
    )
    known = {f"{PACKAGE}.models.metagraph", f"{PACKAGE}.report.document"}
    assert imports_of(f"{PACKAGE}.stages.module", source, known) == known


def unit(module: str) -> str:
    """The layer unit of a module: its folder, its top-level module name, or the facade."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else PACKAGE


def layer_of() -> dict[str, int]:
    return {name: i for i, names in enumerate(LAYERS) for name in names}


def test_every_module_belongs_to_one_layer():
    placed = [name for names in LAYERS for name in names]
    assert len(placed) == len(set(placed)), "a unit is listed in two layers"
    missing = sorted({unit(m) for m in modules()} - set(placed))
    assert not missing, f"place these in LAYERS (tests/test_structure.py): {missing}"
    gone = sorted(set(placed) - {unit(m) for m in modules()})
    assert not gone, f"LAYERS lists units that no longer exist: {gone}"


def test_imports_only_go_down_the_layers():
    """Lazy imports and TYPE_CHECKING imports count: each still ties two layers together."""
    layer = layer_of()
    upward = sorted(
        f"{name} imports {other} ({unit(name)} is layer {layer[unit(name)]}, "
        f"{unit(other)} is layer {layer[unit(other)]})"
        for name, targets in import_graph().items()
        for other in targets
        if unit(other) != unit(name) and layer[unit(other)] >= layer[unit(name)]
    )
    assert not upward, "imports that do not go down the layers: " + "; ".join(upward)


def folder_ties(graph: dict[str, set[str]]) -> list[str]:
    """Pairs of units that import each other (in any of their modules)."""
    edges = {(unit(a), unit(b)) for a, targets in graph.items() for b in targets}
    return sorted(f"{a} <-> {b}" for a, b in edges if a < b and (b, a) in edges)


def test_folder_ties_are_found():
    graph = {"instanas.a.x": {"instanas.b.y"}, "instanas.b.z": {"instanas.a.w"}}
    assert folder_ties(graph) == ["a <-> b"]
    assert folder_ties({"instanas.a.x": {"instanas.b.y", "instanas.a.w"}}) == []


def test_no_two_folders_import_each_other():
    ties = folder_ties(import_graph())
    assert not ties, "folders tied both ways: " + "; ".join(ties)


def test_cycle_finder():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_stage_imports_another_stage():
    stages = STAGE_MODULES
    graph = import_graph()
    offending = sorted(
        f"{name} imports {other}" for name in stages for other in graph[name] if other in stages
    )
    assert not offending, (
        "stages share code through the helper modules under stages/ "
        "(common, loop, resume, policy_tuning, standalone) or modules "
        "outside stages/, not through each other: " + "; ".join(offending)
    )


def test_every_declared_stage_has_a_module_in_the_registry():
    assert tuple(registry.MODULES) == stage_specs.names()


def test_every_registered_stage_is_one_module_with_a_run_function():
    stage_files = {name for name in modules() if name.startswith(f"{PACKAGE}.stages.")}
    for module in STAGE_MODULES:
        assert module in stage_files, f"{module} is registered but has no file"
        tree = ast.parse(modules()[module].read_text())
        assert any(isinstance(n, ast.FunctionDef) and n.name == "run" for n in tree.body), module
    # A helper module must not look like a stage the registry forgot.
    for name in stage_files - STAGE_MODULES:
        tree = ast.parse(modules()[name].read_text())
        assert not any(isinstance(n, ast.FunctionDef) and n.name == "run" for n in tree.body), (
            f"{name} defines run() but is not in stages/registry.py"
        )


def test_no_function_in_the_package_is_longer_than_40_lines():
    """Short functions: a longer one is a sign that it does two things."""
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 40:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, "; ".join(long)
