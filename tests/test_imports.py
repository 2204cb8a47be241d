"""The package's import graph: no two modules of a2n (subpackages' modules included) import each other,
directly or through others."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "a2n"


def module_files() -> dict[str, Path]:
    """Every module of the package by dotted name; a subpackage's __init__ is the subpackage itself."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts in (("__init__",), ("__main__",)):
            continue
        name = ".".join(("a2n",) + (parts[:-1] if parts[-1] == "__init__" else parts))
        found[name] = path
    return found


def imports_of(path: Path, modules: set[str] = frozenset()) -> set[str]:
    """The a2n modules a file imports anywhere (top level or inside functions), by module name;
    `from a2n.x import y` counts as a2n.x.y when that is a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and (node.module == "a2n" or node.module.startswith("a2n.")):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules or node.module == "a2n" else node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("a2n.")}
    return found


def test_import_graph_is_acyclic() -> None:
    modules = module_files()
    graph = {name: sorted(imports_of(path, set(modules)) & modules.keys() - {name}) for name, path in modules.items()}
    assert "a2n.backends" in graph["a2n.inference"] and "a2n.tiling" in graph["a2n.backends.auto"]
    assert "a2n.backends.auto" in graph["a2n.backends.express"] and "a2n.backends.express" not in graph["a2n.backends"]
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in graph[node]:
            assert state.get(nxt) != "open", "import cycle: " + " -> ".join(trail + [node, nxt])
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
