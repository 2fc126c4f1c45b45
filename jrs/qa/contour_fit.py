"""Does a contour sit on the edges of the daily CT? A model-free check of where a contour lies.

A contour that the mapping carried faithfully from a *wrong* planning contour (drawn a few mm
off the organ) agrees with the mapping and with the planning CT: no figure of the model or of
the two scans' agreement can see it. The daily CT alone can: the organ's boundary is an edge of
the image, and a contour drawn off the organ sits beside that edge, not on it.

`contour_fit` measures, for one contour on one image, how strongly the image's edges run along
the contour's surface (the mean of the image gradient's component along the surface normal,
over the surface), and how much stronger they are when the whole contour is moved by a few mm
in the best direction. A contour on its organ is at (or within noise of) the best position; a
contour drawn 5-8 mm off fits clearly better when moved back.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from jrs.core.geometry import Geometry

#: HU window of the fit: bone and gas are clipped, so that a contour next to bone or rectal gas is
#: not pulled onto that edge by its strength alone.
FIT_WINDOW_HU: tuple[float, float] = (-200.0, 200.0)
#: Gaussian sigma of the image gradient, mm (CT noise down; a 5 mm shift stays visible).
FIT_SMOOTH_MM = 1.5
#: The translations tried: every one of the 26 directions of a 3 x 3 x 3 neighbourhood (unit
#: length) at each of these distances, mm, and no translation.
FIT_SHIFTS_MM: tuple[float, ...] = (2.0, 4.0, 6.0, 8.0)
#: The surface is sampled every this many mm per axis.
FIT_SAMPLE_MM = 2.0
#: Fewest surface samples for a figure (else None).
MIN_SURFACE_SAMPLES = 32
#: Least edge strength at the best position, HU/mm: a contour on no edge at all (an organ that
#: the CT does not show) gives no figure.
MIN_EDGE_HU_PER_MM = 1.0


def _directions() -> npt.NDArray[np.float64]:
    """(26, 3) unit vectors (z, y, x) of a 3 x 3 x 3 neighbourhood without its centre."""
    unit = (-1, 0, 1)
    steps = np.array(
        [(a, b, c) for a in unit for b in unit for c in unit if (a, b, c) != (0, 0, 0)], float
    )
    return steps / np.linalg.norm(steps, axis=1, keepdims=True)


def fit_shifts_mm(distances: tuple[float, ...] = FIT_SHIFTS_MM) -> npt.NDArray[np.float64]:
    """(1 + 26 * len(distances), 3) translations (z, y, x), mm; the first is no translation."""
    dirs = _directions()
    return np.concatenate([np.zeros((1, 3))] + [dirs * d for d in distances])


def contour_fit(
    image: npt.NDArray[np.floating[Any]],
    mask: npt.NDArray[np.bool_],
    grid: Geometry,
    *,
    hu_per_unit: float = 1.0,
    window_hu: tuple[float, float] = FIT_WINDOW_HU,
    smooth_mm: float = FIT_SMOOTH_MM,
    distances: tuple[float, ...] = FIT_SHIFTS_MM,
    sample_mm: float = FIT_SAMPLE_MM,
) -> dict[str, Any]:
    """How well a contour sits on the image's edges, and how much better a translation fits.

    The edge strength of the contour moved by ``t`` is ``E(t) = mean_i |g(p_i + t) . n_i|``
    over surface samples ``p_i`` with outward normals ``n_i``, where ``g`` is the gradient of
    the image (clipped to ``window_hu``, Gaussian derivative of ``smooth_mm``), HU/mm.

    Args:
        image: (nz, ny, nx) CT on ``grid`` (HU / ``hu_per_unit``).
        mask: (nz, ny, nx) the contour's mask on ``grid``.
        grid: the grid of both (spacing in mm).
        hu_per_unit: HU per image unit (1000 for the network's normalised intensities).
        window_hu: HU window of the fit.
        smooth_mm: Gaussian sigma of the gradient, mm.
        distances: lengths of the translations tried, mm (26 directions each).
        sample_mm: the surface is sampled every this many mm per axis.

    Returns:
        ``{"image_fit_edge", "image_fit_gain", "image_fit_shift_mm", "image_fit_shift_xyz_mm",
        "surface_samples"}``: ``E(0)`` (HU/mm), ``max_t E(t) / E(0) - 1`` (0 when the contour
        is where it fits best), the length (mm) and LPS vector of the best ``t``. The figures
        are None for an empty or tiny contour or one on no edge (`MIN_SURFACE_SAMPLES`,
        `MIN_EDGE_HU_PER_MM`).
    """
    out: dict[str, Any] = {
        "image_fit_edge": None,
        "image_fit_gain": None,
        "image_fit_shift_mm": None,
        "image_fit_shift_xyz_mm": None,
        "surface_samples": 0,
    }
    m = np.ascontiguousarray(mask, dtype=bool)
    found = ndimage.find_objects(m.view(np.uint8))
    if not found or found[0] is None:
        return out
    spacing_zyx = np.asarray(grid.spacing, float)[::-1]
    shape = np.array(m.shape)
    sigma_vox = np.full(3, float(smooth_mm)) / spacing_zyx
    reach = np.ceil(max(distances, default=0.0) / spacing_zyx).astype(int)
    pad = reach + np.ceil(3.0 * sigma_vox).astype(int) + 2
    lo = np.maximum(np.array([s.start for s in found[0]]) - pad, 0)
    hi = np.minimum(np.array([s.stop for s in found[0]]) + pad, shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    local = m[box]
    crop = np.clip(np.asarray(image[box], np.float32) * np.float32(hu_per_unit), *window_hu)
    # gradient of the clipped image, HU/mm per (z, y, x) axis
    grads = [
        ndimage.gaussian_filter(
            crop, sigma_vox.tolist(), order=[int(a == ax) for a in range(3)], mode="nearest"
        )
        / np.float32(spacing_zyx[ax])
        for ax in range(3)
    ]
    # surface samples and their outward normals (minus the gradient of the smoothed mask)
    surface = local & ~ndimage.binary_erosion(local)
    stride = np.maximum(np.rint(sample_mm / spacing_zyx).astype(int), 1)
    keep = np.zeros_like(surface)
    keep[:: stride[0], :: stride[1], :: stride[2]] = True
    kji = np.argwhere(surface & keep)
    out["surface_samples"] = int(kji.shape[0])
    if kji.shape[0] < MIN_SURFACE_SAMPLES:
        return out
    soft = ndimage.gaussian_filter(local.astype(np.float32), 1.0)
    normal = -np.stack(
        [np.gradient(soft, axis=ax)[tuple(kji.T)] / spacing_zyx[ax] for ax in range(3)], axis=1
    )
    norm = np.linalg.norm(normal, axis=1, keepdims=True)
    ok = norm[:, 0] > 1e-6
    kji, normal = kji[ok], normal[ok] / norm[ok]
    if kji.shape[0] < MIN_SURFACE_SAMPLES:
        return out
    # a mask's boundary voxel centre lies half a voxel inside the drawn outline: sample the
    # surface itself, half a voxel out along the normal (on a coarse CT grid, 1-1.5 mm)
    half_mm = 0.5 * np.abs(normal) @ spacing_zyx  # (n,) mm
    surface_vox = kji + normal * (half_mm[:, None] / spacing_zyx)
    shifts = fit_shifts_mm(distances)  # (n_t, 3) mm, z y x
    pos = surface_vox[None, :, :] + (shifts / spacing_zyx)[:, None, :]
    coords = pos.reshape(-1, 3).T
    along = np.zeros(coords.shape[1], np.float64)
    for ax in range(3):
        g = ndimage.map_coordinates(grads[ax], coords, order=1, mode="nearest", prefilter=False)
        along += g * np.tile(normal[:, ax], len(shifts))
    edge = np.abs(along).reshape(len(shifts), -1).mean(axis=1)  # (n_t,) HU/mm
    best = int(np.argmax(edge))
    if edge[best] < MIN_EDGE_HU_PER_MM or edge[0] <= 0:
        return out
    step_zyx = shifts[best]
    direction = np.asarray(grid.direction, float)
    xyz = direction @ step_zyx[::-1]
    out.update(
        image_fit_edge=round(float(edge[0]), 3),
        image_fit_gain=round(float(edge[best] / edge[0] - 1.0), 4),
        image_fit_shift_mm=round(float(np.linalg.norm(step_zyx)), 2),
        image_fit_shift_xyz_mm=[round(float(v), 2) for v in xyz],
    )
    return out
