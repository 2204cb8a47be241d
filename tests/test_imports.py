"""The package's import graph: no two modules of a2n import each other, directly or through others."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "a2n"


def imports_of(path: Path) -> set[str]:
    """The a2n modules a file imports anywhere (top level or inside functions), by module name."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "a2n":
                found |= {f"a2n.{alias.name}" for alias in node.names}
            elif node.module.startswith("a2n."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("a2n.")}
    return found


def test_import_graph_is_acyclic() -> None:
    modules = {f"a2n.{p.stem}": p for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}
    graph = {name: sorted(imports_of(path) & modules.keys() - {name}) for name, path in modules.items()}
    assert "a2n.backends" in graph["a2n.inference"] and "a2n.tiling" in graph["a2n.backends"]
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
