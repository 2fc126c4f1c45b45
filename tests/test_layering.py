"""The layering rules of DESIGN.md, checked on the source and in fresh interpreters.

Imports flow one way: ``jrs.service -> core``, ``jrs.model_export -> jrs.training -> core``, the
command (``jrs.cli``) above all. The core is every package of ``jrs`` except the units
(``jrs.service``, ``jrs.training``, ``jrs.model_export``) and the command: it imports no unit, no
torch and no web framework. The service imports no torch and no training code.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNITS = {
    "service": ROOT / "service",
    "training": ROOT / "training",
    "model_export": ROOT / "model_export",
}
ABOVE_CORE = ("jrs.service", "jrs.training", "jrs.model_export", "jrs.cli")


def _core_files() -> list[Path]:
    """The core's source files: ``jrs/`` without the command and the linked unit folders."""
    files = []
    for path in (ROOT / "jrs").rglob("*.py"):
        rel = path.relative_to(ROOT / "jrs")
        if rel.parts[0] in {"cli", *UNITS}:
            continue
        files.append(path)
    return files


def _imports(files: list[Path]) -> dict[str, set[str]]:
    """Absolute module names imported by ``files`` -> the files (relative) that import them."""
    found: dict[str, set[str]] = {}
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for n in names:
                found.setdefault(n, set()).add(str(path.relative_to(ROOT)))
    return found


def _offenders(imports: dict[str, set[str]], forbidden: tuple[str, ...]) -> dict[str, set[str]]:
    return {
        name: files
        for name, files in imports.items()
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    }


def test_the_unit_links_point_at_the_root_folders() -> None:
    for name, folder in UNITS.items():
        link = ROOT / "jrs" / name
        assert link.is_symlink(), f"jrs/{name} should link to the unit folder ../{name}"
        assert link.resolve() == folder.resolve()


def test_core_never_imports_a_unit_the_command_torch_or_a_web_framework() -> None:
    core = _core_files()
    assert len(core) > 40, "the core's files were not found"
    bad = _offenders(
        _imports(core), (*ABOVE_CORE, "torch", "fastapi", "starlette", "uvicorn", "service")
    )
    assert not bad, f"the core imports upper layers: {bad}"


def test_nothing_but_the_command_imports_the_command() -> None:
    files = _core_files() + [p for f in UNITS.values() for p in f.rglob("*.py")]
    bad = _offenders(_imports(files), ("jrs.cli",))
    assert not bad, f"imports of the jrs command: {bad}"


def test_the_service_never_imports_torch_or_training() -> None:
    files = list(UNITS["service"].rglob("*.py"))
    bad = _offenders(_imports(files), ("torch", "jrs.training", "jrs.model_export"))
    assert not bad, f"the service imports torch or training: {bad}"


def test_training_never_imports_the_service() -> None:
    files = [p for u in ("training", "model_export") for p in UNITS[u].rglob("*.py")]
    bad = _offenders(_imports(files), ("jrs.service", "fastapi"))
    assert not bad, f"training or the export imports the service: {bad}"


def _fresh(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return out.stdout.strip()


def test_importing_the_whole_core_loads_no_torch_and_no_unit() -> None:
    code = (
        "import sys, importlib, pkgutil, jrs\n"
        f"skip = {ABOVE_CORE!r}\n"
        "def walk(pkg):\n"
        "    for m in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + '.'):\n"
        "        if m.name.startswith(skip):\n"
        "            continue\n"
        "        mod = importlib.import_module(m.name)\n"
        "        if m.ispkg:\n"
        "            walk(mod)\n"
        "walk(jrs)\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith(skip) or m == 'fastapi']\n"
        "print(','.join(sorted(bad)) or len([m for m in sys.modules if m.startswith('jrs.')]))\n"
    )
    out = _fresh(code)
    assert out.isdigit() and int(out) > 40, out


@pytest.mark.parametrize("module", ["jrs.service.app", "jrs.service.patients"])
def test_importing_the_service_loads_no_torch_or_training(module: str) -> None:
    pytest.importorskip("fastapi")
    code = (
        f"import sys, {module}\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('jrs.training')]\n"
        "print(','.join(sorted(bad)))\n"
    )
    assert _fresh(code) == ""


def test_one_top_level_package_is_installed() -> None:
    """The build maps the unit folders into ``jrs`` (pyproject's package-dir)."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["packages"]["find"]["include"] == ["jrs*"]
    assert config["package-dir"] == {f"jrs.{u}": u for u in UNITS}
    assert config_script(ROOT) == "jrs.cli:app"


def config_script(root: Path) -> str:
    import tomllib

    return str(tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]["jrs"])


def test_the_product_never_imports_the_research_tree() -> None:
    """research/ is not installed: nothing that is may import it."""
    files = [
        p for p in (ROOT / "jrs").rglob("*.py") if p.relative_to(ROOT / "jrs").parts[0] not in UNITS
    ]
    files += [p for f in UNITS.values() for p in f.rglob("*.py")]
    bad = _offenders(_imports(files), ("research",))
    assert not bad, f"the product imports research/: {bad}"
