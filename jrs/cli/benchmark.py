"""``jrs benchmark``: speed and memory of the product (accuracy harnesses live in research/)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from jrs.cli.app import app, handle_errors, log
from jrs.cli.options import (
    ApiKeyOpt,
    DeviceOpt,
    EngineOpt,
    ModelOpt,
    PrecisionOpt,
    ServerOpt,
)
from jrs.core.errors import InvalidInput


@app.command()
@handle_errors
def benchmark(
    what: Annotated[
        str,
        typer.Argument(
            help="phantom, prealign, recontour, service or gpu (one per process for memory)."
        ),
    ],
    out: Annotated[
        Path | None, typer.Option("--out", help="Also write the figures to this JSON file.")
    ] = None,
    fractions: Annotated[int, typer.Option("--fractions", min=1)] = 3,
    slices: Annotated[int, typer.Option("--slices", min=2, help="prealign: CT slices.")] = 150,
    prealign_spacings: Annotated[
        str | None,
        typer.Option(
            "--prealign-spacings",
            help="prealign: coarse spacings to compare, mm, comma-separated (default: the "
            "pipeline's); with --planning-ct the given CT is used instead of the phantom.",
        ),
    ] = None,
    slice_mm: Annotated[
        float | None, typer.Option("--slice-mm", help="phantom/recontour: slice thickness.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    jobs: Annotated[int, typer.Option("--jobs", min=1, help="service: requests to send.")] = 10,
    concurrency: Annotated[
        int, typer.Option("--concurrency", min=1, help="service: requests in flight.")
    ] = 2,
    matrix: Annotated[
        int, typer.Option("--matrix", min=64, help="service: phantom in-plane matrix.")
    ] = 512,
    workers: Annotated[
        int, typer.Option("--workers", min=1, help="service: jobs the local server runs at once.")
    ] = 1,
    server: ServerOpt = None,
    api_key: ApiKeyOpt = None,
    engine: EngineOpt = "auto",
    precision: PrecisionOpt = "auto",
    repeats: Annotated[
        int, typer.Option("--repeats", min=1, help="recontour/gpu: runs per configuration (p50).")
    ] = 3,
    runs: Annotated[
        str | None,
        typer.Option(
            "--runs",
            help="recontour: configurations, comma-separated (default onnxruntime-fp32,"
            "openvino-fp32,openvino-bf16,iterative; also auto, openvino-bf16-no-null: without the "
            "null-field correction, openvino-bf16-1pass / -2pass: 1 or 2 network passes).",
        ),
    ] = None,
    planning_ct: Annotated[
        Path | None,
        typer.Option(
            "--planning-ct",
            help="recontour: a given case; prealign: a CT instead of the phantom.",
        ),
    ] = None,
    planning_rtstruct: Annotated[
        Path | None,
        typer.Option("--planning-rtstruct", help="With --planning-ct: its RTSTRUCT."),
    ] = None,
    daily_ct: Annotated[
        Path | None, typer.Option("--daily-ct", help="recontour: a given case.")
    ] = None,
    truth_rtstruct: Annotated[
        Path | None,
        typer.Option("--truth-rtstruct", help="recontour: the given daily CT's truth."),
    ] = None,
    dvf_error: Annotated[
        bool,
        typer.Option(
            "--dvf-error/--no-dvf-error",
            help="recontour: measure the coarse DVF grid against the full grid in the body.",
        ),
    ] = True,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="gpu: run the GPU script on the CPU, small sizes.")
    ] = False,
) -> None:
    """Measure speed and memory (phantom, pre-alignment, re-contouring, GPU, service).

    ``recontour`` re-contours one case (a 512 x 512 x ~150 phantom, seed SEED, or the given
    --planning-ct/--planning-rtstruct/--daily-ct) with ONNX Runtime fp32, OpenVINO fp32,
    OpenVINO bf16 and the iterative baseline, each in its own process with the model loaded once,
    and reports p50 per stage over --repeats runs, the cold first run, peak RSS, REG size, Dice,
    engine ratios and the coarse DVF's error against the full-grid field in the body.

    ``gpu`` is the one-call measurement for a lent GPU (at most 8 minutes): warm network latency
    per window, end-to-end p50 and batch fractions/hour with ONNX Runtime CUDA (TensorRT when
    installed); --dry-run runs it on the CPU with small sizes.

    ``service`` sends JOBS requests for one phantom case (CONCURRENCY at a time) to the REST
    service at --server, or to a local ``jrs serve`` it starts, and reports jobs per minute and
    the p50/p95 latency (see `jrs.cli.service_bench`).

    The held-out accuracy benchmarks (``heldout``, ``engines``, ``qa``, ``adaptation``) are the
    lab notebook's: ``python -m research --help`` in a source checkout.
    """
    from jrs.pipeline import benchmark as bench

    if what == "phantom":
        result = bench.bench_phantom(fractions, seed, slice_mm)
    elif what == "prealign":
        spacings = (
            [float(v) for v in prealign_spacings.split(",") if v.strip()]
            if prealign_spacings
            else None
        )
        result = bench.bench_prealign(slices, seed=seed, ct=planning_ct, spacings_mm=spacings)
    elif what == "recontour":
        given = (planning_ct, planning_rtstruct, daily_ct, truth_rtstruct)
        result = _recontour(given, runs, repeats, model, device, seed, slice_mm, dvf_error)
    elif what == "gpu":
        from jrs.pipeline.benchmark_gpu import bench_gpu

        result = bench_gpu(
            dry_run=dry_run,
            model=model,
            repeats=repeats,
            fractions=fractions,
            progress=lambda m: log.info("gpu %s", m),
        )
    elif what == "service":
        from jrs.cli.service_bench import bench_service

        result = bench_service(
            jobs=jobs,
            concurrency=concurrency,
            server=server,
            api_key=api_key,
            seed=seed,
            matrix=matrix,
            slice_mm=slice_mm,
            workers=workers,
            device=device,
            model=model,
        )
    else:
        raise InvalidInput(
            f"benchmark {what!r} unknown; use phantom, prealign, recontour, service or gpu (the "
            "held-out and QA harnesses: python -m research, in a source checkout)"
        )
    result["machine"] = bench.machine()
    text = json.dumps(result, indent=2)
    typer.echo(text)
    if out is not None:
        out.write_text(text + "\n")


def _recontour(
    given: tuple[Path | None, Path | None, Path | None, Path | None],
    runs: str | None,
    repeats: int,
    model: Path | None,
    device: str,
    seed: int,
    slice_mm: float | None,
    dvf_error: bool,
) -> dict[str, Any]:
    """``jrs benchmark recontour``: the phantom (or the given case) in each configuration."""
    from jrs.pipeline import benchmark as bench

    planning_ct, planning_rtstruct, daily_ct, truth_rtstruct = given
    if any(v is not None for v in given[:3]) and not all(v is not None for v in given[:3]):
        raise InvalidInput(
            "a given case needs --planning-ct, --planning-rtstruct and --daily-ct together"
        )
    case = (
        bench.given_case(planning_ct, planning_rtstruct, daily_ct, truth_rtstruct)  # type: ignore[arg-type]
        if planning_ct is not None
        else None
    )
    names = [r.strip() for r in runs.split(",") if r.strip()] if runs else None
    result = bench.bench_recontour(
        case,
        runs=names or bench.DEFAULT_RUNS,
        repeats=repeats,
        model=model,
        device=device,
        seed=seed,
        slice_mm=1.2 if slice_mm is None else slice_mm,
        dvf_error=dvf_error,
        progress=lambda m: log.info("benchmark %s", m),
    )
    typer.echo(result.pop("markdown"))
    return result
