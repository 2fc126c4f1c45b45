"""From the QA calibration's records to thresholds.

Samples (a figure and a label per structure), the rates of any set of thresholds, and the search
for the thresholds that meet the targets.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

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
from research.qa_cases import (
    _ORGAN_TABLES,
    CLINICAL_VOLUME_ENVELOPE,
    FLAGS,
    GOOD_WRONG_DVF,
    MAX_NEARLY_EMPTY_CC,
    MIN_CLASS_GOOD,
    MIN_RESIDUAL_LIMIT_MM,
    STRUCTURE_FLAGS,
    TARGET_FALSE_FLAG_RATE,
    TARGET_RECALL,
    WRONG_DVF_POPULATIONS,
    TruthCriteria,
    label_contour,
)
from research.qa_runs import _QA_FIELDS

log = logging.getLogger(__name__)

#: Values of a threshold that never fires.
_OFF_LOW, _OFF_HIGH = -1.0, 100.0
#: ... for the image NCC (never below -1), its loss (never above 2) and the centroid shift (mm).
_OFF_NCC, _OFF_NCC_LOSS, _OFF_SHIFT_MM = -1.0, 2.0, 1000.0


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
