"""Shared fixtures: locations of the optional real data and of external validators."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("JRS_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session", autouse=True)
def _own_cache_folder(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The product's cache (`jrs.inference.null_cache`, OpenVINO's models) in a folder of the test run.

    Tests never read or fill the user's ``~/.cache/jrs``; a test that sets ``JRS_CACHE_DIR``
    itself (monkeypatch) keeps its own value.
    """
    os.environ["JRS_CACHE_DIR"] = str(tmp_path_factory.mktemp("jrs-cache"))


@pytest.fixture(scope="session", autouse=True)
def _loader_workers_by_forkserver() -> None:
    """Training loader workers start from a fork server: no worker is a fork of this process.

    The tests that start workers also run in a fresh interpreter when OpenVINO or ONNX Runtime
    is loaded here (`tests/training/conftest.py`): beside their threads a loader crashed the
    process whatever the start method. The batches are the same for every start method
    (`jrs.training.data.KeyedPatchSampler`).
    """
    os.environ.setdefault("JRS_LOADER_START_METHOD", "forkserver")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real public DICOM/CT files (../shared/data); skips when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not present at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def dciodvfy() -> Callable[[Path], tuple[list[str], str]]:
    """Run dicom3tools' ``dciodvfy`` on a file; returns (error lines, full output).

    Skips the test when the tool is not installed (``.ci/run`` installs it with apt).
    """
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed")

    def run(path: Path) -> tuple[list[str], str]:
        proc = subprocess.run(
            [exe, "-new", str(path)], capture_output=True, text=True, timeout=120, check=False
        )
        out = proc.stdout + proc.stderr
        errors = [line for line in out.splitlines() if line.startswith("Error")]
        return errors, out

    return run
