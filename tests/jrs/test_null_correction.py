"""The null-field correction: the network's field for "nothing moved" is subtracted.

A fake network (a test double) returns a field with a known part that depends on the pair and a
known bias that depends on the moving image alone: the correction must remove the bias exactly,
keep the pair's part, and return zero for the same image twice. End to end, the same phantom
scan given twice through the pipeline with a biased fake must come back unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jrs.core.geometry import Volume
from jrs.core.metrics import dice
from jrs.inference.null_correction import null_correct, null_correction_enabled
from jrs.io.ct import read_ct_series
from jrs.io.rtstruct import read_rtstruct, rtstruct_to_masks
from jrs.pipeline.options import RecontourOptions
from jrs.pipeline.run import recontour
from jrs.synth import generate_fraction, generate_patient, write_fraction, write_patient


@dataclass
class _Pred:
    seg_probs: np.ndarray | None
    dvf: np.ndarray


class BiasedBackend:
    """Fake network: field = 2 * (fixed - moving) along x + a bias of the moving image.

    The bias is 1.5 mm along y wherever the moving image is above -0.5 (inside the body), as a
    trained network's response to the planning anatomy; the segmentation is the moving labels
    shifted by one voxel along x (an imperfect segmentation path).
    """

    def __init__(self, metadata: dict[str, Any] | None = None) -> None:
        self.metadata: dict[str, Any] = {"name": "fake", "version": "0", **(metadata or {})}
        self.calls: list[bool] = []

    def predict(self, fixed: np.ndarray, moving: np.ndarray, moving_labels: np.ndarray) -> _Pred:
        self.calls.append(fixed is moving)
        dvf = np.zeros((3, *fixed.shape), np.float32)
        dvf[0] = 2.0 * (fixed - moving)
        dvf[1] = np.where(moving > -0.5, 1.5, 0.0)
        lab = np.roll(moving_labels.astype(np.int64), 1, axis=2)
        probs = np.stack([(lab == c).astype(np.float32) for c in range(5)])
        return _Pred(probs, dvf)


def test_enabled_by_default_switched_by_metadata_and_options() -> None:
    assert null_correction_enabled({})
    assert null_correction_enabled({"null_correction": True})
    assert not null_correction_enabled({"null_correction": False})
    assert null_correction_enabled({"null_correction": False}, True)
    assert not null_correction_enabled({}, False)
    assert null_correction_enabled({"null_correction": "no"})  # not a boolean: the default


def test_the_bias_goes_the_pair_stays_and_the_same_image_gives_zero() -> None:
    rng = np.random.default_rng(0)
    moving = rng.uniform(-1.0, 1.0, (12, 14, 16)).astype(np.float32)
    fixed = (moving + rng.normal(0.0, 0.1, moving.shape)).astype(np.float32)
    labels = np.zeros(moving.shape, np.float32)
    labels[3:8, 4:9, 5:10] = 4.0
    backend = BiasedBackend()
    raw = backend.predict(fixed, moving, labels).dvf
    corrected, stats = null_correct(backend, moving, labels, raw)
    np.testing.assert_allclose(corrected[0], 2.0 * (fixed - moving), atol=1e-6)
    np.testing.assert_array_equal(corrected[1:], 0.0)
    assert backend.calls == [False, True]  # the null pass: the moving image as both
    assert stats.max_mm == pytest.approx(1.5)
    assert 0.0 < stats.mean_mm < 1.5
    # the segmentation of the planning scan, one voxel off, against its labels (5 x 5 x 5 box)
    assert stats.planning_dice == {"prostate": pytest.approx(2 * 100 / 250)}
    same, _ = null_correct(backend, moving, labels, backend.predict(moving, moving, labels).dvf)
    assert not same.any()
    body = np.zeros(moving.shape, bool)
    _, inside = null_correct(backend, moving, labels, raw, body=moving > 0.9)
    assert inside.max_mm == pytest.approx(1.5) and inside.mean_mm == pytest.approx(1.5)
    with pytest.raises(ValueError, match="shape"):
        null_correct(backend, moving, labels, raw[:, :-1], body=body)
    as_json = json.loads(json.dumps(stats.as_dict()))
    assert as_json["applied"] is True and as_json["null_field_max_mm"] == 1.5


@pytest.mark.integration
def test_the_same_scan_twice_comes_back_unchanged(tmp_path: Path) -> None:
    """Planning = daily through the pipeline with a biased network: every ROI is unchanged."""
    patient = generate_patient(5, matrix=128, slice_thickness=3.0)
    write_patient(patient, tmp_path / "case")
    plan = tmp_path / "case" / "planning"
    series = read_ct_series(plan / "ct")
    before = rtstruct_to_masks(read_rtstruct(plan / "rtstruct.dcm"), series)
    organs = ("prostate", "seminal_vesicles", "rectum", "bladder")
    outs: dict[str, dict[str, Volume]] = {}
    fields: dict[str, Any] = {}
    for mode, choice in (("registration", "registration"), ("segmentation", "segmentation")):
        backend = BiasedBackend({"path_choice": dict.fromkeys(organs, choice)})
        res = recontour(
            plan / "ct",
            plan / "rtstruct.dcm",
            plan / "ct",
            tmp_path / mode,
            RecontourOptions(device="cpu"),
            backend=backend,
        )
        outs[mode] = rtstruct_to_masks(read_rtstruct(res.rtstruct), series)
        fields[mode] = (Volume.read(str(res.dvf)), json.loads(res.qa.read_text()))
        # the null pass of the planning scan (once per planning), then the pair
        assert backend.calls == [True, False]
    dvf, qa = fields["registration"]
    # the field of the same scan twice is the pre-alignment's alone (identity to < 0.05 mm)
    assert float(np.abs(dvf.array).max()) < 0.05
    null = qa["network"]["null_correction"]
    assert null["applied"] is True and null["null_field_max_mm"] == pytest.approx(1.5)
    assert null["source"] == "planning" and null["cached"] is False
    # the null pass on the pair itself: the same result
    backend = BiasedBackend({"path_choice": dict.fromkeys(organs, "registration")})
    res = recontour(
        plan / "ct",
        plan / "rtstruct.dcm",
        plan / "ct",
        tmp_path / "pair",
        RecontourOptions(device="cpu", null_pass="pair"),
        backend=backend,
    )
    assert backend.calls == [False, True]
    assert json.loads(res.qa.read_text())["network"]["null_correction"]["source"] == "pair"
    assert float(np.abs(Volume.read(str(res.dvf)).array).max()) < 0.05
    # every ROI of the registration run, overlaps included (the seminal vesicles enter the
    # prostate in the phantom): Dice >= 0.99 and volume within 1 %
    for name, mask in before.items():
        a, b = mask.array > 0, outs["registration"][name].array > 0
        assert dice(a, b) >= 0.99, name
        assert abs(b.sum() / a.sum() - 1.0) <= 0.01, name
    # a segmentation path one voxel off is what it is; its overlaps with the other organs are
    # those of the moved planning contours: the prostate's voxels of the vesicles are kept
    sv = outs["segmentation"]["SeminalVesicles"].array > 0
    prostate = outs["segmentation"]["Prostate"].array > 0
    assert (sv & prostate).any()
    # without the correction the bias moves the contours
    backend = BiasedBackend({"path_choice": dict.fromkeys(organs, "registration")})
    res = recontour(
        plan / "ct",
        plan / "rtstruct.dcm",
        plan / "ct",
        tmp_path / "off",
        # (the instance optimisation would undo the bias on a pair of identical scans)
        RecontourOptions(device="cpu", null_correction=False, refine="off"),
        backend=backend,
    )
    assert backend.calls == [False]
    qa = json.loads(res.qa.read_text())
    assert qa["network"]["null_correction"] == {"applied": False}
    off = rtstruct_to_masks(read_rtstruct(res.rtstruct), series)
    assert dice(before["Prostate"].array > 0, off["Prostate"].array > 0) < 0.99


@pytest.mark.integration
def test_a_second_fraction_reuses_the_planning_null_pass(tmp_path: Path) -> None:
    """With a model digest the planning null field is kept: fraction 2 runs the pair alone.

    Two cascaded passes: the second subtracts the carried null field moved with the content,
    with no null pass of its own. The carried correction gives the contours of the per-pair
    null pass (the fake's bias is the same wherever the body is).
    """
    patient = generate_patient(6, matrix=128, slice_thickness=3.0)
    case = tmp_path / "case"
    write_patient(patient, case)
    for k in (1, 2):
        write_fraction(generate_fraction(patient, k), case / f"fraction_{k}")
    organs = ("prostate", "seminal_vesicles", "rectum", "bladder")
    meta = {"sha256": "fake-digest", "path_choice": dict.fromkeys(organs, "registration")}
    backend = BiasedBackend(meta)
    opts = RecontourOptions(device="cpu", network_passes=2, cache_dir=tmp_path / "cache")
    runs = []
    for k in (1, 2):
        backend.calls.clear()
        res = recontour(
            case / "planning" / "ct",
            case / "planning" / "rtstruct.dcm",
            case / f"fraction_{k}" / "ct",
            tmp_path / f"f{k}",
            opts,
            backend=backend,
        )
        runs.append((list(backend.calls), json.loads(res.qa.read_text()), res))
    assert runs[0][0] == [True, False, False]  # planning null, pair, second pass
    assert runs[1][0] == [False, False]  # the pair and the second pass only
    assert runs[0][1]["network"]["null_correction"]["cached"] is False
    assert runs[1][1]["network"]["null_correction"]["cached"] is True
    assert len(list((tmp_path / "cache" / "null-fields").glob("*.npy"))) == 1
    exact = recontour(
        case / "planning" / "ct",
        case / "planning" / "rtstruct.dcm",
        case / "fraction_2" / "ct",
        tmp_path / "exact",
        RecontourOptions(device="cpu", network_passes=2, null_pass="pair", cache_dir=None),
        backend=BiasedBackend(meta),
    )
    series = read_ct_series(case / "fraction_2" / "ct")
    carried = rtstruct_to_masks(read_rtstruct(runs[1][2].rtstruct), series)
    per_pair = rtstruct_to_masks(read_rtstruct(exact.rtstruct), series)
    for name in ("Prostate", "Bladder", "Rectum"):
        assert dice(carried[name].array > 0, per_pair[name].array > 0) >= 0.98, name
