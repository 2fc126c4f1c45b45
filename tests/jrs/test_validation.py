"""Held-out validation: the report's arithmetic, and one real (slow) run with the bundled model."""

from __future__ import annotations

from pathlib import Path

import pytest

from jrs.validation import report_markdown, validate_heldout


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
    assert "2 phantom fractions: a, b" in text


@pytest.mark.slow
@pytest.mark.integration
def test_heldout_run_scores_every_path(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    report = validate_heldout([4242], matrix=192, slice_mm=3.0, device="cpu", out_dir=tmp_path)
    paths = {r["path"] for r in report.rows}
    assert paths == {"segmentation", "registration", "chosen", "iterative"}
    assert len(report.rows) == 16
    reg = {r["organ"]: r["dsc"] for r in report.rows if r["path"] == "registration"}
    assert reg["bladder"] > 0.6 and reg["prostate"] > 0.6
    for name in ("heldout.csv", "timings.json", "report.md"):
        assert (tmp_path / name).is_file()
    assert set(report.timings["phantom4242_f1"]) == {"network", "iterative"}
