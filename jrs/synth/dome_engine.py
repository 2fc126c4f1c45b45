"""The "dome" deformation engine: a held-out family of synthetic daily fractions.

`synthesize_dome_fraction` makes a synthetic daily scan of any planning CT (analytic phantom or
real patient) with the exact pull DVF that relates it to the planning scan, returning the same
`jrs.synth.engine.EngineFraction` as the organ engine (DESIGN.md conventions: LPS mm, arrays
(z, y, x), daily point ``p`` corresponds to planning point ``p + u(p)``).

Held out
--------
This family is a **test family only**. The model is trained, and its QA calibrated, on fractions
of the organ engine (`jrs.synth.engine.synthesize_fraction`, family "organ"); the dome family
moves the anatomy by a different mechanism, so re-contouring its fractions is a cross-generator
test of what the model learned. Training and calibration data builders (``training/``,
`research.qa_calibration`) must never call it, and ``jrs phantom --family dome`` /
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

Modules
-------
The engine is split by concept: `jrs.synth.dome_pieces` (the setup centre, the anatomy in
frame I and the push pieces), `jrs.synth.dome_push` (assembly, the bladder amplitude, the det J
check and the fixed-point inversion), `jrs.synth.dome_field` (the pull field, its dense DVF and
warping by it) and this module (the draws, softening, the daily image and the public API); the
box and grid helpers are shared with the organ engine (`jrs.synth.grid_boxes`). The constants of
the pieces (`BONE_HU`, `MIN_BONE_MM3`, `BONE_BLEND_MM`, `BONY_Z_MM`, `BLADDER_TAPER_MM`, ...)
live in `jrs.synth.dome_pieces`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from jrs.core.errors import InvalidInput
from jrs.core.fields import jacobian_determinant
from jrs.core.geometry import Geometry, Volume
from jrs.core.labels import BLADDER, RECTUM
from jrs.synth.deformation import (
    rigid_inverse,
    rigid_transform,
    rotation_matrix,
    uniform_in_ball,
)
from jrs.synth.dome_field import (
    PullField,
    bladder_count,
    compose_field,
    dense_field,
    resample_field,
    warp_labels,
    warp_structure,
)
from jrs.synth.dome_pieces import (
    BLADDER_DECAY_MM,
    BLADDER_TAPER_MM,
    Anatomy,
    Pieces,
    bony_centre,
    build_anatomy,
    build_pieces,
    organ_centre,
)
from jrs.synth.dome_push import assemble_push, invert_push, min_det_jacobian, solve_bladder
from jrs.synth.grid_boxes import (
    Box,
    cover_grid,
    full_box,
    index_box,
    lattice_grid,
    lps_bounds,
    lps_box_corners,
)
from jrs.synth.synthetic_fraction import (
    GAS_HU,
    EngineFraction,
    check_planning_inputs,
    derived_frame_uid,
    planning_labels,
    volume_changes,
)

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
Mask = npt.NDArray[np.bool_]

#: spacing of the LPS-aligned grid the push field is built on, mm.
COARSE_MM = 3.0
#: the push field's det J must exceed this everywhere on the coarse grid.
MIN_DET_PUSH = 0.25
#: non-rigid amplitudes are multiplied by this while the det J check fails...
SOFTEN = 0.8
#: ... down to this scale (then the field is kept as it is).
MIN_SCALE = 0.05
#: bladder volume ratios are drawn log-uniformly in this range.
BLADDER_RATIO_RANGE = (0.5, 1.8)
#: smallest relative bladder volume change of a drawn ratio.
MIN_BLADDER_CHANGE = 0.3
#: realised bladder volume ratio tolerance (relative) the bisection aims at.
BLADDER_TOLERANCE = 0.02
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
    t_p = uniform_in_ball(rng, 4.0)
    pitch = float(rng.uniform(-4.0, 4.0))
    rot = rng.uniform(-3.0, 3.0, 3)
    t = uniform_in_ball(rng, 7.0)
    noise = float(rng.uniform(8.0, 20.0)) if noise_hu is None else float(noise_hu)
    return _Draws(
        ratio, position, amplitude, sigma, pocket, gas_hu, radii, t_p, pitch, rot, t, noise
    )


# ------------------------------------------------------------------------------ grids and setup
@dataclass(frozen=True, eq=False)
class _Frame:
    """The grids and the rigid setup ``S(q) = c + R (q - c) + t`` of one fraction."""

    planning: Geometry
    daily: Geometry
    coarse: Geometry  # the cover grid (frame D) on the coarse lattice
    coarse_first: npt.NDArray[np.int64]  # its lattice index (x, y, z): zeros
    rot: F64
    centre: F64
    t: F64
    centre_source: str  # "bone", else organ_centre's source

    def compose(self, v_box: F32, box_first: npt.NDArray[np.int64]) -> PullField:
        """The pull field of the non-rigid pull `v_box` on the box grid at `box_first`."""
        return compose_field(
            v_box,
            box_first,
            self.coarse,
            self.coarse_first,
            self.rot,
            self.centre,
            self.t,
            self.daily,
        )


def _frame(
    ct: Volume, lab: npt.NDArray[Any], dr: _Draws, strength: float, daily: Geometry
) -> _Frame:
    """The setup about the bony pelvis centre (else an organ centre) and the cover grid."""
    g = ct.geometry
    centre_organs, organ_source = organ_centre(lab, g)
    centre = None
    if strength > 0 and organ_source != "grid":
        centre = bony_centre(ct, lab, float(centre_organs[2]))
    centre_source = "bone"
    if centre is None:
        centre, centre_source = centre_organs, organ_source
    rot = rotation_matrix(dr.setup_rotation_deg * strength)
    t = dr.setup_translation_mm * strength
    coarse_first, coarse = cover_grid(daily, COARSE_MM)
    return _Frame(g, daily, coarse, coarse_first, rot, centre, t, centre_source)


# ------------------------------------------------------------------------------ the field
def _nonrigid(
    an: Anatomy,
    pc: Pieces,
    dr: _Draws,
    strength: float,
    target: float | None,
    lab: npt.NDArray[Any],
    fr: _Frame,
    box_first: npt.NDArray[np.int64],
) -> tuple[PullField, dict[str, Any]]:
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
    best: tuple[PullField, dict[str, Any]] | None = None
    for _attempt in range(80):  # at most ~58 softenings + 4 fine-grid checks
        amp = strength * k
        push = assemble_push(
            pc,
            an,
            dr.rectum_amplitude_mm * amp,
            dr.prostate_pitch_deg * amp,
            dr.prostate_translation_mm * amp,
        )
        goal = None if target is None else float(target**kb)
        s, estimate = (0.0, 1.0)
        if goal is not None and push.a is not None:
            s, estimate = solve_bladder(push, pc, step, goal * correction)
        d = push.at(s)
        min_det = min_det_jacobian(d, an.grid)
        if min_det <= MIN_DET_PUSH and max(k, kb) > MIN_SCALE:
            log.debug("dome push det J %.3f (scales %.3f, %.3f): softening", min_det, k, kb)
            rest_fails = s == 0.0 or min_det_jacobian(push.b, an.grid) <= MIN_DET_PUSH
            if rest_fails:
                soften_rest, soften_bladder = k > MIN_SCALE, k <= MIN_SCALE
            else:
                alone = min_det_jacobian(np.ascontiguousarray(d - push.b), an.grid) <= MIN_DET_PUSH
                soften_bladder = kb > MIN_SCALE
                soften_rest = not alone or not soften_bladder
            k *= SOFTEN if soften_rest else 1.0
            kb *= SOFTEN if soften_bladder else 1.0
            correction = 1.0
            continue
        if min_det <= MIN_DET_PUSH:
            log.warning("dome push det J %.3f after softening to the floor: kept", min_det)
        v, residual, n_iter = invert_push(d, step)
        del d
        fld = fr.compose(v, box_first)
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
        best = (fld, info)
        if goal is None or push.a is None or planning_bladder == 0:
            break
        realised = bladder_count(lab, fr.planning, fld, fr.daily) / planning_bladder
        log.debug("dome bladder: goal %.3f, coarse %.3f, fine %.3f", goal, estimate, realised)
        if abs(realised / goal - 1.0) <= BLADDER_TOLERANCE or checks >= 3:
            break
        correction *= goal / max(realised, 1e-3)
        checks += 1
    if best is None:  # pragma: no cover - both scales reach MIN_SCALE well within the loop
        raise RuntimeError("dome engine: no field was composed")
    return best


def _field(
    ct: Volume,
    lab: npt.NDArray[Any],
    dr: _Draws,
    strength: float,
    target: float | None,
    fr: _Frame,
    lbox: Box | None,
) -> tuple[PullField, Pieces | None, dict[str, Any]]:
    """The pull field: the setup alone, or the setup after the non-rigid pull of the organs.

    The non-rigid box (frame I) is the organs' box carried by ``S^-1``, grown by the reach of
    every piece, on the cover grid's lattice.

    Returns:
        (the pull field, the pieces (None without non-rigid motion), the non-rigid record).
    """
    if strength <= 0 or lbox is None:
        info: dict[str, Any] = {
            "nonrigid_scale": 1.0,
            "min_det_jacobian_push": 1.0,
            "inversion_residual_mm": 0.0,
            "inversion_iterations": 0,
            "bladder_s": 0.0,
            "bladder_volume_ratio_estimate": None,
        }
        return fr.compose(np.zeros((1, 1, 1, 3), np.float32), fr.coarse_first), None, info
    step = COARSE_MM
    lo, hi = lps_bounds(fr.planning, lbox)
    back = rigid_inverse(lps_box_corners(lo, hi), fr.rot, fr.centre, fr.t)
    reach = max(BLADDER_TAPER_MM[1] + 4 * step, 4 * dr.rectum_sigma_mm + 4 * step, 30.0)
    box_first, grid = lattice_grid(
        back.min(axis=0) - reach, back.max(axis=0) + reach, fr.coarse.origin, step
    )
    an = build_anatomy(ct, lab, grid, rigid_transform(fr.rot, fr.centre, fr.t))
    pc = build_pieces(an, dr.rectum_position, dr.rectum_sigma_mm, dr.rectum_amplitude_mm * strength)
    fld, info = _nonrigid(an, pc, dr, strength, target, lab, fr, box_first)
    return fld, pc, info


# ------------------------------------------------------------------------------ the images
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
    box = index_box(daily_lab == RECTUM, 4)
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


def _warp_planning(
    ct: Volume,
    lab: npt.NDArray[Any],
    structures: Mapping[str, np.ndarray],
    fld: PullField,
    dvf: Volume,
    strength: float,
    lbox: Box | None,
) -> tuple[F32, npt.NDArray[np.uint8], dict[str, np.ndarray]]:
    """The planning CT, labels and structures warped by the pull field onto the daily grid.

    Returns:
        (daily CT float32 HU before gas and noise, daily labels uint8, daily structures bool).
    """
    g = ct.geometry
    daily = dvf.geometry
    if strength == 0:
        img = np.array(ct.array, dtype=np.float32)
    else:
        img = resample_field(fld, ct.to_sitk(), daily, full_box(ct.array.shape), -1000.0)
    daily_lab = np.zeros(g.shape, np.uint8)
    if strength == 0 or lbox is None:
        daily_lab[...] = lab
    else:
        made = warp_labels(lab, g, fld, daily, lbox, dvf)
        if made is not None:
            daily_lab[made[1]] = made[0]
    out_structures: dict[str, np.ndarray] = {}
    for name, m in structures.items():
        arr = np.asarray(m)
        arr = arr if arr.dtype == np.bool_ else arr != 0
        out_structures[name] = warp_structure(arr, g, fld, daily, dvf, strength)
    return img, daily_lab, out_structures


def _derived_frame(ct: Volume, dr: _Draws, strength: float, ratio: float) -> str:
    return derived_frame_uid(
        "jrs-dome-engine",
        (
            ct.geometry.frame_of_reference_uid,
            dr.setup_translation_mm.tolist(),
            dr.setup_rotation_deg.tolist(),
            ratio,
            dr.rectum_amplitude_mm,
            strength,
        ),
    )


def _check_inputs(
    ct: Volume,
    labels: Volume,
    structures: Mapping[str, np.ndarray],
    strength: float,
    bladder_ratio: float | None,
    noise_hu: float | None,
) -> npt.NDArray[np.uint8]:
    check_planning_inputs(ct, labels, structures, strength)
    if bladder_ratio is not None and (not np.isfinite(bladder_ratio) or bladder_ratio <= 0):
        raise InvalidInput(
            f"bladder_ratio must be a finite number > 0 (daily / planning volume), got "
            f"{bladder_ratio}"
        )
    if noise_hu is not None and (not np.isfinite(noise_hu) or noise_hu < 0):
        raise InvalidInput(f"noise_hu must be a finite number >= 0 (HU), got {noise_hu}")
    return planning_labels(labels)


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
        labels: planning label map (nz, ny, nx) on the CT grid, ids of `jrs.core.labels` (1 bladder,
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
    fr = _frame(ct, lab, dr, strength, daily)

    target = float(ratio**strength) if np.any(lab == BLADDER) else None
    lbox = index_box(lab > 0, 2)
    fld, pc, info = _field(ct, lab, dr, strength, target, fr, lbox)
    min_det = float(jacobian_determinant(Volume(fld.u, fr.coarse)).min())
    dvf = dense_field(fld, daily)
    if strength == 0:
        dvf.array[...] = 0.0
    img, daily_lab, out_structures = _warp_planning(ct, lab, structures, fld, dvf, strength, lbox)

    # a new gas pocket, rectal gas, noise
    gas_info: dict[str, Any] = {"painted": False}
    if strength > 0 and dr.gas_pocket:
        gas_info = _paint_gas(img, daily_lab, daily, dr, rng)
    daily_gas = (daily_lab == RECTUM) & (img < GAS_HU)
    img += _noise(g.shape, dr.noise_hu, rng)
    np.clip(img, -1024.0, 3071.0, out=img)

    params = _params(dr, strength, ratio, bladder_ratio, target, fr, info)
    params.update(_realised(frame, info, min_det, fld, daily_gas))
    _add_pieces(params, info, pc, gas_info)
    params.update(volume_changes(lab, daily_lab))
    return EngineFraction(
        ct=Volume(img, daily),
        labels=Volume(daily_lab, daily),
        structures=out_structures,
        true_dvf=dvf,
        params=params,
        gas=daily_gas,
    )


# ------------------------------------------------------------------------------ parameters
def _params(
    dr: _Draws,
    strength: float,
    ratio: float,
    requested: float | None,
    target: float | None,
    fr: _Frame,
    info: Mapping[str, Any],
) -> dict[str, Any]:
    """The drawn and applied parameters (before the realised quantities)."""
    scale = float(info["nonrigid_scale"])
    goal = info.get("bladder_volume_ratio_target", target)
    return {
        "engine": "dome",
        "strength": strength,
        "coarse_mm": COARSE_MM,
        "setup": {
            "rotation_deg": (dr.setup_rotation_deg * strength).tolist(),
            "rotation_matrix": fr.rot.tolist(),
            "translation_mm": np.asarray(fr.t, float).tolist(),
            "centre_mm": np.asarray(fr.centre, float).tolist(),
            "centre_source": fr.centre_source,
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
        "bladder_volume_ratio_target": goal,
    }


def _realised(
    frame: str, info: Mapping[str, Any], min_det: float, fld: PullField, daily_gas: Mask
) -> dict[str, Any]:
    """The realised field quantities: scales, det J, inversion residual, non-rigid box."""
    return {
        "frame_of_reference_uid": frame,
        "nonrigid_scale": float(info["nonrigid_scale"]),
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


def _add_pieces(
    params: dict[str, Any], info: Mapping[str, Any], pc: Pieces | None, gas: Mapping[str, Any]
) -> None:
    """Record the pieces' geometry and the gas pocket in `params` (in place)."""
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
    params["gas"].update(gas)
