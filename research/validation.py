"""Held-out validation of the whole pipeline on phantom fractions and real planning scans.

For each phantom (a seed never used in training) the planning CT + RTSTRUCT and one daily
fraction are written as DICOM; for each real planning scan kept out of training, synthetic daily
fractions are made of it (`jrs.synth.write_from_planning`: the planning contours moved by the
known field are the truth). Each case is re-contoured through `jrs.pipeline.run.recontour` exactly
as a user would run it, once with the network and once with the iterative B-spline baseline. Every
output path is compared with the true daily structures on the daily CT grid:

* ``no_registration``: the planning organs as they lie in patient coordinates (no registration
  at all: a rigid copy of the planning contours, as a TPS does without registration);
* ``prealigned``: the planning organs moved by the pre-alignment alone (`jrs.registration.focus`:
  prostate-centred rigid by default, else the whole-body affine; this row was called ``affine``
  from 2026-12-03 until the prostate-centred pre-alignment, and ``no_registration`` before);
* ``segmentation``: the network's segmentation path (post-processed);
* ``registration``: the planning organs warped by the network DVF (post-processed);
* ``fusion``: the two paths fused per organ (`jrs.inference.fusion`, the model's ``fusion`` method
  and
  weights; kept by the network run with ``keep_fusion``, whatever the model's path choice);
* ``chosen``: the contours of the written ``rtstruct.dcm`` (per-organ path choice of the model);
* ``iterative``: the contours of the B-spline baseline's ``rtstruct.dcm``.

Per organ: DSC, MSD and HD95 (mm); per run: the per-stage timings and the deformation's folding
fraction and std log J of ``qa.json``. Results go to a
CSV (one row per case, path and organ), a JSON of the timings and a Markdown report.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from jrs.core.errors import InvalidInput
from jrs.core.geometry import Volume
from jrs.core.labels import BLADDER, DEFAULT_ROI_NAMES, LABELS, PROSTATE, RECTUM, SEMINAL_VESICLES
from jrs.core.metrics import dice, surface_distances

log = logging.getLogger(__name__)

#: Organs of the tables, in the paper's order.
ORGANS: tuple[int, ...] = (PROSTATE, SEMINAL_VESICLES, RECTUM, BLADDER)
#: Output paths compared, in table order.
PATHS: tuple[str, ...] = (
    "no_registration",
    "prealigned",
    "segmentation",
    "registration",
    "fusion",
    "chosen",
    "iterative",
)

__all__ = [
    "ENGINE_DSC_TOLERANCE",
    "ORGANS",
    "PATHS",
    "EngineComparison",
    "HeldoutPlanning",
    "HeldoutReport",
    "compare_engines",
    "engines_markdown",
    "report_markdown",
    "validate_heldout",
]


@dataclass
class HeldoutReport:
    """Outcome of `validate_heldout`.

    Attributes:
        rows: one dict per (case, path, organ): ``case``, ``path``, ``organ``, ``dsc``, ``msd``,
            ``hd95``.
        timings: case -> method -> stage -> seconds (from ``qa.json``) plus ``wall``.
        fields: case -> method -> the DVF's ``folding_fraction`` (det J <= 0, share of body
            voxels), ``log_std`` (std of log det J), ``min`` and ``max`` det J (``qa.json``).
        markdown: the Markdown report.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    fields: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    markdown: str = ""


def _score(
    pred: npt.NDArray[Any], truth: npt.NDArray[np.bool_], volume: Volume
) -> dict[str, float]:
    distances = surface_distances(pred, truth, volume.geometry)
    return {
        "dsc": round(dice(pred, truth), 4),
        "msd": round(distances.msd, 3),
        "hd95": round(distances.hd95, 3),
    }


@dataclass(frozen=True)
class HeldoutPlanning:
    """A real planning scan kept out of training, whose synthetic fractions are held-out cases.

    Attributes:
        planning_ct: Folder of the planning CT series.
        planning_rtstruct: Its RTSTRUCT file.
        fractions: Synthetic daily fractions made of it (`jrs.synth.write_from_planning`).
        seed: Seed of the fractions.
        synonyms: ROI-name synonym table (YAML) for its organ names (None: the built-in table).
    """

    planning_ct: Path
    planning_rtstruct: Path
    fractions: int = 3
    seed: int = 1
    synonyms: Path | None = None


@dataclass
class _Case:
    name: str
    planning_ct: Path
    planning_rtstruct: Path
    daily_ct: Path
    truth: dict[int, npt.NDArray[np.bool_]]  # organ label -> daily truth mask
    roi: dict[int, str]  # organ label -> ROI name in the written RTSTRUCT
    reference: Volume  # the daily CT grid
    synonyms: Any = None  # the ROI-name table of a real planning (None: the built-in one)


def _phantom_cases(
    seeds: Sequence[int], fraction: int, matrix: int, slice_mm: float | None, root: Path
) -> Iterator[_Case]:
    from jrs.synth import generate_fraction, generate_patient, write_fraction, write_patient

    for seed in seeds:
        folder = root / f"phantom{seed}"
        patient = generate_patient(seed, matrix=matrix, slice_thickness=slice_mm)
        write_patient(patient, folder)
        frac = generate_fraction(patient, fraction)
        write_fraction(frac, folder / f"fraction_{fraction}")
        yield _Case(
            name=f"phantom{seed}_f{fraction}",
            planning_ct=folder / "planning" / "ct",
            planning_rtstruct=folder / "planning" / "rtstruct.dcm",
            daily_ct=folder / f"fraction_{fraction}" / "ct",
            truth={lab: frac.structures[DEFAULT_ROI_NAMES[LABELS[lab]]] for lab in ORGANS},
            roi={lab: DEFAULT_ROI_NAMES[LABELS[lab]] for lab in ORGANS},
            reference=Volume(np.zeros(frac.ct.geometry.shape, np.uint8), frac.ct.geometry),
        )
        del patient, frac


def _real_cases(source: HeldoutPlanning, root: Path) -> Iterator[_Case]:
    from jrs.core.labels import SynonymTable, label_map_from_masks
    from jrs.io.rtstruct import masks_from_files
    from jrs.synth.from_planning import write_from_planning

    table = SynonymTable.from_yaml(source.synonyms) if source.synonyms is not None else None
    planning = write_from_planning(
        source.planning_ct,
        source.planning_rtstruct,
        root,
        fractions=source.fractions,
        seed=source.seed,
        synonyms=table,
    )
    for k in range(1, source.fractions + 1):
        daily = planning / f"fraction_{k}"
        _, series, masks = masks_from_files(daily / "ct", daily / "rtstruct.dcm")
        structures = {name: vol.array.view(np.bool_) for name, vol in masks.items()}
        labels, used = label_map_from_masks(structures, table)
        geometry = series.volume.geometry
        yield _Case(
            # the planning folder's name is a hash of its series UID: no patient data
            name=f"{planning.name}_f{k}",
            planning_ct=planning / "planning" / "ct",
            planning_rtstruct=planning / "planning" / "rtstruct.dcm",
            daily_ct=daily / "ct",
            # each organ's own contour (overlaps kept), as for the phantoms
            truth={lab: structures[used[lab]].copy() for lab in ORGANS if lab in used},
            roi={lab: used[lab] for lab in ORGANS if lab in used},
            reference=Volume(np.zeros(geometry.shape, np.uint8), geometry),
            synonyms=table,
        )
        del masks, structures, labels


def validate_heldout(
    seeds: Sequence[int],
    *,
    fraction: int = 1,
    model_dir: Path | None = None,
    device: str = "auto",
    engine: str = "auto",
    precision: str = "auto",
    iterative: bool = True,
    slice_mm: float | None = None,
    matrix: int = 512,
    out_dir: Path | str | None = None,
    progress: Callable[[str], None] | None = None,
    fusion_method: str | None = None,
    backend: Any | None = None,
    real: Sequence[HeldoutPlanning] = (),
    null_correction: bool | None = None,
    dvf_smoothing_mm: float | None = None,
    network_passes: int | None = None,
    prealign: str = "prostate",
) -> HeldoutReport:
    """Re-contour held-out fractions and score every output path against the truth.

    The cases are phantom fractions (one per seed) and the synthetic fractions of real planning
    scans kept out of training (``real``; their truth is the planning contours moved by the
    known field, as `jrs phantom --from-planning` writes them).

    Args:
        seeds: phantom seeds (one patient each; use seeds never used in training; may be empty
            when ``real`` is given).
        fraction: fraction index re-contoured for each phantom.
        model_dir: model version folder; default the bundled model.
        device: ``auto``, ``cpu`` or ``cuda``.
        engine: network engine (``auto``, ``onnxruntime``, ``openvino``).
        precision: network precision (``auto``, ``fp32``, ``bf16``, ``fp16``).
        iterative: also run the B-spline baseline (``--method iterative``).
        slice_mm: phantom slice thickness (None: the seed's draw).
        matrix: phantom in-plane matrix (512 as a clinical CT; smaller for quick checks).
        out_dir: where to write ``heldout.csv``, ``timings.json``, ``fields.json`` and
            ``report.md`` (None: nothing).
        progress: called with a short message after each run.
        fusion_method: method of the ``fusion`` rows (``weighted``, ``staple``; None: the
            model's metadata ``fusion``, else ``weighted``).
        backend: an already loaded network (`jrs.inference.backend.NetworkBackend`) to use
            instead of loading ``model_dir``.
        real: real planning scans whose synthetic fractions are cases too.
        null_correction: the network's null-field correction (`jrs.inference.null_correction`);
            None:
            the model's.
        dvf_smoothing_mm: Gaussian sigma (mm) on the network's final field
            (`jrs.inference.smoothing`); None: the model's.
        network_passes: network passes on each pair (`jrs.inference.cascade`); None: the model's.
        prealign: pre-alignment mode of both methods (`jrs.registration.focus.PREALIGN_MODES`).

    Returns:
        The report.
    """
    from jrs.io.rtstruct import masks_from_files
    from jrs.pipeline.options import RecontourOptions
    from jrs.pipeline.run import recontour
    from jrs.registration.focus import check_prealign_mode

    if not seeds and not real:
        raise InvalidInput(
            "held-out validation needs at least one phantom seed or a real planning scan"
        )
    report = HeldoutReport()
    with tempfile.TemporaryDirectory(prefix="jrs-heldout-") as tmp:
        root = Path(tmp)
        sources: list[Iterator[_Case]] = [
            _phantom_cases(seeds, fraction, matrix, slice_mm, root / "phantoms")
        ]
        sources += [_real_cases(src, root / f"real{i}") for i, src in enumerate(real)]
        for case in (c for source in sources for c in source):
            report.timings[case.name] = {}
            report.fields[case.name] = {}
            methods = ["network", "iterative"] if iterative else ["network"]
            for method in methods:
                out = root / "out" / case.name / method
                t0 = time.perf_counter()
                result = recontour(
                    case.planning_ct,
                    case.planning_rtstruct,
                    case.daily_ct,
                    out,
                    RecontourOptions(
                        method=method,  # type: ignore[arg-type]
                        model_dir=model_dir,
                        device=device,
                        engine=engine,
                        precision=precision,
                        keep_fusion=method == "network",
                        fusion_method=fusion_method,
                        synonyms=case.synonyms,
                        null_correction=null_correction,
                        dvf_smoothing_mm=dvf_smoothing_mm,
                        network_passes=network_passes,
                        prealign=check_prealign_mode(prealign),
                    ),
                    backend=backend if method == "network" else None,
                )
                wall = time.perf_counter() - t0
                report.timings[case.name][method] = {
                    **{k: float(v) for k, v in result.qa_data["timings_s"].items()},
                    "wall": round(wall, 3),
                }
                field_stats = result.qa_data.get("dvf", {})
                report.fields[case.name][method] = {
                    k: float(field_stats[k])
                    for k in ("folding_fraction", "log_std", "min", "max")
                    if isinstance(field_stats.get(k), (int, float))
                }
                _, _, written = masks_from_files(case.daily_ct, result.rtstruct)
                if method == "network":
                    names = (
                        "unaligned",
                        "prealigned",
                        "segmentation",
                        "registration",
                        "fusion",
                    )
                    maps = {
                        _ROW_NAME.get(name, name): result.path_labels[name].resample(
                            case.reference.geometry, "label", 0
                        )
                        for name in names
                        if name in result.path_labels
                    }
                    for name, lab_map in maps.items():
                        for lab, truth in case.truth.items():
                            report.rows.append(
                                {
                                    "case": case.name,
                                    "path": name,
                                    "organ": LABELS[lab],
                                    **_score(lab_map.array == lab, truth, case.reference),
                                }
                            )
                path = "chosen" if method == "network" else "iterative"
                for lab, truth in case.truth.items():
                    mask = written[case.roi[lab]].array
                    report.rows.append(
                        {
                            "case": case.name,
                            "path": path,
                            "organ": LABELS[lab],
                            **_score(mask, truth, case.reference),
                        }
                    )
                if progress is not None:
                    progress(f"{case.name} {method}: {wall:.1f} s")
                shutil.rmtree(out, ignore_errors=True)
    report.markdown = report_markdown(report.rows, report.timings, report.fields)
    if out_dir is not None:
        out_path = Path(out_dir)
        out_path.mkdir(parents=True, exist_ok=True)
        with (out_path / "heldout.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(
                fh, fieldnames=["case", "path", "organ", "dsc", "msd", "hd95"], restval=""
            )
            writer.writeheader()
            writer.writerows(report.rows)
        (out_path / "timings.json").write_text(json.dumps(report.timings, indent=2) + "\n")
        (out_path / "fields.json").write_text(json.dumps(report.fields, indent=2) + "\n")
        (out_path / "report.md").write_text(report.markdown)
    return report


#: Row names of the network run's extra label maps.
_ROW_NAME = {"unaligned": "no_registration"}


def _mean_sd(values: Sequence[float], digits: int) -> str:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return "n/a"
    missing = len(values) - len(vals)
    text = f"{np.mean(vals):.{digits}f} ± {np.std(vals):.{digits}f}"
    return text + (f" ({missing} empty)" if missing else "")


def report_markdown(
    rows: Sequence[dict[str, Any]],
    timings: dict[str, dict[str, dict[str, float]]],
    fields: dict[str, dict[str, dict[str, float]]] | None = None,
) -> str:
    """The Markdown tables: DSC and MSD per organ and path (mean ± sd), HD95, DVF, stage times.

    The HD95 table lists the rows that have ``hd95``; the DVF table (folding, std log J) and the
    stage times are given per method. Cases whose name starts with ``phantom`` and the others
    (synthetic fractions of real planning scans) get a table each, then all cases together.
    """
    cases = sorted({r["case"] for r in rows})
    groups = {
        "phantom fractions": [c for c in cases if c.startswith("phantom")],
        "synthetic fractions of real planning scans": [
            c for c in cases if not c.startswith("phantom")
        ],
    }
    groups = {k: v for k, v in groups.items() if v}
    lines = [
        f"# Held-out validation ({len(cases)} fractions: {', '.join(cases)})",
        "",
        "DSC and MSD (mm) against the true daily structures on the daily CT grid; mean ± sd over "
        "the cases. MSD is n/a where a path produced an empty structure. `no_registration`: the "
        "planning contours as they lie in patient coordinates (no registration at all); "
        "`prealigned`: the planning contours moved by the pre-alignment alone.",
    ]
    if len(groups) > 1:
        for title, members in groups.items():
            lines += ["", f"## {title[0].upper()}{title[1:]} ({len(members)})", ""]
            lines += _dsc_table([r for r in rows if r["case"] in members])
        lines += ["", f"## All {len(cases)} fractions"]
    lines += [""]
    lines += _dsc_table(rows)
    lines += _hd95_and_fields(rows, fields)
    return _stage_times(lines, timings)


def _dsc_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    lines = [
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
    return lines


def _hd95_and_fields(
    rows: Sequence[dict[str, Any]], fields: dict[str, dict[str, dict[str, float]]] | None
) -> list[str]:
    lines: list[str] = []
    with_hd95 = [r for r in rows if "hd95" in r]
    if with_hd95:
        lines += [
            "",
            "HD95 (mm), mean ± sd over the cases:",
            "",
            "| path | " + " | ".join(f"{LABELS[o]} HD95" for o in ORGANS) + " |",
            "|---|" + "---|" * len(ORGANS),
        ]
        for path in PATHS:
            sel = [r for r in with_hd95 if r["path"] == path]
            if sel:
                cells = [
                    _mean_sd([float(r["hd95"]) for r in sel if r["organ"] == LABELS[o]], 2)
                    for o in ORGANS
                ]
                lines.append(f"| {path} | " + " | ".join(cells) + " |")
    methods = sorted({m for per in (fields or {}).values() for m in per})
    if methods:
        lines += [
            "",
            "The deformation (`qa.json` `dvf`, inside the body), mean ± sd over the cases:",
            "",
            "| method | folding (% of body voxels) | std log J | min det J | max det J |",
            "|---|---|---|---|---|",
        ]
        for method in methods:
            runs = [per[method] for per in (fields or {}).values() if method in per]

            def col(key: str, scale: float = 1.0, digits: int = 3) -> str:
                return _mean_sd([scale * r[key] for r in runs if key in r], digits)  # noqa: B023

            lines.append(
                f"| {method} | {col('folding_fraction', 100.0)} | {col('log_std')} | "
                f"{col('min', digits=2)} | {col('max', digits=2)} |"
            )
    return lines


def _stage_times(lines: list[str], timings: dict[str, dict[str, dict[str, float]]]) -> str:
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


# ------------------------------------------------------------------------------ engines
#: Largest per-organ DSC difference between engines accepted (the issue's acceptance bar).
ENGINE_DSC_TOLERANCE = 0.005


@dataclass
class EngineComparison:
    """Outcome of `compare_engines`.

    Attributes:
        engines: the two configurations compared (`jrs.pipeline.benchmark.RUN_CONFIGS` names),
            reference
            first.
        rows: one dict per (case, organ): ``dsc_<engine>`` against the truth (when known), the
            difference ``dsc_diff`` (second - first) and ``dsc_between`` (the two engines'
            contours against each other).
        dvf: one dict per case: ``max_mm`` (largest vector difference of the written fields
            anywhere) and ``mean_mm`` (mean inside the network box), with the grid spacing.
        timings: case -> engine -> stage -> seconds (``qa.json``).
        markdown: the report.
    """

    engines: tuple[str, str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    dvf: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    markdown: str = ""

    @property
    def max_dsc_diff(self) -> float:
        """Largest |DSC difference| against the truth over cases and organs (NaN if no truth)."""
        diffs = [abs(r["dsc_diff"]) for r in self.rows if r.get("dsc_diff") is not None]
        return max(diffs) if diffs else math.nan


def compare_engines(
    seeds: Sequence[int] = (),
    *,
    cases: Sequence[Any] = (),
    engines: tuple[str, str] = ("onnxruntime-fp32", "openvino-bf16"),
    model_dir: Path | None = None,
    device: str = "cpu",
    slice_mm: float | None = None,
    matrix: int = 512,
    out_dir: Path | str | None = None,
    progress: Callable[[str], None] | None = None,
) -> EngineComparison:
    """Re-contour the same cases with two engines and compare what comes out.

    The accuracy guard of a faster engine (OpenVINO bf16) against the reference (ONNX Runtime
    fp32): per organ, the DSC of each engine's ``rtstruct.dcm`` against the truth and their
    difference, and the DSC between the two engines' contours; per case, the difference of the
    written DVFs (max anywhere; mean inside the network box). Each engine is loaded once and
    runs every case before the next engine is loaded (one model in memory at a time).

    Args:
        seeds: held-out phantom seeds (fraction 1 of each; seeds never used in training).
        cases: more cases (`jrs.pipeline.benchmark.Case`, e.g. synthetic fractions of real planning
            scans); their truth is used when they have one.
        engines: (reference, candidate) configuration names of `jrs.pipeline.benchmark.RUN_CONFIGS`.
        model_dir: model version folder; default the bundled model.
        device: device of both engines (``cpu``).
        slice_mm: phantom slice thickness (None: the seed's draw).
        matrix: phantom in-plane matrix.
        out_dir: where to write ``engines.csv``, ``dvf.csv`` and ``engines.md`` (None: nothing).
        progress: called with a short message after each run.

    Returns:
        The comparison.
    """
    from jrs.io.rtstruct import masks_from_files
    from jrs.pipeline.benchmark import RUN_CONFIGS, Case, dice_against_truth, phantom_case
    from jrs.pipeline.methods import load_backend
    from jrs.pipeline.options import RecontourOptions
    from jrs.pipeline.run import recontour

    if not seeds and not cases:
        raise InvalidInput("the engine comparison needs at least one phantom seed or case")
    bad = [e for e in engines if e not in RUN_CONFIGS or RUN_CONFIGS[e][0] != "network"]
    if len(engines) != 2 or bad:
        raise InvalidInput(
            f"compare two network configurations among "
            f"{', '.join(k for k, v in RUN_CONFIGS.items() if v[0] == 'network')}; got {engines}"
        )
    report = EngineComparison(engines=(engines[0], engines[1]))
    with tempfile.TemporaryDirectory(prefix="jrs-engines-") as tmp:
        root = Path(tmp)
        all_cases: dict[str, Case] = {}
        for seed in seeds:
            all_cases[f"phantom{seed}_f1"] = phantom_case(
                root / f"phantom{seed}", seed, slice_mm, matrix=matrix
            )
        for k, case in enumerate(cases):
            all_cases[f"case{k + 1}"] = case
        outputs: dict[str, dict[str, Any]] = {name: {} for name in all_cases}
        for engine in engines:
            _, eng, precision = RUN_CONFIGS[engine]
            opts = RecontourOptions(
                method="network",
                model_dir=model_dir,
                device=device,
                engine=eng,
                precision=precision,
            )
            backend = load_backend(opts)
            for name, case in all_cases.items():
                result = recontour(
                    case.planning_ct,
                    case.planning_rtstruct,
                    case.daily_ct,
                    root / "out" / engine / name,
                    opts,
                    backend=backend,
                )
                outputs[name][engine] = result
                report.timings.setdefault(name, {})[engine] = {
                    k: float(v) for k, v in result.qa_data["timings_s"].items()
                }
                if progress is not None:
                    total = result.qa_data["timings_s"]["total"]
                    progress(f"{name} {engine}: {total:.1f} s")
            del backend
        ref, cand = engines
        for name, case in all_cases.items():
            a, b = outputs[name][ref], outputs[name][cand]
            _, _, masks_a = masks_from_files(case.daily_ct, a.rtstruct)
            _, _, masks_b = masks_from_files(case.daily_ct, b.rtstruct)
            organs = [
                s["name"]
                for s in a.qa_data["structures"]
                if s.get("organ") and s["name"] in masks_b
            ]
            truth_a = truth_b = {}
            if case.truth_rtstruct is not None:
                truth_a = dice_against_truth(case.daily_ct, a.rtstruct, case.truth_rtstruct, organs)
                truth_b = dice_against_truth(case.daily_ct, b.rtstruct, case.truth_rtstruct, organs)
            for organ in organs:
                row: dict[str, Any] = {"case": name, "organ": organ}
                if organ in truth_a and organ in truth_b:
                    row[f"dsc_{ref}"] = truth_a[organ]
                    row[f"dsc_{cand}"] = truth_b[organ]
                    row["dsc_diff"] = round(truth_b[organ] - truth_a[organ], 4)
                else:
                    row["dsc_diff"] = None
                row["dsc_between"] = round(dice(masks_a[organ].array, masks_b[organ].array), 4)
                report.rows.append(row)
            report.dvf.append({"case": name, **_dvf_difference(a, b)})
    report.markdown = engines_markdown(report)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        keys = sorted({k for r in report.rows for k in r}, key=lambda k: (k != "case", k))
        with (out / "engines.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys)
            writer.writeheader()
            writer.writerows(report.rows)
        with (out / "dvf.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(report.dvf[0]))
            writer.writeheader()
            writer.writerows(report.dvf)
        (out / "engines.md").write_text(report.markdown)
    return report


def _dvf_difference(a: Any, b: Any) -> dict[str, Any]:
    """Difference of two runs' written DVFs (same grid): max anywhere, mean in the network box."""
    fa, fb = Volume.read(str(a.dvf)), Volume.read(str(b.dvf))
    if not fa.geometry.same_grid(fb.geometry):
        raise InvalidInput(f"{a.dvf} and {b.dvf} are on different grids; cannot compare them")
    diff = np.linalg.norm(fa.array.astype(np.float64) - fb.array.astype(np.float64), axis=-1)
    box = a.qa_data["network_box_mm"]
    pts = fa.geometry.voxel_centres()
    inside = np.all((pts >= np.asarray(box["lower"])) & (pts <= np.asarray(box["upper"])), axis=-1)
    return {
        "max_mm": round(float(diff.max()), 4),
        "mean_mm": round(float(diff[inside].mean()), 5) if inside.any() else math.nan,
        "spacing_mm": [round(float(s), 3) for s in fa.geometry.spacing],
    }


def engines_markdown(report: EngineComparison) -> str:
    """The Markdown tables of an engine comparison: per organ, then the DVF per case."""
    ref, cand = report.engines
    cases = sorted({r["case"] for r in report.rows})
    organs = list(dict.fromkeys(r["organ"] for r in report.rows))
    lines = [
        f"# Engines: {cand} against {ref} ({len(cases)} case(s): {', '.join(cases)})",
        "",
        "DSC against the truth per engine (mean ± sd over the cases), the difference "
        f"{cand} - {ref} (mean and largest |difference|), and the DSC between the two engines' "
        "contours (mean).",
        "",
        f"| organ | DSC {ref} | DSC {cand} | mean diff | max abs diff | DSC between |",
        "|---|---|---|---|---|---|",
    ]
    for organ in organs:
        sel = [r for r in report.rows if r["organ"] == organ]
        with_truth = [r for r in sel if r.get("dsc_diff") is not None]
        a = [float(r[f"dsc_{ref}"]) for r in with_truth]
        b = [float(r[f"dsc_{cand}"]) for r in with_truth]
        d = [float(r["dsc_diff"]) for r in with_truth]
        between = [float(r["dsc_between"]) for r in sel]
        lines.append(
            f"| {organ} | {_mean_sd(a, 4)} | {_mean_sd(b, 4)} | "
            + (f"{np.mean(d):+.4f} | {np.max(np.abs(d)):.4f}" if d else "n/a | n/a")
            + f" | {np.mean(between):.4f} |"
        )
    worst = report.max_dsc_diff
    verdict = (
        "n/a (no truth)"
        if math.isnan(worst)
        else f"{worst:.4f} ({'within' if worst <= ENGINE_DSC_TOLERANCE else 'ABOVE'} the "
        f"{ENGINE_DSC_TOLERANCE} bar)"
    )
    lines += ["", f"Largest |DSC difference|: {verdict}.", ""]
    lines += [
        "| case | DVF max diff (mm) | DVF mean diff in the network box (mm) | grid (mm) |",
        "|---|---|---|---|",
    ]
    for row in report.dvf:
        lines.append(
            f"| {row['case']} | {row['max_mm']:.4f} | {row['mean_mm']:.5f} | "
            f"{' x '.join(f'{s:g}' for s in row['spacing_mm'])} |"
        )
    nets = {
        e: [t[e]["network"] for t in report.timings.values() if e in t and "network" in t[e]]
        for e in report.engines
    }
    lines += [
        "",
        "Network stage (s, mean over the cases): "
        + ", ".join(f"{e} {np.mean(v):.2f}" for e, v in nets.items() if v),
    ]
    return "\n".join(lines) + "\n"
