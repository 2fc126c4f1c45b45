"""Domain-randomised registration pairs: random shapes, random intensities, random smooth fields.

After SynthMorph (Hoffmann et al., "SynthMorph: learning contrast-invariant registration without
acquired images", IEEE TMI 41(3), 2022). A patch is a random label map (the arg-max of a few
smooth random fields), rendered with a random intensity per label plus noise and blur. The moving
patch is the same scene pulled through a random diffeomorphism (a smooth stationary velocity
field integrated by scaling and squaring). The registration branch learns to align shapes
whatever they look like, so it does not hinge on what the phantoms look like.

The shapes' ids are folded onto the network's label ids 0..4 (``id % 5``) so that they can feed the
planning-label input channel and the registration Dice; they are not organs, so such samples are
left out of the segmentation loss.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy import ndimage

__all__ = ["integrate_velocity", "synthmorph_patch"]

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]


def integrate_velocity(
    velocity: npt.NDArray[np.float64], squarings: int = 5
) -> npt.NDArray[np.float64]:
    """Displacement of the flow of a stationary velocity field (scaling and squaring).

    Args:
        velocity: ``(3, d, h, w)`` velocity in voxels (components along the array axes z, y, x).
        squarings: Number of squarings (the field is first divided by ``2**squarings``).

    Returns:
        ``(3, d, h, w)`` displacement ``u`` in voxels with ``phi(p) = p + u(p)`` a diffeomorphism
        (up to interpolation error), sampled with linear interpolation and edge clamping.
    """
    u = velocity / float(2**squarings)
    grid = np.indices(velocity.shape[1:], dtype=np.float64)
    for _ in range(squarings):
        coords = grid + u
        u = u + np.stack(
            [ndimage.map_coordinates(u[c], coords, order=1, mode="nearest") for c in range(3)]
        )
    return u


def _upsample(a: npt.NDArray[np.float64], n: int) -> npt.NDArray[np.float64]:
    """Linear up-sampling of ``(..., m, m, m)`` to ``(..., n, n, n)`` (corner-aligned)."""
    m = a.shape[-1]
    f = (n - 1) / (m - 1)
    lead = a.shape[:-3]
    flat = a.reshape((-1, m, m, m))
    out = np.stack([ndimage.zoom(x, f, order=1, grid_mode=False) for x in flat])
    return out.reshape((*lead, *out.shape[-3:]))[..., :n, :n, :n]


def synthmorph_patch(
    n: int, rng: np.random.Generator, max_velocity: float = 4.0
) -> tuple[F32, F32, U8, U8]:
    """One random (fixed, moving) patch pair with label maps.

    Args:
        n: Patch edge (voxels).
        rng: The sampler's generator (the pair is a deterministic function of its state).
        max_velocity: Upper bound of the velocity's standard deviation, voxels of the patch.

    Returns:
        ``(fixed, moving, fixed_labels, moving_labels)``: images ``(n, n, n)`` float32 in about
        [-1, 1] (the network's intensity range), labels ``(n, n, n)`` uint8 in 0..4; ``moving`` is
        ``fixed``'s scene at ``phi(p)``, so a perfect registration of moving onto fixed is
        ``phi^-1``.
    """
    coarse = max(n // 8, 4)
    k = int(rng.integers(6, 17))
    fields = rng.standard_normal((k, coarse, coarse, coarse))
    half = n // 2
    smooth = _upsample(fields, half)  # shapes at half resolution, then nearest x2: 8x cheaper
    base_half = np.argmax(smooth, axis=0).astype(np.int64)
    base = base_half.repeat(2, 0).repeat(2, 1).repeat(2, 2)  # (n, n, n) shape ids 0..k-1

    vel_coarse = rng.standard_normal((3, coarse, coarse, coarse)) * float(
        rng.uniform(0.5, max_velocity)
    )
    scale = (n - 1) / (coarse - 1)  # fine voxels per coarse voxel
    u = _upsample(integrate_velocity(vel_coarse / scale) * scale, n)
    coords = np.indices((n, n, n), dtype=np.float64) + u
    moved = ndimage.map_coordinates(base, coords, order=0, mode="nearest").astype(np.int64)

    means = rng.uniform(-0.9, 0.9, size=k)
    means[int(rng.integers(k))] = -1.0  # often some "air"

    def render(labels: npt.NDArray[np.int64]) -> F32:
        img = means[labels] + rng.normal(0.0, float(rng.uniform(0.0, 0.08)), labels.shape)
        sigma = float(rng.uniform(0.0, 1.2))
        if sigma > 0.2:
            img = ndimage.gaussian_filter(img, sigma)
        return np.clip(img, -1.0, 1.0).astype(np.float32)

    fixed = render(base)
    moving = render(moved)
    return fixed, moving, (base % 5).astype(np.uint8), (moved % 5).astype(np.uint8)
