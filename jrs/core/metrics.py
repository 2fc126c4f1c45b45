"""Overlap and surface-distance metrics on masks with geometry (METHOD.md, Evaluation).

All distances are in mm. Surfaces are the boundary voxels of each mask; the distance of a surface
voxel to the other mask's surface comes from a Maurer distance map of that other surface. MSD is
the mean of the pooled set of both directed distances; HD95 is the maximum of the two directed
95th percentiles. No component selection by comparison with a reference: that is an oracle.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from jrs.core.errors import GeometryMismatch
from jrs.core.geometry import Geometry, Volume


def _check_same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise GeometryMismatch(f"masks differ in shape: {a.shape} vs {b.shape}")


def dice(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """Dice similarity coefficient of two binary masks.

    Args:
        a: mask, any shape, non-zero = inside.
        b: mask of the same shape.

    Returns:
        2|A∩B| / (|A|+|B|); 1.0 when both are empty.
    """
    aa = np.asarray(a) > 0
    bb = np.asarray(b) > 0
    _check_same_shape(aa, bb)
    total = int(aa.sum()) + int(bb.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(aa, bb).sum()) / total


def volume_cc(mask: npt.ArrayLike, geometry: Geometry) -> float:
    """Volume of a mask in cm^3 (voxel count times voxel volume)."""
    return float(np.count_nonzero(np.asarray(mask))) * float(np.prod(geometry.spacing)) / 1000.0


def centroid_mm(mask: npt.ArrayLike, geometry: Geometry) -> npt.NDArray[np.float64]:
    """LPS centroid of a mask's voxel centres, mm, shape (3,); NaNs when the mask is empty."""
    kji = np.argwhere(np.asarray(mask) > 0)
    if kji.size == 0:
        return np.full(3, np.nan)
    return geometry.index_to_physical(kji[:, ::-1].astype(np.float64).mean(axis=0))


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels: inside, with a face neighbour outside the mask or the grid."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[1:-1, 1:-1, 1:-1].copy()
    for axis in range(3):
        for shift in (-1, 1):
            interior &= np.roll(padded, shift, axis=axis)[1:-1, 1:-1, 1:-1]
    return mask & ~interior


def _distance_to(surface: np.ndarray, spacing_xyz: npt.NDArray[np.float64]) -> np.ndarray:
    """Unsigned Euclidean distance (mm) of every voxel to the nearest voxel of `surface`."""
    image = sitk.GetImageFromArray(surface.astype(np.uint8))
    image.SetSpacing(tuple(float(s) for s in spacing_xyz))
    dist = sitk.SignedMaurerDistanceMap(
        image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True
    )
    return np.abs(sitk.GetArrayFromImage(dist))


@dataclass(frozen=True)
class SurfaceDistances:
    """Symmetric surface-distance summary of two masks, mm.

    Attributes:
        msd: mean surface distance of the pooled directed distances.
        hd95: max of the two directed 95th percentiles.
        hd: maximum (Hausdorff) distance.
    """

    msd: float
    hd95: float
    hd: float


def surface_distances(a: npt.ArrayLike, b: npt.ArrayLike, geometry: Geometry) -> SurfaceDistances:
    """MSD, HD95 and Hausdorff distance between two masks on one grid.

    Args:
        a: (nz, ny, nx) mask.
        b: (nz, ny, nx) mask on the same grid.
        geometry: the grid (only spacing matters; distances are in mm).

    Returns:
        The distances; all NaN when either mask is empty, 0 when both are identical.
    """
    aa = np.asarray(a) > 0
    bb = np.asarray(b) > 0
    _check_same_shape(aa, bb)
    if aa.shape != geometry.shape:
        raise GeometryMismatch(f"mask shape {aa.shape} does not fit grid {geometry.shape}")
    if not aa.any() or not bb.any():
        return SurfaceDistances(float("nan"), float("nan"), float("nan"))
    # crop to the joint bounding box with a margin: distances only matter near the surfaces
    idx = np.argwhere(aa | bb)
    lo = np.maximum(idx.min(axis=0) - 2, 0)
    hi = np.minimum(idx.max(axis=0) + 3, aa.shape)
    box = tuple(slice(int(lo_), int(hi_)) for lo_, hi_ in zip(lo, hi, strict=True))
    sa, sb = _boundary(aa[box]), _boundary(bb[box])
    d_ab = _distance_to(sb, geometry.spacing)[sa]
    d_ba = _distance_to(sa, geometry.spacing)[sb]
    pooled = np.concatenate([d_ab, d_ba])
    return SurfaceDistances(
        msd=float(pooled.mean()),
        hd95=float(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))),
        hd=float(pooled.max()),
    )


def mask_metrics(prediction: Volume, reference: Volume) -> dict[str, float]:
    """DSC, MSD, HD95 (mm) and centroid distance (mm) of a predicted mask against a reference.

    Args:
        prediction: (nz, ny, nx) mask volume.
        reference: (nz, ny, nx) mask volume on the same grid.

    Returns:
        ``{"dsc", "msd", "hd95", "centroid_mm"}``.
    """
    prediction.geometry.require_same_grid(reference.geometry, "prediction and reference masks")
    sd = surface_distances(prediction.array, reference.array, reference.geometry)
    c = centroid_mm(prediction.array, prediction.geometry) - centroid_mm(
        reference.array, reference.geometry
    )
    return {
        "dsc": dice(prediction.array, reference.array),
        "msd": sd.msd,
        "hd95": sd.hd95,
        "centroid_mm": float(np.linalg.norm(c)),
    }
