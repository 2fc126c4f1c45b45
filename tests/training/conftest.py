"""Training tests: the ones that start torch loader workers run in a fresh interpreter.

By the time the training tests run in the whole suite, this process has loaded OpenVINO and ONNX
Runtime (their thread pools); a torch ``DataLoader`` with workers then crashes the process with a
segmentation fault, whatever the start method (fork, forkserver, spawn): measured by running
``tests/jrs/test_engines.py`` before ``tests/training/test_trainer_cluster.py``. A `jrs train`
process never loads either library. Tests marked ``fresh_interpreter`` are therefore run by a
new ``python -m pytest`` of that one test when either library is loaded here; their outcome
(pass, or the failure with its output) is this test's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_FOREIGN = ("openvino", "onnxruntime")
_INSIDE = "JRS_TEST_FRESH_INTERPRETER"


def _in_fresh_interpreter(item: pytest.Item) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", item.nodeid],
        cwd=REPO,
        env={**os.environ, _INSIDE: "1"},
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    if proc.returncode == 0 and "skipped" in last and "passed" not in last:
        pytest.skip(f"skipped in a fresh interpreter: {last}")
    if proc.returncode != 0:
        pytest.fail(
            f"{item.nodeid} failed in a fresh interpreter (exit {proc.returncode}):\n"
            + proc.stdout[-4000:]
            + proc.stderr[-2000:],
            pytrace=False,
        )


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Swap the test's body for a run in a new interpreter where it would crash here."""
    if item.get_closest_marker("fresh_interpreter") is None or os.environ.get(_INSIDE):
        return
    if not any(name in sys.modules for name in _FOREIGN):
        return
    item.runtest = lambda: _in_fresh_interpreter(item)  # type: ignore[method-assign]
