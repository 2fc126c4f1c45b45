"""The far field (`jrs.registration.far_field`): the bony match and its blend with the network box."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk

from jrs.core.fields import jacobian_determinant
from jrs.core.geometry import Geometry, Volume
from jrs.registration.far_field import (
    BLEND_MM,
    FarField,
    bony_prealign,
    far_field_transform,
)
from jrs.registration.prealign import affine_prealign
from jrs.synth import generate_patient
from jrs.synth.deformation import rotation_matrix


def _rigid(rot_deg: list[float], centre: np.ndarray, t: list[float]) -> sitk.AffineTransform:
    tx = sitk.AffineTransform(3)
    tx.SetCenter(tuple(map(float, centre)))
    tx.SetMatrix(tuple(rotation_matrix(rot_deg).reshape(-1)))
    tx.SetTranslation(tuple(map(float, t)))
    return tx


def _map(tx: sitk.Transform, points: np.ndarray) -> np.ndarray:
    return np.array([tx.TransformPoint(tuple(map(float, p))) for p in points])


@pytest.fixture(scope="module")
def rotated() -> dict[str, Any]:
    """A phantom and a daily scan rotated rigidly by 3 deg about a point 80 mm from the prostate."""
    patient = generate_patient(5, matrix=128)
    g = patient.ct.geometry
    centre = g.index_to_physical((np.asarray(g.size_xyz) - 1) / 2.0) + np.array([0, 0, 80.0])
    setup = _rigid([1.0, -2.0, 3.0], centre, [2.0, -3.0, 1.5])
    daily = patient.ct.resample(g, "linear", -1000.0, transform=setup)
    return {"planning": patient.ct, "daily": daily, "setup": setup}


def test_bony_match_recovers_a_rigid_setup(rotated: dict[str, Any]) -> None:
    start = affine_prealign(rotated["daily"], rotated["planning"], stages="rigid")
    bony, report = bony_prealign(rotated["daily"], rotated["planning"], start)
    assert report.accepted, report.reason
    g = rotated["daily"].geometry
    pts = g.corners()
    err = np.linalg.norm(_map(bony, pts) - _map(rotated["setup"], pts), axis=1)
    assert err.max() < 1.5, err  # at the corners of the whole scan


def test_bony_match_is_deterministic(rotated: dict[str, Any]) -> None:
    start = affine_prealign(rotated["daily"], rotated["planning"], stages="rigid")
    a, _ = bony_prealign(rotated["daily"], rotated["planning"], start)
    b, _ = bony_prealign(rotated["daily"], rotated["planning"], start)
    assert a.GetParameters() == b.GetParameters()


def _field(focus: sitk.AffineTransform, far: sitk.AffineTransform) -> tuple[FarField, Geometry]:
    daily = Geometry((60, 100, 100), np.array([-200.0, -200.0, -150.0]), np.array([4.0, 4.0, 5.0]))
    lower, upper = np.array([-40.0, -40.0, -40.0]), np.array([40.0, 40.0, 40.0])
    return FarField(focus, far, lower, upper, daily), daily


def test_far_field_is_the_focus_on_the_box_and_the_far_match_beyond_the_blend() -> None:
    focus = _rigid([0.0, 0.0, 0.0], np.zeros(3), [1.0, 2.0, 0.0])
    far = _rigid([2.0, -1.0, 3.0], np.array([0.0, 0.0, -50.0]), [0.0, 0.0, 4.0])
    ff, _ = _field(focus, far)
    inside = np.array([[0.0, 0.0, 0.0], [39.0, -39.0, 20.0]])
    assert np.abs(ff.correction(inside)).max() == 0.0
    beyond = np.array([[40.0 + BLEND_MM + 20.0, 0.0, 0.0], [-30.0, 150.0, -120.0]])
    # A_f(p + h(p)) == B(p) far away (h interpolated on a 4 mm grid: the blend is flat there)
    mapped = _map(focus, beyond + ff.correction(beyond))
    np.testing.assert_allclose(mapped, _map(far, beyond), atol=0.05)
    # halfway through the blend, halfway between the two
    mid = np.array([[40.0 + BLEND_MM / 2.0, 0.0, 0.0]])
    halfway = 0.5 * (_map(focus, mid) + _map(far, mid))
    np.testing.assert_allclose(_map(focus, mid + ff.correction(mid)), halfway, atol=0.05)


def test_far_field_does_not_fold_with_a_3_degree_difference() -> None:
    focus = _rigid([0.0, 0.0, 0.0], np.zeros(3), [0.0, 0.0, 0.0])
    far = _rigid([3.0, 3.0, -3.0], np.zeros(3), [5.0, -5.0, 5.0])
    ff, _ = _field(focus, far)
    assert ff.min_det_jacobian() > 0.5
    det = jacobian_determinant(Volume(ff.field, ff.grid))
    assert float(det.min()) > 0.5


def test_identical_matches_give_no_correction() -> None:
    focus = _rigid([1.0, 0.0, 0.0], np.zeros(3), [1.0, 0.0, 0.0])
    ff, _ = _field(focus, focus)
    assert ff.is_identity()
    assert far_field_transform(ff) is None
    assert ff.reach_mm() == 0.0


def test_weight_on_an_aligned_grid_equals_the_pointwise_weight() -> None:
    focus = _rigid([0.0, 0.0, 0.0], np.zeros(3), [0.0, 0.0, 0.0])
    far = _rigid([0.0, 0.0, 1.0], np.zeros(3), [0.0, 0.0, 0.0])
    ff, _ = _field(focus, far)
    grid = Geometry((20, 30, 40), np.array([-100.0, -80.0, -60.0]), np.array([5.0, 4.0, 6.0]))
    np.testing.assert_allclose(ff.weight_on(grid), ff.weight(grid.voxel_centres()), atol=1e-6)
