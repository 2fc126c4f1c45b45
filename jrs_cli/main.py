"""The ``jrs`` command line.

Every sub-command imports the units it needs lazily, so ``jrs --help`` stays fast and the
service/inference paths never pull in torch. Errors of the `JrsError` hierarchy are printed as one
clear line on stderr with a non-zero exit code (2 for bad input, 1 otherwise).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

app = typer.Typer(
    name="jrs",
    help="Joint registration and segmentation for online adaptive radiotherapy of the prostate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("jrs")


class _StderrHandler(logging.StreamHandler):
    """A stream handler that always writes to the current ``sys.stderr``.

    Test runners swap ``sys.stderr`` between invocations; a handler bound to the first one
    would write to a closed stream afterwards.
    """

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


def _setup_logging(verbose: bool = False) -> None:
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.captureWarnings(True)


def _handle_errors(func: F) -> F:
    """Turn `JrsError`s into a one-line message and exit code (2 input, 1 other)."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from jrs.errors import InvalidInput, JrsError, UnsupportedData

        _setup_logging()
        try:
            return func(*args, **kwargs)
        except JrsError as exc:
            typer.secho(f"error ({exc.code}): {exc.message}", err=True, fg=typer.colors.RED)
            code = 2 if isinstance(exc, InvalidInput | UnsupportedData) else 1
            raise typer.Exit(code=code) from exc

    return wrapper  # type: ignore[return-value]


def _safe_file_name(name: str) -> str:
    """A file-system-safe version of a ROI name (characters outside [A-Za-z0-9 ._+-] -> '_')."""
    cleaned = re.sub(r"[^A-Za-z0-9 ._+\-]", "_", name).strip()
    return cleaned or "unnamed"


@app.command()
@_handle_errors
def phantom(
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    patients: Annotated[int, typer.Option("--patients", min=1, help="Number of patients.")] = 1,
    fractions: Annotated[
        int, typer.Option("--fractions", min=0, help="Daily fractions per patient.")
    ] = 3,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the first patient.")] = 0,
    patient_position: Annotated[
        str, typer.Option("--patient-position", help="HFS, HFP, FFS or FFP.")
    ] = "HFS",
) -> None:
    """Write synthetic pelvic patients with planning and daily CTs, RTSTRUCTs and true DVFs.

    Layout: OUT/<patient>/planning/{ct/,rtstruct.dcm} and
    OUT/<patient>/fraction_<k>/{ct/,rtstruct.dcm,true_dvf.mha}.
    """
    from jrs.phantom import write_dataset

    written = write_dataset(
        out,
        patients=patients,
        fractions=fractions,
        seed=seed,
        patient_position=patient_position.upper(),
        progress=True,
    )
    for path in written:
        typer.echo(str(path))


@app.command("rtstruct-to-masks")
@_handle_errors
def rtstruct_to_masks(
    ct: Annotated[Path, typer.Option("--ct", help="Folder of the CT series.")],
    rtstruct: Annotated[Path, typer.Option("--rtstruct", help="RTSTRUCT file.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder for <ROI name>.nii.gz.")],
    allow_partial: Annotated[
        bool,
        typer.Option(
            "--allow-partial",
            help="Rasterise contours on the images present even when the RTSTRUCT references "
            "images missing from the CT folder.",
        ),
    ] = False,
) -> None:
    """Rasterise every ROI of an RTSTRUCT onto its CT grid, one mask file per ROI."""
    from tqdm import tqdm

    from jrs.dicom.rtstruct import masks_from_files

    # the RTSTRUCT is checked against the CT headers before pixels are read, so a wrong or
    # incomplete CT folder is reported as such ("references 98 images, 97 missing")
    _, _, masks = masks_from_files(ct, rtstruct, allow_partial=allow_partial)
    out.mkdir(parents=True, exist_ok=True)
    for name, mask in tqdm(masks.items(), desc="writing masks", unit="roi"):
        path = out / f"{_safe_file_name(name)}.nii.gz"
        mask.write(str(path))
        typer.echo(f"{path}\t{int(mask.array.sum())} voxels")


@app.command("masks-to-rtstruct")
@_handle_errors
def masks_to_rtstruct(
    ct: Annotated[Path, typer.Option("--ct", help="Folder of the CT series.")],
    masks: Annotated[
        Path, typer.Option("--masks", help="Folder of <ROI name>.nii.gz/.nii/.mha/.nrrd masks.")
    ],
    out: Annotated[Path, typer.Option("--out", help="RTSTRUCT file to write.")],
) -> None:
    """Write an RTSTRUCT for a CT from one binary mask file per ROI (ROI name = file name)."""
    from jrs.dicom.ct import read_ct_series
    from jrs.dicom.rtstruct import write_rtstruct
    from jrs.errors import InvalidInput
    from jrs.geometry import Volume

    series = read_ct_series(ct)
    files = (
        sorted(
            p
            for p in masks.iterdir()
            if p.is_file() and p.name.endswith((".nii.gz", ".nii", ".mha", ".mhd", ".nrrd"))
        )
        if masks.is_dir()
        else []
    )
    if not files:
        raise InvalidInput(
            f"{masks}: no mask files found; expected <ROI name>.nii.gz (or .nii, .mha, .nrrd)"
        )
    arrays = {}
    for path in files:
        name = re.sub(r"\.(nii\.gz|nii|mha|mhd|nrrd)$", "", path.name)
        vol = Volume.read(str(path))
        if not vol.geometry.same_grid(series.volume.geometry, tol_mm=0.01):
            vol = vol.resample(series.volume.geometry, "nearest")
        arrays[name] = vol.array > 0
    write_rtstruct(arrays, series, out)
    typer.echo(str(out))


def _recontour_options(
    model: Path | None,
    device: str,
    method: str,
    synonyms: Path | None,
    dvf_spacing: float | None,
) -> Any:
    from jrs.errors import InvalidInput
    from jrs.labels import SynonymTable
    from jrs.pipeline import RecontourOptions

    if method not in ("network", "iterative"):
        raise InvalidInput(f"--method {method!r} unknown; use network or iterative")
    if device not in ("auto", "cpu", "cuda"):
        raise InvalidInput(f"--device {device!r} unknown; use auto, cpu or cuda")
    return RecontourOptions(
        method=method,  # type: ignore[arg-type]
        model_dir=model,
        device=device,
        synonyms=SynonymTable.from_yaml(synonyms) if synonyms is not None else None,
        dvf_spacing_mm=dvf_spacing,
    )


ModelOpt = Annotated[
    Path | None, typer.Option("--model", help="Model folder models/<name>/<version>.")
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
MethodOpt = Annotated[
    str, typer.Option("--method", help="network (the model) or iterative (B-spline).")
]
SynonymOpt = Annotated[Path | None, typer.Option("--synonyms", help="YAML ROI-name synonym table.")]
DvfSpacingOpt = Annotated[
    float | None,
    typer.Option("--dvf-spacing", help="Write the DVF at this spacing (mm), not the CT grid."),
]


@app.command()
@_handle_errors
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
) -> None:
    """Re-contour a daily CT (rtstruct.dcm, dvf.mha, registration.dcm, qa.json, review.png)."""
    from jrs.pipeline import recontour as run

    opts = _recontour_options(model, device, method, synonyms, dvf_spacing)
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
    for path in (result.rtstruct, result.dvf, result.registration, result.qa, result.review):
        typer.echo(str(path))


ServerOpt = Annotated[
    str | None, typer.Option("--server", help="URL of a jrs service to re-contour through.")
]
ApiKeyOpt = Annotated[
    str | None,
    typer.Option("--api-key", envvar="JRS_API_KEY", help="--server: the service's Bearer key."),
]


def _remote_rows(server: str | None, api_key: str | None, timeout_s: float) -> Any:
    """Context manager: the row runner of `jrs_cli.remote` for ``--server``, else None."""
    import contextlib

    from jrs.errors import JrsError

    if server is None:
        return contextlib.nullcontext(None)
    try:
        from jrs_cli.remote import batch_runner
    except ImportError as exc:
        raise JrsError(f"--server needs httpx ({exc}); pip install 'jrs[serve]'") from exc
    return batch_runner(server, api_key, timeout_s=timeout_s)


@app.command()
@_handle_errors
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
) -> None:
    """Re-contour every fraction of a manifest; resumable; a failing row never stops the others.

    With ``--server URL`` the rows are sent to a jrs service (``--workers`` requests at a time)
    instead of being run here; the output layout and the status file are the same.
    """
    from tqdm import tqdm

    from jrs.batch import read_manifest, run_batch, select_shard, status_file_name

    opts = _recontour_options(model, device, method, synonyms, dvf_spacing)
    total = len(select_shard(read_manifest(manifest), shard_index, shard_count))
    with (
        _remote_rows(server, api_key, job_timeout) as row_runner,
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


@app.command()
@_handle_errors
def benchmark(
    what: Annotated[
        str,
        typer.Argument(
            help="phantom, prealign, recontour, heldout or service (one per process for memory)."
        ),
    ],
    out: Annotated[
        Path | None, typer.Option("--out", help="Also write the figures to this JSON file.")
    ] = None,
    fractions: Annotated[int, typer.Option("--fractions", min=1)] = 3,
    slices: Annotated[int, typer.Option("--slices", min=2, help="prealign: CT slices.")] = 150,
    slice_mm: Annotated[
        float | None, typer.Option("--slice-mm", help="phantom/recontour: slice thickness.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    method: MethodOpt = "network",
    cases: Annotated[
        int, typer.Option("--cases", min=1, help="heldout: phantoms (seeds SEED..SEED+N-1).")
    ] = 5,
    iterative: Annotated[
        bool,
        typer.Option("--iterative/--no-iterative", help="heldout: also run the B-spline baseline."),
    ] = True,
    report: Annotated[
        Path | None, typer.Option("--report", help="heldout: folder for CSV, timings and tables.")
    ] = None,
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
) -> None:
    """Measure speed, memory and accuracy (phantom, pre-alignment, re-contouring, held-out).

    ``heldout`` re-contours CASES held-out phantom fractions (seeds SEED.. never used in
    training) with the network and the iterative baseline and prints DSC/MSD per organ for the
    segmentation path, the registration path, the chosen contours and the baseline.

    ``service`` sends JOBS requests for one phantom case (CONCURRENCY at a time) to the REST
    service at --server, or to a local ``jrs serve`` it starts, and reports jobs per minute and
    the p50/p95 latency (see `jrs_cli.service_bench`).
    """
    import json

    from jrs import benchmark as bench
    from jrs.errors import InvalidInput

    if what == "phantom":
        result = bench.bench_phantom(fractions, seed, slice_mm)
    elif what == "prealign":
        result = bench.bench_prealign(slices, seed=seed)
    elif what == "recontour":
        result = bench.bench_recontour(method, model, seed, device, slice_mm)
    elif what == "heldout":
        from jrs.validation import validate_heldout

        held = validate_heldout(
            list(range(seed, seed + cases)),
            model_dir=model,
            device=device,
            iterative=iterative,
            slice_mm=slice_mm,
            out_dir=report,
            progress=lambda m: log.info("held-out %s", m),
        )
        typer.echo(held.markdown)
        result = {"benchmark": "heldout", "rows": held.rows, "timings_s": held.timings}
    elif what == "service":
        from jrs_cli.service_bench import bench_service

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
            f"benchmark {what!r} unknown; use phantom, prealign, recontour, heldout or service"
        )
    result["machine"] = bench.machine()
    text = json.dumps(result, indent=2)
    typer.echo(text)
    if out is not None:
        out.write_text(text + "\n")


@app.command()
@_handle_errors
def train(
    config: Annotated[Path, typer.Option("--config", help="YAML training config.")],
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue bit for bit from OUT/checkpoints/last.pt.")
    ] = False,
    iterations: Annotated[
        int | None, typer.Option("--iterations", min=0, help="Override the total step count.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Override the run folder (output_dir).")
    ] = None,
) -> None:
    """Train a network (checkpoints, CSV/TensorBoard logs and plots in the run folder)."""
    from training.config import load_config
    from training.trainer import Trainer

    cfg = load_config(config, iterations=iterations, output_dir=out)
    result = Trainer(cfg, resume=resume).run()
    typer.echo(
        f"step {result.step}: {result.steps_per_s:.3f} steps/s, "
        f"best validation Dice {result.best_dice:.4f}, checkpoint {result.last_checkpoint}"
    )


@app.command()
@_handle_errors
def evaluate(
    out: Annotated[Path, typer.Option("--out", help="Folder for metrics.csv and report.md.")],
    checkpoint: Annotated[
        list[Path] | None,
        typer.Option("--checkpoint", help="Training checkpoint (repeat for several)."),
    ] = None,
    untrained: Annotated[
        list[str] | None,
        typer.Option("--untrained", help="Also evaluate a freshly initialised network (name)."),
    ] = None,
    data: Annotated[
        Path | None, typer.Option("--data", help="Held-out dataset folder (jrs phantom layout).")
    ] = None,
    patients: Annotated[
        list[str] | None, typer.Option("--patient", help="Only these patients of --data.")
    ] = None,
    phantoms: Annotated[
        int | None, typer.Option("--phantoms", min=1, help="Generate N held-out phantoms.")
    ] = None,
    synthetic: Annotated[
        int | None, typer.Option("--synthetic", min=1, help="N synthetic blob pairs (smoke).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the first phantom.")] = 1000,
    fractions: Annotated[
        int, typer.Option("--fractions", min=1, help="Fractions per generated phantom.")
    ] = 1,
    window: Annotated[
        int, typer.Option("--window", help="Tiled-inference window (multiple of 4, >= 44).")
    ] = 96,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Evaluate checkpoints on held-out pairs: DSC/MSD/HD95 per organ, Jacobian, Wilcoxon."""
    from jrs.errors import InvalidInput
    from jrs.tiling import check_window
    from training.config import PhantomSource, SyntheticSource
    from training.data import discover_pairs, load_pair
    from training.evaluate import evaluate as run_evaluation
    from training.evaluate import load_network
    from training.networks import build
    from training.trainer import resolve_device, source_pairs

    check_window(window)
    if sum(x is not None for x in (data, phantoms, synthetic)) != 1:
        raise InvalidInput("give exactly one of --data DIR, --phantoms N or --synthetic N")
    if not checkpoint and not untrained:
        raise InvalidInput("nothing to evaluate: give --checkpoint FILE and/or --untrained NAME")
    dev = resolve_device(device)
    if data is not None:
        records = discover_pairs(data, patients)
        pairs = [load_pair(r, out / "cache") for r in records]
    elif phantoms is not None:
        pairs = source_pairs(PhantomSource(count=phantoms, seed=seed, fractions=fractions), None)
    else:
        pairs = source_pairs(None, SyntheticSource(count=synthetic or 1, seed=seed, size=64))
    models = {}
    for path in checkpoint or []:
        net, meta = load_network(path, dev)
        cfg = meta.get("config", {})
        name = f"{meta['network']['name']}/{cfg.get('weighting', {}).get('name', '?')}"
        name = f"{name}@{meta.get('step', '?')}"
        while name in models:
            name += "'"
        models[name] = net
    for net_name in untrained or []:
        models[f"{net_name} (untrained)"] = build(net_name).to(dev).eval()
    report = run_evaluation(
        models, pairs, out_dir=out, window=window, progress=lambda m: log.info("evaluated %s", m)
    )
    typer.echo(report.markdown)
    typer.echo(f"written: {report.csv_path}, {report.markdown_path}")


@app.command()
@_handle_errors
def export(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Training checkpoint (.pt).")],
    out: Annotated[Path, typer.Option("--out", help="Model repository root (e.g. models).")],
    name: Annotated[str, typer.Option("--name", help="Model name.")] = "crossstitch",
    version: Annotated[int, typer.Option("--version", min=1, help="Numeric model version.")] = 1,
    metrics: Annotated[
        Path | None, typer.Option("--metrics", help="JSON file of held-out metrics to record.")
    ] = None,
    exporter: Annotated[
        str, typer.Option("--exporter", help="auto (dynamo, else legacy), dynamo or legacy.")
    ] = "auto",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing version folder.")
    ] = False,
) -> None:
    """Export a checkpoint to OUT/NAME/VERSION/{model.onnx, metadata.json, MODEL_CARD.md}."""
    import json

    from model_export.export import export_checkpoint

    path = export_checkpoint(
        checkpoint,
        out,
        name=name,
        version=version,
        metrics=metrics,
        exporter=exporter,
        overwrite=overwrite,
    )
    meta = json.loads((path / "metadata.json").read_text())
    parity = meta["parity"]
    sizes = ", ".join(parity["max_abs_diff"])
    typer.echo(
        f"ONNX parity ({sizes}): max |diff| {parity['worst']:.2e} <= {parity['tolerance']:g} "
        f"(exporter {meta['onnx']['exporter']}, opset {meta['onnx']['opset']})"
    )
    typer.echo(str(path))


@app.command()
@_handle_errors
def serve(
    host: Annotated[str, typer.Option("--host", help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port.")] = 8000,
) -> None:
    """Run the REST service with uvicorn; settings from JRS_* variables and .env."""
    import uvicorn

    from service.app import create_app
    from service.settings import load_settings

    settings = load_settings()
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(handler)  # the service logs JSON lines instead
    uvicorn.run(create_app(settings), host=host, port=port, log_config=None, access_log=False)


def main() -> None:  # pragma: no cover - console entry
    """Console entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
