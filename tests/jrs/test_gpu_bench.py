"""The one-call GPU benchmark (scripts/gpu_bench.sh -> `jrs benchmark gpu`), dry-run on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jrs.core.errors import InvalidInput
from jrs.inference import CUDA_PROVIDER, available_providers

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_bench.sh"


def test_script_is_executable_valid_bash_and_bounded_in_time() -> None:
    assert SCRIPT.stat().st_mode & 0o111, "gpu_bench.sh must be executable"
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    text = SCRIPT.read_text()
    assert "timeout" in text and "JRS_GPU_BENCH_TIMEOUT:-470" in text  # under 8 minutes


@pytest.mark.skipif(CUDA_PROVIDER in available_providers(), reason="a CUDA provider is present")
def test_without_cuda_the_real_run_refuses_and_points_at_the_dry_run() -> None:
    from jrs.pipeline.benchmark_gpu import bench_gpu

    with pytest.raises(InvalidInput, match="--dry-run"):
        bench_gpu(dry_run=False)


@pytest.mark.slow
@pytest.mark.integration
def test_dry_run_measures_latency_end_to_end_and_batch(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--repeats", "1", "--fractions", "2"],
        capture_output=True,
        text=True,
        timeout=480,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert report["benchmark"] == "gpu" and report["dry_run"] is True
    assert report["device"] == "cpu" and report["wall_s"] < 470
    rows = [r for r in report["latency"]["cpu"] if "window" in r]
    assert [r["window"] for r in rows] == [48, 64]
    assert all(r["p50_ms"] > 0 and r["runs"] == 1 for r in rows)
    assert report["engines"]["cpu"]["device"] == "cpu"
    e2e = report["end_to_end"]
    assert len(e2e["runs"]) == 1 and e2e["p50"]["total"] > e2e["p50"]["network"] > 0
    batch = report["batch"]
    assert batch["done"] == 2 and batch["failed"] == 0 and batch["fractions_per_hour"] > 0
    assert report["machine"]["cpu_cores"] >= 1
