"""`jrs.qa.residual_shift`: how far the mapped planning CT is off the daily CT around a contour."""

import numpy as np
import pytest
from scipy import ndimage

from jrs.core.geometry import Geometry
from jrs.qa.residual_shift import residual_shift


def _scene(
    direction: np.ndarray | None = None, seed: int = 4
) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """A femoral-head-like ball of bone (cortex 900 HU, marrow 250 HU) in muscle (40 HU), with
    fat planes and CT noise; 1 x 1 x 2 mm voxels."""
    shape = (40, 90, 90)  # z, y, x
    kw = {} if direction is None else {"direction": direction}
    grid = Geometry(shape=shape, origin=np.zeros(3), spacing=np.array([1.0, 1.0, 2.0]), **kw)
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]].astype(float)
    r = np.sqrt(((z - 20) * 2.0) ** 2 + (y - 45) ** 2 + (x - 45) ** 2)
    ball = r <= 18
    image = np.where(ball, np.where(r > 15, 900.0, 250.0), 40.0)
    image[(np.abs(y - 70) < 2) | (np.abs(x - 20) < 2)] = -100.0  # fat planes around it
    image += np.random.default_rng(seed).normal(0, 12, shape)
    return image, ball, grid


def _noisy(image: np.ndarray, seed: int) -> np.ndarray:
    """The same anatomy with its own CT noise (a second scan)."""
    return image + np.random.default_rng(seed).normal(0, 12, image.shape)


def test_the_same_scan_twice_has_no_residual() -> None:
    image, ball, grid = _scene()
    fig = residual_shift(image, image.copy(), ball, grid)
    assert fig["residual_shift_mm"] == 0.0
    assert fig["residual_shift_xyz_mm"] == [0.0, 0.0, 0.0]
    assert fig["residual_ncc"] == pytest.approx(1.0, abs=1e-4)
    assert fig["residual_ncc_gain"] == 0.0


@pytest.mark.parametrize(
    "axis,voxels,xyz",
    [(2, 3, [3.0, 0.0, 0.0]), (1, -4, [0.0, -4.0, 0.0]), (0, 2, [0.0, 0.0, 4.0])],
)
def test_a_mapping_off_by_a_few_mm_is_measured_in_patient_coordinates(
    axis: int, voxels: int, xyz: list[float]
) -> None:
    """Mapped planning anatomy lying +t from the daily anatomy gives +t (LPS, mm), with its own
    noise in each scan."""
    image, ball, grid = _scene()
    mapped = np.roll(_noisy(image, 9), voxels, axis=axis)
    fig = residual_shift(_noisy(image, 8), mapped, ball, grid)
    assert np.allclose(fig["residual_shift_xyz_mm"], xyz, atol=0.5)
    assert fig["residual_shift_mm"] == pytest.approx(np.linalg.norm(xyz), abs=0.5)
    assert fig["residual_ncc_gain"] > 0.1


def test_sub_voxel_and_oblique_residuals() -> None:
    image, ball, grid = _scene()
    mapped = ndimage.shift(image, (0.0, 1.5, -2.5), order=1, mode="nearest")  # y +1.5, x -2.5 mm
    fig = residual_shift(image, mapped, ball, grid)
    assert np.allclose(fig["residual_shift_xyz_mm"], [-2.5, 1.5, 0.0], atol=0.5)


def test_a_flipped_axis_gives_the_lps_sign() -> None:
    """With the x axis flipped, anatomy lying +3 voxels along i is at -3 mm in LPS x."""
    direction = np.diag([-1.0, 1.0, 1.0])
    image, ball, grid = _scene(direction)
    fig = residual_shift(image, np.roll(image, 3, axis=2), ball, grid)
    assert np.allclose(fig["residual_shift_xyz_mm"], [-3.0, 0.0, 0.0], atol=0.01)


def test_normalised_units_give_the_same_figures() -> None:
    image, ball, grid = _scene()
    mapped = np.roll(image, 3, axis=2)
    hu = residual_shift(image, mapped, ball, grid)
    units = residual_shift(image / 1000.0, mapped / 1000.0, ball, grid, hu_per_unit=1000.0)
    assert units["residual_shift_xyz_mm"] == hu["residual_shift_xyz_mm"]
    assert units["residual_ncc"] == pytest.approx(hu["residual_ncc"], abs=1e-3)


def test_no_figure_without_a_contour_or_structure() -> None:
    image, ball, grid = _scene()
    empty = residual_shift(image, image, np.zeros_like(ball), grid)
    assert empty["residual_shift_mm"] is None
    flat = np.full_like(image, 40.0)
    assert residual_shift(flat, flat, ball, grid)["residual_shift_mm"] is None
    tiny = np.zeros_like(ball)
    tiny[20, 45, 45] = True  # a band of a handful of samples
    assert residual_shift(image, image, tiny, grid)["residual_shift_mm"] is None


def test_the_search_is_deterministic() -> None:
    image, ball, grid = _scene()
    mapped = np.roll(_noisy(image, 3), 2, axis=1)
    assert residual_shift(image, mapped, ball, grid) == residual_shift(image, mapped, ball, grid)
