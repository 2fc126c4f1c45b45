"""Adapted vs generic vs iterative on held-out patients: the measurement of patient adaptation.

``python -m research adaptation --cases 5 --seed 3000 --model models/crossstitch/3
--planning-ct REAL/ct --planning-rtstruct REAL/rtstruct.dcm --report DIR`` (or
:func:`benchmark_adaptation`) does, for each held-out phantom patient (seeds ``seed`` ..
``seed + cases - 1``, never used in training) and for the given real planning scan (a patient kept
out of training):

1. the planning scan as DICOM and its test fractions with their true contours: a phantom's own
   fractions (:func:`jrs.synth.generate_fraction`: analytic motion, not the deformation engine
   the adaptation trains on), or, for the real scan, synthetic fractions of the engine
   (:func:`jrs.synth.from_planning.write_from_planning`) with seeds the adaptation never uses
   (real daily scans with contours would be better: there are none here);
2. the adaptation (:func:`jrs.training.adapt.adapt`, the given budget), timed, with its decision;
3. each fraction re-contoured through :func:`jrs.pipeline.run.recontour` with the generic model
   (``--model``), the patient model folder and the iterative baseline, scored per organ (DSC,
   MSD in mm) against the true contours on the daily CT grid.

The report (``rows.csv``, ``report.md``, ``summary.json``) holds the tables per group (phantoms,
real) and the acceptance checks: adapted >= generic on every organ (mean DSC), the real patient
within 0.01 DSC of the iterative baseline or better, adaptation <= 20 minutes.
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

from jrs.core.errors import InvalidInput
from jrs.training.adapt import ArtefactWriter, adapt
from jrs.training.adapt_options import AdaptOptions

log = logging.getLogger(__name__)

METHODS = ("generic", "adapted", "iterative")
ORGANS = ("prostate", "seminal_vesicles", "rectum", "bladder")
#: Seeds of the real scan's test fractions (the adaptation uses its own, from 0).
REAL_TEST_SEED = 5000
#: Acceptance of the issue.
MAX_ADAPT_MINUTES = 20.0
ITERATIVE_DSC_MARGIN = 0.01

__all__ = ["AdaptationBenchmark", "benchmark_adaptation", "report_markdown"]


@dataclass
class AdaptationBenchmark:
    """What :func:`benchmark_adaptation` measured.

    Attributes:
        rows: One dict per (group, case, fraction, method, organ): ``dsc``, ``msd``.
        adaptations: One dict per case: ``kept``, ``reason``, ``seconds``, ``steps``.
        checks: Acceptance check -> ``{"passed": bool, "detail": str}``.
        markdown: The report.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    adaptations: list[dict[str, Any]] = field(default_factory=list)
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    markdown: str = ""


@dataclass
class _Case:
    group: str
    name: str
    planning_ct: Path
    planning_rtstruct: Path
    fractions: list[tuple[Path, Path]]  # (daily CT folder, true RTSTRUCT)


def _phantom_case(
    seed: int, fractions: int, matrix: int, slice_mm: float | None, root: Path
) -> _Case:
    from jrs.synth import generate_fraction, generate_patient, write_fraction, write_patient

    patient = generate_patient(seed, matrix=matrix, slice_thickness=slice_mm)
    folder = root / f"phantom{seed}"
    write_patient(patient, folder)
    fx = []
    for k in range(1, fractions + 1):
        write_fraction(generate_fraction(patient, k), folder / f"fraction_{k}")
        fx.append((folder / f"fraction_{k}" / "ct", folder / f"fraction_{k}" / "rtstruct.dcm"))
    planning = folder / "planning"
    return _Case("phantoms", f"phantom{seed}", planning / "ct", planning / "rtstruct.dcm", fx)


def _real_case(ct: Path, rtstruct: Path, fractions: int, root: Path) -> _Case:
    from jrs.synth.from_planning import write_from_planning

    folder = write_from_planning(ct, rtstruct, root / "real", fractions, seed=REAL_TEST_SEED)
    fx = [
        (folder / f"fraction_{k}" / "ct", folder / f"fraction_{k}" / "rtstruct.dcm")
        for k in range(1, fractions + 1)
    ]
    return _Case("real", folder.name, Path(ct), Path(rtstruct), fx)


def _organ_masks(ct: Path, rtstruct: Path) -> tuple[dict[str, np.ndarray], Any]:
    """Organ key -> mask on the CT grid (ROI names mapped by the synonym table)."""
    from jrs.core.labels import LABELS, SynonymTable
    from jrs.io.rtstruct import masks_from_files

    _, series, masks = masks_from_files(ct, rtstruct)
    used = SynonymTable().resolve(masks).used
    return {LABELS[k]: masks[name].array > 0 for k, name in used.items()}, series.volume.geometry


def _score(
    case: _Case, k: int, method: str, out: Path, daily: Path, truth_rs: Path
) -> list[dict[str, Any]]:
    from jrs.core.metrics import dice, surface_distances

    truth, geometry = _organ_masks(daily, truth_rs)
    pred, _ = _organ_masks(daily, out / "rtstruct.dcm")
    rows = []
    for organ in ORGANS:
        if organ not in truth or not truth[organ].any():
            continue
        p = pred.get(organ, np.zeros_like(truth[organ]))
        rows.append(
            {
                "group": case.group,
                "case": case.name,
                "fraction": k,
                "method": method,
                "organ": organ,
                "dsc": round(dice(p, truth[organ]), 4),
                "msd": round(surface_distances(p, truth[organ], geometry).msd, 3),
            }
        )
    return rows


def benchmark_adaptation(
    seeds: Sequence[int],
    writer: ArtefactWriter,
    *,
    base: Path | None = None,
    real: tuple[Path, Path] | None = None,
    fractions: int = 3,
    options: AdaptOptions | None = None,
    iterative: bool = True,
    matrix: int = 512,
    slice_mm: float | None = None,
    device: str = "auto",
    out_dir: Path | str | None = None,
    progress: Callable[[str], None] | None = None,
) -> AdaptationBenchmark:
    """Adapt to each held-out patient and compare generic, adapted and iterative contours.

    Args:
        seeds: Held-out phantom seeds (one patient each; never used in training).
        writer: The model writer of the adaptation (``jrs.model_export.export.ArtefactWriter()``).
        base: The generic (base) model folder; default the bundled model.
        real: ``(planning CT folder, RTSTRUCT)`` of a real patient kept out of training.
        fractions: Test fractions per patient.
        options: Adaptation options (budget ...; default :class:`AdaptOptions`).
        iterative: Also run the iterative B-spline baseline.
        matrix: Phantom in-plane matrix (512 as a clinical CT; 128 for a dry run).
        slice_mm: Phantom slice thickness (None: the seed's draw).
        device: ``auto``, ``cpu`` or ``cuda`` (pipeline and adaptation).
        out_dir: Where to write ``rows.csv``, ``report.md``, ``summary.json`` (None: nowhere).
        progress: Called with a short message after each step.

    Returns:
        The rows, adaptations, acceptance checks and the Markdown report.
    """
    from jrs.pipeline.options import RecontourOptions
    from jrs.pipeline.run import recontour

    if not seeds and real is None:
        raise InvalidInput("the adaptation benchmark needs phantom seeds or a real planning scan")
    say = progress or (lambda m: log.info("%s", m))
    opts = options or AdaptOptions()
    result = AdaptationBenchmark()
    with tempfile.TemporaryDirectory(prefix="jrs-adapt-bench-") as tmp:
        root = Path(tmp)
        cases = [_phantom_case(s, fractions, matrix, slice_mm, root) for s in seeds]
        if real is not None:
            cases.append(_real_case(real[0], real[1], fractions, root))
        for case in cases:
            t0 = time.perf_counter()
            model = root / "models" / case.name
            adapted = adapt(
                case.planning_ct,
                case.planning_rtstruct,
                model,
                writer,
                base=base,
                options=AdaptOptions(**{**opts.__dict__, "device": device}),
            )
            seconds = time.perf_counter() - t0
            result.adaptations.append(
                {
                    "group": case.group,
                    "case": case.name,
                    "kept": adapted.kept,
                    "reason": adapted.reason,
                    "steps": adapted.steps,
                    "seconds": round(seconds, 1),
                    "steps_per_s": adapted.metadata["adaptation"].get("steps_per_s"),
                }
            )
            say(f"{case.name}: adapted in {seconds:.0f} s ({'kept' if adapted.kept else 'base'})")
            runs = {
                "generic": RecontourOptions(model_dir=base, device=device),
                "adapted": RecontourOptions(model_dir=model, device=device),
            }
            if iterative:
                runs["iterative"] = RecontourOptions(method="iterative", device=device)
            for k, (daily, truth) in enumerate(case.fractions, start=1):
                for method, ropts in runs.items():
                    out = root / "out" / case.name / f"fraction_{k}" / method
                    recontour(case.planning_ct, case.planning_rtstruct, daily, out, ropts)
                    result.rows += _score(case, k, method, out, daily, truth)
                    say(f"{case.name} fraction {k}: {method}")
    result.checks = acceptance(result.rows, result.adaptations)
    result.markdown = report_markdown(result)
    if out_dir is not None:
        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / "rows.csv").open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(result.rows[0]) if result.rows else ["group"])
            w.writeheader()
            w.writerows(result.rows)
        (folder / "report.md").write_text(result.markdown)
        summary = {
            "adaptations": result.adaptations,
            "checks": result.checks,
            "means": _means(result.rows),
        }
        (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    return result


def _mean(values: Sequence[float]) -> float:
    arr = np.asarray([v for v in values if math.isfinite(v)], float)
    return float(arr.mean()) if arr.size else math.nan


def _means(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """Group -> method -> organ -> {dsc, msd} means."""
    out: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    keys = sorted({(r["group"], r["method"], r["organ"]) for r in rows})
    for g, m, o in keys:
        sel = [r for r in rows if (r["group"], r["method"], r["organ"]) == (g, m, o)]
        out.setdefault(g, {}).setdefault(m, {})[o] = {
            "dsc": round(_mean([r["dsc"] for r in sel]), 4),
            "msd": round(_mean([r["msd"] for r in sel]), 3),
        }
    return out


def acceptance(
    rows: Sequence[dict[str, Any]], adaptations: Sequence[dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """The acceptance checks of the issue on the measured rows.

    Returns:
        Check name -> ``{"passed", "detail"}``: ``adapted_vs_generic_<group>`` (every organ's mean
        DSC at least the generic one's), ``real_vs_iterative`` (within `ITERATIVE_DSC_MARGIN` or
        better on every organ; only with a real case and the iterative runs), ``time``.
    """
    means = _means(rows)
    checks: dict[str, dict[str, Any]] = {}
    for group, methods in means.items():
        gen, ada = methods.get("generic", {}), methods.get("adapted", {})
        worse = [o for o in gen if ada.get(o, {}).get("dsc", 0.0) < gen[o]["dsc"]]
        checks[f"adapted_vs_generic_{group}"] = {
            "passed": not worse,
            "detail": ", ".join(
                f"{o} {gen[o]['dsc']:.3f} -> {ada.get(o, {}).get('dsc', math.nan):.3f}" for o in gen
            ),
        }
        if group == "real" and "iterative" in methods:
            it = methods["iterative"]
            short = [
                o
                for o in it
                if ada.get(o, {}).get("dsc", 0.0) < it[o]["dsc"] - ITERATIVE_DSC_MARGIN
            ]
            checks["real_vs_iterative"] = {
                "passed": not short,
                "detail": ", ".join(
                    f"{o} adapted {ada.get(o, {}).get('dsc', math.nan):.3f} vs iterative "
                    f"{it[o]['dsc']:.3f}"
                    for o in it
                ),
            }
    longest = max((a["seconds"] for a in adaptations), default=0.0)
    checks["time"] = {
        "passed": longest <= MAX_ADAPT_MINUTES * 60,
        "detail": f"longest adaptation {longest / 60:.1f} min (limit {MAX_ADAPT_MINUTES:g})",
    }
    return checks


def report_markdown(bench: AdaptationBenchmark) -> str:
    """Tables per group: method x organ, DSC and MSD mean ± sd; adaptations; checks."""
    lines = ["# Patient-specific adaptation: adapted vs generic vs iterative", ""]
    groups = sorted({r["group"] for r in bench.rows})
    for group in groups:
        sel = [r for r in bench.rows if r["group"] == group]
        organs = [o for o in ORGANS if any(r["organ"] == o for r in sel)]
        n_cases = len({r["case"] for r in sel})
        n_fx = len({(r["case"], r["fraction"]) for r in sel})
        for metric, unit in (("dsc", ""), ("msd", " (mm)")):
            lines += [
                f"## {group}: {metric.upper()}{unit}, {n_cases} patients, {n_fx} fractions",
                "",
            ]
            lines.append("| method | " + " | ".join(organs) + " |")
            lines.append("|---|" + "---|" * len(organs))
            for method in METHODS:
                cells = []
                for organ in organs:
                    vals = np.asarray(
                        [
                            r[metric]
                            for r in sel
                            if r["method"] == method
                            and r["organ"] == organ
                            and math.isfinite(r[metric])
                        ],
                        float,
                    )
                    cells.append(f"{vals.mean():.3f} ± {vals.std():.3f}" if vals.size else "-")
                if any(c != "-" for c in cells):
                    lines.append(f"| {method} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += ["## Adaptations", "", "| case | kept | steps | minutes | steps/s | reason |"]
    lines.append("|---|---|---|---|---|---|")
    for a in bench.adaptations:
        rate = a.get("steps_per_s")
        lines.append(
            f"| {a['case']} | {'adapted' if a['kept'] else 'base'} | {a['steps']} | "
            f"{a['seconds'] / 60:.1f} | {rate if rate is not None else '-'} | {a['reason']} |"
        )
    lines += ["", "## Acceptance", ""]
    for name, check in bench.checks.items():
        lines.append(f"- {'PASS' if check['passed'] else 'FAIL'} {name}: {check['detail']}")
    lines.append("")
    return "\n".join(lines)
