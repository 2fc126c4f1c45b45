"""The dome engine's pull field and its application (see `jrs.synth.dome_engine`).

Part of the held-out "dome" deformation family. The pull map is ``phi = S o N``: the non-rigid
pull ``N(p) = p + v(p)`` (the inverse of the push, on the box grid) followed by the rigid setup
``S(q) = c + R (q - c) + t``, so ``u(p) = (R - I)(p - c) + t + R v(p)``:

* `compose_field` builds ``u`` on the cover grid (frame D) as `PullField`;
* `dense_field` interpolates it linearly onto the daily grid (the true DVF);
* `resample_field`, `warp_labels` and `warp_structure` warp planning images, label maps and
  masks by it on bounding boxes; `bladder_count` counts the warped bladder voxels.

Conventions (DESIGN.md): LPS mm, arrays (z, y, x), vector components (x, y, z).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from jrs.core.fields import dvf_to_sitk, warp, warp_mask
from jrs.core.geometry import Geometry, Volume
from jrs.core.labels import BLADDER
from jrs.synth.deformation import rigid_inverse, rigid_transform
from jrs.synth.grid_boxes import (
    Box,
    box_size,
    crop_geometry,
    index_box,
    index_box_of_lps,
    lps_bounds,
    lps_box_corners,
    resample_component,
    resample_split,
)

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
Mask = npt.NDArray[np.bool_]

#: daily boxes larger than this (voxels) are warped by the split rigid/coarse path (memory).
LARGE_BOX_VOXELS = 8_000_000


@dataclass(eq=False)
class PullField:
    """The fraction's pull field and the transforms that apply it.

    Attributes:
        coarse: the cover grid (frame D, LPS-aligned).
        u: (cz, cy, cx, 3) float32 pull displacement on `coarse`, mm.
        tx: displacement transform of `u` (linear interpolation).
        rot: (3, 3) setup rotation ``R``.
        centre: (3,) setup centre ``c``, LPS mm.
        t: (3,) setup translation ``t``, mm.
        reach: largest ``|R v|``, mm.
        nonrigid: daily index box outside which ``u`` is the setup alone (None: nowhere).
        nonrigid_mm: LPS bounds (lo, hi) of that box on the cover grid, mm.
        moving_part: ``R v`` on the cover sub-grid where it is non-zero (+1 node).
    """

    coarse: Geometry
    u: F32
    tx: sitk.Transform
    rot: F64
    centre: F64
    t: F64
    reach: float
    nonrigid: Box | None
    nonrigid_mm: tuple[F64, F64] | None
    moving_part: Volume | None

    @property
    def setup(self) -> sitk.AffineTransform:
        """The rigid setup S (daily -> planning points where v = 0)."""
        return rigid_transform(self.rot, self.centre, self.t)

    def daily_box(self, daily: Geometry, lo: F64, hi: F64, margin: float) -> Box | None:
        """Daily index box of the points whose planning point can fall in the LPS box [lo, hi].

        Only nodes within `reach` of ``S^-1`` of the box can map into it (``phi = S o N`` with
        ``|N(p) - p| <= reach``); their planning points ``p + u(p)`` are tested.

        Args:
            daily: the daily grid.
            lo: (3,) LPS lower corner of the planning box, mm.
            hi: (3,) LPS upper corner, mm.
            margin: mm added to the planning box on every side.

        Returns:
            The (z, y, x) box of `daily`, or None when no point maps into the box.
        """
        a, b = lo - margin, hi + margin
        back = rigid_inverse(lps_box_corners(a, b), self.rot, self.centre, self.t)
        step = float(self.coarse.spacing[0])
        grow = self.reach + step
        cand = index_box_of_lps(back.min(axis=0) - grow, back.max(axis=0) + grow, self.coarse)
        if cand is None:
            return None
        sub = crop_geometry(self.coarse, cand)
        nz, ny, nx = sub.shape
        phi = np.array(self.u[cand], dtype=np.float32)
        phi[..., 0] += (sub.origin[0] + step * np.arange(nx, dtype=np.float32))[None, None, :]
        phi[..., 1] += (sub.origin[1] + step * np.arange(ny, dtype=np.float32))[None, :, None]
        phi[..., 2] += (sub.origin[2] + step * np.arange(nz, dtype=np.float32))[:, None, None]
        inside = np.all((phi >= a) & (phi <= b), axis=-1)
        nodes = index_box(inside, 1)
        if nodes is None:
            return None
        return index_box_of_lps(*lps_bounds(sub, nodes), daily)


def compose_field(
    v_box: F32,
    box_first: npt.NDArray[np.int64],
    coarse: Geometry,
    coarse_first: npt.NDArray[np.int64],
    rot: F64,
    centre: F64,
    t: F64,
    daily: Geometry,
) -> PullField:
    """``u(p) = (R - I)(p - c) + t + R v(p)`` on the cover grid (v given on the box grid).

    Args:
        v_box: (bz, by, bx, 3) float32 non-rigid pull ``v`` on the box grid, mm.
        box_first: lattice index (x, y, z) of the box grid's first node.
        coarse: the cover grid (same lattice).
        coarse_first: lattice index (x, y, z) of the cover grid's first node.
        rot: (3, 3) setup rotation ``R``.
        centre: (3,) setup centre ``c``, LPS mm.
        t: (3,) setup translation, mm.
        daily: the daily grid (for the non-rigid daily box).

    Returns:
        The pull field.
    """
    nz, ny, nx = coarse.shape
    step = float(coarse.spacing[0])
    axes = [coarse.origin[a] + step * np.arange(n) - centre[a] for a, n in enumerate((nx, ny, nz))]
    m = rot - np.eye(3)
    u = np.empty((nz, ny, nx, 3), np.float32)
    for c in range(3):
        u[..., c] = (
            (m[c, 0] * axes[0])[None, None, :]
            + (m[c, 1] * axes[1])[None, :, None]
            + (m[c, 2] * axes[2])[:, None, None]
            + t[c]
        ).astype(np.float32)
    # the box grid and the cover grid share the lattice: place R v by index offsets
    off = (box_first - coarse_first)[::-1]  # (z, y, x) offset of the box in the cover grid
    src = []
    dst = []
    for a in range(3):
        lo = max(int(off[a]), 0)
        hi = min(int(off[a]) + v_box.shape[a], coarse.shape[a])
        if hi <= lo:
            break
        dst.append(slice(lo, hi))
        src.append(slice(lo - int(off[a]), hi - int(off[a])))
    nonrigid = None
    nonrigid_mm = None
    moving_part = None
    reach = 0.0
    if len(dst) == 3:
        part = v_box[src[0], src[1], src[2]] @ rot.T.astype(np.float32)
        u[dst[0], dst[1], dst[2]] += part
        moving = index_box(np.any(part != 0, axis=-1), 1)
        if moving is not None:
            reach = float(np.sqrt((part[moving] ** 2).sum(axis=-1)).max())
            cover = (
                slice(dst[0].start + moving[0].start, dst[0].start + moving[0].stop),
                slice(dst[1].start + moving[1].start, dst[1].start + moving[1].stop),
                slice(dst[2].start + moving[2].start, dst[2].start + moving[2].stop),
            )
            moving_part = Volume(np.ascontiguousarray(part[moving]), crop_geometry(coarse, cover))
            nonrigid_mm = lps_bounds(coarse, cover)
            nonrigid = index_box_of_lps(*nonrigid_mm, daily)
    return PullField(
        coarse=coarse,
        u=u,
        tx=dvf_to_sitk(Volume(u, coarse)),
        rot=rot,
        centre=centre,
        t=t,
        reach=reach,
        nonrigid=nonrigid,
        nonrigid_mm=nonrigid_mm,
        moving_part=moving_part,
    )


def resample_field(
    fld: PullField, moving: sitk.Image, daily: Geometry, dbox: Box, default: float
) -> F32:
    """Linear resampling of `moving` on the daily `dbox` by the pull field, float32.

    The rigid setup is used outside the non-rigid box and the coarse displacement transform
    inside it (`jrs.synth.grid_boxes.resample_split`).

    Returns:
        (z, y, x) float32 array of the box's shape.
    """
    out = resample_split(moving, daily, dbox, fld.setup, fld.tx, fld.nonrigid, default)
    return np.asarray(out, np.float32)


def dense_field(fld: PullField, daily: Geometry) -> Volume:
    """The coarse pull field interpolated linearly on the daily grid, (nz, ny, nx, 3) float32.

    Computed as the rigid setup ``(R - I)(p - c) + t`` (exact: linear interpolation reproduces
    an affine field) plus the linear interpolation of ``R v`` on the non-rigid daily box.
    """
    nz, ny, nx = daily.shape
    a = daily.direction * daily.spacing[None, :]  # index (i, j, k) -> LPS
    m = fld.rot - np.eye(3)
    base = m @ (daily.origin - fld.centre) + fld.t
    slope = m @ a
    out = np.empty((nz, ny, nx, 3), np.float32)
    ramps = [np.arange(n, dtype=np.float64) for n in (nx, ny, nz)]
    for c in range(3):
        along_x = (base[c] + slope[c, 0] * ramps[0]).astype(np.float32)
        along_y = (slope[c, 1] * ramps[1]).astype(np.float32)
        along_z = (slope[c, 2] * ramps[2]).astype(np.float32)
        np.add(along_z[:, None, None], along_y[None, :, None], out=out[..., c])
        out[..., c] += along_x[None, None, :]
    if fld.moving_part is not None and fld.nonrigid is not None:
        ref = crop_geometry(daily, fld.nonrigid).reference_image()
        for c in range(3):
            res = resample_component(fld.moving_part, c, ref)
            out[(*fld.nonrigid, c)] += sitk.GetArrayViewFromImage(res)
    return Volume(out, daily)


def warp_labels(
    lab: npt.NDArray[Any],
    g: Geometry,
    fld: PullField,
    daily: Geometry,
    pbox: Box,
    dvf: Volume | None,
) -> tuple[npt.NDArray[np.uint8], Box] | None:
    """Planning labels of the `pbox` crop warped onto their daily box (``"label"`` mode).

    Args:
        lab: (nz, ny, nx) planning label map on grid `g`.
        g: the planning grid.
        fld: the pull field.
        daily: the daily grid.
        pbox: (z, y, x) planning index box holding the labels.
        dvf: the dense daily field (`dense_field`), or None to warp by the coarse transform.

    Returns:
        ((z, y, x) uint8 daily labels of the box, the daily box), or None when nothing maps in.
    """
    lo, hi = lps_bounds(g, pbox)
    pad = float(np.max(g.spacing))
    dbox = fld.daily_box(daily, lo - pad, hi + pad, 4.0 * float(fld.coarse.spacing[0]))
    if dbox is None:
        return None
    moving = Volume(np.ascontiguousarray(lab[pbox]), crop_geometry(g, pbox))
    if dvf is not None:
        target = Volume(dvf.array[dbox], crop_geometry(daily, dbox))
        out = warp(moving, target, "label", 0, transform=fld.tx).array
    else:
        out = moving.resample(crop_geometry(daily, dbox), "label", 0, transform=fld.tx).array
    return np.asarray(out, np.uint8), dbox


def bladder_count(lab: npt.NDArray[Any], g: Geometry, fld: PullField, daily: Geometry) -> int:
    """Number of daily bladder voxels: the planning labels warped by the coarse transform."""
    pbox = index_box(lab == BLADDER, 2)
    if pbox is None:
        return 0
    made = warp_labels(lab, g, fld, daily, pbox, None)
    return 0 if made is None else int(np.count_nonzero(made[0] == BLADDER))


def warp_structure(
    arr: Mask, g: Geometry, fld: PullField, daily: Geometry, dvf: Volume, strength: float
) -> Mask:
    """A planning structure warped by the pull field onto the daily grid (full size, bool).

    Daily boxes up to `LARGE_BOX_VOXELS` are warped by ``warp_mask`` with the dense field,
    larger ones (the body) by `resample_field` (uint8 input, threshold 0.5).

    Args:
        arr: (nz, ny, nx) bool planning mask on grid `g`.
        g: the planning grid.
        fld: the pull field.
        daily: the daily grid.
        dvf: the dense daily field (`dense_field`).
        strength: the fraction's strength (0: the planning mask is copied).

    Returns:
        (nz, ny, nx) bool daily mask.
    """
    box = index_box(arr, 2)
    if strength == 0 or box is None:
        return arr.copy()
    lo, hi = lps_bounds(g, box)
    pad = float(np.max(g.spacing))
    dbox = fld.daily_box(daily, lo - pad, hi + pad, 4.0 * float(fld.coarse.spacing[0]))
    out = np.zeros(daily.shape, bool)
    if dbox is None:
        return out
    moving = Volume(arr[box], crop_geometry(g, box))
    if box_size(dbox) <= LARGE_BOX_VOXELS:
        target = Volume(dvf.array[dbox], crop_geometry(daily, dbox))
        out[dbox] = warp_mask(moving, target, transform=fld.tx).array
    else:  # a large ROI (the body): uint8 input, the split rigid / coarse path
        img = sitk.GetImageFromArray(np.ascontiguousarray(moving.array).view(np.uint8))
        moving.geometry.apply_to_sitk(img)
        out[dbox] = resample_field(fld, img, daily, dbox, 0.0) >= 0.5
    return out
