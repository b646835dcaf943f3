"""The package's shape: no import cycle anywhere in src/slmkit (function-level imports count too), and no
module importing a ``_private`` name from another module."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "slmkit"


def modules() -> dict[str, Path]:
    found = {}
    for file in PACKAGE.rglob("*.py"):
        parts = list(file.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = file
    return found


def imports(name: str, file: Path, known: dict[str, Path]) -> tuple[set[str], list[str]]:
    """(slmkit modules ``name`` imports, the private names it imports from other modules)."""
    package = name.split(".") if file.name == "__init__.py" else name.split(".")[:-1]
    edges, private = set(), []
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            edges.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("slmkit"):
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                if submodule in known:
                    edges.add(submodule)
                    continue
                if target in known:
                    edges.add(target)
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    private.append(f"{name} imports {alias.name} from {target}")
    edges.discard(name)
    return edges, private


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
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

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_checker_sees_a_cycle_and_a_private_import(tmp_path):
    """The checks below can fail: a made-up two-module circle is found, and so is a private import."""
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    file = tmp_path / "m.py"
    file.write_text("from slmkit.train.common import _hidden\nfrom .x import y\n")
    edges, private = imports("slmkit.train.m", file, {"slmkit.train.common": file, "slmkit.train.x": file})
    assert edges == {"slmkit.train.common", "slmkit.train.x"}
    assert private == ["slmkit.train.m imports _hidden from slmkit.train.common"]


def test_no_import_cycle_and_no_private_imports():
    known = modules()
    assert len(known) > 50, "the walk found the package"
    graph, private = {}, []
    for name, file in known.items():
        graph[name], found = imports(name, file, known)
        private += found
    assert cycles(graph) == [], "import cycles in src/slmkit"
    assert private == [], "modules importing private names of other modules"
