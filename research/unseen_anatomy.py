"""Cross-generator evaluation of `jrs recontour` on anatomy the model never saw (issue 30).

Not part of the product (``research/`` is not installed). For every case folder in the phantom
layout (``CASE/planning/{ct,rtstruct.dcm}``, ``CASE/fraction_<k>/{ct,rtstruct.dcm,true_dvf.mha}``)
and every method variant, it runs `jrs.pipeline.run.recontour` as a user would and scores:

* the four organs: DSC and MSD (mm) of the written RTSTRUCT against the fraction's truth;
* the distant ROIs (femoral heads, the body outline): centroid error, mm;
* the exported DVF against the true DVF: mean and 95th percentile of the vector error over the
  daily body, and over the body outside the network box (mm);
* the timings of ``qa.json``.

Usage::

    python research/unseen_anatomy.py --cases DIR [DIR ...] --variants network,iterative \
        --out results.json

A variant is ``method[+key=value...]``, e.g. ``network+far_field=focus`` or
``network+refine=off``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

import jrs.pipeline.run as pipeline
from jrs.core.geometry import Volume
from jrs.core.labels import LABELS, SynonymTable, label_map_from_masks
from jrs.core.metrics import dice, surface_distances
from jrs.io.rtstruct import masks_from_files
from jrs.pipeline.options import RecontourOptions
from jrs.pipeline.run import recontour

log = logging.getLogger("unseen_anatomy")

ORGANS = ("prostate", "seminal_vesicles", "rectum", "bladder")
DISTANT = re.compile(r"(femo|femur|head|external|body|outline)", re.IGNORECASE)


#: the network's registration path before and after the refinement, captured on each run
_CAPTURED: dict[str, Volume] = {}
_REFINE = pipeline.refine_paths


def _capturing_refine(paths: Any, pair: Any, used: Any) -> Any:
    """`jrs.pipeline.methods.refine_paths`, keeping the registration path before and after it."""
    _CAPTURED["before"] = Volume(paths.registration.copy(), pair.grid)
    report = _REFINE(paths, pair, used)
    _CAPTURED["after"] = Volume(paths.registration.copy(), pair.grid)
    return report


pipeline.refine_paths = _capturing_refine  # research only: the product never patches itself


def _options(variant: str) -> RecontourOptions:
    method, *pairs = variant.split("+")
    opts = RecontourOptions(method=method)  # type: ignore[arg-type]
    for pair in pairs:
        key, value = pair.split("=", 1)
        current = getattr(opts, key)
        if isinstance(current, bool):
            setattr(opts, key, value.lower() in ("1", "on", "true", "yes"))
        elif isinstance(current, float):
            setattr(opts, key, float(value))
        else:
            setattr(opts, key, value)
    return opts


def _centroid(mask: np.ndarray, volume: Volume) -> np.ndarray:
    idx = np.argwhere(mask).mean(axis=0)[::-1]
    return volume.geometry.index_to_physical(idx)


def _dvf_errors(
    dvf_path: Path,
    truth_path: Path,
    body: np.ndarray,
    truth_geom: Any,
    box: dict[str, list[float]] | None,
) -> dict[str, float]:
    """Vector error of the exported DVF against the truth, on the truth grid over the body."""
    truth = sitk.ReadImage(str(truth_path))
    est = sitk.ReadImage(str(dvf_path))
    est_on = sitk.Resample(
        est, truth, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64
    )
    t = sitk.GetArrayViewFromImage(truth)
    e = sitk.GetArrayViewFromImage(est_on)
    err = np.sqrt(((t - e) ** 2).sum(axis=-1))
    out = {
        "dvf_mean_err_mm": float(err[body].mean()),
        "dvf_p95_err_mm": float(np.percentile(err[body], 95)),
    }
    if box is not None:
        pts = truth_geom.voxel_centres()
        lo, hi = np.asarray(box["lower"]), np.asarray(box["upper"])
        inside = np.all((pts >= lo) & (pts <= hi), axis=-1)
        outside = body & ~inside
        if outside.any():
            out["dvf_mean_err_outside_box_mm"] = float(err[outside].mean())
        if (body & inside).any():
            out["dvf_mean_err_in_box_mm"] = float(err[body & inside].mean())
    return out


def score_case(
    case: Path, fraction: Path, variant: str, table: SynonymTable | None, work: Path
) -> dict[str, Any]:
    """Run one variant on one fraction and score it."""
    opts = _options(variant)
    opts.synonyms = table
    out = work / f"{case.name}_{fraction.name}_{variant}"
    t0 = time.perf_counter()
    result = recontour(
        case / "planning" / "ct", case / "planning" / "rtstruct.dcm", fraction / "ct", out, opts
    )
    wall = time.perf_counter() - t0
    _, series, truth_masks = masks_from_files(fraction / "ct", fraction / "rtstruct.dcm")
    _, _, written = masks_from_files(fraction / "ct", result.rtstruct)
    truth = {n: v.array.view(np.bool_) for n, v in truth_masks.items()}
    _, used = label_map_from_masks(truth, table)
    ref = series.volume
    row: dict[str, Any] = {
        "case": case.name,
        "fraction": fraction.name,
        "variant": variant,
        "wall_s": round(wall, 2),
        "timings_s": result.qa_data["timings_s"],
    }
    for lab, name in used.items():
        organ = LABELS[lab]
        pred = written[name].array.view(np.bool_)
        sd = surface_distances(pred, truth[name], ref.geometry)
        row[organ] = {"dsc": round(dice(pred, truth[name]), 4), "msd": round(sd.msd, 3)}
    distant: dict[str, float | None] = {}
    body = None
    for name, mask in truth.items():
        if DISTANT.search(name) and mask.any() and name in written:
            pred = written[name].array.view(np.bool_)
            if not pred.any():
                distant[name] = None
                continue
            err = np.linalg.norm(_centroid(pred, ref) - _centroid(mask, ref))
            distant[name] = round(float(err), 3)
            if re.search("external|body|outline", name, re.IGNORECASE):
                body = mask
    row["distant_centroid_err_mm"] = distant
    for when, lab_map in list(_CAPTURED.items()):
        on_daily = lab_map.resample(ref.geometry, "label", 0).array
        for lab, name in used.items():
            sd = surface_distances(on_daily == lab, truth[name], ref.geometry)
            row.setdefault(f"registration_path_{when}_refine", {})[LABELS[lab]] = {
                "dsc": round(dice(on_daily == lab, truth[name]), 4),
                "msd": round(sd.msd, 3),
            }
    _CAPTURED.clear()
    if body is None:
        body = ref.array > -400
    row.update(
        {
            k: round(v, 3)
            for k, v in _dvf_errors(
                result.dvf,
                fraction / "true_dvf.mha",
                body,
                ref.geometry,
                result.qa_data.get("network_box_mm"),
            ).items()
        }
    )
    qa = {s["name"]: s["flags"] for s in result.qa_data["structures"]}
    row["flags"] = qa
    row["qa_structures"] = result.qa_data["structures"]
    row["refine"] = result.qa_data.get("refine")
    row["far_field"] = result.qa_data.get("prealign", {}).get("far_field")
    return row


def report(rows: list[dict[str, Any]]) -> str:
    """Markdown tables: per case and variant, organ DSC / MSD, distant ROIs, DVF, time."""
    lines = [
        "| case | variant | prostate | seminal ves. | rectum | bladder | distant ROI centroid "
        "max (mm) | DVF mean err body / outside box (mm) | total s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = []
        for organ in ORGANS:
            v = r.get(organ)
            cells.append(f"{v['dsc']:.3f} ({v['msd']:.2f})" if v else "-")
        distant = [v for v in r["distant_centroid_err_mm"].values() if v is not None]
        outside = r.get("dvf_mean_err_outside_box_mm")
        lines.append(
            f"| {r['case']} | {r['variant']} | {' | '.join(cells)} | "
            f"{max(distant) if distant else float('nan'):.2f} | {r['dvf_mean_err_mm']:.2f} / "
            f"{outside if outside is not None else float('nan'):.2f} | "
            f"{r['timings_s']['total']:.0f} |"
        )
    refine = [r for r in rows if "registration_path_before_refine" in r]
    if refine:
        lines += [
            "",
            "Registration path before -> after the refinement, DSC (MSD mm):",
            "",
            "| case | " + " | ".join(ORGANS) + " |",
            "|---|" + "---|" * len(ORGANS),
        ]
        for r in refine:
            b, a = r["registration_path_before_refine"], r["registration_path_after_refine"]
            cells = [
                f"{b[o]['dsc']:.3f} ({b[o]['msd']:.2f}) -> {a[o]['dsc']:.3f} ({a[o]['msd']:.2f})"
                if o in b
                else "-"
                for o in ORGANS
            ]
            lines.append(f"| {r['case']} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


#: issue 30's labels: a bad organ contour has DSC < 0.90 or MSD > 2 mm; a good one DSC >= 0.95
BAD_DSC, BAD_MSD_MM, GOOD_DSC = 0.90, 2.0, 0.95


def qa_rates(rows: list[dict[str, Any]]) -> str:
    """Markdown: per method, how the QA flags the bad organs and spares the good ones.

    An organ's contour is the written ROI the synonym table took for it (``organ`` in
    ``qa.json``); it is flagged when that ROI carries any flag.
    """
    lines = [
        "| method | organs | bad (DSC < 0.90 or MSD > 2 mm) | flagged bad (recall) | "
        "good (DSC >= 0.95) | flagged good (false-flag rate) | missed bad | flagged good |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method in sorted({r["variant"] for r in rows}):
        for organs, label in ((ORGANS, "all four"), (ORGANS[::2] + ORGANS[3:], "no SV")):
            bad = hit = good = false = 0
            missed: list[str] = []
            spurious: list[str] = []
            for r in (r for r in rows if r["variant"] == method):
                flagged = {
                    s["organ"]: bool(s["flags"]) for s in r["qa_structures"] if s.get("organ")
                }
                for organ in organs:
                    v = r.get(organ)
                    if not v or organ not in flagged:
                        continue
                    where = f"{r['case']} {organ} {v['dsc']:.3f}/{v['msd']:.2f}"
                    if v["dsc"] < BAD_DSC or v["msd"] > BAD_MSD_MM:
                        bad += 1
                        hit += flagged[organ]
                        if not flagged[organ]:
                            missed.append(where)
                    elif v["dsc"] >= GOOD_DSC:
                        good += 1
                        false += flagged[organ]
                        if flagged[organ]:
                            spurious.append(where)
            lines.append(
                f"| {method} | {label} | {bad} | {hit} ({hit / bad if bad else float('nan'):.2f})"
                f" | {good} | {false} ({false / good if good else float('nan'):.2f}) | "
                f"{'; '.join(missed) or '-'} | {'; '.join(spurious) or '-'} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run the variants on the cases; results are appended to ``--out`` (resumable)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", type=Path, default=[])
    parser.add_argument("--variants", default="network,iterative")
    parser.add_argument("--synonyms", type=Path, default=None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--report", action="store_true", help="print the tables of --out")
    args = parser.parse_args()
    if args.report:
        kept = json.loads(args.out.read_text())
        print(report(kept) + "\n" + qa_rates(kept))  # noqa: T201 (a script's output)
        return
    logging.basicConfig(level=logging.WARNING)
    table = SynonymTable.from_yaml(args.synonyms) if args.synonyms else None
    rows: list[dict[str, Any]] = []
    if args.out.exists():
        rows = json.loads(args.out.read_text())
    done = {(r["case"], r["fraction"], r["variant"]) for r in rows}
    with tempfile.TemporaryDirectory(prefix="jrs-unseen-") as tmp:
        for case in args.cases:
            for fraction in sorted(case.glob("fraction_*")):
                for variant in args.variants.split(","):
                    if (case.name, fraction.name, variant) in done:
                        continue
                    row = score_case(case, fraction, variant, table, Path(tmp))
                    rows.append(row)
                    args.out.write_text(json.dumps(rows, indent=1, default=float))
                    brief = {o: row.get(o) for o in ORGANS if o in row}
                    log.warning(
                        "%s %s %s %.0f s %s distant %s dvf %.2f/%s",
                        case.name,
                        fraction.name,
                        variant,
                        row["wall_s"],
                        brief,
                        row["distant_centroid_err_mm"],
                        row["dvf_mean_err_mm"],
                        row.get("dvf_mean_err_outside_box_mm"),
                    )


if __name__ == "__main__":
    main()
