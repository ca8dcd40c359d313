"""The modules of ``lcma_ext`` import one way: the import graph between them has no cycle.

Every module is parsed (``ast``), not imported; module-level and function-level imports count,
imports inside ``if TYPE_CHECKING:`` blocks do not (they never run). A package's
``__init__`` counts as the package module, and ``from lcma_ext.x import y`` where ``y`` is a
submodule of ``lcma_ext.x`` counts as an import of that submodule.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import lcma_ext

ROOT = Path(lcma_ext.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement under ``node``, skipping the bodies of ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                yield from _imports_of(other)
            continue
        yield from _imports_of(child)


def _imports_of(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
    else:
        yield from _imports(node)


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    if isinstance(node, ast.Import):
        names = {alias.name for alias in node.names}
    else:
        base = _resolve(module, node)
        names = {base} | {f"{base}.{alias.name}" for alias in node.names}
    found = set()
    for name in names:
        while name and name not in MODULES:  # ``import lcma_ext.x.y`` of a function y
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    """``module -> the lcma_ext modules it imports`` (package ``__init__`` files included)."""
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[module] = set().union(*(_targets(module, node) for node in _imports(tree)))
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first repeated at the end), or ``None``."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*stack[stack.index(target) :], target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _package_edges(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph without the edges from a package ``__init__`` to its own submodules and from a
    submodule to a package that contains it (Python runs the ``__init__`` first either way)."""
    return {
        module: {
            target
            for target in targets
            if not target.startswith(module + ".") and not module.startswith(target + ".")
        }
        for module, targets in graph.items()
    }


def test_the_graph_sees_the_modules_and_their_imports() -> None:
    graph = import_graph()
    assert len(graph) >= 40
    assert "lcma_ext.splits" in graph["lcma_ext.multiscale"]
    assert "lcma_ext.experiments.config" in graph["lcma_ext.experiments.runner"]
    # a function-level import counts: the run store builds the NMS flow through the pipeline
    assert "lcma_ext.pipeline" in graph["lcma_ext.experiments.store"]


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_type_checking_imports_are_skipped() -> None:
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import lcma_ext.cli\n"
    tree = ast.parse(source)
    assert not [node for node in _imports(tree) if "cli" in ast.dump(node)]
    tree = ast.parse("def f():\n    import lcma_ext.cli\n")
    assert _targets("lcma_ext.splits", next(_imports(tree))) == {"lcma_ext.cli"}


def test_lcma_ext_imports_one_way() -> None:
    cycle = _cycle(_package_edges(import_graph()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_config_never_imports_arms() -> None:
    graph = import_graph()
    assert "lcma_ext.experiments.arms" not in graph["lcma_ext.experiments.config"]


def test_the_report_does_not_import_a_trainer() -> None:
    """Each trainer contributes its own report section (ArmTrainer.report_lines)."""
    graph = import_graph()
    assert "lcma_ext.experiments.self_estimation" not in graph["lcma_ext.experiments.report"]
