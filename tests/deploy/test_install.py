"""docker/install.sh, the install step of the Dockerfiles, run into a throw-away venv.

The build context is rebuilt from the COPY lines of the Dockerfile's build stage, so the test also
proves that what the image copies is enough to install. It downloads the service's dependencies
(PyPI or the pip cache; CPU torch for the adaptation image) and takes minutes: marked slow.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.conftest import DOCKER_DIR, REPO_ROOT, train_torch_pin
from tests.deploy.test_docker import parse_dockerfile


def _build_context(dest: Path, dockerfile: str = "Dockerfile.cpu") -> Path:
    """Copy what the build stage of a Dockerfile copies, to the same places under ``dest``."""
    builder = parse_dockerfile(DOCKER_DIR / dockerfile).stages[0]
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for args in builder.all("COPY"):
        *sources, target = shlex.split(args)
        into_dir = len(sources) > 1 or target.endswith("/")
        for src in sources:
            origin = REPO_ROOT / src
            to = dest / target / origin.name if into_dir else dest / target
            if origin.is_dir():
                shutil.copytree(origin, to, ignore=ignore)
            else:
                to.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, to)
    return dest


@pytest.mark.slow
@pytest.mark.integration
def test_install_script_gives_service_and_onnxruntime_without_torch(tmp_path: Path) -> None:
    if shutil.which("bash") is None:
        pytest.skip("bash is not available")
    src = _build_context(tmp_path / "src")
    assert (src / "pyproject.toml").is_file() and (src / "docker" / "install.sh").is_file()
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    env["PYTHON"] = sys.executable
    proc = subprocess.run(
        ["bash", str(src / "docker" / "install.sh"), str(venv), "cpu", str(src)],
        capture_output=True,
        text=True,
        timeout=1500,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    tail = (proc.stdout + proc.stderr)[-4000:]
    if proc.returncode != 0 and "No matching distribution" in tail:
        pytest.skip(f"the package index cannot be reached: {tail[-300:]}")
    assert proc.returncode == 0, tail
    assert "install.sh: jrs (cpu) ready" in proc.stdout

    python = venv / "bin" / "python"
    outside = tmp_path / "elsewhere"  # not the source folder: the venv must hold everything
    outside.mkdir()
    check = subprocess.run(
        [
            str(python),
            "-c",
            "import onnxruntime, jrs, jrs.cli, jrs.service, jrs.service.app; "
            "print(jrs.service.__file__); print(onnxruntime.get_available_providers())",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=outside,
        check=False,
    )
    assert check.returncode == 0, check.stderr
    assert str(venv) in check.stdout, "service must come from the venv, not the source tree"
    assert "CPUExecutionProvider" in check.stdout
    # one top-level package: the units are installed inside jrs (pyproject's package-dir)
    site = next((venv / "lib").glob("python*/site-packages"))
    (top,) = site.glob("jrs-*.dist-info/top_level.txt")
    assert top.read_text().split() == ["jrs"]
    for unit in ("service", "training", "model_export", "jrs_cli"):
        assert not (site / unit).exists(), f"{unit} installed at the top level"
        if unit != "jrs_cli":
            assert (site / "jrs" / unit / "__init__.py").is_file(), f"jrs.{unit} missing"

    torch = subprocess.run(
        [str(python), "-c", "import torch"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=outside,
        check=False,
    )
    assert torch.returncode != 0 and "No module named 'torch'" in torch.stderr

    listed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=freeze"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=True,
    ).stdout.lower()
    names = {line.split("==")[0] for line in listed.splitlines()}
    assert "torch" not in names and "onnxruntime" in names and "fastapi" in names
    assert "openvino" in names  # the CPU engine (JRS_ENGINE=auto/openvino)
    assert "openvino" in proc.stdout.split("ready;")[-1]

    # the `jrs` command of the image works: its help and the serve command's options
    jrs = subprocess.run(
        [str(venv / "bin" / "jrs"), "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=outside,
        check=False,
    )
    assert jrs.returncode == 0 and "--port" in jrs.stdout, jrs.stderr


def test_install_script_rejects_an_unknown_flavour(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["bash", str(DOCKER_DIR / "install.sh"), str(tmp_path / "v"), "tpu"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2 and "cpu, gpu or adapt-cpu" in proc.stderr
    assert not (tmp_path / "v").exists()


def test_install_script_refuses_a_torch_other_than_the_train_pin(tmp_path: Path) -> None:
    """adapt-cpu reads the train extra's torch pin from pyproject.toml; another JRS_TORCH would
    let pip swap the CPU build for PyPI's CUDA one, so it stops before installing anything."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    env |= {"PYTHON": sys.executable, "JRS_TORCH": "torch==2.0.0"}
    venv = tmp_path / "v"
    proc = subprocess.run(
        ["bash", str(DOCKER_DIR / "install.sh"), str(venv), "adapt-cpu", str(REPO_ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"differs from the train extra's {train_torch_pin()}" in proc.stderr
    assert not list((venv / "lib").glob("python*/site-packages/torch")), "nothing installed"


def test_install_script_is_valid_bash() -> None:
    script = DOCKER_DIR / "install.sh"
    assert script.stat().st_mode & 0o111, "install.sh must be executable"
    proc = subprocess.run(
        ["bash", "-n", str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
@pytest.mark.integration
def test_install_script_adapt_cpu_gives_cpu_torch_and_the_train_extra(tmp_path: Path) -> None:
    """The build step of Dockerfile.adapt-cpu: the service plus the train extra with CPU torch."""
    if shutil.which("bash") is None:
        pytest.skip("bash is not available")
    src = _build_context(tmp_path / "src", "Dockerfile.adapt-cpu")
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    env["PYTHON"] = sys.executable
    proc = subprocess.run(
        ["bash", str(src / "docker" / "install.sh"), str(venv), "adapt-cpu", str(src)],
        capture_output=True,
        text=True,
        timeout=2400,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    tail = (proc.stdout + proc.stderr)[-4000:]
    if proc.returncode != 0 and "No matching distribution" in tail:
        pytest.skip(f"the package index cannot be reached: {tail[-300:]}")
    assert proc.returncode == 0, tail
    pin = train_torch_pin().split("==")[1]
    assert "install.sh: jrs (adapt-cpu) ready" in proc.stdout
    assert f"torch {pin}+cpu (CPU" in proc.stdout

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    check = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import sys, service.app; assert 'torch' not in sys.modules; "
            "import torch, training.adapt, onnxscript, tensorboard; "
            "print(torch.__version__, torch.version.cuda, training.adapt.__file__)",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=outside,
        check=False,
    )
    assert check.returncode == 0, check.stderr
    version, cuda, location = check.stdout.split()
    assert version == f"{pin}+cpu" and cuda == "None"
    assert location.startswith(str(venv))
    listed = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=True,
    ).stdout.lower()
    assert not [line for line in listed.splitlines() if line.startswith("nvidia-")]
    adapt = subprocess.run(
        [str(venv / "bin" / "jrs"), "adapt", "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=outside,
        check=False,
    )
    assert adapt.returncode == 0 and "--threads" in adapt.stdout, adapt.stderr
