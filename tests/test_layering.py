"""The layering rule of DESIGN.md: jrs imports nothing above it, and never torch."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imported_roots(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for n in names:
                found.setdefault(n.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def test_core_never_imports_upper_layers_or_torch() -> None:
    roots = _imported_roots("jrs")
    for forbidden in ("torch", "training", "model_export", "service", "fastapi"):
        offenders = roots.get(forbidden, set())
        assert not offenders, f"jrs imports {forbidden} in {sorted(offenders)}"


def test_nothing_imports_the_command() -> None:
    for package in ("jrs", "training", "model_export", "service"):
        offenders = _imported_roots(package).get("jrs_cli", set())
        assert not offenders, f"{package} imports the jrs command in {sorted(offenders)}"


def test_importing_the_core_does_not_load_torch() -> None:
    code = (
        "import sys, importlib, pkgutil, jrs\n"
        "for m in pkgutil.walk_packages(jrs.__path__, 'jrs.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = [m for m in ('torch', 'training', 'service') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
