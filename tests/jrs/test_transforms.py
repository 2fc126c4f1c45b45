import numpy as np
import pytest
import SimpleITK as sitk

from jrs.core.errors import GeometryMismatch, InvalidInput
from jrs.core.fields import (
    affine_to_dvf,
    compose,
    dvf_to_sitk,
    jacobian_determinant,
    require_dvf_on,
    sample_dvf,
    warp,
    warp_mask,
)
from jrs.core.geometry import PATIENT_POSITION_DIRECTIONS, Geometry, Volume, reorient
from jrs.core.metrics import centroid_mm, dice


@pytest.fixture
def grid() -> Geometry:
    return Geometry((30, 40, 44), origin=[-30.0, -25.0, -40.0], spacing=[1.5, 1.25, 2.5])


def _sphere(g: Geometry, centre: np.ndarray, radius: float) -> Volume:
    pts = g.voxel_centres()
    return Volume(np.linalg.norm(pts - centre, axis=-1) <= radius, g)


def _constant_dvf(g: Geometry, t: list[float]) -> Volume:
    return Volume(np.broadcast_to(np.asarray(t, np.float32), (*g.shape, 3)).copy(), g)


def test_pull_convention_matches_simpleitk_resample(grid: Geometry) -> None:
    """Resample with dvf_to_sitk samples moving(p + u(p))."""
    rng = np.random.default_rng(0)
    u = Volume(rng.normal(0, 2, (*grid.shape, 3)).astype(np.float32), grid)
    tx = dvf_to_sitk(u)
    pts = grid.index_to_physical(rng.integers(0, 25, size=(20, 3)))
    for p in pts:
        idx = np.round(grid.physical_to_index(p)).astype(int)
        expected = p + u.array[idx[2], idx[1], idx[0]]
        np.testing.assert_allclose(tx.TransformPoint(tuple(p)), expected, atol=1e-4)


def test_sphere_shifted_by_translation_field_lands_where_expected(grid: Geometry) -> None:
    centre = np.array([0.0, 0.0, -5.0])
    t = np.array([3.3, -2.1, 4.2])
    dvf = _constant_dvf(grid, t.tolist())
    # pull: daily p shows planning p + t, so the object appears at centre - t
    pts = grid.voxel_centres()
    blob = Volume(np.exp(-np.sum((pts - centre) ** 2, axis=-1) / (2 * 5.0**2)), grid)
    moved = warp(blob, dvf, "linear", 0.0).array.astype(np.float64)
    found = (moved[..., None] * pts).sum(axis=(0, 1, 2)) / moved.sum()
    assert np.linalg.norm(found - (centre - t)) < 0.1
    # the binary sphere lands on the analytic one (up to voxelisation)
    sphere = _sphere(grid, centre, 10.0)
    moved_mask = warp_mask(sphere, dvf)
    assert moved_mask.array.dtype == bool
    assert dice(moved_mask.array, _sphere(grid, centre - t, 10.0).array) > 0.92  # 2.5 mm slices
    assert np.linalg.norm(centroid_mm(moved_mask.array, grid) - (centre - t)) < 1.0
    # 'label' interpolation agrees with the mask warp
    labels = sphere.with_array(sphere.array.astype(np.uint8) * 4)
    warped_labels = warp(labels, dvf, "label", 0)
    np.testing.assert_array_equal(warped_labels.array == 4, moved_mask.array)


def test_euler_transform_as_dvf_matches_sitk_transform(grid: Geometry) -> None:
    tx = sitk.Euler3DTransform((1.0, -2.0, 3.0), 0.03, -0.02, 0.05, (2.0, -1.5, 4.0))
    dvf = affine_to_dvf(tx, grid)
    assert dvf.array.shape == (*grid.shape, 3) and dvf.array.dtype == np.float32
    rng = np.random.default_rng(3)
    lo, hi = grid.origin, grid.origin + grid.extent_mm
    pts = rng.uniform(lo + 1, hi - 1, size=(100, 3))
    expected = np.array([tx.TransformPoint(tuple(p)) for p in pts]) - pts
    np.testing.assert_allclose(sample_dvf(dvf, pts), expected, atol=1e-3)


@pytest.mark.parametrize("position", ["HFS", "HFP", "FFS", "FFP"])
def test_jacobian_translation_and_uniform_scaling(grid: Geometry, position: str) -> None:
    direction = PATIENT_POSITION_DIRECTIONS[position]
    trans = reorient(_constant_dvf(grid, [5.0, -3.0, 2.0]), direction)
    np.testing.assert_allclose(jacobian_determinant(trans), 1.0, atol=1e-5)
    scale = 1.1
    tx = sitk.ScaleTransform(3, (scale, scale, scale))
    tx.SetCenter((1.0, 2.0, 3.0))
    field = reorient(affine_to_dvf(tx, grid), direction)
    det = jacobian_determinant(field)
    assert det.shape == field.geometry.shape
    np.testing.assert_allclose(det[1:-1, 1:-1, 1:-1], scale**3, rtol=1e-4)
    # anisotropic scaling distinguishes the axes
    tx2 = sitk.ScaleTransform(3, (1.2, 0.9, 1.0))
    det2 = jacobian_determinant(reorient(affine_to_dvf(tx2, grid), direction))
    np.testing.assert_allclose(det2[1:-1, 1:-1, 1:-1], 1.08, rtol=1e-4)


def test_jacobian_oblique_grid_numpy_fallback() -> None:
    t = np.deg2rad(20)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1.0]])
    g = Geometry((10, 12, 14), origin=[0, 0, 0], spacing=[1.0, 1.5, 2.0], direction=rot)
    tx = sitk.ScaleTransform(3, (1.2, 0.9, 1.0))
    det = jacobian_determinant(affine_to_dvf(tx, g))
    np.testing.assert_allclose(det, 1.08, rtol=1e-4)


def test_compose_translations_and_rotation(grid: Geometry) -> None:
    a = _constant_dvf(grid, [1.0, 2.0, 3.0])
    b = _constant_dvf(grid, [-4.0, 0.5, 1.0])
    inner = compose(a, b).array[5:-5, 5:-5, 5:-5]
    np.testing.assert_allclose(inner, np.broadcast_to([-3.0, 2.5, 4.0], inner.shape), atol=1e-5)
    r = sitk.Euler3DTransform((0.0, 0.0, -5.0), 0.0, 0.0, 0.04, (0.0, 0.0, 0.0))
    rot = affine_to_dvf(r, grid)
    composed = compose(rot, a)  # p -> R(p) -> R(p) + t
    pts = np.array([[0.0, 0.0, -5.0], [5.0, -3.0, 0.0], [-7.0, 4.0, 10.0]])
    moved = np.array([r.TransformPoint(tuple(p)) for p in pts])
    expected = moved + np.array([1.0, 2.0, 3.0]) - pts
    np.testing.assert_allclose(sample_dvf(composed, pts), expected, atol=1e-3)


def test_errors_name_the_shape(grid: Geometry) -> None:
    with pytest.raises(InvalidInput, match=r"\(nz, ny, nx, 3\)"):
        dvf_to_sitk(Volume(np.zeros(grid.shape, np.float32), grid))
    other = Geometry((3, 3, 3), origin=[0, 0, 0], spacing=[1, 1, 1])
    with pytest.raises(GeometryMismatch, match="not on the expected grid"):
        require_dvf_on(_constant_dvf(grid, [0, 0, 0]), other)
