"""The load command, run briefly (the recorded 50 clients x 5 minutes is a benchmark command)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.reliability import loadtest

pytestmark = pytest.mark.integration


def test_load_command_runs_briefly_without_errors(tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    code = loadtest.main(
        ["--clients", "6", "--seconds", "6", "--think", "0.1", "--sample", "1", "--out", str(out)]
    )
    report = json.loads(out.read_text(encoding="utf-8"))
    assert code == 0, report["error_examples"]
    assert report["errors"] == 0 and report["server_5xx_from_metrics"] == 0
    assert report["requests"] > 50
    assert {"submit", "poll", "live", "metrics"} <= set(report["latency"])
    for key in ("p50_ms", "p95_ms", "p99_ms"):
        assert report["latency"]["all"][key] > 0
    assert report["rss"]["start_mib"] > 10 and len(report["samples"]) >= 4
    assert report["jobs"]["succeeded"] >= 1 and report["jobs"]["failed"] == 0


def test_load_command_refuses_a_remote_url() -> None:
    with pytest.raises(SystemExit) as exit_info:
        loadtest.main(["--url", "http://10.1.2.3:8000", "--seconds", "1"])
    assert exit_info.value.code == 2


def test_percentiles_and_drift() -> None:
    p = loadtest.percentiles([0.001 * k for k in range(1, 101)])
    assert p["n"] == 100 and p["p50_ms"] == pytest.approx(51) and p["max_ms"] == 100
    samples = [{"t_s": float(t), "rss_mib": 100.0 + (t >= 270) * 5} for t in range(0, 300, 5)]
    figures = loadtest.drift(samples, 300.0)  # type: ignore[arg-type]
    assert figures["baseline_mib"] == 100 and figures["final_mib"] == 105
    assert figures["drift_pct"] == 5.0
