"""CT texture of the synthetic scans: correlated noise and rectal gas pockets.

Shared by the analytic phantoms (`jrs.synth.generator`) and the organ-aware deformation engine
(`jrs.synth.engine`), so that neither imports the other.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from jrs.core.geometry import Geometry

Mask = npt.NDArray[np.bool_]


def ct_noise(
    shape: tuple[int, int, int], std: float, rng: np.random.Generator
) -> npt.NDArray[np.float32]:
    """CT-like noise, (nz, ny, nx) float32 HU with standard deviation `std`.

    White Gaussian noise smoothed in-plane by a [1, 2, 1]/4 binomial kernel along x and y (about
    a 0.7-voxel Gaussian), independent between slices and scans.
    """
    a = rng.standard_normal(shape, dtype=np.float32)
    for axis in (2, 1):
        b = a.copy()
        lo = [slice(None)] * 3
        mid = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], mid[axis], hi[axis] = slice(0, -2), slice(1, -1), slice(2, None)
        b[tuple(mid)] *= 0.5
        b[tuple(mid)] += 0.25 * (a[tuple(lo)] + a[tuple(hi)])
        a = b
    a *= std / 0.375  # std of the 2-D binomial-filtered unit white noise
    return a


def add_gas(
    img: npt.NDArray[np.float32],
    lumen: Mask,
    geometry: Geometry,
    rng: np.random.Generator,
) -> Mask:
    """Paint 0-4 gas pockets (-1000 HU) inside the rectal lumen; returns the gas mask."""
    gas = np.zeros(lumen.shape, bool)
    n = int(rng.choice([0, 1, 2, 3, 4], p=[0.15, 0.3, 0.25, 0.2, 0.1]))
    idx = np.argwhere(lumen)
    if n == 0 or len(idx) == 0:
        return gas
    sp = geometry.spacing[::-1]  # (z, y, x) mm
    width = float(np.mean(geometry.spacing))
    for _ in range(n):
        centre = idx[rng.integers(len(idx))]
        radii = rng.uniform(3, 11, 3) * np.array([1.6, 1.0, 1.0])  # longer along the rectum
        half = np.ceil(radii / sp).astype(int) + 1
        sl = tuple(
            slice(max(int(c) - int(h), 0), min(int(c) + int(h) + 1, n_))
            for c, h, n_ in zip(centre, half, lumen.shape, strict=True)
        )
        grids = np.meshgrid(*(np.arange(s.start, s.stop) for s in sl), indexing="ij")
        q = sum(
            ((g - c) * s_ / r) ** 2 for g, c, s_, r in zip(grids, centre, sp, radii, strict=True)
        )
        k0 = np.sqrt(q)
        sdf = (k0 - 1.0) * float(radii.min())
        alpha = np.clip(0.5 - sdf / width, 0, 1) * lumen[sl]
        region = img[sl]
        region += alpha.astype(np.float32) * (-1000.0 - region)
        gas[sl] |= alpha >= 0.5
    return gas
