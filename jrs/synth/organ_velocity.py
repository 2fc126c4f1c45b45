"""The organ engine's anatomy and stationary velocity field (see `jrs.synth.engine`).

Part of the organ deformation family: the planning anatomy carried into the daily frame by the
inverse setup (organ fractions, bones, the body's box and the rectum's centreline on the coarse
grid, `build_anatomy`), the organ-aware velocity field built from it (`Velocity`,
`build_velocity`: bladder, rectum, soft tissue, bones, the rigid prostate zone), and its
exponential by scaling and squaring with the bladder rate tuned and the amplitudes softened until
det J > `MIN_DET_J` (`tune_velocity`).

Conventions (DESIGN.md): LPS mm, arrays (z, y, x), vector components (x, y, z).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from scipy import ndimage

from jrs.core.fields import jacobian_determinant
from jrs.core.geometry import Geometry, Volume
from jrs.core.labels import BLADDER, PROSTATE, RECTUM, SEMINAL_VESICLES
from jrs.synth.grid_boxes import (
    Box,
    components_above,
    fraction_on_grid,
    index_box,
    intersect_boxes,
    smoothstep,
    weighted_centroid,
)

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
Mask = npt.NDArray[np.bool_]

#: HU above which a voxel counts as bone.
BONE_HU = 200.0
#: HU above which a voxel counts as inside the body (for the soft-tissue field's support).
BODY_HU = -500.0
#: fields whose min det J (coarse grid) is not above this are softened.
MIN_DET_J = 0.2
#: bone components smaller than this (mm^3) are ignored (fiducials, calcifications).
MIN_BONE_MM3 = 2000.0
#: largest prostate translation, mm.
MAX_PROSTATE_MM = 6.0
#: the soft-tissue field fades out this far from the organs' box (mm).
SOFT_REACH_MM = 120.0


class VelocityDraws(Protocol):
    """The drawn quantities the velocity field uses (the organ engine's draws)."""

    rectum_factor: float
    rectum_segment: float  # 0..1 position along the rectum's z extent
    rectum_sigma_mm: float
    prostate_shift_mm: F64
    soft_modes: F64  # (6, 7): ax, ay, az (mm), kx, ky, kz (1/mm), phase


def _fraction(
    mask: npt.NDArray[Any], geometry: Geometry, coarse: Geometry, tx: sitk.Transform
) -> F32:
    """Fraction (in 1 % steps) of a planning mask around each coarse voxel ``x``, at ``S(x)``."""
    return fraction_on_grid(mask, geometry, coarse, tx, pad=4, percent=True)


def _zone_weight(mask: Mask, step: float, margin: float, width: float) -> F32:
    """1 on `mask` and within `margin` mm of it, smooth fade to 0 over the next `width` mm."""
    out = np.zeros(mask.shape, np.float32)
    box = index_box(mask, int(np.ceil((margin + width) / step)) + 1)
    if box is None:
        return out
    dist = ndimage.distance_transform_edt(~mask[box], sampling=step)
    out[box] = 1.0 - smoothstep((dist - margin) / width)
    return out


def _integrate(w_mm: F32, step: float) -> tuple[F32, int]:
    """Exponential of a stationary velocity field by scaling and squaring.

    Args:
        w_mm: (cz, cy, cx, 3) velocity in mm (x, y, z LPS components) on an LPS-aligned grid of
            isotropic spacing `step`.
        step: grid spacing, mm.

    Returns:
        ((cz, cy, cx, 3) float32 displacement in mm of ``exp(w)``, number of squarings).
    """
    vox = np.ascontiguousarray(np.moveaxis(w_mm[..., ::-1], -1, 0)) / np.float32(step)
    peak = float(np.sqrt((vox**2).sum(axis=0)).max()) if vox.size else 0.0
    if peak == 0.0:
        return np.zeros_like(w_mm), 0
    n = int(np.clip(np.ceil(np.log2(peak / 0.3)), 2, 12))
    v = vox / np.float32(2.0**n)
    grid = np.indices(v.shape[1:], dtype=np.float32)
    for _ in range(n):
        coords = grid + v
        v = v + np.stack(
            [ndimage.map_coordinates(v[c], coords, order=1, mode="nearest") for c in range(3)]
        )
    out = np.moveaxis(v, 0, -1)[..., ::-1] * np.float32(step)
    return np.ascontiguousarray(out, dtype=np.float32), n


def _sample(field_: F32, pts_vox: F32) -> F32:
    """Trilinear samples of a (cz, cy, cx) array at (3, ...) (z, y, x) voxel coordinates."""
    return ndimage.map_coordinates(field_, pts_vox, order=1, mode="constant", cval=0.0)


def _ratio_after(frac: F32, v_mm: F32, step: float) -> float:
    """Daily / planning volume of a coarse fraction map under the pull displacement `v_mm`."""
    before = float(frac.sum())
    if before <= 0:
        return 1.0
    grid = np.indices(frac.shape, dtype=np.float32)
    coords = grid + np.moveaxis(v_mm[..., ::-1], -1, 0) / np.float32(step)
    return float(_sample(frac, coords).sum()) / before


@dataclass(eq=False)
class Anatomy:
    """The planning anatomy carried into the daily frame, on the coarse grid."""

    frac: dict[int, F32]  # label id -> fraction map
    bone: Mask
    body_box: Box | None
    rect_centre: F64 | None = None  # (cz, 3) centreline points
    rect_tangent: F64 | None = None  # (cz, 3) unit tangents
    rect_z: tuple[float, float] | None = None  # z extent (mm)


def _bone_mask(ct: Volume, organs: F32, coarse: Geometry, tx: sitk.Transform) -> Mask:
    """Coarse bone mask: HU > `BONE_HU`, outside the organs, holes filled, small parts dropped.

    Args:
        ct: the planning CT.
        organs: (cz, cy, cx) fraction of any organ label on the coarse grid.
        coarse: the coarse grid (daily frame).
        tx: the setup transform.

    Returns:
        (cz, cy, cx) bool: coarse voxels holding bone (fiducials and calcifications dropped).
    """
    bone = _fraction(ct.array > BONE_HU, ct.geometry, coarse, tx) > 0.1
    bone &= ~ndimage.binary_dilation(organs > 0.05, iterations=1)
    for k in range(bone.shape[0]):
        if bone[k].any():
            bone[k] = ndimage.binary_fill_holes(bone[k])
    bone = components_above(bone, coarse.spacing.prod(), MIN_BONE_MM3, connectivity=6)
    return np.asarray(bone, bool)


def build_anatomy(
    ct: Volume, labels: npt.NDArray[Any], coarse: Geometry, tx: sitk.Transform, pts: F32
) -> Anatomy:
    """Carry the planning anatomy onto the coarse grid of the daily frame by the setup.

    Args:
        ct: the planning CT, HU (nz, ny, nx).
        labels: (nz, ny, nx) planning label map.
        coarse: the coarse grid (daily frame, LPS-aligned).
        tx: the setup transform (daily -> planning points).
        pts: (cz, cy, cx, 3) float32 LPS coarse node positions, mm.

    Returns:
        Organ fractions, bones, the body's box (within `SOFT_REACH_MM` of the organs) and the
        rectum's smoothed centreline, tangents and z extent.
    """
    counts = np.bincount(labels.reshape(-1), minlength=256)
    present = [int(v) for v in np.flatnonzero(counts) if v != 0]
    frac = {lab: _fraction(labels == lab, ct.geometry, coarse, tx) for lab in present}
    organs = np.sum(list(frac.values()), axis=0) if frac else np.zeros(coarse.shape, np.float32)
    bone = _bone_mask(ct, organs, coarse, tx)
    body = _fraction(ct.array > BODY_HU, ct.geometry, coarse, tx) > 0.5
    comp, n = ndimage.label(ndimage.binary_opening(body))
    if n:  # the largest component: the couch and skin markers are thin or small
        body = comp == int(np.argmax(np.bincount(comp.reshape(-1))[1:])) + 1
    body_box = index_box(body, 0)
    if frac and body_box is not None:  # the soft-tissue field stays within 12 cm of the organs
        near = index_box(organs > 0.3, int(SOFT_REACH_MM / coarse.spacing[0]))
        body_box = None if near is None else intersect_boxes(body_box, near)
    an = Anatomy(frac=frac, bone=bone, body_box=body_box)
    if RECTUM in frac and float(frac[RECTUM].sum()) > 1.0:
        m = frac[RECTUM]
        per = m.sum(axis=(1, 2))
        ks = np.nonzero(per > 0.05 * per.max())[0]
        z = pts[:, 0, 0, 2].astype(float)
        cx = (m * pts[..., 0]).sum(axis=(1, 2)) / np.maximum(per, 1e-9)
        cy = (m * pts[..., 1]).sum(axis=(1, 2)) / np.maximum(per, 1e-9)
        cxs = np.interp(z, z[ks], cx[ks])
        cys = np.interp(z, z[ks], cy[ks])
        cxs = ndimage.gaussian_filter1d(cxs, 1.5, mode="nearest")
        cys = ndimage.gaussian_filter1d(cys, 1.5, mode="nearest")
        centre = np.stack([cxs, cys, z], axis=1)
        tangent = np.stack([np.gradient(cxs, z), np.gradient(cys, z), np.ones_like(z)], axis=1)
        tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
        an.rect_centre, an.rect_tangent = centre, tangent
        an.rect_z = (float(z[ks[0]]), float(z[ks[-1]]))
    return an


@dataclass(eq=False)
class Velocity:
    """The organ-aware velocity field of one fraction (daily frame, coarse grid)."""

    an: Anatomy
    pts: F32  # (cz, cy, cx, 3) LPS coarse points
    step: float
    draws: VelocityDraws
    strength: float
    bone_soft: F32  # 1 on bones and 4 mm around, fading over 10 mm (all but the prostate)
    bone_sharp: F32  # 1 on bones, 0 one coarse voxel away (every piece)
    soft: F32  # (cz, cy, cx, 3) soft-tissue field (unscaled, tapered)
    bladder_centre: F64 | None
    bladder_w: F32 | None
    rectum: F32 | None  # (cz, cy, cx, 3) rectum field for b = 1
    segment_z: float | None
    prostate_frac: F32 | None

    def assemble(self, a: float, scale: float) -> tuple[F32, F64]:
        """The velocity (cz, cy, cx, 3) mm for bladder rate `a` and non-rigid `scale`.

        Returns:
            (velocity, prostate velocity (3,) mm).
        """
        s = self.strength * scale
        other = self.soft * np.float32(s)
        if self.bladder_w is not None and self.bladder_centre is not None and a != 0.0:
            other -= (
                np.float32(a)
                * (self.pts - self.bladder_centre.astype(np.float32))
                * (self.bladder_w[..., None])
            )
        if self.rectum is not None:
            b = s * float(np.log(self.draws.rectum_factor))
            other += np.float32(b) * self.rectum
        other *= (1.0 - self.bone_soft)[..., None]
        vel = np.zeros(3)
        if self.prostate_frac is not None:
            pf = self.prostate_frac
            push = (other * pf[..., None]).reshape(-1, 3).sum(axis=0) / max(float(pf.sum()), 1e-9)
            vel = s * self.draws.prostate_shift_mm + push
            norm = float(np.linalg.norm(vel))
            if norm > MAX_PROSTATE_MM:
                vel *= MAX_PROSTATE_MM / norm
            zone = _zone_weight(
                pf > 0.3, self.step, float(np.linalg.norm(vel)) + self.step + 2.0, 12.0
            )
            other *= (1.0 - zone)[..., None]
            other += zone[..., None] * vel.astype(np.float32)
        other *= (1.0 - self.bone_sharp)[..., None]
        return other, vel


def _box_taper(shape: tuple[int, ...], box: Box | None, pad: int) -> F32:
    """1 inside `box`, smooth fade to 0 over `pad` voxels outside it (separable)."""
    if box is None:
        return np.zeros(shape, np.float32)
    ramps = []
    for sl, n in zip(box, shape, strict=True):
        i = np.arange(n, dtype=np.float32)
        d = np.maximum(np.maximum(sl.start - i, i - (sl.stop - 1)), 0.0)
        ramps.append(1.0 - smoothstep(d / max(pad, 1)))
    return ramps[0][:, None, None] * ramps[1][None, :, None] * ramps[2][None, None, :]


def build_velocity(
    an: Anatomy, pts: F32, step: float, dr: VelocityDraws, strength: float
) -> Velocity:
    """The organ-aware velocity field's pieces on the coarse grid (daily frame).

    Args:
        an: the anatomy on the coarse grid.
        pts: (cz, cy, cx, 3) float32 LPS coarse node positions, mm.
        step: coarse spacing, mm.
        dr: the fraction's draws.
        strength: factor on every amplitude.

    Returns:
        The field, to assemble for a bladder rate and a non-rigid scale (`Velocity.assemble`).
    """
    bone_soft = _zone_weight(an.bone, step, step, 10.0)
    bone_sharp = _zone_weight(an.bone, step, 0.0, step)
    # soft tissue: sinusoids tapered to zero 20 mm outside the body's box
    taper = _box_taper(pts.shape[:3], an.body_box, int(np.ceil(20.0 / step)))
    soft = np.zeros(pts.shape, np.float32)
    flat = pts.reshape(-1, 3)
    for mode in dr.soft_modes:
        phase = np.sin(flat @ mode[3:6].astype(np.float32) + np.float32(mode[6]))
        soft += (phase[:, None] * mode[None, :3].astype(np.float32)).reshape(pts.shape)
    soft *= taper[..., None]
    bladder_centre = None
    bladder_w = None
    if BLADDER in an.frac and float(an.frac[BLADDER].sum()) > 1.0:
        fb = an.frac[BLADDER]
        c0 = weighted_centroid(fb, points=pts)
        inside = fb > 0.5
        if not inside.any():
            inside = fb >= fb.max() * 0.5
        cand = pts[inside].astype(float)
        if PROSTATE in an.frac and float(an.frac[PROSTATE].sum()) > 1.0:
            target = weighted_centroid(an.frac[PROSTATE], points=pts)
        else:  # no prostate: the bladder base is inferior and posterior
            target = c0 + np.array([0.0, 40.0, -60.0])
        base = cand[int(np.argmin(np.linalg.norm(cand - target, axis=1)))]
        bladder_centre = c0 + 0.6 * (base - c0)
        bladder_w = _zone_weight(inside, step, 3.0, 20.0)
    rectum = None
    seg_z = None
    if an.rect_centre is not None and an.rect_tangent is not None and an.rect_z is not None:
        z0, z1 = an.rect_z
        seg_z = z0 + dr.rectum_segment * (z1 - z0)
        inside = an.frac[RECTUM] > 0.5
        wr = _zone_weight(inside, step, 2.0, 12.0)
        window = np.exp(-0.5 * ((pts[:, 0, 0, 2] - seg_z) / dr.rectum_sigma_mm) ** 2)
        wr *= window.astype(np.float32)[:, None, None]
        c = an.rect_centre.astype(np.float32)[:, None, None, :]
        t = an.rect_tangent.astype(np.float32)[:, None, None, :]
        d = pts - c
        perp = d - (d * t).sum(axis=-1, keepdims=True) * t
        rectum = -perp * wr[..., None]
    prostate_frac = None
    zone_frac = [an.frac[k] for k in (PROSTATE, SEMINAL_VESICLES) if k in an.frac]
    if zone_frac and float(sum(f.sum() for f in zone_frac)) > 1.0:
        prostate_frac = np.clip(sum(zone_frac), 0.0, 1.0).astype(np.float32)
    return Velocity(
        an=an,
        pts=pts,
        step=step,
        draws=dr,
        strength=strength,
        bone_soft=bone_soft,
        bone_sharp=bone_sharp,
        soft=soft,
        bladder_centre=bladder_centre,
        bladder_w=bladder_w,
        rectum=rectum,
        segment_z=seg_z,
        prostate_frac=prostate_frac,
    )


def _integrate_box(w: F32, box: Box | None, step: float) -> tuple[F32, int]:
    """Integrate the velocity only inside `box` (zero displacement elsewhere)."""
    out = np.zeros_like(w)
    if box is None:
        return out, 0
    v, n = _integrate(np.ascontiguousarray(w[box]), step)
    out[box] = v
    return out, n


def support_box(w: F32) -> Box | None:
    """Index box (+1) of the non-zero vectors of a (cz, cy, cx, 3) field (None: all zero)."""
    return index_box(np.any(w != 0, axis=-1), 1)


def tune_velocity(vf: Velocity, target_ratio: float | None) -> tuple[F32, dict[str, Any]]:
    """Tune the bladder rate, integrate, check det J and soften; returns (v mm, info)."""
    step = vf.step
    fb = vf.an.frac.get(BLADDER)
    scale = 1.0
    info: dict[str, Any] = {}
    for _attempt in range(8):
        target = None if target_ratio is None else float(target_ratio**scale)
        a = 0.0 if target is None else float(np.log(target)) / 3.0
        estimate = 1.0
        if target is not None and fb is not None and vf.bladder_w is not None and a != 0.0:
            pad = int(np.ceil(40.0 / step))
            box = index_box(fb > 0.05, pad)
            for _ in range(3):
                w, _vel = vf.assemble(a, scale)
                v, _n = _integrate_box(w, box, step)
                estimate = _ratio_after(fb[box], v[box], step) if box is not None else 1.0
                if abs(estimate / target - 1.0) < 0.02:
                    break
                a += float(np.log(target / max(estimate, 1e-3))) / 3.0
        w, vel = vf.assemble(a, scale)
        v, n = _integrate_box(w, support_box(w), step)
        info = {
            "nonrigid_scale": scale,
            "bladder_volume_ratio_target": target,
            "bladder_rate": a,
            "bladder_volume_ratio_estimate": estimate if target is not None else None,
            "prostate_velocity_mm": vel.tolist(),
            "integration_steps": n,
        }
        if not np.any(v):
            info["min_det_jacobian_nonrigid"] = 1.0
            return v, info
        box = support_box(v)
        sub = v if box is None else np.ascontiguousarray(v[box])
        geom = Geometry(sub.shape[:3], origin=np.zeros(3), spacing=np.full(3, step))
        min_det = float(jacobian_determinant(Volume(sub, geom)).min())
        info["min_det_jacobian_nonrigid"] = min_det
        if min_det > MIN_DET_J:
            return v, info
        scale *= 0.7
    return v, info
