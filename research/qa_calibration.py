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
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jrs.core.errors import InvalidInput
from research.qa_cases import (
    _NETWORK_POPULATIONS,
    DEFAULT_POPULATIONS,
    FIGURES,
    FLAGS,
    LABEL_CRITERIA,
    POPULATIONS,
    REAL_SEED,
    STRUCTURE_FLAGS,
    CaseSpec,
    RealSource,
    ReplayBackend,
    _suffix,
    _truth_masks,
    check_case_family,
    cut_field_of_view,
    label_contour,
    phantom_specs,
    real_specs,
    score_against_truth,
    shift_organs,
    smooth_random_field,
)
from research.qa_choice import (
    Samples,
    ThresholdChoice,
    choose_thresholds,
    flags_of,
    rates,
    samples_from_records,
)
from research.qa_report import calibrate, figure_summary, report_markdown, write_report
from research.qa_runs import (
    RunSettings,
    _all_done,
    _case_inputs,
    _load_record,
    load_records,
    other_path,
    record_path,
    run_population,
)

log = logging.getLogger(__name__)


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
