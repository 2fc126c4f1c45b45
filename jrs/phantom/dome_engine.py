"""The "dome" deformation engine: a held-out family of synthetic daily fractions.

`synthesize_dome_fraction` makes a synthetic daily scan of any planning CT (analytic phantom or
real patient) with the exact pull DVF that relates it to the planning scan, returning the same
`jrs.phantom.engine.EngineFraction` as the organ engine (DESIGN.md conventions: LPS mm, arrays
(z, y, x), daily point ``p`` corresponds to planning point ``p + u(p)``).

Held out
--------
This family is a **test family only**. The model is trained, and its QA calibrated, on fractions
of the organ engine (`jrs.phantom.engine.synthesize_fraction`, family "organ"); the dome family
moves the anatomy by a different mechanism, so re-contouring its fractions is a cross-generator
test of what the model learned. Training and calibration data builders (``training/``,
`jrs.qa_calibration`) must never call it, and ``jrs phantom --family dome`` /
``write_from_planning(..., family="dome")`` draw from a random stream of their own (see
`SEED_STREAM`), so the two families never share draws.

How it differs from the organ family
------------------------------------
* **Push fields, not a stationary velocity field.** The non-rigid motion is a forward ("push")
  displacement ``d`` built directly on an LPS-aligned `COARSE_MM` (3 mm, organ: 4 mm) grid and
  inverted numerically by fixed-point iteration, not the exponential of a velocity field.
* **Bladder: dome-weighted wall motion** about the bladder base (next to the prostate), instead of
  a radial flow about a point: ``d = s (q - b0) g(q)`` with ``g = 0.35 + 0.65 max(0, cos)^1.5`` of
  the angle to the dome direction, continued into the tissue by the nearest wall point's motion
  decaying as ``exp(-dist / 18 mm)``. Volume ratio log-uniform in [0.5, 1.8] with a change of at
  least 30 % (organ: [0.6, 1.6], any change).
* **Rectum: one local Gaussian push** about a point of the centreline (filling or gas), instead of
  a radial flow about the centreline over a segment; new gas pockets of -700..-900 HU (organ:
  -1000 HU) and no removal of planning gas.
* **Prostate: rigid with a pitch** about the left-right axis (up to 4 deg), not a translation
  only; no soft-tissue sinusoids at all.
* **Setup about the bony pelvis centre** (rotations up to 3 deg, translation in a 7 mm ball), not
  about the prostate centre (2 deg, 5 mm).
* **Noise**: white Gaussian noise (8-20 HU) blurred in-plane by a 0.6-voxel Gaussian (organ: a
  binomial kernel, 5-15 HU).

Frames and composition
----------------------
Three frames: the planning frame P, an intermediate frame I (the planning anatomy placed by the
inverse setup: the intermediate point ``q`` shows the planning point ``S(q)``) and the daily frame
D. The non-rigid motion acts in I, the setup error carries I to P:

* ``S(q) = c + R (q - c) + t`` (I -> P, i.e. daily -> planning for a rigid scan) with ``c`` the
  centroid of the bony pelvis (bone within `BONY_Z_MM` in z of the prostate), ``R`` the rotation
  ``Rz Ry Rx`` of angles uniform in [-3, 3] deg and ``t`` uniform in a 7 mm ball;
* the push ``q -> q + d(q)`` (I -> D) moves the organs; its pull inverse ``N(p) = p + v(p)``
  (D -> I) solves ``v(p) = -d(p + v(p))`` by fixed-point iteration with trilinear sampling
  (``map_coordinates``), node by node until the residual ``|v + d(p + v)|`` is below 0.01 mm
  (at most 60 iterations; usually 10-20), damped where it oscillates (a local stretch above 2);
  the largest residual is reported (``inversion_residual_mm``);
* the pull map is ``phi = S o N``, so ``u(p) = S(p + v(p)) - p = (R - I)(p - c) + t + R v(p)``.

Where ``v = 0`` (everything outside the non-rigid support: bones and tissue far from the organs)
``u`` is exactly the rigid setup ``S(p) - p``.

The push field
--------------
``d = W (1 - P) (s A + a Q) + W_p P D_p`` on the coarse grid, where (all in frame I):

* ``A``: the bladder's unit field ``(q - b0) g(q)`` inside and on the bladder, continued outside by
  the nearest wall point's value times ``exp(-dist / 18 mm)`` (``distance_transform_edt`` with
  indices), smoothed by a one-voxel Gaussian (the nearest-point map is voxel-quantised) and
  tapered to zero between `BLADDER_TAPER_MM`; ``b0`` is the bladder voxel closest to the prostate
  (the most inferior-posterior one without a prostate), the dome direction runs from ``b0`` to the
  bladder centroid. ``s`` is solved by bisection so that the bladder's volume ratio
  (``sum f_B det(I + grad d) / sum f_B``, then checked on the fine grid) meets the target;
* ``Q``: the rectal push ``(q - c_r) / sqrt(|q - c_r|^2 + r_c^2) exp(-|q - c_r|^2 / (2 sigma^2))``
  about a centreline point ``c_r`` (middle 60 % of the rectum's z extent), ``a`` in [-4, 7] mm,
  ``sigma`` in [10, 16] mm, faded to zero between 3 and 4 sigma. The core radius ``r_c`` (6 mm,
  at least ``1.5 a`` for filling and ``3 |a|`` for emptying) removes the singularity of the pure
  radial direction ``(q - c_r)/|q - c_r|`` at ``c_r``, which would tear the lumen open (a > 0)
  or fold it (a < 0): with it the push stays invertible and the fixed point converges;
* ``D_p = (Rx(pitch) - I)(q - c_p) + t_p``: the rigid motion of prostate + seminal vesicles
  (``t_p`` in a 4 mm ball, pitch uniform in [-4, 4] deg about x through the prostate centroid);
  ``P`` is 1 on the glands dilated by 3 mm and fades to 0 over 6 mm (smoothstep);
* ``W``: 0 on the bones (HU > `BONE_HU` outside the organs, parts of at least `MIN_BONE_MM3`),
  back to 1 over `BONE_BLEND_MM` (smoothstep); ``W_p = max(W, 1 on the glands)`` so the glands
  always move rigidly.

Every piece is exactly zero beyond a bounded reach of the organs (92 mm at most), so the field
is the rigid setup far away. ``det(I + grad d)`` must exceed `MIN_DET_PUSH` (0.25) on the coarse
grid; while it does not, amplitudes are scaled by `SOFTEN` (0.8): those of the rectum and
prostate (``nonrigid_scale``) when their push alone fails, else the bladder's (its target ratio
``r`` becomes ``r^bladder_scale``), and both when only their sum fails. A requested bladder ratio
is therefore kept unless the bladder's own motion fails the check: typically a large shrinkage
(the dome's det is ``(1 + s)^3``, about 0.27 for a ratio of 0.5) or a large filling pushing
tissue against nearby bone (the bone weight compresses it). ``bladder_volume_ratio_target`` is
the ratio aimed at after softening and ``bladder_volume_ratio`` the realised one (count of daily
bladder voxels / planning; within 2-3 % of the target, checked on the daily grid).

The image
---------
The coarse pull field is interpolated linearly onto the daily grid: that is the true DVF. The
daily CT is the planning CT warped by it (linear, -1000 HU outside; the rigid setup outside the
non-rigid box and the coarse displacement transform inside it, which is the same interpolation
without a full-size float64 field), plus, with probability 0.6, a new gas pocket in the daily
rectal lumen (the daily rectum eroded by 2 mm), plus blurred white noise, clipped to
[-1024, 3071]. Labels (``warp(..., "label")``) and structures (``warp_mask``; very large ones
such as the body through the split rigid/coarse path) are the planning ones warped by the same
field, on bounding boxes.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
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
from jrs.phantom.engine import GAS_HU, EngineFraction
from jrs.transforms import dvf_to_sitk, jacobian_determinant, warp, warp_mask

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
Mask = npt.NDArray[np.bool_]
Box = tuple[slice, slice, slice]

#: spacing of the LPS-aligned grid the push field is built on, mm.
COARSE_MM = 3.0
#: HU above which a voxel outside the organs counts as bone.
BONE_HU = 200.0
#: bone parts smaller than this (mm^3) are ignored (fiducials, calcifications, noise).
MIN_BONE_MM3 = 500.0
#: the non-rigid weight rises from 0 on the bones back to 1 over this distance, mm.
BONE_BLEND_MM = 8.0
#: the setup centre is the centroid of the bone within this z distance of the prostate, mm.
BONY_Z_MM = 100.0
#: the push field's det J must exceed this everywhere on the coarse grid.
MIN_DET_PUSH = 0.25
#: non-rigid amplitudes are multiplied by this while the det J check fails...
SOFTEN = 0.8
#: ... down to this scale (then the field is kept as it is).
MIN_SCALE = 0.05
#: bladder wall motion decays into the tissue as exp(-dist / this), mm.
BLADDER_DECAY_MM = 18.0
#: the bladder's tissue field fades to zero between these distances from the bladder, mm.
BLADDER_TAPER_MM = (50.0, 80.0)
#: bladder volume ratios are drawn log-uniformly in this range.
BLADDER_RATIO_RANGE = (0.5, 1.8)
#: smallest relative bladder volume change of a drawn ratio.
MIN_BLADDER_CHANGE = 0.3
#: realised bladder volume ratio tolerance (relative) the bisection aims at.
BLADDER_TOLERANCE = 0.02
#: the rigid prostate zone: glands dilated by this (mm), blended over the next width (mm).
PROSTATE_MARGIN_MM = 3.0
PROSTATE_BLEND_MM = 6.0
#: fixed-point inversion: stop below this residual (mm) or after this many iterations.
INVERSION_TOL_MM = 0.01
INVERSION_MAX_ITER = 60
#: daily boxes larger than this (voxels) are warped by the split rigid/coarse path (memory).
LARGE_BOX_VOXELS = 8_000_000
#: added to the seed sequence of dome fractions so they never share draws with the organ family.
SEED_STREAM = 0x646F6D65  # "dome"


# ------------------------------------------------------------------------------ draws
@dataclass(frozen=True)
class _Draws:
    """Every random quantity of one fraction (before `strength` and softening)."""

    bladder_ratio: float
    rectum_position: float  # 0..1 within the middle 60 % of the rectum's z extent
    rectum_amplitude_mm: float
    rectum_sigma_mm: float
    gas_pocket: bool
    gas_hu: float
    gas_radii_mm: F64  # (3,) along the array axes (z, y, x)
    prostate_translation_mm: F64
    prostate_pitch_deg: float
    setup_rotation_deg: F64
    setup_translation_mm: F64
    noise_hu: float


def _in_ball(rng: np.random.Generator, radius: float) -> F64:
    """A point uniform in the ball of `radius` (mm) about the origin."""
    direction = rng.normal(size=3)
    direction /= max(float(np.linalg.norm(direction)), 1e-12)
    return np.asarray(direction * radius * float(rng.uniform()) ** (1.0 / 3.0), float)


def _draw(rng: np.random.Generator, noise_hu: float | None) -> _Draws:
    lo, hi = np.log(BLADDER_RATIO_RANGE[0]), np.log(BLADDER_RATIO_RANGE[1])
    ratio = 1.0
    for _ in range(1000):
        ratio = float(np.exp(rng.uniform(lo, hi)))
        if abs(ratio - 1.0) >= MIN_BLADDER_CHANGE:
            break
    position = float(rng.uniform(0.2, 0.8))
    amplitude = float(rng.uniform(-4.0, 7.0))
    sigma = float(rng.uniform(10.0, 16.0))
    pocket = bool(rng.uniform() < 0.6)
    gas_hu = float(rng.uniform(-900.0, -700.0))
    radii = rng.uniform(4.0, 9.0, 3)
    t_p = _in_ball(rng, 4.0)
    pitch = float(rng.uniform(-4.0, 4.0))
    rot = rng.uniform(-3.0, 3.0, 3)
    t = _in_ball(rng, 7.0)
    noise = float(rng.uniform(8.0, 20.0)) if noise_hu is None else float(noise_hu)
    return _Draws(
        ratio, position, amplitude, sigma, pocket, gas_hu, radii, t_p, pitch, rot, t, noise
    )


# ------------------------------------------------------------------------------ small helpers
def _smoothstep(x: npt.NDArray[Any]) -> F32:
    y = np.clip(x, 0.0, 1.0)
    return np.asarray(y * y * (3.0 - 2.0 * y), dtype=np.float32)


def _rot_x(deg: float) -> F64:
    a = np.deg2rad(deg)
    return np.array([[1.0, 0.0, 0.0], [0.0, np.cos(a), -np.sin(a)], [0.0, np.sin(a), np.cos(a)]])


def _index_box(mask: npt.NDArray[Any], pad: int) -> Box | None:
    """Index box of the non-zero voxels of a 3-D array, grown by `pad` (None when empty)."""
    nz = mask.shape[0]
    zs = np.flatnonzero(np.any(np.reshape(mask, (nz, -1)), axis=1))
    if zs.size == 0:
        return None
    plane = np.any(mask[zs[0] : zs[-1] + 1], axis=0)
    ys = np.flatnonzero(np.any(plane, axis=1))
    xs = np.flatnonzero(np.any(plane, axis=0))
    spans = [
        slice(max(int(i[0]) - pad, 0), min(int(i[-1]) + pad + 1, n))
        for i, n in zip((zs, ys, xs), mask.shape, strict=True)
    ]
    return spans[0], spans[1], spans[2]


def _box_size(box: Box) -> int:
    return int(np.prod([sl.stop - sl.start for sl in box]))


def _sub_geometry(g: Geometry, box: Box) -> Geometry:
    """The grid of the `box` crop of `g` (same spacing, direction and frame)."""
    return Geometry(
        shape=(box[0].stop - box[0].start, box[1].stop - box[1].start, box[2].stop - box[2].start),
        origin=g.index_to_physical([box[2].start, box[1].start, box[0].start]),
        spacing=g.spacing,
        direction=g.direction,
        frame_of_reference_uid=g.frame_of_reference_uid,
    )


def _lps_bounds(g: Geometry, box: Box | None = None) -> tuple[F64, F64]:
    """LPS axis-aligned bounds of the voxel centres of (a box of) a grid."""
    corners = (g if box is None else _sub_geometry(g, box)).corners()
    return corners.min(axis=0), corners.max(axis=0)


def _index_box_of_lps(lo: F64, hi: F64, g: Geometry) -> Box | None:
    """Index box of grid `g` covering the LPS box [lo, hi] (None when they do not overlap)."""
    corners = np.array(
        [[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
    )
    ijk = g.physical_to_index(corners)
    first = np.floor(ijk.min(axis=0)).astype(int)
    last = np.ceil(ijk.max(axis=0)).astype(int)
    size = np.asarray(g.size_xyz)
    if np.any(last < 0) or np.any(first > size - 1):
        return None
    first = np.clip(first, 0, size - 1)
    last = np.clip(last, 0, size - 1)
    return (
        slice(int(first[2]), int(last[2]) + 1),
        slice(int(first[1]), int(last[1]) + 1),
        slice(int(first[0]), int(last[0]) + 1),
    )


def _intersect(a: Box, b: Box | None) -> Box | None:
    if b is None:
        return None
    out = [slice(max(x.start, y.start), min(x.stop, y.stop)) for x, y in zip(a, b, strict=True)]
    if any(sl.stop <= sl.start for sl in out):
        return None
    return out[0], out[1], out[2]


def _lattice_grid(
    lo: F64, hi: F64, anchor: F64, step: float
) -> tuple[npt.NDArray[np.int64], Geometry]:
    """The LPS-aligned grid of the lattice ``anchor + step * n`` covering [lo, hi].

    Returns:
        (lattice index (x, y, z) of the grid's first node, the grid).
    """
    first = np.floor((lo - anchor) / step).astype(np.int64)
    last = np.ceil((hi - anchor) / step).astype(np.int64)
    n = last - first + 1
    grid = Geometry(
        (int(n[2]), int(n[1]), int(n[0])), origin=anchor + step * first, spacing=np.full(3, step)
    )
    return first, grid


def _centroid(weights: F32, grid: Geometry) -> F64:
    """Weighted centroid (LPS mm) of a (z, y, x) weight map on an LPS-aligned grid."""
    total = float(weights.sum())
    idx = [
        float((weights.sum(axis=tuple(b for b in range(3) if b != a)) * np.arange(n)).sum()) / total
        for a, n in enumerate(weights.shape)
    ]
    return np.asarray(grid.index_to_physical([idx[2], idx[1], idx[0]]), float)


def _affine(rot: F64, centre: F64, t: F64) -> sitk.AffineTransform:
    """``x -> centre + rot (x - centre) + t`` as a SimpleITK transform."""
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(tuple(float(v) for v in rot.reshape(-1)))
    tx.SetCenter(tuple(float(v) for v in centre))
    tx.SetTranslation(tuple(float(v) for v in t))
    return tx


def _shrunk(arr: npt.NDArray[Any], g: Geometry, box: Box, step: float) -> sitk.Image:
    """The `box` crop of a 0/1 array as float32, block-averaged to about `step` mm."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr[box], dtype=np.float32))
    _sub_geometry(g, box).apply_to_sitk(img)
    factors = [
        int(min(max(1, round(step / s)), n)) for s, n in zip(g.spacing, img.GetSize(), strict=True)
    ]
    return sitk.BinShrink(img, factors) if max(factors) > 1 else img


def _components_above(mask: Mask, voxel_mm3: float, min_mm3: float) -> Mask:
    """The connected parts (26-neighbourhood) of `mask` of at least `min_mm3`."""
    lab, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return mask
    sizes = np.bincount(lab.reshape(-1)) * voxel_mm3
    keep = sizes >= min_mm3
    keep[0] = False
    return np.asarray(keep[lab], bool)


# ------------------------------------------------------------------------------ setup centre
def _organ_centre(lab: npt.NDArray[Any], g: Geometry) -> tuple[F64, str]:
    """Centroid (LPS) of the prostate, else of the seminal vesicles / all organs / the grid."""
    for name, mask in (
        ("prostate", lab == PROSTATE),
        ("seminal_vesicles", lab == SEMINAL_VESICLES),
        ("organs", lab > 0),
    ):
        if np.any(mask):
            k, j, i = (float(np.mean(a)) for a in np.nonzero(mask))
            return np.asarray(g.index_to_physical([i, j, k]), float), name
    return np.asarray(g.index_to_physical((np.asarray(g.size_xyz) - 1) / 2.0), float), "grid"


def _bony_centre(ct: Volume, lab: npt.NDArray[Any], z_ref: float) -> F64 | None:
    """Centroid (LPS) of the bony pelvis: bone inside the body within `BONY_Z_MM` of `z_ref`.

    Bone is HU > `BONE_HU` outside the organs, block-averaged to about 3 mm, in parts of at least
    `MIN_BONE_MM3` of the body's largest connected component (the couch is left out).
    """
    g = ct.geometry
    nx, ny, nz = g.size_xyz
    slices = np.arange(nz, dtype=float)
    centres = g.index_to_physical(
        np.stack([np.full(nz, (nx - 1) / 2.0), np.full(nz, (ny - 1) / 2.0), slices], axis=1)
    )
    ks = np.flatnonzero(np.abs(centres[:, 2] - z_ref) <= BONY_Z_MM)
    if ks.size == 0:
        return None
    box: Box = (slice(int(ks[0]), int(ks[-1]) + 1), slice(0, ny), slice(0, nx))
    hu = ct.array[box]
    bone_img = _shrunk((hu > BONE_HU) & (lab[box] == 0), _sub_geometry(g, box), _full(hu), 3.0)
    body_img = _shrunk(hu > -400.0, _sub_geometry(g, box), _full(hu), 3.0)
    bone = sitk.GetArrayFromImage(bone_img) >= 0.5
    body = sitk.GetArrayFromImage(body_img) >= 0.5
    comp, n = ndimage.label(body)
    if n == 0:
        return None
    body = comp == int(np.argmax(np.bincount(comp.reshape(-1))[1:])) + 1
    small = Geometry.from_sitk(bone_img)
    bone = _components_above(bone & body, float(np.prod(small.spacing)), MIN_BONE_MM3)
    if not bone.any():
        return None
    k, j, i = (float(np.mean(a)) for a in np.nonzero(bone))
    return np.asarray(small.index_to_physical([i, j, k]), float)


def _full(arr: npt.NDArray[Any]) -> Box:
    return slice(0, arr.shape[0]), slice(0, arr.shape[1]), slice(0, arr.shape[2])


# ------------------------------------------------------------------------------ anatomy in I
@dataclass(eq=False)
class _Anatomy:
    """The planning anatomy in the intermediate frame, on the box grid (coarse lattice)."""

    grid: Geometry
    pts: F32  # (bz, by, bx, 3) LPS node positions
    frac: dict[int, F32]  # label id -> fraction map
    bone: Mask


def _carry(
    mask: npt.NDArray[Any], g: Geometry, grid: Geometry, setup: sitk.Transform, pad: int = 2
) -> F32:
    """Fraction of a planning mask at each node ``q`` of `grid`: the block-averaged mask at S(q)."""
    box = _index_box(mask, pad)
    if box is None:
        return np.zeros(grid.shape, np.float32)
    img = _shrunk(mask, g, box, grid.spacing[0])
    out = sitk.Resample(img, grid.reference_image(), setup, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return np.asarray(sitk.GetArrayFromImage(out), np.float32)


def _anatomy(
    ct: Volume, lab: npt.NDArray[Any], grid: Geometry, setup: sitk.AffineTransform
) -> _Anatomy:
    g = ct.geometry
    counts = np.bincount(lab.reshape(-1), minlength=256)
    frac = {
        int(k): _carry(lab == k, g, grid, setup)
        for k in (BLADDER, RECTUM, SEMINAL_VESICLES, PROSTATE)
        if counts[k] > 0
    }
    # bone candidates on the planning region the box grid maps to
    corners = np.array([setup.TransformPoint(tuple(float(v) for v in c)) for c in grid.corners()])
    region = _index_box_of_lps(corners.min(axis=0) - 6.0, corners.max(axis=0) + 6.0, g)
    bone = np.zeros(grid.shape, bool)
    if region is not None:
        cand = (ct.array[region] > BONE_HU) & (lab[region] == 0)
        if cand.any():
            img = _shrunk(cand, _sub_geometry(g, region), _full(cand), grid.spacing[0])
            out = sitk.Resample(
                img, grid.reference_image(), setup, sitk.sitkLinear, 0.0, sitk.sitkFloat32
            )
            organs = np.zeros(grid.shape, np.float32)
            for f in frac.values():
                organs += f
            bone = (sitk.GetArrayFromImage(out) >= 0.3) & (organs < 0.5)
            bone = _components_above(bone, float(np.prod(grid.spacing)), MIN_BONE_MM3)
    pts = grid.voxel_centres().astype(np.float32)
    return _Anatomy(grid=grid, pts=pts, frac=frac, bone=bone)


def _organ_mask(frac: F32 | None) -> Mask | None:
    """Nodes at least half inside an organ (its most covered nodes for a tiny organ)."""
    if frac is None or float(frac.max()) <= 0.05:
        return None
    mask = frac >= 0.5
    return mask if mask.any() else np.asarray(frac >= 0.5 * float(frac.max()), bool)


# ------------------------------------------------------------------------------ pieces
@dataclass(eq=False)
class _Pieces:
    """The push field's pieces on the box grid (frame I), before amplitudes."""

    bladder: F32 | None  # (bz, by, bx, 3) unit bladder field A (s = 1)
    bladder_frac: F32 | None
    bladder_box: Box | None
    base_point: F64 | None
    dome_direction: F64 | None
    rectum: F32 | None  # (bz, by, bx, 3) rectal push for a = 1 mm
    rectum_centre: F64 | None
    rectum_core_mm: float
    zone: F32 | None  # P: 1 on the glands dilated by 3 mm, 0 beyond 9 mm
    zone_weight: F32 | None  # W_p
    gland_centre: F64 | None
    weight: F32  # W: bone weight of the non-rigid pieces


def _bladder_field(an: _Anatomy, fb: F32) -> tuple[F32, F64, F64, Mask] | None:
    """The unit dome field A, base point b0, dome direction and the bladder node mask."""
    inside = _organ_mask(fb)
    if inside is None:
        return None
    step = float(an.grid.spacing[0])
    pts = an.pts
    cand = pts[inside].astype(float)
    prostate = _organ_mask(an.frac.get(PROSTATE))
    if prostate is not None:
        dist = ndimage.distance_transform_edt(~prostate, sampling=step)[inside]
        centre = _centroid(an.frac[PROSTATE], an.grid)
        key = dist + 1e-3 * np.linalg.norm(cand - centre, axis=1)
        b0 = cand[int(np.argmin(key))]
    else:  # most inferior-posterior bladder node: largest y - z
        b0 = cand[int(np.argmax(cand[:, 1] - cand[:, 2]))]
    direction = _centroid(fb * inside, an.grid) - b0
    norm = float(np.linalg.norm(direction))
    direction = direction / norm if norm > 1e-6 else np.array([0.0, 0.0, 1.0])
    rel = pts - b0.astype(np.float32)
    length = np.sqrt((rel**2).sum(axis=-1))
    cos = (rel @ direction.astype(np.float32)) / np.maximum(length, 1e-6)
    g = 0.35 + 0.65 * np.maximum(cos, 0.0) ** 1.5
    wall = rel * g[..., None]  # (q - b0) g(q), valid inside and on the bladder
    dist, idx = ndimage.distance_transform_edt(~inside, sampling=step, return_indices=True)
    field = wall[idx[0], idx[1], idx[2]] * np.exp(-dist / BLADDER_DECAY_MM)[..., None]
    del wall, idx
    for c in range(3):
        field[..., c] = ndimage.gaussian_filter(field[..., c], 1.0, mode="nearest")
    t0, t1 = BLADDER_TAPER_MM
    field *= (1.0 - _smoothstep((dist - t0) / (t1 - t0)))[..., None]
    return np.asarray(field, np.float32), np.asarray(b0, float), direction, inside


def _rectum_field(an: _Anatomy, dr: _Draws, amplitude: float) -> tuple[F32, F64, float] | None:
    """The unit rectal push Q (for a = 1 mm), its centre and core radius."""
    fr = an.frac.get(RECTUM)
    if fr is None or float(fr.sum()) < 1.0:
        return None
    per = fr.sum(axis=(1, 2))
    ks = np.flatnonzero(per > 0.05 * per.max())
    z = an.pts[:, 0, 0, 2].astype(float)
    cx = (fr * an.pts[..., 0]).sum(axis=(1, 2)) / np.maximum(per, 1e-9)
    cy = (fr * an.pts[..., 1]).sum(axis=(1, 2)) / np.maximum(per, 1e-9)
    z0, z1 = z[ks[0]], z[ks[-1]]
    zc = z0 + (0.2 + 0.6 * dr.rectum_position) * (z1 - z0)
    centre = np.array([np.interp(zc, z[ks], cx[ks]), np.interp(zc, z[ks], cy[ks]), zc])
    core = max(6.0, 1.5 * amplitude) if amplitude >= 0 else max(6.0, 3.0 * abs(amplitude))
    sigma = dr.rectum_sigma_mm
    rel = an.pts - centre.astype(np.float32)
    r2 = (rel**2).sum(axis=-1)
    r = np.sqrt(r2)
    profile = np.exp(-r2 / (2.0 * sigma**2)) / np.sqrt(r2 + core**2)
    profile *= 1.0 - _smoothstep((r - 3.0 * sigma) / sigma)
    return np.asarray(rel * profile[..., None], np.float32), centre, core


def _pieces(an: _Anatomy, dr: _Draws, strength: float) -> _Pieces:
    step = float(an.grid.spacing[0])
    if an.bone.any():
        dist = ndimage.distance_transform_edt(~an.bone, sampling=step)
        weight = _smoothstep(dist / BONE_BLEND_MM)
    else:
        weight = np.ones(an.grid.shape, np.float32)
    bladder = base = direction = fb = bbox = None
    if BLADDER in an.frac:
        made = _bladder_field(an, an.frac[BLADDER])
        if made is not None:
            bladder, base, direction, inside = made
            fb = an.frac[BLADDER]
            bbox = _index_box(inside | (fb > 0.0), 2)
    rectum = rcentre = None
    core = 0.0
    rmade = _rectum_field(an, dr, dr.rectum_amplitude_mm * strength)
    if rmade is not None:
        rectum, rcentre, core = rmade
    zone = zweight = gcentre = None
    gland_frac = [an.frac[k] for k in (PROSTATE, SEMINAL_VESICLES) if k in an.frac]
    glands = _organ_mask(np.clip(sum(gland_frac), 0.0, 1.0)) if gland_frac else None
    if glands is not None:
        dist = ndimage.distance_transform_edt(~glands, sampling=step)
        zone = 1.0 - _smoothstep((dist - PROSTATE_MARGIN_MM) / PROSTATE_BLEND_MM)
        zweight = np.maximum(weight, 1.0 - _smoothstep(dist / PROSTATE_MARGIN_MM))
        source = an.frac[PROSTATE] if PROSTATE in an.frac else an.frac[SEMINAL_VESICLES]
        gcentre = _centroid(source, an.grid)
    return _Pieces(
        bladder=bladder,
        bladder_frac=fb,
        bladder_box=bbox,
        base_point=base,
        dome_direction=direction,
        rectum=rectum,
        rectum_centre=rcentre,
        rectum_core_mm=core,
        zone=zone,
        zone_weight=zweight,
        gland_centre=gcentre,
        weight=weight,
    )


def _gland_push(pc: _Pieces, pts: F32, pitch_deg: float, t: F64) -> F32:
    """The rigid push ``(Rx(pitch) - I)(q - c_p) + t`` of the glands (zeros without glands)."""
    if pc.gland_centre is None:
        return np.zeros(pts.shape, np.float32)
    m = (_rot_x(pitch_deg) - np.eye(3)).astype(np.float32)
    return np.asarray((pts - pc.gland_centre.astype(np.float32)) @ m.T + t.astype(np.float32))


@dataclass(eq=False)
class _Push:
    """The push field as ``s A' + B'`` (A' the weighted bladder field, B' the rest)."""

    a: F32 | None
    b: F32

    def at(self, s: float) -> F32:
        return self.b if self.a is None else self.b + np.float32(s) * self.a


def _assemble(pc: _Pieces, an: _Anatomy, dr: _Draws, strength: float, k: float) -> _Push:
    """Weighted pieces for non-rigid scale `k` (the bladder amplitude ``s`` left free)."""
    amp = strength * k
    free = pc.weight if pc.zone is None else pc.weight * (1.0 - pc.zone)
    rest = np.zeros((*an.grid.shape, 3), np.float32)
    if pc.rectum is not None:
        rest += np.float32(dr.rectum_amplitude_mm * amp) * pc.rectum
    rest *= free[..., None]
    if pc.zone is not None and pc.zone_weight is not None:
        rigid = _gland_push(
            pc, an.pts, dr.prostate_pitch_deg * amp, dr.prostate_translation_mm * amp
        )
        rest += (pc.zone * pc.zone_weight)[..., None] * rigid
    a = None if pc.bladder is None else pc.bladder * free[..., None]
    return _Push(a=a, b=rest)


def _grad(field: F32, step: float) -> F32:
    """Central-difference Jacobian ``d field_c / d x_a`` (..., 3, 3) of a field on an LPS grid."""
    out = np.empty((*field.shape[:3], 3, 3), np.float32)
    for c in range(3):
        gz, gy, gx = np.gradient(field[..., c], step)
        out[..., c, 0], out[..., c, 1], out[..., c, 2] = gx, gy, gz
    return out


def _det3(m: npt.NDArray[Any]) -> npt.NDArray[Any]:
    return (
        m[..., 0, 0] * (m[..., 1, 1] * m[..., 2, 2] - m[..., 1, 2] * m[..., 2, 1])
        - m[..., 0, 1] * (m[..., 1, 0] * m[..., 2, 2] - m[..., 1, 2] * m[..., 2, 0])
        + m[..., 0, 2] * (m[..., 1, 0] * m[..., 2, 1] - m[..., 1, 1] * m[..., 2, 0])
    )


def _solve_bladder(push: _Push, pc: _Pieces, step: float, target: float) -> tuple[float, float]:
    """Bisection for the bladder amplitude ``s`` whose push meets the volume ratio `target`.

    The ratio of the push is ``sum f_B det(I + grad d) / sum f_B`` over the bladder's box.

    Returns:
        (s, estimated ratio).
    """
    if push.a is None or pc.bladder_box is None or pc.bladder_frac is None:
        return 0.0, 1.0
    box = pc.bladder_box
    # gradients on the box grown by one node, so central differences match the full field's
    grown = tuple(
        slice(max(sl.start - 1, 0), min(sl.stop + 1, n))
        for sl, n in zip(box, push.b.shape[:3], strict=True)
    )
    inner = tuple(
        slice(sl.start - g.start, sl.start - g.start + (sl.stop - sl.start))
        for sl, g in zip(box, grown, strict=True)
    )
    ga = _grad(np.ascontiguousarray(push.a[grown]), step)[inner]
    gb = _grad(np.ascontiguousarray(push.b[grown]), step)[inner]
    gb += np.eye(3, dtype=np.float32)
    f = pc.bladder_frac[box]
    sel = f > 0
    ga, gb, w = ga[sel].astype(np.float64), gb[sel].astype(np.float64), f[sel].astype(np.float64)
    total = float(w.sum())

    def ratio(s: float) -> float:
        return float((w * _det3(gb + s * ga)).sum()) / total

    lo, hi = -0.9, 1.5
    r_lo, r_hi = ratio(lo), ratio(hi)
    if target <= r_lo:
        return lo, r_lo
    if target >= r_hi:
        return hi, r_hi
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        r_mid = ratio(mid)
        if r_mid < target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-6:
            break
    s = 0.5 * (lo + hi)
    return s, ratio(s)


def _min_det(field: F32, grid: Geometry) -> float:
    return float(jacobian_determinant(Volume(field, grid.with_frame(None))).min())


def _invert(d: F32, step: float) -> tuple[F32, float, int]:
    """Pull inverse of a push: ``v(p) = -d(p + v(p))`` by fixed-point iteration, node by node.

    Trilinear sampling (``map_coordinates``, order 1, zero outside the grid). Each node is
    iterated on its own (its fixed point depends on `d` alone) until its residual is below
    `INVERSION_TOL_MM`; a node whose steps flip direction without shrinking by half (a local
    stretch of the push above 2) is damped, ``v += w (-d(p + v) - v)`` with ``w`` halved down
    to 1/8.

    Args:
        d: (bz, by, bx, 3) push displacement, mm (LPS components), LPS-aligned grid.
        step: grid spacing, mm.

    Returns:
        (v (bz, by, bx, 3) mm, max residual ``|v + d(p + v)|`` of the returned v in mm,
        iterations of the slowest node).
    """
    v = np.zeros_like(d)
    box = _index_box(np.any(d != 0, axis=-1), 0)
    if box is None:
        return v, 0.0, 0
    reach = int(np.ceil(float(np.sqrt((d**2).sum(axis=-1)).max()) / step)) + 2
    sub_box = tuple(
        slice(max(sl.start - reach, 0), min(sl.stop + reach, n))
        for sl, n in zip(box, d.shape[:3], strict=True)
    )
    comps = [np.ascontiguousarray(d[..., c]) for c in range(3)]
    origin = np.array([sl.start for sl in sub_box], np.float32)  # (z, y, x)
    shape = tuple(sl.stop - sl.start for sl in sub_box)
    nodes = np.indices(shape, dtype=np.float32).reshape(3, -1) + origin[:, None]
    cur = -np.stack([c[sub_box].reshape(-1) for c in comps])  # (3 xyz, N): v of each node
    n = cur.shape[1]
    damp = np.ones(n, np.float32)
    last = np.full(n, np.inf, np.float32)
    prev = np.zeros_like(cur)
    final = np.zeros(n, np.float32)
    active = np.arange(n)
    inv = np.float32(1.0 / step)
    n_iter = 0
    while active.size:
        now = cur[:, active]
        coords = nodes[:, active] + now[::-1] * inv  # (z, y, x) voxel coordinates of p + v
        cand = -np.stack(
            [ndimage.map_coordinates(c, coords, order=1, mode="constant", cval=0.0) for c in comps]
        )
        move = cand - now
        res = np.sqrt((move**2).sum(axis=0))
        final[active] = res  # the residual of the current v
        if n_iter >= INVERSION_MAX_ITER:
            break
        going = res >= INVERSION_TOL_MM
        active, move, res = active[going], move[:, going], res[going]
        flip = ((move * prev[:, active]).sum(axis=0) < 0) & (res > 0.5 * last[active])
        damp[active[flip]] = np.maximum(damp[active[flip]] * 0.5, 0.125)
        cur[:, active] += damp[active] * move
        prev[:, active] = move
        last[active] = res
        n_iter += 1
    v[sub_box] = cur.T.reshape((*shape, 3))
    return v, float(final.max()), n_iter


# ------------------------------------------------------------------------------ the field
@dataclass(eq=False)
class _Field:
    """The fraction's pull field and the transforms that apply it."""

    coarse: Geometry  # cover grid (frame D)
    u: F32  # (cz, cy, cx, 3) pull displacement on `coarse`
    tx: sitk.Transform  # displacement transform of `u` (linear interpolation)
    rot: F64
    centre: F64
    t: F64
    reach: float  # largest |v|, mm
    nonrigid: Box | None  # daily index box outside which u is the setup alone
    nonrigid_mm: tuple[F64, F64] | None
    moving_part: Volume | None  # R v on the coarse sub-grid where it is non-zero (+1 node)

    @property
    def setup(self) -> sitk.AffineTransform:
        """The rigid setup S (daily -> planning points where v = 0)."""
        return _affine(self.rot, self.centre, self.t)

    def daily_box(self, daily: Geometry, lo: F64, hi: F64, margin: float) -> Box | None:
        """Daily index box of the points whose planning point can fall in the LPS box [lo, hi].

        Only nodes within `reach` of ``S^-1`` of the box can map into it (``phi = S o N`` with
        ``|N(p) - p| <= reach``); their planning points ``p + u(p)`` are tested.
        """
        a, b = lo - margin, hi + margin
        corners = np.array(
            [[x, y, z] for x in (a[0], b[0]) for y in (a[1], b[1]) for z in (a[2], b[2])]
        )
        back = (corners - self.centre - self.t) @ self.rot + self.centre
        step = float(self.coarse.spacing[0])
        grow = self.reach + step
        cand = _index_box_of_lps(back.min(axis=0) - grow, back.max(axis=0) + grow, self.coarse)
        if cand is None:
            return None
        sub = _sub_geometry(self.coarse, cand)
        nz, ny, nx = sub.shape
        phi = np.array(self.u[cand], dtype=np.float32)
        phi[..., 0] += (sub.origin[0] + step * np.arange(nx, dtype=np.float32))[None, None, :]
        phi[..., 1] += (sub.origin[1] + step * np.arange(ny, dtype=np.float32))[None, :, None]
        phi[..., 2] += (sub.origin[2] + step * np.arange(nz, dtype=np.float32))[:, None, None]
        inside = np.all((phi >= a) & (phi <= b), axis=-1)
        nodes = _index_box(inside, 1)
        if nodes is None:
            return None
        return _index_box_of_lps(*_lps_bounds(sub, nodes), daily)


def _compose(
    v_box: F32,
    box_first: npt.NDArray[np.int64],
    coarse: Geometry,
    coarse_first: npt.NDArray[np.int64],
    rot: F64,
    centre: F64,
    t: F64,
    daily: Geometry,
) -> _Field:
    """``u(p) = (R - I)(p - c) + t + R v(p)`` on the cover grid (v given on the box grid)."""
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
        moving = _index_box(np.any(part != 0, axis=-1), 1)
        if moving is not None:
            reach = float(np.sqrt((part[moving] ** 2).sum(axis=-1)).max())
            cover = (
                slice(dst[0].start + moving[0].start, dst[0].start + moving[0].stop),
                slice(dst[1].start + moving[1].start, dst[1].start + moving[1].stop),
                slice(dst[2].start + moving[2].start, dst[2].start + moving[2].stop),
            )
            moving_part = Volume(np.ascontiguousarray(part[moving]), _sub_geometry(coarse, cover))
            nonrigid_mm = _lps_bounds(coarse, cover)
            nonrigid = _index_box_of_lps(*nonrigid_mm, daily)
    return _Field(
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


def _resample_split(
    fld: _Field, moving: sitk.Image, daily: Geometry, dbox: Box, default: float
) -> F32:
    """Linear resampling of `moving` on the daily `dbox` by the pull field, float32.

    The rigid setup is used outside the non-rigid box and the coarse displacement transform
    inside it: the values of warping with the dense field, without a full-size float64 field.
    """
    geom = _sub_geometry(daily, dbox)
    out = sitk.GetArrayFromImage(
        sitk.Resample(
            moving, geom.reference_image(), fld.setup, sitk.sitkLinear, default, sitk.sitkFloat32
        )
    )
    inner = _intersect(dbox, fld.nonrigid)
    if inner is not None:
        rel = tuple(
            slice(a.start - b.start, a.stop - b.start) for a, b in zip(inner, dbox, strict=True)
        )
        sub = _sub_geometry(daily, inner)
        out[rel] = sitk.GetArrayFromImage(
            sitk.Resample(
                moving, sub.reference_image(), fld.tx, sitk.sitkLinear, default, sitk.sitkFloat32
            )
        )
    return np.asarray(out, np.float32)


def _dense(fld: _Field, daily: Geometry) -> Volume:
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
        ref = _sub_geometry(daily, fld.nonrigid).reference_image()
        for c in range(3):
            comp = sitk.GetImageFromArray(np.ascontiguousarray(fld.moving_part.array[..., c]))
            fld.moving_part.geometry.apply_to_sitk(comp)
            res = sitk.Resample(comp, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
            out[(*fld.nonrigid, c)] += sitk.GetArrayViewFromImage(res)
    return Volume(out, daily)


def _warp_labels(
    lab: npt.NDArray[Any], g: Geometry, fld: _Field, daily: Geometry, pbox: Box, dvf: Volume | None
) -> tuple[npt.NDArray[np.uint8], Box] | None:
    """Planning labels of the `pbox` crop warped onto their daily box (``"label"`` mode)."""
    lo, hi = _lps_bounds(g, pbox)
    pad = float(np.max(g.spacing))
    dbox = fld.daily_box(daily, lo - pad, hi + pad, 4.0 * float(fld.coarse.spacing[0]))
    if dbox is None:
        return None
    moving = Volume(np.ascontiguousarray(lab[pbox]), _sub_geometry(g, pbox))
    if dvf is not None:
        target = Volume(dvf.array[dbox], _sub_geometry(daily, dbox))
        out = warp(moving, target, "label", 0, transform=fld.tx).array
    else:
        out = moving.resample(_sub_geometry(daily, dbox), "label", 0, transform=fld.tx).array
    return np.asarray(out, np.uint8), dbox


def _bladder_count(lab: npt.NDArray[Any], g: Geometry, fld: _Field, daily: Geometry) -> int:
    pbox = _index_box(lab == BLADDER, 2)
    if pbox is None:
        return 0
    made = _warp_labels(lab, g, fld, daily, pbox, None)
    return 0 if made is None else int(np.count_nonzero(made[0] == BLADDER))


# ------------------------------------------------------------------------------ image parts
def _noise(shape: tuple[int, int, int], std: float, rng: np.random.Generator) -> F32:
    """White Gaussian noise blurred in-plane by a 0.6-voxel Gaussian, std `std` HU."""
    white = rng.standard_normal(shape, dtype=np.float32)
    blurred = ndimage.gaussian_filter(white, sigma=(0.0, 0.6, 0.6), mode="reflect")
    del white
    delta = np.zeros(15, np.float64)
    delta[7] = 1.0
    kernel = ndimage.gaussian_filter1d(delta, 0.6, mode="constant")
    gain = float((kernel**2).sum())  # std of the 2-D blurred unit noise = sum of k^2
    blurred *= np.float32(std / gain)
    return np.asarray(blurred, np.float32)


def _paint_gas(
    img: F32, daily_lab: npt.NDArray[Any], daily: Geometry, dr: _Draws, rng: np.random.Generator
) -> dict[str, Any]:
    """Paint one gas pocket in the daily rectal lumen (the rectum eroded by 2 mm), in place."""
    box = _index_box(daily_lab == RECTUM, 4)
    if box is None:
        return {"painted": False}
    rect = daily_lab[box] == RECTUM
    sp = daily.spacing[::-1]  # (z, y, x) mm
    lumen = ndimage.distance_transform_edt(rect, sampling=sp) > 2.0
    idx = np.argwhere(lumen)
    if len(idx) == 0:
        return {"painted": False}
    centre = idx[int(rng.integers(len(idx)))]
    grids = np.indices(rect.shape, dtype=np.float32)
    rho = sum(((grids[a] - centre[a]) * sp[a] / dr.gas_radii_mm[a]) ** 2 for a in range(3))
    pocket = (rho <= 1.0) & lumen
    alpha = ndimage.gaussian_filter(pocket.astype(np.float32), 0.5) * rect
    alpha = np.maximum(alpha, pocket.astype(np.float32))
    region = img[box]
    region += alpha * (np.float32(dr.gas_hu) - region)
    k, j, i = (int(box[a].start + centre[a]) for a in range(3))
    return {
        "painted": True,
        "centre_mm": daily.index_to_physical([i, j, k]).tolist(),
        "voxels": int(pocket.sum()),
    }


def _derived_frame(ct: Volume, dr: _Draws, strength: float, ratio: float) -> str:
    key = hashlib.sha1(
        repr(
            (
                ct.geometry.frame_of_reference_uid,
                dr.setup_translation_mm.tolist(),
                dr.setup_rotation_deg.tolist(),
                ratio,
                dr.rectum_amplitude_mm,
                strength,
            )
        ).encode()
    ).hexdigest()
    return str(generate_uid(entropy_srcs=["jrs-dome-engine", key]))


def _check_inputs(
    ct: Volume,
    labels: Volume,
    structures: Mapping[str, np.ndarray],
    strength: float,
    bladder_ratio: float | None,
    noise_hu: float | None,
) -> npt.NDArray[np.uint8]:
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
    if bladder_ratio is not None and (not np.isfinite(bladder_ratio) or bladder_ratio <= 0):
        raise InvalidInput(
            f"bladder_ratio must be a finite number > 0 (daily / planning volume), got "
            f"{bladder_ratio}"
        )
    if noise_hu is not None and (not np.isfinite(noise_hu) or noise_hu < 0):
        raise InvalidInput(f"noise_hu must be a finite number >= 0 (HU), got {noise_hu}")
    lab = np.asarray(labels.array)
    if not np.issubdtype(lab.dtype, np.integer):
        raise InvalidInput(f"labels must be an integer label map, got dtype {lab.dtype}")
    return lab.astype(np.uint8, copy=False)


# ------------------------------------------------------------------------------ public API
def synthesize_dome_fraction(
    ct: Volume,
    labels: Volume,
    structures: Mapping[str, np.ndarray],
    rng: np.random.Generator,
    *,
    frame_of_reference_uid: str | None = None,
    strength: float = 1.0,
    bladder_ratio: float | None = None,
    noise_hu: float | None = None,
) -> EngineFraction:
    """Make a daily fraction of a planning scan by the held-out "dome" mechanism.

    See the module docstring for the mechanism and how it differs from the organ family. The
    pull DVF is ``u(p) = S(p + v(p)) - p``: ``v`` inverts the non-rigid push, ``S`` is the rigid
    setup error about the bony pelvis centre (daily -> planning).

    Args:
        ct: planning CT, HU (nz, ny, nx), any LPS geometry (HFS, FFS, ... storage).
        labels: planning label map (nz, ny, nx) on the CT grid, ids of `jrs.labels` (1 bladder,
            2 rectum, 3 seminal vesicles, 4 prostate); any may be absent.
        structures: ROI name -> (nz, ny, nx) mask on the CT grid (non-zero inside); every one is
            warped.
        rng: source of every random draw (same state -> identical arrays).
        frame_of_reference_uid: FrameOfReferenceUID of the daily scan; derived deterministically
            from the planning frame and the draws when None.
        strength: factor on every amplitude (log bladder ratio, rectal push, prostate motion,
            setup); 0 gives the identity field exactly (the daily CT is the planning CT plus
            noise, labels and structures are the planning ones).
        bladder_ratio: daily / planning bladder volume to realise (at ``strength=1``); drawn
            log-uniformly in [0.5, 1.8] with a change of at least 30 % when None.
        noise_hu: std of the daily CT noise, HU; drawn in [8, 20] when None.

    Returns:
        The fraction (same type as the organ engine's): daily CT, labels, structures, true DVF
        (nz, ny, nx, 3) float32 mm on the daily grid, JSON-friendly params (``"engine": "dome"``)
        and the daily rectal gas mask.

    Raises:
        InvalidInput: labels or structures not on the CT grid, a negative strength, a bladder
            ratio that is not > 0, a negative noise level.
    """
    lab = _check_inputs(ct, labels, structures, strength, bladder_ratio, noise_hu)
    g = ct.geometry
    dr = _draw(rng, noise_hu)
    ratio = float(bladder_ratio) if bladder_ratio is not None else dr.bladder_ratio
    frame = frame_of_reference_uid or _derived_frame(ct, dr, strength, ratio)
    daily = g.with_frame(frame)
    step = COARSE_MM

    # the setup S(q) = c + R (q - c) + t about the bony pelvis centre
    organ_centre, organ_source = _organ_centre(lab, g)
    centre = None
    if strength > 0 and organ_source != "grid":
        centre = _bony_centre(ct, lab, float(organ_centre[2]))
    centre_source = "bone"
    if centre is None:
        centre, centre_source = organ_centre, organ_source
    rot_deg = dr.setup_rotation_deg * strength
    rot = rotation_matrix(rot_deg)
    t = dr.setup_translation_mm * strength
    setup = _affine(rot, centre, t)

    # the cover grid (frame D) on the coarse lattice
    corners = daily.corners()
    anchor = corners.min(axis=0) - 2 * step
    coarse_first, coarse = _lattice_grid(anchor, corners.max(axis=0) + 2 * step, anchor, step)

    info: dict[str, Any] = {
        "nonrigid_scale": 1.0,
        "min_det_jacobian_push": 1.0,
        "inversion_residual_mm": 0.0,
        "inversion_iterations": 0,
        "bladder_s": 0.0,
        "bladder_volume_ratio_estimate": None,
    }
    target = float(ratio**strength) if np.any(lab == BLADDER) else None
    pc: _Pieces | None = None
    v_box = np.zeros((1, 1, 1, 3), np.float32)
    box_first = coarse_first
    fld: _Field | None = None
    lbox = _index_box(lab > 0, 2)
    if strength > 0 and lbox is not None:
        # the non-rigid box (frame I): the organs' box carried by S^-1, grown by each reach
        lo, hi = _lps_bounds(g, lbox)
        back = (
            np.array(
                [[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
            )
            - centre
            - t
        ) @ rot + centre
        reach = max(BLADDER_TAPER_MM[1] + 4 * step, 4 * dr.rectum_sigma_mm + 4 * step, 30.0)
        box_first, grid = _lattice_grid(
            back.min(axis=0) - reach, back.max(axis=0) + reach, anchor, step
        )
        an = _anatomy(ct, lab, grid, setup)
        pc = _pieces(an, dr, strength)
        fld, v_box, info = _nonrigid(
            an,
            pc,
            dr,
            strength,
            target,
            lab,
            g,
            daily,
            coarse,
            coarse_first,
            box_first,
            rot,
            centre,
            t,
        )
    if fld is None:
        fld = _compose(v_box, box_first, coarse, coarse_first, rot, centre, t, daily)

    min_det = float(jacobian_determinant(Volume(fld.u, coarse)).min())
    dvf = _dense(fld, daily)
    if strength == 0:
        dvf.array[...] = 0.0

    # the daily CT
    if strength == 0:
        img = np.array(ct.array, dtype=np.float32)
    else:
        img = _resample_split(fld, ct.to_sitk(), daily, _full(ct.array), -1000.0)

    # labels and structures
    daily_lab = np.zeros(g.shape, np.uint8)
    if strength == 0 or lbox is None:
        daily_lab[...] = lab
    else:
        made = _warp_labels(lab, g, fld, daily, lbox, dvf)
        if made is not None:
            daily_lab[made[1]] = made[0]
    out_structures: dict[str, np.ndarray] = {}
    for name, m in structures.items():
        arr = np.asarray(m)
        arr = arr if arr.dtype == np.bool_ else arr != 0
        out_structures[name] = _warp_structure(arr, g, fld, daily, dvf, strength)

    # a new gas pocket, rectal gas, noise
    gas_info: dict[str, Any] = {"painted": False}
    if strength > 0 and dr.gas_pocket:
        gas_info = _paint_gas(img, daily_lab, daily, dr, rng)
    daily_gas = (daily_lab == RECTUM) & (img < GAS_HU)
    img += _noise(g.shape, dr.noise_hu, rng)
    np.clip(img, -1024.0, 3071.0, out=img)

    scale = float(info["nonrigid_scale"])
    goal = info.get("bladder_volume_ratio_target", target)
    params = _params(dr, strength, scale, ratio, bladder_ratio, goal, rot, centre, t, centre_source)
    params.update(
        {
            "frame_of_reference_uid": frame,
            "nonrigid_scale": scale,
            "bladder_scale": info.get("bladder_scale", 1.0),
            "min_det_jacobian_push": info["min_det_jacobian_push"],
            "min_det_jacobian": min_det,
            "inversion_residual_mm": info["inversion_residual_mm"],
            "inversion_iterations": info["inversion_iterations"],
            "nonrigid_box_mm": None
            if fld.nonrigid_mm is None
            else [fld.nonrigid_mm[0].tolist(), fld.nonrigid_mm[1].tolist()],
            "daily_gas_voxels": int(daily_gas.sum()),
        }
    )
    params["bladder"].update(
        {
            "s": info["bladder_s"],
            "volume_ratio_estimate": info["bladder_volume_ratio_estimate"],
            "base_point_mm": None
            if pc is None or pc.base_point is None
            else pc.base_point.tolist(),
            "dome_direction": None
            if pc is None or pc.dome_direction is None
            else pc.dome_direction.tolist(),
        }
    )
    params["rectum"].update(
        {
            "centre_mm": None
            if pc is None or pc.rectum_centre is None
            else pc.rectum_centre.tolist(),
            "core_mm": 0.0 if pc is None else pc.rectum_core_mm,
        }
    )
    params["prostate"]["centre_mm"] = (
        None if pc is None or pc.gland_centre is None else pc.gland_centre.tolist()
    )
    params["gas"].update(gas_info)
    for key, label_id in (("bladder", BLADDER), ("prostate", PROSTATE)):
        before = int(np.count_nonzero(lab == label_id))
        after = int(np.count_nonzero(daily_lab == label_id))
        value = after / before if before else None
        if key == "bladder":
            params["bladder_volume_ratio"] = value
        else:
            params["prostate_volume_change"] = None if value is None else value - 1.0
    return EngineFraction(
        ct=Volume(img, daily),
        labels=Volume(daily_lab, daily),
        structures=out_structures,
        true_dvf=dvf,
        params=params,
        gas=daily_gas,
    )


def _nonrigid(
    an: _Anatomy,
    pc: _Pieces,
    dr: _Draws,
    strength: float,
    target: float | None,
    lab: npt.NDArray[Any],
    g: Geometry,
    daily: Geometry,
    coarse: Geometry,
    coarse_first: npt.NDArray[np.int64],
    box_first: npt.NDArray[np.int64],
    rot: F64,
    centre: F64,
    t: F64,
) -> tuple[_Field, F32, dict[str, Any]]:
    """Solve the bladder amplitude, soften until det J > `MIN_DET_PUSH`, invert and compose.

    Softening multiplies amplitudes by `SOFTEN`: those of the rectum and prostate (``k``) when
    their push alone fails the det J check, else the bladder's (its target ratio ``r`` becomes
    ``r^kb``) and, when the two only fail together, both. So a requested bladder ratio is kept
    whenever the bladder's own motion is invertible. The bladder ratio is first met on the
    coarse push (det J over the bladder), then checked on the daily grid (count of warped
    bladder voxels); a miss by more than `BLADDER_TOLERANCE` corrects the coarse target (up to
    three times).
    """
    step = float(an.grid.spacing[0])
    k = 1.0
    kb = 1.0
    correction = 1.0
    checks = 0
    planning_bladder = int(np.count_nonzero(lab == BLADDER))
    best: tuple[_Field, F32, dict[str, Any]] | None = None
    for _attempt in range(80):  # at most ~58 softenings + 4 fine-grid checks
        push = _assemble(pc, an, dr, strength, k)
        goal = None if target is None else float(target**kb)
        s, estimate = (0.0, 1.0)
        if goal is not None and push.a is not None:
            s, estimate = _solve_bladder(push, pc, step, goal * correction)
        d = push.at(s)
        min_det = _min_det(d, an.grid)
        if min_det <= MIN_DET_PUSH and max(k, kb) > MIN_SCALE:
            log.debug("dome push det J %.3f (scales %.3f, %.3f): softening", min_det, k, kb)
            rest_fails = s == 0.0 or _min_det(push.b, an.grid) <= MIN_DET_PUSH
            if rest_fails:
                soften_rest, soften_bladder = k > MIN_SCALE, k <= MIN_SCALE
            else:
                alone = _min_det(np.ascontiguousarray(d - push.b), an.grid) <= MIN_DET_PUSH
                soften_bladder = kb > MIN_SCALE
                soften_rest = not alone or not soften_bladder
            k *= SOFTEN if soften_rest else 1.0
            kb *= SOFTEN if soften_bladder else 1.0
            correction = 1.0
            continue
        if min_det <= MIN_DET_PUSH:
            log.warning("dome push det J %.3f after softening to the floor: kept", min_det)
        v, residual, n_iter = _invert(d, step)
        del d
        fld = _compose(v, box_first, coarse, coarse_first, rot, centre, t, daily)
        info = {
            "nonrigid_scale": k,
            "bladder_scale": kb,
            "min_det_jacobian_push": min_det,
            "inversion_residual_mm": residual,
            "inversion_iterations": n_iter,
            "bladder_s": s,
            "bladder_volume_ratio_estimate": estimate if goal is not None else None,
            "bladder_volume_ratio_target": goal,
        }
        best = (fld, v, info)
        if goal is None or push.a is None or planning_bladder == 0:
            break
        realised = _bladder_count(lab, g, fld, daily) / planning_bladder
        log.debug("dome bladder: goal %.3f, coarse %.3f, fine %.3f", goal, estimate, realised)
        if abs(realised / goal - 1.0) <= BLADDER_TOLERANCE or checks >= 3:
            break
        correction *= goal / max(realised, 1e-3)
        checks += 1
    if best is None:  # pragma: no cover - both scales reach MIN_SCALE well within the loop
        raise RuntimeError("dome engine: no field was composed")
    return best


def _warp_structure(
    arr: Mask, g: Geometry, fld: _Field, daily: Geometry, dvf: Volume, strength: float
) -> Mask:
    """A planning structure warped by the pull field onto the daily grid (full size, bool)."""
    box = _index_box(arr, 2)
    if strength == 0 or box is None:
        return arr.copy()
    lo, hi = _lps_bounds(g, box)
    pad = float(np.max(g.spacing))
    dbox = fld.daily_box(daily, lo - pad, hi + pad, 4.0 * float(fld.coarse.spacing[0]))
    out = np.zeros(daily.shape, bool)
    if dbox is None:
        return out
    moving = Volume(arr[box], _sub_geometry(g, box))
    if _box_size(dbox) <= LARGE_BOX_VOXELS:
        target = Volume(dvf.array[dbox], _sub_geometry(daily, dbox))
        out[dbox] = warp_mask(moving, target, transform=fld.tx).array
    else:  # a large ROI (the body): uint8 input, the split rigid / coarse path
        img = sitk.GetImageFromArray(np.ascontiguousarray(moving.array).view(np.uint8))
        moving.geometry.apply_to_sitk(img)
        out[dbox] = _resample_split(fld, img, daily, dbox, 0.0) >= 0.5
    return out


def _params(
    dr: _Draws,
    strength: float,
    scale: float,
    ratio: float,
    requested: float | None,
    target: float | None,
    rot: F64,
    centre: F64,
    t: F64,
    centre_source: str,
) -> dict[str, Any]:
    return {
        "engine": "dome",
        "strength": strength,
        "coarse_mm": COARSE_MM,
        "setup": {
            "rotation_deg": (dr.setup_rotation_deg * strength).tolist(),
            "rotation_matrix": rot.tolist(),
            "translation_mm": np.asarray(t, float).tolist(),
            "centre_mm": np.asarray(centre, float).tolist(),
            "centre_source": centre_source,
            "drawn_rotation_deg": dr.setup_rotation_deg.tolist(),
            "drawn_translation_mm": dr.setup_translation_mm.tolist(),
        },
        "bladder": {
            "ratio_drawn": dr.bladder_ratio,
            "ratio_requested": None if requested is None else float(requested),
            "ratio": ratio,
            "decay_mm": BLADDER_DECAY_MM,
        },
        "rectum": {
            "position_drawn": dr.rectum_position,
            "amplitude_drawn_mm": dr.rectum_amplitude_mm,
            "amplitude_mm": dr.rectum_amplitude_mm * strength * scale,
            "sigma_mm": dr.rectum_sigma_mm,
        },
        "prostate": {
            "translation_drawn_mm": dr.prostate_translation_mm.tolist(),
            "pitch_drawn_deg": dr.prostate_pitch_deg,
            "translation_mm": (dr.prostate_translation_mm * strength * scale).tolist(),
            "pitch_deg": dr.prostate_pitch_deg * strength * scale,
        },
        "gas": {
            "pocket_drawn": dr.gas_pocket,
            "hu": dr.gas_hu,
            "radii_mm": dr.gas_radii_mm.tolist(),
        },
        "noise_hu": dr.noise_hu,
        "bladder_volume_ratio_target": target,
    }
