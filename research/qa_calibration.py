"""Calibrate the QA flags against ground truth (``python -m research qa``).

The QA flags of `jrs.qa.figures` are only worth a reviewer's attention when they fire on bad
contours and stay quiet on good ones. This module measures both, and picks the thresholds from the
measurement:

1. **Cases.** Held-out phantom fractions (`jrs.synth.generate_patient` / `generate_fraction`,
   seeds never used in training: 3000 and up by default) and synthetic fractions of real planning
   scans (`jrs.synth.from_planning.write_from_planning`, with a seed of its own), each with its
   ground-truth RTSTRUCT on the daily grid.
2. **Populations.** Each case is re-contoured by `jrs.pipeline.run.recontour` in several ways
   (`POPULATIONS`): the model as it is, the model's other output path, the iterative baseline,
   and deliberately degraded runs (a DVF with a smooth random error added, planning organ contours
   shifted by 5-8 mm, a daily CT whose field of view cuts the body off), so that there are bad
   contours to calibrate on. The network's prediction is computed once per input and replayed
   for the populations that share that input.
3. **Truth.** Every re-contoured structure but the patient's outline is scored against the truth
   (DSC, MSD, HD95 on the daily grid, `jrs.core.metrics`) and labelled ``good`` (DSC >= 0.9, and not
   bad), ``bad`` (DSC < 0.8 or MSD > 2 mm) or ``borderline`` (neither; not counted).
4. **Rates.** Each flag, re-applied to the raw figures kept in ``qa.json``
   (`jrs.qa.figures.flag_structure`
   and `jrs.qa.figures.flag_dvf`, never a copy of their logic), gives a recall on bad contours and a
   false-flag rate on good ones. ``dvf_folding`` (a flag of the whole DVF, a deliverable of its
   own) is measured on every structure of its case, but it is not part of "any flag" and its
   threshold is not searched: a DVF that folds is wrong whatever the contours.
5. **Thresholds.** `choose_thresholds` searches the thresholds of `jrs.qa.figures.QaThresholds` that
   the
   figures allow re-applying (every one but the Jacobian ranges; the image flags' per-organ NCC
   minima and centroid limits and their NCC-loss limit included): starting from the current
   values, it loosens flags until the false-flag rate of "any flag" is at most 0.1 over all good
   contours and over those of each structure class, tightens them while that catches more bad
   contours within those limits, until the recall reaches 0.9, and then loosens every threshold
   whose loosening removes false flags without losing a bad contour. An organ's own volume range
   moves only when enough good contours of that organ were measured, and never beyond what the
   organ clinically does (`CLINICAL_VOLUME_ENVELOPE`). When no thresholds reach
   both targets the report says so, with the bad contours no flag catches. The report also gives
   the distribution of each raw figure (`figure_summary`) per organ, good and bad apart.

Per case and population the harness keeps one JSON record under ``REPORT/cases/`` (raw figures,
truth metrics, labels), so a run that stops resumes where it stopped, and a new threshold choice
needs no re-run; the report is ``REPORT/qa_calibration.json`` and ``REPORT/qa_calibration.md``.
No patient name or ID is logged or written: real planning scans are named by a hash of their path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from jrs.core.errors import InvalidInput, JrsError
from jrs.core.labels import SynonymTable
from jrs.qa.family import CODE as SAME_ORGAN
from jrs.qa.family import SPREAD_FLAGS, spread_mask
from jrs.qa.figures import (
    PROPAGATED,
    TARGETS,
    QaThresholds,
    StructureQa,
    flag_dvf,
    flag_structure,
    roi_class,
)

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
#: Values of a threshold that never fires.
_OFF_LOW, _OFF_HIGH = -1.0, 100.0
#: ... for the image NCC (never below -1), its loss (never above 2) and the centroid shift (mm).
_OFF_NCC, _OFF_NCC_LOSS, _OFF_SHIFT_MM = -1.0, 2.0, 1000.0


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


# ============================================================================ running
@dataclass
class RunSettings:
    """How `run_qa_calibration` re-contours.

    Attributes:
        model_dir: model version folder (None: the newest bundled one).
        device: ``auto``, ``cpu`` or ``cuda``.
        engine: inference engine (`jrs.pipeline.options.RecontourOptions.engine`).
        precision: inference precision.
        matrix: phantom in-plane matrix.
        slice_mm: phantom slice thickness (None: each seed's draw).
        keep_work: keep the DICOM inputs and outputs of each case (else removed once its
            populations are done).
    """

    model_dir: Path | None = None
    device: str = "auto"
    engine: str = "auto"
    precision: str = "auto"
    matrix: int = 512
    slice_mm: float | None = None
    keep_work: bool = False


def record_path(report_dir: Path, case_id: str, population: str) -> Path:
    """Where the record of one case and population is kept."""
    return Path(report_dir) / "cases" / case_id / f"{population}.json"


def _load_record(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if data.get("record_version") == RECORD_VERSION else None


def _seed_parts(spec: CaseSpec) -> list[int]:
    return [spec.seed, spec.fraction, int(hashlib.sha1(spec.case_id.encode()).hexdigest()[:8], 16)]


def other_path(metadata: Mapping[str, Any]) -> dict[str, str]:
    """Per organ, the output path a model does not choose (the ``other_path`` population).

    ``segmentation`` <-> ``registration``; for an organ the model fuses, the path its fusion
    weights trust less (the registration path on a tie), i.e. the worse of the two alone.

    Args:
        metadata: The model's ``metadata.json`` content (``path_choice``, ``fusion``).

    Returns:
        Organ key -> ``segmentation`` or ``registration``.
    """
    from jrs.core.labels import LABELS
    from jrs.inference.fusion import FusionSpec

    choice = metadata.get("path_choice") or {}
    spec = FusionSpec.from_metadata(metadata)
    out = {}
    for organ in (v for k, v in LABELS.items() if k > 0):
        own = choice.get(organ, "segmentation")
        if own == "fusion":
            w_seg, w_reg = spec.weights_for(organ)
            out[organ] = "segmentation" if w_seg < w_reg else "registration"
        else:
            out[organ] = "registration" if own == "segmentation" else "segmentation"
    return out


def run_population(
    spec: CaseSpec,
    inputs: CaseInputs,
    population: str,
    settings: RunSettings,
    backend: ReplayBackend | None,
    truth: tuple[Any, Mapping[str, Any], set[str]],
) -> dict[str, Any]:
    """Re-contour one case in one population and score it (the record kept on disk).

    Args:
        spec: the case.
        inputs: its files.
        population: a key of `POPULATIONS`.
        settings: run settings.
        backend: the loaded network (None for the iterative population).
        truth: `_truth_masks` of the case.

    Returns:
        The record: case and population, the run's model and DVF figures, and per structure the
        raw QA figures (`jrs.qa.figures.StructureQa` fields), DSC, MSD, HD95 and label; a refused
        run (a `jrs.core.errors.JrsError` such as a failed plausibility check) has ``status:
        refused``.
    """
    from jrs.pipeline.options import RecontourOptions
    from jrs.pipeline.run import recontour

    if population not in POPULATIONS:
        raise InvalidInput(f"population {population!r} unknown; use one of {sorted(POPULATIONS)}")
    method = "iterative" if population == "iterative" else "network"
    opts = RecontourOptions(
        method=method,  # type: ignore[arg-type]
        model_dir=settings.model_dir,
        device=settings.device,
        engine=settings.engine,
        precision=settings.precision,
    )
    planning_rs, daily_ct = inputs.planning_rtstruct, inputs.daily_ct
    perturbation: dict[str, Any] = {}
    perturb = None
    if population == "other_path" and backend is not None:
        opts.path_choice = other_path(backend.metadata)  # type: ignore[assignment]
        perturbation["path_choice"] = dict(opts.path_choice)
    elif population == "dvf_noise":
        perturb, perturbation = _dvf_noise(_seed_parts(spec))
    elif population == "shifted_planning":
        rng = np.random.default_rng([*_seed_parts(spec), 55])
        direction = rng.normal(size=3)
        length = float(rng.uniform(5.0, 8.0))
        planning_rs = inputs.work / "shifted_rtstruct.dcm"
        shift = direction / np.linalg.norm(direction) * length
        perturbation = shift_organs(
            inputs.planning_ct, inputs.planning_rtstruct, planning_rs, shift
        )
    elif population == "cutoff_fov":
        daily_ct = inputs.work / "daily_cut_fov"
        perturbation = _write_cut_daily(inputs.daily_ct, daily_ct)
    out = inputs.work / f"out_{population}"
    record: dict[str, Any] = {
        "record_version": RECORD_VERSION,
        "case_id": spec.case_id,
        "kind": spec.kind,
        "population": population,
        "method": method,
        "perturbation": perturbation,
    }
    if backend is not None:
        backend.perturb = perturb
    t0 = time.perf_counter()
    try:
        result = recontour(
            inputs.planning_ct,
            planning_rs,
            daily_ct,
            out,
            opts,
            backend=backend if method == "network" else None,
        )
    except JrsError as exc:  # a refusal: caught before any contour is made
        record.update(status="refused", message=str(exc), seconds=round(time.perf_counter() - t0))
        return record
    finally:
        if backend is not None:
            backend.perturb = None
    qa = result.qa_data
    scores = score_against_truth(inputs.daily_ct, result.rtstruct, truth)
    structures = []
    for s in qa["structures"]:
        if s["name"] not in scores:
            continue
        figures = {k: s.get(k) for k in _QA_FIELDS if k in s}
        structures.append({**figures, **scores[s["name"]]})
    record.update(
        status="done",
        model={k: qa["model"].get(k) for k in ("name", "version", "sha256", "engine", "precision")},
        dvf={k: qa["dvf"].get(k) for k in ("min", "folding_fraction", "log_std")},
        dvf_flags=list(qa["dvf"].get("flags", [])),
        plausibility=list(qa.get("plausibility", [])),
        structures=structures,
        seconds=round(time.perf_counter() - t0, 1),
    )
    return record


_QA_FIELDS = tuple(f.name for f in dataclasses.fields(StructureQa))


def run_qa_calibration(
    report_dir: Path,
    *,
    cases: int = 5,
    seed: int = 3000,
    real: Sequence[RealSource] = (),
    fractions: int = 3,
    real_seed: int = REAL_SEED,
    populations: Sequence[str] = DEFAULT_POPULATIONS,
    settings: RunSettings | None = None,
    backend: Any = None,
    progress: Callable[[str], None] | None = None,
    held_out: Path | None = None,
    engine: str = "analytic",
    profile: str = "v3",
    labels: str = "v3",
) -> dict[str, Any]:
    """Re-contour held-out cases in every population, score them, then calibrate the flags.

    Records already under ``REPORT/cases`` are reused (resumable): re-running the command with
    every record present only recomputes the report.

    Args:
        report_dir: the report folder (records, scratch space, report files).
        cases: phantom cases (seeds ``seed .. seed + cases - 1``, fraction 1); 0 for none. With
            0 and no ``real`` scan, nothing runs and the report covers every record in the
            folder (several runs' cases together).
        seed: the first phantom seed (3000 and up: never used in training).
        real: real planning scans; one whose CT folder is absent is skipped (and reported).
        fractions: synthetic fractions per real planning scan.
        real_seed: seed of those fractions.
        populations: keys of `POPULATIONS`.
        settings: how to re-contour.
        backend: an already loaded network (tests pass a fake one); loaded from the settings
            when a network population needs it.
        progress: called with one line per run.
        held_out: a report folder of other cases (its ``cases/`` records, made by another run):
            the thresholds chosen here are tested on them (the report's ``held_out``).
        engine: the phantom cases' deformation engine (`CALIBRATION_ENGINES`; never the
            held-out dome family).
        profile: the organ engine's draw profile, for organ phantoms and the real scans'
            fractions (`jrs.synth.engine.PROFILES`).
        labels: the truth criteria (`LABEL_CRITERIA`).

    Returns:
        The report (`calibrate`), also written as ``qa_calibration.json`` and ``.md``.

    Raises:
        InvalidInput: an unknown population, a held-out folder without records, or one that
            shares a case with this folder.
    """
    from jrs.pipeline.methods import load_backend
    from jrs.pipeline.options import RecontourOptions

    report_dir = Path(report_dir)
    held: list[dict[str, Any]] = []
    if held_out is not None:
        held = load_records(Path(held_out), populations=populations)
        if not held:
            raise InvalidInput(
                f"held-out folder {held_out}: no records under cases/ (make them with "
                "'python -m research qa --report' on other cases first)"
            )
    settings = settings or RunSettings()
    say = progress or (lambda _m: None)
    unknown = [p for p in populations if p not in POPULATIONS]
    if unknown:
        raise InvalidInput(f"population(s) {unknown} unknown; use some of {', '.join(POPULATIONS)}")
    if labels not in LABEL_CRITERIA:
        raise InvalidInput(f"labels {labels!r} unknown; use one of {', '.join(LABEL_CRITERIA)}")
    check_case_family("organ", profile)  # (the real scans' fractions)
    phantom_profile = profile if engine == "organ" else "v3"
    specs = phantom_specs(seed, cases, engine=engine, profile=phantom_profile) if cases > 0 else []
    skipped: list[str] = []
    for src in real:
        if Path(src.ct).is_dir() and Path(src.rtstruct).is_file():
            specs += real_specs(src, fractions, real_seed, profile)
        else:
            skipped.append(f"{src.key}: planning CT or RTSTRUCT absent, skipped")
            log.warning("real planning scan %s absent: skipped", src.key)
    replay: ReplayBackend | None = ReplayBackend(backend) if backend is not None else None
    errors: list[str] = []
    for i, spec in enumerate(specs, 1):
        todo = [
            p for p in populations if _load_record(record_path(report_dir, spec.case_id, p)) is None
        ]
        if not todo:
            continue
        if replay is None and any(p in _NETWORK_POPULATIONS for p in todo):
            replay = ReplayBackend(
                load_backend(
                    RecontourOptions(
                        model_dir=settings.model_dir,
                        device=settings.device,
                        engine=settings.engine,
                        precision=settings.precision,
                    )
                )
            )
        try:
            inputs = _case_inputs(spec, report_dir, settings, fractions, real_seed)
            truth = _truth_masks(inputs.daily_ct, inputs.truth_rtstruct)
        except Exception as exc:  # a case that cannot be made never stops the others
            msg = f"{spec.case_id}: inputs: {type(exc).__name__}: {exc}"
            log.exception("QA calibration case failed: %s", msg)
            errors.append(msg)
            continue
        failed = False
        for pop in todo:
            try:
                rec = run_population(spec, inputs, pop, settings, replay, truth)
            except Exception as exc:  # one failing run never stops the others
                msg = f"{spec.case_id}/{pop}: {type(exc).__name__}: {exc}"
                log.exception("QA calibration run failed: %s", msg)
                errors.append(msg)
                failed = True
                continue
            path = record_path(report_dir, spec.case_id, pop)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(rec, indent=1))
            what = f", {len(rec['structures'])} structures" if rec["status"] == "done" else ""
            say(
                f"case {i}/{len(specs)} {spec.case_id} {pop}: {rec['status']}{what} "
                f"({rec.get('seconds', 0)} s)"
            )
        if replay is not None:
            replay.forget()
        if not settings.keep_work and not failed:
            shutil.rmtree(inputs.work, ignore_errors=True)
    if not settings.keep_work and _all_done(specs, populations, report_dir):
        # only this run's folders: another run may share the report folder (and its work/)
        for spec in specs:
            shutil.rmtree(report_dir / "work" / spec.case_id, ignore_errors=True)
        for source in real:
            shutil.rmtree(
                report_dir / "work" / f"{source.key}-s{real_seed}{_suffix('analytic', profile)}",
                ignore_errors=True,
            )
        with contextlib.suppress(OSError):
            (report_dir / "work").rmdir()  # when no other run left anything there
    # no case asked (``--cases 0`` without a planning scan): every record in the folder, e.g.
    # the cases of several runs that shared it
    everything = cases == 0 and not real
    records = load_records(
        report_dir, None if everything else [s.case_id for s in specs], populations
    )
    report = calibrate(records, held_out=held, criteria=LABEL_CRITERIA[labels])
    report["skipped_sources"] = skipped
    report["errors"] = errors
    report["command"] = {
        "cases": cases,
        "seed": seed,
        "real_sources": [s.key for s in real],
        "fractions": fractions,
        "real_seed": real_seed,
        "populations": list(populations),
        "held_out": None if held_out is None else str(held_out),
        "matrix": settings.matrix,
        "slice_mm": settings.slice_mm,
        "engine": engine,
        "profile": profile,
        "labels": labels,
    }
    write_report(report, report_dir)
    return report


def _all_done(specs: Sequence[CaseSpec], populations: Sequence[str], root: Path) -> bool:
    """Whether every case has a record for every population."""
    return all(record_path(root, s.case_id, p).is_file() for s in specs for p in populations)


def _case_inputs(
    spec: CaseSpec, root: Path, settings: RunSettings, fractions: int, real_seed: int
) -> CaseInputs:
    work = root / "work" / spec.case_id
    work.mkdir(parents=True, exist_ok=True)
    if spec.kind == "phantom":
        marker = work / "inputs.json"
        if not marker.is_file():
            inputs = _write_phantom(spec, work, settings.matrix, settings.slice_mm)
            marker.write_text("{}")
            return inputs
        folder = work / f"fraction_{spec.fraction}"
        return CaseInputs(
            work / "planning" / "ct",
            work / "planning" / "rtstruct.dcm",
            folder / "ct",
            folder / "rtstruct.dcm",
            work,
        )
    if spec.source is None:  # pragma: no cover - real_specs always sets it
        raise InvalidInput(f"case {spec.case_id} has no planning scan")
    planning = _write_real(
        spec.source,
        fractions,
        real_seed,
        root / "work" / f"{spec.source.key}-s{real_seed}{_suffix('analytic', spec.profile)}",
        spec.profile,
    )
    folder = planning / f"fraction_{spec.fraction}"
    return CaseInputs(
        planning / "planning" / "ct",
        planning / "planning" / "rtstruct.dcm",
        folder / "ct",
        folder / "rtstruct.dcm",
        work,
    )


def load_records(
    report_dir: Path,
    case_ids: Iterable[str] | None = None,
    populations: Iterable[str] | None = None,
) -> list[dict[str, Any]]:
    """The records under ``REPORT/cases`` (all of them, or those of some cases / populations)."""
    root = Path(report_dir) / "cases"
    wanted = None if case_ids is None else set(case_ids)
    pops = None if populations is None else set(populations)
    out = []
    for path in sorted(root.glob("*/*.json")):
        if wanted is not None and path.parent.name not in wanted:
            continue
        if pops is not None and path.stem not in pops:
            continue
        rec = _load_record(path)
        if rec is not None:
            out.append(rec)
    return out


# ============================================================================ samples
@dataclass
class Samples:
    """Scored structures as arrays (one entry per structure of a finished run).

    Attributes:
        items: the per-structure dicts (record fields + ``case_id``, ``population``,
            ``dvf_folding``).
        label: ``good``, ``bad`` or ``borderline``.
        organ: organ key, ``""`` for a propagated ROI.
        population: the population of each.
        planning_cc, daily_cc, volume_change, path_dice, jacobian_outliers, dvf_folding: the raw
            figures (NaN where absent).
        paths_validated, touches_box: flags' conditions.
        image_ncc: NCC of the daily CT with the mapped planning CT around the organ (NaN where
            absent: propagated ROIs, version-1 records).
        image_ncc_loss: ``image_ncc_prealigned - image_ncc`` (NaN where either is absent).
        centroid_shift_mm: the organ's centroid shift from the pre-aligned planning organ, mm.
        path_msd_mm: mean surface distance of the two paths, mm (NaN where absent).
        image_fit_gain: the contour's fit gain on the daily CT's edges (`jrs.qa.contour_fit`).
        target: a propagated target volume (`jrs.qa.figures.roi_class` is `jrs.qa.figures.TARGETS`).
        residual_shift_mm: the mapping's residual shift around the contour, mm
            (`jrs.qa.residual_shift`; NaN where absent).
    """

    items: list[dict[str, Any]]
    label: npt.NDArray[np.str_]
    organ: npt.NDArray[np.str_]
    population: npt.NDArray[np.str_]
    planning_cc: npt.NDArray[np.float64]
    daily_cc: npt.NDArray[np.float64]
    volume_change: npt.NDArray[np.float64]
    path_dice: npt.NDArray[np.float64]
    jacobian_outliers: npt.NDArray[np.float64]
    dvf_folding: npt.NDArray[np.float64]
    paths_validated: npt.NDArray[np.bool_]
    touches_box: npt.NDArray[np.bool_]
    image_ncc: npt.NDArray[np.float64]
    image_ncc_loss: npt.NDArray[np.float64]
    centroid_shift_mm: npt.NDArray[np.float64]
    path_msd_mm: npt.NDArray[np.float64]
    image_fit_gain: npt.NDArray[np.float64]
    target: npt.NDArray[np.bool_]
    residual_shift_mm: npt.NDArray[np.float64]
    method_dice: npt.NDArray[np.float64]
    method_msd_mm: npt.NDArray[np.float64]
    family_group: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return len(self.items)

    @property
    def bad(self) -> npt.NDArray[np.bool_]:
        """Bad contours."""
        return self.label == "bad"

    @property
    def good(self) -> npt.NDArray[np.bool_]:
        """Good contours."""
        return self.label == "good"


def _num(v: Any) -> float:
    return math.nan if v is None else float(v)


def _label(item: Mapping[str, Any]) -> str:
    """The item's truth label; a good contour of a `WRONG_DVF_POPULATIONS` run: `GOOD_WRONG_DVF`."""
    label = str(item["label"])
    if label == "good" and item.get("population") in WRONG_DVF_POPULATIONS:
        return GOOD_WRONG_DVF
    return label


def samples_from_records(
    records: Iterable[Mapping[str, Any]], criteria: TruthCriteria | None = None
) -> Samples:
    """Flatten finished records into `Samples`.

    Args:
        records: per case and population (`run_population`).
        criteria: label every contour again from its DSC and MSD with these criteria (None:
            the labels the records were written with).
    """
    items: list[dict[str, Any]] = []
    for rec in records:
        if rec.get("status") != "done":
            continue
        fold = (rec.get("dvf") or {}).get("folding_fraction")
        for s in rec.get("structures", []):
            item = {
                **s,
                "case_id": rec["case_id"],
                "population": rec["population"],
                "dvf_folding": fold,
            }
            if criteria is not None and s.get("dsc") is not None:
                item["label"] = label_contour(float(s["dsc"]), s.get("msd_mm"), criteria)
            items.append(item)

    def col(fn: Callable[[dict[str, Any]], Any], dtype: Any) -> Any:
        return np.array([fn(s) for s in items], dtype=dtype)

    def planning(s: dict[str, Any]) -> float:
        return _num(s.get("planning_cc"))

    def change(s: dict[str, Any]) -> float:
        p, d = _num(s.get("planning_cc")), _num(s.get("daily_cc"))
        return d / p - 1.0 if p > 0 else math.nan

    def ncc_loss(s: dict[str, Any]) -> float:
        # the same arithmetic as jrs.qa.figures.flag_structure: prealigned - final
        pre, ncc = s.get("image_ncc_prealigned"), s.get("image_ncc")
        return math.nan if pre is None or ncc is None else float(pre) - float(ncc)

    def is_target(s: dict[str, Any]) -> bool:
        # as jrs.qa.figures.flag_structure (records before the field: by name)
        cls = roi_class(s.get("organ"), str(s.get("name", "")), bool(s.get("target_volume")))
        return cls == TARGETS

    def fit_gain(s: dict[str, Any]) -> float:
        # a target volume's fit to the edges is not judged
        return math.nan if is_target(s) else _num(s.get("image_fit_gain"))

    return Samples(
        items=items,
        label=col(_label, np.str_),
        organ=col(lambda s: s.get("organ") or "", np.str_),
        population=col(lambda s: s["population"], np.str_),
        planning_cc=col(planning, np.float64),
        daily_cc=col(lambda s: _num(s.get("daily_cc")), np.float64),
        volume_change=col(change, np.float64),
        path_dice=col(lambda s: _num(s.get("path_dice")), np.float64),
        jacobian_outliers=col(
            lambda s: _num((s.get("jacobian") or {}).get("outlier_fraction")), np.float64
        ),
        dvf_folding=col(lambda s: _num(s.get("dvf_folding")), np.float64),
        paths_validated=col(lambda s: bool(s.get("paths_validated", True)), bool),
        touches_box=col(lambda s: bool(s.get("touches_crop_border", False)), bool),
        image_ncc=col(lambda s: _num(s.get("image_ncc")), np.float64),
        image_ncc_loss=col(ncc_loss, np.float64),
        centroid_shift_mm=col(lambda s: _num(s.get("centroid_shift_mm")), np.float64),
        path_msd_mm=col(lambda s: _num(s.get("path_msd_mm")), np.float64),
        image_fit_gain=col(fit_gain, np.float64),
        target=col(is_target, bool),
        residual_shift_mm=col(lambda s: _num(s.get("residual_shift_mm")), np.float64),
        method_dice=col(lambda s: _num(s.get("method_dice")), np.float64),
        method_msd_mm=col(lambda s: _num(s.get("method_msd_mm")), np.float64),
        family_group=_family_groups(items),
    )


def _family_groups(items: Sequence[Mapping[str, Any]]) -> npt.NDArray[np.int64]:
    """(n,) one group id per organ of one run with two contours or more (`jrs.qa.family`).

    The organ of a contour is its ``organ_family``; records without the field (before it
    existed) get it from the default synonym table's decision on the run's ROI names.
    """
    runs: dict[tuple[str, str], list[int]] = {}
    for i, it in enumerate(items):
        runs.setdefault((str(it["case_id"]), str(it["population"])), []).append(i)
    table = SynonymTable()
    family: dict[int, str] = {}
    for idx in runs.values():
        if any("organ_family" in items[i] for i in idx):
            for i in idx:
                if items[i].get("organ_family"):
                    family[i] = str(items[i]["organ_family"])
            continue
        decisions = table.resolve([str(items[i]["name"]) for i in idx]).decisions
        for i, d in zip(idx, decisions, strict=True):
            if d.organ:
                family[i] = d.organ
    keys: dict[tuple[str, str, str], list[int]] = {}
    for i, organ in family.items():
        it = items[i]
        keys.setdefault((str(it["case_id"]), str(it["population"]), organ), []).append(i)
    out = np.full(len(items), -1, np.int64)
    for gid, members in enumerate(m for m in keys.values() if len(m) > 1):
        out[members] = gid
    return out


def flags_of(item: Mapping[str, Any], thresholds: QaThresholds) -> list[str]:
    """The flag codes of one scored structure under some thresholds (`jrs.qa.figures` decides).

    ``dvf_folding`` is added when `jrs.qa.figures.flag_dvf` flags the DVF of the structure's case.
    """
    qa = StructureQa(**{k: item[k] for k in _QA_FIELDS if k in item})
    qa.flags, qa.flag_codes = [], []
    codes = list(flag_structure(qa, thresholds).flag_codes)
    fold = item.get("dvf_folding")
    if fold is not None and flag_dvf({"folding_fraction": float(fold)}, thresholds):
        codes.append("dvf_folding")
    return codes


def fired_matrix(samples: Samples, thresholds: QaThresholds) -> dict[str, npt.NDArray[np.bool_]]:
    """Flag code -> which samples it fires on, by `flags_of` (exact, one call per sample).

    ``same_organ_flagged`` is `jrs.qa.family`'s rule over each run's contours of one organ.
    """
    fired = {code: np.zeros(len(samples), bool) for code in FLAGS}
    for i, item in enumerate(samples.items):
        for code in flags_of(item, thresholds):
            if code in fired:
                fired[code][i] = True
    source = np.zeros(len(samples), bool)
    for code in SPREAD_FLAGS:
        source |= fired[code]
    fired[SAME_ORGAN] = spread_mask(source, samples.family_group)
    return fired


def rates(
    fired: npt.NDArray[np.bool_], samples: Samples, where: npt.NDArray[np.bool_] | None = None
) -> dict[str, Any]:
    """Recall on bad contours and false-flag rate on good ones.

    Args:
        fired: which samples are flagged.
        samples: the samples (their labels).
        where: restrict to these samples (a population, an organ).

    Returns:
        ``{"recall", "bad_flagged", "bad", "false_flag_rate", "good_flagged", "good"}``; a rate
        is None when its denominator is 0.
    """
    sel = np.ones(len(samples), bool) if where is None else where
    bad, good = samples.bad & sel, samples.good & sel
    nb, ng = int(bad.sum()), int(good.sum())
    fb, fg = int((fired & bad).sum()), int((fired & good).sum())
    return {
        "recall": round(fb / nb, 4) if nb else None,
        "bad_flagged": fb,
        "bad": nb,
        "false_flag_rate": round(fg / ng, 4) if ng else None,
        "good_flagged": fg,
        "good": ng,
    }


def wrong_dvf_rates(fired: npt.NDArray[np.bool_], samples: Samples) -> dict[str, Any]:
    """How the flags treat good contours in a DVF wrong on purpose (`GOOD_WRONG_DVF`).

    Also the rates if they counted as good ones: the letter of the false-flag target, every
    contour with DSC >= 0.9.

    Args:
        fired: which samples are flagged.
        samples: the samples (their labels).

    Returns:
        ``{"flagged", "count", "strict"}``: ``strict`` as `rates`, good contours and these
        together.
    """
    wrong = samples.label == GOOD_WRONG_DVF
    strict = dataclasses.replace(samples, label=np.where(wrong, "good", samples.label))
    return {
        "flagged": int((fired & wrong).sum()),
        "count": int(wrong.sum()),
        "strict": rates(fired, strict),
    }


# ============================================================================ threshold choice
@dataclass
class _Param:
    """One threshold of `QaThresholds` the search may move.

    Attributes:
        key: ``min_path_dice``, ``volume_change_range.<organ>.low`` ...
        flag: the flag code it belongs to.
        candidates: values, loosest (fires least) first.
        fires: value -> which samples it fires on.
    """

    key: str
    flag: str
    candidates: list[float]
    fires: Callable[[float], npt.NDArray[np.bool_]]


def _cuts(values: npt.NDArray[np.float64], extra: Iterable[float]) -> list[float]:
    """Midpoints between the distinct finite values, and the values of ``extra``."""
    v = np.unique(values[np.isfinite(values)])
    mids = [round(float(x), 6) for x in (v[1:] + v[:-1]) / 2.0] if v.size > 1 else []
    return sorted({*mids, *(float(x) for x in extra)})


def _get(t: QaThresholds, key: str) -> float:
    if key.startswith("volume_change_range."):
        _, organ, side = key.split(".")
        rng = (
            t.default_volume_change_range
            if organ == "*"
            else t.volume_change_range.get(organ, t.default_volume_change_range)
        )
        return float(rng[0] if side == "low" else rng[1])
    table, _, organ = key.partition(".")
    if table in _ORGAN_TABLES:
        return float(getattr(t, table)[organ])
    value = getattr(t, key)
    return float(value)


def thresholds_with(t: QaThresholds, values: Mapping[str, float]) -> QaThresholds:
    """A copy of ``t`` with some search parameters (`_Param.key`) set."""
    ranges = dict(t.volume_change_range)
    default = t.default_volume_change_range
    plain: dict[str, Any] = {}
    tables: dict[str, Any] = {k: dict(getattr(t, k)) for k in _ORGAN_TABLES}
    for key, value in values.items():
        table, _, organ = key.partition(".")
        if table in tables:
            tables[table][organ] = float(value)
        elif key.startswith("volume_change_range."):
            _, organ, side = key.split(".")
            old = default if organ == "*" else ranges.get(organ, default)
            new = (float(value), old[1]) if side == "low" else (old[0], float(value))
            if organ == "*":
                default = new
            else:
                ranges[organ] = new
        elif key == "flag_touching_box":
            plain[key] = bool(value >= 0.5)
        else:
            plain[key] = float(value)
    return dataclasses.replace(
        t, volume_change_range=ranges, default_volume_change_range=default, **tables, **plain
    )


def _below(x: npt.NDArray[np.float64]) -> Callable[[float], npt.NDArray[np.bool_]]:
    """Threshold v -> where x < v (NaN never)."""
    filled = np.nan_to_num(x, nan=np.inf)
    return lambda v: filled < v


def _above(x: npt.NDArray[np.float64]) -> Callable[[float], npt.NDArray[np.bool_]]:
    """Threshold v -> where x > v (NaN never)."""
    filled = np.nan_to_num(x, nan=-np.inf)
    return lambda v: filled > v


def _organ_classes(
    s: Samples, table: Mapping[str, float], min_class_good: int
) -> list[tuple[str, npt.NDArray[np.bool_]]]:
    """(organ, which samples) of the organs of a per-organ threshold table that were measured.

    An organ with fewer than ``min_class_good`` good contours is left out (its threshold holds).
    """
    out = []
    for organ in sorted(table):
        if organ == PROPAGATED:
            member = (s.organ == "") & ~s.target
        elif organ == TARGETS:
            member = (s.organ == "") & s.target
        else:
            member = s.organ == organ
        if member.any() and int((member & s.good).sum()) >= min_class_good:
            out.append((organ, member))
    return out


def search_parameters(
    samples: Samples,
    prior: QaThresholds,
    flags: Iterable[str] = FLAGS,
    min_class_good: int = MIN_CLASS_GOOD,
) -> list[_Param]:
    """The thresholds the search may move, with their candidate values and what they fire on.

    The Jacobian ranges stay as they are (the figures kept are outlier fractions against them);
    the rest follow `jrs.qa.figures.flag_structure` and `jrs.qa.figures.flag_dvf`. A structure
    class's own volume-change range moves only when the class has at least ``min_class_good`` good
    contours (with none, "flag them all" would cost no false flag on the measured set), and never
    beyond the organ's `CLINICAL_VOLUME_ENVELOPE`.
    """
    s = samples
    wanted = set(flags)
    params: list[_Param] = []

    def organ_limits(
        table: str, flag: str, figure: npt.NDArray[np.float64], extra: Iterable[float], above: bool
    ) -> list[_Param]:
        # one limit per class of a per-organ table (`_ORGAN_TABLES`), loosest first: flag above
        # (candidates high to low) or below (low to high) it
        limits: dict[str, float] = getattr(prior, table)
        out = []
        for organ, member in _organ_classes(s, limits, min_class_good):
            own = np.where(member, figure, np.nan)
            cuts = _cuts(own, [*extra, limits[organ]])
            out.append(
                _Param(
                    f"{table}.{organ}",
                    flag,
                    cuts[::-1] if above else cuts,
                    _above(own) if above else _below(own),
                )
            )
        return out

    def upper_limits(
        table: str, flag: str, figure: npt.NDArray[np.float64], off: float
    ) -> list[_Param]:
        return organ_limits(table, flag, figure, [off], above=True)

    def lower_limits(
        table: str, flag: str, figure: npt.NDArray[np.float64], extra: Iterable[float]
    ) -> list[_Param]:
        return organ_limits(table, flag, figure, extra, above=False)

    if "nearly_empty" in wanted:
        params.append(
            _Param(
                "min_volume_cc",
                "nearly_empty",
                [
                    c
                    for c in _cuts(s.daily_cc, [0.0, prior.min_volume_cc])
                    if c <= max(MAX_NEARLY_EMPTY_CC, prior.min_volume_cc)
                ],
                lambda v: (s.daily_cc < v) & (v <= s.planning_cc),
            )
        )
    if "volume_change" in wanted:
        organs = sorted({o for o in s.organ.tolist() if o in prior.volume_change_range})
        groups = [(o, s.organ == o) for o in organs]
        rest = ~np.isin(s.organ, list(prior.volume_change_range))
        if rest.any():
            groups.append(("*", rest))
        for organ, member in groups:
            if int((member & s.good).sum()) < min_class_good:
                continue  # too few good contours of this class to know what it does
            vc = np.where(member, s.volume_change, np.nan)
            low0, high0 = (
                _get(prior, f"volume_change_range.{organ}.low"),
                _get(prior, f"volume_change_range.{organ}.high"),
            )
            loosest = CLINICAL_VOLUME_ENVELOPE.get(organ, (_OFF_LOW, _OFF_HIGH))
            # (the current value stays a candidate: the search starts there)
            lows = [c for c in _cuts(vc, [loosest[0], low0]) if loosest[0] <= c <= 0 or c == low0]
            highs = [
                c for c in _cuts(vc, [loosest[1], high0]) if 0 <= c <= loosest[1] or c == high0
            ]
            params.append(
                _Param(
                    f"volume_change_range.{organ}.low",
                    "volume_change",
                    lows,
                    _below(vc),
                )
            )
            params.append(
                _Param(
                    f"volume_change_range.{organ}.high",
                    "volume_change",
                    highs[::-1],
                    _above(vc),
                )
            )
    if "path_disagreement" in wanted:
        pd = np.where(s.paths_validated, s.path_dice, np.nan)
        # one limit per organ (its own table), the plain limit for the organs not in it
        params += lower_limits("min_path_dice_organ", "path_disagreement", pd, [0.0, 1.0 + 1e-6])
        msd = np.where(s.paths_validated, s.path_msd_mm, np.nan)
        params += upper_limits("max_path_msd_mm", "path_disagreement", msd, _OFF_SHIFT_MM)
        others = np.where(np.isin(s.organ, list(prior.min_path_dice_organ)), np.nan, pd)
        if np.isfinite(others).any():
            params.append(
                _Param(
                    "min_path_dice",
                    "path_disagreement",
                    _cuts(others, [0.0, prior.min_path_dice, 1.0 + 1e-6]),
                    _below(others),
                )
            )
    if "touches_box" in wanted:
        params.append(
            _Param(
                "flag_touching_box", "touches_box", [0.0, 1.0], lambda v: s.touches_box & (v >= 0.5)
            )
        )
    if "jacobian_outliers" in wanted:
        jo = s.jacobian_outliers
        params.append(
            _Param(
                "max_jacobian_outlier_fraction",
                "jacobian_outliers",
                _cuts(jo, [1.0, prior.max_jacobian_outlier_fraction, 0.0])[::-1],
                _above(jo),
            )
        )
    if "image_disagreement" in wanted:
        params += lower_limits("min_image_ncc", "image_disagreement", s.image_ncc, [_OFF_NCC])
        # either condition raises the flag (jrs.qa.figures.flag_structure), for any organ with
        # figures; a negative limit ("flag unless the mapping improved the agreement") would flag
        # every organ that did not move: the loss limit stays >= 0
        loss = s.image_ncc_loss
        params.append(
            _Param(
                "max_image_ncc_loss",
                "image_disagreement",
                [c for c in _cuts(loss, [_OFF_NCC_LOSS, prior.max_image_ncc_loss]) if c >= 0.0][
                    ::-1
                ],
                _above(loss),
            )
        )
    if "centroid_shift" in wanted:
        params += upper_limits(
            "max_centroid_shift_mm", "centroid_shift", s.centroid_shift_mm, _OFF_SHIFT_MM
        )
    if "image_misfit" in wanted:
        params += upper_limits("max_image_fit_gain", "image_misfit", s.image_fit_gain, _OFF_HIGH)
    if "misregistration" in wanted:
        residual = upper_limits(
            "max_residual_shift_mm", "misregistration", s.residual_shift_mm, _OFF_SHIFT_MM
        )
        for p in residual:  # never within the figure's own noise (the current value stays)
            p.candidates = [
                c for c in p.candidates if c >= MIN_RESIDUAL_LIMIT_MM or c == _get(prior, p.key)
            ]
        params += residual
    if "method_disagreement" in wanted:
        params += lower_limits(
            "min_method_dice", "method_disagreement", s.method_dice, [0.0, 1.0 + 1e-6]
        )
        params += upper_limits(
            "max_method_msd_mm", "method_disagreement", s.method_msd_mm, _OFF_SHIFT_MM
        )
    if "dvf_folding" in wanted:
        fo = s.dvf_folding
        params.append(
            _Param(
                "max_folding_fraction",
                "dvf_folding",
                _cuts(fo, [1.0, prior.max_folding_fraction, 0.0])[::-1],
                _above(fo),
            )
        )
    for p in params:
        p.candidates = [c for c in p.candidates if np.isfinite(c)]
    return params


@dataclass
class ThresholdChoice:
    """The outcome of `choose_thresholds`.

    Attributes:
        values: search parameter -> chosen value.
        thresholds: the chosen `QaThresholds`.
        recall: recall of "any flag" on bad contours (None without bad contours).
        false_flag_rate: false-flag rate of "any flag" on good contours (None without good).
        met: both targets reached.
        steps: what the search did, one line a move.
        held: thresholds left as they were for want of good contours of their class.
    """

    values: dict[str, float]
    thresholds: QaThresholds
    recall: float | None
    false_flag_rate: float | None
    met: bool
    steps: list[str] = field(default_factory=list)
    held: list[str] = field(default_factory=list)


def choose_thresholds(
    samples: Samples,
    prior: QaThresholds | None = None,
    *,
    target_recall: float = TARGET_RECALL,
    max_false_flag_rate: float = TARGET_FALSE_FLAG_RATE,
    flags: Iterable[str] = STRUCTURE_FLAGS,
) -> ThresholdChoice:
    """Thresholds for the flags from the measured figures (greedy, one threshold at a time).

    The false-flag limit holds over all good contours **and** over the good contours of each
    structure class (each organ, and the other ROIs together): a flag that fires on most good
    bladders is noise even when femoral heads outnumber bladders. Starting from ``prior``:

    1. while a limit is exceeded, loosen the threshold that removes the most excess false flags
       per bad contour lost (a move may also loosen, just enough, every threshold that fires on
       one good contour: two flags firing on it are silenced together);
    2. while the recall on bad contours is under ``target_recall``, tighten the threshold that
       catches the most bad contours more within the limits (fewest false flags on a tie);
    3. loosen every threshold (or set of thresholds, as in 1) whose loosening removes false
       flags without losing a bad contour (only as far as needed to drop them).

    Thresholds are cut halfway between measured figures, then rounded to the fewest decimals that
    flag the same structures.

    Args:
        samples: the scored structures.
        prior: where to start (the current `QaThresholds` by default).
        target_recall: recall wanted on bad contours ("any flag").
        max_false_flag_rate: most false-flag rate allowed on good contours, overall and per
            structure class.
        flags: the flags the search may move (the other structure flags stay as in ``prior``;
            ``dvf_folding`` counts only when searched).

    Returns:
        The choice; ``met`` says whether the recall target was reached within the limits.
    """
    prior = prior or QaThresholds()
    # every threshold fires; those of classes with too few good contours never move
    params = search_parameters(samples, prior, flags, min_class_good=0)
    movable = {p.key for p in search_parameters(samples, prior, flags)}
    held = [p.key for p in params if p.key not in movable]
    bad, good = samples.bad, samples.good
    nb, ng = int(bad.sum()), int(good.sum())
    classes = [good & (samples.organ == o) for o in sorted(set(samples.organ.tolist()))]
    limits = [(m, max_false_flag_rate * int(m.sum())) for m in [good, *classes] if m.any()]
    values = {p.key: _get(prior, p.key) for p in params}
    cache: dict[tuple[str, float], npt.NDArray[np.bool_]] = {}

    def fires(p: _Param, v: float) -> npt.NDArray[np.bool_]:
        k = (p.key, v)
        if k not in cache:
            cache[k] = p.fires(v)
        return cache[k]

    # flags the search does not move still fire as in the prior; ``same_organ_flagged`` follows
    # the flags it spreads (`jrs.qa.family`), moved or not
    fixed = np.zeros(len(samples), bool)
    fixed_source = np.zeros(len(samples), bool)
    moved = {p.flag for p in params}
    if len(samples):
        for code, f in fired_matrix(samples, prior).items():
            if code in STRUCTURE_FLAGS and code not in moved and code != SAME_ORGAN:
                fixed |= f
                if code in SPREAD_FLAGS:
                    fixed_source |= f
    spreads = SAME_ORGAN in set(flags)

    def union(changes: Mapping[str, float] | None = None) -> npt.NDArray[np.bool_]:
        u = fixed.copy()
        source = fixed_source.copy()
        for p in params:
            f = fires(p, (changes or {}).get(p.key, values[p.key]))
            u |= f
            if p.flag in SPREAD_FLAGS:
                source |= f
        return u | spread_mask(source, samples.family_group) if spreads else u

    def state(u: npt.NDArray[np.bool_]) -> tuple[int, int, float]:
        """(bad flagged, good flagged, false flags over the limits)."""
        excess = sum(max(0.0, int((u & m).sum()) - lim) for m, lim in limits)
        return int((u & bad).sum()), int((u & good).sum()), excess

    steps: list[str] = []
    Move = tuple[dict[str, float], int]  # (key -> new value, candidate steps taken)

    def single_moves(loosen: bool) -> Iterable[Move]:
        for p in params:
            if p.key not in movable:
                continue
            i = p.candidates.index(values[p.key])
            span = p.candidates[:i][::-1] if loosen else p.candidates[i + 1 :]
            for j, v in enumerate(span, 1):
                yield {p.key: v}, j

    def unflag_moves() -> Iterable[Move]:
        """Per flagged good contour: loosen every threshold firing on it just enough."""
        u = union()
        for k in np.nonzero(u & good & ~fixed)[0]:
            changes: dict[str, float] = {}
            taken = 0
            for p in params:
                if not fires(p, values[p.key])[k]:
                    continue
                i = p.candidates.index(values[p.key])
                quiet = next(
                    (j for j in range(i - 1, -1, -1) if not fires(p, p.candidates[j])[k]), None
                )
                if p.key not in movable or quiet is None:
                    break
                changes[p.key] = p.candidates[quiet]
                taken += i - quiet
            else:
                if len(changes) > 1:  # single ones are among `single_moves`
                    yield changes, taken

    def move(changes: Mapping[str, float], why: str) -> tuple[int, int, float]:
        for key, v in changes.items():
            steps.append(f"{why}: {key} {values[key]:g} -> {v:g}")
            values[key] = v
        return state(union())

    fb, fg, ex = state(union())
    # 1. false flags down to the limits: most excess removed per bad contour lost
    while ex > 1e-9:
        best: tuple[tuple[float, float, int], dict[str, float]] | None = None
        for changes, j in [*single_moves(loosen=True), *unflag_moves()]:
            b, _g, e = state(union(changes))
            if e < ex - 1e-9:
                score = ((fb - b) / (ex - e), e, j)
                if best is None or score < best[0]:
                    best = (score, changes)
        if best is None:
            break
        fb, fg, ex = move(best[1], "fewer false flags")
    # 2. recall up to the target within the limits: most bad caught, fewest false flags
    while nb and fb / nb < target_recall and ex <= 1e-9:
        pick: tuple[tuple[int, int, int], dict[str, float]] | None = None
        for changes, j in single_moves(loosen=False):
            b, g, e = state(union(changes))
            if b > fb and e <= 1e-9:
                score2 = (-(b - fb), g, j)
                if pick is None or score2 < pick[0]:
                    pick = (score2, changes)
        if pick is None:
            break
        fb, fg, ex = move(pick[1], "more bad contours caught")
    # 3. loosen what only adds false flags
    while True:
        gain: tuple[tuple[int, int], dict[str, float]] | None = None
        for changes, j in [*single_moves(loosen=True), *unflag_moves()]:
            b, g, _e = state(union(changes))
            if b >= fb and g < fg:
                score3 = (g, j)
                if gain is None or score3 < gain[0]:
                    gain = (score3, changes)
        if gain is None:
            break
        fb, fg, ex = move(gain[1], "false flags only")
    for p in params:  # moved thresholds: the fewest digits that flag the same structures
        if values[p.key] != _get(prior, p.key):
            values[p.key] = _tidy(values[p.key], fires(p, values[p.key]), p.fires)
    recall = fb / nb if nb else None
    ffr = fg / ng if ng else None
    met = (recall is None or recall >= target_recall) and ex <= 1e-9
    return ThresholdChoice(
        values=dict(values),
        thresholds=thresholds_with(prior, values),
        recall=None if recall is None else round(recall, 4),
        false_flag_rate=None if ffr is None else round(ffr, 4),
        met=met,
        steps=steps,
        held=held,
    )


def _tidy(
    value: float,
    fired: npt.NDArray[np.bool_],
    fires: Callable[[float], npt.NDArray[np.bool_]],
) -> float:
    """``value`` rounded to the fewest decimals (at most 6) that fire on the same samples."""
    for digits in range(1, 7):
        r = round(value, digits)
        if np.array_equal(fires(r), fired):
            return r
    return value


# ============================================================================ report
def thresholds_to_dict(t: QaThresholds) -> dict[str, Any]:
    """JSON-able `QaThresholds` (ranges as lists)."""
    out = dataclasses.asdict(t)
    out["volume_change_range"] = {k: list(v) for k, v in t.volume_change_range.items()}
    out["jacobian_range"] = {k: list(v) for k, v in t.jacobian_range.items()}
    out["default_volume_change_range"] = list(t.default_volume_change_range)
    out["default_jacobian_range"] = list(t.default_jacobian_range)
    return out


def thresholds_from_dict(data: Mapping[str, Any]) -> QaThresholds:
    """`QaThresholds` from `thresholds_to_dict` (e.g. ``chosen.thresholds`` of a report)."""
    names = {f.name for f in dataclasses.fields(QaThresholds)}
    kw: dict[str, Any] = {}
    for k, v in data.items():
        if k not in names:
            continue
        if k in ("volume_change_range", "jacobian_range"):
            kw[k] = {o: (float(r[0]), float(r[1])) for o, r in v.items()}
        elif k in ("default_volume_change_range", "default_jacobian_range"):
            kw[k] = (float(v[0]), float(v[1]))
        else:
            kw[k] = v
    return QaThresholds(**kw)


def _flag_rates(samples: Samples, t: QaThresholds) -> dict[str, Any]:
    fired = fired_matrix(samples, t)
    anyf = np.zeros(len(samples), bool)
    for code in STRUCTURE_FLAGS:
        anyf |= fired[code]
    return {
        "flags": {code: rates(f, samples) for code, f in fired.items()},
        "any": rates(anyf, samples),
        "any_organs_only": rates(anyf, samples, samples.organ != ""),
        "fired": anyf,
    }


def figure_summary(samples: Samples) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """Distribution of each raw figure (`FIGURES`) per structure class, good and bad apart.

    What a threshold set by hand would separate: a figure whose good and bad quantiles overlap
    little makes a flag that can reach the targets.

    Args:
        samples: the scored structures.

    Returns:
        figure -> class (organ key, ``other ROIs``) -> ``good`` / ``bad`` -> ``{"n", "p05",
        "median", "p95"}`` over the structures where the figure was measured (quantiles None
        when none was).
    """
    out: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    classes = sorted(set(samples.organ.tolist()))
    for fig in FIGURES:
        values = np.asarray(getattr(samples, fig), np.float64)
        per: dict[str, dict[str, dict[str, Any]]] = {}
        for organ in classes:
            row: dict[str, dict[str, Any]] = {}
            for lab, which in (("good", samples.good), ("bad", samples.bad)):
                v = values[which & (samples.organ == organ) & np.isfinite(values)]
                q = np.quantile(v, [0.05, 0.5, 0.95]) if v.size else [None] * 3
                row[lab] = {
                    "n": int(v.size),
                    **{
                        k: None if x is None else round(float(x), 4)
                        for k, x in zip(("p05", "median", "p95"), q, strict=True)
                    },
                }
            if row["good"]["n"] or row["bad"]["n"]:
                per[organ or "other ROIs"] = row
        out[fig] = per
    return out


def held_out_rates(
    records: Sequence[Mapping[str, Any]],
    current: QaThresholds,
    chosen: QaThresholds,
    criteria: TruthCriteria | None = None,
) -> dict[str, Any]:
    """Rates of the current and the chosen thresholds on cases the choice never saw.

    The in-sample rates of `calibrate` are optimistic (the thresholds sit between the very
    figures they are scored on) and leaving one case out still shares the populations' quirks;
    records of cases kept out of the choice altogether are the honest test.

    Args:
        records: the held-out cases' records.
        current: the thresholds before the choice.
        chosen: the thresholds the choice found on the other records.
        criteria: the labels' criteria (None: as the records were written).

    Returns:
        ``{"cases", "counts", "current", "chosen", "missed", "false_flags"}``: ``current`` and
        ``chosen`` hold ``"any"``, ``"any_organs_only"``, ``"flags"``, ``"by_population"`` and
        ``"by_organ"`` (rates as `rates`); ``missed`` and ``false_flags`` list the chosen
        thresholds' misses and false flags.
    """
    samples = samples_from_records(records, criteria)

    def block(t: QaThresholds) -> tuple[dict[str, Any], npt.NDArray[np.bool_]]:
        r = _flag_rates(samples, t)
        return {
            "any": r["any"],
            "any_organs_only": r["any_organs_only"],
            "wrong_dvf": wrong_dvf_rates(r["fired"], samples),
            "flags": r["flags"],
            "by_population": {
                pop: rates(r["fired"], samples, samples.population == pop)
                for pop in dict.fromkeys(samples.population.tolist())
            },
            "by_organ": {
                (organ or "other ROIs"): rates(r["fired"], samples, samples.organ == organ)
                for organ in sorted(set(samples.organ.tolist()))
            },
        }, r["fired"]

    now, _ = block(current)
    ch, fired = block(chosen)
    return {
        "cases": sorted({str(r["case_id"]) for r in records}),
        "counts": {
            "runs": len(records),
            "structures": len(samples),
            "good": int(samples.good.sum()),
            "bad": int(samples.bad.sum()),
            "borderline": int((samples.label == "borderline").sum()),
            GOOD_WRONG_DVF: int((samples.label == GOOD_WRONG_DVF).sum()),
        },
        "current": now,
        "chosen": ch,
        "missed": _listed(samples, samples.bad & ~fired, None),
        "false_flags": _listed(samples, samples.good & fired, chosen),
    }


def _listed(
    samples: Samples, where: npt.NDArray[np.bool_], thresholds: QaThresholds | None
) -> list[dict[str, Any]]:
    """Some structures for a report: case, population, name, DSC, MSD (and their flags)."""
    out = []
    for i in np.nonzero(where)[0]:
        item = samples.items[i]
        row = {k: item.get(k) for k in ("case_id", "population", "name", "dsc", "msd_mm")}
        if thresholds is not None:
            row["flags"] = flags_of(item, thresholds)
        out.append(row)
    return out


def calibrate(
    records: Sequence[Mapping[str, Any]],
    prior: QaThresholds | None = None,
    *,
    target_recall: float = TARGET_RECALL,
    max_false_flag_rate: float = TARGET_FALSE_FLAG_RATE,
    held_out: Sequence[Mapping[str, Any]] = (),
    criteria: TruthCriteria | None = None,
) -> dict[str, Any]:
    """Rates of every flag at the current thresholds, the threshold choice and its rates.

    Args:
        records: per case and population (`run_population`).
        prior: the current thresholds (default `QaThresholds()`).
        target_recall: recall wanted on bad contours.
        max_false_flag_rate: most false-flag rate allowed on good contours.
        held_out: records of cases kept out of the choice: the chosen thresholds are tested on
            them (`held_out_rates`; the report's ``held_out``, None without).
        criteria: label the contours with these criteria (`LABEL_CRITERIA`; None: as the
            records were written, the ``v3`` criteria).

    Returns:
        The JSON-able report (see ``docs/qa.md``).
    """
    prior = prior or QaThresholds()
    shared = {str(r["case_id"]) for r in records} & {str(r["case_id"]) for r in held_out}
    if shared:
        raise InvalidInput(
            f"held-out case(s) {sorted(shared)} are also among the calibration records: a held-out "
            "folder must hold other cases (other phantom seeds, another --real-seed)"
        )
    samples = samples_from_records(records, criteria)
    done = [r for r in records if r.get("status") == "done"]
    refused = [r for r in records if r.get("status") == "refused"]
    now = _flag_rates(samples, prior)
    choice = choose_thresholds(
        samples, prior, target_recall=target_recall, max_false_flag_rate=max_false_flag_rate
    )
    chosen = _flag_rates(samples, choice.thresholds)
    standalone = {
        code: _standalone(samples, code, prior, target_recall, max_false_flag_rate)
        for code in FLAGS
    }
    by_pop = {
        pop: rates(chosen["fired"], samples, samples.population == pop)
        for pop in dict.fromkeys(samples.population.tolist())
    }
    by_organ = {
        (organ or "other ROIs"): rates(chosen["fired"], samples, samples.organ == organ)
        for organ in sorted(set(samples.organ.tolist()))
    }
    by_organ_now = {
        (organ or "other ROIs"): rates(now["fired"], samples, samples.organ == organ)
        for organ in sorted(set(samples.organ.tolist()))
    }
    by_pop_now = {
        pop: rates(now["fired"], samples, samples.population == pop)
        for pop in dict.fromkeys(samples.population.tolist())
    }
    missed = _listed(samples, samples.bad & ~chosen["fired"], None)
    false = _listed(samples, samples.good & chosen["fired"], choice.thresholds)
    model = next((r.get("model") for r in done if r.get("method") == "network"), None)
    pops = list(dict.fromkeys([*samples.population.tolist(), *(r["population"] for r in refused)]))
    counts = {
        "runs": len(records),
        "runs_done": len(done),
        "runs_refused": len(refused),
        "structures": len(samples),
        "good": int(samples.good.sum()),
        "bad": int(samples.bad.sum()),
        "borderline": int((samples.label == "borderline").sum()),
        GOOD_WRONG_DVF: int((samples.label == GOOD_WRONG_DVF).sum()),
        "cases": len({r["case_id"] for r in records}),
        "by_population": {
            pop: {
                lab: int(((samples.population == pop) & (samples.label == lab)).sum())
                for lab in ("good", "bad", "borderline", GOOD_WRONG_DVF)
            }
            | {"refused_runs": sum(1 for r in refused if r["population"] == pop)}
            for pop in pops
        },
    }
    if choice.met:
        note = (
            f"thresholds found: recall {choice.recall} on bad contours, false-flag rate "
            f"{choice.false_flag_rate} on good ones"
        )
    else:
        note = (
            f"no thresholds reach recall >= {target_recall} with a false-flag rate <= "
            f"{max_false_flag_rate} (overall and per structure) on this set: the best found has "
            f"recall {choice.recall} and false-flag rate {choice.false_flag_rate}; "
            f"{len(missed)} bad contour(s) raise no flag (listed under 'missed')"
        )
    return {
        "benchmark": "qa",
        "definitions": {
            "good": f"DSC >= {GOOD_MIN_DSC} (and not bad)",
            "bad": f"DSC < {BAD_BELOW_DSC} or MSD > {BAD_ABOVE_MSD_MM} mm",
            "borderline": "neither (not counted)",
            "recall": "flagged bad contours / bad contours",
            "false_flag_rate": "flagged good contours / good contours",
            "limits": (
                "the false-flag limit holds over all good contours and over those of each "
                "structure class (each organ; the other ROIs together)"
            ),
            "dvf_folding": (
                "a flag of the whole DVF, counted on every structure of its case; not part of "
                "'any flag' and not searched"
            ),
            GOOD_WRONG_DVF: (
                "a good contour in a run whose DVF is wrong on purpose everywhere ("
                + ", ".join(sorted(WRONG_DVF_POPULATIONS))
                + "): neither good nor bad for the rates and the choice; 'wrong_dvf' gives how "
                "many are flagged, and 'strict' the rates counting them as good"
            ),
            "targets": {"recall": target_recall, "false_flag_rate": max_false_flag_rate},
        },
        "populations": {p: POPULATIONS[p] for p in pops if p in POPULATIONS},
        "model": model,
        "counts": counts,
        "current": {
            "thresholds": thresholds_to_dict(prior),
            "flags": now["flags"],
            "any": now["any"],
            "any_organs_only": now["any_organs_only"],
            "wrong_dvf": wrong_dvf_rates(now["fired"], samples),
            "by_population": by_pop_now,
            "by_organ": by_organ_now,
        },
        "chosen": {
            "thresholds": thresholds_to_dict(choice.thresholds),
            "values": choice.values,
            "changes": {
                k: {"from": _get(prior, k), "to": v}
                for k, v in choice.values.items()
                if not math.isclose(_get(prior, k), v)
            },
            "met": choice.met,
            "note": note,
            "steps": choice.steps,
            "held": choice.held,
            "flags": chosen["flags"],
            "any": chosen["any"],
            "any_organs_only": chosen["any_organs_only"],
            "wrong_dvf": wrong_dvf_rates(chosen["fired"], samples),
            "by_population": by_pop,
            "by_organ": by_organ,
        },
        "cross_validated": cross_validate(
            samples, prior, target_recall=target_recall, max_false_flag_rate=max_false_flag_rate
        ),
        "standalone": standalone,
        "held_out": (
            held_out_rates(held_out, prior, choice.thresholds, criteria) if held_out else None
        ),
        "figures": figure_summary(samples),
        "missed": missed,
        "false_flags": false,
        "refused": [
            {"case_id": r["case_id"], "population": r["population"], "message": r.get("message")}
            for r in refused
        ],
    }


def subset(samples: Samples, where: npt.NDArray[np.bool_]) -> Samples:
    """The samples where ``where`` holds (same fields, fewer entries)."""
    idx = np.nonzero(where)[0]
    arrays = {
        f.name: getattr(samples, f.name)[idx]
        for f in dataclasses.fields(Samples)
        if f.name != "items"
    }
    return Samples(items=[samples.items[i] for i in idx], **arrays)


def cross_validate(
    samples: Samples,
    prior: QaThresholds,
    *,
    target_recall: float = TARGET_RECALL,
    max_false_flag_rate: float = TARGET_FALSE_FLAG_RATE,
) -> dict[str, Any] | None:
    """Leave-one-case-out estimate of the chosen thresholds' rates on cases they never saw.

    For each case, `choose_thresholds` runs on the other cases' structures and the thresholds
    it finds flag the left-out case; the flags of all folds are counted together. The in-sample
    rates of `calibrate` ("chosen") are optimistic by construction (the thresholds sit halfway
    between the very figures they are scored on); these are what a new patient can expect.

    Args:
        samples: the scored structures (with ``case_id``).
        prior: where each fold's search starts.
        target_recall: as in `choose_thresholds`.
        max_false_flag_rate: as in `choose_thresholds`.

    Returns:
        ``{"folds", "any", "wrong_dvf", "any_organs_only", "by_organ"}`` (rates as `rates`,
        ``wrong_dvf`` as `wrong_dvf_rates`), or None with
        fewer than 2 cases.
    """
    cases = np.array([str(it["case_id"]) for it in samples.items])
    names = list(dict.fromkeys(cases.tolist()))
    if len(names) < 2:
        return None
    fired = np.zeros(len(samples), bool)
    for name in names:
        held = cases == name
        choice = choose_thresholds(
            subset(samples, ~held),
            prior,
            target_recall=target_recall,
            max_false_flag_rate=max_false_flag_rate,
        )
        fired[held] = _flag_rates(subset(samples, held), choice.thresholds)["fired"]
    return {
        "folds": len(names),
        "any": rates(fired, samples),
        "wrong_dvf": wrong_dvf_rates(fired, samples),
        "any_organs_only": rates(fired, samples, samples.organ != ""),
        "by_organ": {
            (organ or "other ROIs"): rates(fired, samples, samples.organ == organ)
            for organ in sorted(set(samples.organ.tolist()))
        },
    }


def _standalone(
    samples: Samples,
    code: str,
    prior: QaThresholds,
    target_recall: float,
    max_false_flag_rate: float,
) -> dict[str, Any]:
    """One flag alone (every other flag off), its thresholds chosen by `choose_thresholds`.

    With one flag the recall target is seldom reached: the choice is then the most recall that
    flag gives within the false-flag limit. ``dvf_folding`` is not searched: its rates at
    ``prior``.
    """
    if code not in STRUCTURE_FLAGS:
        r = rates(fired_matrix(samples, prior)[code], samples)
        return {**r, "met": None, "values": {}}
    others_off = thresholds_with(
        prior,
        {
            p.key: p.candidates[0]
            for p in search_parameters(samples, prior, [f for f in STRUCTURE_FLAGS if f != code])
        },
    )
    if len(samples) == 0:
        return {"recall": None, "false_flag_rate": None, "met": False, "values": {}}
    choice = choose_thresholds(
        samples,
        others_off,
        target_recall=target_recall,
        max_false_flag_rate=max_false_flag_rate,
        flags=[code],
    )
    fired = fired_matrix(samples, choice.thresholds)[code]
    r = rates(fired, samples)
    return {**r, "met": choice.met, "values": choice.values}


def _fmt_rate(r: Mapping[str, Any], which: str) -> str:
    if which == "recall":
        v, a, n = r["recall"], r["bad_flagged"], r["bad"]
    else:
        v, a, n = r["false_flag_rate"], r["good_flagged"], r["good"]
    return "n/a" if v is None else f"{v:.2f} ({a}/{n})"


def report_markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown tables (``qa_calibration.md``; the table of ``docs/qa.md``)."""
    c = report["counts"]
    lines = [
        "# QA flag calibration",
        "",
        f"{c['cases']} cases, {c['runs']} runs ({c['runs_refused']} refused before re-contouring), "
        f"{c['structures']} scored structures: {c['good']} good (DSC >= {GOOD_MIN_DSC}), "
        f"{c['bad']} bad (DSC < {BAD_BELOW_DSC} or MSD > {BAD_ABOVE_MSD_MM} mm), "
        f"{c['borderline']} borderline (not counted), {c.get(GOOD_WRONG_DVF, 0)} good contours in "
        "a DVF wrong on purpose (counted apart: below).",
        "",
    ]
    model = report.get("model") or {}
    if model:
        lines += [f"Model: {model.get('name')} version {model.get('version')}.", ""]
    lines += [
        "| flag | recall on bad, current | false-flag rate on good, current | "
        "recall on bad, chosen | false-flag rate on good, chosen | alone: recall / false-flag "
        "rate (targets met) |",
        "|---|---|---|---|---|---|",
    ]
    for code in FLAGS:
        now, ch = report["current"]["flags"][code], report["chosen"]["flags"][code]
        solo = report["standalone"][code]
        met = {True: "yes", False: "no", None: "not searched"}[solo["met"]]
        solo_txt = f"{_fmt_rate(solo, 'recall')} / {_fmt_rate(solo, 'ffr')} ({met})"
        lines.append(
            f"| `{code}`{' (DVF; not in any flag)' if code not in STRUCTURE_FLAGS else ''} | "
            f"{_fmt_rate(now, 'recall')} | {_fmt_rate(now, 'ffr')} | "
            f"{_fmt_rate(ch, 'recall')} | {_fmt_rate(ch, 'ffr')} | {solo_txt} |"
        )
    now, ch = report["current"]["any"], report["chosen"]["any"]
    lines.append(
        f"| **any flag** | **{_fmt_rate(now, 'recall')}** | **{_fmt_rate(now, 'ffr')}** | "
        f"**{_fmt_rate(ch, 'recall')}** | **{_fmt_rate(ch, 'ffr')}** | |"
    )
    now, ch = report["current"]["any_organs_only"], report["chosen"]["any_organs_only"]
    lines.append(
        f"| any flag, the four organs only | {_fmt_rate(now, 'recall')} | "
        f"{_fmt_rate(now, 'ffr')} | {_fmt_rate(ch, 'recall')} | {_fmt_rate(ch, 'ffr')} | |"
    )
    cv = report.get("cross_validated")
    if cv:
        lines.append(
            f"| any flag, leave one case out ({cv['folds']} folds: thresholds chosen without "
            f"the case they flag) | | | {_fmt_rate(cv['any'], 'recall')} | "
            f"{_fmt_rate(cv['any'], 'ffr')} | |"
        )
    now_w, ch_w = report["current"].get("wrong_dvf"), report["chosen"].get("wrong_dvf")
    if now_w and ch_w and ch_w["count"]:
        lines.append(
            "| any flag, good contours in a DVF wrong on purpose counted as good (strict) | "
            f"{_fmt_rate(now_w['strict'], 'recall')} | {_fmt_rate(now_w['strict'], 'ffr')} | "
            f"{_fmt_rate(ch_w['strict'], 'recall')} | {_fmt_rate(ch_w['strict'], 'ffr')} | |"
        )
    held_out = report.get("held_out")
    if held_out:
        for label, key in (("current", "current"), ("chosen", "chosen")):
            r = held_out[key]["any"]
            lines.append(
                f"| any flag, **held out** ({len(held_out['cases'])} cases never used in the "
                f"choice), {label} thresholds | | | {_fmt_rate(r, 'recall')} | "
                f"{_fmt_rate(r, 'ffr')} | |"
            )
            w = held_out[key].get("wrong_dvf")
            if w and w["count"]:
                lines.append(
                    f"| any flag, held out, {label} thresholds, strict | | | "
                    f"{_fmt_rate(w['strict'], 'recall')} | {_fmt_rate(w['strict'], 'ffr')} | |"
                )
    if ch_w and ch_w["count"]:
        lines += [
            "",
            f"Good contours in a DVF wrong on purpose: {ch_w['flagged']} of {ch_w['count']} "
            "flagged by the chosen thresholds (their DVF is several mm off: a flag of the mapping "
            "is right about it).",
        ]
    lines += ["", f"Threshold choice: {report['chosen']['note']}.", ""]
    changes = report["chosen"]["changes"]
    if changes:
        lines += ["| threshold | current | chosen |", "|---|---|---|"]
        for k, v in changes.items():
            lines.append(f"| `{k}` | {v['from']:g} | {v['to']:g} |")
        lines.append("")
    else:
        lines += ["The chosen thresholds are the current ones.", ""]
    held = report["chosen"].get("held") or []
    if held:
        lines += [
            f"Left as they are (fewer than {MIN_CLASS_GOOD} good contours of their structure): "
            + ", ".join(f"`{k}`" for k in held)
            + ".",
            "",
        ]
    lines += [
        "By population (any flag; current -> chosen thresholds):",
        "",
        "| population | good / bad / borderline | refused runs | recall on bad | false-flag rate |",
        "|---|---|---|---|---|",
    ]
    for pop, cnt in c["by_population"].items():
        r_now = report["current"]["by_population"].get(pop)
        r_ch = report["chosen"]["by_population"].get(pop)
        rec = f"{_fmt_rate(r_now, 'recall')} -> {_fmt_rate(r_ch, 'recall')}" if r_ch else "n/a"
        ffr = f"{_fmt_rate(r_now, 'ffr')} -> {_fmt_rate(r_ch, 'ffr')}" if r_ch else "n/a"
        lines.append(
            f"| {pop} | {cnt['good']} / {cnt['bad']} / {cnt['borderline']} | "
            f"{cnt['refused_runs']} | {rec} | {ffr} |"
        )
    lines += [
        "",
        "By structure (any flag; current -> chosen thresholds):",
        "",
        "| structure | recall on bad | false-flag rate on good |",
        "|---|---|---|",
    ]
    lines += _change_rows(
        report["current"]["by_organ"], report["chosen"]["by_organ"], lambda o: o.replace("_", " ")
    )
    if held_out:
        lines += [
            "",
            f"Held out ({', '.join(held_out['cases'])}), by population (any flag; current -> "
            "chosen thresholds):",
            "",
            "| population | recall on bad | false-flag rate on good |",
            "|---|---|---|",
        ]
        lines += _change_rows(
            held_out["current"]["by_population"], held_out["chosen"]["by_population"], str
        )
    figures = report.get("figures") or {}
    shown = [
        f
        for f in (
            "image_ncc",
            "image_ncc_loss",
            "centroid_shift_mm",
            "image_fit_gain",
            "path_dice",
            "path_msd_mm",
            "residual_shift_mm",
        )
        if figures.get(f)
    ]
    if shown:
        lines += [
            "",
            "Image and path figures by structure (5th percentile / median / 95th percentile, n):",
            "",
            "| figure | structure | good | bad |",
            "|---|---|---|---|",
        ]
        for fig in shown:
            for organ, row in figures[fig].items():
                lines.append(
                    f"| `{fig}` | {organ.replace('_', ' ')} | {_fmt_quantiles(row['good'])} | "
                    f"{_fmt_quantiles(row['bad'])} |"
                )
    return "\n".join(lines) + "\n"


def _change_rows(
    now: Mapping[str, Any], chosen: Mapping[str, Any], name: Callable[[str], str]
) -> list[str]:
    """Table rows ``| name | recall now -> chosen | false-flag rate now -> chosen |``."""
    return [
        f"| {name(key)} | {_fmt_rate(now[key], 'recall')} -> {_fmt_rate(r, 'recall')} | "
        f"{_fmt_rate(now[key], 'ffr')} -> {_fmt_rate(r, 'ffr')} |"
        for key, r in chosen.items()
    ]


def _fmt_quantiles(q: Mapping[str, Any]) -> str:
    if not q["n"]:
        return "n/a"
    return f"{q['p05']:.3g} / {q['median']:.3g} / {q['p95']:.3g} ({q['n']})"


def write_report(report: Mapping[str, Any], report_dir: Path) -> tuple[Path, Path]:
    """Write ``qa_calibration.json`` and ``qa_calibration.md`` into the report folder."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    js = report_dir / "qa_calibration.json"
    md = report_dir / "qa_calibration.md"
    js.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    md.write_text(report_markdown(report))
    return js, md


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


__all__ = [
    "DEFAULT_POPULATIONS",
    "FIGURES",
    "FLAGS",
    "POPULATIONS",
    "STRUCTURE_FLAGS",
    "CaseSpec",
    "RealSource",
    "ReplayBackend",
    "RunSettings",
    "Samples",
    "ThresholdChoice",
    "calibrate",
    "choose_thresholds",
    "cut_field_of_view",
    "figure_summary",
    "flags_of",
    "label_contour",
    "load_records",
    "other_path",
    "rates",
    "report_markdown",
    "run_qa_calibration",
    "samples_from_records",
    "score_against_truth",
    "shift_organs",
    "smooth_random_field",
    "write_report",
]
