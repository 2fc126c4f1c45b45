"""Approximate signed distance functions (mm) of the primitives the phantom is made of.

Every function takes coordinate arrays ``x, y, z`` (mm, anatomical LPS frame) that broadcast
against each other, e.g. shapes ``(1, 1, nx)``, ``(1, ny, 1)``, ``(nz, 1, 1)`` for a box of voxels,
and returns a float32 array of the broadcast shape: negative inside, positive outside, close to
the Euclidean distance near the surface (which is all partial-volume blending needs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[Any]
Vec = Sequence[float] | npt.NDArray[np.float64]


def ellipsoid(x: Array, y: Array, z: Array, centre: Vec, radii: Vec) -> Array:
    """Axis-aligned ellipsoid (first-order distance estimate ``k0 (k0 - 1) / k1``).

    Args:
        x: broadcastable x coordinates, mm.
        y: broadcastable y coordinates, mm.
        z: broadcastable z coordinates, mm.
        centre: (3,) centre, mm.
        radii: (3,) semi-axes along x, y, z, mm.
    """
    qx, qy, qz = (x - centre[0]), (y - centre[1]), (z - centre[2])
    k0 = np.sqrt((qx / radii[0]) ** 2 + (qy / radii[1]) ** 2 + (qz / radii[2]) ** 2)
    k1 = np.sqrt((qx / radii[0] ** 2) ** 2 + (qy / radii[1] ** 2) ** 2 + (qz / radii[2] ** 2) ** 2)
    return (k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)).astype(np.float32)


def rotated_ellipsoid(
    x: Array, y: Array, z: Array, centre: Vec, radii: Vec, axes: npt.NDArray[np.float64]
) -> Array:
    """Ellipsoid whose semi-axis ``c`` points along row ``c`` of the orthonormal (3, 3) `axes`."""
    qx, qy, qz = (x - centre[0]), (y - centre[1]), (z - centre[2])
    loc = [axes[c, 0] * qx + axes[c, 1] * qy + axes[c, 2] * qz for c in range(3)]
    zero = np.zeros(3)
    return ellipsoid(loc[0], loc[1], loc[2], zero, radii)


def capsule(
    x: Array, y: Array, z: Array, a: Vec, b: Vec, radius_a: float, radius_b: float | None = None
) -> Array:
    """Segment ``a -> b`` thickened by a radius varying linearly from `radius_a` to `radius_b`."""
    ab = np.asarray(b, float) - np.asarray(a, float)
    qx, qy, qz = (x - a[0]), (y - a[1]), (z - a[2])
    h = np.clip((qx * ab[0] + qy * ab[1] + qz * ab[2]) / float(ab @ ab), 0.0, 1.0)
    d = np.sqrt((qx - h * ab[0]) ** 2 + (qy - h * ab[1]) ** 2 + (qz - h * ab[2]) ** 2)
    rb = radius_a if radius_b is None else radius_b
    return (d - (radius_a + (rb - radius_a) * h)).astype(np.float32)


def tube(x: Array, y: Array, z: Array, points: npt.NDArray[np.float64], radii: Vec) -> Array:
    """Union of capsules along a polyline (``points`` (n, 3), radius per point)."""
    out: Array | None = None
    for k in range(len(points) - 1):
        d = capsule(x, y, z, points[k], points[k + 1], float(radii[k]), float(radii[k + 1]))
        out = d if out is None else np.minimum(out, d)
    if out is None:
        raise ValueError("a tube needs at least two points")
    return out


def bezier(p0: Vec, p1: Vec, p2: Vec, n: int = 16) -> npt.NDArray[np.float64]:
    """Points of the quadratic Bezier curve ``p0 -> p2`` with control point ``p1``, (n, 3)."""
    t = np.linspace(0.0, 1.0, n)[:, None]
    a, b, c = (np.asarray(p, float)[None, :] for p in (p0, p1, p2))
    return (1 - t) ** 2 * a + 2 * (1 - t) * t * b + t**2 * c


def smooth_min(a: Array, b: Array, k: float) -> Array:
    """Smooth union of two distance fields (polynomial smooth minimum, blend width `k` mm)."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return (b * (1 - h) + a * h - k * h * (1 - h)).astype(np.float32)


def superellipse(
    x: Array,
    y: Array,
    cx: float | Array,
    cy: float | Array,
    a: float | Array,
    b: float | Array,
    power: float,
) -> Array:
    """2-D super-ellipse ``|x/a|^n + |y/b|^n = 1`` (distance estimate x the smaller semi-axis)."""
    u = np.abs((x - cx) / a)
    v = np.abs((y - cy) / b)
    r = (u**power + v**power) ** (1.0 / power)
    return ((r - 1.0) * np.minimum(a, b)).astype(np.float32)


def coverage(sdf: Array, width: float) -> Array:
    """Partial-volume fraction of a voxel covered by the shape: a linear ramp of ``-sdf/width``.

    Args:
        sdf: signed distance, mm.
        width: ramp width, mm (about one voxel).

    Returns:
        Values in [0, 1], 0.5 on the surface.
    """
    return np.clip(0.5 - sdf / width, 0.0, 1.0).astype(np.float32)
