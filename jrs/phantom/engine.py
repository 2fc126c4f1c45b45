"""The organ-aware deformation engine: synthetic daily fractions of ANY planning scan.

`synthesize_fraction` takes a planning CT (analytic phantom or real patient), its label map
(ids of `jrs.labels`) and its other structures, and makes one synthetic daily scan with the exact
pull DVF that relates it to the planning scan (DESIGN.md conventions: LPS mm, arrays (z, y, x),
daily point ``p`` corresponds to planning point ``p + u(p)``).

The pull map is ``phi = S o N``:

* ``N(p) = p + v(p)`` is the non-rigid part: the exponential of a stationary velocity field ``w``
  (scaling and squaring with ``scipy.ndimage.map_coordinates`` on an LPS-aligned `COARSE_MM`
  grid, hence diffeomorphic) built from organ-aware pieces, all in the daily frame (the planning
  masks are carried there by the inverse setup, block-averaged to the coarse grid):

  - bladder filling/emptying: ``w = -a (x - c_b) W_bladder(x)``, radial around a point between
    the bladder's centroid and its base (next to the prostate), so the bladder grows mostly
    away from the prostate; its flow scales the bladder by ``exp(-a)`` (volume ratio about
    ``exp(3 a)``) and ``a`` is corrected up to twice so the realised ratio is the drawn one;
  - rectal filling/emptying: ``w = -b perp(x) W_rectum(x) h(z)``, radial around the rectum's
    centreline over a Gaussian segment ``h`` (radius x ``exp(b)``);
  - a smooth soft-tissue field (six sinusoids of 80-180 mm wavelength, 1-3 mm) that fades out
    outside the body (and 12 cm away from the organs);
  - bones (HU > `BONE_HU`, organs excluded, holes filled, parts under `MIN_BONE_MM3` dropped):
    the pieces above are multiplied by ``1 - W_bone``, 0 on the bones and 4 mm around them and
    fading over 10 mm;
  - prostate + seminal vesicles: inside a protection zone (the glands plus a margin larger than
    their motion) the velocity is one constant vector, the drawn shift plus the mean push of the
    neighbours (capped at `MAX_PROSTATE_MM`), so they translate rigidly; this vector is zeroed
    on the bones only (a sharp weight), so a prostate close to the pubis still moves rigidly.

* ``S(q) = c + R (q - c) + t`` is the rigid setup error about the prostate centre ``c``
  (translation in a 5 mm ball, rotations up to 2 degrees per axis).

Hence ``u(p) = (R - I)(p + v(p) - c) + v(p) + t``, and ``u`` is the setup alone wherever
``v = 0`` (bones, and everything outside the non-rigid box). ``u`` is sampled on the coarse grid,
its min det J checked (every non-rigid amplitude is scaled by 0.7 while it is <= `MIN_DET_J`) and
interpolated linearly onto the daily grid: that is the ground truth DVF. The daily CT is the
planning CT warped by the same field (the setup transform outside the non-rigid box, the coarse
displacement transform inside it: the same linear interpolation, without a full-size float64
field), with rectal gas changes (planning gas replaced by textured faeces-like HU, new pockets
painted inside the daily rectal lumen) and correlated CT noise. Labels (``warp(..., "label")``)
and structures (``warp_mask``) are the planning ones warped by the daily DVF, on bounding boxes.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from pydicom.uid import generate_uid
from scipy import ndimage

from jrs.errors import InvalidInput
from jrs.geometry import Geometry, Volume
from jrs.labels import BLADDER, PROSTATE, RECTUM, SEMINAL_VESICLES
from jrs.phantom.deformation import rotation_matrix
from jrs.phantom.generator import _add_gas, _crop, _noise
from jrs.transforms import dvf_to_sitk, jacobian_determinant, warp, warp_mask

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
Mask = npt.NDArray[np.bool_]
Box = tuple[slice, slice, slice]

#: spacing of the grid the velocity field is built and integrated on, mm.
COARSE_MM = 4.0
#: HU above which a voxel counts as bone.
BONE_HU = 200.0
#: HU below which a voxel inside the rectum counts as gas.
GAS_HU = -300.0
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
#: fine boxes larger than this (voxels) are warped through the coarse transform (memory).
FINE_BOX_VOXELS = 6_000_000


@dataclass(eq=False)
class EngineFraction:
    """A synthetic daily fraction of a planning scan with its exact ground truth.

    Attributes:
        ct: daily CT, HU float32 (nz, ny, nx), same grid and orientation as the planning CT, new
            FrameOfReferenceUID.
        labels: daily label map uint8 (nz, ny, nx), ids 0..4 = planning labels warped by
            `true_dvf` (``warp(..., "label")``: per-label linear + arg-max).
        structures: ROI name -> bool (nz, ny, nx) = planning structure warped by `true_dvf`
            (``warp_mask``).
        true_dvf: (nz, ny, nx, 3) float32 pull DVF in mm (LPS components) on the daily grid.
        params: JSON-friendly record of every drawn parameter and realised quantity (bladder
            volume ratio, prostate volume change, min det J, ...).
        gas: bool (nz, ny, nx) rectal gas of the daily scan (HU < `GAS_HU` inside the rectum).
    """

    ct: Volume
    labels: Volume
    structures: dict[str, np.ndarray]
    true_dvf: Volume
    params: dict[str, Any]
    gas: Mask | None = field(default=None, repr=False)


# ------------------------------------------------------------------------------ parameters
@dataclass
class _Draws:
    """Everything drawn for one fraction (before scaling by `strength`)."""

    translation_mm: F64
    rotation_deg: F64
    bladder_factor: float
    rectum_factor: float
    rectum_segment: float  # 0..1 position along the rectum's z extent
    rectum_sigma_mm: float
    prostate_shift_mm: F64
    soft_amplitude_mm: float
    soft_modes: F64  # (6, 7): ax, ay, az (mm), kx, ky, kz (1/mm), phase
    gas_vanishes: bool
    gas_new: bool
    faeces_hu: float
    noise_hu: float


#: draw profiles: ``v3`` (the ranges the released model v3 was trained on) and ``broad`` (issue
#: 30: bladder volume -50 % .. +80 %, rectal radius x 0.7 .. 1.5, setup rotations up to 3 deg
#: per axis about a point up to 60 mm from the prostate rather than about the prostate itself)
PROFILES: tuple[str, ...] = ("v3", "broad")
#: the ranges of each profile: bladder volume ratio, rectal radius factor, rotation (deg),
#: distance of the rotation centre from the prostate (mm)
_RANGES: dict[str, tuple[tuple[float, float], tuple[float, float], float, float]] = {
    "v3": ((0.6, 1.6), (0.8, 1.3), 2.0, 0.0),
    "broad": ((0.5, 1.8), (0.7, 1.5), 3.0, 60.0),
}


def _draw(rng: np.random.Generator, noise_hu: float | None, profile: str = "v3") -> _Draws:
    (b_lo, b_hi), (r_lo, r_hi), max_rot, _ = _RANGES[profile]
    d = rng.normal(size=3)
    d /= max(float(np.linalg.norm(d)), 1e-12)
    t = d * 5.0 * float(rng.uniform()) ** (1.0 / 3.0)  # uniform in the 5 mm ball
    rot = rng.uniform(-max_rot, max_rot, 3)
    bladder = float(np.exp(rng.uniform(np.log(b_lo), np.log(b_hi))))
    rect = float(np.exp(rng.uniform(np.log(r_lo), np.log(r_hi))))
    seg = float(rng.uniform(0.2, 0.8))
    sigma = float(rng.uniform(12.0, 25.0))
    shift = np.array([rng.uniform(-1.0, 1.0), rng.uniform(-3.0, 3.0), rng.uniform(-3.0, 3.0)])
    n = float(np.linalg.norm(shift))
    if n > 4.0:
        shift *= 4.0 / n
    amp = float(rng.uniform(1.0, 3.0))
    modes = np.zeros((6, 7))
    for m in range(6):
        k = rng.normal(size=3)
        k /= np.linalg.norm(k)
        a = rng.normal(size=3)
        a /= np.linalg.norm(a)
        wavelength = rng.uniform(80.0, 180.0)
        modes[m, :3] = a * amp / np.sqrt(6.0)
        modes[m, 3:6] = k * 2 * np.pi / wavelength
        modes[m, 6] = rng.uniform(0, 2 * np.pi)
    vanish = bool(rng.uniform() < 0.5)
    new = bool(rng.uniform() < 0.5)
    faeces = float(rng.uniform(-50.0, 40.0))
    noise = float(rng.uniform(5.0, 15.0)) if noise_hu is None else float(noise_hu)
    return _Draws(t, rot, bladder, rect, seg, sigma, shift, amp, modes, vanish, new, faeces, noise)


# ------------------------------------------------------------------------------ coarse grid
def _coarse_grid(daily: Geometry, step: float) -> Geometry:
    """An LPS-aligned grid of spacing `step` covering the daily grid with a 2-voxel margin."""
    corners = daily.corners()
    lo = corners.min(axis=0) - 2 * step
    hi = corners.max(axis=0) + 2 * step
    n = np.ceil((hi - lo) / step).astype(int) + 1
    return Geometry((int(n[2]), int(n[1]), int(n[0])), origin=lo, spacing=np.full(3, step))


def _setup_transform(rot: F64, centre: F64, t: F64) -> sitk.AffineTransform:
    """The setup ``q -> c + R (q - c) + t`` as a SimpleITK transform (daily -> planning)."""
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(tuple(float(v) for v in rot.reshape(-1)))
    tx.SetCenter(tuple(float(v) for v in centre))
    tx.SetTranslation(tuple(float(v) for v in t))
    return tx


def _to_coarse(
    mask: npt.NDArray[Any], geometry: Geometry, coarse: Geometry, tx: sitk.Transform
) -> F32:
    """Fraction of `mask` (planning grid) around each coarse voxel of the daily frame.

    The mask is block-averaged (``BinShrink``, in 1 % steps) to about the coarse spacing, then
    sampled through the setup transform: ``out(x) = mean of mask near S(x)``.

    Args:
        mask: (nz, ny, nx) bool mask on `geometry`.
        geometry: the planning grid.
        coarse: the coarse grid (daily frame).
        tx: the setup transform (daily -> planning points).

    Returns:
        (cz, cy, cx) float32 fractions in [0, 1].
    """
    box = _bbox(mask, 4)
    if box is None:
        return np.zeros(coarse.shape, np.float32)
    sub = _crop(Volume(mask, geometry), box)
    img = sitk.GetImageFromArray(np.multiply(sub.array, 100, dtype=np.uint8))
    sub.geometry.apply_to_sitk(img)
    shrink = [
        int(max(1, min(round(COARSE_MM / s), n)))
        for s, n in zip(geometry.spacing, img.GetSize(), strict=True)
    ]
    if max(shrink) > 1:
        img = sitk.BinShrink(img, shrink)
    out = sitk.Resample(img, coarse.reference_image(), tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return np.asarray(sitk.GetArrayFromImage(out) / np.float32(100.0), dtype=np.float32)


def _bbox(mask: Mask, pad: int) -> Box | None:
    """Index box of the non-zero voxels of a (nz, ny, nx) mask grown by `pad` (None if empty)."""
    nz = mask.shape[0]
    zs = np.flatnonzero(np.any(np.reshape(mask, (nz, -1)), axis=1))
    if zs.size == 0:
        return None
    plane = np.any(mask[zs[0] : zs[-1] + 1], axis=0)
    ys = np.flatnonzero(np.any(plane, axis=1))
    xs = np.flatnonzero(np.any(plane, axis=0))
    return tuple(  # type: ignore[return-value]
        slice(max(int(i[0]) - pad, 0), min(int(i[-1]) + pad + 1, n))
        for i, n in zip((zs, ys, xs), mask.shape, strict=True)
    )


def _smoothstep(s: npt.NDArray[Any]) -> F32:
    s = np.clip(s, 0.0, 1.0)
    return (s * s * (3.0 - 2.0 * s)).astype(np.float32)


def _zone_weight(mask: Mask, step: float, margin: float, width: float) -> F32:
    """1 on `mask` and within `margin` mm of it, smooth fade to 0 over the next `width` mm."""
    out = np.zeros(mask.shape, np.float32)
    box = _bbox(mask, int(np.ceil((margin + width) / step)) + 1)
    if box is None:
        return out
    dist = ndimage.distance_transform_edt(~mask[box], sampling=step)
    out[box] = 1.0 - _smoothstep((dist - margin) / width)
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


def _centroid(frac: F32, pts: F32) -> F64:
    s = float(frac.sum())
    return np.asarray((pts * frac[..., None]).reshape(-1, 3).sum(axis=0) / max(s, 1e-9), float)


@dataclass(eq=False)
class _Anatomy:
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
    bone = _to_coarse(ct.array > BONE_HU, ct.geometry, coarse, tx) > 0.1
    bone &= ~ndimage.binary_dilation(organs > 0.05, iterations=1)
    for k in range(bone.shape[0]):
        if bone[k].any():
            bone[k] = ndimage.binary_fill_holes(bone[k])
    lab, n = ndimage.label(bone)
    if n:
        sizes = np.bincount(lab.reshape(-1))
        keep = sizes * coarse.spacing.prod() >= MIN_BONE_MM3
        keep[0] = False
        bone = keep[lab]
    return np.asarray(bone, bool)


def _anatomy(
    ct: Volume, labels: npt.NDArray[Any], coarse: Geometry, tx: sitk.Transform, pts: F32
) -> _Anatomy:
    counts = np.bincount(labels.reshape(-1), minlength=256)
    present = [int(v) for v in np.flatnonzero(counts) if v != 0]
    frac = {lab: _to_coarse(labels == lab, ct.geometry, coarse, tx) for lab in present}
    organs = np.sum(list(frac.values()), axis=0) if frac else np.zeros(coarse.shape, np.float32)
    bone = _bone_mask(ct, organs, coarse, tx)
    body = _to_coarse(ct.array > BODY_HU, ct.geometry, coarse, tx) > 0.5
    comp, n = ndimage.label(ndimage.binary_opening(body))
    if n:  # the largest component: the couch and skin markers are thin or small
        body = comp == int(np.argmax(np.bincount(comp.reshape(-1))[1:])) + 1
    body_box = _bbox(body, 0)
    if frac and body_box is not None:  # the soft-tissue field stays within 12 cm of the organs
        near = _bbox(organs > 0.3, int(SOFT_REACH_MM / coarse.spacing[0]))
        body_box = None if near is None else _intersect(body_box, near)
    an = _Anatomy(frac=frac, bone=bone, body_box=body_box)
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


# ------------------------------------------------------------------------------ velocity
@dataclass(eq=False)
class _Velocity:
    """The organ-aware velocity field of one fraction (daily frame, coarse grid)."""

    an: _Anatomy
    pts: F32  # (cz, cy, cx, 3) LPS coarse points
    step: float
    draws: _Draws
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
        ramps.append(1.0 - _smoothstep(d / max(pad, 1)))
    return ramps[0][:, None, None] * ramps[1][None, :, None] * ramps[2][None, None, :]


def _build_velocity(an: _Anatomy, pts: F32, step: float, dr: _Draws, strength: float) -> _Velocity:
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
        c0 = _centroid(fb, pts)
        inside = fb > 0.5
        if not inside.any():
            inside = fb >= fb.max() * 0.5
        cand = pts[inside].astype(float)
        if PROSTATE in an.frac and float(an.frac[PROSTATE].sum()) > 1.0:
            target = _centroid(an.frac[PROSTATE], pts)
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
    return _Velocity(
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


def _support_box(w: F32) -> Box | None:
    return _bbox(np.any(w != 0, axis=-1), 1)


def _nonrigid(vf: _Velocity, target_ratio: float | None) -> tuple[F32, dict[str, Any]]:
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
            box = _bbox(fb > 0.05, pad)
            for _ in range(3):
                w, _vel = vf.assemble(a, scale)
                v, _n = _integrate_box(w, box, step)
                estimate = _ratio_after(fb[box], v[box], step) if box is not None else 1.0
                if abs(estimate / target - 1.0) < 0.02:
                    break
                a += float(np.log(target / max(estimate, 1e-3))) / 3.0
        w, vel = vf.assemble(a, scale)
        v, n = _integrate_box(w, _support_box(w), step)
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
        box = _support_box(v)
        sub = v if box is None else np.ascontiguousarray(v[box])
        geom = Geometry(sub.shape[:3], origin=np.zeros(3), spacing=np.full(3, step))
        min_det = float(jacobian_determinant(Volume(sub, geom)).min())
        info["min_det_jacobian_nonrigid"] = min_det
        if min_det > MIN_DET_J:
            return v, info
        scale *= 0.7
    return v, info


# ------------------------------------------------------------------------------ warping
@dataclass(eq=False)
class _Warper:
    """Warps planning arrays onto (boxes of) the daily grid with the fraction's field.

    Attributes:
        planning: the planning grid.
        dvf: the exact daily field (nz, ny, nx, 3), mm.
        setup: the rigid setup transform (daily -> planning points).
        coarse_tx: the coarse displacement field as a transform (same linear interpolation as
            `dvf`, without a full-size float64 copy).
        rot, centre, t: the setup (planning point = centre + rot (p - centre) + t).
        reach: largest non-rigid displacement, mm.
        nonrigid: daily index box outside which the field is the setup alone (None: nowhere).
    """

    planning: Geometry
    dvf: Volume
    setup: sitk.Transform
    coarse_tx: sitk.Transform
    rot: F64
    centre: F64
    t: F64
    reach: float
    nonrigid: Box | None

    def daily_box(self, box: Box, margin: float = 4.0) -> Box | None:
        """Daily index box of the points whose planning image can fall in the planning `box`."""
        lo, hi = _lohi(_crop_geometry(self.planning, box))
        corners = np.array(
            [[a[0], b[1], c[2]] for a in (lo, hi) for b in (lo, hi) for c in (lo, hi)]
        )
        back = (corners - self.centre - self.t) @ self.rot + self.centre  # S^-1 (rigid)
        pad = self.reach + margin
        return _index_box_of(back.min(axis=0) - pad, back.max(axis=0) + pad, self.dvf.geometry)

    def resample(
        self, moving: sitk.Image, dbox: Box, default: float, pixel: int = sitk.sitkFloat32
    ) -> npt.NDArray[Any]:
        """Linear resampling of `moving` onto the daily `dbox` (array of that box's shape).

        The setup alone is used outside the non-rigid box and the coarse field inside it: the
        same values as warping with the full field, at a fraction of the cost.
        """
        geom = _crop_geometry(self.dvf.geometry, dbox)
        out = sitk.GetArrayFromImage(
            sitk.Resample(
                moving, geom.reference_image(), self.setup, sitk.sitkLinear, default, pixel
            )
        )
        inner = _intersect(dbox, self.nonrigid)
        if inner is not None:
            rel = tuple(
                slice(a.start - b.start, a.stop - b.start) for a, b in zip(inner, dbox, strict=True)
            )
            sub = _crop_geometry(self.dvf.geometry, inner)
            out[rel] = sitk.GetArrayFromImage(
                sitk.Resample(
                    moving, sub.reference_image(), self.coarse_tx, sitk.sitkLinear, default, pixel
                )
            )
        return out

    def exact(self, arr: npt.NDArray[Any], box: Box, mode: str) -> npt.NDArray[Any]:
        """Warp the `box` crop of a planning array by the exact field (label or mask), full size."""
        out = np.zeros(self.dvf.geometry.shape, arr.dtype if mode == "label" else bool)
        dbox = self.daily_box(box)
        if dbox is None:
            return out
        moving = _crop(Volume(arr, self.planning), box)
        sub = _crop(self.dvf, dbox)
        if mode == "label":
            out[dbox] = warp(moving, sub, "label", 0).array
        else:
            out[dbox] = warp_mask(moving, sub).array
        return out


def _crop_geometry(g: Geometry, box: Box) -> Geometry:
    return Geometry(
        shape=(box[0].stop - box[0].start, box[1].stop - box[1].start, box[2].stop - box[2].start),
        origin=g.index_to_physical([box[2].start, box[1].start, box[0].start]),
        spacing=g.spacing,
        direction=g.direction,
        frame_of_reference_uid=g.frame_of_reference_uid,
    )


def _index_box_of(lo: F64, hi: F64, g: Geometry) -> Box | None:
    """Index box of grid `g` covering the LPS box [lo, hi] (None when they do not overlap)."""
    corners = np.array([[a[0], b[1], c[2]] for a in (lo, hi) for b in (lo, hi) for c in (lo, hi)])
    ijk = g.physical_to_index(corners)
    i0 = np.floor(ijk.min(axis=0)).astype(int)
    i1 = np.ceil(ijk.max(axis=0)).astype(int)
    n = np.asarray(g.size_xyz)
    if np.any(i1 < 0) or np.any(i0 > n - 1):
        return None
    i0, i1 = np.clip(i0, 0, n - 1), np.clip(i1, 0, n - 1)
    return (
        slice(int(i0[2]), int(i1[2]) + 1),
        slice(int(i0[1]), int(i1[1]) + 1),
        slice(int(i0[0]), int(i1[0]) + 1),
    )


def _intersect(a: Box, b: Box | None) -> Box | None:
    if b is None:
        return None
    out = tuple(
        slice(max(x.start, y.start), min(x.stop, y.stop)) for x, y in zip(a, b, strict=True)
    )
    if any(sl.stop <= sl.start for sl in out):
        return None
    return out  # type: ignore[return-value]


def _lohi(g: Geometry) -> tuple[F64, F64]:
    nx, ny, nz = g.size_xyz
    idx = np.array(
        [[i, j, k] for i in (0, nx - 1) for j in (0, ny - 1) for k in (0, nz - 1)], float
    )
    ends = g.index_to_physical(idx)
    return ends.min(axis=0), ends.max(axis=0)


def _upsample(coarse_u: Volume, daily: Geometry) -> Volume:
    """Linear interpolation of the coarse field onto the daily grid, (nz, ny, nx, 3) float32."""
    out = np.empty((*daily.shape, 3), np.float32)
    ref = daily.reference_image()
    for c in range(3):
        comp = sitk.GetImageFromArray(np.ascontiguousarray(coarse_u.array[..., c]))
        coarse_u.geometry.apply_to_sitk(comp)
        img = sitk.Resample(comp, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        out[..., c] = sitk.GetArrayViewFromImage(img)
        del img
    return Volume(out, daily)


def _faeces(
    ct: Volume, gas: Mask, box: Box, hu: float, rng: np.random.Generator
) -> npt.NDArray[np.float32]:
    """The planning CT crop with its rectal gas replaced by faeces-like textured HU."""
    region = np.array(ct.array[box], dtype=np.float32)
    g = gas[box]
    alpha = ndimage.gaussian_filter(ndimage.binary_dilation(g).astype(np.float32), 0.7)
    alpha = np.maximum(alpha, g.astype(np.float32))
    texture = ndimage.gaussian_filter(rng.standard_normal(region.shape).astype(np.float32), 1.2)
    texture *= 25.0 / max(float(texture.std()), 1e-6)
    fill = np.float32(hu) + texture
    region += alpha * (fill - region)
    return region


def _derived_frame(ct: Volume, dr: _Draws, strength: float) -> str:
    key = hashlib.sha1(
        repr(
            (
                ct.geometry.frame_of_reference_uid,
                dr.translation_mm.tolist(),
                dr.rotation_deg.tolist(),
                dr.bladder_factor,
                dr.soft_modes.tolist(),
                strength,
            )
        ).encode()
    ).hexdigest()
    return str(generate_uid(entropy_srcs=["jrs-engine", key]))


def _count(arr: npt.NDArray[Any], lab: int) -> int:
    return int(np.count_nonzero(arr == lab))


# ------------------------------------------------------------------------------ public API
def synthesize_fraction(
    ct: Volume,
    labels: Volume,
    structures: Mapping[str, np.ndarray],
    rng: np.random.Generator,
    *,
    frame_of_reference_uid: str | None = None,
    strength: float = 1.0,
    gas: bool = True,
    noise_hu: float | None = None,
    profile: str = "v3",
) -> EngineFraction:
    """Make a synthetic daily fraction of a planning scan with the exact pull DVF.

    Args:
        ct: planning CT, HU (nz, ny, nx), any axis-aligned or oblique LPS geometry.
        labels: planning label map (nz, ny, nx) on the CT grid, ids of `jrs.labels` (1 bladder,
            2 rectum, 3 seminal vesicles, 4 prostate); any may be absent.
        structures: ROI name -> (nz, ny, nx) mask on the CT grid (non-zero inside); every one is
            warped (body, femoral heads, PTV, the organ ROIs themselves, ...).
        rng: source of every random draw (same state -> identical arrays).
        frame_of_reference_uid: FrameOfReferenceUID of the daily scan; derived deterministically
            from the planning frame and the draws when None.
        strength: factor on every rigid and non-rigid amplitude (0: identity field exactly, the
            daily CT is the planning CT plus noise and the labels are the planning labels).
        gas: change the rectal gas (planning gas may vanish, new pockets may appear).
        noise_hu: std of the CT noise added to the daily image, HU; drawn in [5, 15] when None.
        profile: the ranges of the draws (`PROFILES`): ``v3`` (default, the released model's
            training ranges) or ``broad`` (larger bladder and rectal changes, rotations up to 3
            deg about a point near, not at, the prostate).

    Returns:
        The fraction: daily CT, labels, structures, true DVF (daily grid) and parameters.

    Raises:
        InvalidInput: labels or structures not on the CT grid, a negative strength.
    """
    g = ct.geometry
    if ct.is_vector:
        raise InvalidInput(f"the planning CT must be a scalar volume, got shape {ct.array.shape}")
    g.require_same_grid(labels.geometry, "the planning CT and its label map")
    for name, m in structures.items():
        if np.shape(m) != g.shape:
            raise InvalidInput(
                f"structure {name!r} has shape {np.shape(m)}, the planning CT grid is {g.shape}"
            )
    if not np.isfinite(strength) or strength < 0:
        raise InvalidInput(f"strength must be a finite number >= 0, got {strength}")
    lab = np.asarray(labels.array)
    if not np.issubdtype(lab.dtype, np.integer):
        raise InvalidInput(f"labels must be an integer label map, got dtype {lab.dtype}")
    lab = lab.astype(np.uint8, copy=False)

    clock = [time.perf_counter(), time.process_time()]

    def _tick(what: str) -> None:
        now = [time.perf_counter(), time.process_time()]
        log.debug(
            "synthesize_fraction: %s %.2f s (cpu %.2f s)",
            what,
            now[0] - clock[0],
            now[1] - clock[1],
        )
        clock[:] = now

    if profile not in PROFILES:
        raise InvalidInput(f"draw profile {profile!r} unknown; use one of {', '.join(PROFILES)}")
    dr = _draw(rng, noise_hu, profile)
    frame = frame_of_reference_uid or _derived_frame(ct, dr, strength)
    daily = g.with_frame(frame)
    step = COARSE_MM
    coarse = _coarse_grid(daily, step)
    pts = coarse.voxel_centres().astype(np.float32)

    # rigid setup about the prostate centre (or the labels' centroid, or the grid centre)
    centre_mask = lab == PROSTATE if np.any(lab == PROSTATE) else lab > 0
    if np.any(centre_mask):
        k, j, i = (np.mean(a) for a in np.nonzero(centre_mask))
        centre = g.index_to_physical([i, j, k])
    else:
        centre = g.index_to_physical((np.asarray(g.size_xyz) - 1) / 2.0)
    reach = _RANGES[profile][3]
    if reach > 0:  # the couch rotates the patient about some point, seldom the prostate
        offset = rng.normal(size=3)
        centre = centre + offset / max(float(np.linalg.norm(offset)), 1e-12) * reach * float(
            rng.uniform()
        ) ** (1.0 / 3.0)
    rot_deg = dr.rotation_deg * strength
    rot = rotation_matrix(rot_deg)
    t = dr.translation_mm * strength
    setup = _setup_transform(rot, centre, t)

    info: dict[str, Any] = {"nonrigid_scale": 1.0, "min_det_jacobian_nonrigid": 1.0}
    v = np.zeros((*coarse.shape, 3), np.float32)
    vf: _Velocity | None = None
    target_ratio = None
    if strength > 0:
        an = _anatomy(ct, lab, coarse, setup, pts)
        vf = _build_velocity(an, pts, step, dr, strength)
        if vf.bladder_w is not None:
            target_ratio = float(dr.bladder_factor**strength)
        _tick("anatomy")
        v, info = _nonrigid(vf, target_ratio)
        _tick("velocity")

    # u = (R - I)(p + v - c) + v + t on the coarse grid
    rel = pts + v - centre.astype(np.float32)
    u = rel @ (rot - np.eye(3)).T.astype(np.float32) + v + t.astype(np.float32)
    coarse_u = Volume(np.ascontiguousarray(u, dtype=np.float32), coarse)
    del rel, u
    min_det = float(jacobian_determinant(coarse_u).min())
    dvf = _upsample(coarse_u, daily)
    support = _support_box(v)
    nonrigid = None
    if support is not None:
        lo, hi = _lohi(_crop_geometry(coarse, support))
        nonrigid = _index_box_of(lo - step, hi + step, daily)
        log.debug("non-rigid daily box %s", nonrigid)
    warper = _Warper(
        planning=g,
        dvf=dvf,
        setup=setup,
        coarse_tx=dvf_to_sitk(coarse_u),
        rot=rot,
        centre=np.asarray(centre, float),
        t=t,
        reach=float(np.sqrt((v**2).sum(axis=-1)).max()),
        nonrigid=nonrigid,
    )
    full: Box = (slice(0, g.shape[0]), slice(0, g.shape[1]), slice(0, g.shape[2]))
    _tick("field")

    # planning rectal gas and the daily image
    rect_gas = (lab == RECTUM) & (ct.array < GAS_HU)
    vanish = bool(gas and strength > 0 and dr.gas_vanishes and rect_gas.any())
    if strength == 0:
        img = np.array(ct.array, dtype=np.float32)
    else:
        img = warper.resample(ct.to_sitk(), full, -1000.0)
        if vanish:
            gbox = _bbox(lab == RECTUM, 3)
            dbox = None if gbox is None else warper.daily_box(gbox)
            if gbox is not None and dbox is not None:
                crop = _crop(ct, gbox)
                moving = crop.with_array(_faeces(ct, rect_gas, gbox, dr.faeces_hu, rng))
                # NaN where p + u(p) leaves the crop: those voxels keep the full warp
                patch = warper.resample(moving.to_sitk(), dbox, float("nan"))
                inside = ~np.isnan(patch)
                img[dbox][inside] = patch[inside]
    _tick("ct")

    # labels and structures by the exact field, on boxes
    lbox = _bbox(lab > 0, 3)
    exact = strength > 0 and lbox is not None
    daily_lab = warper.exact(lab, lbox, "label") if exact and lbox else lab.copy()
    out_structures: dict[str, np.ndarray] = {}
    for name, m in structures.items():
        arr = np.asarray(m)
        arr = arr if arr.dtype == np.bool_ else arr != 0
        box = _bbox(arr, 2)
        if strength == 0 or box is None:
            out_structures[name] = arr.copy()
            continue
        dbox = warper.daily_box(box)
        if dbox is None:
            out_structures[name] = np.zeros(g.shape, bool)
        elif int(np.prod([sl.stop - sl.start for sl in dbox])) <= FINE_BOX_VOXELS:
            out_structures[name] = warper.exact(arr, box, "mask")
        else:  # a large ROI (body): through the coarse transform, without float copies
            crop = _crop(Volume(arr, g), box)
            img8 = sitk.GetImageFromArray(crop.array.view(np.uint8))
            crop.geometry.apply_to_sitk(img8)
            res = np.zeros(g.shape, bool)
            res[dbox] = warper.resample(img8, dbox, 0.0) >= 0.5
            out_structures[name] = res
    _tick("structures")

    # new gas pockets inside the daily rectal lumen (the rectum eroded by ~2.5 mm)
    new = bool(gas and strength > 0 and dr.gas_new and np.any(daily_lab == RECTUM))
    if new:
        rbox = _bbox(daily_lab == RECTUM, 2)
        if rbox is not None:
            rect = daily_lab[rbox] == RECTUM
            dist = ndimage.distance_transform_edt(rect, sampling=g.spacing[::-1])
            lumen = dist > 2.5
            _add_gas(img[rbox], lumen if lumen.any() else rect, daily, rng)
    daily_gas = (daily_lab == RECTUM) & (img < GAS_HU)
    img += _noise(g.shape, dr.noise_hu, rng)
    np.clip(img, -1024, 3071, out=img)
    _tick("noise")

    params = _params(dr, strength, centre, rot, t, info, vf, min_det, frame, vanish, new)
    params["profile"] = profile
    for key, label_id in (("bladder", BLADDER), ("prostate", PROSTATE)):
        before = _count(lab, label_id)
        after = _count(daily_lab, label_id)
        ratio = after / before if before else None
        if key == "bladder":
            params["bladder_volume_ratio"] = ratio
        else:
            params["prostate_volume_change"] = None if ratio is None else ratio - 1.0
    params["daily_gas_voxels"] = int(daily_gas.sum())
    params["planning_rectal_gas_voxels"] = int(rect_gas.sum())
    return EngineFraction(
        ct=Volume(img, daily),
        labels=Volume(daily_lab, daily),
        structures=out_structures,
        true_dvf=dvf,
        params=params,
        gas=daily_gas,
    )


def _params(
    dr: _Draws,
    strength: float,
    centre: F64,
    rot: F64,
    t: F64,
    info: Mapping[str, Any],
    vf: _Velocity | None,
    min_det: float,
    frame: str,
    vanish: bool,
    new: bool,
) -> dict[str, Any]:
    scale = float(info.get("nonrigid_scale", 1.0))
    s = strength * scale
    return {
        "engine": "organ",
        "strength": strength,
        "coarse_mm": COARSE_MM,
        "frame_of_reference_uid": frame,
        "setup": {
            "translation_mm": t.tolist(),
            "rotation_deg": (dr.rotation_deg * strength).tolist(),
            "rotation_matrix": rot.tolist(),
            "centre_mm": np.asarray(centre, float).tolist(),
            "drawn_translation_mm": dr.translation_mm.tolist(),
            "drawn_rotation_deg": dr.rotation_deg.tolist(),
        },
        "bladder": {
            "factor_drawn": dr.bladder_factor,
            "volume_ratio_target": info.get("bladder_volume_ratio_target"),
            "volume_ratio_estimate": info.get("bladder_volume_ratio_estimate"),
            "rate": info.get("bladder_rate", 0.0),
            "base_point_mm": None
            if vf is None or vf.bladder_centre is None
            else vf.bladder_centre.tolist(),
        },
        "rectum": {
            "radius_factor_drawn": dr.rectum_factor,
            "radius_factor": float(dr.rectum_factor**s),
            "segment_position": dr.rectum_segment,
            "segment_z_mm": None if vf is None else vf.segment_z,
            "segment_sigma_mm": dr.rectum_sigma_mm,
        },
        "prostate": {
            "shift_drawn_mm": dr.prostate_shift_mm.tolist(),
            "velocity_mm": info.get("prostate_velocity_mm", [0.0, 0.0, 0.0]),
        },
        "soft_tissue": {
            "amplitude_drawn_mm": dr.soft_amplitude_mm,
            "amplitude_mm": dr.soft_amplitude_mm * s,
            "modes": dr.soft_modes.tolist(),
        },
        "gas": {
            "planning_gas_vanishes": vanish,
            "new_pockets": new,
            "faeces_hu": dr.faeces_hu,
        },
        "noise_hu": dr.noise_hu,
        "nonrigid_scale": scale,
        "integration_steps": info.get("integration_steps", 0),
        "min_det_jacobian_nonrigid": info.get("min_det_jacobian_nonrigid", 1.0),
        "min_det_jacobian": min_det,
        "bladder_volume_ratio_target": info.get("bladder_volume_ratio_target"),
    }
