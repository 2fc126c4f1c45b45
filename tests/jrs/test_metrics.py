import numpy as np
import pytest

from jrs.core.errors import GeometryMismatch
from jrs.core.geometry import Geometry, Volume
from jrs.core.metrics import centroid_mm, dice, mask_metrics, surface_distances, volume_cc

GRID = Geometry((60, 80, 80), origin=[-40.0, -40.0, -60.0], spacing=[1.0, 1.0, 2.0])


def _sphere(centre: tuple[float, float, float], radius: float) -> np.ndarray:
    return np.linalg.norm(GRID.voxel_centres() - np.asarray(centre), axis=-1) <= radius


def test_dice_analytic() -> None:
    a = np.zeros((10, 10, 10), bool)
    b = np.zeros((10, 10, 10), bool)
    a[:5] = True
    b[:5] = True
    assert dice(a, b) == 1.0
    b[:] = False
    b[5:] = True
    assert dice(a, b) == 0.0
    b[:] = False
    b[:, :, :5] = True  # half of a overlaps half of b
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(np.zeros(3), np.zeros(3)) == 1.0
    with pytest.raises(GeometryMismatch, match="shape"):
        dice(a, a[:5])


def test_sphere_shifted_by_known_distance() -> None:
    a = _sphere((0, 0, 0), 15)
    b = _sphere((4, 0, 0), 15)
    np.testing.assert_allclose(centroid_mm(b, GRID) - centroid_mm(a, GRID), [4, 0, 0], atol=0.05)
    sd = surface_distances(a, b, GRID)
    assert sd.hd == pytest.approx(4.0, abs=0.75)
    assert sd.hd95 == pytest.approx(4.0, abs=1.0)
    assert 0.5 < sd.msd < 4.0


def test_concentric_spheres_msd_equals_radius_difference() -> None:
    sd = surface_distances(_sphere((0, 0, 0), 12), _sphere((0, 0, 0), 17), GRID)
    assert sd.msd == pytest.approx(5.0, abs=0.8)
    assert sd.hd95 == pytest.approx(5.0, abs=1.2)


def test_identical_masks_zero_distance_and_empty_is_nan() -> None:
    a = _sphere((0, 5, 0), 10)
    m = mask_metrics(Volume(a.astype(np.uint8), GRID), Volume(a.astype(np.uint8), GRID))
    assert m == {"dsc": 1.0, "msd": 0.0, "hd95": 0.0, "centroid_mm": 0.0}
    assert np.isnan(surface_distances(a, np.zeros_like(a), GRID).msd)
    assert volume_cc(a, GRID) == pytest.approx(4 / 3 * np.pi * 10**3 / 1000, rel=0.05)
