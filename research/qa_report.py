"""The QA calibration's report, in JSON and Markdown.

Rates per flag, population and structure, the figures' spread and the chosen thresholds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from jrs.core.errors import InvalidInput
from jrs.qa.figures import (
    QaThresholds,
)
from research.qa_cases import (
    BAD_ABOVE_MSD_MM,
    BAD_BELOW_DSC,
    FIGURES,
    FLAGS,
    GOOD_MIN_DSC,
    GOOD_WRONG_DVF,
    MIN_CLASS_GOOD,
    POPULATIONS,
    STRUCTURE_FLAGS,
    TARGET_FALSE_FLAG_RATE,
    TARGET_RECALL,
    WRONG_DVF_POPULATIONS,
    TruthCriteria,
)
from research.qa_choice import (
    Samples,
    _get,
    choose_thresholds,
    fired_matrix,
    flags_of,
    rates,
    samples_from_records,
    search_parameters,
    thresholds_with,
)

log = logging.getLogger(__name__)


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
