"""The re-contouring pipeline end to end on a synthetic patient.

The network is replaced by a fake backend (a test double that isolates the pipeline from the
model): it "segments" the pre-aligned planning labels and predicts a known smooth displacement,
so every number the pipeline derives can be checked analytically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from jrs.core.errors import ModelNotReady
from jrs.core.fields import sample_dvf
from jrs.core.geometry import Geometry, Volume
from jrs.core.metrics import dice
from jrs.inference.registry import default_model_dir
from jrs.io.ct import read_ct_series
from jrs.io.reg import read_deformable_registration
from jrs.io.rtstruct import masks_from_files, read_rtstruct
from jrs.pipeline.options import DEFAULT_DVF_SPACING_MM, RecontourOptions
from jrs.pipeline.run import recontour
from jrs.registration.composition import dvf_grid, taper
from jrs.synth import generate_fraction, generate_patient, write_fraction, write_patient


@dataclass
class _Pred:
    seg_probs: np.ndarray | None
    dvf: np.ndarray


class ShiftBackend:
    """Fake network: segmentation = pre-aligned planning labels; DVF = a constant shift (mm)."""

    def __init__(self, shift_xyz: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> None:
        self.shift = np.asarray(shift_xyz, np.float32)
        # a constant shift is the same for any input: the null-field correction would remove it
        self.metadata: dict[str, Any] = {
            "name": "fake",
            "version": "0",
            "path_choice": {},
            "null_correction": False,
        }
        self.calls = 0

    def predict(self, fixed: np.ndarray, moving: np.ndarray, moving_labels: np.ndarray) -> _Pred:
        self.calls += 1
        lab = moving_labels.astype(int)
        probs = np.stack([(lab == c).astype(np.float32) for c in range(5)])
        dvf = np.broadcast_to(self.shift[:, None, None, None], (3, *fixed.shape)).copy()
        return _Pred(probs, dvf)


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    root = tmp_path_factory.mktemp("pipeline")
    patient = generate_patient(7, matrix=256, slice_thickness=3.0)
    fraction = generate_fraction(patient, 1)
    write_patient(patient, root)
    write_fraction(fraction, root / "fraction_1")
    return root, fraction


@pytest.mark.integration
def test_recontour_writes_every_output_consistently(
    case: tuple[Path, Any], runs: dict[str, Any]
) -> None:
    root, fraction = case
    result = runs["zero"]
    for p in (result.rtstruct, result.dvf, result.registration, result.qa, result.review):
        assert p.is_file() and p.stat().st_size > 0

    daily = read_ct_series(root / "fraction_1" / "ct")
    planning_rs = read_rtstruct(root / "planning" / "rtstruct.dcm")
    out_rs = read_rtstruct(result.rtstruct)
    assert [r.name for r in out_rs.rois] == [r.name for r in planning_rs.rois]
    assert {r.name: r.color for r in out_rs.rois} == {r.name: r.color for r in planning_rs.rois}
    ds = pydicom.dcmread(result.rtstruct)
    assert ds.StudyInstanceUID == daily.study_instance_uid
    assert ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID == (
        daily.frame_of_reference_uid
    )

    # contours re-read on the daily CT: organs close to the truth even with a zero network DVF
    _, _, masks = masks_from_files(root / "fraction_1" / "ct", result.rtstruct)
    for organ in ("Bladder", "Prostate", "Rectum"):
        assert dice(masks[organ].array, fraction.structures[organ]) > 0.6, organ

    # the DVF is on a 3 mm grid over the daily CT by default (it was the daily CT grid itself
    # before the default changed; that grid is still written on request, see the "shift" run),
    # and equals the affine pre-alignment where the network's is 0
    dvf = Volume.read(str(result.dvf))
    assert DEFAULT_DVF_SPACING_MM == 3.0
    assert dvf.geometry.same_grid(dvf_grid(daily.volume.geometry, DEFAULT_DVF_SPACING_MM))
    np.testing.assert_allclose(dvf.geometry.spacing, [3.0, 3.0, 3.0])
    full = Volume.read(str(runs["shift"].dvf))
    assert full.geometry.same_grid(daily.volume.geometry)
    qa = json.loads(result.qa.read_text())
    assert qa["dvf"]["grid"]["daily_ct_grid"] is False
    np.testing.assert_allclose(qa["dvf"]["grid"]["spacing_mm"], [3.0, 3.0, 3.0])
    matrix = np.array(qa["prealign"]["matrix"]).reshape(3, 3)
    corner = daily.volume.geometry.corners()[:1]
    reg = read_deformable_registration(result.registration)
    assert reg.source_frame_of_reference_uid != reg.registered_frame_of_reference_uid
    rng = np.random.default_rng(0)
    pts = daily.volume.geometry.index_to_physical(
        rng.uniform(0, 1, (1000, 3)) * (np.asarray(daily.volume.geometry.size_xyz) - 1)
    )
    diff = np.abs(sample_dvf(reg.dvf, pts) - sample_dvf(dvf, pts)).max()
    assert diff < 0.1
    u_corner = sample_dvf(dvf, corner)[0]
    assert np.linalg.norm(u_corner) < 60.0 and np.all(np.isfinite(matrix))
    # by default the pre-alignment ends with the rigid match centred on the prostate
    assert qa["prealign"]["mode"] == "prostate"
    focus = qa["prealign"]["focus"]
    assert focus["accepted"] and focus["organs"] == ["prostate", "seminal_vesicles"]
    assert focus["voxels"] > 100 and focus["reason"] == ""
    np.testing.assert_allclose(matrix.T @ matrix, np.eye(3), atol=1e-6)  # rigid
    shift_qa = json.loads(runs["shift"].qa.read_text())
    assert shift_qa["prealign"]["mode"] == "affine" and shift_qa["prealign"]["focus"] is None

    # QA: every structure, the stages, Jacobian of a pure affine ~ constant
    names = {s["name"] for s in qa["structures"]}
    assert names == {r.name for r in planning_rs.rois}
    for stage in ("read", "prealign", "prepare", "network", "dvf", "propagate", "write", "total"):
        assert stage in qa["timings_s"]
    assert qa["dvf"]["folding_fraction"] == 0.0
    assert qa["dvf"]["std"] < 0.05
    prostate = next(s for s in qa["structures"] if s["name"] == "Prostate")
    assert prostate["path_dice"] is not None and prostate["path_dice"] > 0.9
    assert prostate["source"] == "segmentation"

    # the output paths are kept on the network grid; the default choice here is segmentation
    assert set(result.path_labels) == {"segmentation", "registration", "chosen"}
    chosen = result.path_labels["chosen"]
    assert chosen.geometry.same_grid(result.path_labels["segmentation"].geometry)
    np.testing.assert_array_equal(chosen.array, result.path_labels["segmentation"].array)
    assert set(np.unique(chosen.array)) == {0, 1, 2, 3, 4}


def _affine_field(qa: dict[str, Any], points: np.ndarray, far: bool = False) -> np.ndarray:
    """A(p) - p from the pre-alignment recorded in qa.json (SimpleITK affine with centre).

    With ``far``, the mapping far from the network box (the bony match, `jrs.registration.far_field`).
    """
    src = qa["prealign"]["far_field"] if far else qa["prealign"]
    m = np.array(src["matrix"]).reshape(3, 3)
    c = np.array(src["center_mm"])
    t = np.array(src["translation_mm"])
    return (points - c) @ m.T + c + t - points


@pytest.fixture(scope="module")
def runs(case: tuple[Path, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root, _ = case
    out = tmp_path_factory.mktemp("runs")
    args = (
        root / "planning" / "ct",
        root / "planning" / "rtstruct.dcm",
        root / "fraction_1" / "ct",
    )
    # the fake networks' fields are composed as they are (no instance optimisation on top)
    return {
        "zero": recontour(
            *args, out / "zero", backend=ShiftBackend(), options=RecontourOptions(refine="off")
        ),
        "shift": recontour(
            *args,
            out / "shift",
            backend=ShiftBackend((0.0, 3.0, 0.0)),
            options=RecontourOptions(
                path_choice={"prostate": "registration"},
                dvf_spacing_mm=None,
                prealign="affine",
                refine="off",
            ),
        ),
        # the "shift" run's network (3 mm off), refined on the pair (`jrs.registration.instance_optimisation`)
        "refined": recontour(
            *args,
            out / "refined",
            backend=ShiftBackend((0.0, 3.0, 0.0)),
            options=RecontourOptions(
                path_choice={"prostate": "registration"},
                dvf_spacing_mm=None,
                prealign="affine",
                refine="on",
            ),
        ),
    }


@pytest.mark.integration
def test_refinement_is_recorded_per_organ(case: tuple[Path, Any], runs: dict[str, Any]) -> None:
    """With ``refine="on"`` qa.json says what the refinement did to each organ, and when off
    that it was not asked for; a kept organ moves towards the truth, never away from it."""
    root, fraction = case
    qa = json.loads(runs["refined"].qa.read_text())
    assert "refine" in qa["timings_s"]
    refine = qa["refine"]
    assert refine["applied"] is True and refine["iterations"] > 0
    assert set(refine["organs"]) == {"prostate", "seminal_vesicles", "rectum", "bladder"}
    for organ, figures in refine["organs"].items():
        assert isinstance(figures["kept"], bool), organ
        assert figures["surface_shift_mm"] >= 0.0
        assert -1.0 <= figures["ncc_network"] <= 1.0 and -1.0 <= figures["ncc_refined"] <= 1.0
        if not figures["kept"]:
            assert figures["surface_shift_mm"] < 0.05, organ
    off = json.loads(runs["shift"].qa.read_text())["refine"]
    assert off == {
        "applied": False,
        "seconds": 0.0,
        "iterations": 0,
        "stopped_by_budget": False,
        "organs": {},
        "reason": "not asked for",
    }
    _, _, refined = masks_from_files(root / "fraction_1" / "ct", runs["refined"].rtstruct)
    for organ, name in (("bladder", "Bladder"), ("prostate", "Prostate")):
        if refine["organs"][organ]["kept"]:
            before = dice(
                masks_from_files(root / "fraction_1" / "ct", runs["shift"].rtstruct)[2][name].array,
                fraction.structures[name],
            )
            assert dice(refined[name].array, fraction.structures[name]) >= before - 0.01


@pytest.mark.integration
def test_network_shift_is_folded_into_the_dvf(runs: dict[str, Any]) -> None:
    for name, shift in (("zero", 0.0), ("shift", 3.0)):
        result = runs[name]
        qa = json.loads(result.qa.read_text())
        dvf = Volume.read(str(result.dvf))
        box = qa["network_box_mm"]
        centre = ((np.array(box["lower"]) + np.array(box["upper"])) / 2)[None]
        corner = dvf.geometry.corners()[:1]
        # far from the box the field is the bony match alone (`jrs.registration.far_field`)
        np.testing.assert_allclose(
            sample_dvf(dvf, corner), _affine_field(qa, corner, far=True), atol=0.01
        )
        # at the box centre (taper 1) the network's shift moves the planning point by A's
        # linear part applied to (0, shift, 0): |delta| ~ shift for a near-rigid A
        delta = sample_dvf(dvf, centre)[0] - _affine_field(qa, centre)[0]
        assert np.linalg.norm(delta) == pytest.approx(shift, abs=0.15), name
    qa = json.loads(runs["shift"].qa.read_text())
    prostate = next(s for s in qa["structures"] if s["name"] == "Prostate")
    assert prostate["source"] == "registration"


def test_taper_is_one_inside_and_zero_at_faces() -> None:
    g = Geometry((40, 50, 60), origin=[0, 0, 0], spacing=[1.0, 1.0, 1.0])
    w = taper(g, 10.0)
    assert w[20, 25, 30] == 1.0
    assert w[0].max() == 0.0 and w[:, :, -1].max() == 0.0
    assert 0.0 < w[5, 25, 30] < 1.0


def test_missing_model_is_model_not_ready(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JRS_MODEL_DIR", str(tmp_path))
    with pytest.raises(ModelNotReady, match="JRS_MODEL_DIR .* holds no model"):
        default_model_dir()
    with pytest.raises(ModelNotReady):
        recontour(
            tmp_path,
            tmp_path / "rs.dcm",
            tmp_path,
            tmp_path / "o",
            options=RecontourOptions(model_dir=None),
        )


def _manifest(path: Path, rows: list[tuple[str, str, str, str]]) -> Path:
    lines = ["id,planning_ct,planning_rtstruct,daily_ct"] + [",".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_manifest_errors_name_file_and_row(tmp_path: Path) -> None:
    from jrs.core.errors import InvalidInput
    from jrs.pipeline.batch import read_manifest

    bad = tmp_path / "m.csv"
    bad.write_text("planning_ct,daily_ct\na,b\n")
    with pytest.raises(InvalidInput, match=r"m.csv: missing column\(s\) \['planning_rtstruct'\]"):
        read_manifest(bad)
    _manifest(bad, [("x", "a", "b", "c"), ("x", "a", "b", "c")])
    with pytest.raises(InvalidInput, match="row 2: id 'x' appears twice"):
        read_manifest(bad)
    _manifest(bad, [("../evil", "a", "b", "c")])
    with pytest.raises(InvalidInput, match="not a safe folder name"):
        read_manifest(bad)
    bad.write_text("id,planning_ct,planning_rtstruct,daily_ct\n")
    with pytest.raises(InvalidInput, match="no rows"):
        read_manifest(bad)
    rows = read_manifest(_manifest(bad, [("", "p/ct", "p/rs.dcm", "d/ct")]))
    assert rows[0].id == "row_0001" and rows[0].daily_ct == (tmp_path / "d" / "ct")


@pytest.mark.integration
def test_batch_records_failures_and_resumes(case: tuple[Path, Any], tmp_path: Path) -> None:
    import csv

    from jrs.pipeline.batch import run_batch

    root, _ = case
    manifest = _manifest(
        tmp_path / "manifest.csv",
        [
            (
                "good",
                str(root / "planning" / "ct"),
                str(root / "planning" / "rtstruct.dcm"),
                str(root / "fraction_1" / "ct"),
            ),
            (
                "broken",
                str(root / "planning" / "ct"),
                str(root / "planning" / "rtstruct.dcm"),
                str(tmp_path / "no_such_ct"),
            ),
        ],
    )
    seen: list[tuple[str, str]] = []
    backend = ShiftBackend()
    summary = run_batch(
        manifest, tmp_path / "out", backend=backend, on_progress=lambda i, s: seen.append((i, s))
    )
    assert summary.done == ["good"] and list(summary.failed) == ["broken"]
    assert "no_such_ct" in summary.failed["broken"]
    assert sorted(seen) == [("broken", "failed"), ("good", "done")]
    status = {r["id"]: r for r in csv.DictReader((tmp_path / "out" / "batch_status.csv").open())}
    assert status["good"]["status"] == "done" and status["broken"]["status"] == "failed"
    assert status["broken"]["error_code"] == "invalid_input"
    assert (tmp_path / "out" / "good" / "rtstruct.dcm").is_file()
    # resume: nothing to redo; retry_failed reruns only the failed row
    again = run_batch(manifest, tmp_path / "out", backend=backend)
    assert again.done == [] and sorted(again.skipped) == ["broken", "good"]
    retry = run_batch(manifest, tmp_path / "out", backend=backend, retry_failed=True)
    assert retry.skipped == ["good"] and list(retry.failed) == ["broken"]
    assert backend.calls == 1


def test_batch_parallel_workers_record_every_row(tmp_path: Path) -> None:
    from jrs.pipeline.batch import run_batch

    rows = [(f"r{i}", "nope/ct", "nope/rs.dcm", "nope/daily") for i in range(4)]
    manifest = _manifest(tmp_path / "m.csv", rows)
    summary = run_batch(manifest, tmp_path / "out", RecontourOptions(method="iterative"), workers=2)
    assert sorted(summary.failed) == ["r0", "r1", "r2", "r3"]
    assert summary.done == []
