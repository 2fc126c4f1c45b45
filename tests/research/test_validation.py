"""Held-out validation: the report's arithmetic, and one real (slow) run with the bundled model."""

from __future__ import annotations

from pathlib import Path

import pytest

from jrs.core.errors import InvalidInput
from research.validation import report_markdown, validate_heldout


def _rows() -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for case, dsc in (("a", 0.8), ("b", 0.6)):
        for organ in ("prostate", "seminal_vesicles", "rectum", "bladder"):
            rows.append(
                {
                    "case": case,
                    "path": "registration",
                    "organ": organ,
                    "dsc": dsc,
                    "msd": 2.0 if case == "a" else 4.0,
                }
            )
    rows.append(
        {"case": "a", "path": "iterative", "organ": "prostate", "dsc": 0.0, "msd": float("nan")}
    )
    return rows


def test_report_gives_mean_sd_per_path_and_organ_and_stage_times() -> None:
    timings = {
        "a": {"network": {"read": 1.0, "total": 10.0}},
        "b": {"network": {"read": 3.0, "total": 20.0}},
    }
    text = report_markdown(_rows(), timings)
    reg = next(line for line in text.splitlines() if line.startswith("| registration |"))
    # DSC mean 0.7 sd 0.1; MSD mean 3.0 sd 1.0, for every organ
    assert reg.count("0.700 ± 0.100") == 4 and reg.count("3.00 ± 1.00") == 4
    it = next(line for line in text.splitlines() if line.startswith("| iterative |"))
    assert "0.000 ± 0.000" in it and "n/a" in it
    assert "| segmentation |" not in text  # no rows, no line
    assert "| read | total |" in text and "| 2.00 ± 1.00 | 15.00 ± 5.00 |" in text
    assert "2 fractions: a, b" in text
    assert "## " not in text  # one kind of case: one table


@pytest.mark.slow
@pytest.mark.integration
def test_heldout_run_scores_every_path(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    report = validate_heldout([4242], matrix=192, slice_mm=3.0, device="cpu", out_dir=tmp_path)
    paths = {r["path"] for r in report.rows}
    assert paths == {
        "no_registration",
        "prealigned",
        "segmentation",
        "registration",
        "fusion",
        "chosen",
        "iterative",
    }
    assert len(report.rows) == 28
    reg = {r["organ"]: r["dsc"] for r in report.rows if r["path"] == "registration"}
    assert reg["bladder"] > 0.6 and reg["prostate"] > 0.6
    for name in ("heldout.csv", "timings.json", "fields.json", "report.md"):
        assert (tmp_path / name).is_file()
    assert set(report.timings["phantom4242_f1"]) == {"network", "iterative"}
    assert set(report.fields["phantom4242_f1"]) == {"network", "iterative"}


def test_report_lists_the_fused_rows_and_hd95() -> None:
    rows = _rows()
    for organ in ("prostate", "seminal_vesicles", "rectum", "bladder"):
        rows.append(
            {"case": "a", "path": "fusion", "organ": organ, "dsc": 0.9, "msd": 1.0, "hd95": 3.0}
        )
    text = report_markdown(rows, {})
    lines = text.splitlines()
    fused = [line for line in lines if line.startswith("| fusion |")]
    assert len(fused) == 2  # the DSC / MSD table and the HD95 table
    assert fused[0].count("0.900 ± 0.000") == 4 and fused[1].count("3.00 ± 0.00") == 4
    # the fused rows sit between the registration path and the chosen contours
    order = [line.split("|")[1].strip() for line in lines if line.startswith("| ")][1:4]
    assert order == ["registration", "fusion", "iterative"]


@pytest.mark.integration
def test_heldout_reports_the_fused_contours(tmp_path: Path) -> None:
    """One small phantom, a fake network (no model needed): every path scored, fusion too."""
    from tests.jrs.test_fusion import FusionBackend

    report = validate_heldout(
        [4242],
        matrix=128,
        slice_mm=3.0,
        iterative=False,
        backend=FusionBackend(),
        out_dir=tmp_path,
    )
    organs = {"prostate", "seminal_vesicles", "rectum", "bladder"}
    by_path: dict[str, set[str]] = {}
    for r in report.rows:
        by_path.setdefault(r["path"], set()).add(r["organ"])
        assert {"dsc", "msd", "hd95"} <= set(r)
    assert by_path == dict.fromkeys(
        ("no_registration", "prealigned", "segmentation", "registration", "fusion", "chosen"),
        organs,
    )
    # the fake network's field is zero: its registration path is the pre-alignment alone
    reg = {r["organ"]: r["dsc"] for r in report.rows if r["path"] == "registration"}
    affine = {r["organ"]: r["dsc"] for r in report.rows if r["path"] == "prealigned"}
    assert reg == pytest.approx(affine, abs=0.01)
    assert report.fields["phantom4242_f1"]["network"]["folding_fraction"] == 0.0
    fused = {r["organ"]: r for r in report.rows if r["path"] == "fusion"}
    assert all(0.5 < r["dsc"] <= 1.0 and r["hd95"] >= r["msd"] for r in fused.values())
    csv_text = (tmp_path / "heldout.csv").read_text()
    assert csv_text.splitlines()[0] == "case,path,organ,dsc,msd,hd95"
    assert csv_text.count(",fusion,") == 4
    assert "| fusion |" in (tmp_path / "report.md").read_text()


def test_engine_report_bounds_the_dsc_difference() -> None:
    from research.validation import ENGINE_DSC_TOLERANCE, EngineComparison, engines_markdown

    report = EngineComparison(engines=("onnxruntime-fp32", "openvino-bf16"))
    for case, diff in (("a", 0.001), ("b", -0.003)):
        for organ in ("Prostate", "Rectum"):
            report.rows.append(
                {
                    "case": case,
                    "organ": organ,
                    "dsc_onnxruntime-fp32": 0.9,
                    "dsc_openvino-bf16": round(0.9 + diff, 4),
                    "dsc_diff": diff,
                    "dsc_between": 0.99,
                }
            )
        report.dvf.append({"case": case, "max_mm": 0.02, "mean_mm": 0.001, "spacing_mm": [3.0] * 3})
        report.timings[case] = {
            "onnxruntime-fp32": {"network": 30.0},
            "openvino-bf16": {"network": 3.0},
        }
    assert report.max_dsc_diff == pytest.approx(0.003)
    assert report.max_dsc_diff <= ENGINE_DSC_TOLERANCE
    text = engines_markdown(report)
    assert "| Prostate | 0.9000 ± 0.0000 | 0.8990 ± 0.0020 | -0.0010 | 0.0030 | 0.9900 |" in text
    assert "0.0030 (within the 0.005 bar)" in text
    assert "| a | 0.0200 | 0.00100 | 3 x 3 x 3 |" in text
    assert "onnxruntime-fp32 30.00, openvino-bf16 3.00" in text


@pytest.mark.slow
@pytest.mark.integration
def test_engine_comparison_on_a_phantom(tmp_path: Path) -> None:
    """Two real engines on one small held-out phantom: same contours within the bar."""
    from jrs.inference import openvino_available
    from research.validation import compare_engines

    if not openvino_available():
        pytest.skip("OpenVINO is not installed")
    report = compare_engines(
        [4243],
        engines=("openvino-fp32", "openvino-bf16"),
        matrix=160,
        slice_mm=3.0,
        out_dir=tmp_path,
    )
    assert {r["organ"] for r in report.rows} >= {"Prostate", "Rectum", "Bladder"}
    assert all(r["dsc_between"] > 0.95 for r in report.rows)
    assert report.max_dsc_diff <= 0.02
    (dvf,) = report.dvf
    assert 0 <= dvf["mean_mm"] <= dvf["max_mm"] < 1.0
    for name in ("engines.csv", "dvf.csv", "engines.md"):
        assert (tmp_path / name).is_file()


@pytest.mark.integration
def test_heldout_scores_synthetic_fractions_of_a_real_planning_scan(tmp_path: Path) -> None:
    """A planning scan given as DICOM (here a phantom's) becomes held-out synthetic fractions."""
    from jrs.synth import generate_patient, write_patient
    from research.validation import HeldoutPlanning
    from tests.jrs.test_fusion import FusionBackend

    write_patient(generate_patient(4244, matrix=128, slice_thickness=3.0), tmp_path / "p")
    planning = HeldoutPlanning(
        tmp_path / "p" / "planning" / "ct",
        tmp_path / "p" / "planning" / "rtstruct.dcm",
        fractions=2,
        seed=5,
    )
    report = validate_heldout(
        [], real=[planning], iterative=False, backend=FusionBackend(), out_dir=tmp_path / "r"
    )
    cases = sorted({r["case"] for r in report.rows})
    assert len(cases) == 2 and all(c.startswith("planning_") for c in cases)
    assert [c[-3:] for c in cases] == ["_f1", "_f2"]
    chosen = [r for r in report.rows if r["path"] == "chosen"]
    assert {r["organ"] for r in chosen} == {"prostate", "seminal_vesicles", "rectum", "bladder"}
    # the truth moved: the planning contours alone do not match it perfectly
    assert all(r["dsc"] < 0.999 for r in report.rows if r["path"] == "no_registration")

    # the synthetic fractions carry a setup error that the pre-alignment takes out
    def mean_dsc(path: str) -> float:
        values = [r["dsc"] for r in report.rows if r["path"] == path]
        return sum(values) / len(values)

    assert mean_dsc("prealigned") > mean_dsc("no_registration")
    text = (tmp_path / "r" / "report.md").read_text()
    assert "folding (% of body voxels)" in text
    mixed = report_markdown(
        [*report.rows, *({**r, "case": "phantom1_f1"} for r in report.rows)], {}, report.fields
    )
    assert "## Phantom fractions (1)" in mixed
    assert "## Synthetic fractions of real planning scans (2)" in mixed
    with pytest.raises(InvalidInput, match="at least one phantom seed or a real planning"):
        validate_heldout([])


def test_cli_heldout_takes_zero_phantoms_only_with_a_real_patient() -> None:
    """``--cases 0`` is for the real patient's fractions alone; without one it is refused."""
    from typer.testing import CliRunner

    from research.__main__ import app

    result = CliRunner().invoke(app, ["heldout", "--cases", "0", "--no-iterative"])
    assert result.exit_code == 2
    assert "at least one phantom seed or a real planning scan" in result.stderr
    result = CliRunner().invoke(app, ["heldout", "--cases", "-1"])
    assert result.exit_code == 2
