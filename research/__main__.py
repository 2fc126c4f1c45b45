"""``python -m research``: the held-out benchmarks and the QA calibration (not installed).

These measure the product against the truth of synthetic cases; the product ships what they
found (the QA thresholds in `jrs.qa.figures`, the path choice in a model's ``metadata.json``),
not the harnesses. Run from a source checkout (the repository root), with the product installed.

Commands:

* ``heldout``: re-contour held-out phantom fractions and synthetic fractions of a real planning
  scan with the network and the iterative baseline; DSC/MSD/HD95 per organ and output path.
* ``engines``: the accuracy guard of an engine or precision against another (per-organ DSC and
  the DVFs).
* ``qa``: calibrate the QA flags against the truth (``docs/qa.md``).
* ``adaptation``: adapt the model to held-out patients and compare with the generic model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from jrs.cli.app import handle_errors
from jrs.cli.options import (
    DeviceOpt,
    DvfSmoothingOpt,
    EngineOpt,
    FusionMethodOpt,
    ModelOpt,
    NetworkPassesOpt,
    NullCorrectionOpt,
    PrealignOpt,
    PrecisionOpt,
    SynonymOpt,
    parse_fusion_method,
)
from jrs.core.errors import InvalidInput
from jrs.pipeline.benchmark import given_case, machine

app = typer.Typer(
    help="Held-out benchmarks and the QA calibration (the lab notebook; not installed).",
    no_args_is_help=True,
    add_completion=False,
)
log = logging.getLogger("research")

CasesOpt = Annotated[
    int,
    typer.Option(
        "--cases",
        min=0,
        help="Held-out phantoms (seeds SEED..SEED+N-1); 0 with --planning-ct: the real "
        "patient's fractions only.",
    ),
]
SeedOpt = Annotated[int, typer.Option("--seed")]
FractionsOpt = Annotated[int, typer.Option("--fractions", min=1)]
SliceOpt = Annotated[float | None, typer.Option("--slice-mm", help="Phantom slice thickness.")]
ReportOpt = Annotated[
    Path | None, typer.Option("--report", help="Folder for records, CSV, timings and tables.")
]
OutOpt = Annotated[
    Path | None, typer.Option("--out", help="Also write the figures to this JSON file.")
]
PlanningCtOpt = Annotated[
    Path | None,
    typer.Option(
        "--planning-ct",
        help="A real planning scan kept out of training (FRACTIONS synthetic fractions of it "
        "are cases); engines: a given case.",
    ),
]
PlanningRsOpt = Annotated[
    Path | None, typer.Option("--planning-rtstruct", help="With --planning-ct: its RTSTRUCT.")
]


def _emit(result: dict[str, Any], out: Path | None) -> None:
    result["machine"] = machine()
    text = json.dumps(result, indent=2)
    typer.echo(text)
    if out is not None:
        out.write_text(text + "\n")


def _both(planning_ct: Path | None, planning_rtstruct: Path | None) -> None:
    if (planning_ct is None) != (planning_rtstruct is None):
        raise InvalidInput(
            "give both --planning-ct and --planning-rtstruct (a real planning scan kept out of "
            "training), or neither"
        )


@app.command()
@handle_errors
def heldout(
    cases: CasesOpt = 5,
    seed: SeedOpt = 0,
    fractions: FractionsOpt = 3,
    planning_ct: PlanningCtOpt = None,
    planning_rtstruct: PlanningRsOpt = None,
    synonyms: SynonymOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    engine: EngineOpt = "auto",
    precision: PrecisionOpt = "auto",
    iterative: Annotated[
        bool, typer.Option("--iterative/--no-iterative", help="Also run the B-spline baseline.")
    ] = True,
    fusion_method: FusionMethodOpt = None,
    null_correction: NullCorrectionOpt = None,
    dvf_smoothing_mm: DvfSmoothingOpt = None,
    network_passes: NetworkPassesOpt = None,
    prealign: PrealignOpt = "prostate",
    slice_mm: SliceOpt = None,
    report: ReportOpt = None,
    out: OutOpt = None,
) -> None:
    """Held-out phantom fractions and a real scan's synthetic fractions, network vs iterative.

    DSC/MSD/HD95 per organ for no registration (pre-alignment alone), the segmentation path, the
    registration path, their fusion, the chosen contours and the baseline, and the folding and
    std log J of each method's field.
    """
    from research.validation import HeldoutPlanning, validate_heldout

    _both(planning_ct, planning_rtstruct)
    held_real: list[HeldoutPlanning] = []
    if planning_ct is not None and planning_rtstruct is not None:
        held_real.append(HeldoutPlanning(planning_ct, planning_rtstruct, fractions, seed, synonyms))
    held = validate_heldout(
        list(range(seed, seed + cases)),
        real=held_real,
        fusion_method=parse_fusion_method(fusion_method),
        null_correction=null_correction,
        dvf_smoothing_mm=dvf_smoothing_mm,
        network_passes=network_passes,
        prealign=prealign,
        model_dir=model,
        device=device,
        engine=engine,
        precision=precision,
        iterative=iterative,
        slice_mm=slice_mm,
        out_dir=report,
        progress=lambda m: log.info("held-out %s", m),
    )
    typer.echo(held.markdown)
    _emit({"benchmark": "heldout", "rows": held.rows, "timings_s": held.timings}, out)


@app.command()
@handle_errors
def engines(
    runs: Annotated[
        str,
        typer.Option("--runs", help="reference,candidate configurations (as jrs benchmark's)."),
    ] = "onnxruntime-fp32,openvino-bf16",
    cases: CasesOpt = 5,
    seed: SeedOpt = 0,
    planning_ct: PlanningCtOpt = None,
    planning_rtstruct: PlanningRsOpt = None,
    daily_ct: Annotated[Path | None, typer.Option("--daily-ct", help="A given case.")] = None,
    truth_rtstruct: Annotated[
        Path | None, typer.Option("--truth-rtstruct", help="The given daily CT's truth.")
    ] = None,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    slice_mm: SliceOpt = None,
    report: ReportOpt = None,
    out: OutOpt = None,
) -> None:
    """Re-contour held-out phantoms (and a given case) with two engines; compare DSC and DVFs."""
    from research.validation import compare_engines

    given = (planning_ct, planning_rtstruct, daily_ct)
    if any(v is not None for v in given) and not all(v is not None for v in given):
        raise InvalidInput(
            "a given case needs --planning-ct, --planning-rtstruct and --daily-ct together"
        )
    case = (
        given_case(planning_ct, planning_rtstruct, daily_ct, truth_rtstruct)  # type: ignore[arg-type]
        if planning_ct is not None
        else None
    )
    pair = [r.strip() for r in runs.split(",") if r.strip()]
    if len(pair) != 2:
        raise InvalidInput(f"--runs for engines takes two configurations, got {pair}")
    compared = compare_engines(
        list(range(seed, seed + cases)),
        cases=[case] if case is not None else [],
        engines=(pair[0], pair[1]),
        model_dir=model,
        device="cpu" if device == "auto" else device,
        slice_mm=slice_mm,
        out_dir=report,
        progress=lambda m: log.info("engines %s", m),
    )
    typer.echo(compared.markdown)
    _emit(
        {
            "benchmark": "engines",
            "engines": list(compared.engines),
            "rows": compared.rows,
            "dvf": compared.dvf,
            "max_dsc_diff": compared.max_dsc_diff,
            "timings_s": compared.timings,
        },
        out,
    )


@app.command()
@handle_errors
def qa(
    report: Annotated[Path, typer.Option("--report", help="Records and report go here.")],
    cases: CasesOpt = 5,
    seed: SeedOpt = 0,
    fractions: FractionsOpt = 3,
    planning_ct: PlanningCtOpt = None,
    planning_rtstruct: PlanningRsOpt = None,
    real_seed: Annotated[
        int,
        typer.Option("--real-seed", help="Seed of the real planning scan's synthetic fractions."),
    ] = 5005,
    held_out: Annotated[
        Path | None,
        typer.Option(
            "--held-out",
            help="Report folder of other cases: the thresholds chosen on --report are tested on "
            "its records.",
        ),
    ] = None,
    case_engine: Annotated[
        str,
        typer.Option(
            "--case-engine",
            help="Deformation engine of the phantom cases: 'analytic' (default) or 'organ' (the "
            "held-out dome family is refused: it is the cross-generator test).",
        ),
    ] = "analytic",
    profile: Annotated[
        str,
        typer.Option(
            "--profile",
            help="Draw profile of the organ engine (organ phantoms and the real scan's "
            "fractions): 'v3' or 'broad'.",
        ),
    ] = "v3",
    labels: Annotated[
        str,
        typer.Option(
            "--labels",
            help="Truth criteria: 'v3' (bad DSC < 0.8 or MSD > 2 mm, good DSC >= 0.9) or "
            "'issue30' (bad DSC < 0.90 or MSD > 2 mm, good DSC >= 0.95).",
        ),
    ] = "v3",
    runs: Annotated[
        str | None,
        typer.Option(
            "--runs",
            help="Populations, comma-separated (default network, other_path, iterative, "
            "dvf_noise, shifted_planning, cutoff_fov).",
        ),
    ] = None,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    engine: EngineOpt = "auto",
    precision: PrecisionOpt = "auto",
    matrix: Annotated[int, typer.Option("--matrix", min=64, help="Phantom in-plane matrix.")] = 512,
    slice_mm: SliceOpt = None,
    out: OutOpt = None,
) -> None:
    """Calibrate the QA flags against the truth (records resume from --report)."""
    import research.qa_calibration as qac

    _both(planning_ct, planning_rtstruct)
    real = []
    if planning_ct is not None and planning_rtstruct is not None:
        real = [qac.RealSource(planning_ct, planning_rtstruct)]
    qa_report = qac.run_qa_calibration(
        report,
        cases=cases,
        seed=seed or 3000,
        real=real,
        fractions=fractions,
        real_seed=real_seed,
        held_out=held_out,
        engine=case_engine,
        profile=profile,
        labels=labels,
        populations=[r.strip() for r in runs.split(",") if r.strip()]
        if runs
        else qac.DEFAULT_POPULATIONS,
        settings=qac.RunSettings(
            model_dir=model,
            device=device,
            engine=engine,
            precision=precision,
            matrix=matrix,
            slice_mm=slice_mm,
        ),
        progress=lambda m: log.info("qa %s", m),
    )
    typer.echo(qac.report_markdown(qa_report))
    _emit(
        {
            "benchmark": "qa",
            "report": str(report / "qa_calibration.json"),
            "counts": qa_report["counts"],
            "current": qa_report["current"]["any"],
            "chosen": {k: qa_report["chosen"][k] for k in ("met", "note", "any", "changes")},
            "held_out": None
            if qa_report.get("held_out") is None
            else {k: qa_report["held_out"][k]["any"] for k in ("current", "chosen")},
            "errors": qa_report["errors"],
        },
        out,
    )


@app.command()
@handle_errors
def adaptation(
    cases: CasesOpt = 5,
    seed: SeedOpt = 0,
    fractions: FractionsOpt = 3,
    planning_ct: PlanningCtOpt = None,
    planning_rtstruct: PlanningRsOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    iterative: Annotated[
        bool, typer.Option("--iterative/--no-iterative", help="Also run the B-spline baseline.")
    ] = True,
    slice_mm: SliceOpt = None,
    report: ReportOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Tiny phantoms and budget (a check of the command).")
    ] = False,
    out: OutOpt = None,
) -> None:
    """Adapt the model to held-out patients; generic vs patient model vs iterative baseline."""
    from jrs.model_export.export import ArtefactWriter
    from jrs.training.adapt_options import AdaptOptions
    from research.adapt_benchmark import benchmark_adaptation

    _both(planning_ct, planning_rtstruct)
    options = AdaptOptions()
    if dry_run:  # a check of the command: tiny budget, one step, small phantoms
        options = AdaptOptions(minutes=1.0, fractions=1, val_fractions=1, min_steps=1, max_steps=1)
    held = benchmark_adaptation(
        list(range(seed, seed + (1 if dry_run else cases))),
        ArtefactWriter(),
        base=model,
        real=(planning_ct, planning_rtstruct)
        if planning_ct is not None and planning_rtstruct is not None
        else None,
        fractions=1 if dry_run else fractions,
        options=options,
        iterative=iterative,
        matrix=128 if dry_run else 512,
        slice_mm=slice_mm,
        device=device,
        out_dir=report,
        progress=lambda m: log.info("adaptation benchmark %s", m),
    )
    typer.echo(held.markdown)
    _emit(
        {
            "benchmark": "adaptation",
            "adaptations": held.adaptations,
            "checks": held.checks,
            "rows": held.rows,
        },
        out,
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app()
