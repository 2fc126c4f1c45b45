"""Re-contouring commands: ``recontour`` (one fraction) and ``batch`` (a manifest)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from jrs.cli.app import app, handle_errors
from jrs.cli.options import (
    ApiKeyOpt,
    CacheDirOpt,
    DeviceOpt,
    DvfSmoothingOpt,
    DvfSpacingOpt,
    EngineOpt,
    FarFieldOpt,
    FusionMethodOpt,
    MethodOpt,
    ModelOpt,
    NetworkPassesOpt,
    NullCorrectionOpt,
    NullPassOpt,
    PathChoiceOpt,
    PrealignOpt,
    PrecisionOpt,
    RefineOpt,
    ServerOpt,
    SynonymOpt,
    parse_fusion_method,
    recontour_options,
)


@app.command()
@handle_errors
def recontour(
    planning_ct: Annotated[Path, typer.Option("--planning-ct", help="Planning CT folder.")],
    planning_rtstruct: Annotated[
        Path, typer.Option("--planning-rtstruct", help="Planning RTSTRUCT file.")
    ],
    daily_ct: Annotated[Path, typer.Option("--daily-ct", help="Daily CT folder.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    method: MethodOpt = "network",
    synonyms: SynonymOpt = None,
    dvf_spacing: DvfSpacingOpt = None,
    engine: EngineOpt = "auto",
    precision: PrecisionOpt = "auto",
    path_choice: PathChoiceOpt = None,
    fusion_method: FusionMethodOpt = None,
    null_correction: NullCorrectionOpt = None,
    dvf_smoothing_mm: DvfSmoothingOpt = None,
    network_passes: NetworkPassesOpt = None,
    prealign: PrealignOpt = "prostate",
    far_field: FarFieldOpt = "bony",
    refine: RefineOpt = "off",
    null_pass: NullPassOpt = "planning",
    cache_dir: CacheDirOpt = None,
) -> None:
    """Re-contour a daily CT (rtstruct.dcm, dvf.mha, registration.dcm, qa.json, review.png)."""
    from jrs.inference.null_cache import check_null_pass
    from jrs.pipeline.run import recontour as run
    from jrs.registration.focus import check_prealign_mode

    opts = recontour_options(
        model, device, method, synonyms, dvf_spacing, engine, precision, path_choice
    )
    opts.fusion_method = parse_fusion_method(fusion_method)
    opts.null_correction = null_correction
    opts.dvf_smoothing_mm = dvf_smoothing_mm
    opts.network_passes = network_passes
    opts.prealign = check_prealign_mode(prealign)
    opts.far_field = far_field  # (checked by the pipeline)
    opts.refine = refine
    opts.null_pass = check_null_pass(null_pass)
    if cache_dir is not None:
        opts.cache_dir = None if str(cache_dir).strip().lower() in ("off", "none") else cache_dir
    result = run(planning_ct, planning_rtstruct, daily_ct, out, opts)
    qa = result.qa_data
    typer.echo(f"{'structure':<20}{'source':<14}{'planning cc':>12}{'daily cc':>10}  flags")
    for s in qa["structures"]:
        flags = "; ".join(s["flags"]) or "-"
        typer.echo(
            f"{s['name']:<20}{s['source']:<14}{s['planning_cc']:>12.1f}{s['daily_cc']:>10.1f}"
            f"  {flags}"
        )
    d = qa["dvf"]
    typer.echo(
        f"DVF: min det J {d['min']:.3f}, folding {100 * d['folding_fraction']:.3f} %, "
        f"std det J {d['std']:.3f}; total {qa['timings_s']['total']:.1f} s"
    )
    m = qa["model"]
    if m.get("engine"):
        typer.echo(f"network: {m['engine']} on {m['device']}, {m['precision']}")
    for path in (result.rtstruct, result.dvf, result.registration, result.qa, result.review):
        typer.echo(str(path))


def _remote_rows(
    server: str | None, api_key: str | None, timeout_s: float, patients_out: Path | None = None
) -> Any:
    """Context manager: the row runner of `jrs.cli.remote` for ``--server``, else None.

    With ``patients_out`` (``--adapt``) the rows go through the service's patients resource.
    """
    import contextlib

    from jrs.core.errors import JrsError

    if server is None:
        return contextlib.nullcontext(None)
    try:
        from jrs.cli.remote import batch_runner, patient_batch_runner
    except ImportError as exc:
        raise JrsError(f"--server needs httpx ({exc}); pip install 'jrs[serve]'") from exc
    if patients_out is not None:
        return patient_batch_runner(server, api_key, patients_out, timeout_s=timeout_s)
    return batch_runner(server, api_key, timeout_s=timeout_s)


@app.command()
@handle_errors
def batch(
    manifest: Annotated[
        Path,
        typer.Option("--manifest", help="CSV: planning_ct, planning_rtstruct, daily_ct[, id]."),
    ],
    out: Annotated[Path, typer.Option("--out", help="Output folder (OUT/<id>/, status CSV).")],
    workers: Annotated[int, typer.Option("--workers", min=1, help="Parallel processes.")] = 1,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="Run rows that failed before again.")
    ] = False,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    method: MethodOpt = "network",
    synonyms: SynonymOpt = None,
    dvf_spacing: DvfSpacingOpt = None,
    engine: EngineOpt = "auto",
    precision: PrecisionOpt = "auto",
    shard_index: Annotated[
        int,
        typer.Option(
            "--shard-index",
            min=0,
            help="Run only this shard (0-based) of --shard-count, e.g. an Indexed Job's "
            "$JOB_COMPLETION_INDEX.",
        ),
    ] = 0,
    shard_count: Annotated[
        int,
        typer.Option(
            "--shard-count",
            min=1,
            help="Split the rows round robin into this many shards (own status file each).",
        ),
    ] = 1,
    server: ServerOpt = None,
    api_key: ApiKeyOpt = None,
    job_timeout: Annotated[
        float, typer.Option("--job-timeout", min=1, help="--server: seconds a row may take.")
    ] = 1800.0,
    adapt: Annotated[
        bool,
        typer.Option(
            "--adapt",
            help="Adapt the model (--model) to each patient first (manifest column 'patient', "
            "else the planning series) and re-contour its fractions with it (jrs adapt).",
        ),
    ] = False,
    adapt_minutes: Annotated[
        float, typer.Option("--adapt-minutes", min=0.01, help="--adapt: budget per patient, min.")
    ] = 15.0,
    path_choice: PathChoiceOpt = None,
) -> None:
    """Re-contour every fraction of a manifest; resumable; a failing row never stops the others.

    With ``--server URL`` the rows are sent to a jrs service (``--workers`` requests at a time)
    instead of being run here; the output layout and the status file are the same. With
    ``--adapt`` each patient's model is adapted once (OUT/patient_models/, OUT/adapt_status.csv)
    and the status file's ``model`` column says which model each fraction used; with ``--server``
    too, each patient is uploaded once to the service (POST /v1/patients), which adapts it.
    """
    from tqdm import tqdm

    from jrs.core.errors import InvalidInput
    from jrs.pipeline.batch import (
        group_rows,
        read_manifest,
        run_batch,
        select_shard,
        status_file_name,
    )
    from jrs.pipeline.batch import select_shard_groups as shard_groups

    if path_choice and server is not None:
        raise InvalidInput(
            "--path-choice applies to rows run here; a service uses its operator's setting "
            "(JRS_PATH_CHOICE, or the model's validated choice)"
        )
    opts = recontour_options(
        model, device, method, synonyms, dvf_spacing, engine, precision, path_choice
    )
    rows = read_manifest(manifest)
    local_adapt = adapt and server is None  # with --server, the service adapts per patient
    if local_adapt:
        mine = shard_groups(group_rows(rows), shard_index, shard_count)
        total = sum(len(members) for members in mine.values())
    else:
        total = len(select_shard(rows, shard_index, shard_count))
    adapter = _patient_adapter(model, adapt_minutes, device, opts.synonyms) if local_adapt else None
    with (
        _remote_rows(server, api_key, job_timeout, out if adapt else None) as row_runner,
        tqdm(total=total, desc="batch", unit="fraction") as bar,
    ):
        summary = run_batch(
            manifest,
            out,
            opts,
            workers=workers,
            retry_failed=retry_failed,
            row_runner=row_runner,
            on_progress=lambda _id, _state: bar.update(1),
            shard_index=shard_index,
            shard_count=shard_count,
            adapter=adapter,
            on_adapt=lambda group, outcome: tqdm.write(f"patient model {group}: {outcome}"),
        )
        bar.update(len(summary.skipped))
    typer.echo(
        f"done {len(summary.done)}, skipped {len(summary.skipped)} (earlier runs), "
        f"failed {len(summary.failed)} in {summary.seconds:.1f} s; status in "
        f"{out / status_file_name(shard_index, shard_count)}"
    )
    for row_id, message in summary.failed.items():
        typer.echo(f"  {row_id}: {message}", err=True)
    if summary.failed:
        raise typer.Exit(code=1)


def _patient_adapter(base: Path | None, minutes: float, device: str, synonyms: Any) -> Any:
    """``jrs batch --adapt``: the batch adapter (`jrs.training.adapt.adapt`)."""
    from jrs.core.errors import JrsError

    try:
        from jrs.model_export.export import ArtefactWriter
        from jrs.training.adapt import adapt as run_adaptation
        from jrs.training.adapt_options import AdaptOptions
    except ImportError as exc:
        raise JrsError(f"--adapt needs torch ({exc}); pip install 'jrs[train]'") from exc

    def run(planning_ct: Path, planning_rtstruct: Path, out: Path) -> dict[str, Any]:
        result = run_adaptation(
            planning_ct,
            planning_rtstruct,
            out,
            ArtefactWriter(),
            base=base,
            options=AdaptOptions(minutes=minutes, device=device),
            synonyms=synonyms,
        )
        return {"kept": result.kept, "reason": result.reason}

    return run
