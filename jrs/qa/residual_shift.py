"""How far off is the mapping around a contour? A check of the registration where it matters.

A propagated contour (a femoral head, a PTV, an organ taken from the registration path) lies
wherever the mapping puts it. Where the mapping is locally off (a femoral head that moved against
the prostate-centred pre-alignment, a rectum wall the network did not follow), the planning CT
mapped onto the daily CT is off there by the same amount, and so is the contour.
`residual_shift` measures that amount: the translation of the mapped planning CT that best
matches the daily CT (normalised cross-correlation, NCC) in a band around the contour, searched
coarse to fine over up to `RESIDUAL_RANGE_MM`. The same scan twice gives 0; a mapping that is
4 mm off around a femoral head gives about 4 mm.

It is a figure of the mapping, not of the planning contour: a planning contour drawn off the
organ and carried faithfully is `jrs.qa.contour_fit`'s business.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from jrs.core.geometry import Geometry

#: HU window: bone kept (femoral heads, sacrum: the strongest texture there is), gas clipped.
RESIDUAL_WINDOW_HU: tuple[float, float] = (-250.0, 750.0)
#: Gaussian sigma applied to both scans, mm (CT noise down, a 0.5 mm step still resolved).
RESIDUAL_SMOOTH_MM = 1.0
#: Half width of the band around the contour's surface, mm (inside and outside).
RESIDUAL_BAND_MM = 4.0
#: The band is sampled every this many mm per axis (at least every voxel).
RESIDUAL_SAMPLE_MM = 2.0
#: Longest translation searched, mm.
RESIDUAL_RANGE_MM = 6.0
#: Coarse search step, mm; then refined around the best by these steps, mm.
RESIDUAL_COARSE_MM = 2.0
RESIDUAL_REFINE_MM: tuple[float, ...] = (1.0, 0.5)
#: Fewest band samples for a figure (else None) ...
MIN_RESIDUAL_SAMPLES = 64
#: ... and most: a larger band is thinned evenly to this many (the NCC of a few thousand samples
#: is as sharp; a bladder's band would cost ten times as much).
MAX_RESIDUAL_SAMPLES = 4000
#: Least standard deviation of the daily CT in the band, HU: a band without structure (uniform
#: tissue) gives no figure.
MIN_RESIDUAL_STD_HU = 2.0


def _grid_shifts(step: float, reach: float, ball: bool = False) -> npt.NDArray[np.float64]:
    """(n, 3) translations (z, y, x), mm, on a cubic grid of ``step`` within +-``reach`` per axis.

    With ``ball``, only those within ``reach`` of no translation.
    """
    k = round(reach / step)
    axis = np.arange(-k, k + 1, dtype=float) * step
    zz, yy, xx = np.meshgrid(axis, axis, axis, indexing="ij")
    shifts = np.stack([zz.ravel(), yy.ravel(), xx.ravel()], axis=1)
    if ball:
        shifts = shifts[np.linalg.norm(shifts, axis=1) <= reach + 1e-9]
    return shifts


def _band(mask: npt.NDArray[np.bool_], spacing_zyx: npt.NDArray[np.float64], band_mm: float) -> Any:
    inside = ndimage.distance_transform_edt(mask, sampling=spacing_zyx)
    outside = ndimage.distance_transform_edt(~mask, sampling=spacing_zyx)
    return ((inside > 0) & (inside <= band_mm)) | ((outside > 0) & (outside <= band_mm))


def residual_shift(
    daily: npt.NDArray[np.floating[Any]],
    mapped: npt.NDArray[np.floating[Any]],
    mask: npt.NDArray[np.bool_],
    grid: Geometry,
    *,
    hu_per_unit: float = 1.0,
    window_hu: tuple[float, float] = RESIDUAL_WINDOW_HU,
    smooth_mm: float = RESIDUAL_SMOOTH_MM,
    band_mm: float = RESIDUAL_BAND_MM,
    sample_mm: float = RESIDUAL_SAMPLE_MM,
    reach_mm: float = RESIDUAL_RANGE_MM,
) -> dict[str, Any]:
    """The translation of the mapped planning CT that best matches the daily CT around a contour.

    Both scans are clipped to ``window_hu`` and smoothed; the band (voxels within ``band_mm`` of
    the contour's surface, inside and outside) is sampled every ``sample_mm``. The NCC of the
    daily CT with the mapped planning CT moved by ``t`` (``mapped(p + t)``) is maximised over a
    cubic grid of `RESIDUAL_COARSE_MM` within ``reach_mm`` of none, then refined around the best by
    each step of `RESIDUAL_REFINE_MM`. Only the crop around the contour is processed.

    Args:
        daily: (nz, ny, nx) daily CT on ``grid`` (HU / ``hu_per_unit``).
        mapped: (nz, ny, nx) planning CT mapped onto ``grid`` by the final mapping, same units.
        mask: (nz, ny, nx) the contour on ``grid``.
        grid: the grid of every array.
        hu_per_unit: HU per image unit.
        window_hu: HU window the scans are compared in.
        smooth_mm: Gaussian sigma applied to both scans, mm (0: none).
        band_mm: half width of the band around the surface, mm.
        sample_mm: band sampling step per axis, mm.
        reach_mm: longest translation searched, mm.

    Returns:
        ``{"residual_shift_mm", "residual_shift_xyz_mm", "residual_ncc", "residual_ncc_gain"}``:
        the best translation's length (mm) and LPS vector (x, y, z, mm: where the planning CT's
        anatomy lies against the mapping's), the NCC there, and how much it exceeds the NCC
        without translation; all None when the band is too small or has no structure
        (`MIN_RESIDUAL_SAMPLES`, `MIN_RESIDUAL_STD_HU`).
    """
    out: dict[str, Any] = {
        "residual_shift_mm": None,
        "residual_shift_xyz_mm": None,
        "residual_ncc": None,
        "residual_ncc_gain": None,
    }
    mask = np.asarray(mask, bool)
    if not mask.any():
        return out
    spacing_zyx = np.asarray(grid.spacing, float)[::-1]
    sigma_vox = np.full(3, float(smooth_mm)) / spacing_zyx
    pad = np.ceil((band_mm + reach_mm + 1.0) / spacing_zyx + 2.0 * sigma_vox).astype(int) + 1
    nz = np.nonzero(mask)
    lo = [max(int(a.min()) - p, 0) for a, p in zip(nz, pad, strict=True)]
    hi = [min(int(a.max()) + p + 1, n) for a, p, n in zip(nz, pad, mask.shape, strict=True)]
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    low, high = window_hu[0] / hu_per_unit, window_hu[1] / hu_per_unit

    def prepared(image: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float32]:
        crop = np.clip(np.asarray(image[box], np.float32), low, high)
        return ndimage.gaussian_filter(crop, sigma_vox) if smooth_mm > 0 else crop

    d, m = prepared(daily), prepared(mapped)
    band = _band(mask[box], spacing_zyx, band_mm)
    stride = np.maximum(np.rint(sample_mm / spacing_zyx).astype(int), 1)
    idx = np.argwhere(band)
    idx = idx[np.all(idx % stride == 0, axis=1)]
    if len(idx) < MIN_RESIDUAL_SAMPLES:
        return out
    if len(idx) > MAX_RESIDUAL_SAMPLES:
        idx = idx[np.linspace(0, len(idx) - 1, MAX_RESIDUAL_SAMPLES).round().astype(int)]
    dv = d[tuple(idx.T)].astype(np.float64)
    if dv.std() * hu_per_unit < MIN_RESIDUAL_STD_HU:
        return out
    dv = (dv - dv.mean()) / np.linalg.norm(dv - dv.mean())
    points = idx.astype(np.float64)

    def ncc(shifts_mm: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """NCC for each (z, y, x) translation, mm."""
        steps = shifts_mm / spacing_zyx  # voxels
        coords = points[None, :, :] + steps[:, None, :]  # (k, n, 3)
        values = ndimage.map_coordinates(
            m, coords.reshape(-1, 3).T, order=1, mode="nearest"
        ).reshape(len(shifts_mm), len(points))
        values = values - values.mean(axis=1, keepdims=True)
        norm = np.linalg.norm(values, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            r = (values @ dv) / norm
        return np.where(norm > 0, r, -1.0)

    zero = np.zeros((1, 3))
    at_zero = float(ncc(zero)[0])
    candidates = _grid_shifts(RESIDUAL_COARSE_MM, reach_mm, ball=True)
    scores = ncc(candidates)
    k = int(np.argmax(scores))  # first maximum: deterministic
    best, best_score = candidates[k], float(scores[k])
    for step in RESIDUAL_REFINE_MM:
        local = best[None, :] + _grid_shifts(step, step)
        local = local[np.linalg.norm(local, axis=1) <= reach_mm + 1e-9]
        s = ncc(local)
        j = int(np.argmax(s))
        if s[j] > best_score:
            best, best_score = local[j], float(s[j])
    if best_score <= at_zero:  # no translation does better: none
        best, best_score = np.zeros(3), at_zero
    direction = np.asarray(grid.direction, float)
    xyz = direction @ best[::-1]
    out.update(
        residual_shift_mm=round(float(np.linalg.norm(best)), 2),
        residual_shift_xyz_mm=[round(float(v), 2) for v in xyz],
        residual_ncc=round(best_score, 4),
        residual_ncc_gain=round(best_score - at_zero, 4),
    )
    return out
