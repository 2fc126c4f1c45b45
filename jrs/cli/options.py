"""Options that several commands share, and the re-contouring options they build."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer


def recontour_options(
    model: Path | None,
    device: str,
    method: str,
    synonyms: Path | None,
    dvf_spacing: float | None,
    engine: str = "auto",
    precision: str = "auto",
    path_choice: list[str] | None = None,
) -> Any:
    """The `jrs.pipeline.options.RecontourOptions` of the shared command-line options, checked.

    Raises:
        InvalidInput: an unknown method, device, engine or precision, or a negative spacing.
    """
    from jrs.core.errors import InvalidInput
    from jrs.core.labels import SynonymTable
    from jrs.inference import check_engine_options
    from jrs.pipeline.options import DEFAULT_DVF_SPACING_MM, RecontourOptions, parse_path_choice

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


def parse_fusion_method(value: str | None) -> str | None:
    """``--fusion-method``: None or one of `jrs.inference.fusion.FUSION_METHODS`."""
    from jrs.core.errors import InvalidInput
    from jrs.inference.fusion import FUSION_METHODS

    if value is not None and value not in FUSION_METHODS:
        raise InvalidInput(f"--fusion-method {value!r} unknown; use {', '.join(FUSION_METHODS)}")
    return value


ServerOpt = Annotated[
    str | None, typer.Option("--server", help="URL of a jrs service to re-contour through.")
]
ApiKeyOpt = Annotated[
    str | None,
    typer.Option("--api-key", envvar="JRS_API_KEY", help="--server: the service's Bearer key."),
]
