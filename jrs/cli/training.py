"""Model commands: ``train``, ``evaluate``, ``export`` and ``adapt`` (they need torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from jrs.cli.app import app, handle_errors, log
from jrs.cli.options import DeviceOpt, EngineOpt, SynonymOpt, parse_fusion_method


@app.command()
@handle_errors
def train(
    config: Annotated[Path, typer.Option("--config", help="YAML training config.")],
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue bit for bit from OUT/checkpoints/last.pt (or from --resume-from FILE).",
        ),
    ] = False,
    resume_from: Annotated[
        Path | None,
        typer.Option(
            "--resume-from",
            help="Continue from this checkpoint file instead (e.g. a run's best.pt, or a "
            "committed last.pt); implies --resume; logs and new checkpoints go to OUT.",
        ),
    ] = None,
    init_from: Annotated[
        Path | None,
        typer.Option(
            "--init-from",
            help="Start a NEW run (step 0, fresh optimiser, loss weighting and sampler) with "
            "the network weights of this training checkpoint (same network and settings as "
            "the config); OUT must not hold a run yet.",
        ),
    ] = None,
    iterations: Annotated[
        int | None, typer.Option("--iterations", min=0, help="Override the total step count.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Override the run folder (output_dir).")
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(
            "--device",
            help="auto, cpu, cuda or cuda:N (overrides the config's device); under torchrun "
            "auto and cuda put each process on cuda:LOCAL_RANK.",
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            min=0,
            help="Loader processes drawing patch batches ahead of the step (overrides the "
            "config's workers; 0: in the training process). The batches do not depend on it.",
        ),
    ] = None,
    amp: Annotated[
        bool | None,
        typer.Option(
            "--amp/--no-amp",
            help="On CUDA: fp16 autocast of the network + gradient scaling (overrides the "
            "config's amp).",
        ),
    ] = None,
    precision: Annotated[
        str | None,
        typer.Option(
            "--precision",
            help="On the CPU: auto (bf16 where the CPU has AMX / AVX512-BF16), fp32 or bf16 "
            "(overrides the config's precision).",
        ),
    ] = None,
    time_budget: Annotated[
        float | None,
        typer.Option(
            "--time-budget",
            min=0.0,
            help="Minutes of wall time: stop at a step boundary with last.pt saved (--resume "
            "continues).",
        ),
    ] = None,
) -> None:
    """Train a network (checkpoints, CSV/TensorBoard logs and plots in the run folder).

    Several processes (GPUs) train together when launched by torchrun, e.g.
    torchrun --nproc_per_node 4 -m jrs.training --config FILE --device cuda.
    """
    from jrs.training.launch import train_run

    result = train_run(
        config,
        resume=resume,
        resume_from=resume_from,
        init_from=init_from,
        iterations=iterations,
        out=out,
        device=device,
        workers=workers,
        amp=amp,
        precision=precision,
        time_budget_minutes=time_budget,
    )
    if result.rank == 0:
        typer.echo(
            f"step {result.step}: {result.steps_per_s:.3f} steps/s, "
            f"best validation Dice {result.best_dice:.4f}, checkpoint {result.last_checkpoint}"
        )


@app.command()
@handle_errors
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
    store: Annotated[
        Path | None,
        typer.Option(
            "--store", help="A training store (python -m jrs.training.build_data); with --source."
        ),
    ] = None,
    store_source: Annotated[
        list[str] | None,
        typer.Option("--source", help="--store: the pairs of these sources (e.g. validation)."),
    ] = None,
    max_pairs: Annotated[
        int | None, typer.Option("--max-pairs", min=1, help="--store: at most N pairs.")
    ] = None,
    fusion: Annotated[
        str,
        typer.Option(
            "--fusion",
            help="Fused rows of networks with both paths: weighted, staple, evidence or none.",
        ),
    ] = "weighted",
    null_correction: Annotated[
        bool,
        typer.Option(
            "--null-correction",
            help="Subtract the field of the planning scan paired with itself, as the pipeline "
            "does (the release evaluation; the campaign's validation does not).",
        ),
    ] = False,
    network_passes: Annotated[
        int,
        typer.Option(
            "--network-passes",
            min=1,
            max=4,
            help="Network passes per pair, as the pipeline runs them (jrs.inference.cascade; "
            "the release evaluation uses the exported models' 2).",
        ),
    ] = 1,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the first phantom.")] = 1000,
    fractions: Annotated[
        int, typer.Option("--fractions", min=1, help="Fractions per generated phantom.")
    ] = 1,
    window: Annotated[
        int, typer.Option("--window", help="Tiled-inference window (multiple of 4, >= 44).")
    ] = 96,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    with_metrics: Annotated[
        list[Path] | None,
        typer.Option(
            "--with-metrics",
            help="metrics.csv of an earlier jrs evaluate on the same pairs (repeat for "
            "several): its networks join the report, compared paired with the new ones.",
        ),
    ] = None,
) -> None:
    """Evaluate checkpoints on held-out pairs: DSC/MSD/HD95 per organ, Jacobian, Wilcoxon."""
    from jrs.core.errors import InvalidInput
    from jrs.inference.tiling import check_window
    from jrs.training.config import PhantomSource, SyntheticSource
    from jrs.training.data import discover_pairs, load_pair
    from jrs.training.evaluate import evaluate as run_evaluation
    from jrs.training.evaluate import load_network
    from jrs.training.networks import build
    from jrs.training.runtime import resolve_device
    from jrs.training.sources import source_pairs

    check_window(window)
    if sum(x is not None for x in (data, phantoms, synthetic, store)) != 1:
        raise InvalidInput(
            "give exactly one of --data DIR, --phantoms N, --synthetic N or --store DIR"
        )
    fusion_method = None if fusion == "none" else parse_fusion_method(fusion)
    if not checkpoint and not untrained and not with_metrics:
        raise InvalidInput(
            "nothing to evaluate: give --checkpoint FILE, --untrained NAME and/or --with-metrics "
            "FILE"
        )
    from jrs.training.earlier_metrics import read_evaluation

    earlier = [read_evaluation(p) for p in with_metrics or []]
    dev = resolve_device(device)
    if data is not None:
        records = discover_pairs(data, patients)
        pairs = [load_pair(r, out / "cache") for r in records]
    elif store is not None:
        from jrs.training.store import load_store

        pairs = load_store(store, sources=store_source or None)[:max_pairs]
        if not pairs:
            raise InvalidInput(f"{store}: no pair of the sources {store_source or 'any'}")
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
        models,
        pairs,
        out_dir=out,
        window=window,
        progress=lambda m: log.info("evaluated %s", m),
        fusion=fusion_method,
        null_correction=null_correction,
        passes=network_passes,
        earlier=earlier,
    )
    typer.echo(report.markdown)
    typer.echo(f"written: {report.csv_path}, {report.markdown_path}")


@app.command()
@handle_errors
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

    from jrs.model_export.export import export_checkpoint

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
@handle_errors
def adapt(
    planning_ct: Annotated[Path, typer.Option("--planning-ct", help="Planning CT folder.")],
    planning_rtstruct: Annotated[
        Path, typer.Option("--planning-rtstruct", help="Planning RTSTRUCT file.")
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Patient model folder to write (like models/<n>/<v>).")
    ],
    synonyms: SynonymOpt = None,
    base: Annotated[
        Path | None,
        typer.Option("--base", help="Base model folder models/<name>/<version> (default bundled)."),
    ] = None,
    base_weights: Annotated[
        Path | None,
        typer.Option(
            "--base-weights",
            help="Torch weights of the base (weights.pt or a training checkpoint; default: "
            "weights.pt beside its model.onnx, else a matching checkpoint of models/checkpoints).",
        ),
    ] = None,
    minutes: Annotated[
        float, typer.Option("--minutes", min=0.01, help="Time budget of the whole run, minutes.")
    ] = 15.0,
    fractions: Annotated[
        int, typer.Option("--fractions", min=1, help="Synthetic fractions to fine-tune on.")
    ] = 6,
    val_fractions: Annotated[
        int, typer.Option("--val-fractions", min=1, help="Synthetic fractions held back.")
    ] = 2,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the fractions and sampling.")] = 0,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="RAdam learning rate.")] = 1e-4,
    device: DeviceOpt = "auto",
    threads: Annotated[
        int | None, typer.Option("--threads", min=1, help="Torch CPU threads (default: all).")
    ] = None,
    engine: EngineOpt = "auto",
    tolerance: Annotated[
        float,
        typer.Option("--tolerance", min=0.0, help="DSC an organ may lose and keep the adapted."),
    ] = 0.0,
    min_steps: Annotated[
        int, typer.Option("--min-steps", min=0, help="Fine-tuning steps even past the budget.")
    ] = 0,
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", min=0, help="At most this many steps.")
    ] = None,
    work: Annotated[
        Path | None,
        typer.Option(
            "--work", help="Work folder (default OUT/../.OUT.adapt); a rerun continues from it."
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an OUT made from other inputs.")
    ] = False,
    keep_work: Annotated[
        bool, typer.Option("--keep-work", help="Keep the work folder (pairs, checkpoints).")
    ] = False,
) -> None:
    """Adapt a model to one patient: fine-tune it on synthetic fractions of the planning scan.

    Writes a model folder (model.onnx, metadata.json, MODEL_CARD.md, weights.pt) for
    `jrs recontour --model OUT`. Held-back synthetic fractions decide: the adapted weights are kept
    only when no organ's DSC is lower than with the base model and the mean is higher; otherwise
    OUT holds the base model and the command says why. SIGTERM / Ctrl-C checkpoint and stop
    (exit code 75); the same command continues from the work folder.
    """
    import signal

    from jrs.core.labels import SynonymTable
    from jrs.model_export.export import ArtefactWriter
    from jrs.training.adapt import adapt as run_adaptation
    from jrs.training.adapt_options import AdaptationInterrupted, AdaptOptions

    stop = {"requested": False}

    def request_stop(signum: int, _frame: object) -> None:
        if stop["requested"]:  # a second signal: stop at once
            raise KeyboardInterrupt
        stop["requested"] = True
        log.warning("signal %d: stopping at the next checkpoint (send again to abort)", signum)

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    options = AdaptOptions(
        minutes=minutes,
        fractions=fractions,
        val_fractions=val_fractions,
        seed=seed,
        lr=lr,
        device=device,
        threads=threads,
        engine=engine,
        tolerance=tolerance,
        min_steps=min_steps,
        max_steps=max_steps,
        keep_work=keep_work,
    )
    try:
        result = run_adaptation(
            planning_ct,
            planning_rtstruct,
            out,
            ArtefactWriter(),
            base=base,
            base_weights=base_weights,
            options=options,
            synonyms=SynonymTable.from_yaml(synonyms) if synonyms is not None else None,
            work=work,
            overwrite=overwrite,
            should_stop=lambda: stop["requested"],
            progress=typer.echo,
        )
    except AdaptationInterrupted as exc:
        typer.secho(f"interrupted: {exc.message}; run the same command to continue", err=True)
        raise typer.Exit(code=75) from exc
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    ada = result.metadata["adaptation"]
    val = ada["validation"]
    typer.echo(f"{'organ':<20}{'base DSC':>10}{'adapted':>10}{'base MSD':>10}{'adapted':>10}")
    figures = [val["base"], val.get("adapted") or {}]
    for organ in val["base"].get("dsc") or {}:
        cells = [
            "-" if v is None else f"{v:.3f}"
            for metric in ("dsc", "msd")
            for v in ((fig.get(metric) or {}).get(organ) for fig in figures)
        ]
        typer.echo(f"{organ:<20}" + "".join(f"{c:>10}" for c in cells))
    rate = ada.get("steps_per_s")
    typer.echo(
        f"{'ADAPTED' if result.kept else 'BASE'} model kept: {result.reason}\n"
        f"{result.steps} fine-tuning steps"
        + (f" ({rate:.3f} steps/s, {ada['precision']} on {ada['device']})" if rate else "")
        + f", {result.seconds / 60:.1f} min in all"
    )
    typer.echo(str(result.out))
