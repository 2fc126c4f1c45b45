"""`jrs.qa.contour_fit`: a contour on its organ fits the daily CT's edges best; one drawn off does not."""

import numpy as np
import pytest

from jrs.core.geometry import Geometry
from jrs.qa.contour_fit import contour_fit, fit_shifts_mm


def _scene(
    direction: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """An ellipsoidal organ (40 HU) in fat (-80 HU) with CT noise, bone to one side; 1 x 1 x 2 mm."""
    shape = (50, 100, 110)  # z, y, x
    kw = {} if direction is None else {"direction": direction}
    grid = Geometry(shape=shape, origin=np.zeros(3), spacing=np.array([1.0, 1.0, 2.0]), **kw)
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]].astype(float)
    organ = ((z - 25) * 2.0) ** 2 / 16**2 + (y - 50) ** 2 / 18**2 + (x - 55) ** 2 / 20**2 <= 1
    rng = np.random.default_rng(4)
    image = np.where(organ, 40.0, -80.0) + rng.normal(0, 15, shape)
    image[:, :, 90:] = 700.0  # a bone edge near the organ
    return image, organ, grid


def test_shift_grid() -> None:
    shifts = fit_shifts_mm((2.0, 4.0))
    assert shifts.shape == (53, 3)
    assert np.allclose(shifts[0], 0.0)
    assert np.allclose(np.linalg.norm(shifts[1:27], axis=1), 2.0)


def test_contour_on_its_organ_fits_best() -> None:
    image, organ, grid = _scene()
    fit = contour_fit(image, organ, grid)
    assert fit["image_fit_gain"] == pytest.approx(0.0, abs=0.05)
    assert fit["image_fit_edge"] > 10.0  # HU/mm: a 120 HU step smoothed over ~1.5 mm
    assert fit["surface_samples"] >= 32


@pytest.mark.parametrize("axis,voxels,mm", [(2, 4, 4.0), (2, -6, 6.0), (0, 3, 6.0)])
def test_contour_drawn_off_its_organ_fits_better_moved_back(
    axis: int, voxels: int, mm: float
) -> None:
    """The best translation points back to the organ (LPS, mm), and the gain grows with the error."""
    image, organ, grid = _scene()
    off = np.roll(organ, voxels, axis=axis)
    fit = contour_fit(image, off, grid)
    assert fit["image_fit_gain"] > 0.1 * mm
    back = np.zeros(3)
    back[2 - axis] = -np.sign(voxels) * mm  # (x, y, z) of the index axis moved
    assert np.allclose(fit["image_fit_shift_xyz_mm"], back, atol=0.01)
    assert fit["image_fit_shift_mm"] == pytest.approx(mm)
    small = contour_fit(image, np.roll(organ, int(np.sign(voxels)), axis=axis), grid)
    assert small["image_fit_gain"] < fit["image_fit_gain"]


def test_best_shift_is_in_patient_coordinates() -> None:
    """With a flipped x axis, a shift along +i is -x in LPS."""
    direction = np.diag([-1.0, 1.0, 1.0])
    image, organ, grid = _scene(direction)
    fit = contour_fit(image, np.roll(organ, 4, axis=2), grid)
    assert np.allclose(fit["image_fit_shift_xyz_mm"], [4.0, 0.0, 0.0], atol=0.01)


def test_no_figure_without_a_contour_or_an_edge() -> None:
    image, organ, grid = _scene()
    empty = contour_fit(image, np.zeros_like(organ), grid)
    assert empty["image_fit_gain"] is None and empty["surface_samples"] == 0
    flat = contour_fit(np.zeros_like(image), organ, grid)
    assert flat["image_fit_gain"] is None
    # normalised units: the same figures with hu_per_unit
    scaled = contour_fit(image / 1000.0, organ, grid, hu_per_unit=1000.0)
    assert scaled["image_fit_edge"] == pytest.approx(
        contour_fit(image, organ, grid)["image_fit_edge"], rel=1e-3
    )
