"""Held-out validation of the whole pipeline on generated phantom fractions.

For each phantom (a seed never used in training) the planning CT + RTSTRUCT and one daily
fraction are written as DICOM and re-contoured through `jrs.pipeline.recontour` exactly as a user
would run it, once with the network and once with the iterative B-spline baseline. Every output
path is compared with the phantom's true daily structures on the daily CT grid:

* ``segmentation``: the network's segmentation path (post-processed);
* ``registration``: the planning organs warped by the network DVF (post-processed);
* ``chosen``: the contours of the written ``rtstruct.dcm`` (per-organ path choice of the model);
* ``iterative``: the contours of the B-spline baseline's ``rtstruct.dcm``.

Per organ: DSC and MSD (mm); per run: the per-stage timings of ``qa.json``. Results go to a CSV
(one row per case, path and organ), a JSON of the timings and a Markdown report.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from jrs.errors import InvalidInput
from jrs.geometry import Volume
from jrs.labels import BLADDER, DEFAULT_ROI_NAMES, LABELS, PROSTATE, RECTUM, SEMINAL_VESICLES
from jrs.metrics import dice, surface_distances

log = logging.getLogger(__name__)

#: Organs of the tables, in the paper's order.
ORGANS: tuple[int, ...] = (PROSTATE, SEMINAL_VESICLES, RECTUM, BLADDER)
#: Output paths compared, in table order.
PATHS: tuple[str, ...] = ("segmentation", "registration", "chosen", "iterative")

__all__ = ["ORGANS", "PATHS", "HeldoutReport", "report_markdown", "validate_heldout"]


@dataclass
class HeldoutReport:
    """Outcome of `validate_heldout`.

    Attributes:
        rows: one dict per (case, path, organ): ``case``, ``path``, ``organ``, ``dsc``, ``msd``.
        timings: case -> method -> stage -> seconds (from ``qa.json``) plus ``wall``.
        markdown: the Markdown report.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    markdown: str = ""


def _score(
    pred: npt.NDArray[Any], truth: npt.NDArray[np.bool_], volume: Volume
) -> dict[str, float]:
    return {
        "dsc": round(dice(pred, truth), 4),
        "msd": round(surface_distances(pred, truth, volume.geometry).msd, 3),
    }


def validate_heldout(
    seeds: Sequence[int],
    *,
    fraction: int = 1,
    model_dir: Path | None = None,
    device: str = "auto",
    iterative: bool = True,
    slice_mm: float | None = None,
    matrix: int = 512,
    out_dir: Path | str | None = None,
    progress: Callable[[str], None] | None = None,
) -> HeldoutReport:
    """Re-contour held-out phantom fractions and score every output path against the truth.

    Args:
        seeds: phantom seeds (one patient each; use seeds never used in training).
        fraction: fraction index re-contoured for each patient.
        model_dir: model version folder; default the bundled model.
        device: ``auto``, ``cpu`` or ``cuda``.
        iterative: also run the B-spline baseline (``--method iterative``).
        slice_mm: phantom slice thickness (None: the seed's draw).
        matrix: phantom in-plane matrix (512 as a clinical CT; smaller for quick checks).
        out_dir: where to write ``heldout.csv``, ``timings.json`` and ``report.md`` (None: nothing).
        progress: called with a short message after each run.

    Returns:
        The report.
    """
    from jrs.dicom.rtstruct import masks_from_files
    from jrs.phantom import generate_fraction, generate_patient, write_fraction, write_patient
    from jrs.pipeline import RecontourOptions, recontour

    if not seeds:
        raise InvalidInput("held-out validation needs at least one phantom seed")
    report = HeldoutReport()
    for seed in seeds:
        case = f"phantom{seed}_f{fraction}"
        report.timings[case] = {}
        with tempfile.TemporaryDirectory(prefix="jrs-heldout-") as tmp:
            root = Path(tmp)
            patient = generate_patient(seed, matrix=matrix, slice_thickness=slice_mm)
            write_patient(patient, root)
            frac = generate_fraction(patient, fraction)
            write_fraction(frac, root / f"fraction_{fraction}")
            daily_dir = root / f"fraction_{fraction}" / "ct"
            truth = {lab: frac.structures[DEFAULT_ROI_NAMES[LABELS[lab]]] for lab in ORGANS}
            daily_ref = Volume(np.zeros(frac.ct.geometry.shape, np.uint8), frac.ct.geometry)
            methods = ["network", "iterative"] if iterative else ["network"]
            for method in methods:
                t0 = time.perf_counter()
                result = recontour(
                    root / "planning" / "ct",
                    root / "planning" / "rtstruct.dcm",
                    daily_dir,
                    root / f"out_{method}",
                    RecontourOptions(method=method, model_dir=model_dir, device=device),  # type: ignore[arg-type]
                )
                wall = time.perf_counter() - t0
                report.timings[case][method] = {
                    **{k: float(v) for k, v in result.qa_data["timings_s"].items()},
                    "wall": round(wall, 3),
                }
                _, _, written = masks_from_files(daily_dir, result.rtstruct)
                if method == "network":
                    maps = {
                        name: result.path_labels[name].resample(daily_ref.geometry, "label", 0)
                        for name in ("segmentation", "registration")
                        if name in result.path_labels
                    }
                    for name, lab_map in maps.items():
                        for lab in ORGANS:
                            report.rows.append(
                                {
                                    "case": case,
                                    "path": name,
                                    "organ": LABELS[lab],
                                    **_score(lab_map.array == lab, truth[lab], daily_ref),
                                }
                            )
                path = "chosen" if method == "network" else "iterative"
                for lab in ORGANS:
                    mask = written[DEFAULT_ROI_NAMES[LABELS[lab]]].array
                    report.rows.append(
                        {
                            "case": case,
                            "path": path,
                            "organ": LABELS[lab],
                            **_score(mask, truth[lab], daily_ref),
                        }
                    )
                if progress is not None:
                    progress(f"{case} {method}: {wall:.1f} s")
    report.markdown = report_markdown(report.rows, report.timings)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with (out / "heldout.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["case", "path", "organ", "dsc", "msd"])
            writer.writeheader()
            writer.writerows(report.rows)
        (out / "timings.json").write_text(json.dumps(report.timings, indent=2) + "\n")
        (out / "report.md").write_text(report.markdown)
    return report


def _mean_sd(values: Sequence[float], digits: int) -> str:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return "n/a"
    missing = len(values) - len(vals)
    text = f"{np.mean(vals):.{digits}f} ± {np.std(vals):.{digits}f}"
    return text + (f" ({missing} empty)" if missing else "")


def report_markdown(
    rows: Sequence[dict[str, Any]], timings: dict[str, dict[str, dict[str, float]]]
) -> str:
    """The Markdown tables: DSC and MSD per organ and path (mean ± sd), stage times per method."""
    cases = sorted({r["case"] for r in rows})
    lines = [
        f"# Held-out validation ({len(cases)} phantom fractions: {', '.join(cases)})",
        "",
        "DSC and MSD (mm) against the phantom's true daily structures on the daily CT grid; "
        "mean ± sd over the cases. MSD is n/a where a path produced an empty structure.",
        "",
        "| path | " + " | ".join(f"{LABELS[o]} DSC | {LABELS[o]} MSD" for o in ORGANS) + " |",
        "|---|" + "---|---|" * len(ORGANS),
    ]
    for path in PATHS:
        sel = [r for r in rows if r["path"] == path]
        if not sel:
            continue
        cells = []
        for organ in ORGANS:
            org = [r for r in sel if r["organ"] == LABELS[organ]]
            cells.append(_mean_sd([float(r["dsc"]) for r in org], 3))
            cells.append(_mean_sd([float(r["msd"]) for r in org], 2))
        lines.append(f"| {path} | " + " | ".join(cells) + " |")
    methods = sorted({m for per in timings.values() for m in per})
    for method in methods:
        runs = [per[method] for per in timings.values() if method in per]
        stages: list[str] = []
        for run in runs:
            for stage in run:
                if stage not in stages:
                    stages.append(stage)
        lines += [
            "",
            f"Stage times, `--method {method}` (s, mean ± sd over the cases):",
            "",
            "| " + " | ".join(stages) + " |",
            "|" + "---|" * len(stages),
            "| "
            + " | ".join(_mean_sd([run[s] for run in runs if s in run], 2) for s in stages)
            + " |",
        ]
    return "\n".join(lines) + "\n"
