import json
from pathlib import Path

from typer.testing import CliRunner

from jrs_cli import app


def test_prealign_benchmark_reports_time_memory_and_accuracy(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    result = CliRunner().invoke(app, ["benchmark", "prealign", "--slices", "24", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["grid_zyx"][0] == 24 and len(data["trials"]) == 3
    assert data["mean_error_mm"] < 1.0  # known setup errors recovered
    assert data["peak_rss_mb"] > 0 and data["machine"]["cpu_cores"] >= 1


def test_unknown_benchmark_is_a_clear_error() -> None:
    result = CliRunner().invoke(app, ["benchmark", "everything"])
    assert result.exit_code == 2
    assert "use phantom, prealign, recontour, heldout, engines, service or gpu" in result.stderr
