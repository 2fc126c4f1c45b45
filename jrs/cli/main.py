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
        from jrs.core.errors import InvalidInput, JrsError, UnsupportedData

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
    from_planning: Annotated[
        Path | None,
        typer.Option(
            "--from-planning",
            help="Planning CT folder: write synthetic fractions of this real scan instead "
            "(needs --rtstruct; --patients and --patient-position do not apply).",
        ),
    ] = None,
    rtstruct: Annotated[
        Path | None,
        typer.Option("--rtstruct", help="With --from-planning: the planning RTSTRUCT file."),
    ] = None,
    synonyms: Annotated[
        Path | None,
        typer.Option("--synonyms", help="With --from-planning: YAML ROI-name synonym table."),
    ] = None,
    family: Annotated[
        str | None,
        typer.Option(
            "--family",
            help="Deformation family of the daily fractions: 'organ' (the organ-aware engine the "
            "model is trained on; the default with --from-planning) or 'dome' (a held-out test "
            "family, never used for training). Without --from-planning the default stays the "
            "analytic phantom motion.",
        ),
    ] = None,
    profile: Annotated[
        str,
        typer.Option(
            "--profile",
            help="Draw profile of the organ family: 'v3' (the ranges the released model was "
            "trained on) or 'broad' (bladder 0.5x-1.8x, rectum 0.7x-1.5x, rotations to 3 deg "
            "about a point up to 60 mm from the prostate).",
        ),
    ] = "v3",
) -> None:
    """Write synthetic pelvic patients with planning and daily CTs, RTSTRUCTs and true DVFs.

    Layout: OUT/<patient>/planning/{ct/,rtstruct.dcm} and
    OUT/<patient>/fraction_<k>/{ct/,rtstruct.dcm,true_dvf.mha}. With --from-planning, the
    fractions are synthetic daily scans of that planning CT + RTSTRUCT (organ-aware deformation
    engine, or the held-out dome engine with --family dome), written as OUT/planning_<hash>/...
    with fraction_<k>/params.json. --family organ|dome makes the phantoms' fractions with that
    engine too (default: the analytic phantom motion).
    """
    from jrs.core.errors import InvalidInput

    if family is not None and family not in ("organ", "dome"):
        raise InvalidInput(f"--family {family!r} unknown; use organ or dome")
    organ_family = family == "organ" or (family is None and from_planning is not None)
    if profile != "v3" and not organ_family:
        raise InvalidInput(
            f"--profile {profile!r} applies to the organ family only (--family organ, the "
            "default with --from-planning)"
        )
    if from_planning is not None:
        if rtstruct is None:
            raise InvalidInput(
                "--from-planning needs --rtstruct FILE (the planning RTSTRUCT of that CT)"
            )
        if patients != 1 or patient_position.upper() != "HFS":
            raise InvalidInput(
                "--patients and --patient-position do not apply with --from-planning (one "
                "planning scan, stored as it was acquired)"
            )
        from jrs.core.labels import SynonymTable
        from jrs.synth.from_planning import write_from_planning

        folder = write_from_planning(
            from_planning,
            rtstruct,
            out,
            fractions=fractions,
            seed=seed,
            synonyms=SynonymTable.from_yaml(synonyms) if synonyms is not None else None,
            progress=True,
            family=family or "organ",
            profile=profile,
        )
        typer.echo(str(folder))
        return
    if rtstruct is not None or synonyms is not None:
        raise InvalidInput("--rtstruct and --synonyms apply only with --from-planning CT_DIR")
    if family is not None:  # phantoms whose fractions come from a deformation engine
        made = _engine_phantoms(out, patients, fractions, seed, patient_position, family, profile)
        for path in made:
            typer.echo(str(path))
        return
    from jrs.synth import write_dataset

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


def _engine_phantoms(
    out: Path,
    patients: int,
    fractions: int,
    seed: int,
    position: str,
    engine: str,
    profile: str = "v3",
) -> list[Path]:
    """Write phantom patients (seeds SEED..) whose fractions are made by `engine` (organ, dome).

    The layout of ``write_dataset``, plus ``fraction_<k>/params.json`` (the engine's parameters
    and ``"family"``).
    """
    import json

    from tqdm import tqdm

    from jrs.synth import generate_fraction, generate_patient, write_fraction, write_patient

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with tqdm(total=patients * (1 + fractions), desc="phantom", unit="scan") as bar:
        for i in range(patients):
            patient = generate_patient(seed + i, position.upper())
            folder = out / patient.name
            write_patient(patient, folder)
            bar.update(1)
            for k in range(1, fractions + 1):
                frac = generate_fraction(patient, k, engine=engine, profile=profile)
                write_fraction(frac, folder / f"fraction_{k}")
                record = {"fraction": k, "seed": seed + i, **frac.params, "family": engine}
                (folder / f"fraction_{k}" / "params.json").write_text(json.dumps(record, indent=2))
                bar.update(1)
            written.append(folder)
    return written


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

    from jrs.io.rtstruct import masks_from_files

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
    from jrs.core.errors import InvalidInput
    from jrs.core.geometry import Volume
    from jrs.io.ct import read_ct_series
    from jrs.io.rtstruct import write_rtstruct

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


@app.command("rois")
@_handle_errors
def rois(
    rtstruct: Annotated[Path, typer.Option("--rtstruct", help="RTSTRUCT file.")],
    synonyms: Annotated[
        Path | None, typer.Option("--synonyms", help="YAML ROI-name synonym table.")
    ] = None,
    prefer_automatic: Annotated[
        bool,
        typer.Option(
            "--prefer-automatic",
            help="Use automatic contours (_DL, _MBS, _AI ...) rather than the manual ones.",
        ),
    ] = False,
    ct: Annotated[
        Path | None,
        typer.Option("--ct", help="The RTSTRUCT's CT folder: also run the plausibility checks."),
    ] = None,
) -> None:
    """Show which ROI maps to which organ, and why (and, with --ct, the plausibility checks)."""
    from jrs.core.labels import SynonymTable
    from jrs.io.rtstruct import masks_from_files, read_rtstruct

    table = SynonymTable.from_yaml(synonyms) if synonyms is not None else SynonymTable()
    if prefer_automatic:
        table.prefer_automatic = True
    names = read_rtstruct(rtstruct).roi_names
    mapping = table.resolve(names)
    width = max([len(n) for n in names] + [8]) + 2
    typer.echo(f"{'ROI':<{width}}{'used as':<20}{'rule':<19}why")
    for d in mapping.decisions:
        typer.echo(f"{d.roi:<{width}}{d.used_as or '-':<20}{d.rule:<19}{d.reason}")
    if not mapping.used:
        typer.echo(
            "no ROI maps to an organ the network re-contours: `jrs recontour` refuses this "
            "structure set with --method network (--method iterative propagates its ROIs)"
        )
    if ct is not None:
        from jrs.qa.plausibility import check_planning

        _, series, masks = masks_from_files(ct, rtstruct)
        findings = check_planning(masks, mapping, series.volume.geometry, series.volume)
        for f in findings:
            typer.echo(f"{f.severity}: {f.check}: {f.message}")
        if not findings:
            typer.echo("plausibility: every check passed")


def _recontour_options(
    model: Path | None,
    device: str,
    method: str,
    synonyms: Path | None,
    dvf_spacing: float | None,
    engine: str = "auto",
    precision: str = "auto",
    path_choice: list[str] | None = None,
) -> Any:
    from jrs.core.errors import InvalidInput
    from jrs.core.labels import SynonymTable
    from jrs.inference import check_engine_options
    from jrs.pipeline.run import DEFAULT_DVF_SPACING_MM, RecontourOptions, parse_path_choice

    if method not in ("network", "iterative"):
        raise InvalidInput(f"--method {method!r} unknown; use network or iterative")
    if device not in ("auto", "cpu", "cuda"):
        raise InvalidInput(f"--device {device!r} unknown; use auto, cpu or cuda")
    engine, precision = check_engine_options(engine, precision)
    if dvf_spacing is not None and dvf_spacing < 0:
        raise InvalidInput(
            f"--dvf-spacing must be >= 0 mm (0: the daily CT grid), got {dvf_spacing}"
        )
    spacing = DEFAULT_DVF_SPACING_MM if dvf_spacing is None else (dvf_spacing or None)
    return RecontourOptions(
        method=method,  # type: ignore[arg-type]
        model_dir=model,
        device=device,
        engine=engine,
        precision=precision,
        synonyms=SynonymTable.from_yaml(synonyms) if synonyms is not None else None,
        dvf_spacing_mm=spacing,
        path_choice=parse_path_choice(path_choice),  # type: ignore[arg-type]
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
    typer.Option(
        "--dvf-spacing",
        help="Spacing (mm) of the written DVF and DICOM REG (default 3; 0: the daily CT grid).",
    ),
]
EngineOpt = Annotated[
    str,
    typer.Option(
        "--engine",
        envvar="JRS_ENGINE",
        help="auto (CUDA: ONNX Runtime; CPU: OpenVINO if installed), onnxruntime or openvino.",
    ),
]
PrecisionOpt = Annotated[
    str,
    typer.Option(
        "--precision",
        envvar="JRS_PRECISION",
        help="auto (bf16 on a CPU with AMX/AVX512-BF16 under OpenVINO, else fp32), fp32, bf16 "
        "or fp16 (TensorRT).",
    ),
]
PathChoiceOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--path-choice",
        help="ORGAN=PATH[,ORGAN=PATH] (repeatable): the output path of an organ (prostate, "
        "seminal_vesicles, rectum, bladder or all): segmentation, registration or fusion (the "
        "two fused, method and weights from the model). Default: the model's validated choice.",
    ),
]

FusionMethodOpt = Annotated[
    str | None,
    typer.Option(
        "--fusion-method",
        help="Method of the organs fused (path choice fusion): weighted, staple or evidence "
        "(the registration path, corrected by the segmentation path where the daily CT and the "
        "warped planning CT disagree). Default: the model's.",
    ),
]


NullCorrectionOpt = Annotated[
    bool | None,
    typer.Option(
        "--null-correction/--no-null-correction",
        help="Subtract the network's field for the planning scan paired with itself, so that "
        "the same scan twice moves nothing (one more network pass). Default: the model's "
        "metadata, on when it says nothing.",
    ),
]

DvfSmoothingOpt = Annotated[
    float | None,
    typer.Option(
        "--dvf-smoothing-mm",
        min=0.0,
        help="Gaussian sigma (mm) of a filter on the network's final field, which removes its "
        "voxel-scale roughness (0: none). Default: the model's metadata dvf_smoothing_mm.",
    ),
]

NetworkPassesOpt = Annotated[
    int | None,
    typer.Option(
        "--network-passes",
        min=1,
        max=4,
        help="Network passes on the pair: each pass after the first registers what the field "
        "so far left over (about 2-3 s more each on a CPU). Default: the model's metadata "
        "network_passes, else 1.",
    ),
]


PrealignOpt = Annotated[
    str,
    typer.Option(
        "--prealign",
        help="Pre-alignment before the deformable registration: 'prostate' (whole-body rigid, "
        "then a rigid match on the planning prostate and seminal vesicles with 25 mm of "
        "surroundings; whole-body affine when neither is drawn) or 'affine' (whole-body rigid "
        "then affine).",
    ),
]


FarFieldOpt = Annotated[
    str,
    typer.Option(
        "--far-field",
        help="The mapping outside the network box, blended smoothly from the box over 60 mm: "
        "'bony' (a rigid match of the bones) or 'focus' (the box's prostate-centred "
        "pre-alignment everywhere).",
    ),
]
RefineOpt = Annotated[
    str,
    typer.Option(
        "--refine",
        help="'on': refine the network's field on the pair (a coarse B-spline registration on "
        "top of it, kept per organ where the daily CT agrees better around the organ; about 30 s "
        "on 2 cores); 'off' (default: it has not yet been measured to help).",
    ),
]
NullPassOpt = Annotated[
    str,
    typer.Option(
        "--null-pass",
        help="The null-field correction's network pass: 'planning' (default: once per "
        "planning scan, kept in the cache folder and carried onto each daily pair; two network "
        "passes fewer per run) or 'pair' (on every pair and cascaded pass).",
    ),
]
CacheDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        envvar="JRS_CACHE_DIR",
        help="Cache folder (planning null fields, OpenVINO's compiled models); default "
        "~/.cache/jrs; 'off': none.",
    ),
]


def _fusion_method(value: str | None) -> str | None:
    from jrs.core.errors import InvalidInput
    from jrs.inference.fusion import FUSION_METHODS

    if value is not None and value not in FUSION_METHODS:
        raise InvalidInput(f"--fusion-method {value!r} unknown; use {', '.join(FUSION_METHODS)}")
    return value


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

    opts = _recontour_options(
        model, device, method, synonyms, dvf_spacing, engine, precision, path_choice
    )
    opts.fusion_method = _fusion_method(fusion_method)
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


ServerOpt = Annotated[
    str | None, typer.Option("--server", help="URL of a jrs service to re-contour through.")
]
ApiKeyOpt = Annotated[
    str | None,
    typer.Option("--api-key", envvar="JRS_API_KEY", help="--server: the service's Bearer key."),
]


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
    opts = _recontour_options(
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


@app.command()
@_handle_errors
def benchmark(
    what: Annotated[
        str,
        typer.Argument(
            help="phantom, prealign, recontour, heldout, engines, service, gpu or qa (one per "
            "process for memory)."
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
    real_seed: Annotated[
        int,
        typer.Option(
            "--real-seed",
            help="qa: seed of the real planning scan's synthetic fractions (default 5005).",
        ),
    ] = 5005,
    held_out: Annotated[
        Path | None,
        typer.Option(
            "--held-out",
            help=(
                "qa: report folder of other cases: the thresholds chosen on --report are "
                "tested on its records."
            ),
        ),
    ] = None,
    case_engine: Annotated[
        str,
        typer.Option(
            "--case-engine",
            help="qa: deformation engine of the phantom cases: 'analytic' (default) or 'organ' "
            "(the held-out dome family is refused: it is the cross-generator test).",
        ),
    ] = "analytic",
    profile: Annotated[
        str,
        typer.Option(
            "--profile",
            help="qa: draw profile of the organ engine (organ phantoms and the real scan's "
            "fractions): 'v3' or 'broad'.",
        ),
    ] = "v3",
    labels: Annotated[
        str,
        typer.Option(
            "--labels",
            help="qa: truth criteria: 'v3' (bad DSC < 0.8 or MSD > 2 mm, good DSC >= 0.9) or "
            "'issue30' (bad DSC < 0.90 or MSD > 2 mm, good DSC >= 0.95).",
        ),
    ] = "v3",
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    method: MethodOpt = "network",
    cases: Annotated[
        int,
        typer.Option(
            "--cases",
            min=0,
            help="heldout/qa/adaptation: phantoms (seeds SEED..SEED+N-1); 0 with --planning-ct: "
            "the real patient's fractions only.",
        ),
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
            "null-field correction, openvino-bf16-1pass / -2pass: 1 or 2 network passes); "
            "engines: reference,candidate "
            "(default onnxruntime-fp32,openvino-bf16).",
        ),
    ] = None,
    planning_ct: Annotated[
        Path | None,
        typer.Option(
            "--planning-ct",
            help="recontour/engines: a given case; heldout/qa/adaptation: a real planning scan "
            "kept out of training (FRACTIONS synthetic fractions of it are cases).",
        ),
    ] = None,
    planning_rtstruct: Annotated[
        Path | None,
        typer.Option("--planning-rtstruct", help="With --planning-ct: its RTSTRUCT."),
    ] = None,
    synonyms: SynonymOpt = None,
    fusion_method: FusionMethodOpt = None,
    null_correction: NullCorrectionOpt = None,
    dvf_smoothing_mm: DvfSmoothingOpt = None,
    network_passes: NetworkPassesOpt = None,
    prealign: PrealignOpt = "prostate",
    daily_ct: Annotated[
        Path | None, typer.Option("--daily-ct", help="recontour/engines: a given case.")
    ] = None,
    truth_rtstruct: Annotated[
        Path | None,
        typer.Option("--truth-rtstruct", help="recontour/engines: the given daily CT's truth."),
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
    """Measure speed, memory and accuracy (phantom, pre-alignment, re-contouring, held-out).

    ``recontour`` re-contours one case (a 512 x 512 x ~150 phantom, seed SEED, or the given
    --planning-ct/--planning-rtstruct/--daily-ct) with ONNX Runtime fp32, OpenVINO fp32,
    OpenVINO bf16 and the iterative baseline, each in its own process with the model loaded once,
    and reports p50 per stage over --repeats runs, the cold first run, peak RSS, REG size, Dice,
    engine ratios and the coarse DVF's error against the full-grid field in the body.

    ``engines`` re-contours CASES held-out phantoms (and a given case) with two engines and
    compares per-organ DSC and the DVFs (the accuracy guard of OpenVINO bf16).

    ``gpu`` is the one-call measurement for a lent GPU (at most 8 minutes): warm network latency
    per window, end-to-end p50 and batch fractions/hour with ONNX Runtime CUDA (TensorRT when
    installed); --dry-run runs it on the CPU with small sizes.

    ``heldout`` re-contours CASES held-out phantom fractions (seeds SEED.. never used in
    training) and FRACTIONS synthetic fractions of --planning-ct/--planning-rtstruct (a real
    patient kept out of training; --synonyms for its ROI names) with the network and the
    iterative baseline and prints DSC/MSD/HD95 per organ for no registration (pre-alignment
    alone), the segmentation path, the registration path, their fusion, the chosen contours and
    the baseline, and the folding and std log J of each method's field.

    ``adaptation`` adapts the model (--model) to CASES held-out phantoms (seeds SEED..) and to
    the given --planning-ct/--planning-rtstruct (a real patient kept out of training), then
    re-contours FRACTIONS test fractions of each with the generic model, the patient model and
    the iterative baseline: DSC/MSD per organ, adaptation times, the acceptance checks
    (`jrs.training.adapt_benchmark`); --dry-run: tiny phantoms and budget (a check of the command).

    ``service`` sends JOBS requests for one phantom case (CONCURRENCY at a time) to the REST
    service at --server, or to a local ``jrs serve`` it starts, and reports jobs per minute and
    the p50/p95 latency (see `jrs.cli.service_bench`).

    ``qa`` calibrates the QA flags against the truth (`jrs.qa_calibration`, ``docs/qa.md``):
    CASES held-out phantoms (seeds SEED.., 3000 when SEED is 0) and FRACTIONS synthetic
    fractions of the real planning scan --planning-ct/--planning-rtstruct (skipped when absent),
    re-contoured in the populations --runs (default network, other_path, iterative, dvf_noise,
    shifted_planning, cutoff_fov); records and the report (JSON + Markdown) go to --report, and a
    re-run resumes from the records there.
    """
    import json

    from jrs.core.errors import InvalidInput
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
    elif what in ("recontour", "engines"):
        given = (planning_ct, planning_rtstruct, daily_ct)
        if any(v is not None for v in given) and not all(v is not None for v in given):
            raise InvalidInput(
                "a given case needs --planning-ct, --planning-rtstruct and --daily-ct together"
            )
        case = (
            bench.given_case(planning_ct, planning_rtstruct, daily_ct, truth_rtstruct)  # type: ignore[arg-type]
            if planning_ct is not None
            else None
        )
        names = [r.strip() for r in runs.split(",") if r.strip()] if runs else None
        if what == "recontour":
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
        else:
            from jrs.validation import compare_engines

            pair = names or ["onnxruntime-fp32", "openvino-bf16"]
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
            result = {
                "benchmark": "engines",
                "engines": list(compared.engines),
                "rows": compared.rows,
                "dvf": compared.dvf,
                "max_dsc_diff": compared.max_dsc_diff,
                "timings_s": compared.timings,
            }
    elif what == "gpu":
        result = bench.bench_gpu(
            dry_run=dry_run,
            model=model,
            repeats=repeats,
            fractions=fractions,
            progress=lambda m: log.info("gpu %s", m),
        )
    elif what == "heldout":
        from jrs.validation import HeldoutPlanning, validate_heldout

        if (planning_ct is None) != (planning_rtstruct is None):
            raise InvalidInput(
                "heldout: give both --planning-ct and --planning-rtstruct (a real planning scan "
                "kept out of training), or neither"
            )
        held_real: list[HeldoutPlanning] = []
        if planning_ct is not None and planning_rtstruct is not None:
            held_real.append(
                HeldoutPlanning(planning_ct, planning_rtstruct, fractions, seed, synonyms)
            )
        held = validate_heldout(
            list(range(seed, seed + cases)),
            real=held_real,
            fusion_method=_fusion_method(fusion_method),
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
        result = {"benchmark": "heldout", "rows": held.rows, "timings_s": held.timings}
    elif what == "qa":
        import jrs.qa_calibration as qac

        if report is None:
            raise InvalidInput("benchmark qa needs --report DIR (records and report go there)")
        if (planning_ct is None) != (planning_rtstruct is None):
            raise InvalidInput("a real planning scan needs --planning-ct and --planning-rtstruct")
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
        result = {
            "benchmark": "qa",
            "report": str(report / "qa_calibration.json"),
            "counts": qa_report["counts"],
            "current": qa_report["current"]["any"],
            "chosen": {k: qa_report["chosen"][k] for k in ("met", "note", "any", "changes")},
            "held_out": None
            if qa_report.get("held_out") is None
            else {k: qa_report["held_out"][k]["any"] for k in ("current", "chosen")},
            "errors": qa_report["errors"],
        }
    elif what == "adaptation":
        result = _bench_adaptation(
            cases,
            seed,
            model,
            device,
            fractions,
            iterative,
            report,
            slice_mm,
            dry_run,
            (planning_ct, planning_rtstruct),
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
            f"benchmark {what!r} unknown; use phantom, prealign, recontour, heldout, engines, "
            "adaptation, service, gpu or qa"
        )
    result["machine"] = bench.machine()
    text = json.dumps(result, indent=2)
    typer.echo(text)
    if out is not None:
        out.write_text(text + "\n")


def _bench_adaptation(
    cases: int,
    seed: int,
    model: Path | None,
    device: str,
    fractions: int,
    iterative: bool,
    report: Path | None,
    slice_mm: float | None,
    dry_run: bool,
    real: tuple[Path | None, Path | None],
) -> dict[str, Any]:
    """``jrs benchmark adaptation`` (see `benchmark`)."""
    from jrs.core.errors import InvalidInput
    from jrs.model_export.export import ArtefactWriter
    from jrs.training.adapt import AdaptOptions
    from jrs.training.adapt_benchmark import benchmark_adaptation

    if (real[0] is None) != (real[1] is None):
        raise InvalidInput("a real patient needs --planning-ct and --planning-rtstruct together")
    options = AdaptOptions()
    if dry_run:  # a check of the command: tiny budget, one step, small phantoms
        options = AdaptOptions(minutes=1.0, fractions=1, val_fractions=1, min_steps=1, max_steps=1)
    held = benchmark_adaptation(
        list(range(seed, seed + (1 if dry_run else cases))),
        ArtefactWriter(),
        base=model,
        real=(real[0], real[1]) if real[0] is not None and real[1] is not None else None,
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
    return {
        "benchmark": "adaptation",
        "adaptations": held.adaptations,
        "checks": held.checks,
        "rows": held.rows,
    }


@app.command()
@_handle_errors
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
) -> None:
    """Train a network (checkpoints, CSV/TensorBoard logs and plots in the run folder).

    Several processes (GPUs) train together when launched by torchrun, e.g.
    torchrun --nproc_per_node 4 -m jrs.cli train --config FILE --device cuda.
    """
    from jrs.core.errors import InvalidInput
    from jrs.training.config import load_config
    from jrs.training.trainer import Trainer

    if init_from is not None and (resume or resume_from is not None):
        raise InvalidInput(
            f"--init-from {init_from} starts a new run; --resume / --resume-from continue one: "
            "give one of them"
        )
    cfg = load_config(
        config,
        iterations=iterations,
        output_dir=out,
        device=device,
        workers=workers,
        amp=amp,
        precision=precision,
    )
    start: bool | Path = resume_from if resume_from is not None else resume
    result = Trainer(cfg, resume=start, init_from=init_from).run()
    if result.rank == 0:
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
    from jrs.training.trainer import resolve_device, source_pairs

    check_window(window)
    if sum(x is not None for x in (data, phantoms, synthetic, store)) != 1:
        raise InvalidInput(
            "give exactly one of --data DIR, --phantoms N, --synthetic N or --store DIR"
        )
    fusion_method = None if fusion == "none" else _fusion_method(fusion)
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


def _patient_adapter(base: Path | None, minutes: float, device: str, synonyms: Any) -> Any:
    """``jrs batch --adapt``: the batch adapter (`jrs.training.adapt.adapt`)."""
    from jrs.core.errors import JrsError

    try:
        from jrs.model_export.export import ArtefactWriter
        from jrs.training.adapt import AdaptOptions
        from jrs.training.adapt import adapt as run_adaptation
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


@app.command()
@_handle_errors
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
    from jrs.training.adapt import AdaptationInterrupted, AdaptOptions
    from jrs.training.adapt import adapt as run_adaptation

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


@app.command()
@_handle_errors
def serve(
    host: Annotated[str, typer.Option("--host", help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port.")] = 8000,
) -> None:
    """Run the REST service with uvicorn; settings from JRS_* variables and .env."""
    import uvicorn

    from jrs.service.app import create_app
    from jrs.service.settings import load_settings

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
