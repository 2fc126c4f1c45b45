"""The organ-aware deformation engine: synthetic daily fractions of ANY planning scan.

`synthesize_fraction` takes a planning CT (analytic phantom or real patient), its label map
(ids of `jrs.core.labels`) and its other structures, and makes one synthetic daily scan with the
exact pull DVF that relates it to the planning scan (DESIGN.md conventions: LPS mm, arrays (z, y,
x), daily point ``p`` corresponds to planning point ``p + u(p)``).

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

Modules: the anatomy and the velocity field (with `BONE_HU`, `MIN_BONE_MM3`, `MAX_PROSTATE_MM`,
`MIN_DET_J`) are in `jrs.synth.organ_velocity`; the box and grid helpers are shared with the
dome engine (`jrs.synth.grid_boxes`), and so are `EngineFraction`, `GAS_HU` and the input checks
(`jrs.synth.synthetic_fraction`, re-exported here); this module holds the draws, the warping,
the daily image and the public API.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from scipy import ndimage

from jrs.core.errors import InvalidInput
from jrs.core.fields import dvf_to_sitk, jacobian_determinant, warp, warp_mask
from jrs.core.geometry import Geometry, Volume
from jrs.core.labels import PROSTATE, RECTUM
from jrs.synth.ct_texture import add_gas, ct_noise
from jrs.synth.deformation import (
    rigid_inverse,
    rigid_transform,
    rotation_matrix,
    uniform_in_ball,
)
from jrs.synth.grid_boxes import (
    Box,
    box_size,
    cover_grid,
    crop_volume,
    full_box,
    index_box,
    index_box_of_lps,
    lps_bounds,
    lps_box_corners,
    resample_component,
    resample_split,
)
from jrs.synth.organ_velocity import (
    Velocity,
    build_anatomy,
    build_velocity,
    support_box,
    tune_velocity,
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

#: spacing of the grid the velocity field is built and integrated on, mm.
COARSE_MM = 4.0
#: fine boxes larger than this (voxels) are warped through the coarse transform (memory).
FINE_BOX_VOXELS = 6_000_000


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
    t = uniform_in_ball(rng, 5.0)
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
        lo, hi = lps_bounds(self.planning, box)
        back = rigid_inverse(lps_box_corners(lo, hi), self.rot, self.centre, self.t)  # S^-1
        pad = self.reach + margin
        return index_box_of_lps(back.min(axis=0) - pad, back.max(axis=0) + pad, self.dvf.geometry)

    def resample(
        self, moving: sitk.Image, dbox: Box, default: float, pixel: int = sitk.sitkFloat32
    ) -> npt.NDArray[Any]:
        """Linear resampling of `moving` onto the daily `dbox` (array of that box's shape).

        The setup alone is used outside the non-rigid box and the coarse field inside it: the
        same values as warping with the full field, at a fraction of the cost.
        """
        return resample_split(
            moving,
            self.dvf.geometry,
            dbox,
            self.setup,
            self.coarse_tx,
            self.nonrigid,
            default,
            pixel,
        )

    def exact(self, arr: npt.NDArray[Any], box: Box, mode: str) -> npt.NDArray[Any]:
        """Warp the `box` crop of a planning array by the exact field (label or mask), full size."""
        out = np.zeros(self.dvf.geometry.shape, arr.dtype if mode == "label" else bool)
        dbox = self.daily_box(box)
        if dbox is None:
            return out
        moving = crop_volume(Volume(arr, self.planning), box)
        sub = crop_volume(self.dvf, dbox)
        if mode == "label":
            out[dbox] = warp(moving, sub, "label", 0).array
        else:
            out[dbox] = warp_mask(moving, sub).array
        return out


def _upsample(coarse_u: Volume, daily: Geometry) -> Volume:
    """Linear interpolation of the coarse field onto the daily grid, (nz, ny, nx, 3) float32."""
    out = np.empty((*daily.shape, 3), np.float32)
    ref = daily.reference_image()
    for c in range(3):
        img = resample_component(coarse_u, c, ref)
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
    return derived_frame_uid(
        "jrs-engine",
        (
            ct.geometry.frame_of_reference_uid,
            dr.translation_mm.tolist(),
            dr.rotation_deg.tolist(),
            dr.bladder_factor,
            dr.soft_modes.tolist(),
            strength,
        ),
    )


# ------------------------------------------------------------------------------ stages
class _Clock:
    """Debug timings of the stages of one fraction (wall and CPU seconds)."""

    def __init__(self) -> None:
        self.last = [time.perf_counter(), time.process_time()]

    def tick(self, what: str) -> None:
        now = [time.perf_counter(), time.process_time()]
        log.debug(
            "synthesize_fraction: %s %.2f s (cpu %.2f s)",
            what,
            now[0] - self.last[0],
            now[1] - self.last[1],
        )
        self.last = now


def _setup_centre(
    g: Geometry, lab: npt.NDArray[Any], profile: str, rng: np.random.Generator
) -> F64:
    """The setup's rotation centre, LPS mm (3,).

    The prostate centre (or the labels' centroid, or the grid centre), moved by up to the
    profile's distance (`_RANGES`) in a random direction.
    """
    centre_mask = lab == PROSTATE if np.any(lab == PROSTATE) else lab > 0
    if np.any(centre_mask):
        k, j, i = (np.mean(a) for a in np.nonzero(centre_mask))
        centre = g.index_to_physical([i, j, k])
    else:
        centre = g.index_to_physical((np.asarray(g.size_xyz) - 1) / 2.0)
    reach = _RANGES[profile][3]
    if reach > 0:  # the couch rotates the patient about some point, seldom the prostate
        centre = centre + uniform_in_ball(rng, reach)
    return centre


def _field(
    ct: Volume,
    lab: npt.NDArray[Any],
    dr: _Draws,
    strength: float,
    daily: Geometry,
    rigid: tuple[F64, F64, F64],
    clock: _Clock,
) -> tuple[_Warper, dict[str, Any], Velocity | None, float]:
    """The non-rigid velocity, its exponential and the pull field ``u`` with its warper.

    Args:
        ct: the planning CT.
        lab: (nz, ny, nx) planning label map.
        dr: the draws.
        strength: factor on every amplitude.
        daily: the daily grid.
        rigid: the setup (rot (3, 3), centre (3,) mm, t (3,) mm).
        clock: stage timings.

    Returns:
        (the warper (with the daily DVF), the non-rigid record, the velocity field (None at
        strength 0), min det J of ``u`` on the coarse grid).
    """
    rot, centre, t = rigid
    g = ct.geometry
    step = COARSE_MM
    _, coarse = cover_grid(daily, step)
    pts = coarse.voxel_centres().astype(np.float32)
    setup = rigid_transform(rot, centre, t)
    info: dict[str, Any] = {"nonrigid_scale": 1.0, "min_det_jacobian_nonrigid": 1.0}
    v = np.zeros((*coarse.shape, 3), np.float32)
    vf: Velocity | None = None
    target_ratio = None
    if strength > 0:
        an = build_anatomy(ct, lab, coarse, setup, pts)
        vf = build_velocity(an, pts, step, dr, strength)
        if vf.bladder_w is not None:
            target_ratio = float(dr.bladder_factor**strength)
        clock.tick("anatomy")
        v, info = tune_velocity(vf, target_ratio)
        clock.tick("velocity")

    # u = (R - I)(p + v - c) + v + t on the coarse grid
    rel = pts + v - centre.astype(np.float32)
    u = rel @ (rot - np.eye(3)).T.astype(np.float32) + v + t.astype(np.float32)
    coarse_u = Volume(np.ascontiguousarray(u, dtype=np.float32), coarse)
    del rel, u
    min_det = float(jacobian_determinant(coarse_u).min())
    dvf = _upsample(coarse_u, daily)
    support = support_box(v)
    nonrigid = None
    if support is not None:
        lo, hi = lps_bounds(coarse, support)
        nonrigid = index_box_of_lps(lo - step, hi + step, daily)
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
    clock.tick("field")
    return warper, info, vf, min_det


def _daily_ct(
    ct: Volume,
    lab: npt.NDArray[Any],
    warper: _Warper,
    dr: _Draws,
    strength: float,
    gas: bool,
    rng: np.random.Generator,
) -> tuple[F32, Mask, bool]:
    """The planning CT warped onto the daily grid, its rectal gas replaced when drawn so.

    Returns:
        (daily CT float32 HU before new gas and noise, planning rectal gas mask, whether the
        planning gas vanished).
    """
    rect_gas = (lab == RECTUM) & (ct.array < GAS_HU)
    vanish = bool(gas and strength > 0 and dr.gas_vanishes and rect_gas.any())
    if strength == 0:
        return np.array(ct.array, dtype=np.float32), rect_gas, vanish
    img = warper.resample(ct.to_sitk(), full_box(ct.array.shape), -1000.0)
    if vanish:
        gbox = index_box(lab == RECTUM, 3)
        dbox = None if gbox is None else warper.daily_box(gbox)
        if gbox is not None and dbox is not None:
            crop = crop_volume(ct, gbox)
            moving = crop.with_array(_faeces(ct, rect_gas, gbox, dr.faeces_hu, rng))
            # NaN where p + u(p) leaves the crop: those voxels keep the full warp
            patch = warper.resample(moving.to_sitk(), dbox, float("nan"))
            inside = ~np.isnan(patch)
            img[dbox][inside] = patch[inside]
    return img, rect_gas, vanish


def _warp_structures(
    structures: Mapping[str, np.ndarray], warper: _Warper, strength: float
) -> dict[str, np.ndarray]:
    """Every planning structure warped by the exact field (large ones by the coarse transform)."""
    g = warper.planning
    out: dict[str, np.ndarray] = {}
    for name, m in structures.items():
        arr = np.asarray(m)
        arr = arr if arr.dtype == np.bool_ else arr != 0
        box = index_box(arr, 2)
        if strength == 0 or box is None:
            out[name] = arr.copy()
            continue
        dbox = warper.daily_box(box)
        if dbox is None:
            out[name] = np.zeros(g.shape, bool)
        elif box_size(dbox) <= FINE_BOX_VOXELS:
            out[name] = warper.exact(arr, box, "mask")
        else:  # a large ROI (body): through the coarse transform, without float copies
            crop = crop_volume(Volume(arr, g), box)
            img8 = sitk.GetImageFromArray(crop.array.view(np.uint8))
            crop.geometry.apply_to_sitk(img8)
            res = np.zeros(g.shape, bool)
            res[dbox] = warper.resample(img8, dbox, 0.0) >= 0.5
            out[name] = res
    return out


def _new_gas(
    img: F32,
    daily_lab: npt.NDArray[Any],
    daily: Geometry,
    dr: _Draws,
    strength: float,
    gas: bool,
    rng: np.random.Generator,
) -> bool:
    """New gas pockets inside the daily rectal lumen (the rectum eroded by ~2.5 mm), in place."""
    new = bool(gas and strength > 0 and dr.gas_new and np.any(daily_lab == RECTUM))
    if new:
        rbox = index_box(daily_lab == RECTUM, 2)
        if rbox is not None:
            rect = daily_lab[rbox] == RECTUM
            dist = ndimage.distance_transform_edt(rect, sampling=daily.spacing[::-1])
            lumen = dist > 2.5
            add_gas(img[rbox], lumen if lumen.any() else rect, daily, rng)
    return new


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
        labels: planning label map (nz, ny, nx) on the CT grid, ids of `jrs.core.labels` (1 bladder,
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
    check_planning_inputs(ct, labels, structures, strength)
    lab = planning_labels(labels)
    clock = _Clock()
    if profile not in PROFILES:
        raise InvalidInput(f"draw profile {profile!r} unknown; use one of {', '.join(PROFILES)}")
    dr = _draw(rng, noise_hu, profile)
    frame = frame_of_reference_uid or _derived_frame(ct, dr, strength)
    daily = g.with_frame(frame)

    # rigid setup about the prostate centre (or the labels' centroid, or the grid centre)
    centre = _setup_centre(g, lab, profile, rng)
    rot = rotation_matrix(dr.rotation_deg * strength)
    t = dr.translation_mm * strength
    warper, info, vf, min_det = _field(ct, lab, dr, strength, daily, (rot, centre, t), clock)

    # the daily CT (planning rectal gas replaced when drawn so)
    img, rect_gas, vanish = _daily_ct(ct, lab, warper, dr, strength, gas, rng)
    clock.tick("ct")

    # labels and structures by the exact field, on boxes
    lbox = index_box(lab > 0, 3)
    exact = strength > 0 and lbox is not None
    daily_lab = warper.exact(lab, lbox, "label") if exact and lbox else lab.copy()
    out_structures = _warp_structures(structures, warper, strength)
    clock.tick("structures")

    new = _new_gas(img, daily_lab, daily, dr, strength, gas, rng)
    daily_gas = (daily_lab == RECTUM) & (img < GAS_HU)
    img += ct_noise(g.shape, dr.noise_hu, rng)
    np.clip(img, -1024, 3071, out=img)
    clock.tick("noise")

    params = _params(dr, strength, centre, rot, t, info, vf, min_det, frame, vanish, new)
    params["profile"] = profile
    params.update(volume_changes(lab, daily_lab))
    params["daily_gas_voxels"] = int(daily_gas.sum())
    params["planning_rectal_gas_voxels"] = int(rect_gas.sum())
    return EngineFraction(
        ct=Volume(img, daily),
        labels=Volume(daily_lab, daily),
        structures=out_structures,
        true_dvf=warper.dvf,
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
    vf: Velocity | None,
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
