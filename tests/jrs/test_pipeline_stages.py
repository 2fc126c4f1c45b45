"""The pipeline's faster stages give the results of the plain whole-grid computations.

Propagation warps each ROI inside its own bounding box, the organ labels are warped inside their
box, the Jacobian's field is computed directly, and the DVF is written on a coarse grid; each is
checked here against the straightforward computation on whole grids.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from jrs.core.fields import warp
from jrs.core.geometry import PATIENT_POSITION_DIRECTIONS, Geometry, Volume
from jrs.inference.preprocess import canonical_grid
from jrs.registration.boxes import index_box
from jrs.registration.composition import box_field, dense_field, dvf_grid, full_transform, taper
from jrs.registration.propagation import (
    largest_components,
    propagate_mask,
    warp_labels,
    with_overlaps,
)


def _ellipsoid(geometry: Geometry, centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    pts = geometry.voxel_centres()
    return (((pts - centre) / radii) ** 2).sum(axis=-1) <= 1.0


def _affine(angle_deg: float, shift: tuple[float, float, float]) -> sitk.AffineTransform:
    rot = sitk.Euler3DTransform((0.0, 0.0, 0.0), 0.02, -0.03, np.deg2rad(angle_deg), shift)
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(rot.GetMatrix())
    affine.SetTranslation(rot.GetTranslation())
    affine.SetCenter((5.0, -3.0, 2.0))
    return affine


@pytest.fixture(scope="module")
def scene() -> dict[str, object]:
    """Planning and daily grids (the daily stored feet first), an affine, a tapered field."""
    planning = Geometry((40, 70, 80), origin=[-60.0, -50.0, -45.0], spacing=[1.5, 1.5, 2.5])
    daily = Geometry(
        (45, 64, 72),
        origin=[55.0, -52.0, 60.0],
        spacing=[1.6, 1.6, 2.5],
        direction=PATIENT_POSITION_DIRECTIONS["FFS"],
    )
    prealign = _affine(4.0, (3.0, -2.0, 1.5))
    box = canonical_grid([-30.0, -30.0, -25.0], [25.0, 30.0, 30.0], 1.0)
    rng = np.random.default_rng(0)
    # smooth field: a few Gaussian bumps, up to ~6 mm
    pts = box.voxel_centres()
    u = np.zeros((*box.shape, 3), np.float32)
    for _ in range(3):
        c = rng.uniform(-15, 15, 3)
        amp = rng.uniform(-6, 6, 3)
        u += (np.exp(-(((pts - c) / 12.0) ** 2).sum(axis=-1))[..., None] * amp).astype(np.float32)
    u *= taper(box)[..., None]
    field = Volume(u, box)
    return {
        "planning": planning,
        "daily": daily,
        "prealign": prealign,
        "box": box,
        "field": field,
        "full": full_transform(prealign, field),
        "reach": float(np.sqrt((u**2).sum(axis=-1)).max()),
    }


@pytest.mark.parametrize(
    ("centre", "radii"),
    [
        ([0.0, 0.0, 0.0], [12.0, 9.0, 14.0]),  # inside the network box
        ([-35.0, 10.0, -5.0], [8.0, 20.0, 30.0]),  # straddling its face
        ([40.0, 30.0, -40.0], [50.0, 40.0, 10.0]),  # large, mostly outside, clipped by the scan
    ],
)
def test_propagating_inside_the_roi_box_equals_the_whole_grid(
    scene: dict[str, object], centre: list[float], radii: list[float]
) -> None:
    planning: Geometry = scene["planning"]  # type: ignore[assignment]
    daily: Geometry = scene["daily"]  # type: ignore[assignment]
    full: sitk.Transform = scene["full"]  # type: ignore[assignment]
    box: Geometry = scene["box"]  # type: ignore[assignment]
    mask = Volume(_ellipsoid(planning, np.array(centre), np.array(radii)), planning)
    reference = (
        mask.with_array(mask.array.astype(np.float32)).resample(daily, "linear", 0.0, full).array
        >= 0.5
    )
    assert reference.any()

    network_box = index_box(daily, box.corners(), 0.0)
    fast = propagate_mask(
        mask,
        daily,
        scene["prealign"],
        full,
        network_box,
        scene["reach"],  # type: ignore[arg-type]
    )
    np.testing.assert_array_equal(fast, reference)


def test_empty_mask_propagates_to_an_empty_mask(scene: dict[str, object]) -> None:
    planning: Geometry = scene["planning"]  # type: ignore[assignment]
    daily: Geometry = scene["daily"]  # type: ignore[assignment]
    empty = Volume(np.zeros(planning.shape, bool), planning)
    out = propagate_mask(empty, daily, scene["prealign"])  # type: ignore[arg-type]
    assert out.shape == daily.shape and not out.any()


def test_direct_box_field_equals_the_composite_transform(scene: dict[str, object]) -> None:
    field: Volume = scene["field"]  # type: ignore[assignment]
    direct = box_field(scene["prealign"], field.array, field.geometry)  # type: ignore[arg-type]
    sampled = dense_field(scene["full"], field.geometry)  # type: ignore[arg-type]
    assert np.abs(direct.array - sampled.array).max() < 1e-3
    assert np.abs(sampled.array).max() > 5.0  # a real field, not zeros


def test_labels_warped_inside_their_box_equal_the_whole_grid(scene: dict[str, object]) -> None:
    field: Volume = scene["field"]  # type: ignore[assignment]
    grid = field.geometry
    labels = np.zeros(grid.shape, np.uint8)
    labels[_ellipsoid(grid, np.array([0.0, 5.0, 0.0]), np.array([10.0, 8.0, 12.0]))] = 1
    labels[_ellipsoid(grid, np.array([5.0, -12.0, 3.0]), np.array([6.0, 5.0, 9.0]))] = 4
    whole = warp(Volume(labels, grid), field, "label", 0).array
    fast = warp_labels(labels, field.array, grid, scene["reach"])  # type: ignore[arg-type]
    np.testing.assert_array_equal(fast, whole)
    assert set(np.unique(fast)) == {0, 1, 4}


@pytest.mark.parametrize("position", ["HFS", "FFP"])
def test_coarse_dvf_grid_covers_the_ct_and_never_refines_it(position: str) -> None:
    ct = Geometry(
        (150, 512, 512),
        origin=[-250.0, -260.0, -300.0],
        spacing=[0.977, 0.977, 3.0],
        direction=PATIENT_POSITION_DIRECTIONS[position],
    )
    grid = dvf_grid(ct, 2.5)
    np.testing.assert_allclose(grid.spacing, [2.5, 2.5, 3.0])  # z keeps the CT's 3 mm
    assert grid.shape[0] == ct.shape[0]
    np.testing.assert_allclose(grid.direction, ct.direction)
    # every CT voxel centre lies inside the grid's voxel-centre box (no extrapolation needed)
    idx = grid.physical_to_index(ct.corners())
    assert idx.min() >= -1e-6 and np.all(idx.max(axis=0) <= np.array(grid.size_xyz) - 1 + 1e-6)
    # and the overhang is less than one spacing per side
    assert np.all(idx.min(axis=0) < 1.0)
    assert dvf_grid(ct, None) is ct and dvf_grid(ct, 0) is ct
    # a 3 mm grid over a 512 x 512 x 150 CT: about 57 MB of float32 vectors
    assert np.prod(dvf_grid(ct, 3.0).shape) * 12 < 60e6


@pytest.mark.parametrize("spacing", [None, 3.0])
def test_numpy_composed_field_equals_the_composite_transform(
    scene: dict[str, object], spacing: float | None
) -> None:
    from jrs.registration.composition import composed_field

    daily: Geometry = scene["daily"]  # type: ignore[assignment]
    grid = dvf_grid(daily, spacing)
    fast = composed_field(scene["prealign"], scene["field"], grid, slab=5)  # type: ignore[arg-type]
    reference = dense_field(scene["full"], grid)  # type: ignore[arg-type]
    assert fast.geometry.same_grid(grid)
    assert np.abs(fast.array - reference.array).max() < 1e-3
    # the network part is really there: the field differs from the affine alone in the box
    affine_only = dense_field(scene["prealign"], grid)  # type: ignore[arg-type]
    assert np.abs(fast.array - affine_only.array).max() > 2.0


def test_labels_warp_matches_on_a_rotated_grid_with_labels_at_its_border() -> None:
    """Five labels, one touching the grid's faces (clamped neighbours), a rotated grid."""
    grid = Geometry(
        (30, 36, 40),
        origin=[10.0, -20.0, 5.0],
        spacing=[1.2, 1.0, 1.5],
        direction=PATIENT_POSITION_DIRECTIONS["HFP"],
    )
    rng = np.random.default_rng(4)
    labels = np.zeros(grid.shape, np.uint8)
    labels[:8, :10, :12] = 2  # at the corner of the grid
    # the HFP grid spans x in [-37, 10], y in [-55, -20], z in [5, 48.5] mm
    for lab, centre in (
        (1, [-5.0, -30.0, 25.0]),
        (3, [-20.0, -40.0, 30.0]),
        (4, [-12.0, -45.0, 15.0]),
    ):
        labels[_ellipsoid(grid, np.array(centre), np.array([6.0, 5.0, 7.0]))] = lab
    pts = grid.voxel_centres()
    u = np.stack(
        [3.0 * np.sin(pts[..., a] / 9.0 + a) + rng.normal(0, 0.2, grid.shape) for a in range(3)],
        axis=-1,
    ).astype(np.float32)
    field = Volume(u, grid)
    whole = warp(Volume(labels, grid), field, "label", 0).array
    reach = float(np.sqrt((u**2).sum(axis=-1)).max())
    fast = warp_labels(labels, u, grid, reach)
    mismatch = int((fast != whole).sum())
    assert mismatch == 0, f"{mismatch} voxels differ"
    assert set(np.unique(fast)) == {0, 1, 2, 3, 4}


def test_largest_components_per_organ_box_equal_the_whole_grid() -> None:
    from jrs.inference.postprocess import keep_largest_components

    rng = np.random.default_rng(7)
    labels = (rng.random((40, 50, 60)) < 0.02).astype(np.uint8) * rng.integers(1, 5, (40, 50, 60))
    labels = labels.astype(np.uint8)  # scattered specks of every organ
    grid = Geometry((40, 50, 60), origin=[0.0, 0.0, 0.0], spacing=[1.0, 1.0, 1.0])
    for lab, centre in ((1, [20.0, 20.0, 15.0]), (2, [40.0, 30.0, 25.0]), (3, [15.0, 35.0, 30.0])):
        labels[_ellipsoid(grid, np.array(centre), np.array([8.0, 6.0, 5.0]))] = lab
    np.testing.assert_array_equal(largest_components(labels), keep_largest_components(labels))


def test_label_map_organs_get_their_moved_planning_overlaps_back() -> None:
    """The voxels two moved planning contours share go back to the organ the map did not keep."""
    labels = np.zeros((1, 1, 10), np.uint8)
    labels[0, 0, 0:4] = 4  # prostate (the map's winner of the overlap)
    labels[0, 0, 4:7] = 3  # seminal vesicles
    labels[0, 0, 7:9] = 1  # bladder
    prostate = np.zeros_like(labels, bool)
    prostate[0, 0, 0:5] = True  # its moved planning contour reaches voxel 4 too
    vesicles = np.zeros_like(labels, bool)
    vesicles[0, 0, 2:7] = True  # ... and the vesicles' enters the prostate (voxels 2, 3)
    bladder = np.zeros_like(labels, bool)
    bladder[0, 0, 5:9] = True  # shares voxels 5, 6 with the vesicles' moved contour
    moved = {4: prostate, 3: vesicles, 1: bladder}
    sv = with_overlaps(labels, 3, moved)
    # its own voxels, plus the planning overlap with the prostate that the map gave the prostate
    assert sv[0, 0].tolist() == [False, False, True, True, True, True, True, False, False, False]
    p = with_overlaps(labels, 4, moved)
    # voxel 4: both moved contours, given to the vesicles: shared back
    assert p[0, 0].tolist() == [True] * 5 + [False] * 5
    b = with_overlaps(labels, 1, moved)
    # voxels 5, 6: the bladder's and the vesicles' moved contours overlap there
    assert b[0, 0].tolist() == [False] * 5 + [True] * 4 + [False]
    # an organ without a planning contour keeps the map's voxels only
    assert with_overlaps(labels, 2, moved).sum() == 0
    # a moved contour that overlaps no other organ's adds nothing
    alone = {3: vesicles}
    np.testing.assert_array_equal(with_overlaps(labels, 3, alone), labels == 3)
