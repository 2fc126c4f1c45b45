"""The prostate-centred pre-alignment (`jrs.registration.focus`) against analytic cases."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk

import jrs.registration.focus as fp
from jrs.core.errors import InvalidInput
from jrs.core.geometry import Volume
from jrs.core.labels import PROSTATE, SEMINAL_VESICLES
from jrs.registration.prealign import AffineResult, affine_prealign
from jrs.synth import generate_patient

#: the prostate's own motion in the analytic case, mm (LPS)
PROSTATE_SHIFT = np.array([0.0, 4.0, -3.0])


@pytest.fixture(scope="module")
def local_motion() -> dict[str, Any]:
    """A planning phantom and a daily scan where only the prostate's neighbourhood moved.

    The pull field is ``PROSTATE_SHIFT`` within 50 mm of the prostate's centre and falls
    smoothly to zero at 100 mm: the body outline, the hips and most of the bladder do not move,
    so a whole-body match stays near the identity while the prostate is 5 mm off.
    """
    patient = generate_patient(3, matrix=128)
    g = patient.ct.geometry
    centres = g.voxel_centres()
    prostate = patient.labels.array == PROSTATE
    centre = centres[prostate].mean(axis=0)
    r = np.linalg.norm(centres - centre, axis=-1)
    w = np.clip((100.0 - r) / 50.0, 0.0, 1.0)
    w = w * w * (3.0 - 2.0 * w)
    field = sitk.GetImageFromArray((w[..., None] * PROSTATE_SHIFT).astype(np.float64), True)
    field.CopyInformation(patient.ct.to_sitk())
    pull = sitk.DisplacementFieldTransform(field)
    daily = patient.ct.resample(g, "linear", -1000.0, transform=pull)
    region = fp.focus_region(patient.labels)
    assert region is not None
    return {
        "planning": patient.ct,
        "daily": daily,
        "labels": patient.labels,
        "region": region,
        "points": centres[prostate][::10],
        "start": affine_prealign(daily, patient.ct),
    }


def _error_mm(transform: sitk.Transform, points: np.ndarray) -> float:
    mapped = np.array([transform.TransformPoint(tuple(map(float, p))) for p in points])
    return float(np.linalg.norm(mapped - (points + PROSTATE_SHIFT), axis=1).mean())


def test_recovers_the_prostates_own_motion(local_motion: dict[str, Any]) -> None:
    start = local_motion["start"]
    result, report = fp.focus_prealign(
        local_motion["daily"], local_motion["planning"], start, local_motion["region"]
    )
    whole_body = _error_mm(start.transform, local_motion["points"])
    focused = _error_mm(result.transform, local_motion["points"])
    assert whole_body > 3.0  # the whole-body match leaves the prostate where it was
    assert focused < 1.0, (whole_body, focused)
    assert report.accepted and report.reason == ""
    assert report.shift_mm == pytest.approx(np.linalg.norm(PROSTATE_SHIFT), abs=1.5)
    assert report.voxels > 100
    assert "focus" in result.seconds and set(start.seconds) <= set(result.seconds)
    m = np.asarray(result.transform.GetMatrix()).reshape(3, 3)
    np.testing.assert_allclose(m.T @ m, np.eye(3), atol=1e-9)  # rigid


def test_same_scan_twice_is_the_identity(local_motion: dict[str, Any]) -> None:
    planning = local_motion["planning"]
    start = affine_prealign(planning, planning, stages="rigid")
    result, report = fp.focus_prealign(planning, planning, start, local_motion["region"])
    corners = planning.geometry.corners()
    mapped = np.array([result.transform.TransformPoint(tuple(map(float, p))) for p in corners])
    np.testing.assert_allclose(mapped, corners, atol=0.05)
    assert report.accepted and report.shift_mm < 0.05


def test_two_runs_give_identical_transforms(local_motion: dict[str, Any]) -> None:
    args = (
        local_motion["daily"],
        local_motion["planning"],
        local_motion["start"],
        local_motion["region"],
    )
    a, _ = fp.focus_prealign(*args)
    b, _ = fp.focus_prealign(*args)
    assert a.transform.GetParameters() == b.transform.GetParameters()
    assert a.transform.GetFixedParameters() == b.transform.GetFixedParameters()


def test_a_result_far_from_its_start_is_refused(
    local_motion: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # the limits are lowered below the true 5 mm motion: the stage must keep its start
    monkeypatch.setattr(fp, "MAX_FOCUS_SHIFT_MM", 1.0)
    start = local_motion["start"]
    result, report = fp.focus_prealign(
        local_motion["daily"], local_motion["planning"], start, local_motion["region"]
    )
    assert result is start
    assert not report.accepted
    assert "limits 1 mm" in report.reason and report.shift_mm > 3.0
    assert report.as_dict()["accepted"] is False


def test_region_outside_the_daily_scan_keeps_the_start(local_motion: dict[str, Any]) -> None:
    planning = local_motion["planning"]
    start = local_motion["start"]
    # a region beyond the daily CT's field of view, after the whole-body match
    far = planning.geometry.corners().max(axis=0) + 500.0
    shifted = sitk.Euler3DTransform(start.rigid)
    shifted.SetTranslation(tuple(np.asarray(shifted.GetTranslation()) + far))
    moved = AffineResult(transform=start.transform, rigid=shifted, metric=start.metric, seconds={})
    result, report = fp.focus_prealign(
        local_motion["daily"], planning, moved, local_motion["region"]
    )
    assert result is moved and not report.accepted
    assert report.reason == "region outside the daily CT"


def test_empty_region_and_bad_margin_are_refused(local_motion: dict[str, Any]) -> None:
    planning = local_motion["planning"]
    empty = local_motion["region"].with_array(np.zeros(planning.geometry.shape, np.uint8))
    with pytest.raises(InvalidInput, match="--prealign affine"):
        fp.focus_prealign(local_motion["daily"], planning, local_motion["start"], empty)
    with pytest.raises(InvalidInput, match="margin"):
        fp.focus_prealign(
            local_motion["daily"],
            planning,
            local_motion["start"],
            local_motion["region"],
            margin_mm=-1.0,
        )


def test_focus_region_is_the_union_of_prostate_and_seminal_vesicles(
    local_motion: dict[str, Any],
) -> None:
    labels: Volume = local_motion["labels"]
    region = fp.focus_region(labels)
    assert region is not None
    expected = np.isin(labels.array, [PROSTATE, SEMINAL_VESICLES])
    np.testing.assert_array_equal(region.array.astype(bool), expected)
    assert region.geometry.same_grid(labels.geometry)
    assert fp.focus_region(labels.with_array(np.zeros(labels.geometry.shape, np.uint8))) is None


def test_modes_are_checked() -> None:
    assert fp.check_prealign_mode("prostate") == "prostate"
    assert fp.check_prealign_mode("affine") == "affine"
    assert fp.DEFAULT_PREALIGN == "prostate"
    with pytest.raises(InvalidInput, match="prostate, affine|affine, prostate"):
        fp.check_prealign_mode("elastic")


def test_prealign_pair_follows_the_mode(local_motion: dict[str, Any]) -> None:
    daily, planning, labels = (
        local_motion["daily"],
        local_motion["planning"],
        local_motion["labels"],
    )
    start = local_motion["start"]
    kept, report = fp.prealign_pair(daily, planning, labels, "affine", start=start)
    assert kept is start and report is None
    no_target = labels.with_array(
        np.where(np.isin(labels.array, [PROSTATE, SEMINAL_VESICLES]), 0, labels.array)
    )
    kept, report = fp.prealign_pair(daily, planning, no_target, "prostate", start=start)
    assert kept is start and report is None
    focused, report = fp.prealign_pair(daily, planning, labels, "prostate", start=start)
    assert report is not None and report.accepted
    assert report.organs == ("prostate", "seminal_vesicles")
    assert _error_mm(focused.transform, local_motion["points"]) < 1.0
    with pytest.raises(InvalidInput, match="unknown"):
        fp.prealign_pair(daily, planning, labels, "bspline", start=start)
