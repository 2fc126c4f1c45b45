"""From a planning/daily pair of scans to the network's input grid (METHOD.md, Data conventions).

The same function serves training (`jrs.training.data`) and re-contouring (`jrs.pipeline.run`):

1. pre-align the planning (moving) scan onto the daily (fixed) scan with `affine_prealign`;
2. resample both onto a 1 mm isotropic grid in the canonical orientation (direction = identity,
   i.e. LPS axes, so a head-first-supine, a feet-first and a prone scan all look the same to the
   network), covering the daily body or a requested box; images linearly (planning through the
   affine transform), labels per-label linear + arg-max;
3. clip HU to [-1000, 1000] and divide by 1000.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from jrs.core.errors import InvalidInput
from jrs.core.geometry import Geometry, Volume
from jrs.registration.prealign import AffineResult, affine_prealign, body_mask

HU_MIN = -1000.0
HU_MAX = 1000.0
HU_SCALE = 1000.0
NETWORK_SPACING_MM = 1.0


def normalise_hu(hu: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """Clip HU to [-1000, 1000] and divide by 1000 (METHOD.md intensity transform)."""
    return (np.clip(np.asarray(hu, dtype=np.float32), HU_MIN, HU_MAX) / HU_SCALE).astype(np.float32)


def canonical_grid(
    lower: npt.ArrayLike,
    upper: npt.ArrayLike,
    spacing: float = NETWORK_SPACING_MM,
    frame_of_reference_uid: str | None = None,
) -> Geometry:
    """An identity-direction isotropic grid whose voxel centres cover the LPS box [lower, upper].

    Args:
        lower: (3,) LPS corner with the smallest coordinates, mm.
        upper: (3,) LPS corner with the largest coordinates, mm.
        spacing: voxel size, mm.
        frame_of_reference_uid: frame of the grid.

    Returns:
        The grid; its origin is `lower` rounded down to a multiple of `spacing`.
    """
    lo = np.floor(np.asarray(lower, float) / spacing) * spacing
    hi = np.asarray(upper, float)
    if np.any(hi <= lo):
        raise InvalidInput(f"empty box: lower {lo.tolist()} >= upper {hi.tolist()} (mm)")
    n = np.floor((hi - lo) / spacing + 1e-6).astype(int) + 1
    return Geometry(
        shape=(int(n[2]), int(n[1]), int(n[0])),
        origin=lo,
        spacing=np.full(3, spacing),
        frame_of_reference_uid=frame_of_reference_uid,
    )


def body_box(ct: Volume, margin_mm: float = 5.0) -> tuple[np.ndarray, np.ndarray]:
    """LPS bounding box (lower, upper) of the body in a CT, mm, grown by `margin_mm`."""
    mask = sitk.GetArrayFromImage(body_mask(ct.to_sitk()))
    return mask_box(mask, ct.geometry, margin_mm)


def mask_box(
    mask: npt.ArrayLike, geometry: Geometry, margin_mm: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """LPS bounding box (lower, upper) of a mask's voxel centres, grown by `margin_mm`, mm."""
    kji = np.argwhere(np.asarray(mask) > 0)
    if kji.size == 0:
        raise InvalidInput("cannot compute the bounding box of an empty mask")
    lo_idx, hi_idx = kji.min(axis=0)[::-1], kji.max(axis=0)[::-1]
    corners = np.array(
        [
            [a, b, c]
            for a in (lo_idx[0], hi_idx[0])
            for b in (lo_idx[1], hi_idx[1])
            for c in (lo_idx[2], hi_idx[2])
        ],
        dtype=float,
    )
    pts = geometry.index_to_physical(corners)
    return pts.min(axis=0) - margin_mm, pts.max(axis=0) + margin_mm


@dataclass
class PreparedPair:
    """A planning/daily pair on the network grid.

    Attributes:
        grid: the 1 mm canonical grid (frame of reference of the daily scan).
        fixed: daily CT, normalised intensities, (nz, ny, nx) float32.
        moving: planning CT after affine pre-alignment, normalised, (nz, ny, nx) float32.
        moving_labels: planning label map (0..4) after pre-alignment, (nz, ny, nx) uint8.
        fixed_labels: daily label map when known (training/evaluation), else None.
        body: daily body mask on the grid, (nz, ny, nx) uint8.
        prealign: the affine pre-alignment (daily point -> planning point, mm).
    """

    grid: Geometry
    fixed: npt.NDArray[np.float32]
    moving: npt.NDArray[np.float32]
    moving_labels: npt.NDArray[np.uint8]
    fixed_labels: npt.NDArray[np.uint8] | None
    body: npt.NDArray[np.uint8]
    prealign: AffineResult


def prepare_pair(
    daily_ct: Volume,
    planning_ct: Volume,
    planning_labels: Volume,
    *,
    daily_labels: Volume | None = None,
    box: tuple[npt.ArrayLike, npt.ArrayLike] | None = None,
    prealign: AffineResult | None = None,
    spacing: float = NETWORK_SPACING_MM,
    seed: int = 0,
) -> PreparedPair:
    """Pre-align the planning scan onto the daily scan and resample both to the network grid.

    Args:
        daily_ct: daily CT in HU (fixed).
        planning_ct: planning CT in HU (moving).
        planning_labels: planning label map 0..4 on the planning CT grid (uint8).
        daily_labels: daily label map on the daily CT grid, when known.
        box: LPS box (lower, upper) to cover, mm; defaults to the daily body's bounding box.
        prealign: a pre-computed pre-alignment (skips the registration).
        spacing: network grid spacing, mm.
        seed: registration sampling seed.

    Returns:
        The prepared pair.
    """
    planning_ct.geometry.require_same_grid(planning_labels.geometry, "planning CT and labels")
    if daily_labels is not None:
        daily_ct.geometry.require_same_grid(daily_labels.geometry, "daily CT and labels")
    reg = prealign if prealign is not None else affine_prealign(daily_ct, planning_ct, seed=seed)
    lower, upper = box if box is not None else body_box(daily_ct)
    grid = canonical_grid(lower, upper, spacing, daily_ct.geometry.frame_of_reference_uid)
    fixed = daily_ct.resample(grid, "linear", HU_MIN)
    moving = planning_ct.resample(grid, "linear", HU_MIN, transform=reg.transform)
    moving_labels = planning_labels.resample(grid, "label", 0, transform=reg.transform)
    fixed_labels = (
        daily_labels.resample(grid, "label", 0).array.astype(np.uint8)
        if daily_labels is not None
        else None
    )
    body = sitk.GetArrayFromImage(body_mask(fixed.to_sitk())).astype(np.uint8)
    return PreparedPair(
        grid=grid,
        fixed=normalise_hu(fixed.array),
        moving=normalise_hu(moving.array),
        moving_labels=moving_labels.array.astype(np.uint8),
        fixed_labels=fixed_labels,
        body=body,
        prealign=reg,
    )
