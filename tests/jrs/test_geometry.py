import numpy as np
import pytest
import SimpleITK as sitk

from jrs.core.errors import GeometryMismatch, InvalidInput
from jrs.core.geometry import PATIENT_POSITION_DIRECTIONS, Geometry, Volume, reorient


def _rot(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1.0]])


@pytest.fixture
def grid() -> Geometry:
    return Geometry((6, 7, 8), origin=[-10.0, 20.0, 5.5], spacing=[0.8, 0.9, 2.5])


def test_index_physical_round_trip_oblique() -> None:
    g = Geometry((5, 6, 7), origin=[1, 2, 3], spacing=[0.7, 1.1, 3.0], direction=_rot(17))
    idx = np.random.default_rng(0).uniform(0, 5, size=(50, 3))
    pts = g.index_to_physical(idx)
    np.testing.assert_allclose(g.physical_to_index(pts), idx, atol=1e-9)
    # index (1, 0, 0) is one x-spacing along the first direction column
    np.testing.assert_allclose(g.index_to_physical([1, 0, 0]) - g.origin, 0.7 * _rot(17)[:, 0])


def test_geometry_matches_simpleitk_convention(grid: Geometry) -> None:
    image = sitk.Image(list(grid.size_xyz), sitk.sitkFloat32)
    grid.apply_to_sitk(image)
    image.SetDirection(tuple(_rot(30).reshape(-1)))
    g = Geometry.from_sitk(image)
    for idx in [(0, 0, 0), (3, 2, 1), (7, 6, 5)]:
        np.testing.assert_allclose(
            g.index_to_physical(idx), image.TransformContinuousIndexToPhysicalPoint(idx)
        )
    np.testing.assert_allclose(g.affine[:3, 3], g.origin)


def test_volume_sitk_round_trip_scalar_and_vector(grid: Geometry) -> None:
    arr = np.random.default_rng(1).normal(size=grid.shape).astype(np.float32)
    vol = Volume(arr, grid.with_frame("1.2.3"))
    back = Volume.from_sitk(vol.to_sitk(), "1.2.3")
    np.testing.assert_array_equal(back.array, arr)
    assert back.geometry.same_grid(grid)
    vec = Volume(np.stack([arr, 2 * arr, 3 * arr], axis=-1), grid)
    img = vec.to_sitk()
    assert img.GetNumberOfComponentsPerPixel() == 3
    np.testing.assert_array_equal(Volume.from_sitk(img).array[..., 2], 3 * arr)


def test_invalid_geometry_messages() -> None:
    with pytest.raises(InvalidInput, match="spacing must be positive"):
        Geometry((2, 2, 2), origin=[0, 0, 0], spacing=[1, 0, 1])
    with pytest.raises(InvalidInput, match="orthonormal"):
        Geometry((2, 2, 2), origin=[0, 0, 0], spacing=[1, 1, 1], direction=np.ones((3, 3)))
    with pytest.raises(GeometryMismatch, match=r"array shape \(2, 2, 3\)"):
        Volume(np.zeros((2, 2, 3)), Geometry((2, 2, 2), origin=[0, 0, 0], spacing=[1, 1, 1]))


@pytest.mark.parametrize("position", sorted(PATIENT_POSITION_DIRECTIONS))
def test_reorient_keeps_every_voxel_in_place(grid: Geometry, position: str) -> None:
    arr = np.random.default_rng(2).normal(size=grid.shape).astype(np.float32)
    vol = Volume(arr, grid)
    out = reorient(vol, PATIENT_POSITION_DIRECTIONS[position])
    np.testing.assert_array_equal(out.geometry.direction, PATIENT_POSITION_DIRECTIONS[position])
    assert np.linalg.det(out.geometry.direction) == pytest.approx(1.0)
    # the value found at each LPS point is unchanged
    pts = grid.voxel_centres().reshape(-1, 3)
    idx = np.rint(out.geometry.physical_to_index(pts)).astype(int)
    np.testing.assert_allclose(out.geometry.index_to_physical(idx), pts, atol=1e-9)
    np.testing.assert_array_equal(out.array[idx[:, 2], idx[:, 1], idx[:, 0]], arr.reshape(-1))


def test_reorient_refuses_oblique(grid: Geometry) -> None:
    with pytest.raises(InvalidInput, match="only permutes/flips"):
        reorient(Volume(np.zeros(grid.shape), grid), _rot(10))


def test_resample_linear_reproduces_a_linear_ramp() -> None:
    src = Geometry((20, 20, 20), origin=[0, 0, 0], spacing=[1.0, 1.0, 1.0])
    x = src.voxel_centres()[..., 0]
    ramp = Volume((2.0 * x + 3.0).astype(np.float32), src)
    dst = Geometry((5, 6, 7), origin=[3.3, 4.1, 5.7], spacing=[1.7, 0.6, 2.1], direction=_rot(25))
    out = ramp.resample(dst, "linear")
    expected = 2.0 * dst.voxel_centres()[..., 0] + 3.0
    np.testing.assert_allclose(out.array, expected, atol=1e-3)
    bs = ramp.resample(dst, "bspline")
    np.testing.assert_allclose(bs.array, expected, atol=0.05)  # boundary conditions


def test_resample_outside_takes_default_value() -> None:
    src = Geometry((4, 4, 4), origin=[0, 0, 0], spacing=[1.0, 1.0, 1.0])
    far = Geometry((2, 2, 2), origin=[100, 100, 100], spacing=[1.0, 1.0, 1.0])
    out = Volume(np.zeros(src.shape, np.float32), src).resample(far, default_value=-1000)
    assert np.all(out.array == -1000)


def test_label_resampling_keeps_ids_and_is_smoother_than_nearest() -> None:
    src = Geometry((30, 30, 30), origin=[0, 0, 0], spacing=[1.0, 1.0, 3.0])
    c = src.voxel_centres()
    labels = np.zeros(src.shape, np.uint8)
    labels[np.linalg.norm(c - [15, 15, 45], axis=-1) < 10] = 1
    labels[np.linalg.norm(c - [15, 15, 45], axis=-1) < 4] = 4
    vol = Volume(labels, src)
    fine = src.resampled_grid(1.0)
    out = vol.resample(fine, "label")
    assert out.array.dtype == np.uint8
    assert set(np.unique(out.array)) == {0, 1, 4}
    truth = np.zeros(fine.shape, np.uint8)
    cf = fine.voxel_centres()
    truth[np.linalg.norm(cf - [15, 15, 45], axis=-1) < 10] = 1
    near = vol.resample(fine, "nearest").array
    err_label = np.mean((out.array > 0) != (truth > 0))
    err_near = np.mean((near > 0) != (truth > 0))
    assert err_label <= err_near


def test_resampled_grid_covers_same_box(grid: Geometry) -> None:
    iso = grid.resampled_grid(1.0)
    np.testing.assert_allclose(iso.origin, grid.origin)
    assert iso.spacing.tolist() == [1.0, 1.0, 1.0]
    assert iso.extent_mm.tolist() == pytest.approx(np.floor(grid.extent_mm).tolist())


def test_require_same_grid(grid: Geometry) -> None:
    other = Geometry(grid.shape, origin=grid.origin + np.array([0, 0, 1]), spacing=grid.spacing)
    with pytest.raises(GeometryMismatch, match="origin"):
        grid.require_same_grid(other, "planning and daily")
    grid.require_same_grid(Geometry(grid.shape, grid.origin.copy(), grid.spacing.copy()))
