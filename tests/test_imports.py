"""The package's import graph has no cycles and keeps its layers.

A cycle, even one only type checkers follow, means two modules can only be read
together; the layers say which way knowledge flows: the engine (``core``) and the
HTTP client (``outbound``) never know about the API or the commands that drive them.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dispatcher"

#: package prefix -> packages it must never import.
FORBIDDEN = {
    "dispatcher.core": ("dispatcher.api", "dispatcher.commands"),
    "dispatcher.outbound": ("dispatcher.core", "dispatcher.api", "dispatcher.commands"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Every dispatcher module ``path`` imports, at any depth of the file (functions
    and ``TYPE_CHECKING`` blocks included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            candidates = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        found.update(c for c in candidates if c in modules)
    return found


def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    names = set(paths)
    return {name: imports_of(path, names) - {name} for name, path in paths.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component: list[str] = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_itself_back() -> None:
    assert cycles(graph()) == []


def test_the_engine_and_the_http_client_never_import_the_api_or_commands() -> None:
    wrong = [
        f"{module} imports {target}"
        for module, targets in graph().items()
        for prefix, banned in FORBIDDEN.items()
        if module == prefix or module.startswith(prefix + ".")
        for target in targets
        if target.startswith(banned)
    ]
    assert wrong == []
