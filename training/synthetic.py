"""Tiny synthetic training pairs: organ-like blobs in a textured body that move (no DICOM).

For smoke tests, CI and quick experiments when no phantom or clinical data are at hand. The
"daily" (fixed) scan samples a scene at ``x``; the "planning" (moving) scan samples the same scene
at ``x + u(x)`` with a smooth random displacement ``u`` (a global shift plus a Gaussian bump of a
few voxels), so registering the pair is meaningful and a perfect registration gives NCC 1.
Organs: bladder, rectum, seminal vesicles and prostate as ellipsoids clustered around the volume's
centre, with distinct intensities so that segmentation is learnable.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from jrs.labels import BLADDER, PROSTATE, RECTUM, SEMINAL_VESICLES
from training.data import TrainingPair

__all__ = ["synthetic_pair"]

# label, centre offset from the volume centre (z, y, x) in units of size/8, radii in size/16,
# normalised intensity (HU / 1000)
_ORGANS: tuple[tuple[int, tuple[float, float, float], tuple[float, float, float], float], ...] = (
    (BLADDER, (1.2, -1.0, 0.0), (1.7, 1.6, 2.0), 0.35),
    (RECTUM, (-0.3, 1.3, 0.0), (2.4, 1.0, 1.0), -0.45),
    (SEMINAL_VESICLES, (1.0, 0.6, 0.0), (0.7, 0.7, 1.9), 0.15),
    (PROSTATE, (-0.6, -0.3, 0.0), (1.3, 1.2, 1.3), 0.55),
)


def _scene(
    coords: npt.NDArray[np.float64],
    size: int,
    texture: npt.NDArray[np.float32],
    scale: npt.NDArray[np.float64],
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """Image, labels and body mask of the scene sampled at voxel positions ``coords`` (3, ...)."""
    c = (size - 1) / 2.0
    rel = coords - c
    body = (
        (rel[0] / (0.46 * size)) ** 2
        + (rel[1] / (0.40 * size)) ** 2
        + (rel[2] / (0.46 * size)) ** 2
    ) <= 1.0
    tex = ndimage.map_coordinates(texture, coords, order=1, mode="nearest")
    image = np.where(body, 0.02 + tex, -1.0).astype(np.float32)
    labels = np.zeros(coords.shape[1:], dtype=np.uint8)
    for label, offset, radii, value in _ORGANS:
        centre = np.asarray(offset) * size / 8.0
        r = np.asarray(radii) * size / 16.0 * scale
        inside = (
            ((rel[0] - centre[0]) / r[0]) ** 2
            + ((rel[1] - centre[1]) / r[1]) ** 2
            + ((rel[2] - centre[2]) / r[2]) ** 2
        ) <= 1.0
        inside &= labels == 0
        labels[inside] = label
        image[inside] = value + 0.5 * tex[inside]
    return image, labels, body.astype(np.uint8)


def synthetic_pair(seed: int, size: int = 64, motion: float = 3.0) -> TrainingPair:
    """A synthetic planning/daily pair on a 1 mm grid.

    Args:
        seed: Random seed (texture, organ sizes, displacement).
        size: Edge of the cubic volume (voxels).
        motion: Scale of the displacement (voxels): global shift up to ``motion / 2`` per axis
            plus a Gaussian bump of amplitude ``motion`` around the organs.

    Returns:
        A :class:`~training.data.TrainingPair` with arrays ``(size, size, size)``.
    """
    rng = np.random.default_rng(seed)
    texture = ndimage.gaussian_filter(rng.normal(size=(size, size, size)), 1.5).astype(np.float32)
    texture *= 0.08 / max(float(texture.std()), 1e-6)
    scale = rng.uniform(0.85, 1.15, size=3)
    grid = np.indices((size, size, size), dtype=np.float64)
    fixed, fixed_labels, body = _scene(grid, size, texture, scale)
    shift = rng.uniform(-motion / 2, motion / 2, size=3)
    bump = rng.uniform(-motion, motion, size=3)
    c = (size - 1) / 2.0
    sigma = size / 5.0
    g = np.exp(-(((grid - c) ** 2).sum(axis=0)) / (2 * sigma**2))
    disp = shift[:, None, None, None] + bump[:, None, None, None] * g[None]
    moving, moving_labels, _ = _scene(grid + disp, size, texture, scale)
    return TrainingPair(
        key=f"synthetic{seed}_s{size}",
        fixed=fixed,
        moving=moving,
        fixed_labels=fixed_labels,
        moving_labels=moving_labels,
        body=body,
    )
