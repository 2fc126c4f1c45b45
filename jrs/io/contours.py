"""Binary masks <-> planar polygons in patient coordinates (LPS, mm).

The two directions are exact inverses of each other on the voxel grid:

* `mask_to_contours` traces each slice with marching squares at level 0.5 on the zero-padded
  slice (the rings `skimage.measure.find_contours` gives, foreground voxels touching diagonally
  connected; `trace_rings` computes them for all slices at once with numpy). The polygon passes
  half-way between voxel centres inside and outside the mask, so every voxel centre of the mask
  lies strictly inside it and every other centre strictly outside.
* `contours_to_mask` fills, on the slice whose plane a polygon lies in, exactly the voxels whose
  CENTRE is inside the polygon; polygons of one slice are combined by XOR, so holes (and islands in
  holes) come back.

Both work in continuous index space (``Geometry.physical_to_index``), so any direction (HFS, HFP,
FFS, FFP storage, oblique) is handled. Contours are planar in the grid's slice planes (the planes of
constant k).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from jrs.core.errors import GeometryMismatch, InvalidInput
from jrs.core.geometry import Geometry

logger = logging.getLogger(__name__)

#: Default tolerance (fraction of the slice spacing) for assigning a polygon to a slice plane.
DEFAULT_PLANE_TOLERANCE = 0.25

#: Default Douglas-Peucker tolerance in in-plane voxels (0: only exactly collinear vertices are
#: dropped, which is lossless). Below 0.35 voxel (the closest a voxel centre comes to a
#: marching-squares polygon) no voxel changes side, so round trips stay exact.
DEFAULT_SIMPLIFY_TOLERANCE = 0.0


@dataclass(frozen=True, eq=False)
class PlanarContour:
    """One closed polygon lying in a slice plane of a grid.

    Attributes:
        slice_index: index k of the slice (array index along z of the (nz, ny, nx) mask).
        points: (N, 3) LPS vertices, mm, N >= 3 distinct points; the polygon is implicitly closed
            (the first point is not repeated at the end).
        is_hole: True when the polygon bounds a hole (background inside foreground). Outer
            boundaries wind counter-clockwise and holes clockwise, seen from the positive side of
            the patient axis (L, P or S) closest to the slice normal (for axial slices: seen from
            the head).
    """

    slice_index: int
    points: npt.NDArray[np.float64]
    is_hole: bool = False


@dataclass
class RasterReport:
    """What `contours_to_mask` could not place on the grid.

    Attributes:
        off_plane: indices (in input order) of contours that do not lie in one slice plane
            (between two slices, or not parallel to the slices).
        outside: indices of contours in a slice plane beyond the first/last slice, or entirely
            outside the in-plane extent of the grid.
        degenerate: indices of contours with fewer than 3 distinct points.
        messages: one human-readable line per problem.
    """

    off_plane: list[int] = field(default_factory=list)
    outside: list[int] = field(default_factory=list)
    degenerate: list[int] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether every contour was placed on the grid."""
        return not (self.off_plane or self.outside or self.degenerate)


# ------------------------------------------------------------------------------ helpers
def _reference_sign(geometry: Geometry) -> float:
    """+1 when (i, j) winding equals winding about the positive patient axis nearest the normal."""
    d = geometry.direction
    normal = np.cross(d[:, 0], d[:, 1])
    axis = int(np.argmax(np.abs(normal)))
    return 1.0 if normal[axis] > 0 else -1.0


def _signed_area_ij(ij: npt.NDArray[np.float64]) -> float:
    """Shoelace area of an (N, 2) polygon given as (i, j) columns (positive = counter-clockwise)."""
    x, y = ij[:, 0], ij[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _distinct_fewer_than_3(points: npt.NDArray[np.float64]) -> bool:
    """Whether (N, D) points hold fewer than 3 distinct ones (compared at 1e-6), in O(N)."""
    r = np.round(points, 6)
    differ = np.any(r != r[0], axis=1) if len(r) else np.zeros(0, bool)
    if not differ.any():
        return True
    second = r[int(np.argmax(differ))]
    return not bool(np.any(differ & np.any(r != second, axis=1)))


def _drop_collinear(ij: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Remove repeated and exactly collinear vertices of a closed polygon ((N, 2), no repeat)."""
    keep = np.ones(len(ij), dtype=bool)
    prev = np.roll(ij, 1, axis=0)
    nxt = np.roll(ij, -1, axis=0)
    a = ij - prev
    b = nxt - ij
    cross = a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]
    dot = np.einsum("ij,ij->i", a, b)
    keep &= ~((np.abs(cross) < 1e-9) & (dot >= 0))  # straight continuation
    keep &= np.any(np.abs(a) > 1e-9, axis=1)  # duplicate of the previous point
    return ij[keep] if keep.sum() >= 3 else ij


# ------------------------------------------------------------------------------ marching squares
#: Cell corners as (row, col) offsets: top-left, top-right, bottom-right, bottom-left; a cell's
#: case has bit ``2**n`` set when corner ``n`` is foreground.
_CELL_CORNERS = ((0, 0), (0, 1), (1, 1), (1, 0))
#: Cell edges: (corner, corner, edge midpoint in doubled (row, col) offsets).
_CELL_EDGES = ((0, 1, (0, 1)), (1, 2, (1, 2)), (2, 3, (2, 1)), (3, 0, (1, 0)))


def _segment_table() -> npt.NDArray[np.int64]:
    """Marching-squares segments of the 16 cell cases at level 0.5.

    Returns:
        (16, 2, 2, 2): per case up to two directed segments, (start, end) edge midpoints in
        doubled (row, col) offsets from the cell's top-left corner, each with the foreground on
        its left in the (i = column, j = row) frame; unused entries are -1. In the two saddle
        cases the foreground corners are connected (each background corner is cut off).
    """
    table = np.full((16, 2, 2, 2), -1, np.int64)
    for case in range(16):
        on = [(case >> bit) & 1 for bit in range(4)]
        crossed = [e for e in range(4) if on[_CELL_EDGES[e][0]] != on[_CELL_EDGES[e][1]]]
        if not crossed:
            continue
        if len(crossed) == 2:
            pairs = [(crossed[0], crossed[1])]
        else:  # saddle
            pairs = [
                (e1, e2)
                for corner in range(4)
                if not on[corner]
                for e1, e2 in [tuple(e for e in range(4) if corner in _CELL_EDGES[e][:2])]
            ]
        fg_corner = 2 * np.array(_CELL_CORNERS[on.index(1)])
        for s, (e1, e2) in enumerate(pairs):
            p, q = np.array(_CELL_EDGES[e1][2]), np.array(_CELL_EDGES[e2][2])
            v, w = q - p, fg_corner - p
            if v[1] * w[0] - v[0] * w[1] < 0:  # cross product in (x = col, y = row)
                p, q = q, p
            table[case, s, 0], table[case, s, 1] = p, q
    return table


_SEGMENTS = _segment_table()


def trace_rings(
    foreground: npt.NDArray[np.bool_],
) -> list[tuple[int, npt.NDArray[np.float64]]]:
    """Closed level-0.5 rings of every slice of a binary stack, traced with numpy only.

    Marching squares on each slice (the rings of ``skimage.measure.find_contours(slice, 0.5,
    fully_connected="high")``, vertex for vertex), computed for all slices at once: the cells'
    segments come from a lookup table, every vertex (an edge midpoint) has exactly one segment
    leaving it, and the rings are the cycles of that successor map, found with a connected
    components pass and put in order by pointer jumping.

    Args:
        foreground: (nz, H, W) boolean stack whose in-plane border is background.

    Returns:
        (slice index, (N, 2) (row, col) vertices) per ring, not closed (first vertex not
        repeated), foreground on the left in the (col, row) frame: outer boundaries
        counter-clockwise, holes clockwise; ordered by slice, then by smallest vertex.
    """
    _, h, w = foreground.shape
    b = np.asarray(foreground, dtype=np.uint8)
    case = b[:, :-1, :-1] | (b[:, :-1, 1:] << 1) | (b[:, 1:, 1:] << 2) | (b[:, 1:, :-1] << 3)
    k, r, c = np.nonzero((case != 0) & (case != 15))
    if k.size == 0:
        return []
    table = _SEGMENTS[case[k, r, c]]  # (cells, 2, 2, 2)
    used = table[:, :, 0, 0] >= 0
    ends = table + np.stack([2 * r, 2 * c], axis=-1)[:, None, None, :]
    kk = np.broadcast_to(k[:, None], used.shape)[used].astype(np.int64)
    start, end = ends[:, :, 0][used], ends[:, :, 1][used]
    h2, w2 = 2 * h, 2 * w
    sid = (kk * h2 + start[:, 0]) * w2 + start[:, 1]
    eid = (kk * h2 + end[:, 0]) * w2 + end[:, 1]
    order = np.argsort(sid)
    sid, eid, kk = sid[order], eid[order], kk[order]
    n = sid.size
    nxt = np.searchsorted(sid, eid)  # the segment leaving each segment's end
    graph = coo_matrix((np.ones(n, np.int8), (np.arange(n), nxt)), shape=(n, n))
    rings, label = connected_components(graph, directed=True, connection="weak")
    first = np.full(rings, n, np.int64)
    np.minimum.at(first, label, np.arange(n))
    # list ranking: cut every cycle before its first segment, count the steps to the cut
    succ = nxt.copy()
    last = succ == first[label]
    succ[last] = np.flatnonzero(last)
    rank = (~last).astype(np.int64)
    while True:
        jump = succ[succ]
        if np.array_equal(jump, succ):
            break
        rank = rank + rank[succ]
        succ = jump
    idx = np.lexsort((-rank, label))
    rows = ((sid // w2) % h2) / 2.0
    cols = (sid % w2) / 2.0
    out = [
        (int(kk[part[0]]), np.column_stack([rows[part], cols[part]]))
        for part in np.split(idx, np.flatnonzero(np.diff(label[idx])) + 1)
    ]
    out.sort(key=lambda item: (item[0], *item[1].min(axis=0)))
    return out


# ------------------------------------------------------------------------------ mask -> polygons
def mask_to_contours(
    mask: npt.ArrayLike,
    geometry: Geometry,
    *,
    simplify_tolerance: float = DEFAULT_SIMPLIFY_TOLERANCE,
) -> list[PlanarContour]:
    """Trace a binary mask into closed planar polygons, slice by slice.

    Each slice is zero-padded and traced with marching squares at level 0.5 (foreground voxels
    that touch diagonally are connected). Outer boundaries and holes come out as separate closed
    polygons; collinear vertices are dropped, then the polygon is simplified (Douglas-Peucker)
    with `simplify_tolerance` in-plane voxels.

    Args:
        mask: (nz, ny, nx) mask, non-zero inside.
        geometry: the grid of the mask (any direction).
        simplify_tolerance: maximum vertex deviation of the simplification, in voxels (0 keeps
            every non-collinear vertex). Values up to about 0.3 keep the mask -> polygons -> mask
            round trip exact (voxel centres are at least 0.35 voxel from the traced polygon).

    Returns:
        Contours ordered by slice index, then outer boundaries before holes; points in LPS mm.

    Raises:
        GeometryMismatch: when the mask shape differs from ``geometry.shape``.
        InvalidInput: when `simplify_tolerance` is negative.
    """
    arr = np.asarray(mask)
    if arr.shape != geometry.shape:
        raise GeometryMismatch(
            f"mask shape {arr.shape} does not match the grid shape {geometry.shape} (nz, ny, nx)"
        )
    if simplify_tolerance < 0:
        raise InvalidInput(f"simplify_tolerance must be >= 0 voxels, got {simplify_tolerance}")
    fg = arr if arr.dtype == np.bool_ else arr != 0
    zs = np.flatnonzero(fg.reshape(fg.shape[0], -1).any(axis=1))
    if zs.size == 0:
        return []
    sign = _reference_sign(geometry)
    k0, k1 = int(zs[0]), int(zs[-1]) + 1
    ys = np.flatnonzero(fg[k0:k1].any(axis=(0, 2)))
    xs = np.flatnonzero(fg[k0:k1].any(axis=(0, 1)))
    j0, j1, i0, i1 = ys[0], ys[-1] + 1, xs[0], xs[-1] + 1
    stack = np.pad(fg[k0:k1, j0:j1, i0:i1], ((0, 0), (1, 1), (1, 1)))
    by_slice: dict[int, list[npt.NDArray[np.float64]]] = {}
    for k_rel, ring in trace_rings(stack):
        by_slice.setdefault(k0 + k_rel, []).append(ring)
    out: list[PlanarContour] = []
    for k, rings in by_slice.items():
        outers: list[PlanarContour] = []
        holes: list[PlanarContour] = []
        for ring in rings:
            ij = np.column_stack([ring[:, 1] - 1 + i0, ring[:, 0] - 1 + j0])
            ij = _drop_collinear(ij)
            if simplify_tolerance > 0 and len(ij) > 4:
                from skimage.measure import approximate_polygon

                closed = approximate_polygon(np.vstack([ij, ij[:1]]), simplify_tolerance)
                if len(closed) - 1 >= 3:
                    ij = closed[:-1]
            if _distinct_fewer_than_3(ij):
                continue
            # the rings wind around foreground counter-clockwise in (i, j) and around background
            # (holes) clockwise; simplification keeps the winding.
            area_ij = _signed_area_ij(ij)
            is_hole = area_ij < 0
            if (area_ij * sign > 0) == is_hole:  # outers counter-clockwise, holes clockwise
                ij = ij[::-1]
            idx = np.column_stack([ij, np.full(len(ij), float(k))])
            contour = PlanarContour(int(k), geometry.index_to_physical(idx), is_hole)
            (holes if is_hole else outers).append(contour)
        out.extend(outers)
        out.extend(holes)
    return out


# ------------------------------------------------------------------------------ polygons -> mask
def _fill_even_odd(
    polygons: list[npt.NDArray[np.float64]], ny: int, nx: int
) -> npt.NDArray[np.bool_]:
    """Voxel centres (integer (i, j)) inside closed (i, j) polygons by the even-odd rule.

    Every edge crossing the row ``j`` (half-open: ``min(j0, j1) <= j < max(j0, j1)``) at abscissa
    ``x`` toggles the voxels ``i >= x`` of that row; the parity of the toggles is the mask.

    Args:
        polygons: closed polygons, each (N, 2) continuous (i, j) indices (first point not
            repeated).
        ny: rows of the slice.
        nx: columns of the slice.

    Returns:
        (ny, nx) boolean mask.
    """
    rows_all, cols_all = [], []
    for ij in polygons:
        p0 = ij
        p1 = np.roll(ij, -1, axis=0)
        j_lo = np.minimum(p0[:, 1], p1[:, 1])
        j_hi = np.maximum(p0[:, 1], p1[:, 1])
        first = np.maximum(np.ceil(j_lo), 0).astype(np.int64)
        last = np.minimum(np.ceil(j_hi) - 1, ny - 1).astype(np.int64)  # j < j_hi
        count = np.maximum(last - first + 1, 0)
        if not count.any():
            continue
        edge = np.repeat(np.arange(len(ij)), count)
        offset = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
        j = (first[edge] + offset).astype(np.float64)
        a, b = p0[edge], p1[edge]
        x = a[:, 0] + (j - a[:, 1]) * (b[:, 0] - a[:, 0]) / (b[:, 1] - a[:, 1])
        col = np.maximum(np.ceil(x), 0).astype(np.int64)
        keep = col < nx
        rows_all.append(j[keep].astype(np.int64))
        cols_all.append(col[keep])
    mask = np.zeros((ny, nx), dtype=bool)
    if not rows_all:
        return mask
    rows, cols = np.concatenate(rows_all), np.concatenate(cols_all)
    if rows.size == 0:
        return mask
    # only the rows the polygons cross and the columns from their leftmost crossing on (a row's
    # parity after its last crossing is 0, or 1 up to the right edge for a clipped polygon)
    r0, r1, c0 = int(rows.min()), int(rows.max()) + 1, int(cols.min())
    width = nx - c0
    flips = np.bincount((rows - r0) * width + (cols - c0), minlength=(r1 - r0) * width)
    parity = (flips.reshape(r1 - r0, width) & 1).astype(np.uint8)
    mask[r0:r1, c0:] = np.bitwise_xor.accumulate(parity, axis=1).astype(bool)
    return mask


def contours_to_mask(
    contours: Iterable[npt.ArrayLike | PlanarContour],
    geometry: Geometry,
    *,
    plane_tolerance: float = DEFAULT_PLANE_TOLERANCE,
    strict: bool = True,
    report: RasterReport | None = None,
    label: str = "contour",
) -> npt.NDArray[np.bool_]:
    """Rasterise closed planar polygons onto a grid: voxel centre inside the polygon.

    Each polygon is mapped to continuous indices; it belongs to slice ``k = round(mean k)`` when
    every vertex lies within `plane_tolerance` (a fraction of the slice spacing) of that plane.
    A voxel centre of the slice is inside when a ray from it towards -i crosses the polygons of
    the slice an odd number of times (even-odd rule, scanline fill): polygons of one slice thus
    combine by XOR (a polygon inside another is a hole). A centre exactly on an edge parallel to j
    counts as inside on the low-i side; edges are half-open in j. Parts of a polygon beyond the
    in-plane extent of the grid are clipped.

    Args:
        contours: polygons, each (N, 3) LPS points in mm (or a `PlanarContour`), N >= 3.
        geometry: the output grid.
        plane_tolerance: maximum distance of a vertex from its slice plane, as a fraction of the
            slice spacing (0 < tol < 0.5).
        strict: raise on the first contour that cannot be placed (off every slice plane, outside
            the grid, fewer than 3 points); when False such contours are skipped and recorded in
            `report`.
        report: optional `RasterReport` filled with the contours that were not placed; when
            None, a non-strict call logs one warning summarising them.
        label: words naming the contours in messages (e.g. ``"ROI 'Bladder'"``).

    Returns:
        (nz, ny, nx) boolean mask.

    Raises:
        GeometryMismatch: (strict) a contour is off every slice plane or outside the grid.
        InvalidInput: (strict) a contour is not an (N, 3) array of at least 3 distinct points;
            `plane_tolerance` out of range.
    """
    if not 0 < plane_tolerance < 0.5:
        raise InvalidInput(f"plane_tolerance must be in (0, 0.5) slices, got {plane_tolerance}")
    rep = report if report is not None else RasterReport()
    nz, ny, nx = geometry.shape
    mask = np.zeros(geometry.shape, dtype=bool)
    per_slice: dict[int, list[npt.NDArray[np.float64]]] = {}

    def problem(kind: str, n: int, message: str) -> None:
        text = f"{label} #{n + 1}: {message}"
        if strict:
            err = InvalidInput if kind == "degenerate" else GeometryMismatch
            raise err(text)
        getattr(rep, kind).append(n)
        rep.messages.append(text)
        logger.debug("%s", text)

    for n, contour in enumerate(contours):
        pts = contour.points if isinstance(contour, PlanarContour) else contour
        arr = np.asarray(pts, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != 3:
            problem("degenerate", n, f"expected (N, 3) LPS points, got shape {arr.shape}")
            continue
        if _distinct_fewer_than_3(arr):
            problem("degenerate", n, f"has {len(arr)} points, fewer than 3 distinct; skipped")
            continue
        idx = geometry.physical_to_index(arr)
        kc = float(np.mean(idx[:, 2]))
        k = round(kc)
        dev = float(np.max(np.abs(idx[:, 2] - k)))
        if dev > plane_tolerance:
            spread = float(np.ptp(idx[:, 2]) * geometry.spacing[2])
            problem(
                "off_plane",
                n,
                f"does not lie in a slice plane of the grid (nearest slice {k}, vertices up to "
                f"{dev * geometry.spacing[2]:.3g} mm from it, out-of-plane spread {spread:.3g} "
                f"mm; tolerance {plane_tolerance * geometry.spacing[2]:.3g} mm)",
            )
            continue
        if not 0 <= k < nz:
            centre = geometry.index_to_physical([0.0, 0.0, float(k)])
            problem(
                "outside",
                n,
                f"lies on slice position {k} (plane through {np.round(centre, 2).tolist()} mm), "
                f"outside the grid's slices 0..{nz - 1}",
            )
            continue
        ij = idx[:, :2]
        lo_ij, hi_ij = ij.min(axis=0), ij.max(axis=0)
        if np.any(hi_ij < -0.5) or np.any(lo_ij > [nx - 0.5, ny - 0.5]):
            problem("outside", n, f"lies entirely outside the in-plane extent of slice {k}")
            continue
        per_slice.setdefault(k, []).append(ij)
    for k, polygons in per_slice.items():
        mask[k] = _fill_even_odd(polygons, ny, nx)
    if report is None and not rep.ok:
        logger.warning(
            "%s: %d contour(s) not placed on the grid, e.g. %s",
            label,
            len(rep.messages),
            rep.messages[0],
        )
    return mask
