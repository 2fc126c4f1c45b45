"""The house rules of the product's code (docs/architecture.md): no import circle, files of at
most 800 lines and functions of at most 150, checked on the installed packages' source."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UNITS = ("service", "training", "model_export")
MAX_FILE_LINES = 800
MAX_FUNCTION_LINES = 150


def _modules() -> dict[str, Path]:
    files = [
        p for p in (ROOT / "jrs").rglob("*.py") if p.relative_to(ROOT / "jrs").parts[0] not in UNITS
    ]
    for unit in UNITS:
        files += (ROOT / unit).rglob("*.py")
    out = {}
    for p in files:
        rel = p.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[0] in UNITS:
            parts = ["jrs", *parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the product modules it imports (at the top or inside functions)."""

    def resolve(name: str) -> str | None:
        parts = name.split(".")
        for k in range(len(parts), 0, -1):
            if ".".join(parts[:k]) in mods:
                return ".".join(parts[:k])
        return None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = [f"{node.module}.{a.name}" for a in node.names]
                names = [s for s in subs if s in mods]
                if len(names) < len(subs):
                    names.append(node.module)
            for n in names:
                target = resolve(n)
                if target is not None and target != m:
                    graph[m].add(target)
    return graph


def test_no_import_circle() -> None:
    graph = _graph(_modules())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_files_stay_under_800_lines() -> None:
    mods = _modules()
    assert len(mods) > 100
    for path in mods.values():
        lines = len(path.read_text().splitlines())
        assert lines <= MAX_FILE_LINES, f"{path.relative_to(ROOT)}: {lines} lines (over 800)"


def test_functions_stay_under_150_lines() -> None:
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                assert lines <= MAX_FUNCTION_LINES, f"{name}.{node.name}: {lines} lines (over 150)"
