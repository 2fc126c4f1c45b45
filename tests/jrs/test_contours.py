"""Masks <-> planar polygons in LPS: round trips, exact rasterisation, reported failures."""

from __future__ import annotations

import numpy as np
import pytest

from jrs.core.errors import GeometryMismatch, InvalidInput
from jrs.core.geometry import PATIENT_POSITION_DIRECTIONS, Geometry
from jrs.core.metrics import centroid_mm, dice
from jrs.io.contours import PlanarContour, RasterReport, contours_to_mask, mask_to_contours


def _rotation(ax: float, az: float) -> np.ndarray:
    a, b = np.deg2rad(ax), np.deg2rad(az)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    return rz @ rx


DIRECTIONS = {**PATIENT_POSITION_DIRECTIONS, "oblique": _rotation(12.0, 25.0)}


def _grid(direction: np.ndarray, shape=(22, 44, 48), spacing=(0.9, 1.1, 2.0)) -> Geometry:
    """A grid whose centre sits at LPS (5, -3, 12) mm, whatever the direction."""
    size_xyz = np.array(shape[::-1], float)
    centre = np.array([5.0, -3.0, 12.0])
    origin = centre - direction @ (np.asarray(spacing) * (size_xyz - 1) / 2)
    return Geometry(shape, origin=origin, spacing=spacing, direction=direction)


def _shapes(g: Geometry) -> dict[str, np.ndarray]:
    p = g.voxel_centres()
    c = np.array([5.0, -3.0, 12.0])
    d = p - c
    sphere = np.linalg.norm(d, axis=-1) < 14.0
    ellipsoid = np.linalg.norm((d - [2, 1, -3]) / [17.0, 10.0, 13.0], axis=-1) < 1.0
    # torus around the S axis: a ring in every axial plane it crosses, with a hole in the middle
    rho = np.hypot(d[..., 0], d[..., 1])
    torus = np.hypot(rho - 11.0, d[..., 2]) < 6.0
    blobs = (np.linalg.norm((d - [-10, 0, 0]) / [6, 6, 9], axis=-1) < 1) | (
        np.linalg.norm((d - [10, 2, 0]) / [5, 7, 9], axis=-1) < 1
    )
    return {"sphere": sphere, "ellipsoid": ellipsoid, "torus": torus, "two_blobs": blobs}


@pytest.mark.parametrize("orientation", list(DIRECTIONS))
def test_round_trip_analytic_shapes_every_direction(orientation: str) -> None:
    g = _grid(DIRECTIONS[orientation])
    for name, mask in _shapes(g).items():
        contours = mask_to_contours(mask, g)
        back = contours_to_mask([c.points for c in contours], g)
        assert dice(mask, back) >= 0.98, (orientation, name)
        err = np.linalg.norm(centroid_mm(mask, g) - centroid_mm(back, g))
        assert err < 0.5, (orientation, name, err)
        for c in contours:
            assert len(np.unique(np.round(c.points, 4), axis=0)) >= 3
            # every vertex lies in the plane of its slice
            k = g.physical_to_index(c.points)[:, 2]
            np.testing.assert_allclose(k, c.slice_index, atol=1e-6)
        if name == "torus":
            centre_slice = int(np.argmax(mask.sum(axis=(1, 2))))
            on_slice = [c for c in contours if c.slice_index == centre_slice]
            assert sorted(c.is_hole for c in on_slice) == [False, True]
            assert not back[centre_slice][tuple(np.array(g.shape[1:]) // 2)]  # hole kept
        if name == "two_blobs":
            assert any(
                sum(not c.is_hole for c in contours if c.slice_index == k) == 2
                for k in range(g.shape[0])
            )


def test_contours_are_in_lps_mm() -> None:
    """The traced polygons of a sphere lie on the sphere in patient space (not just round-trip)."""
    for direction in DIRECTIONS.values():
        g = _grid(direction)
        centre = np.array([5.0, -3.0, 12.0])
        mask = np.linalg.norm(g.voxel_centres() - centre, axis=-1) < 14.0
        pts = np.concatenate([c.points for c in mask_to_contours(mask, g)])
        r_plane = np.linalg.norm(pts - centre, axis=1)
        assert r_plane.max() < 14.0 + 1.2
        assert np.median(r_plane) == pytest.approx(14.0, abs=1.5)


def test_winding_consistent_about_patient_axis() -> None:
    """Outer boundaries wind counter-clockwise seen from the head (+S), holes clockwise."""
    for direction in DIRECTIONS.values():
        g = _grid(direction)
        contours = mask_to_contours(_shapes(g)["torus"], g)
        for c in contours:
            x, y = c.points[:, 0], c.points[:, 1]
            area = 0.5 * (np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))
            # LPS x to the left, y posterior: counter-clockwise seen from +S is positive area
            assert (area > 0) != c.is_hole


def test_simplification_keeps_round_trip_exact() -> None:
    g = _grid(DIRECTIONS["oblique"])
    mask = _shapes(g)["ellipsoid"]
    plain = mask_to_contours(mask, g)
    simple = mask_to_contours(mask, g, simplify_tolerance=0.3)
    assert sum(len(c.points) for c in simple) < sum(len(c.points) for c in plain)
    np.testing.assert_array_equal(contours_to_mask(plain, g), mask)
    np.testing.assert_array_equal(contours_to_mask(simple, g), mask)
    coarse = contours_to_mask(mask_to_contours(mask, g, simplify_tolerance=1.0), g)
    assert dice(coarse, mask) > 0.9


@pytest.mark.parametrize("orientation", ["HFS", "FFP", "oblique"])
def test_known_square_rasterises_to_voxel_centres_inside(orientation: str) -> None:
    g = _grid(DIRECTIONS[orientation])
    k = 7
    plane_centre = g.index_to_physical([24.0, 22.0, k])
    u, v = g.direction[:, 0], g.direction[:, 1]  # in-plane axes of the grid
    # a square 7.3 mm x 6.1 mm, offset so that no voxel centre lies on its edges
    a0, a1, b0, b1 = -3.37, 3.93, -2.71, 3.39
    square = np.array(
        [plane_centre + a * u + b * v for a, b in [(a0, b0), (a1, b0), (a1, b1), (a0, b1)]]
    )
    mask = contours_to_mask([square], g)
    rel = g.voxel_centres() - plane_centre
    au, bv = rel @ u, rel @ v
    expected = np.zeros(g.shape, bool)
    expected[k] = ((au > a0) & (au < a1) & (bv > b0) & (bv < b1))[k]
    assert expected.sum() > 20
    np.testing.assert_array_equal(mask, expected)
    # the same square twice on a slice cancels (XOR), a smaller one inside makes a hole
    assert not contours_to_mask([square, square], g).any()
    inner = plane_centre + 0.5 * (square - plane_centre)
    inside_inner = (au > a0 / 2) & (au < a1 / 2) & (bv > b0 / 2) & (bv < b1 / 2)
    assert (expected & inside_inner).sum() > 2
    np.testing.assert_array_equal(contours_to_mask([square, inner], g), expected & ~inside_inner)


def test_contour_within_tolerance_goes_to_nearest_slice() -> None:
    g = _grid(DIRECTIONS["HFS"])
    mask = _shapes(g)["sphere"]
    contours = mask_to_contours(mask, g)
    shifted = [c.points + 0.2 * g.spacing[2] * g.direction[:, 2] for c in contours]
    np.testing.assert_array_equal(contours_to_mask(shifted, g), mask)


def test_off_plane_and_outside_contours_are_reported() -> None:
    g = _grid(DIRECTIONS["FFS"])
    sq = g.index_to_physical([[10, 10, 3], [20, 10, 3], [20, 20, 3], [10, 20, 3]])
    between = sq + 0.5 * g.spacing[2] * g.direction[:, 2]  # half-way between two slices
    tilted = sq.copy()
    tilted[2] += 2.0 * g.spacing[2] * g.direction[:, 2]  # not parallel to the slices
    beyond = sq + (g.shape[0] + 2) * g.spacing[2] * g.direction[:, 2]  # past the last slice
    aside = sq + 500.0 * g.direction[:, 0]  # in a slice plane, beside the grid
    with pytest.raises(GeometryMismatch, match="does not lie in a slice plane"):
        contours_to_mask([sq, between], g, label="ROI 'Bladder' contour")
    with pytest.raises(GeometryMismatch, match="outside the grid"):
        contours_to_mask([beyond], g)
    with pytest.raises(InvalidInput, match="fewer than 3"):
        contours_to_mask([sq[:2]], g)
    report = RasterReport()
    mask = contours_to_mask(
        [sq, between, tilted, beyond, aside, sq[:2]], g, strict=False, report=report
    )
    assert report.off_plane == [1, 2]
    assert report.outside == [3, 4]
    assert report.degenerate == [5]
    assert len(report.messages) == 4 + 1 and not report.ok
    np.testing.assert_array_equal(mask, contours_to_mask([sq], g))


def test_bad_arguments() -> None:
    g = _grid(DIRECTIONS["HFS"])
    with pytest.raises(GeometryMismatch, match="mask shape"):
        mask_to_contours(np.zeros((3, 4, 5), bool), g)
    assert mask_to_contours(np.zeros(g.shape, bool), g) == []
    with pytest.raises(InvalidInput, match="plane_tolerance"):
        contours_to_mask([], g, plane_tolerance=0.6)
    pc = mask_to_contours(_shapes(g)["sphere"], g)[0]
    assert isinstance(pc, PlanarContour)


def test_vectorised_tracing_gives_the_rings_of_skimage_find_contours() -> None:
    """`trace_rings` (all slices at once, numpy) = skimage's marching squares, ring for ring."""
    from scipy import ndimage
    from skimage.measure import find_contours

    from jrs.io.contours import trace_rings

    def canonical(ring: np.ndarray) -> tuple[tuple[float, float], ...]:
        pts = [(float(a), float(b)) for a, b in np.round(ring, 6)]
        i = min(range(len(pts)), key=lambda j: pts[j])
        return tuple(pts[i:] + pts[:i])

    def winding(ring: np.ndarray) -> float:
        x, y = ring[:, 1], ring[:, 0]
        return float(np.sign(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)))

    rng = np.random.default_rng(0)
    slices = []
    for n in range(60):
        h, w = rng.integers(3, 25, 2)
        m = rng.random((h, w)) < rng.uniform(0.2, 0.8)  # holes, islands, diagonal touches
        if n % 3 == 0:
            m = ndimage.binary_opening(m)
        slices.append(np.pad(m, ((1, 25 - h), (1, 25 - w))))
    stack = np.stack(slices)
    got: dict[int, list] = {}
    for k, ring in trace_rings(stack):
        got.setdefault(k, []).append((canonical(ring), winding(ring)))
    for k, m in enumerate(slices):
        ref = [
            (canonical(rc[:-1]), winding(rc[:-1]))
            for rc in find_contours(m.astype(np.float32), 0.5, fully_connected="high")
        ]
        assert sorted(got.get(k, [])) == sorted(ref), k
    assert trace_rings(np.zeros((2, 5, 5), bool)) == []
