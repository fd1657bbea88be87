"""qrelay's modules import each other without cycles, at run time too.

The graph has an edge for every `import` of a qrelay module, at module level
or inside a function (a lazy import is still a run-time dependency); imports
under `if TYPE_CHECKING:` are for the type checker only and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import qrelay

ROOT = Path(qrelay.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(tree: ast.AST, package: str, modules: set[str]) -> set[str]:
    """qrelay modules a module imports when it runs. `from pkg import mod` is an edge to
    `pkg.mod` only (the package's `__init__` is merely its parent, run first anyway);
    `from pkg import name` of anything else is an edge to `pkg`."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = [p for p in ROOT.rglob("*.py") if "_proto" not in p.parts]
    modules = {module_name(p): p for p in paths}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        wanted = runtime_imports(ast.parse(path.read_text()), package, set(modules))
        graph[name] = {m for m in wanted if m in modules and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_qrelay_has_no_import_cycles_at_run_time() -> None:
    graph = import_graph()
    # qrelay.client and qrelay.executor load their public names lazily (module __getattr__,
    # so the CLI starts without Qiskit); qrelay.broker.store imports its base eagerly.
    assert "qrelay.broker.store.base" in graph["qrelay.broker.store"], (
        "the graph sees package imports"
    )
    assert cycles(graph) == []


def test_the_program_author_api_does_not_import_the_executor() -> None:
    graph = import_graph()
    assert not {m for m in graph["qrelay.program"] if m.startswith("qrelay.executor")}
    assert not {m for m in graph["qrelay._program_primitives"] if m.startswith("qrelay.executor")}
