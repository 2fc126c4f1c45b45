import numpy as np
import pytest
import SimpleITK as sitk

from jrs.core.errors import GeometryMismatch, InvalidInput
from jrs.core.geometry import PATIENT_POSITION_DIRECTIONS, Geometry, Volume, reorient
from jrs.core.metrics import dice
from jrs.inference.preprocess import canonical_grid, mask_box, normalise_hu, prepare_pair
from tests.jrs.test_registration import _pelvis_like


@pytest.fixture(scope="module")
def case() -> tuple[Volume, Volume, Volume, Volume]:
    g = Geometry((40, 160, 180), origin=[-200, -150, -60], spacing=[2.2, 2.0, 3.0])
    planning = _pelvis_like(g)
    c = g.voxel_centres()
    labels = np.zeros(g.shape, np.uint8)
    labels[np.linalg.norm(c - [0, -40, 10], axis=-1) < 35] = 1
    labels[np.linalg.norm(c - [0, 20, 0], axis=-1) < 12] = 2
    planning_labels = Volume(labels, g)
    true = sitk.Euler3DTransform((0, 0, 0), 0.02, -0.03, 0.04, (6.0, -4.0, 8.0))
    daily = planning.resample(g, "linear", -1000, transform=true)
    daily_labels = planning_labels.resample(g, "label", 0, transform=true)
    return daily, planning, planning_labels, daily_labels


def test_normalise_hu() -> None:
    np.testing.assert_allclose(normalise_hu([-3000, -1000, 0, 500, 3000]), [-1, -1, 0, 0.5, 1])


def test_canonical_grid_and_mask_box() -> None:
    g = canonical_grid([-10.4, 3.2, -5.0], [10.0, 8.0, 5.0])
    assert g.direction.tolist() == np.eye(3).tolist()
    assert g.origin.tolist() == [-11.0, 3.0, -5.0]
    assert g.shape == (11, 6, 22)
    with pytest.raises(InvalidInput, match="empty box"):
        canonical_grid([0, 0, 0], [0, 5, 5])
    grid = Geometry((10, 10, 10), origin=[0, 0, 0], spacing=[1, 1, 2])
    m = np.zeros(grid.shape, bool)
    m[2:4, 3:5, 1:2] = True
    lo, hi = mask_box(m, grid, margin_mm=1)
    np.testing.assert_allclose(lo, [0, 2, 3])
    np.testing.assert_allclose(hi, [2, 5, 7])


def test_prepare_pair_aligns_labels(case: tuple[Volume, Volume, Volume, Volume]) -> None:
    daily, planning, planning_labels, daily_labels = case
    pair = prepare_pair(daily, planning, planning_labels, daily_labels=daily_labels)
    assert pair.grid.spacing.tolist() == [1.0, 1.0, 1.0]
    assert pair.fixed.shape == pair.moving.shape == pair.moving_labels.shape == pair.grid.shape
    assert pair.fixed.min() >= -1 and pair.fixed.max() <= 1
    assert pair.fixed_labels is not None
    for lab in (1, 2):
        assert dice(pair.moving_labels == lab, pair.fixed_labels == lab) > 0.9
    # the body fills most of the grid (grid = body box)
    assert pair.body.mean() > 0.5


def test_prepare_pair_is_orientation_independent(
    case: tuple[Volume, Volume, Volume, Volume],
) -> None:
    daily, planning, planning_labels, _ = case
    a = prepare_pair(daily, planning, planning_labels)
    ffs = reorient(daily, PATIENT_POSITION_DIRECTIONS["FFS"])
    b = prepare_pair(ffs, planning, planning_labels, prealign=a.prealign)
    assert a.grid.same_grid(b.grid)
    np.testing.assert_allclose(a.fixed, b.fixed, atol=1e-5)


def test_prepare_pair_refuses_labels_off_grid(
    case: tuple[Volume, Volume, Volume, Volume],
) -> None:
    daily, planning, planning_labels, _ = case
    other = Volume(
        planning_labels.array[:-1],
        Geometry((39, 160, 180), origin=[-200, -150, -60], spacing=[2.2, 2.0, 3.0]),
    )
    with pytest.raises(GeometryMismatch, match="planning CT and labels"):
        prepare_pair(daily, planning, other)
