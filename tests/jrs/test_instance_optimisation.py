"""Instance optimisation (`jrs.registration.instance_optimisation`) on analytic pairs."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from scipy import ndimage

from jrs.core.errors import InvalidInput
from jrs.core.geometry import Geometry
from jrs.core.metrics import dice
from jrs.registration.instance_optimisation import RefineSettings, check_refine_mode, refine_field

GRID = Geometry((64, 64, 64), np.array([-48.0, -48.0, -48.0]), np.array([1.5, 1.5, 1.5]))
#: fast settings for the tests (the shapes are smooth and the grid small)
FAST = RefineSettings(
    grid_mm=24.0, shrink_factors=(2, 1), smoothing_mm=(1.5, 0.0), iterations=15, sampling=0.05
)


def _ball(radius_mm: float, centre: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> Any:
    pts = GRID.voxel_centres()
    return np.linalg.norm(pts - np.asarray(centre), axis=-1) <= radius_mm


def _image(organ: np.ndarray) -> np.ndarray:
    """A smooth textured body with a bright organ, normalised intensities, float32."""
    rng = np.random.default_rng(0)
    texture = ndimage.gaussian_filter(rng.normal(size=GRID.shape), 3.0) * 2.0
    body = np.where(_ball(45.0), 0.05 + 0.05 * texture, -1.0)
    img = np.where(organ, 0.35, body)
    return ndimage.gaussian_filter(img, 0.7).astype(np.float32)


def _warp_mask(mask: np.ndarray, dvf: np.ndarray) -> np.ndarray:
    idx = np.indices(GRID.shape).astype(np.float64)
    # LPS (x, y, z) components on an identity-direction grid -> (z, y, x) index steps
    coords = [idx[a] + dvf[..., 2 - a] / GRID.spacing[2 - a] for a in range(3)]
    return ndimage.map_coordinates(mask.astype(np.float32), coords, order=1) >= 0.5


@pytest.fixture(scope="module")
def grown() -> dict[str, Any]:
    """Planning: a ball of 16 mm; daily: 20 mm (a filled bladder); the network moved nothing."""
    planning, daily = _ball(16.0), _ball(20.0)
    return {
        "planning": planning,
        "daily": daily,
        "fixed": _image(daily),
        "moving": _image(planning),
        "body": _ball(45.0).astype(np.uint8),
    }


def test_refinement_recovers_an_under_registered_organ(grown: dict[str, Any]) -> None:
    zero = np.zeros((*GRID.shape, 3), np.float32)
    organs = {"bladder": grown["planning"]}
    field, report = refine_field(
        grown["fixed"], grown["moving"], zero, GRID, grown["body"], organs, FAST
    )
    assert report.applied
    assert report.organs["bladder"]["kept"]
    assert report.organs["bladder"]["ncc_refined"] > report.organs["bladder"]["ncc_network"]
    before = dice(grown["planning"], grown["daily"])
    after = dice(_warp_mask(grown["planning"], field), grown["daily"])
    assert after > before + 0.05, (before, after)
    assert report.organs["bladder"]["surface_shift_mm"] > 1.0


def test_refinement_is_deterministic(grown: dict[str, Any]) -> None:
    zero = np.zeros((*GRID.shape, 3), np.float32)
    organs = {"bladder": grown["planning"]}
    a, _ = refine_field(grown["fixed"], grown["moving"], zero, GRID, grown["body"], organs, FAST)
    b, _ = refine_field(grown["fixed"], grown["moving"], zero, GRID, grown["body"], organs, FAST)
    np.testing.assert_array_equal(a, b)


def test_an_organ_the_refinement_does_not_improve_keeps_the_networks_field(
    grown: dict[str, Any],
) -> None:
    """A refused organ keeps the input field on and around it (the gate's weight is 0 there)."""
    # a minimum gain no refinement reaches: every organ is refused
    strict = RefineSettings(**{**FAST.__dict__, "min_gain": 1.0})
    shift = np.zeros((*GRID.shape, 3), np.float32)
    shift[..., 0] = 0.7
    organ = _ball(5.0, (0.0, 0.0, -35.0))  # a small organ 15 mm below the growing ball
    field, report = refine_field(
        grown["fixed"], grown["moving"], shift, GRID, grown["body"], {"prostate": organ}, strict
    )
    assert not report.organs["prostate"]["kept"]
    np.testing.assert_allclose(field[organ], shift[organ], atol=5e-3)  # mm
    assert report.organs["prostate"]["surface_shift_mm"] < 5e-3
    # ... while away from it the refinement is kept (it moves the growing ball's wall)
    away = ~ndimage.binary_dilation(organ, iterations=12)
    assert float(np.abs(field - shift)[away].max()) > 0.5


def test_identical_images_are_not_refined() -> None:
    img = _image(_ball(16.0))
    zero = np.zeros((*GRID.shape, 3), np.float32)
    field, report = refine_field(img, img, zero, GRID, np.ones(GRID.shape, np.uint8), {}, FAST)
    assert not report.applied
    assert report.reason
    assert not np.any(field)


def test_mismatched_shapes_are_refused() -> None:
    img = np.zeros(GRID.shape, np.float32)
    with pytest.raises(InvalidInput, match="one grid"):
        refine_field(img, img, np.zeros((4, 4, 4, 3), np.float32), GRID, img.astype(np.uint8), {})


def test_refine_mode() -> None:
    assert check_refine_mode("on") == "on"
    with pytest.raises(InvalidInput, match="on, off"):
        check_refine_mode("always")
