"""Image evidence around a contour: does the daily CT agree with the planning CT mapped onto it?

Model-independent figures per organ, inside a band around its contour: the normalised cross
correlation of the two images, how much better they agree when the mapping is shifted, the
centroid's shift from the pre-alignment.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from jrs.core.geometry import Geometry

#: HU window the two scans are compared in (`image_evidence`): bone and gas are clipped, so
#: that rectal gas that came or went, or a bone edge, does not dominate the soft-tissue figure.
IMAGE_WINDOW_HU: tuple[float, float] = (-250.0, 250.0)


#: Half width of the band around the organ's surface where the scans are compared, mm.
IMAGE_BAND_MM = 5.0


#: Gaussian smoothing of both scans before they are compared (sigma, mm): CT noise down.
IMAGE_SMOOTH_MM = 1.0


#: The band is sampled every this many mm per axis (the scans are smoothed; fewer samples, less
#: time).
IMAGE_SAMPLE_MM = 2.0


#: Fewest samples of a band for an image figure (else None).
MIN_BAND_SAMPLES = 64


#: Least standard deviation (HU, in the window) of either scan in the band for an NCC: a band
#: without structure says nothing about where the contour is.
MIN_BAND_STD_HU = 2.0


def _ncc(
    a: npt.NDArray[np.floating[Any]], b: npt.NDArray[np.floating[Any]], min_std: float
) -> float | None:
    """Pearson correlation of two samples (None when either has less spread than ``min_std``)."""
    if a.size < 2:
        return None
    a, b = a.astype(np.float64), b.astype(np.float64)
    da, db = a - a.mean(), b - b.mean()
    sa, sb = float(np.sqrt((da * da).mean())), float(np.sqrt((db * db).mean()))
    if sa < min_std or sb < min_std:
        return None
    return float((da * db).mean() / (sa * sb))


def _grown(
    box: tuple[slice, ...], pad: npt.NDArray[np.int_], shape: tuple[int, ...]
) -> tuple[slice, ...]:
    """A bounding box (slices) grown by ``pad`` voxels per axis, clipped to ``shape``."""
    return tuple(
        slice(max(int(s.start) - int(p), 0), min(int(s.stop) + int(p), n))
        for s, p, n in zip(box, pad, shape, strict=True)
    )


def _window(
    image: npt.NDArray[np.floating[Any]],
    box: tuple[slice, ...],
    hu_per_unit: float,
    window_hu: tuple[float, float],
    sigma_vox: npt.NDArray[np.float64],
) -> npt.NDArray[np.float32]:
    """The box of an image in HU, clipped to the window and smoothed (Gaussian, ``sigma_vox``)."""
    crop = np.clip(np.asarray(image[box], np.float32) * np.float32(hu_per_unit), *window_hu)
    if np.any(sigma_vox > 0):
        crop = ndimage.gaussian_filter(crop, sigma_vox.tolist(), mode="nearest", truncate=2.0)
    return crop


def image_evidence(
    daily: npt.NDArray[np.floating[Any]],
    prealigned: npt.NDArray[np.floating[Any]],
    displacement: npt.NDArray[np.floating[Any]] | None,
    grid: Geometry,
    daily_labels: npt.NDArray[np.integer[Any]],
    prealigned_labels: npt.NDArray[np.integer[Any]],
    labels: Iterable[int],
    *,
    hu_per_unit: float = 1.0,
    window_hu: tuple[float, float] = IMAGE_WINDOW_HU,
    band_mm: float = IMAGE_BAND_MM,
    smooth_mm: float = IMAGE_SMOOTH_MM,
    sample_mm: float = IMAGE_SAMPLE_MM,
) -> dict[int, dict[str, Any]]:
    """Image figures per organ that do not depend on the model: do the scans agree around it?

    For each label, inside the bounding box of its daily contour only:

    - ``image_ncc``: normalised cross-correlation (Pearson) of the daily CT with the planning CT
      pulled by the final mapping, ``prealigned(p + u(p))``, over a band around the daily
      contour's surface (the voxels with a voxel of the other side within ``band_mm`` along each
      axis, inside and outside), sampled every ``sample_mm``; both scans clipped to
      ``window_hu`` and smoothed by a Gaussian of ``smooth_mm``;
    - ``image_ncc_prealigned``: the same with the planning CT after the pre-alignment alone
      (``u = 0``), on the same band: what an affine gives;
    - ``centroid_shift_mm`` and ``centroid_shift_xyz_mm``: the daily contour's centroid minus the
      pre-aligned planning organ's centroid (length, and LPS vector), mm.

    A contour that the mapping moved where the daily CT does not show the organ gives a low
    ``image_ncc`` (and usually one lower than ``image_ncc_prealigned``); the same scan twice gives
    1.0 for both and no shift.

    Args:
        daily: (nz, ny, nx) daily CT on ``grid`` (HU / ``hu_per_unit``).
        prealigned: (nz, ny, nx) planning CT after the pre-alignment, on ``grid``, same units.
        displacement: (nz, ny, nx, 3) pull displacement on ``grid`` beyond the pre-alignment, mm,
            LPS (x, y, z) components (the final mapping is ``p -> A(p + u(p))``); None for none.
        grid: the grid of every array.
        daily_labels: (nz, ny, nx) integer label map of the daily contours.
        prealigned_labels: (nz, ny, nx) integer planning label map after the pre-alignment.
        labels: the label values to measure.
        hu_per_unit: HU per image unit (1000 for the network's normalised intensities).
        window_hu: HU window the scans are compared in.
        band_mm: half width of the band around the daily contour's surface, mm.
        smooth_mm: Gaussian sigma applied to both scans, mm (0: none).
        sample_mm: the band is sampled every this many mm per axis (at least every voxel).

    Returns:
        label -> ``{"image_ncc", "image_ncc_prealigned", "band_samples", "centroid_shift_mm",
        "centroid_shift_xyz_mm"}`` (``band_samples``: how many band samples the NCC is over); a
        figure is None where it cannot be measured (empty contour, a band with too few samples
        or no structure: `MIN_BAND_SAMPLES`, `MIN_BAND_STD_HU`).
    """
    wanted = sorted({int(v) for v in labels if int(v) > 0})
    out: dict[int, dict[str, Any]] = {}
    if not wanted:
        return out
    shape = tuple(int(n) for n in grid.shape)
    spacing_zyx = np.asarray(grid.spacing, float)[::-1]
    direction = np.asarray(grid.direction, float)
    sigma_vox = np.full(3, float(smooth_mm)) / spacing_zyx
    band_vox = np.maximum(np.rint(band_mm / spacing_zyx).astype(int), 1)
    spacing_xyz = np.asarray(grid.spacing, np.float32)
    pad = band_vox + np.ceil(2.0 * sigma_vox).astype(int) + 1
    stride = np.maximum(np.rint(sample_mm / spacing_zyx).astype(int), 1)
    sub = tuple(slice(None, None, int(n)) for n in stride)
    smooth_pad = np.ceil(2.0 * sigma_vox).astype(int) + 1
    daily_boxes = ndimage.find_objects(np.asarray(daily_labels), max_label=wanted[-1])
    planning_boxes = ndimage.find_objects(np.asarray(prealigned_labels), max_label=wanted[-1])

    def centroid(lab_map: npt.NDArray[Any], box: tuple[slice, ...], lab: int) -> Any:
        local = ndimage.center_of_mass(np.asarray(lab_map[box] == lab, np.float32))
        return np.asarray(local) + np.array([s.start for s in box], float)

    for lab in wanted:
        figures: dict[str, Any] = {
            "image_ncc": None,
            "image_ncc_prealigned": None,
            "band_samples": 0,
            "centroid_shift_mm": None,
            "centroid_shift_xyz_mm": None,
        }
        out[lab] = figures
        dbox, pbox = daily_boxes[lab - 1], planning_boxes[lab - 1]
        if dbox is None:
            continue
        if pbox is not None:
            step_zyx = centroid(daily_labels, dbox, lab) - centroid(prealigned_labels, pbox, lab)
            shift = direction @ (step_zyx[::-1] * np.asarray(grid.spacing, float))
            figures["centroid_shift_mm"] = round(float(np.linalg.norm(shift)), 2)
            figures["centroid_shift_xyz_mm"] = [round(float(v), 2) for v in shift]

        box = _grown(dbox, pad, shape)
        inside = np.asarray(daily_labels[box] == lab, np.uint8)
        # the band: voxels within band_mm (per axis) of a voxel on the other side of the surface
        size = tuple(int(v) for v in 2 * band_vox + 1)
        band = ndimage.maximum_filter(inside, size=size, mode="constant", cval=0) != (
            ndimage.minimum_filter(inside, size=size, mode="constant", cval=0)
        )
        # every ``stride``-th voxel of the band (the scans are smoothed: neighbours say the same)
        band = band[sub]
        kji = np.argwhere(band) * stride  # (n, 3) local (k, j, i)
        figures["band_samples"] = int(kji.shape[0])
        if kji.shape[0] < MIN_BAND_SAMPLES:
            continue
        lo = np.array([s.start for s in box])
        fixed = _window(daily, box, hu_per_unit, window_hu, sigma_vox)[sub][band]
        # where the final mapping samples the pre-aligned planning CT: q + D^T u / spacing
        pos = (kji + lo).astype(np.float32)
        if displacement is not None:
            u = np.asarray(displacement[box][sub][band], np.float32)  # (n, 3) mm, (x, y, z)
            pos += ((u @ direction.astype(np.float32)) / spacing_xyz)[:, ::-1]
        src_lo = np.maximum(np.minimum(np.floor(pos.min(axis=0)).astype(int), lo) - smooth_pad, 0)
        src_hi = np.minimum(
            np.maximum(np.ceil(pos.max(axis=0)).astype(int) + 1, [s.stop for s in box])
            + smooth_pad,
            shape,
        )
        src_box = tuple(slice(int(a), int(b)) for a, b in zip(src_lo, src_hi, strict=True))
        moving = _window(prealigned, src_box, hu_per_unit, window_hu, sigma_vox)
        affine = moving[tuple((kji + lo - src_lo).T)]
        pos -= src_lo.astype(np.float32)
        warped = ndimage.map_coordinates(moving, pos.T, order=1, mode="nearest", prefilter=False)
        ncc = _ncc(fixed, warped, MIN_BAND_STD_HU)
        ncc0 = _ncc(fixed, affine, MIN_BAND_STD_HU)
        figures["image_ncc"] = None if ncc is None else round(ncc, 4)
        figures["image_ncc_prealigned"] = None if ncc0 is None else round(ncc0, 4)
    return out


def structure_evidence(figures: Mapping[str, Any] | None) -> dict[str, Any]:
    """The `StructureQa` fields of one organ's `image_evidence` figures (none when None)."""
    if not figures:
        return {}
    keys = (
        "image_ncc",
        "image_ncc_prealigned",
        "centroid_shift_mm",
        "centroid_shift_xyz_mm",
        "image_fit_gain",
        "image_fit_shift_mm",
    )
    return {k: figures.get(k) for k in keys}
