import numpy as np
import pytest
import SimpleITK as sitk

from jrs.core.errors import InvalidInput
from jrs.core.geometry import Geometry, Volume
from jrs.registration.prealign import affine_prealign


def _pelvis_like(g: Geometry, seed: int = 0) -> Volume:
    """An elliptic body with fat, muscle, five bone rods and a bladder-like blob (HU)."""
    rng = np.random.default_rng(seed)
    c = g.voxel_centres()
    x, y, z = c[..., 0], c[..., 1], c[..., 2]
    hu = np.full(g.shape, -1000, np.float32)
    body = (x / 170) ** 2 + (y / 110) ** 2 < 1
    hu[body] = 40
    hu[body & (((x / 150) ** 2 + (y / 95) ** 2) > 1)] = -100
    for cx, cy in [(-60, 10), (60, 10), (0, 60), (-90, -20), (90, -20)]:
        hu[((x - cx) ** 2 + (y - cy) ** 2 + (0.3 * (z - cx / 10)) ** 2) < 20**2] = 700
    hu[(x**2 + (y + 40) ** 2 + (z - 10) ** 2) < 35**2] = 10
    hu += rng.normal(0, 20, hu.shape).astype(np.float32)
    return Volume(hu, g)


@pytest.fixture(scope="module")
def planning() -> Volume:
    return _pelvis_like(Geometry((40, 160, 180), origin=[-200, -150, -60], spacing=[2.2, 2.0, 3.0]))


@pytest.mark.parametrize(
    ("angles_deg", "shift_mm"),
    [((1.5, -2.0, 3.0), (7.0, -5.0, 9.0)), ((-3.0, 2.5, -1.0), (-10.0, 8.0, -6.0))],
)
def test_recovers_known_setup_error(
    planning: Volume, angles_deg: tuple[float, float, float], shift_mm: tuple[float, float, float]
) -> None:
    # daily(p) = planning(T(p)) with T the true pull transform daily -> planning
    true = sitk.Euler3DTransform((0, 0, 0), *np.deg2rad(angles_deg), shift_mm)
    daily = planning.resample(planning.geometry, "linear", -1000, transform=true)
    result = affine_prealign(daily, planning)
    body_pts = planning.geometry.voxel_centres()[planning.array > -400][::200]
    truth = np.array([true.TransformPoint(tuple(map(float, p))) for p in body_pts])
    err = np.linalg.norm(result.map_points(body_pts) - truth, axis=1)
    assert err.mean() < 1.0
    rigid_err = np.linalg.norm(
        np.array([result.rigid.TransformPoint(tuple(map(float, p))) for p in body_pts]) - truth,
        axis=1,
    )
    assert rigid_err.mean() < 1.0
    assert set(result.seconds) == {"prepare", "rigid", "affine", "total"}


def test_identity_when_scans_are_equal(planning: Volume) -> None:
    result = affine_prealign(planning, planning, stages="rigid")
    pts = planning.geometry.corners()
    np.testing.assert_allclose(result.map_points(pts), pts, atol=0.5)
    assert "affine" not in result.seconds


def test_refuses_images_without_a_body(planning: Volume) -> None:
    empty = planning.with_array(np.full(planning.geometry.shape, -1000, np.float32))
    with pytest.raises(InvalidInput, match="no body"):
        affine_prealign(empty, planning)


@pytest.mark.parametrize(("metric", "max_mean_error_mm"), [("mattes", 1.0), ("ncc", 2.5)])
def test_bspline_recovers_a_known_smooth_deformation(metric: str, max_mean_error_mm: float) -> None:
    """Iterative baseline on a textured volume moved by a known 6 mm Gaussian bump (pull field).

    Mutual information recovers it to < 1 mm mean where the truth moves more than 2 mm (3.5 mm
    mean there); the neighbourhood correlation metric at least shrinks the error clearly.
    """
    from scipy.ndimage import gaussian_filter

    from jrs.core.fields import warp
    from jrs.registration.iterative import bspline_register

    g = Geometry((24, 48, 48), origin=[-94, -94, -46], spacing=[4.0, 4.0, 4.0])
    rng = np.random.default_rng(0)
    texture = gaussian_filter(rng.normal(0, 1, g.shape), 2.0)
    moving = Volume((texture / texture.std() * 300).astype(np.float32), g)
    centres = g.voxel_centres()
    bump = 6.0 * np.exp(-(centres**2).sum(axis=-1) / (2 * 30.0**2))
    u = np.stack([bump, -0.5 * bump, 0.3 * bump], axis=-1).astype(np.float32)
    fixed = warp(moving, Volume(u, g), "linear", 0.0)  # fixed(p) = moving(p + u(p))

    result = bspline_register(
        fixed,
        moving,
        metric=metric,  # type: ignore[arg-type]
        grid_spacing_mm=32.0,
        shrink_factors=(2, 1),
        smoothing_mm=(4.0, 0.0),
        sampling=0.3,
        iterations=100,
    )
    moved = np.linalg.norm(u, axis=-1) > 2.0
    pts, truth = centres[moved], u[moved]
    mapped = np.array([result.transform.TransformPoint(p.tolist()) for p in pts])
    err = np.linalg.norm(mapped - (pts + truth), axis=1)
    assert np.linalg.norm(truth, axis=1).mean() > 3.0
    assert err.mean() < max_mean_error_mm, (metric, float(err.mean()))


def test_bspline_rejects_unknown_metric_and_level_mismatch() -> None:
    from jrs.registration.iterative import bspline_register

    g = Geometry((8, 16, 16), origin=[0, 0, 0], spacing=[2.0, 2.0, 2.0])
    vol = Volume(np.zeros(g.shape, np.float32), g)
    with pytest.raises(InvalidInput, match="metric 'mi' unknown"):
        bspline_register(vol, vol, metric="mi")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="one entry per level"):
        bspline_register(vol, vol, shrink_factors=(2, 1), smoothing_mm=(1.0,))


# ------------------------------------------------------------------ issue 13: reproducibility
@pytest.fixture(scope="module")
def phantom_pair() -> tuple[Volume, Volume, Volume]:
    """A small synthetic planning scan, a daily fraction of it and its organ labels."""
    from jrs.synth import generate_fraction, generate_patient

    patient = generate_patient(3, matrix=128)
    fraction = generate_fraction(patient, 1)
    return patient.ct, fraction.ct, fraction.labels


def test_seed_zero_is_not_the_wall_clock() -> None:
    from jrs.registration.prealign import itk_seed

    assert sitk.sitkWallClock == 0
    assert [itk_seed(s) for s in (0, 1, 2)] == [1, 2, 3]
    with pytest.raises(InvalidInput, match="seed must be >= 0"):
        itk_seed(-1)


def _params(tx: sitk.Transform) -> np.ndarray:
    return np.asarray(tx.GetParameters(), float)


def test_prealignment_is_reproducible_whatever_the_thread_count(
    phantom_pair: tuple[Volume, Volume, Volume],
) -> None:
    """Two runs (and a run with another global thread count) give bit-identical transforms."""
    planning, daily, _ = phantom_pair
    first = affine_prealign(daily, planning)
    second = affine_prealign(daily, planning)
    np.testing.assert_array_equal(_params(first.transform), _params(second.transform))
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    try:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(4, before * 2))
        third = affine_prealign(daily, planning)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)
    np.testing.assert_array_equal(_params(first.transform), _params(third.transform))
    with pytest.raises(InvalidInput, match="threads must be >= 1"):
        affine_prealign(daily, planning, threads=0)


def test_bspline_is_reproducible(phantom_pair: tuple[Volume, Volume, Volume]) -> None:
    """Mattes mutual information on several threads adds up in a varying order: not here."""
    from jrs.inference.preprocess import mask_box, prepare_pair
    from jrs.registration.iterative import bspline_register

    planning, daily, labels = phantom_pair
    box = mask_box(labels.array == 4, daily.geometry, 15.0)  # around the prostate
    pair = prepare_pair(
        daily,
        planning,
        planning.with_array(np.zeros(planning.geometry.shape, np.uint8)),
        box=box,
        spacing=2.0,
    )
    fixed, moving = Volume(pair.fixed, pair.grid), Volume(pair.moving, pair.grid)
    kwargs: dict = {"shrink_factors": (2, 1), "smoothing_mm": (2.0, 0.0), "iterations": 15}
    runs = [bspline_register(fixed, moving, **kwargs) for _ in range(2)]
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    try:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(4, before * 2))
        runs.append(bspline_register(fixed, moving, **kwargs))
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)
    last = [r.transform.GetNthTransform(r.transform.GetNumberOfTransforms() - 1) for r in runs]
    assert np.abs(_params(last[0])).max() > 0  # it did move
    for other in last[1:]:
        np.testing.assert_array_equal(_params(last[0]), _params(other))
