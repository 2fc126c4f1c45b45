"""Synthetic pelvic patients and their daily fractions, in memory.

A patient is rendered once on a *model grid* (the planning grid extended by 30 mm at both ends in
z, always stored HFS-like with the identity direction). The planning scan is the model image
cropped to the planning grid, plus the planning scan's rectal gas and CT noise. A fraction samples
an analytic pull map (`jrs.synth.deformation`), evaluates it on a 3 mm grid, interpolates it
linearly onto the daily grid (the ground-truth DVF written to ``true_dvf.mha``), and then defines
every daily quantity by warping the planning model with that DVF through `jrs.core.fields`:

* daily labels = ``warp(planning labels, dvf, "label")`` (per-label linear + arg-max),
* daily structures = ``warp_mask(planning structure, dvf)``,
* daily CT = ``warp(noiseless gas-free planning image, dvf, "linear")`` + this scan's own rectal
  gas pockets (inside the warped rectal lumen) + fresh correlated noise.

So "planning labels warped by the true DVF" reproduce the daily labels exactly (up to ties), and the
DVF is smooth and invertible (det J > 0 is checked on the sampled field).

Identity: planning and every fraction are separate studies (own StudyInstanceUID, study date one
day apart) and separate series with their own FrameOfReferenceUID: daily CTs are different scans.
UIDs are derived from the seed, so a seed always gives the same files.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from pydicom.uid import generate_uid

from jrs.core.errors import InvalidInput
from jrs.core.fields import dvf_to_sitk, jacobian_determinant, warp, warp_mask
from jrs.core.geometry import PATIENT_POSITION_DIRECTIONS, Geometry, Volume, reorient
from jrs.core.labels import DEFAULT_ROI_NAMES, label_map_from_masks
from jrs.io.series import CTSeries, PatientInfo
from jrs.synth.anatomy import AnatomyParams, Rendered, organ_bounds, render, sample_anatomy
from jrs.synth.ct_texture import add_gas, ct_noise
from jrs.synth.deformation import FractionParams, build_pull_map, sample_fraction
from jrs.synth.dome_engine import SEED_STREAM, synthesize_dome_fraction
from jrs.synth.engine import PROFILES, synthesize_fraction
from jrs.synth.grid_boxes import crop_volume

F64 = npt.NDArray[np.float64]
Mask = npt.NDArray[np.bool_]

#: ROI names of the structures every phantom carries (the four organs first).
ROI_NAMES: tuple[str, ...] = (
    DEFAULT_ROI_NAMES["bladder"],
    DEFAULT_ROI_NAMES["rectum"],
    DEFAULT_ROI_NAMES["seminal_vesicles"],
    DEFAULT_ROI_NAMES["prostate"],
    "Body",
    "FemoralHead_L",
    "FemoralHead_R",
    "PTV",
)
MODEL_PAD_MM = 30.0
COARSE_MM = 4.0
BODY_HU = -550.0
STUDY_DATE = "20240102"


def _uid(*parts: object) -> str:
    return str(generate_uid(entropy_srcs=["jrs-phantom", *(str(p) for p in parts)]))


@dataclass(eq=False)
class _Model:
    """The patient's noiseless, gas-free anatomy on the model grid (HFS storage)."""

    anatomy: AnatomyParams
    anchor: F64
    geometry: Geometry
    rendered: Rendered
    labels: npt.NDArray[np.uint8]
    planning: Geometry  # planning grid, HFS storage
    pad: int  # slices of the model grid below the planning grid
    boxes: dict[str, tuple[slice, slice, slice]]


@dataclass(eq=False)
class PhantomPatient:
    """A synthetic patient's planning scan.

    Attributes:
        seed: the patient's seed.
        name: folder name, ``phantom_<seed>``.
        patient_position: DICOM PatientPosition of the storage (HFS, HFP, FFS, FFP).
        ct: planning CT, HU float32 (nz, ny, nx), LPS geometry with its FrameOfReferenceUID.
        labels: label map uint8 (nz, ny, nx), ids of `jrs.core.labels` (priority prostate > seminal
            vesicles > rectum > bladder where organs overlap).
        structures: ROI name -> bool (nz, ny, nx) on the CT grid (`ROI_NAMES`).
        tissues: "fat", "muscle", "bone", "gas" -> bool (nz, ny, nx) tissue cores (for checks).
        patient: DICOM patient/study attributes.
        params: anatomy parameters and grid used (JSON-friendly).
        study_instance_uid: the planning study's UID.
    """

    seed: int
    name: str
    patient_position: str
    ct: Volume
    labels: Volume
    structures: dict[str, Mask]
    tissues: dict[str, Mask]
    patient: PatientInfo
    params: dict[str, Any]
    study_instance_uid: str
    model: _Model = field(repr=False)

    def ct_series(self) -> CTSeries:
        """The planning CT as a DICOM series identity (deterministic UIDs, no files)."""
        return _series(
            self.ct,
            self.patient,
            self.patient_position,
            self.study_instance_uid,
            (self.seed, "planning"),
            "Phantom planning CT",
        )


@dataclass(eq=False)
class PhantomFraction:
    """One daily scan of a phantom patient with its ground truth.

    Attributes:
        index: fraction number (1..K).
        ct: daily CT, HU float32 (nz, ny, nx), own FrameOfReferenceUID.
        labels: daily label map uint8 = planning labels warped by `true_dvf`.
        structures: ROI name -> bool masks = planning structures warped by `true_dvf`.
        gas: bool (nz, ny, nx) rectal gas of this scan.
        true_dvf: (nz, ny, nx, 3) float32 pull DVF in mm (LPS components) on the daily grid:
            daily point p corresponds to planning point p + u(p).
        params: the fraction's changes (`FractionParams.as_dict`) plus "min_det_jacobian".
        patient: DICOM patient/study attributes (study date = planning + index days).
        study_instance_uid: the daily study's UID.
        engine: "analytic" (the analytic pull map), "organ" (`jrs.synth.engine`) or "dome"
            (`jrs.synth.dome_engine`, the held-out test family).
    """

    index: int
    seed: int
    patient_position: str
    ct: Volume
    labels: Volume
    structures: dict[str, Mask]
    gas: Mask
    true_dvf: Volume
    params: dict[str, Any]
    patient: PatientInfo
    study_instance_uid: str
    engine: str = "analytic"

    def ct_series(self) -> CTSeries:
        """The daily CT as a DICOM series identity (deterministic UIDs, no files)."""
        key: tuple[object, ...] = (self.seed, "fraction", self.index)
        return _series(
            self.ct,
            self.patient,
            self.patient_position,
            self.study_instance_uid,
            key if self.engine == "analytic" else (*key, self.engine),
            f"Phantom daily CT {self.index}",
        )


def _series(
    ct: Volume,
    patient: PatientInfo,
    position: str,
    study: str,
    key: tuple[object, ...],
    description: str,
) -> CTSeries:
    return CTSeries(
        volume=ct,
        study_instance_uid=study,
        series_instance_uid=_uid(*key, "series"),
        sop_instance_uids=[_uid(*key, "slice", k) for k in range(ct.geometry.shape[0])],
        patient=patient,
        patient_position=position,
        series_description=description,
    )


# --------------------------------------------------------------------------- helpers
def _mask_box(mask: Mask, pad: int = 2) -> tuple[slice, slice, slice]:
    idx = [np.nonzero(np.any(mask, axis=tuple(a for a in range(3) if a != d)))[0] for d in range(3)]
    if any(len(i) == 0 for i in idx):
        return (slice(0, 1), slice(0, 1), slice(0, 1))
    return tuple(  # type: ignore[return-value]
        slice(max(int(i[0]) - pad, 0), min(int(i[-1]) + pad + 1, n))
        for i, n in zip(idx, mask.shape, strict=True)
    )


def _grid(
    p: AnatomyParams, rng: np.random.Generator, matrix: int, slice_thickness: float | None
) -> tuple[Geometry, F64, dict[str, Any]]:
    """The planning grid (HFS storage) and the anchor (LPS of the prostate centre)."""
    cover = 2 * p.body_lr + 40.0
    px = max(float(rng.uniform(0.8, 1.2)), cover / matrix)
    if slice_thickness is None:
        sz = float(rng.choice([1.5, 2.0, 2.5, 3.0], p=[0.1, 0.25, 0.35, 0.3]))
    else:
        sz = float(slice_thickness)
    lo = -p.prostate_radii[2] - float(rng.uniform(28, 38))
    hi = p.bladder_centre[2] + 1.06 * p.bladder_radii[2] + float(rng.uniform(30, 40))
    nz = int(np.ceil((hi - lo) / sz)) + 1
    couch = float(rng.uniform(-400, -100))
    anchor = np.array([rng.uniform(-10, 10), -p.body_y + rng.uniform(-15, 15), couch - lo])
    half = (matrix - 1) * px / 2
    geom = Geometry(
        (nz, matrix, matrix), origin=np.array([-half, -half, couch]), spacing=np.array([px, px, sz])
    )
    return geom, anchor, {"pixel_mm": px, "slice_mm": sz, "matrix": matrix, "slices": nz}


def _to_position(vol: Volume, position: str) -> Volume:
    return vol if position == "HFS" else reorient(vol, PATIENT_POSITION_DIRECTIONS[position])


def _check_position(position: str) -> str:
    pos = position.upper()
    if pos not in PATIENT_POSITION_DIRECTIONS:
        raise InvalidInput(
            f"patient position {position!r} not supported; use one of "
            f"{sorted(PATIENT_POSITION_DIRECTIONS)}"
        )
    return pos


# --------------------------------------------------------------------------- patient
def generate_patient(
    seed: int,
    patient_position: str = "HFS",
    *,
    matrix: int = 512,
    slice_thickness: float | None = None,
    variety: str = "standard",
) -> PhantomPatient:
    """Generate a synthetic patient's planning CT, labels and structures.

    Args:
        seed: the patient's seed (same seed -> identical arrays).
        patient_position: HFS, HFP, FFS or FFP: storage orientation of the arrays (the anatomy in
            LPS is the same whatever the position).
        matrix: in-plane matrix (rows = columns); pixels are 0.8-1.2 mm unless a small matrix
            forces larger ones to cover the body (tests use 256 for speed).
        slice_thickness: slice spacing in mm; drawn from 1.5, 2, 2.5, 3 when None.
        variety: "standard" or "broad" anatomy (see `jrs.synth.anatomy.sample_anatomy`).

    Returns:
        The patient (planning scan, ground truth and the model needed for fractions).
    """
    pos = _check_position(patient_position)
    rng = np.random.default_rng([seed, 0])
    anatomy = sample_anatomy(rng, variety)
    planning, anchor, grid_info = _grid(anatomy, rng, matrix, slice_thickness)
    pad = int(np.ceil(MODEL_PAD_MM / planning.spacing[2]))
    nz, ny, nx = planning.shape
    model_geom = Geometry(
        (nz + 2 * pad, ny, nx),
        origin=planning.origin - [0, 0, pad * planning.spacing[2]],
        spacing=planning.spacing,
    )
    rendered = render(anatomy, model_geom, anchor, rng)
    organs = {k: rendered.structures[k] for k in ROI_NAMES[:4]}
    labels, _ = label_map_from_masks(organs)
    boxes = {k: _mask_box(v) for k, v in rendered.structures.items()}
    lo, hi = organ_bounds(anatomy)
    boxes["_labels"] = _mask_box(labels > 0, pad=3)
    boxes["_lumen"] = _mask_box(rendered.lumen)
    model = _Model(anatomy, anchor, model_geom, rendered, labels, planning, pad, boxes)

    frame = _uid(seed, "planning", "frame")
    geom = planning.with_frame(frame)
    crop = slice(pad, pad + nz)
    ct = rendered.base[crop].copy()
    noise_rng = np.random.default_rng([seed, 1])
    gas = add_gas(ct, rendered.lumen[crop], geom, noise_rng)
    ct += ct_noise(geom.shape, anatomy.noise_std, noise_rng)
    np.clip(ct, -1024, 3071, out=ct)
    structures = {
        k: _to_position(Volume(rendered.structures[k][crop], geom), pos).array for k in ROI_NAMES
    }
    tissues = {
        k: _to_position(Volume(v[crop], geom), pos).array for k, v in rendered.tissues.items()
    }
    tissues["gas"] = _to_position(Volume(gas, geom), pos).array
    tag = f"{seed:03d}"
    info = PatientInfo(
        patient_name=f"Phantom^{tag}",
        patient_id=f"JRS-PH-{tag}",
        study_date=STUDY_DATE,
        study_time="080000",
        study_id="PLAN",
        study_description="Phantom planning CT",
    )
    params = {
        "anatomy": anatomy.as_dict(),
        "grid": grid_info,
        "anchor_lps_mm": anchor.tolist(),
        "organ_box_mm": [lo.tolist(), hi.tolist()],
    }
    return PhantomPatient(
        seed=seed,
        name=f"phantom_{tag}",
        patient_position=pos,
        ct=_to_position(Volume(ct, geom), pos),
        labels=_to_position(Volume(labels[crop].copy(), geom), pos),
        structures=structures,
        tissues=tissues,
        patient=info,
        params=params,
        study_instance_uid=_uid(seed, "planning", "study"),
        model=model,
    )


# --------------------------------------------------------------------------- fraction
def _coarse_field(model: _Model, fp: FractionParams, daily: Geometry) -> tuple[Volume, F64, float]:
    """Sample the pull map on a 3 mm grid covering the daily grid; retry softer if det J <= 0.2.

    Returns:
        (coarse DVF Volume, coarse planning points in LPS (N, 3), min det J).
    """
    ext = daily.extent_mm + 2 * COARSE_MM
    n = np.ceil(ext / COARSE_MM).astype(int) + 1
    coarse = Geometry(
        (int(n[2]), int(n[1]), int(n[0])),
        origin=daily.origin - COARSE_MM,
        spacing=np.full(3, COARSE_MM),
    )
    pts = coarse.voxel_centres().reshape(-1, 3)
    local = pts - model.anchor
    min_det = 0.0
    for _ in range(8):
        pm = build_pull_map(model.anatomy, fp)
        phi = pm(local)
        u = Volume((phi - local).reshape((*coarse.shape, 3)).astype(np.float32), coarse)
        min_det = float(jacobian_determinant(u).min())
        if min_det > 0.2:
            break
        fp.nonrigid_scale *= 0.7
    return u, phi + model.anchor, min_det


def _daily_box(
    coarse_pts: F64,
    planning_pts: F64,
    lo: F64,
    hi: F64,
    daily: Geometry,
    margin: float = 8.0,
) -> tuple[slice, slice, slice] | None:
    """Daily index box of the points whose planning image falls in the LPS box [lo, hi]."""
    inside = np.all((planning_pts >= lo - margin) & (planning_pts <= hi + margin), axis=1)
    if not np.any(inside):
        return None
    sel = coarse_pts[inside]
    ijk_lo = np.floor(daily.physical_to_index(sel.min(axis=0) - margin)).astype(int)
    ijk_hi = np.ceil(daily.physical_to_index(sel.max(axis=0) + margin)).astype(int)
    nxyz = daily.size_xyz
    lo_i = np.clip(np.minimum(ijk_lo, ijk_hi), 0, np.asarray(nxyz) - 1)
    hi_i = np.clip(np.maximum(ijk_lo, ijk_hi), 0, np.asarray(nxyz) - 1)
    return (
        slice(int(lo_i[2]), int(hi_i[2]) + 1),
        slice(int(lo_i[1]), int(hi_i[1]) + 1),
        slice(int(lo_i[0]), int(hi_i[0]) + 1),
    )


def _organ_fraction(
    patient: PhantomPatient,
    index: int,
    seed: int | None,
    engine: str = "organ",
    profile: str = "v3",
) -> PhantomFraction:
    """A fraction made from the planning scan alone by the organ or the (held-out) dome engine.

    The dome family draws from a stream of its own (`jrs.synth.dome_engine.SEED_STREAM` added
    to the seed sequence), so it never shares draws with the organ family of the same seed.
    """
    entropy: int | list[int] = seed if seed is not None else [patient.seed, 2000 + index]
    key: tuple[object, ...] = (patient.seed, "fraction", index, engine)
    if seed is not None:
        key = (*key, seed)
    if profile != "v3":  # (the v3 profile keeps the UIDs of fractions made before profiles)
        key = (*key, profile)
    dome = engine == "dome"
    organ = functools.partial(synthesize_fraction, profile=profile)
    synthesize = synthesize_dome_fraction if dome else organ
    made = synthesize(
        patient.ct,
        patient.labels,
        patient.structures,
        np.random.default_rng(
            [*(entropy if isinstance(entropy, list) else [entropy]), SEED_STREAM]
            if dome
            else entropy
        ),
        frame_of_reference_uid=_uid(*key, "frame"),
    )
    info = PatientInfo(**{**patient.patient.__dict__})
    info.study_date = str(int(STUDY_DATE) + index) if index < 28 else STUDY_DATE
    info.study_id = f"FX{index}"
    info.study_description = f"Phantom daily CT fraction {index}"
    gas = made.gas if made.gas is not None else np.zeros(patient.ct.geometry.shape, bool)
    return PhantomFraction(
        index=index,
        seed=patient.seed,
        patient_position=patient.patient_position,
        ct=made.ct,
        labels=made.labels,
        structures={k: np.asarray(v, bool) for k, v in made.structures.items()},
        gas=gas,
        true_dvf=made.true_dvf,
        params=made.params,
        patient=info,
        study_instance_uid=_uid(*key, "study"),
        engine=engine,
    )


def generate_fraction(
    patient: PhantomPatient,
    index: int,
    seed: int | None = None,
    engine: str = "analytic",
    profile: str = "v3",
) -> PhantomFraction:
    """Generate a daily scan of `patient` with its exact ground truth.

    Args:
        patient: the planning patient.
        index: fraction number (>= 1); with ``seed=None`` the fraction is a deterministic function
            of the patient's seed and `index`.
        seed: optional explicit seed of the fraction's randomness.
        engine: "analytic" (the analytic pull map of `jrs.synth.deformation`, applied to the
            noiseless model), "organ" (`jrs.synth.engine.synthesize_fraction` applied to the
            planning CT, labels and structures, as for a real planning scan) or "dome"
            (`jrs.synth.dome_engine.synthesize_dome_fraction`, likewise: the held-out test
            family, never used for training or calibration).
        profile: draw profile of the organ engine (`jrs.synth.engine.PROFILES`: ``v3`` or
            ``broad``); the other engines take ``v3`` only.

    Returns:
        The fraction: daily CT, labels, structures, gas, true DVF (daily grid) and parameters.

    Raises:
        InvalidInput: an unknown `engine`, or a profile the engine does not have.
    """
    if profile not in PROFILES or (profile != "v3" and engine != "organ"):
        raise InvalidInput(
            f"draw profile {profile!r} not available for the {engine!r} engine; profiles "
            f"({', '.join(PROFILES)}) belong to the 'organ' engine"
        )
    if engine in ("organ", "dome"):
        return _organ_fraction(patient, index, seed, engine, profile)
    if engine != "analytic":
        raise InvalidInput(f"fraction engine {engine!r} unknown; use 'analytic', 'organ' or 'dome'")
    m = patient.model
    rng = np.random.default_rng(seed if seed is not None else [patient.seed, 1000 + index])
    fp = sample_fraction(rng)
    key = (
        (patient.seed, "fraction", index)
        if seed is None
        else (patient.seed, "fraction", index, seed)
    )
    daily = m.planning.with_frame(_uid(*key, "frame"))
    coarse_u, planning_pts, min_det = _coarse_field(m, fp, daily)
    coarse_pts = coarse_u.geometry.voxel_centres().reshape(-1, 3)
    up = sitk.Resample(
        coarse_u.to_sitk(),
        daily.reference_image(),
        sitk.Transform(),
        sitk.sitkLinear,
        0.0,
        sitk.sitkVectorFloat32,
    )
    dvf = Volume(sitk.GetArrayFromImage(up), daily)

    model_base = Volume(m.rendered.base, m.geometry)
    # the daily DVF is the linear interpolation of the coarse one, which is also what the coarse
    # DisplacementFieldTransform computes: warping the big image through it is the same warp
    # without converting the full-size field to float64
    ct = warp(model_base, dvf, "linear", -1000.0, transform=dvf_to_sitk(coarse_u)).array
    structures: dict[str, Mask] = {}
    # the noiseless image is -1000 + 900 * (body coverage) at the outline and > -150 HU inside, so
    # thresholding the warped image halfway is the warped body outline (Dice ~ 0.999 with a
    # separate warp_mask of the planning Body, at a fraction of the cost of one more full warp)
    body = ct > BODY_HU

    def warp_box(
        arr: npt.NDArray[Any], box: tuple[slice, slice, slice], mode: str
    ) -> npt.NDArray[Any]:
        moving = crop_volume(Volume(arr, m.geometry), box)
        g = moving.geometry
        lo = g.origin
        hi = g.index_to_physical(np.asarray(g.size_xyz) - 1)
        out = np.zeros(daily.shape, arr.dtype)
        dbox = _daily_box(coarse_pts, planning_pts, np.minimum(lo, hi), np.maximum(lo, hi), daily)
        if dbox is None:
            return out
        sub = crop_volume(dvf, dbox)
        if mode == "label":
            out[dbox] = warp(moving, sub, "label", 0).array
        else:
            out[dbox] = warp_mask(moving, sub).array
        return out

    labels = warp_box(m.labels, m.boxes["_labels"], "label")
    for name in ROI_NAMES:
        if name == "Body":
            structures[name] = body
        else:
            structures[name] = warp_box(m.rendered.structures[name], m.boxes[name], "mask")
    lumen = warp_box(m.rendered.lumen, m.boxes["_lumen"], "mask")
    gas = add_gas(ct, lumen, daily, rng)
    ct += ct_noise(daily.shape, m.anatomy.noise_std, rng)
    np.clip(ct, -1024, 3071, out=ct)

    pos = patient.patient_position
    params = fp.as_dict()
    params["min_det_jacobian_coarse"] = min_det
    info = PatientInfo(**{**patient.patient.__dict__})
    info.study_date = str(int(STUDY_DATE) + index) if index < 28 else STUDY_DATE
    info.study_id = f"FX{index}"
    info.study_description = f"Phantom daily CT fraction {index}"
    return PhantomFraction(
        index=index,
        seed=patient.seed,
        patient_position=pos,
        ct=_to_position(Volume(ct, daily), pos),
        labels=_to_position(Volume(labels, daily), pos),
        structures={k: _to_position(Volume(v, daily), pos).array for k, v in structures.items()},
        gas=_to_position(Volume(gas, daily), pos).array,
        true_dvf=_to_position(dvf, pos),
        params=params,
        patient=info,
        study_instance_uid=_uid(*key, "study"),
    )
