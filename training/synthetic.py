"""Tiny synthetic training pairs: organ-like blobs in a textured body that move (no DICOM).

For smoke tests, CI and quick experiments when no phantom or clinical data are at hand. The
"daily" (fixed) scan samples a scene at ``x``; the "planning" (moving) scan samples the same scene
at ``x + u(x)`` with a smooth random displacement ``u`` (a global shift plus a Gaussian bump of a
few voxels), so registering the pair is meaningful and a perfect registration gives NCC 1.
Organs: bladder, rectum, seminal vesicles and prostate as overlapping ellipsoids split into
touching organs that meet at the volume's centre, with distinct intensities so that segmentation
is learnable.

Why they meet at the centre: a 48^3 patch (the tiny runs of the tests) has output windows of only
8^3 / 6^3 / 5^3 voxels at the high / mid / low level, and the soft Dice of METHOD.md counts a class
absent from both prediction and target as Dice 0. With organs of a few voxels scattered around the
centre (the first version of this generator: seminal vesicles of ~100 voxels) most patches held
only one or two organs in those windows, so the Dice losses had an irreducible floor of 0.25 per
missing class and the remaining organs were 1-voxel slivers, aliased away by the 4-voxel stride
of the low level. Now a patch centred anywhere near the centre shows every organ, with tens of
voxels or more, at every level.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from jrs.core.labels import BLADDER, PROSTATE, RECTUM, SEMINAL_VESICLES
from jrs.training.data import TrainingPair

__all__ = ["synthetic_pair"]

# label, centre offset from the volume centre (z, y, x) in units of size/8, radii in size/16,
# normalised intensity (HU / 1000). The four organs sit in the four (z, y) quadrants around the
# volume centre and each reaches past it, so they meet there (as the prostate, seminal vesicles,
# bladder and rectum meet at the bladder neck): every organ is present, with tens of voxels or
# more, in the central 8^3 / 6^3 / 5^3 output windows of a 48^3 patch taken around the centre.
_ORGANS: tuple[tuple[int, tuple[float, float, float], tuple[float, float, float], float], ...] = (
    (BLADDER, (0.7, -0.7, 0.0), (2.8, 2.8, 3.2), 0.35),
    (RECTUM, (-0.7, 0.7, 0.0), (2.8, 2.4, 2.4), -0.45),
    (SEMINAL_VESICLES, (0.7, 0.7, 0.0), (2.4, 2.4, 3.2), 0.15),
    (PROSTATE, (-0.7, -0.7, 0.0), (2.6, 2.6, 2.6), 0.55),
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
    # Each voxel inside some organ's ellipsoid goes to the organ whose ellipsoid it is deepest in
    # (smallest normalised radius): the overlapping ellipsoids split into touching organs.
    nearest = np.full(coords.shape[1:], np.inf)
    for label, offset, radii, _ in _ORGANS:
        centre = np.asarray(offset) * size / 8.0
        r = np.asarray(radii) * size / 16.0 * scale
        q = (
            ((rel[0] - centre[0]) / r[0]) ** 2
            + ((rel[1] - centre[1]) / r[1]) ** 2
            + ((rel[2] - centre[2]) / r[2]) ** 2
        )
        closer = (q <= 1.0) & (q < nearest)
        labels[closer] = label
        nearest = np.where(closer, q, nearest)
    for label, _, _, value in _ORGANS:
        inside = labels == label
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
