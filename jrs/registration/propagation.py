"""Propagation of planning contours onto the daily CT through a mapping."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from jrs.core.geometry import Geometry, Volume
from jrs.core.labels import (
    is_external_roi,
)
from jrs.inference.postprocess import COMPONENTS_KEPT, keep_largest_components
from jrs.registration.boxes import crop_to_mask, index_box, intersect_boxes, nonzero_box, sub_grid

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


def mask_on_grid(
    mask: npt.NDArray[np.bool_], geometry: Geometry, grid: Geometry
) -> npt.NDArray[np.uint8]:
    """A mask resampled (nearest neighbour) onto another grid, only around its bounding box.

    Args:
        mask: (nz, ny, nx) mask on ``geometry``.
        geometry: its grid.
        grid: the grid to resample onto.

    Returns:
        (nz', ny', nx') 0/1 mask on ``grid`` (all 0 when the mask is empty or outside it).
    """
    out = np.zeros(grid.shape, np.uint8)
    box = nonzero_box(mask, 1)
    if box is None:
        return out
    local = Volume(np.ascontiguousarray(mask[box], dtype=np.uint8), sub_grid(geometry, box))
    target = index_box(grid, local.geometry.corners(), float(np.max(grid.spacing)))
    if target is not None:
        out[target] = local.resample(sub_grid(grid, target), "label", 0).array
    return out


def largest_components(labels: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """`keep_largest_components`, each organ's components found inside its own bounding box.

    The same result as on the whole grid (components do not leave the box of their voxels), at
    the cost of the organs' boxes rather than of the network box.
    """
    out = np.zeros(labels.shape, np.uint8)
    for organ, keep in COMPONENTS_KEPT.items():
        box = nonzero_box(labels == organ)
        if box is None:
            continue
        kept = keep_largest_components(np.ascontiguousarray(labels[box]), {organ: keep}) == organ
        out[box][kept] = organ
    return out


def warp_labels(
    labels: npt.NDArray[np.uint8], dvf: npt.NDArray[np.float32], grid: Geometry, reach_mm: float
) -> npt.NDArray[np.uint8]:
    """Labels warped by a pull field on their own grid (`jrs.core.fields.warp`, ``label``).

    The result of ``warp(labels, dvf, "label", 0)``: each label's one-hot map interpolated
    linearly at ``p + u(p)`` (background outside the grid), the largest wins (ties: the lowest
    label); SimpleITK's ``sitkLabelLinear`` interpolator, multi-threaded, and only inside the
    labels' bounding box grown by the field's reach (no voxel further away can pull a label).

    Args:
        labels: (nz, ny, nx) label map on ``grid``.
        dvf: (nz, ny, nx, 3) pull displacement on ``grid``, mm, LPS (x, y, z) components.
        grid: the grid.
        reach_mm: largest displacement length, mm.

    Returns:
        (nz, ny, nx) warped label map, dtype of ``labels``.
    """
    out = np.zeros(labels.shape, labels.dtype)
    pad = int(np.ceil(reach_mm / float(grid.spacing.min()))) + 2
    box = nonzero_box(labels, pad)
    if box is None:
        return out
    source = Volume(np.ascontiguousarray(labels[box]), sub_grid(grid, box)).to_sitk()
    field = sitk.GetImageFromArray(np.ascontiguousarray(dvf[box], dtype=np.float64), isVector=True)
    field.CopyInformation(source)
    transform = sitk.DisplacementFieldTransform(field)
    warped = sitk.Resample(source, source, transform, sitk.sitkLabelLinear, 0)
    out[box] = sitk.GetArrayViewFromImage(warped)
    return out


def with_overlaps(
    labels: npt.NDArray[np.uint8],
    label: int,
    moved: Mapping[int, npt.NDArray[np.bool_]],
) -> npt.NDArray[np.bool_]:
    """An organ of a label map, plus its planning overlaps with the other organs, moved.

    A label map holds one organ a voxel, so the voxels the planning contours of two organs share
    (seminal vesicles entering the prostate) went to one of them. They are given back to the
    organ: the voxels where its moved planning contour and another organ's moved planning contour
    overlap, and which the map gave to that other organ.

    Args:
        labels: (nz, ny, nx) organ label map on the daily grid (one organ a voxel).
        label: the organ's id.
        moved: organ id -> (nz, ny, nx) that organ's planning contour moved onto the daily grid
            (by the registration), for every organ delineated.

    Returns:
        (nz, ny, nx) the organ's mask.
    """
    own = labels == label
    mine = moved.get(label)
    if mine is None:
        return own
    for other, theirs in moved.items():
        if other != label:
            own |= mine & theirs & (labels == other)
    return own


def propagate_mask(
    mask: Volume,
    daily: Geometry,
    prealign: sitk.AffineTransform,
    full: sitk.Transform | None = None,
    network_box: tuple[slice, slice, slice] | None = None,
    reach_mm: float = 0.0,
    outer: sitk.Transform | None = None,
    outer_reach_mm: float = 0.0,
) -> npt.NDArray[np.bool_]:
    """A planning mask on the daily grid through ``full`` (pull: daily point -> planning point).

    Equivalent to resampling the whole 0/1 mask linearly onto the whole daily grid and keeping
    ``>= 0.5``, but only the mask's own bounding box is resampled: the daily region whose
    pre-aligned image can reach it (the affine pre-image of the box grown by ``reach_mm``, the
    largest network displacement). There ``prealign`` alone maps daily to planning points, except
    inside ``network_box`` (slices of the daily grid), where ``full`` (the affine plus the
    tapered network field, which is zero outside that box) is used.

    Args:
        mask: (nz, ny, nx) planning mask, non-zero inside.
        daily: the daily CT grid.
        prealign: the affine pre-alignment (daily point -> planning point).
        full: the whole mapping; None = the affine alone.
        network_box: where ``full`` differs from ``prealign`` (slices of the daily grid).
        reach_mm: largest length of the network displacement, mm.
        outer: the mapping outside ``network_box`` (`jrs.registration.far_field`: the pre-alignment
            after
            the far-field correction); None = ``prealign``.
        outer_reach_mm: largest length of the far-field correction, mm.

    Returns:
        (nz, ny, nx) boolean mask on the daily grid.
    """
    out = np.zeros(daily.shape, dtype=bool)
    crop = crop_to_mask(mask)
    if crop is None:
        return out
    inverse = prealign.GetInverse()
    corners = np.array(
        [inverse.TransformPoint(tuple(map(float, p))) for p in crop.geometry.corners()]
    )
    pad = (
        2.0 * float(daily.spacing.max())
        + (float(reach_mm) if full is not None else 0.0)
        + float(outer_reach_mm)
    )
    box = index_box(daily, corners, pad)
    if box is None:
        return out
    source = crop.with_array(crop.array.astype(np.float32))
    inner = (
        intersect_boxes(box, network_box) if full is not None and network_box is not None else None
    )
    if inner != box:  # (a ROI the network box covers needs the full mapping alone)
        out[box] = (
            source.resample(sub_grid(daily, box), "linear", 0.0, transform=outer or prealign).array
            >= 0.5
        )
    if full is not None and inner is not None:
        warped = source.resample(sub_grid(daily, inner), "linear", 0.0, transform=full)
        out[inner] = warped.array >= 0.5
    return out


def planned_on_daily(
    planning_masks: Mapping[str, Volume],
    used: Mapping[int, str],
    prealign: sitk.AffineTransform,
    daily: Geometry,
) -> dict[str, npt.NDArray[np.bool_]]:
    """Planning organ masks after pre-alignment only (the dashed contours of the review)."""
    return {name: propagate_mask(planning_masks[name], daily, prealign) for name in used.values()}


def propagation_region(structure_set: Any, masks: Mapping[str, Volume], ct: Volume) -> Volume:
    """The union of the ROIs but the patient's outline (all of them when that leaves none)."""
    outline = {r.name for r in structure_set.rois if is_external_roi(r.name, r.interpreted_type)}
    union = np.zeros(ct.geometry.shape, np.uint8)
    for name, mask in masks.items():
        if name not in outline:
            union |= np.asarray(mask.array, bool)
    if not union.any():
        for mask in masks.values():
            union |= np.asarray(mask.array, bool)
    return ct.with_array(union)
