"""The ``MODEL_CARD.md`` skeleton written next to an exported model.

Everything the export knows (network, inputs/outputs, conventions, training provenance, parity,
metrics) is filled in from ``metadata.json``; what only the trainer of the model knows (training
hardware, wall time, data description, intended-use statement) is left as clearly marked
``TODO`` placeholders to complete by hand.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from jrs.inference.cascade import network_passes
from jrs.inference.smoothing import field_smoothing_sigma
from jrs.model_export.settings import VALIDATED_PATH_MARGIN
from jrs.qa.figures import QA_REFERENCE_MIN_DSC, qa_reference_paths
from jrs.registration.focus import FOCUS_MARGIN_MM

__all__ = ["TODO", "model_card"]

#: Marker of the placeholders the model's trainer completes.
TODO = "TODO(trainer)"


def _fmt(value: Any) -> str:
    if value is None:
        return "unknown"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _metrics_section(metrics: Any) -> list[str]:
    if not metrics:
        return [
            f"{TODO}: no held-out metrics were given to the export (`jrs export --metrics FILE`). "
            "Report DSC and MSD per organ for the segmentation path, the registration path, "
            "their fusion and the chosen contours on held-out phantom fractions (seeds never "
            "used in training).",
        ]
    if isinstance(metrics, Mapping) and all(not isinstance(v, Mapping) for v in metrics.values()):
        lines = ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()]
        return lines
    return ["```json", json.dumps(metrics, indent=2), "```"]


def _weights_section(weights: Any) -> list[str]:
    if not isinstance(weights, Mapping):
        return []
    return [
        "## Torch weights",
        "",
        f"`{weights.get('file')}` ({weights.get('format')}, {_fmt(weights.get('bytes'))} bytes, "
        f"sha256 `{weights.get('sha256')}`): the float32 weights that patient-specific "
        "adaptation (`jrs adapt --base`) fine-tunes; the inference never reads them.",
        "",
    ]


def _adaptation_section(adaptation: Any) -> list[str]:
    """The patient-specific adaptation of a model made by ``jrs adapt`` (no patient data)."""
    if not isinstance(adaptation, Mapping):
        return []
    base = adaptation.get("base") or {}
    val = adaptation.get("validation") or {}
    series = adaptation.get("planning_series_sha256")
    decision = "adapted weights kept" if adaptation.get("kept") else "base weights kept"
    lines = [
        "## Patient-specific adaptation",
        "",
        f"- Base model: {base.get('name')} version {base.get('version')} "
        f"(`model.onnx` sha256 `{base.get('sha256')}`)",
        f"- Planning series: sha256 of its SeriesInstanceUID `{series}`",
        f"- Decision: **{decision}** ({adaptation.get('reason')})",
        f"- Steps: {_fmt(adaptation.get('steps'))}; time {_fmt(adaptation.get('seconds'))} s "
        f"({adaptation.get('device')}, {adaptation.get('precision')})",
        f"- Synthetic fractions: {_fmt(adaptation.get('train_fractions'))} for fine-tuning, "
        f"{_fmt(adaptation.get('validation_fractions'))} held back",
        "",
    ]
    organs = sorted(
        set((val.get("base") or {}).get("dsc", {})) | set((val.get("adapted") or {}).get("dsc", {}))
    )
    if organs:
        lines += ["| organ | base DSC | adapted DSC | base MSD (mm) | adapted MSD (mm) |"]
        lines += ["|---|---|---|---|---|"]
        for organ in organs:
            cells = [
                _fmt(((val.get(k) or {}).get(m) or {}).get(organ))
                for m in ("dsc", "msd")
                for k in ("base", "adapted")
            ]
            lines.append(f"| {organ} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} |")
        lines.append("")
    return lines


def _provenance_lines(entries: Any) -> list[str]:
    """One line per recipe phase or outside segment of the training run (may be empty)."""
    out: list[str] = []
    for entry in entries or []:
        if not isinstance(entry, Mapping):
            continue
        kind = entry.get("kind")
        if kind == "phase":
            changes = "; ".join(
                f"`{k}` {_fmt(v[0])} -> {_fmt(v[1])}"
                for k, v in (entry.get("changes") or {}).items()
                if isinstance(v, (list, tuple)) and len(v) == 2
            )
            out.append(f"- From step {_fmt(entry.get('step'))}: {changes} (recipe phase)")
        elif kind == "gpu-segment":
            out.append(
                f"- Steps {_fmt(entry.get('start_step'))} -> {_fmt(entry.get('end_step'))} on "
                f"{_fmt(entry.get('device'))} (GPU segment)"
            )
        elif kind == "cpu-continuation":
            out.append(f"- Step {_fmt(entry.get('step'))}: continued on the CPU (not bit for bit)")
    return out


def _path_section(meta: Mapping[str, Any]) -> list[str]:
    """The per-organ output path the pipeline uses, and the fusion of the two paths."""
    choice = meta.get("path_choice") or {}
    fusion = meta.get("fusion")
    lines = [
        "## Output path per organ",
        "",
        "The network gives two contours of each organ: the segmentation path (soft-max of the "
        "logits) and the registration path (the planning contours warped by the DVF). "
        "`jrs recontour` uses, per organ, the path of `path_choice` in `metadata.json` "
        "(`--path-choice ORGAN=PATH` overrides it): `segmentation`, `registration`, or "
        "`fusion`, the two paths fused (`jrs.inference.fusion`): `weighted` averages the "
        "segmentation probability and the linearly warped planning label with per-organ weights "
        "(w_seg, w_reg) and keeps p >= 0.5 (at most one organ a voxel); `staple` is "
        "SimpleITK's binary STAPLE of the two paths' masks. Organs not listed use "
        "`segmentation`.",
        "",
        "Null-field correction: "
        + (
            "on. The pipeline runs the network a second time with the planning scan as both "
            "images and subtracts that field (`jrs.inference.null_correction`), so that the same "
            "scan given twice moves nothing (`--no-null-correction` turns it off)."
            if meta.get("null_correction", True) is not False
            else "off (`metadata.json`: `null_correction: false`)."
        ),
        "",
        "Field smoothing: "
        + (
            f"a Gaussian of sigma {field_smoothing_sigma(meta):g} mm filters the final "
            "field (`jrs.inference.smoothing`; `metadata.json` `dvf_smoothing_mm`, "
            "`--dvf-smoothing-mm` overrides it): it removes the field's voxel-scale roughness "
            "(folding, det J outliers inside small organs) and keeps the same scan twice at a "
            "zero field."
            if field_smoothing_sigma(meta) > 0
            else "none (`metadata.json` has no `dvf_smoothing_mm`; `--dvf-smoothing-mm` sets one)."
        ),
        "",
        "Network passes: "
        + (
            f"{network_passes(meta)}. Each pass after the first warps the planning scan and "
            "its contours by the field so far and registers what is left over "
            "(`jrs.inference.cascade`; "
            "`metadata.json` `network_passes`, `--network-passes` overrides it); each pass is "
            "null-corrected, so the same scan twice still moves nothing."
            if network_passes(meta) > 1
            else "1 (`--network-passes 2` adds a pass that registers what the first left over)."
        ),
        "",
        "Pre-alignment (a pipeline setting, the same for every model): by default a whole-body "
        "rigid match, then a rigid match on the planning prostate and seminal vesicles dilated "
        f"by {FOCUS_MARGIN_MM:g} mm (`jrs.registration.focus`). This deviates from the paper's "
        "whole-body affine pre-alignment, which a filling bladder pulls away from the "
        "prostate; `--prealign affine` restores it (docs/benchmarks.md, "
        '"Prostate-centred pre-alignment").',
        "",
    ]
    validated = meta.get("validated_paths") or {}
    if choice:
        lines += [
            "| organ | path | fusion weights (seg, reg) | validated paths (output) "
            "| QA reference paths (path disagreement) |",
            "|---|---|---|---|---|",
        ]
    weights = (fusion.get("weights") or {}) if isinstance(fusion, Mapping) else {}
    for organ, path in choice.items():
        w = weights.get(organ)
        cell = f"{_fmt(float(w[0]))}, {_fmt(float(w[1]))}" if w else "0.5, 0.5 (default)"
        vouched = validated.get(organ) if isinstance(validated, Mapping) else None
        vcell = ", ".join(vouched) if vouched else f"{path} only"
        qcell = ", ".join(sorted(qa_reference_paths(meta, organ)))
        lines.append(f"| {organ} | {path} | {cell} | {vcell} | {qcell} |")
    if choice:
        lines += [
            "",
            "A path is validated for output within "
            f"{VALIDATED_PATH_MARGIN:g} DSC of the better path on validation. A path is a QA "
            f"reference when its validation DSC is at least {QA_REFERENCE_MIN_DSC:g}: not shipped, "
            "but its disagreement with the other path raises `path_disagreement` (docs/qa.md). "
            "A path below that is never compared.",
            "",
        ]
    if isinstance(fusion, Mapping):
        lines += [
            f"Fusion method: `{fusion.get('method', 'weighted')}`; weights: "
            f"{fusion.get('rule', 'as given')}.",
            "",
        ]
    else:
        lines += [
            "No fusion entry: `fusion` uses the `weighted` method with weights 0.5, 0.5.",
            "",
        ]
    return lines


def model_card(meta: Mapping[str, Any]) -> str:
    """Render the model card of an exported model.

    Args:
        meta: The content of ``metadata.json``.

    Returns:
        Markdown text.
    """
    net = meta.get("network", {})
    training = meta.get("training", {}) or {}
    config = training.get("config") or {}
    parity = meta.get("parity", {})
    labels = meta.get("labels", {})
    inputs = meta.get("inputs", [])
    outputs = meta.get("outputs", [])
    onnx = meta.get("onnx", {})
    lines = [
        f"# Model card: {meta.get('name')} version {meta.get('version')}",
        "",
        "## Summary",
        "",
        f"**{TODO}: replace this paragraph.** This is a demo model trained on synthetic pelvic "
        "phantoms generated by `jrs phantom`; it has not been trained or validated on patient "
        "data and must not be used for clinical decisions. State here the data it was trained "
        "on (generator seeds, number of phantoms and fractions), the hardware (GPU/CPU model), "
        "the number of steps and the wall time (including resumed working periods).",
        "",
        "Joint registration and segmentation network (Cross-stitch network of METHOD.md) for "
        "daily re-contouring of the prostate, seminal vesicles, bladder and rectum in online "
        "adaptive radiotherapy. Inputs are the daily CT (fixed), the affinely pre-aligned "
        "planning CT (moving) and its labels; outputs are segmentation logits of the daily CT "
        "and a displacement field mapping the daily CT onto the planning CT.",
        "",
        "## Network",
        "",
        f"- Architecture: `{net.get('name')}` ({net.get('class')}), "
        f"channels {net.get('channels')}, {net.get('parameters')} parameters",
        f"- Overrides: `{json.dumps(net.get('overrides', {}))}`",
        f"- ONNX: opset {onnx.get('opset')}, exporter `{onnx.get('exporter')}` "
        f"(torch {onnx.get('torch_version')}), network only (no warping inside the graph)",
        f"- `model.onnx` sha256: `{meta.get('sha256')}`",
        "",
        "## Inputs",
        "",
        "| name | shape | meaning | pad value |",
        "|---|---|---|---|",
    ]
    lines += [f"| {i['name']} | {i['shape']} | {i['meaning']} | {i['pad_value']} |" for i in inputs]
    valid = meta.get("valid_sizes", {})
    transform = meta.get("intensity_transform", {})
    lines += [
        "",
        f"Valid sizes: {valid.get('rule')}; the high-level output is "
        f"{valid.get('high_output_size')} voxels per axis, offset "
        f"{valid.get('high_output_offset')} voxels from the input start."
        f" Spacing {meta.get('spacing_mm')} mm; {meta.get('axes')}. Intensity transform: "
        f"`{transform.get('formula')}`. Training patch size: {valid.get('patch_size')}.",
        "",
        "## Outputs",
        "",
        "| name | shape | meaning | channels |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {o['name']} | {o['shape']} | {o['meaning']} | {', '.join(o['channels'])} |"
        for o in outputs
    ]
    lines += [
        "",
        "Labels: " + ", ".join(f"{k} {v}" for k, v in labels.items()) + ".",
        "",
        "## Training",
        "",
        f"- Git commit of the training code: `{training.get('git_sha')}`",
        f"- Steps: {training.get('step')} (epoch {training.get('epoch')})",
        f"- Loss weighting: {_fmt((config.get('weighting') or {}).get('name'))}; "
        f"learning rate {_fmt(config.get('lr'))}; patch size {_fmt(config.get('patch_size'))}; "
        f"seed {_fmt(config.get('seed'))}",
        *_provenance_lines(training.get("provenance")),
        f"- Hardware: {TODO}",
        f"- Wall time: {TODO}",
        f"- Training data: {TODO}",
        "",
        "The full resolved training configuration is in `metadata.json` (`jrs.training.config`).",
        "",
        "## Held-out evaluation",
        "",
        *_metrics_section(meta.get("metrics")),
        "",
        *_path_section(meta),
        "## Export check",
        "",
        f"ONNX Runtime (CPU) vs PyTorch on random inputs of sizes {parity.get('sizes')}: "
        f"max |diff| {_fmt(parity.get('worst'))} (tolerance {_fmt(parity.get('tolerance'))}).",
        "",
        *_weights_section(meta.get("weights")),
        *_adaptation_section(meta.get("adaptation")),
        "## Intended use and limitations",
        "",
        "- Research and demonstration of the re-contouring pipeline; not a medical device.",
        "- Expects prostate-cancer pelvic CT, head-first or feet-first, resampled to the 1 mm "
        "canonical grid by `jrs.inference.preprocess`; other anatomy or modalities are out of "
        "scope.",
        "- Every contour must be reviewed by a qualified person before clinical use; the QA "
        "flags of `qa.json` point at the structures to check first.",
        f"- {TODO}: known failure modes observed on held-out data.",
        "",
        f"Exported {meta.get('exported_at')} from commit `{meta.get('export_git_sha')}`.",
        "",
    ]
    return "\n".join(lines)
