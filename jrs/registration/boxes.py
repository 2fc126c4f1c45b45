"""Boxes and crops, once: organ boxes in patient coordinates, index boxes, sub-grids, crops."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from jrs.core.errors import InvalidInput
from jrs.core.geometry import Geometry, Volume

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


def index_box(
    geometry: Geometry, points: npt.ArrayLike, pad_mm: float = 0.0
) -> tuple[slice, slice, slice] | None:
    """Array slices (z, y, x) of the part of a grid around LPS points (grown by ``pad_mm``).

    Args:
        geometry: the grid.
        points: (N, 3) LPS points, mm.
        pad_mm: margin added on every side, mm.

    Returns:
        The slices, clipped to the grid; None when the points fall outside it.
    """
    idx = geometry.physical_to_index(np.asarray(points, float).reshape(-1, 3))
    pad = float(pad_mm) / geometry.spacing
    size = np.asarray(geometry.size_xyz)
    lo = np.clip(np.floor(idx.min(axis=0) - pad).astype(int), 0, size)
    hi = np.clip(np.ceil(idx.max(axis=0) + pad).astype(int) + 1, 0, size)
    if np.any(hi <= lo):
        return None
    return (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))


def sub_grid(geometry: Geometry, box: tuple[slice, slice, slice]) -> Geometry:
    """The part of a grid that array slices (z, y, x) select."""
    start = [float(box[2].start), float(box[1].start), float(box[0].start)]
    return Geometry(
        (box[0].stop - box[0].start, box[1].stop - box[1].start, box[2].stop - box[2].start),
        geometry.index_to_physical(start),
        geometry.spacing,
        geometry.direction,
        geometry.frame_of_reference_uid,
    )


def intersect_boxes(
    a: tuple[slice, slice, slice], b: tuple[slice, slice, slice]
) -> tuple[slice, slice, slice] | None:
    """The overlap of two index boxes (None: they do not overlap)."""
    out = tuple(
        slice(max(x.start, y.start), min(x.stop, y.stop)) for x, y in zip(a, b, strict=True)
    )
    return None if any(s.stop <= s.start for s in out) else out  # type: ignore[return-value]


def crop_to_mask(mask: Volume) -> Volume | None:
    """The mask cut to its bounding box plus one empty voxel per side (None when empty)."""
    arr = np.asarray(mask.array)
    sl = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(arr.any(axis=other))
        if hit.size == 0:
            return None
        sl.append(slice(max(int(hit[0]) - 1, 0), min(int(hit[-1]) + 2, arr.shape[axis])))
    box = (sl[0], sl[1], sl[2])
    return Volume(np.ascontiguousarray(arr[box]), sub_grid(mask.geometry, box))


def crop(volume: Volume, box: tuple[slice, slice, slice]) -> Volume:
    """The part of a volume that array slices (z, y, x) select (a view of its array)."""
    return Volume(volume.array[box], sub_grid(volume.geometry, box))


def nonzero_box(array: npt.NDArray[Any], pad: int = 0) -> tuple[slice, slice, slice] | None:
    """Array slices of the bounding box of the non-zero voxels, grown by ``pad`` (clipped)."""
    sl = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(array.any(axis=other))
        if hit.size == 0:
            return None
        sl.append(slice(max(int(hit[0]) - pad, 0), min(int(hit[-1]) + 1 + pad, array.shape[axis])))
    return (sl[0], sl[1], sl[2])


def organ_box(
    planning_labels: Volume, transform: sitk.Transform, daily: Geometry, margin_mm: float
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """LPS box (lower, upper) in the daily scan around the pre-aligned planning organs."""
    idx = np.argwhere(planning_labels.array > 0)
    lo, hi = idx.min(axis=0)[::-1], idx.max(axis=0)[::-1]
    corners = np.array(
        [[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])], float
    )
    pts = planning_labels.geometry.index_to_physical(corners)
    inverse = transform.GetInverse()
    daily_pts = np.array([inverse.TransformPoint(tuple(map(float, p))) for p in pts])
    lower = daily_pts.min(axis=0) - margin_mm
    upper = daily_pts.max(axis=0) + margin_mm
    ct_corners = daily.corners()
    lower = np.maximum(lower, ct_corners.min(axis=0))
    upper = np.minimum(upper, ct_corners.max(axis=0))
    if np.any(upper - lower < 4.0):
        raise InvalidInput(
            "the planning organs, once pre-aligned, fall outside the daily CT's field of view; "
            "check that the daily CT covers the pelvis of the same patient"
        )
    return lower, upper


def touches_border(mask: npt.NDArray[np.bool_]) -> bool:
    """Does a (z, y, x) mask reach a face of its array (the network box)?"""
    return bool(
        mask[0].any()
        or mask[-1].any()
        or mask[:, 0].any()
        or mask[:, -1].any()
        or mask[:, :, 0].any()
        or mask[:, :, -1].any()
    )
