"""Quality-assurance figures and flags: where should a human look?

Per structure: planning and daily volume, agreement between the network's two output paths
(segmentation vs planning contours warped by the DVF), and flags with reasons. For the DVF: the
Jacobian determinant of x -> x + u(x) (u in mm) over the body: minimum, folding fraction
(det J <= 0), standard deviation and the standard deviation of log det J (as Learn2Reg).
"""

from __future__ import annotations

import math
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
    det = jacobian_determinant(dvf)
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


@dataclass(frozen=True)
class QaThresholds:
    """When a structure or the DVF is flagged for review.

    Attributes:
        min_path_dice: flag when the segmentation and registration paths agree less (Dice).
        max_relative_volume_change: organ key -> flag when |daily/planning - 1| exceeds it
            (bladder filling legitimately changes by -50 % .. +100 %).
        default_volume_change: for structures not in the table.
        max_folding_fraction: flag the DVF when more voxels fold (det J <= 0).
        min_volume_cc: flag a structure smaller than this (lost or nearly lost).
    """

    min_path_dice: float = 0.8
    max_relative_volume_change: dict[str, float] = field(
        default_factory=lambda: {
            "bladder": 1.2,
            "rectum": 0.6,
            "seminal_vesicles": 0.4,
            "prostate": 0.2,
        }
    )
    default_volume_change: float = 0.3
    max_folding_fraction: float = 0.005
    min_volume_cc: float = 0.5


@dataclass
class StructureQa:
    """QA of one output structure.

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
    """

    name: str
    organ: str | None
    source: str
    planning_cc: float
    daily_cc: float
    path_dice: float | None = None
    touches_crop_border: bool = False
    flags: list[str] = field(default_factory=list)


def flag_structure(qa: StructureQa, thresholds: QaThresholds | None = None) -> StructureQa:
    """Fill ``qa.flags`` from its figures and the thresholds (returns the same object)."""
    t = thresholds or QaThresholds()
    qa.flags.clear()
    if qa.daily_cc < t.min_volume_cc <= qa.planning_cc:
        qa.flags.append(
            f"daily contour nearly empty ({qa.daily_cc:.2f} cc vs {qa.planning_cc:.1f} cc planned)"
        )
    if qa.planning_cc > 0:
        change = qa.daily_cc / qa.planning_cc - 1.0
        limit = t.max_relative_volume_change.get(qa.organ or "", t.default_volume_change)
        if abs(change) > limit:
            qa.flags.append(
                f"volume changed by {100 * change:+.0f} % from planning "
                f"(limit +-{100 * limit:.0f} %)"
            )
    if qa.path_dice is not None and qa.path_dice < t.min_path_dice:
        qa.flags.append(
            f"segmentation and registration paths disagree (Dice {qa.path_dice:.2f} < "
            f"{t.min_path_dice:.2f})"
        )
    if qa.touches_crop_border:
        qa.flags.append("contour reaches the border of the network's region: may be cut off")
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
