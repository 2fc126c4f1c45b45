"""The QA calibration's cases, their perturbed populations and their truth.

Phantoms and synthetic fractions of real scans; the truth is the contours and field each case was
made with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from jrs.core.errors import InvalidInput

log = logging.getLogger(__name__)


#: A structure is good when its DSC against the truth is at least this (and it is not bad).
GOOD_MIN_DSC = 0.9


#: A structure is bad when its DSC is below this ...
BAD_BELOW_DSC = 0.8


#: ... or its mean surface distance is above this, mm.
BAD_ABOVE_MSD_MM = 2.0


@dataclass(frozen=True)
class TruthCriteria:
    """How a contour is labelled against the truth.

    Attributes:
        bad_below_dsc: bad when its DSC is below this ...
        bad_above_msd_mm: ... or its mean surface distance is above this, mm.
        good_min_dsc: good when its DSC is at least this and it is not bad.
    """

    bad_below_dsc: float = BAD_BELOW_DSC
    bad_above_msd_mm: float = BAD_ABOVE_MSD_MM
    good_min_dsc: float = GOOD_MIN_DSC


#: Named criteria: ``v3`` (the release's calibration: bad DSC < 0.8 or MSD > 2 mm, good
#: DSC >= 0.9) and ``issue30`` (issue 30's acceptance: bad DSC < 0.90 or MSD > 2 mm, good
#: DSC >= 0.95; the band between is not counted).
LABEL_CRITERIA: dict[str, TruthCriteria] = {
    "v3": TruthCriteria(),
    "issue30": TruthCriteria(0.90, 2.0, 0.95),
}


#: Deformation engines of the phantom cases. The dome family (`jrs.synth.dome_engine`) is held
#: out of calibration: it is the cross-generator test, and `phantom_specs` refuses it.
CALIBRATION_ENGINES: tuple[str, ...] = ("analytic", "organ")


#: Populations whose DVF is wrong on purpose, everywhere: a good contour there (the error happened
#: not to spoil it) lies in a DVF several mm off, which a DVF flag rightly reports. It is labelled
#: `GOOD_WRONG_DVF`: neither good nor bad for the rates and the choice, and counted apart
#: (`calibrate` also gives the rates that count it as good).
WRONG_DVF_POPULATIONS = frozenset({"dvf_noise"})


GOOD_WRONG_DVF = "good_wrong_dvf"


#: Targets of the threshold choice: recall on bad contours, false-flag rate on good ones.
TARGET_RECALL = 0.9


TARGET_FALSE_FLAG_RATE = 0.1


#: Version of the per-case record format (a record of another version is re-computed). Version 2
#: adds the image figures (``image_ncc``, ``image_ncc_prealigned``, ``centroid_shift_mm``) that
#: the version-1 records lack. Version 3 adds the paths' surface distance (``path_msd_mm``), the
#: contour's fit to the daily CT's edges (``image_fit_gain``, ``image_fit_shift_mm``) and QA
#: reference paths (`jrs.qa.figures.qa_reference_paths`) in ``paths_validated``. Version 4 adds the
#: mapping's residual shift around every structure (``residual_shift_mm``,
#: `jrs.qa.residual_shift`).
RECORD_VERSION = 4


#: Population -> what it is.
POPULATIONS: dict[str, str] = {
    "network": "the model as it is (its own path choice per organ)",
    "other_path": (
        "the model, every organ taken from the output path the model does not choose (for "
        "version 2, the segmentation path its model card calls not working)"
    ),
    "iterative": "`--method iterative` (the B-spline baseline)",
    "dvf_noise": (
        "the model's DVF plus a smooth random displacement (RMS 2-6 mm, control points every "
        "8-32 mm): a model that registers wrongly"
    ),
    "shifted_planning": (
        "the planning organ contours shifted together by 5-8 mm in a random direction (a wrong "
        "planning contour): re-contouring propagates the error"
    ),
    "cutoff_fov": (
        "the daily CT with a reconstruction circle of 0.8 x the body's half width (air outside): "
        "a cut-off field of view"
    ),
}


#: What ``python -m research qa`` runs by default.
DEFAULT_POPULATIONS: tuple[str, ...] = (
    "network",
    "other_path",
    "iterative",
    "dvf_noise",
    "shifted_planning",
    "cutoff_fov",
)


#: Populations that run the network (the others need no model).
_NETWORK_POPULATIONS = frozenset(DEFAULT_POPULATIONS) - {"iterative"}


#: The flags measured (keys of `jrs.qa.figures.FLAG_CODES`).
FLAGS: tuple[str, ...] = (
    "nearly_empty",
    "volume_change",
    "path_disagreement",
    "touches_box",
    "jacobian_outliers",
    "image_disagreement",
    "centroid_shift",
    "image_misfit",
    "misregistration",
    "method_disagreement",
    "same_organ_flagged",
    "dvf_folding",
)


#: The flags of a structure: calibrated against the truth of its contour. ``dvf_folding`` is a
#: flag of the DVF (a deliverable of its own): measured, counted on every structure of its case,
#: but never searched (a DVF that folds is wrong whatever the contours).
STRUCTURE_FLAGS: tuple[str, ...] = tuple(f for f in FLAGS if f != "dvf_folding")


#: Per-organ thresholds of `QaThresholds` held in a table (organ key -> value); the search keys
#: are ``<table>.<organ>``. An organ not in the table is never flagged on that figure.
_ORGAN_TABLES: tuple[str, ...] = (
    "min_image_ncc",
    "max_centroid_shift_mm",
    "min_path_dice_organ",
    "max_path_msd_mm",
    "max_image_fit_gain",
    "max_residual_shift_mm",
    "min_method_dice",
    "max_method_msd_mm",
)


#: The raw figures summarised per structure class and label in the report (threshold choice by
#: hand): `Samples` attribute -> what it is.
FIGURES: dict[str, str] = {
    "image_ncc": "NCC of the daily CT with the mapped planning CT around the organ",
    "image_ncc_loss": "NCC after the pre-alignment alone minus NCC after the mapping",
    "centroid_shift_mm": "centroid shift from the pre-aligned planning organ, mm",
    "volume_change": "daily / planning volume - 1",
    "jacobian_outliers": "fraction of the organ's voxels with det J outside its range",
    "path_dice": "Dice of the segmentation and registration paths (QA reference paths only)",
    "path_msd_mm": "mean surface distance of the two paths, mm (QA reference paths only)",
    "image_fit_gain": "how much better the contour fits the daily CT's edges when moved",
    "residual_shift_mm": "how far the mapped planning CT must move to match the daily CT, mm",
    "method_dice": "Dice of the iterative contour and the network's registration path of it",
    "method_msd_mm": "mean surface distance of those two, mm",
}


#: Seed of the synthetic fractions of real planning scans (training used 2002 and 2005).
REAL_SEED = 5005


#: The search keeps ``min_volume_cc`` at most this (cc): "nearly empty" means nearly vanished.
MAX_NEARLY_EMPTY_CC = 2.0


#: A structure class's own thresholds move only with at least this many good contours of it.
MIN_CLASS_GOOD = 5


#: Organ key -> the loosest volume-change range the search may choose (daily/planning - 1). A
#: prostate changes its volume by a few per cent between fractions, up to about 20 % over a course
#: (oedema early, shrinking under androgen deprivation); a range looser than that would no longer
#: say anything clinical, whatever a phantom's organs do (the analytic phantom's prostate changes
#: by up to -16 %).
CLINICAL_VOLUME_ENVELOPE: dict[str, tuple[float, float]] = {"prostate": (-0.2, 0.2)}


#: The search never sets a residual-shift limit under this, mm: the figure moves in 0.5 mm steps
#: and reads up to about 1 mm around organs whose mapping is right (phantom and real fractions), so
#: a tighter limit would fit the calibration cases' noise, not the mapping's errors.
MIN_RESIDUAL_LIMIT_MM = 1.5


# ============================================================================ cases and inputs
@dataclass(frozen=True)
class RealSource:
    """A real planning scan whose synthetic fractions become cases.

    Attributes:
        ct: planning CT folder.
        rtstruct: its RTSTRUCT.
    """

    ct: Path
    rtstruct: Path

    @property
    def key(self) -> str:
        """``real-<8 hex>``: a hash of the CT folder's path (never the patient's name or ID)."""
        digest = hashlib.sha1(str(Path(self.ct).resolve()).encode()).hexdigest()[:8]
        return f"real-{digest}"


@dataclass(frozen=True)
class CaseSpec:
    """One daily fraction to re-contour.

    Attributes:
        case_id: ``phantom<seed>-f<k>`` or ``real-<hash>-s<seed>-f<k>`` (no patient data).
        kind: ``phantom`` or ``real``.
        seed: the phantom's seed, or the seed of the real scan's synthetic fractions.
        fraction: fraction number.
        source: the real planning scan (None for a phantom).
        engine: the phantom fraction's deformation engine (`CALIBRATION_ENGINES`); a real scan's
            fractions always come from the organ engine.
        profile: draw profile of the organ engine (`jrs.synth.engine.PROFILES`).
    """

    case_id: str
    kind: str
    seed: int
    fraction: int
    source: RealSource | None = None
    engine: str = "analytic"
    profile: str = "v3"


@dataclass
class CaseInputs:
    """The files of one case on disk.

    Attributes:
        planning_ct: planning CT folder.
        planning_rtstruct: planning RTSTRUCT.
        daily_ct: daily CT folder.
        truth_rtstruct: the daily structures' ground truth.
        work: the case's scratch folder (derived inputs go there).
    """

    planning_ct: Path
    planning_rtstruct: Path
    daily_ct: Path
    truth_rtstruct: Path
    work: Path


def _suffix(engine: str, profile: str) -> str:
    """Case-id suffix of a non-default engine and profile (the default keeps older ids)."""
    return ("" if engine == "analytic" else f"-{engine}") + (
        "" if profile == "v3" else f"-{profile}"
    )


def check_case_family(engine: str, profile: str) -> None:
    """Refuse an engine or profile the calibration may not use.

    Raises:
        InvalidInput: for the held-out dome engine, an unknown engine, or a profile the engine
            does not have.
    """
    from jrs.synth.engine import PROFILES

    if engine == "dome":
        raise InvalidInput(
            "the dome deformation family is held out of calibration (it is the cross-generator "
            "test of research/notes/unseen-anatomy.md); calibrate on 'analytic' or 'organ' cases"
        )
    if engine not in CALIBRATION_ENGINES:
        raise InvalidInput(
            f"case engine {engine!r} unknown; use one of {', '.join(CALIBRATION_ENGINES)}"
        )
    if profile not in PROFILES or (profile != "v3" and engine != "organ"):
        raise InvalidInput(
            f"draw profile {profile!r} not available for the {engine!r} engine; profiles "
            f"({', '.join(PROFILES)}) belong to the 'organ' engine"
        )


def phantom_specs(
    seed: int, cases: int, fraction: int = 1, engine: str = "analytic", profile: str = "v3"
) -> list[CaseSpec]:
    """Phantom cases: seeds ``seed .. seed + cases - 1``, one fraction each.

    Raises:
        InvalidInput: for an engine or profile `check_case_family` refuses.
    """
    check_case_family(engine, profile)
    tail = _suffix(engine, profile)
    return [
        CaseSpec(f"phantom{s}-f{fraction}{tail}", "phantom", s, fraction, None, engine, profile)
        for s in range(seed, seed + cases)
    ]


def real_specs(
    source: RealSource, fractions: int, seed: int = REAL_SEED, profile: str = "v3"
) -> list[CaseSpec]:
    """Cases of fractions ``1 .. fractions`` of one real planning scan (organ engine).

    Raises:
        InvalidInput: for a profile the organ engine lacks.
    """
    check_case_family("organ", profile)
    tail = _suffix("analytic", profile)
    return [
        CaseSpec(f"{source.key}-s{seed}-f{k}{tail}", "real", seed, k, source, "organ", profile)
        for k in range(1, fractions + 1)
    ]


def _write_phantom(spec: CaseSpec, work: Path, matrix: int, slice_mm: float | None) -> CaseInputs:
    from jrs.synth import generate_fraction, generate_patient, write_fraction, write_patient

    patient = generate_patient(spec.seed, matrix=matrix, slice_thickness=slice_mm)
    write_patient(patient, work)
    folder = work / f"fraction_{spec.fraction}"
    made = generate_fraction(patient, spec.fraction, engine=spec.engine, profile=spec.profile)
    write_fraction(made, folder)
    return CaseInputs(
        work / "planning" / "ct",
        work / "planning" / "rtstruct.dcm",
        folder / "ct",
        folder / "rtstruct.dcm",
        work,
    )


def _write_real(
    source: RealSource, fractions: int, seed: int, work: Path, profile: str = "v3"
) -> Path:
    """Write the real scan's synthetic fractions once; returns the planning folder."""
    from jrs.synth.from_planning import write_from_planning

    done = work / "written.json"
    if done.is_file():
        written = json.loads(done.read_text())
        if int(written.get("fractions", 0)) >= fractions:
            return Path(written["folder"])
    folder = write_from_planning(
        source.ct, source.rtstruct, work, fractions=fractions, seed=seed, profile=profile
    )
    done.write_text(json.dumps({"folder": str(folder), "fractions": fractions}))
    return folder


# ============================================================================ perturbations
def smooth_random_field(
    shape_zyx: tuple[int, int, int], rms_mm: float, control_mm: float, rng: np.random.Generator
) -> npt.NDArray[np.float32]:
    """A smooth random displacement on a 1 mm grid (the network's grid).

    Random control-point displacements every ``control_mm`` are interpolated by cubic splines and
    scaled to an RMS length of ``rms_mm``.

    Args:
        shape_zyx: the grid, (D, H, W) voxels of 1 mm.
        rms_mm: root-mean-square length of the displacement, mm.
        control_mm: control-point spacing, mm (larger = smoother).
        rng: random generator.

    Returns:
        ``(3, D, H, W)`` float32 displacement, channels (x, y, z), mm.
    """
    from scipy.ndimage import zoom

    coarse = tuple(max(math.ceil(n / control_mm) + 2, 2) for n in shape_zyx)
    out = np.empty((3, *shape_zyx), np.float32)
    for c in range(3):
        knots = rng.normal(size=coarse)
        factors = [n / k for n, k in zip(shape_zyx, coarse, strict=True)]
        up = zoom(knots, factors, order=3, mode="nearest", grid_mode=True)
        out[c] = up[: shape_zyx[0], : shape_zyx[1], : shape_zyx[2]]
    rms = float(np.sqrt((out.astype(np.float64) ** 2).sum(axis=0).mean()))
    if rms > 0:
        out *= np.float32(rms_mm / rms)
    return out


@dataclass
class _Perturbed:
    """A prediction whose DVF is replaced; everything else is the base prediction's."""

    base: Any
    dvf: npt.NDArray[np.float32]

    @property
    def seg_probs(self) -> npt.NDArray[np.float32] | None:
        """The base prediction's class probabilities."""
        probs: npt.NDArray[np.float32] | None = self.base.seg_probs
        return probs

    def __getattr__(self, name: str) -> Any:
        # only called for attributes not found normally (seg_logits, labels, timings)
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)


class ReplayBackend:
    """A loaded network whose last prediction is replayed when the same inputs come again.

    Several populations of one case (the model as it is, its other path, its DVF perturbed) give
    the network the same inputs: it runs once. The last two distinct inputs are kept: the pair
    and the null-field correction's pass (the planning scan as both images,
    `jrs.inference.null_correction`). ``perturb`` (set per population) changes the prediction of the
    pair handed to the pipeline, never that of the null pass (a perturbation there would be
    subtracted again).

    Args:
        inner: the loaded network (`jrs.inference.backend.NetworkBackend`).
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.metadata: dict[str, Any] = inner.metadata
        self.perturb: Callable[[Any], Any] | None = None
        self.calls = 0
        self._kept: dict[str, Any] = {}  # input digest -> prediction, oldest first (at most 2)

    def __getattr__(self, name: str) -> Any:
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def predict(
        self,
        fixed: npt.NDArray[np.float32],
        moving: npt.NDArray[np.float32],
        moving_labels: npt.NDArray[np.float32],
    ) -> Any:
        """The inner network's prediction (computed once per input), perturbed when asked."""
        h = hashlib.sha1()
        for a in (fixed, moving, moving_labels):
            arr = np.ascontiguousarray(a)
            h.update(str((arr.shape, arr.dtype.str)).encode())
            h.update(arr.data)
        key = h.hexdigest()
        pred = self._kept.pop(key, None)
        if pred is None:
            while len(self._kept) >= 2:  # free the oldest first
                self._kept.pop(next(iter(self._kept)))
            pred = self.inner.predict(fixed, moving, moving_labels)
            self.calls += 1
        self._kept[key] = pred
        null_pass = fixed is moving or np.array_equal(fixed, moving)
        return self.perturb(pred) if self.perturb is not None and not null_pass else pred

    def forget(self) -> None:
        """Drop the kept predictions (their memory)."""
        self._kept.clear()


def _dvf_noise(seed_parts: Sequence[int]) -> tuple[Callable[[Any], Any], dict[str, float]]:
    rng = np.random.default_rng([*seed_parts, 77])
    rms = float(rng.uniform(2.0, 6.0))
    control = float(rng.choice([8.0, 16.0, 32.0]))
    noise_seed = int(rng.integers(2**62))

    def perturb(pred: Any) -> Any:
        base = np.asarray(pred.dvf, np.float32)
        noise = smooth_random_field(base.shape[1:], rms, control, np.random.default_rng(noise_seed))
        return _Perturbed(pred, base + noise)

    return perturb, {"rms_mm": round(rms, 3), "control_mm": control}


def shift_organs(
    planning_ct: Path,
    planning_rtstruct: Path,
    out: Path,
    shift_mm: npt.ArrayLike,
) -> dict[str, Any]:
    """Write a planning RTSTRUCT whose organ contours are all moved by one vector.

    The organs are the ROIs the default synonym table maps (`jrs.core.labels.SynonymTable`); the
    other ROIs are written unchanged.

    Args:
        planning_ct: planning CT folder.
        planning_rtstruct: planning RTSTRUCT.
        out: the RTSTRUCT to write.
        shift_mm: (3,) LPS shift, mm.

    Returns:
        ``{"shift_mm": [x, y, z], "rois": [shifted ROI names]}`` (the shift actually applied,
        rounded to whole voxels).
    """
    from jrs.core.labels import SynonymTable
    from jrs.io.rtstruct import masks_from_files
    from jrs.io.rtstruct_writer import write_rtstruct

    ss, series, masks = masks_from_files(planning_ct, planning_rtstruct)
    g = series.volume.geometry
    step_xyz = np.rint(
        (np.asarray(g.direction).T @ np.asarray(shift_mm, float)) / np.asarray(g.spacing)
    ).astype(int)
    organs = set(SynonymTable().resolve(list(masks)).used.values())
    arrays: dict[str, npt.NDArray[np.bool_]] = {}
    for name, vol in masks.items():
        arr = np.asarray(vol.array) > 0
        arrays[name] = _shifted(arr, step_xyz[::-1]) if name in organs else arr
    write_rtstruct(
        arrays,
        series,
        out,
        colors={r.name: r.color for r in ss.rois if r.color is not None},
        interpreted_types={r.name: r.interpreted_type for r in ss.rois if r.interpreted_type},
        structure_set_label="SHIFTED",
        series_description="planning organs shifted (QA calibration)",
    )
    applied = (np.asarray(g.direction) @ (step_xyz * np.asarray(g.spacing))).tolist()
    return {"shift_mm": [round(float(v), 2) for v in applied], "rois": sorted(organs)}


def _shifted(mask: npt.NDArray[np.bool_], step_zyx: npt.NDArray[np.int_]) -> npt.NDArray[np.bool_]:
    """A mask moved by whole voxels (what leaves the grid is lost)."""
    out = np.zeros_like(mask)
    src: list[slice] = []
    dst: list[slice] = []
    for n, s in zip(mask.shape, step_zyx, strict=True):
        s = int(s)
        if abs(s) >= n:
            return out
        src.append(slice(max(-s, 0), n - max(s, 0)))
        dst.append(slice(max(s, 0), n - max(-s, 0)))
    out[tuple(dst)] = mask[tuple(src)]
    return out


def cut_field_of_view(
    hu: npt.NDArray[np.float32], spacing_xy: tuple[float, float], fraction: float = 0.8
) -> tuple[npt.NDArray[np.float32], float]:
    """A CT whose reconstruction circle is smaller than the body (air outside it).

    Args:
        hu: ``(nz, ny, nx)`` CT, HU.
        spacing_xy: pixel spacing along x (columns) and y (rows), mm.
        fraction: circle radius as a fraction of the body's half width (HU > -500).

    Returns:
        (the cut CT, the circle's radius in mm; the circle is centred on the image).
    """
    out = np.array(hu, np.float32, copy=True)
    cols = np.nonzero((out > -500.0).any(axis=(0, 1)))[0]
    if cols.size == 0:
        return out, math.inf
    radius = float(fraction * 0.5 * (cols.max() - cols.min()) * spacing_xy[0])
    ny, nx = out.shape[1:]
    yy, xx = np.mgrid[0:ny, 0:nx]
    r = np.hypot((yy - (ny - 1) / 2.0) * spacing_xy[1], (xx - (nx - 1) / 2.0) * spacing_xy[0])
    out[:, r > radius] = -1024.0
    return out, radius


def _write_cut_daily(daily_ct: Path, out: Path) -> dict[str, Any]:
    """Write the daily CT with a cut-off field of view (same UIDs: the truth still applies)."""
    from jrs.io.ct import read_ct_series
    from jrs.io.ct_writer import write_ct_series

    series = read_ct_series(daily_ct)
    g = series.volume.geometry
    cut, radius = cut_field_of_view(series.volume.array, (float(g.spacing[0]), float(g.spacing[1])))
    write_ct_series(dataclasses.replace(series, volume=series.volume.with_array(cut)), out)
    return {"fov_radius_mm": round(radius, 1)}


# ============================================================================ truth
def label_contour(dsc: float, msd_mm: float | None, criteria: TruthCriteria | None = None) -> str:
    """The truth label of a contour: ``bad``, ``good`` or ``borderline``.

    Args:
        dsc: its DSC against the truth.
        msd_mm: its mean surface distance to the truth, mm (None: unknown).
        criteria: the label criteria (default ``LABEL_CRITERIA["v3"]``: bad DSC < 0.8 or
            MSD > 2 mm, good DSC >= 0.9).
    """
    c = criteria or LABEL_CRITERIA["v3"]
    if dsc < c.bad_below_dsc or (msd_mm is not None and msd_mm > c.bad_above_msd_mm):
        return "bad"
    if dsc >= c.good_min_dsc:
        return "good"
    return "borderline"


def _truth_masks(daily_ct: Path, truth: Path) -> tuple[Any, dict[str, Any], set[str]]:
    from jrs.core.labels import is_external_roi
    from jrs.io.rtstruct import masks_from_files

    ss, series, masks = masks_from_files(daily_ct, truth)
    external = {r.name for r in ss.rois if is_external_roi(r.name, r.interpreted_type)}
    return series.volume.geometry, masks, external


def score_against_truth(
    daily_ct: Path,
    written: Path,
    truth: tuple[Any, Mapping[str, Any], set[str]],
) -> dict[str, dict[str, Any]]:
    """DSC, MSD and HD95 of every re-contoured ROI against the truth, on the daily grid.

    Args:
        daily_ct: the daily CT folder.
        written: the re-contoured RTSTRUCT.
        truth: (daily geometry, ROI name -> truth mask `Volume`, names of outline ROIs).

    Returns:
        ROI name -> ``{"dsc", "msd_mm", "hd95_mm", "label"}``, for the ROIs in both files, the
        patient's outline and ROIs empty in the truth left out.
    """
    from jrs.core.metrics import dice, surface_distances
    from jrs.io.rtstruct import masks_from_files

    geometry, ref, external = truth
    _, _, got = masks_from_files(daily_ct, written)
    out: dict[str, dict[str, Any]] = {}
    for name, ref_mask in ref.items():
        if name in external or name not in got:
            continue
        r = np.asarray(ref_mask.array) > 0
        if not r.any():
            continue
        a = np.asarray(got[name].array) > 0
        dsc = float(dice(a, r))
        sd = surface_distances(a, r, geometry)
        msd = None if math.isnan(sd.msd) else round(sd.msd, 3)
        out[name] = {
            "dsc": round(dsc, 4),
            "msd_mm": msd,
            "hd95_mm": None if math.isnan(sd.hd95) else round(sd.hd95, 3),
            "label": label_contour(dsc, msd),
            "truth_cc": round(float(r.sum()) * float(np.prod(geometry.spacing)) / 1000.0, 3),
        }
    return out
