import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from jrs.cli import app


def test_prealign_benchmark_reports_time_memory_and_accuracy(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    result = CliRunner().invoke(app, ["benchmark", "prealign", "--slices", "24", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["grid_zyx"][0] == 24 and len(data["trials"]) == 3
    assert data["mean_error_mm"] < 1.0  # known setup errors recovered
    assert data["peak_rss_mb"] > 0 and data["machine"]["cpu_cores"] >= 1


def test_prealign_benchmark_compares_spacings_on_a_given_ct(tmp_path: Path) -> None:
    from jrs.io.ct_writer import write_ct_series
    from jrs.io.series import CTSeries
    from jrs.synth import generate_patient

    ct = generate_patient(1).ct
    coarse = ct.resample(ct.geometry.resampled_grid([2.0, 2.0, 3.0]), "linear", -1000.0)
    write_ct_series(CTSeries.from_volume(coarse), tmp_path / "ct")
    out = tmp_path / "b.json"
    result = CliRunner().invoke(
        app,
        ["benchmark", "prealign", "--planning-ct", str(tmp_path / "ct"),
         "--prealign-spacings", "4,6", "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["ct"] == "given CT series" and data["grid_zyx"] == list(coarse.geometry.shape)
    # both spacings on the same 3 setup errors
    assert [t["spacing_mm"] for t in data["trials"]] == [4.0, 6.0] * 3
    assert data["trials"][0]["setup_mm"] == data["trials"][1]["setup_mm"]
    assert set(data["per_spacing"]) == {"4.0", "6.0"}
    for figures in data["per_spacing"].values():
        assert figures["mean_error_mm"] < 1.5  # the known setup errors are recovered


def test_unknown_benchmark_is_a_clear_error() -> None:
    result = CliRunner().invoke(app, ["benchmark", "everything"])
    assert result.exit_code == 2
    # every mode is named (other modes may join the list: their order is not pinned here)
    message = result.stderr.split("unknown; use", 1)[-1]
    for mode in ("phantom", "prealign", "recontour", "service", "gpu"):
        assert mode in message, mode
    # the accuracy harnesses left the product: the message says where they are
    assert "python -m research" in message


@pytest.mark.parametrize("harness", ["heldout", "engines", "qa", "adaptation"])
def test_the_accuracy_harnesses_are_research_commands(harness: str) -> None:
    from research.__main__ import app as research_app

    result = CliRunner().invoke(app, ["benchmark", harness])
    assert result.exit_code == 2 and "python -m research" in result.stderr
    helped = CliRunner().invoke(research_app, [harness, "--help"])
    assert helped.exit_code == 0 and "--model" in helped.stdout


def test_engine_ratios_and_stage_table() -> None:
    from jrs.pipeline.benchmark import engine_ratios, recontour_markdown

    def run(network: float, total: float) -> dict:
        return {
            "p50": {"read": 1.0, "network": network, "total": total, "cpu": 2 * total},
            "first": {"total": total + 1},
            "load_model_s": 0.2,
            "peak_rss_mb": 4000.0,
            "registration_mb": 23.3,
            "dice_vs_truth": {"Prostate": 0.9},
        }

    runs = {
        "onnxruntime-fp32": run(80.0, 90.0),
        "openvino-bf16": run(8.0, 18.0),
        "iterative": {**run(0.0, 80.0), "p50": {"read": 1.0, "total": 80.0, "cpu": 90.0}},
        "openvino-fp32": {"skipped": "no OpenVINO"},
    }
    ratios = engine_ratios(runs)
    assert ratios["network_speedup_vs_onnxruntime_fp32"] == {
        "onnxruntime-fp32": 1.0,
        "openvino-bf16": 10.0,
    }
    assert ratios["total_fraction_of_iterative"]["openvino-bf16"] == 0.225
    text = recontour_markdown({"runs": runs})
    assert "| network | 80.00 | 8.00 | nan |" in text
    assert "| CPU time of a run (s, p50) | 180.0 | 36.0 | 90.0 |" in text
    assert "| DSC Prostate | 0.9000 | 0.9000 | 0.9000 |" in text
    assert "`openvino-fp32` skipped: no OpenVINO" in text


@pytest.mark.slow
@pytest.mark.integration
def test_recontour_benchmark_runs_engines_and_measures_the_coarse_dvf(tmp_path: Path) -> None:
    from jrs.inference import openvino_available
    from jrs.pipeline.benchmark import bench_recontour, phantom_case

    case = phantom_case(tmp_path / "case", seed=4244, slice_mm=3.0, matrix=160)
    runs = ["openvino-bf16"] if openvino_available() else ["onnxruntime-fp32"]
    report = bench_recontour(case, runs=runs, repeats=1, device="cpu", isolate=False)
    one = report["runs"][runs[0]]
    assert len(one["runs"]) == 1 and one["p50"]["total"] > one["p50"]["network"] > 0
    assert one["p50"]["cpu"] > 0 and one["peak_rss_mb"] > 0
    assert one["registration_mb"] < 60 and one["dvf_grid"]["daily_ct_grid"] is False
    assert min(one["dice_vs_truth"].values()) > 0.5
    err = report["dvf_coarse_error_mm"]
    assert 0 <= err["mean"] <= err["p99"] <= err["max"] < 2.0 and err["voxels"] > 1000
    assert "| network |" in report["markdown"]
