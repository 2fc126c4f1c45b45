"""Quality-assurance figures and flags: where should a human look?

Per structure: planning and daily volume and their relative change, agreement between the
network's two output paths (segmentation vs planning contours warped by the DVF), whether the
contour reaches the border of the network's box, the Jacobian determinant of the mapping inside
the organ, and flags with reasons. For the DVF: the Jacobian determinant of x -> x + u(x) (u in mm)
over the body: minimum, folding fraction (det J <= 0), standard deviation and the standard
deviation of log det J (as Learn2Reg).

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

from jrs.geometry import Volume
from jrs.transforms import jacobian_determinant


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
    "dvf_folding": "the DVF folds in part of the body",
}


@dataclass(frozen=True)
class QaThresholds:
    """When a structure or the DVF is flagged for review (all thresholds in one place).

    The defaults are clinical priors, not yet calibrated against ground truth; calibration
    replaces them (one `QaThresholds`), the figures they apply to are kept in ``qa.json``.

    Attributes:
        min_path_dice: flag when the segmentation and registration paths agree less (Dice);
            only for organs whose two paths the model validates (`validated_paths`).
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
    """

    min_path_dice: float = 0.8
    volume_change_range: dict[str, tuple[float, float]] = field(
        default_factory=lambda: {
            "bladder": (-0.6, 1.5),
            "rectum": (-0.5, 0.8),
            "seminal_vesicles": (-0.35, 0.35),
            "prostate": (-0.1, 0.1),
        }
    )
    default_volume_change_range: tuple[float, float] = (-0.3, 0.3)
    jacobian_range: dict[str, tuple[float, float]] = field(
        default_factory=lambda: {
            "bladder": (0.25, 4.0),
            "rectum": (0.4, 2.5),
            "seminal_vesicles": (0.5, 2.0),
            "prostate": (0.7, 1.4),
        }
    )
    default_jacobian_range: tuple[float, float] = (0.5, 2.0)
    max_jacobian_outlier_fraction: float = 0.05
    max_folding_fraction: float = 0.005
    min_volume_cc: float = 0.5
    flag_touching_box: bool = True


def organ_jacobian(
    det: npt.NDArray[np.floating[Any]],
    mask: npt.ArrayLike,
    organ: str | None,
    thresholds: QaThresholds | None = None,
) -> dict[str, float] | None:
    """Jacobian-determinant figures of the mapping inside one organ.

    Args:
        det: (nz, ny, nx) det J of the mapping (`jrs.transforms.jacobian_determinant`).
        mask: (nz, ny, nx) the organ on the same grid.
        organ: organ key (chooses the plausible range), None for the default range.
        thresholds: QA thresholds (the range).

    Returns:
        ``{"min", "max", "outlier_fraction", "folding_fraction", "low", "high"}`` or None for an
        empty mask; ``outlier_fraction`` counts voxels outside ``[low, high]`` (folding
        included).
    """
    t = thresholds or QaThresholds()
    sel = np.asarray(det)[np.asarray(mask) > 0]
    if sel.size == 0:
        return None
    low, high = t.jacobian_range.get(organ or "", t.default_jacobian_range)
    return {
        "min": round(float(sel.min()), 4),
        "max": round(float(sel.max()), 4),
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
    table = metadata.get("validated_paths")
    if isinstance(table, Mapping):
        paths = table.get(organ, table.get("*"))
        if paths is not None:
            return {str(p) for p in paths}
    choice = metadata.get("path_choice")
    if isinstance(choice, Mapping) and organ in choice:
        return {str(choice[organ])}
    return both


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
        paths_validated: both output paths are validated for this organ (else a path
            disagreement is not flagged).
        jacobian: `organ_jacobian` figures inside the organ (None when not computed).
        volume_change: daily/planning - 1 (None when the planning volume is 0).
        flag_codes: one `FLAG_CODES` key per flag, same order as ``flags``.
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


def flag_structure(qa: StructureQa, thresholds: QaThresholds | None = None) -> StructureQa:
    """Fill ``qa.flags`` and ``qa.flag_codes`` from its figures (returns the same object)."""
    t = thresholds or QaThresholds()
    qa.flags.clear()
    qa.flag_codes.clear()

    def flag(code: str, text: str) -> None:
        qa.flag_codes.append(code)
        qa.flags.append(text)

    what = (qa.organ or "structure").replace("_", " ")
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
    if qa.path_dice is not None and qa.paths_validated and qa.path_dice < t.min_path_dice:
        flag(
            "path_disagreement",
            f"segmentation and registration paths disagree (Dice {qa.path_dice:.2f} < "
            f"{t.min_path_dice:.2f})",
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
