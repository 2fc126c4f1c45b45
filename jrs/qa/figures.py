"""Quality-assurance figures and flags: where should a human look?

Per structure: planning and daily volume and their relative change, agreement between the
network's two output paths (segmentation vs planning contours warped by the DVF), whether the
contour reaches the border of the network's box, the Jacobian determinant of the mapping inside
the organ, and flags with reasons. For the DVF: the Jacobian determinant of x -> x + u(x) (u in mm)
over the body: minimum, folding fraction (det J <= 0), standard deviation and the standard
deviation of log det J (as Learn2Reg).

Image evidence (`image_evidence`), which does not depend on the model's own outputs: per organ,
the normalised cross-correlation of the daily CT with the planning CT mapped onto it by the final
mapping, in a band around the organ's surface (inside and outside), beside the same figure for
the planning CT after the affine pre-alignment alone; and how far the organ's centroid moved from
its pre-aligned planning position. A contour placed where the two scans do not agree, or moved
further than the organ plausibly moves, is flagged even when its volume and its field look
plausible.

Figures and decisions are kept apart so that the flags can be calibrated against ground truth:
each `StructureQa` keeps the raw figures, `flag_structure` turns them into flags with one
`QaThresholds`, and every flag has a machine-readable code (`FLAG_CODES`). Re-flagging stored
figures with other thresholds needs no re-run.

Path disagreement is only a signal when both paths are trustworthy: it is silenced for an organ
whose model metadata does not vouch for both paths (`validated_paths`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from jrs.core.fields import jacobian_determinant
from jrs.core.geometry import Volume
from jrs.core.labels import is_target_volume


def jacobian_stats(dvf: Volume, mask: npt.ArrayLike | None = None) -> dict[str, float]:
    """Jacobian-determinant statistics of x -> x + u(x) over a region.

    Args:
        dvf: (nz, ny, nx, 3) displacement, mm, LPS components.
        mask: (nz, ny, nx) region (e.g. the body); the whole grid when None.

    Returns:
        ``{"min", "max", "mean", "std", "folding_fraction", "log_std"}``; NaN when the region
        is empty. ``log_std`` is over the voxels with det J > 0.
    """
    return _det_stats(jacobian_determinant(dvf), mask)


def _det_stats(det: npt.NDArray[np.floating[Any]], mask: npt.ArrayLike | None) -> dict[str, float]:
    sel = det[np.asarray(mask) > 0] if mask is not None else det.ravel()
    if sel.size == 0:
        nan = math.nan
        return {
            "min": nan,
            "max": nan,
            "mean": nan,
            "std": nan,
            "folding_fraction": nan,
            "log_std": nan,
        }
    pos = sel[sel > 0]
    return {
        "min": float(sel.min()),
        "max": float(sel.max()),
        "mean": float(sel.mean()),
        "std": float(sel.std()),
        "folding_fraction": float((sel <= 0).mean()),
        "log_std": float(np.log(pos).std()) if pos.size else math.nan,
    }


#: flag code -> what it means (the keys of `StructureQa.flag_codes` and ``qa.json``).
FLAG_CODES: dict[str, str] = {
    "nearly_empty": "the daily contour (almost) vanished",
    "volume_change": "the volume changed more than the organ plausibly does between fractions",
    "path_disagreement": "the segmentation and registration paths disagree (validated paths only)",
    "touches_box": "the contour reaches the border of the network's box: may be cut off",
    "jacobian_outliers": "the DVF compresses, stretches or folds the organ implausibly",
    "image_disagreement": (
        "the daily CT and the planning CT mapped onto it disagree around the organ (or agree "
        "less than after the pre-alignment alone)"
    ),
    "centroid_shift": "the organ moved further from its pre-aligned position than is plausible",
    "image_misfit": (
        "the contour sits beside the daily CT's edges: moved by a few mm it fits them clearly "
        "better (a planning contour drawn off the organ?)"
    ),
    "misregistration": (
        "the planning CT mapped onto the daily CT matches it clearly better when moved: the "
        "mapping is off around the structure, and so is a contour it carries"
    ),
    "method_disagreement": (
        "the iterative method and the network's registration place the organ differently: at "
        "least one of the two mappings is wrong there (`--method iterative` only)"
    ),
    "same_organ_flagged": (
        "another contour of the same organ (the manual one, or an automatic one such as "
        "`_DL`) is flagged for its mapping: the mapping there is in doubt for this one too"
    ),
    "dvf_folding": "the DVF folds in part of the body",
}


#: Key of the per-organ tables `QaThresholds.min_image_ncc` and `max_image_fit_gain` that holds
#: the limit of every propagated ROI (PTV, femoral heads, ...: no organ key).
PROPAGATED = "*"
#: ... and the key of the target volumes (PTV, CTV, GTV: `jrs.core.labels.is_target_volume`) in
#: `QaThresholds.min_image_ncc`: a margin in tissue has other image figures than a femoral head.
TARGETS = "targets"


def roi_class(organ: str | None, name: str, target_volume: bool = False) -> str:
    """The key of a structure in the per-organ tables: its organ, `TARGETS` or `PROPAGATED`."""
    if organ:
        return organ
    return TARGETS if target_volume or is_target_volume(name) else PROPAGATED


@dataclass(frozen=True)
class QaThresholds:
    """When a structure or the DVF is flagged for review (all thresholds in one place).

    The defaults are calibrated against ground truth for model v3 (docs/qa.md, "Version 3
    (released), 2026-12-04": `research.qa_calibration` on 43 cases, recall 0.93 on bad contours at a
    false-flag rate of 0.02 on good ones in sample, 0.92 / 0.03 leaving one case out, 0.94 / 0.02
    on 12 held-out cases: 1.00 on phantoms, 0.88 on the real patients). The iterative method's
    second-opinion limits
    (``min_method_dice``, ``max_method_msd_mm``) are priors just outside the good contours of
    the calibration's iterative runs; the search turned the bladder's Dice limit off.
    The thresholds the search did not move are clinical priors: the volume ranges of the organs,
    the Jacobian ranges, the image NCC minima of the organs (four phantom fractions: NCC
    0.88-0.98 with the true mapping), the centroid limits (the phantom's motion model), the
    paths' distance limits and the organs' residual-shift limits. The figures they apply to are
    kept in ``qa.json``.

    Attributes:
        min_path_dice: flag when the segmentation and registration paths agree less (Dice);
            only for organs whose two paths the model validates (`validated_paths`); the
            limit of organs not in ``min_path_dice_organ``.
        min_path_dice_organ: organ key -> its own limit of the paths' Dice (a well-segmented
            bladder's two paths agree better than the seminal vesicles' do).
        volume_change_range: organ key -> (lowest, highest) plausible relative volume change
            daily/planning - 1; outside it the structure is flagged. The prostate hardly
            changes; bladder filling legitimately changes by -60 % .. +150 %.
        default_volume_change_range: for structures not in the table (propagated ROIs).
        jacobian_range: organ key -> (lowest, highest) plausible local det J of the mapping
            (pull: det J < 1 where the organ grew, > 1 where it shrank).
        default_jacobian_range: for organs not in the table.
        max_jacobian_outlier_fraction: flag an organ when more of its voxels have det J outside
            its range (or fold, det J <= 0).
        max_folding_fraction: flag the DVF when more body voxels fold (det J <= 0).
        min_volume_cc: flag a structure smaller than this (lost or nearly lost).
        flag_touching_box: flag an organ whose contour reaches the network box's border.
        min_image_ncc: organ key -> flag the organ when the daily CT and the planning CT mapped
            onto it correlate less (NCC in the band around the organ, `image_evidence`); the
            propagated ROIs' limits are under `PROPAGATED` and `TARGETS` (`roi_class`); a class
            not in the table is not flagged on it.
        max_image_ncc_loss: flag an organ when that NCC is lower than the NCC of the planning CT
            after the pre-alignment alone by more than this: the mapping made the scans agree
            less around the organ than an affine did.
        max_centroid_shift_mm: organ key -> flag the organ when its daily centroid lies further
            than this from its pre-aligned planning centroid, mm (the prostate moves a few mm
            against the pre-alignment, not 2 cm); an organ not in the table is not flagged.
        max_path_msd_mm: organ key -> flag a path disagreement also when the mean surface
            distance between the two paths' contours exceeds this, mm (a contour moved along a
            long organ keeps a high Dice but not a small surface distance); an organ not in the
            table is judged by Dice alone.
        max_image_fit_gain: organ key -> flag the organ when its contour, moved by the best
            translation of up to 8 mm, runs along the daily CT's edges more strongly than where
            it is by more than this fraction (`jrs.qa.contour_fit.contour_fit`); `PROPAGATED` for
            the propagated ROIs (never a target volume); a class not in the table is not flagged
            on it.
        max_residual_shift_mm: structure class (`roi_class`) -> flag the structure when the
            planning CT mapped onto the daily CT matches it best moved by more than this, mm
            (`jrs.qa.residual_shift.residual_shift` in a band around the contour): the mapping is
            that far off there; a class not in the table is not flagged on it.
        min_method_dice: organ key -> with ``--method iterative``, flag the organ when its
            contour and the network's registration path of it (the same planning contour mapped
            by the network's DVF) agree less (Dice); an organ not in the table is not flagged.
        max_method_msd_mm: organ key -> ... or when their mean surface distance exceeds this,
            mm.
    """

    min_path_dice: float = 0.8
    min_path_dice_organ: dict[str, float] = field(
        default_factory=lambda: {
            "bladder": 0.9155,
            "rectum": 0.938,
            "seminal_vesicles": 0.8,
            "prostate": 0.8,
        }
    )
    volume_change_range: dict[str, tuple[float, float]] = field(
        default_factory=lambda: {
            "bladder": (-0.6, 1.5),
            "rectum": (-0.5, 0.8),
            "seminal_vesicles": (-0.35, 0.35),
            "prostate": (-0.2, 0.12),
        }
    )
    default_volume_change_range: tuple[float, float] = (-1.0, 100.0)
    jacobian_range: dict[str, tuple[float, float]] = field(
        default_factory=lambda: {
            "bladder": (0.25, 4.0),
            "rectum": (0.4, 2.5),
            "seminal_vesicles": (0.5, 2.0),
            "prostate": (0.7, 1.4),
        }
    )
    default_jacobian_range: tuple[float, float] = (0.5, 2.0)
    max_jacobian_outlier_fraction: float = 0.078
    max_folding_fraction: float = 0.005
    min_volume_cc: float = 0.5
    flag_touching_box: bool = True
    min_image_ncc: dict[str, float] = field(
        default_factory=lambda: {
            "bladder": 0.8,
            "rectum": 0.58,
            "seminal_vesicles": 0.8,
            "prostate": 0.8,
            PROPAGATED: -1.0,
            TARGETS: 0.83,
        }
    )
    max_image_ncc_loss: float = 0.1
    max_centroid_shift_mm: dict[str, float] = field(
        default_factory=lambda: {
            "bladder": 20.0,
            "rectum": 12.0,
            "seminal_vesicles": 10.0,
            "prostate": 8.0,
        }
    )
    max_path_msd_mm: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(
            ("bladder", "rectum", "seminal_vesicles", "prostate"), 3.0
        )
    )
    max_image_fit_gain: dict[str, float] = field(
        default_factory=lambda: {
            **dict.fromkeys(("bladder", "rectum", "seminal_vesicles"), 0.5),
            "prostate": 0.524,
            PROPAGATED: 0.674,
        }
    )
    max_residual_shift_mm: dict[str, float] = field(
        default_factory=lambda: {
            **dict.fromkeys(("bladder", "rectum", "seminal_vesicles", "prostate", TARGETS), 3.0),
            PROPAGATED: 3.4,
        }
    )
    min_method_dice: dict[str, float] = field(
        default_factory=lambda: {
            "bladder": 0.0,  # calibrated off: good bladders go as low as bad ones (docs/qa.md)
            "rectum": 0.88,
            "seminal_vesicles": 0.81,
            "prostate": 0.9,
        }
    )
    max_method_msd_mm: dict[str, float] = field(
        default_factory=lambda: {
            "bladder": 3.0,
            "rectum": 2.0,
            "seminal_vesicles": 1.2,
            "prostate": 1.5,
        }
    )


def organ_jacobian(
    det: npt.NDArray[np.floating[Any]],
    mask: npt.ArrayLike,
    organ: str | None,
    thresholds: QaThresholds | None = None,
) -> dict[str, float] | None:
    """Jacobian-determinant figures of the mapping inside one organ.

    Args:
        det: (nz, ny, nx) det J of the mapping (`jrs.core.fields.jacobian_determinant`).
        mask: (nz, ny, nx) the organ on the same grid.
        organ: organ key (chooses the plausible range), None for the default range.
        thresholds: QA thresholds (the range).

    Returns:
        ``{"min", "max", "p01", "p99", "outlier_fraction", "folding_fraction", "low", "high"}``
        or None for an empty mask; ``p01`` and ``p99`` are the 1st and 99th percentiles of det J
        over the organ's voxels (robust to a few edge voxels, unlike min and max);
        ``outlier_fraction`` counts voxels outside ``[low, high]`` (folding included).
    """
    t = thresholds or QaThresholds()
    sel = np.asarray(det)[np.asarray(mask) > 0]
    if sel.size == 0:
        return None
    low, high = t.jacobian_range.get(organ or "", t.default_jacobian_range)
    p01, p99 = np.quantile(sel, [0.01, 0.99])
    return {
        "min": round(float(sel.min()), 4),
        "max": round(float(sel.max()), 4),
        "p01": round(float(p01), 4),
        "p99": round(float(p99), 4),
        "outlier_fraction": round(float(((sel < low) | (sel > high)).mean()), 5),
        "folding_fraction": round(float((sel <= 0).mean()), 5),
        "low": low,
        "high": high,
    }


def jacobian_report(
    dvf: Volume,
    body: npt.ArrayLike | None,
    organs: Mapping[str, tuple[str | None, npt.ArrayLike]],
    thresholds: QaThresholds | None = None,
) -> tuple[dict[str, float], dict[str, dict[str, float] | None]]:
    """`jacobian_stats` over the body and `organ_jacobian` per organ, det J computed once.

    Args:
        dvf: (nz, ny, nx, 3) displacement, mm, LPS components.
        body: (nz, ny, nx) the body (whole grid when None).
        organs: name -> (organ key or None, (nz, ny, nx) mask).
        thresholds: QA thresholds.

    Returns:
        (body statistics, name -> organ figures).
    """
    det = jacobian_determinant(dvf)
    stats = _det_stats(det, body)
    return stats, {
        name: organ_jacobian(det, mask, organ, thresholds) for name, (organ, mask) in organs.items()
    }


def _listed_paths(metadata: Mapping[str, Any], key: str, organ: str) -> set[str] | None:
    """The paths a metadata table (organ key or ``"*"`` -> paths) lists for an organ, or None."""
    table = metadata.get(key)
    if isinstance(table, Mapping):
        paths = table.get(organ, table.get("*"))
        if paths is not None:
            return {str(p) for p in paths}
    return None


def validated_paths(metadata: Mapping[str, Any] | None, organ: str) -> set[str]:
    """The output paths a model's metadata vouches for, for one organ.

    ``metadata["validated_paths"]`` (organ key or ``"*"`` -> list of ``segmentation`` /
    ``registration``) when present; else the organ's ``path_choice`` alone (the path not chosen
    is not vouched for); else both paths (no statement, nothing silenced).

    Args:
        metadata: the model's ``metadata.json`` content (None for the iterative method).
        organ: organ key.

    Returns:
        The validated path names.
    """
    both = {"segmentation", "registration"}
    if not metadata:
        return both
    listed = _listed_paths(metadata, "validated_paths", organ)
    if listed is not None:
        return listed
    choice = metadata.get("path_choice")
    if isinstance(choice, Mapping) and organ in choice:
        return {str(choice[organ])}
    return both


#: A path whose validation DSC for an organ (``metadata["metrics"]["path_dsc"]``) is at least
#: this is a QA reference for the organ, even when it is not vouched for as an output: its
#: disagreement with the other path is a signal. A dead path (DSC near 0) never is.
QA_REFERENCE_MIN_DSC = 0.85
_PATHS = ("segmentation", "registration")


def qa_reference_paths(metadata: Mapping[str, Any] | None, organ: str) -> set[str]:
    """The output paths whose disagreement is a QA signal for one organ.

    Which path is good enough to *ship* (`validated_paths`, within a margin of the best path)
    and which is good enough to *check the other against* are two questions. A segmentation
    path with a validation DSC of 0.87 against the registration path's 0.95 is not shipped, but
    when the two disagree by 5 mm, one of them is wrong. ``metadata["qa_reference_paths"]``
    (organ key or ``"*"`` -> paths) when present; else the validated paths plus every path
    whose validation DSC for the organ is at least `QA_REFERENCE_MIN_DSC`.

    Args:
        metadata: the model's ``metadata.json`` content (None for the iterative method).
        organ: organ key.

    Returns:
        The path names (``segmentation``, ``registration``) that count as a QA reference.
    """
    paths = validated_paths(metadata, organ)
    if not metadata:
        return paths
    listed = _listed_paths(metadata, "qa_reference_paths", organ)
    if listed is not None:
        return listed
    dsc = (metadata.get("metrics") or {}).get("path_dsc")
    if isinstance(dsc, Mapping):
        for path in _PATHS:
            value = (dsc.get(path) or {}).get(organ)
            if isinstance(value, int | float) and value >= QA_REFERENCE_MIN_DSC:
                paths.add(path)
    return paths


@dataclass
class StructureQa:
    """QA of one output structure: raw figures, then the flags `flag_structure` derives.

    Attributes:
        name: ROI name (as in the planning RTSTRUCT).
        organ: organ key of the label table, or None for a propagated structure.
        source: how the daily contour was made: ``segmentation``, ``registration`` (planning
            contour warped by the DVF) or ``iterative``.
        planning_cc: planning volume, cm^3.
        daily_cc: daily volume, cm^3.
        path_dice: Dice between the segmentation and registration paths (organs only).
        touches_crop_border: the contour reaches the edge of the network's region.
        flags: reasons a reviewer should look (empty = nothing noticed).
        paths_validated: both output paths count as a QA reference for this organ
            (`qa_reference_paths`; else a path disagreement is not flagged).
        jacobian: `organ_jacobian` figures inside the organ (None when not computed).
        volume_change: daily/planning - 1 (None when the planning volume is 0).
        flag_codes: one `FLAG_CODES` key per flag, same order as ``flags``.
        image_ncc: NCC of the daily CT with the planning CT mapped onto it by the final mapping,
            in a band around the organ (`image_evidence`; organs only, None when not measured).
        image_ncc_prealigned: the same NCC with the planning CT after the pre-alignment alone.
        centroid_shift_mm: distance of the daily contour's centroid from the pre-aligned
            planning organ's centroid, mm (organs only).
        centroid_shift_xyz_mm: that shift as an LPS vector (x, y, z), mm.
        path_msd_mm: mean surface distance between the segmentation and registration paths'
            contours, mm (organs only, where both paths were compared).
        image_fit_gain: how much more strongly the daily CT's edges run along the contour moved
            by its best translation than along the contour where it is (`contour_fit`; 0: it
            sits where it fits best; organs only).
        image_fit_shift_mm: the length of that best translation, mm.
        target_volume: a propagated target volume (PTV, CTV, GTV by name or RT ROI Interpreted
            Type): judged against the `TARGETS` limits, never fitted to the image's edges.
        residual_shift_mm: how far the planning CT mapped onto the daily CT must be moved to
            match it best around the contour, mm (`jrs.qa.residual_shift.residual_shift`; 0: the
            mapping is right there).
        residual_shift_xyz_mm: that translation as an LPS vector (x, y, z), mm.
        residual_ncc: the NCC of the two scans in the band around the contour at that
            translation.
        residual_ncc_gain: how much higher that NCC is than without the translation.
        method_dice: with ``--method iterative``, the Dice of the organ's contour and the
            network's registration path of it (organs only; None without a network).
        method_msd_mm: their mean surface distance, mm.
        organ_family: the organ or landmark key this ROI is a contour of, used or not
            (``Bladder_DL`` beside the manual ``Bladder``: both ``bladder``;
            `jrs.core.labels.RoiDecision.organ`), else None.
    """

    name: str
    organ: str | None
    source: str
    planning_cc: float
    daily_cc: float
    path_dice: float | None = None
    touches_crop_border: bool = False
    flags: list[str] = field(default_factory=list)
    paths_validated: bool = True
    jacobian: dict[str, float] | None = None
    volume_change: float | None = None
    flag_codes: list[str] = field(default_factory=list)
    image_ncc: float | None = None
    image_ncc_prealigned: float | None = None
    centroid_shift_mm: float | None = None
    centroid_shift_xyz_mm: list[float] | None = None
    path_msd_mm: float | None = None
    image_fit_gain: float | None = None
    image_fit_shift_mm: float | None = None
    target_volume: bool = False
    residual_shift_mm: float | None = None
    residual_shift_xyz_mm: list[float] | None = None
    residual_ncc: float | None = None
    residual_ncc_gain: float | None = None
    method_dice: float | None = None
    method_msd_mm: float | None = None
    organ_family: str | None = None


def flag_structure(qa: StructureQa, thresholds: QaThresholds | None = None) -> StructureQa:
    """Fill ``qa.flags`` and ``qa.flag_codes`` from its figures (returns the same object)."""
    t = thresholds or QaThresholds()
    qa.flags.clear()
    qa.flag_codes.clear()

    def flag(code: str, text: str) -> None:
        qa.flag_codes.append(code)
        qa.flags.append(text)

    what = qa.organ.replace("_", " ") if qa.organ else qa.name
    if qa.daily_cc < t.min_volume_cc <= qa.planning_cc:
        flag(
            "nearly_empty",
            f"daily contour nearly empty ({qa.daily_cc:.2f} cc vs {qa.planning_cc:.1f} cc planned)",
        )
    qa.volume_change = None
    if qa.planning_cc > 0:
        change = qa.daily_cc / qa.planning_cc - 1.0
        qa.volume_change = round(change, 4)
        low, high = t.volume_change_range.get(qa.organ or "", t.default_volume_change_range)
        if not low <= change <= high and "nearly_empty" not in qa.flag_codes:
            flag(
                "volume_change",
                f"volume changed by {100 * change:+.0f} % from planning (plausible for a "
                f"{what}: {100 * low:+.0f} % .. {100 * high:+.0f} %)",
            )
    min_paths = t.min_path_dice_organ.get(qa.organ or "", t.min_path_dice)
    max_msd = t.max_path_msd_mm.get(qa.organ or "")
    if qa.path_dice is not None and qa.paths_validated and qa.path_dice < min_paths:
        flag(
            "path_disagreement",
            f"segmentation and registration paths disagree (Dice {qa.path_dice:.2f} < "
            f"{min_paths:.2f})",
        )
    elif (
        qa.path_msd_mm is not None
        and qa.paths_validated
        and max_msd is not None
        and qa.path_msd_mm > max_msd
    ):
        flag(
            "path_disagreement",
            f"segmentation and registration paths disagree (mean surface distance "
            f"{qa.path_msd_mm:.1f} mm > {max_msd:g} mm)",
        )
    if qa.touches_crop_border and t.flag_touching_box:
        flag("touches_box", "contour reaches the border of the network's region: may be cut off")
    jac = qa.jacobian
    if jac is not None and jac.get("outlier_fraction", 0.0) > t.max_jacobian_outlier_fraction:
        flag(
            "jacobian_outliers",
            f"DVF implausible inside the {what}: {100 * jac['outlier_fraction']:.1f} % of its "
            f"voxels have det J outside {jac['low']:g} .. {jac['high']:g} (min {jac['min']:.2f}, "
            f"max {jac['max']:.2f}; limit {100 * t.max_jacobian_outlier_fraction:.0f} %)",
        )
    ncc, ncc0 = qa.image_ncc, qa.image_ncc_prealigned
    cls = roi_class(qa.organ, qa.name, qa.target_volume)
    min_ncc = t.min_image_ncc.get(cls)
    if ncc is not None and min_ncc is not None and ncc < min_ncc:
        flag(
            "image_disagreement",
            f"daily CT and planning CT disagree around the {what} after the mapping (NCC "
            f"{ncc:.2f} < {min_ncc:.2f}): the contour may be misplaced",
        )
    elif ncc is not None and ncc0 is not None and ncc0 - ncc > t.max_image_ncc_loss:
        flag(
            "image_disagreement",
            f"the mapping made the scans agree less around the {what} than the pre-alignment "
            f"alone (NCC {ncc:.2f} vs {ncc0:.2f}; limit -{t.max_image_ncc_loss:.2f}): the "
            "contour may be misplaced",
        )
    max_shift = t.max_centroid_shift_mm.get(qa.organ or "")
    shift = qa.centroid_shift_mm
    if shift is not None and max_shift is not None and shift > max_shift:
        flag(
            "centroid_shift",
            f"the {what} moved {shift:.1f} mm from its pre-aligned planning position (plausible: "
            f"up to {max_shift:g} mm)",
        )
    max_gain = t.max_image_fit_gain.get(cls)
    gain = qa.image_fit_gain
    if gain is not None and max_gain is not None and gain > max_gain and cls != TARGETS:
        flag(
            "image_misfit",
            f"the {what} contour sits beside the daily CT's edges: moved by "
            f"{qa.image_fit_shift_mm or 0.0:.0f} mm it fits them {100 * gain:.0f} % better "
            f"(limit {100 * max_gain:.0f} %): is the planning contour on the organ?",
        )
    max_residual = t.max_residual_shift_mm.get(cls)
    residual = qa.residual_shift_mm
    if residual is not None and max_residual is not None and residual > max_residual:
        flag(
            "misregistration",
            f"the mapping is about {residual:.1f} mm off around the {what}: the planning CT "
            f"mapped onto the daily CT matches it best moved by that much (limit "
            f"{max_residual:g} mm); a contour carried by the mapping is off by as much",
        )
    min_method = t.min_method_dice.get(qa.organ or "")
    max_method_msd = t.max_method_msd_mm.get(qa.organ or "")
    if qa.method_dice is not None and min_method is not None and qa.method_dice < min_method:
        flag(
            "method_disagreement",
            f"the iterative method and the network map the {what} differently (Dice "
            f"{qa.method_dice:.2f} < {min_method:.2f}): at least one of them is wrong there",
        )
    elif (
        qa.method_msd_mm is not None
        and max_method_msd is not None
        and qa.method_msd_mm > max_method_msd
    ):
        flag(
            "method_disagreement",
            f"the iterative method and the network map the {what} differently (mean surface "
            f"distance {qa.method_msd_mm:.1f} mm > {max_method_msd:g} mm): at least one of them "
            "is wrong there",
        )
    return qa


def flag_dvf(stats: dict[str, float], thresholds: QaThresholds | None = None) -> list[str]:
    """Reasons to review the DVF (folding), from `jacobian_stats` figures."""
    t = thresholds or QaThresholds()
    flags: list[str] = []
    fold = stats.get("folding_fraction", math.nan)
    if not math.isnan(fold) and fold > t.max_folding_fraction:
        flags.append(
            f"DVF folds in {100 * fold:.2f} % of body voxels "
            f"(limit {100 * t.max_folding_fraction:.2f} %)"
        )
    return flags


def structures_to_json(items: list[StructureQa]) -> list[dict[str, Any]]:
    """Plain dicts for qa.json."""
    return [asdict(s) for s in items]
