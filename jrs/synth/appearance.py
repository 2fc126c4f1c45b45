"""CT appearance variations: gold fiducials, intensity jitter, streaks, cut-off field of view.

Training data that generalises must not look like one scanner. These functions vary what a CT
looks like without changing the anatomy or its labels, and apply to any CT volume, phantom or
real:

* gold fiducial markers (implanted in the prostate before radiotherapy; real planning CTs carry
  two to four): small bright cylinders inside the prostate, painted into the planning scan before
  its daily fractions are derived, so that they move with the prostate;
* a global intensity jitter (scanner calibration: gain and offset of a few HU);
* beam-hardening streaks between the femoral heads (a dark band joining the two dense bones on
  the slices through them, and faint bright rays);
* a cut-off field of view (the reconstruction circle smaller than the body: air outside).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from jrs.core.geometry import Volume

F32 = npt.NDArray[np.float32]

__all__ = ["AppearanceParams", "add_fiducials", "vary_appearance"]


def add_fiducials(
    ct: Volume, prostate: npt.NDArray[np.bool_], rng: np.random.Generator, count: int = 3
) -> list[list[float]]:
    """Paint gold markers (about 1 mm wide, 3-5 mm long, 2000-3000 HU) inside the prostate.

    Args:
        ct: the CT (HU), modified in place; any orientation (the marker is drawn in mm).
        prostate: ``(nz, ny, nx)`` bool prostate mask on the CT grid.
        rng: random generator.
        count: number of markers.

    Returns:
        The LPS centres of the markers (mm), for the record.
    """
    idx = np.argwhere(prostate)
    if len(idx) == 0 or count <= 0:
        return []
    g = ct.geometry
    sp = np.asarray(g.spacing, float)[::-1]  # (z, y, x) mm per index step
    centres: list[list[float]] = []
    for _ in range(count):
        c = idx[int(rng.integers(len(idx)))]
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        length = float(rng.uniform(3.0, 5.0))
        radius = 0.6
        hu = float(rng.uniform(2000.0, 3000.0))
        half = np.ceil((length / 2 + 1.5) / sp).astype(int)
        sl = tuple(
            slice(max(int(ci) - int(h), 0), min(int(ci) + int(h) + 1, n))
            for ci, h, n in zip(c, half, prostate.shape, strict=True)
        )
        grids = np.meshgrid(*(np.arange(s.start, s.stop) for s in sl), indexing="ij")
        d = np.stack([(gr - ci) * s for gr, ci, s in zip(grids, c, sp, strict=True)], axis=-1)
        along = d @ axis
        perp = np.linalg.norm(d - along[..., None] * axis, axis=-1)
        # partial volume: a marker thinner than a voxel still shows, dimmer, as on a real CT
        cover = np.clip(1.0 - (perp - radius) / np.mean(sp), 0, 1) * (np.abs(along) <= length / 2)
        region = ct.array[sl]
        region += (cover * (hu - region)).astype(region.dtype)
        centres.append(g.index_to_physical(np.asarray(c[::-1], float)).tolist())
    return centres


@dataclass
class AppearanceParams:
    """What `vary_appearance` did to one scan (JSON-friendly)."""

    gain: float = 1.0
    offset_hu: float = 0.0
    streak_hu: float = 0.0
    streak_slices: int = 0
    fov_radius_mm: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _streaks(img: F32, ct: Volume, rng: np.random.Generator, amplitude: float) -> int:
    """Dark band between the two dense bones of each axial slice that has both; returns count."""
    g = ct.geometry
    if not np.allclose(np.abs(np.asarray(g.direction, float)), np.eye(3), atol=1e-3):
        return 0  # oblique: leave it alone
    bone = img > 700.0
    ny, nx = img.shape[1:]
    xs = np.arange(nx, dtype=np.float32)
    ys = np.arange(ny, dtype=np.float32)
    width = float(rng.uniform(2.5, 6.0)) / float(np.mean(g.spacing[:2]))
    n = 0
    for k in np.nonzero(bone.reshape(len(img), -1).sum(axis=1) > 200)[0]:
        yy, xx = np.nonzero(bone[k])
        mid = 0.5 * (xx.min() + xx.max())
        left, right = (
            xx < mid - 0.15 * (xx.max() - xx.min()),
            xx > mid + 0.15 * (xx.max() - xx.min()),
        )
        if left.sum() < 80 or right.sum() < 80:
            continue
        a = np.array([xx[left].mean(), yy[left].mean()], np.float32)
        b = np.array([xx[right].mean(), yy[right].mean()], np.float32)
        ab = b - a
        t = np.clip(
            ((xs[None, :] - a[0]) * ab[0] + (ys[:, None] - a[1]) * ab[1]) / float(ab @ ab), 0, 1
        )
        dx = xs[None, :] - (a[0] + t * ab[0])
        dy = ys[:, None] - (a[1] + t * ab[1])
        band = np.exp(-(dx * dx + dy * dy) / (2 * width * width))
        img[k] -= (amplitude * band * (img[k] > -500)).astype(np.float32)
        n += 1
    return n


def vary_appearance(
    ct: Volume,
    rng: np.random.Generator,
    *,
    streak_probability: float = 0.3,
    fov_probability: float = 0.15,
    body: npt.NDArray[np.bool_] | None = None,
) -> tuple[Volume, AppearanceParams]:
    """A copy of a CT as another scanner or protocol might show it (anatomy unchanged).

    Args:
        ct: the CT in HU.
        rng: random generator.
        streak_probability: chance of beam-hardening streaks between the femoral heads.
        fov_probability: chance of a reconstruction circle that cuts the body off.
        body: ``(nz, ny, nx)`` body mask, to size the cut-off (default: HU > -500).

    Returns:
        ``(new CT, what was done)``; values clipped to [-1024, 3071] HU.
    """
    p = AppearanceParams()
    img = ct.array.astype(np.float32, copy=True)
    p.gain = float(rng.uniform(0.97, 1.03))
    p.offset_hu = float(rng.uniform(-15.0, 15.0))
    soft = img > -900.0
    img[soft] = img[soft] * p.gain + p.offset_hu
    if rng.random() < streak_probability:
        p.streak_hu = float(rng.uniform(40.0, 140.0))
        p.streak_slices = _streaks(img, ct, rng, p.streak_hu)
    if rng.random() < fov_probability:
        g = ct.geometry
        inside = body if body is not None else img > -500.0
        cols = np.nonzero(inside.any(axis=(0, 1)))[0]
        if len(cols):
            half_width_mm = 0.5 * (cols.max() - cols.min()) * float(g.spacing[0])
            p.fov_radius_mm = float(half_width_mm * rng.uniform(0.82, 0.97))
            ny, nx = img.shape[1:]
            cy, cx = (ny - 1) / 2.0, (nx - 1) / 2.0
            yy, xx = np.mgrid[0:ny, 0:nx]
            r = np.hypot((yy - cy) * float(g.spacing[1]), (xx - cx) * float(g.spacing[0]))
            img[:, r > p.fov_radius_mm] = -1024.0
    np.clip(img, -1024.0, 3071.0, out=img)
    return ct.with_array(img), p


def record(
    params: AppearanceParams, fiducials: list[list[float]] | None = None
) -> Mapping[str, Any]:
    """A JSON-friendly record of the appearance parameters (and marker positions)."""
    out: dict[str, Any] = {
        "gain": params.gain,
        "offset_hu": params.offset_hu,
        "streak_hu": params.streak_hu,
        "streak_slices": params.streak_slices,
        "fov_radius_mm": params.fov_radius_mm,
    }
    if fiducials is not None:
        out["fiducials_lps_mm"] = fiducials
    return out
