"""Training checkpoint -> ``<out>/<name>/<version>/{model.onnx, metadata.json, MODEL_CARD.md}``.

Beside them goes ``weights.pt``: the torch weights (float32, no optimiser state;
:mod:`jrs.training.weights`), named in ``metadata.json`` (``weights``), which patient-specific
adaptation (``jrs adapt --base MODEL_DIR``) fine-tunes.

The exported graph holds the network only: inputs ``fixed``, ``moving``, ``moving_labels`` (those
the network reads) of shape ``(B, 1, D, H, W)`` and its high-level outputs ``seg_high``
``(B, 5, D-40, H-40, W-40)`` (logits) and ``dvf_high`` ``(B, 3, D-40, H-40, W-40)`` (voxels of the
1 mm grid). No warping sits inside: 5-D ``GridSample`` is missing from older ONNX Runtime CUDA
builds, TensorRT and OpenVINO, so :mod:`jrs.inference` stitches the tiles and the pipeline warps
once on the whole scan. Batch and every spatial axis are dynamic; any valid size (a multiple of 4,
``>= 44``, per axis) runs.

Exporter choice (torch 2.13): the modern ``torch.onnx.export(..., dynamo=True)`` (torch.export +
onnxscript, the supported path; the TorchScript exporter is deprecated since torch 2.9) is the
default. With ``torch.export.Dim.AUTO`` dynamic shapes it writes a clean opset-20 graph (Conv,
LeakyRelu, BatchNormalization, Mul, Add, Slice, Concat, Resize; no Identity/Constant clutter)
whose output shapes carry the size rule symbolically (``4*(s//4) - 40``). Its price is the
export time: 30-70 s on two shared CPU cores, almost all in sympy's symbolic-shape reasoning,
whatever the channel count. (``Dim.DYNAMIC`` makes the strict trace fail on the size guards and
the exporter then retries with slower fallbacks.) The legacy exporter (``dynamo=False``) also
yields a correct dynamic opset-20 graph, in 3-10 s; ``exporter="auto"`` falls back to it when
onnxscript is missing or the dynamo path fails, and the tests use it for speed. The exporter used
is recorded in ``metadata.json`` (``onnx.exporter``); both give max |diff| ~1e-6 against PyTorch.

Every export is checked against PyTorch on random inputs of two valid sizes (ONNX Runtime, CPU);
a max |diff| above the tolerance (1e-4) aborts the export and nothing is written.

Path choice and fusion (the pipeline's ``choose`` stage, :mod:`jrs.inference.fusion`):
``metadata.json`` gets ``path_choice`` (organ -> ``segmentation``, ``registration`` or ``fusion``)
and, when the metrics allow it, ``fusion`` (``{"method", "weights": {organ: [w_seg, w_reg]},
"rule"}``), from the held-out metrics given to the export (:func:`path_dsc`, :func:`path_choice`,
:func:`fusion_settings`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from jrs.core.errors import InvalidInput
from jrs.core.labels import LABELS
from jrs.inference import (
    INPUT_MEANINGS,
    INPUT_PAD_VALUES,
    METADATA_FILE,
    METADATA_FORMAT,
    METADATA_VERSION,
    MODEL_FILE,
)
from jrs.inference.preprocess import HU_MAX, HU_MIN, HU_SCALE, NETWORK_SPACING_MM
from jrs.inference.tiling import MARGIN, MIN_WINDOW
from jrs.model_export.card import model_card
from jrs.model_export.onnx_graph import (
    OPSET,
    PARITY_SIZES,
    PARITY_TOLERANCE,
    ExportError,
    NetworkGraph,
    ParityReport,
    activation_bytes_per_voxel,
    export_graph,
    network_io,
    parity_check,
)
from jrs.model_export.settings import (
    fusion_settings,
    inference_settings,
    path_choice,
    qa_reference_path_table,
    validated_path_table,
)
from jrs.training.networks import NETWORK_NAMES
from jrs.training.runtime import git_sha
from jrs.training.weights import (
    WEIGHTS_FILE,
    rebuild_from_checkpoint,
    save_weights,
    weights_payload,
)

log = logging.getLogger(__name__)

#: Output levels exported by default (the whole-scan inference only needs the high level).
DEFAULT_LEVELS: tuple[str, ...] = ("high",)
#: Name of the model card written next to the model.
CARD_FILE = "MODEL_CARD.md"

_LEVEL_OFFSETS = {"high": (20, 1, "n - 40"), "mid": (19, 2, "n/2 - 18"), "low": (17, 4, "n/4 - 7")}

__all__ = [
    "ArtefactWriter",
    "ExportResult",
    "checkpoint_weighting",
    "export",
    "export_checkpoint",
    "load_checkpoint",
]


@dataclass
class ExportResult:
    """What :func:`export` wrote.

    Attributes:
        path: The version folder ``<out>/<name>/<version>``.
        metadata: The content of ``metadata.json``.
        parity: The parity check.
    """

    path: Path
    metadata: dict[str, Any]
    parity: ParityReport


# --------------------------------------------------------------------------- checkpoints
def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a network from a :class:`jrs.training.trainer.Trainer` checkpoint.

    Args:
        path: ``last.pt`` / ``best.pt`` of a run (a trusted file: it is unpickled).

    Returns:
        ``(network in eval mode on the CPU, checkpoint entries without the state dicts)``.

    Raises:
        InvalidInput: When the file is missing, unreadable or not a training checkpoint.
    """
    net, ckpt = rebuild_from_checkpoint(path)
    drop = {"model", "optimizer", "weighting", "scaler", "sampler", "rng"}
    return net.eval(), {k: v for k, v in ckpt.items() if k not in drop}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _jsonable(value: Any) -> Any:
    """Best-effort conversion to JSON-able data (paths, tuples, numpy scalars)."""
    return json.loads(json.dumps(value, default=str))


def _output_entry(name: str) -> dict[str, Any]:
    kind, level = name.rsplit("_", 1)
    offset, stride, size = _LEVEL_OFFSETS[level]
    entry: dict[str, Any] = {
        "name": name,
        "kind": kind,
        "level": level,
        "dtype": "float32",
        "spatial_size": size,
        "offset_voxels": offset,
        "stride_voxels": stride,
    }
    if kind == "seg":
        entry["shape"] = ["batch", 1 + len(LABELS), f"D_{level}", f"H_{level}", f"W_{level}"]
        entry["meaning"] = "segmentation logits; softmax over the channel axis"
        entry["channels"] = ["background", *[LABELS[i] for i in sorted(LABELS)]]
    else:
        entry["shape"] = ["batch", 3, f"D_{level}", f"H_{level}", f"W_{level}"]
        entry["meaning"] = (
            f"pull displacement u: fixed voxel p corresponds to moving position p + u(p), in "
            f"voxels of the level grid ({stride} mm per voxel on the 1 mm network grid)"
        )
        entry["channels"] = ["x (W axis)", "y (H axis)", "z (D axis)"]
        entry["units"] = f"voxels of the {stride} mm level grid"
    return entry


def _torch_net_info(net: nn.Module) -> dict[str, Any]:
    return {
        "class": type(net).__name__,
        "channels": list(getattr(net, "channels", ())),
        "parameters": int(sum(p.numel() for p in net.parameters())),
    }


def build_metadata(
    *,
    name: str,
    version: int,
    network: Mapping[str, Any],
    inputs: Sequence[str],
    outputs: Sequence[str],
    exporter: str,
    sha256: str,
    parity: ParityReport,
    checkpoint: Mapping[str, Any],
    metrics: Mapping[str, Any] | None,
    bytes_per_voxel: float,
) -> dict[str, Any]:
    """The content of ``metadata.json`` (the only file :mod:`jrs.inference` reads besides ONNX)."""
    import onnx

    config = checkpoint.get("config")
    return {
        "format": METADATA_FORMAT,
        "format_version": METADATA_VERSION,
        "name": name,
        "version": int(version),
        "model_file": MODEL_FILE,
        "sha256": sha256,
        "onnx": {
            "opset": OPSET,
            "exporter": exporter,
            "torch_version": torch.__version__,
            "onnx_version": onnx.__version__,
            "warping_inside": False,
        },
        "git_sha": checkpoint.get("git_sha", "unknown"),
        "path_choice": path_choice(metrics),
        **({"validated_paths": vp} if (vp := validated_path_table(metrics)) else {}),
        **({"qa_reference_paths": qp} if (qp := qa_reference_path_table(metrics)) else {}),
        **({"fusion": fusion} if (fusion := fusion_settings(metrics)) is not None else {}),
        # how the pipeline runs the network (`inference_settings`): the null-field correction
        # (`jrs.inference.null_correction`: the same scan twice moves nothing), a light Gaussian
        # filter of the final field (`jrs.inference.smoothing`: the corrected field's voxel-scale
        # roughness folds otherwise) and a second pass on what the first field left over
        # (`jrs.inference.cascade`)
        **inference_settings(metrics),
        "network": _jsonable(dict(network)),
        "inputs": [
            {
                "name": n,
                "shape": ["batch", 1, "D", "H", "W"],
                "dtype": "float32",
                "meaning": INPUT_MEANINGS[n],
                "pad_value": INPUT_PAD_VALUES[n],
            }
            for n in inputs
        ],
        "outputs": [_output_entry(n) for n in outputs],
        "valid_sizes": {
            "rule": f"each spatial axis n a multiple of 4 and >= {MIN_WINDOW}",
            "multiple_of": 4,
            "minimum": MIN_WINDOW,
            "high_output_size": "n - 40",
            "high_output_offset": MARGIN,
            "patch_size": checkpoint.get("patch_size"),
        },
        "spacing_mm": [NETWORK_SPACING_MM] * 3,
        "axes": "arrays indexed (z, y, x) = (D, H, W) on an identity-direction LPS grid",
        "intensity_transform": {
            "formula": f"clip(HU, {HU_MIN:g}, {HU_MAX:g}) / {HU_SCALE:g}",
            "clip_hu": [HU_MIN, HU_MAX],
            "scale": HU_SCALE,
            "applies_to": [n for n in inputs if n != "moving_labels"],
        },
        "labels": {"0": "background", **{str(k): v for k, v in sorted(LABELS.items())}},
        "dvf": {
            "convention": "pull: fixed (daily) voxel p corresponds to moving (planning) p + u(p)",
            "components": ["x", "y", "z"],
            "array_axes": ["W", "H", "D"],
            "units": "voxels of the 1 mm grid (= mm) for the high level",
        },
        "training": {
            "config": _jsonable(config) if config is not None else None,
            "git_sha": checkpoint.get("git_sha", "unknown"),
            "step": checkpoint.get("step"),
            "epoch": checkpoint.get("epoch"),
            "best": _jsonable(checkpoint.get("best")),
            "torch_version": checkpoint.get("torch_version"),
            # recipe phases and segments run elsewhere (training.phase, research.gpu.gpu_run)
            "provenance": _jsonable(list(checkpoint.get("provenance") or [])),
        },
        "metrics": _jsonable(dict(metrics)) if metrics is not None else None,
        "parity": parity.as_dict(),
        "memory": {
            "activation_bytes_per_input_voxel": bytes_per_voxel,
            "note": "sum of all float32 intermediate activations per input voxel (no reuse)",
        },
        "exported_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "export_git_sha": _git_sha(),
    }


def _git_sha() -> str:

    return git_sha()


def _write_stage(
    net: nn.Module,
    graph: NetworkGraph,
    stage: Path,
    name: str,
    version: int,
    network: Mapping[str, Any] | None,
    checkpoint: Mapping[str, Any] | None,
    metrics: Mapping[str, Any] | None,
    exporter: str,
    parity_sizes: Sequence[Sequence[int]],
    tolerance: float,
) -> tuple[dict[str, Any], ParityReport]:
    """Export, check parity and write every file into ``stage``."""
    onnx_path = stage / MODEL_FILE
    used = export_graph(graph, onnx_path, exporter)
    parity = parity_check(net, onnx_path, parity_sizes, tolerance)
    log.info("ONNX parity (%s exporter): max |diff| = %.3g", used, parity.worst)
    if not parity.passed:
        raise ExportError(
            f"ONNX parity check failed: max |ONNX - PyTorch| = {parity.worst:.3g} > "
            f"{tolerance:g} ({parity.max_abs_diff}); nothing written"
        )
    spec = dict(network or {"name": type(net).__name__, "overrides": {}})
    spec.update(_torch_net_info(net))
    meta = build_metadata(
        name=name,
        version=version,
        network=spec,
        inputs=graph.input_names,
        outputs=graph.output_names,
        exporter=used,
        sha256=_sha256(onnx_path),
        parity=parity,
        checkpoint=dict(checkpoint or {}),
        metrics=metrics,
        bytes_per_voxel=activation_bytes_per_voxel(net),
    )
    (stage / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    (stage / CARD_FILE).write_text(model_card(meta))
    return meta, parity


def checkpoint_weighting(path: str | Path) -> dict[str, Any]:
    """``{"name", "state"}`` of the loss weighting of a training checkpoint (for ``weights.pt``).

    Args:
        path: A :class:`jrs.training.trainer.Trainer` checkpoint (a trusted file: it is unpickled).

    Returns:
        The weighting's name (from the resolved config) and state dict (empty when absent).
    """
    ckpt = torch.load(Path(path), map_location="cpu", weights_only=False)
    config = ckpt.get("config") or {}
    return {
        "name": (config.get("weighting") or {}).get("name", "equal"),
        "state": dict(ckpt.get("weighting") or {}),
    }


def _write_weights(
    net: nn.Module,
    stage: Path,
    meta: dict[str, Any],
    network: Mapping[str, Any] | None,
    checkpoint: Mapping[str, Any] | None,
    weighting: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """Write ``weights.pt`` into ``stage`` and name it in ``metadata.json`` and the card."""
    if not network or str(network.get("name")) not in NETWORK_NAMES:
        log.info("no buildable network spec (%r): %s not written", network, WEIGHTS_FILE)
        return meta
    ckpt = dict(checkpoint or {})
    payload = weights_payload(
        net,
        network,
        weighting=weighting,
        tasks=list(ckpt.get("tasks") or []),
        patch_size=ckpt.get("patch_size"),
        config=ckpt.get("config"),
        git_sha=ckpt.get("git_sha"),
        step=ckpt.get("step"),
    )
    meta = dict(meta)
    meta["weights"] = save_weights(stage / WEIGHTS_FILE, payload)
    (stage / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    (stage / CARD_FILE).write_text(model_card(meta))
    return meta


def export(
    net: nn.Module,
    out_dir: str | Path,
    *,
    name: str = "crossstitch",
    version: int = 1,
    network: Mapping[str, Any] | None = None,
    checkpoint: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    levels: Sequence[str] = DEFAULT_LEVELS,
    exporter: str = "auto",
    parity_sizes: Sequence[Sequence[int]] = PARITY_SIZES,
    tolerance: float = PARITY_TOLERANCE,
    overwrite: bool = False,
    weights: bool = True,
    weighting: Mapping[str, Any] | None = None,
) -> ExportResult:
    """Export a network module (see :func:`export_checkpoint` for checkpoints).

    Args:
        net: The network (switched to eval mode; moved to the CPU).
        out_dir: Model repository root; the model goes to ``out_dir/name/version``.
        name: Model name.
        version: Numeric version (``>= 1``).
        network: ``{"name", "overrides"}`` of the network (recorded in the metadata).
        checkpoint: Checkpoint entries (config, git_sha, step, patch_size, ...) to record.
        metrics: Held-out metrics to record (any JSON-able mapping).
        levels: Output levels to export (``"high"`` is what the inference uses).
        exporter: ``"auto"`` (dynamo, else legacy), ``"dynamo"`` or ``"legacy"``.
        parity_sizes: Input sizes ``(D, H, W)`` of the parity check.
        tolerance: Accepted max |ONNX - PyTorch|.
        overwrite: Replace an existing version folder.
        weights: Also write the torch weights as ``weights.pt`` (float32, about 3 MB for the
            cross-stitch network; :mod:`jrs.training.weights`) and name them in ``metadata.json``
            (``weights``): what patient-specific adaptation (``jrs adapt``) fine-tunes. Needs a
            buildable ``network`` spec; skipped (with a log line) without one.
        weighting: ``{"name", "state"}`` of the loss weighting, kept in ``weights.pt``.

    Returns:
        The export result (folder, metadata, parity).

    Raises:
        InvalidInput: For a bad name/version, or an existing version without ``overwrite``.
        ExportError: When the export fails or parity exceeds ``tolerance`` (nothing is written).
    """
    if not name or "/" in name or name.startswith("."):
        raise InvalidInput(f"model name must be a plain folder name, got {name!r}")
    if int(version) < 1:
        raise InvalidInput(f"model version must be an integer >= 1, got {version}")
    if "high" not in levels:
        raise InvalidInput(f"levels must include 'high' (whole-scan inference), got {levels}")
    path_choice(metrics)  # validate before the (slow) export
    fusion_settings(metrics)
    target = Path(out_dir) / name / str(int(version))
    if target.exists() and not overwrite:
        raise InvalidInput(f"{target} already exists; choose another version or overwrite")
    net = net.cpu().eval()
    inputs, outputs = network_io(net, levels)
    graph = NetworkGraph(net, inputs, outputs).eval()
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{int(version)}-export-"))
    try:
        meta, parity = _write_stage(
            net,
            graph,
            stage,
            name,
            int(version),
            network,
            checkpoint,
            metrics,
            exporter,
            parity_sizes,
            tolerance,
        )
        if weights:
            meta = _write_weights(net, stage, meta, network, checkpoint, weighting)
        if target.exists():
            shutil.rmtree(target)
        stage.rename(target)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    log.info("exported %s", target)
    return ExportResult(path=target, metadata=meta, parity=parity)


def export_checkpoint(
    checkpoint: str | Path | nn.Module,
    out_dir: str | Path,
    name: str = "crossstitch",
    version: int = 1,
    metrics: Mapping[str, Any] | str | Path | None = None,
    **kwargs: Any,
) -> Path:
    """Export a training checkpoint (or a module) to ``out_dir/name/version``.

    Writes ``model.onnx`` (network only, opset 20, dynamic batch and spatial axes),
    ``metadata.json`` and a ``MODEL_CARD.md`` skeleton, after checking ONNX Runtime against
    PyTorch on random inputs of two sizes (max |diff| <= 1e-4, else :class:`ExportError`).

    Args:
        checkpoint: Path of a training checkpoint, or an ``nn.Module`` (tests).
        out_dir: Model repository root (e.g. ``models``).
        name: Model name.
        version: Numeric version.
        metrics: Held-out metrics: a mapping or a JSON file.
        **kwargs: Passed to :func:`export` (``exporter``, ``levels``, ``overwrite``, ...).

    Returns:
        The version folder.
    """
    if isinstance(metrics, str | Path):
        mpath = Path(metrics)
        try:
            metrics = json.loads(mpath.read_text())
        except (OSError, ValueError) as exc:
            raise InvalidInput(f"{mpath}: cannot read the metrics JSON ({exc})") from exc
        if not isinstance(metrics, dict):
            raise InvalidInput(f"{mpath}: metrics must be a JSON object")
    if isinstance(checkpoint, nn.Module):
        net, meta = checkpoint, dict[str, Any]()
        network = kwargs.pop("network", None)
    else:
        net, meta = load_checkpoint(checkpoint)
        network = meta.get("network")
        if kwargs.get("weights", True) and "weighting" not in kwargs:
            kwargs["weighting"] = checkpoint_weighting(checkpoint)
    result = export(
        net,
        out_dir,
        name=name,
        version=version,
        network=network,
        checkpoint=meta,
        metrics=metrics,
        **kwargs,
    )
    return result.path


class ArtefactWriter:
    """The export as patient-specific adaptation needs it (``jrs.training.adapt.ArtefactWriter``).

    ``training`` sits below ``model_export`` and cannot import it; ``jrs adapt`` hands an
    instance to :func:`jrs.training.adapt.adapt`.

    Args:
        exporter: ONNX exporter (``legacy``: seconds on a CPU; ``dynamo``: about a minute).
        parity_sizes: Input sizes of the parity check.
        tolerance: Accepted max |ONNX - PyTorch|.
    """

    def __init__(
        self,
        exporter: str = "legacy",
        parity_sizes: Sequence[Sequence[int]] = PARITY_SIZES,
        tolerance: float = PARITY_TOLERANCE,
    ) -> None:
        self.exporter = exporter
        self.parity_sizes = parity_sizes
        self.tolerance = tolerance

    def write(
        self,
        net: nn.Module,
        dest: Path,
        *,
        name: str,
        version: int,
        network: Mapping[str, Any],
        checkpoint: Mapping[str, Any],
        metrics: Mapping[str, Any] | None,
        weighting: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        """Export ``net`` into the version folder ``dest`` (created; absent before).

        Returns:
            The written ``metadata.json`` content (with ``weights``).
        """
        dest = Path(dest)
        if dest.exists():
            raise InvalidInput(f"{dest} already exists")
        dest.parent.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.export-"))
        try:
            result = export(
                net,
                root,
                name=name,
                version=version,
                network=network,
                checkpoint=checkpoint,
                metrics=metrics,
                exporter=self.exporter,
                parity_sizes=self.parity_sizes,
                tolerance=self.tolerance,
                weights=True,
                weighting=weighting,
            )
            result.path.rename(dest)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        return result.metadata

    def card(self, metadata: Mapping[str, Any]) -> str:
        """The model card of a metadata (:func:`jrs.model_export.card.model_card`)."""
        return model_card(metadata)
