"""The model a patient's adaptation starts from: its ONNX artefact, its weights and their parity."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from jrs.core.errors import InvalidInput
from jrs.inference import read_metadata
from jrs.training.networks import build
from jrs.training.weights import (
    WEIGHTS_FILE,
    file_sha256,
    load_weights,
    weights_from_checkpoint,
)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ base model
@dataclass
class BaseModel:
    """The model adapted: its version folder and its torch weights.

    Attributes:
        model_dir: The version folder (``model.onnx`` + ``metadata.json``).
        metadata: Its ``metadata.json``.
        weights: The ``weights.pt`` payload (:mod:`jrs.training.weights`).
        weights_source: Where the weights came from (file name, no folders).
        weights_sha256: Digest of the weights file.
    """

    model_dir: Path
    metadata: dict[str, Any]
    weights: dict[str, Any]
    weights_source: str
    weights_sha256: str

    @property
    def sha256(self) -> str:
        """Digest of the base ``model.onnx`` (from its metadata)."""
        return str(self.metadata.get("sha256", ""))

    @property
    def path_choice(self) -> dict[str, str]:
        """Organ -> validated output path (``segmentation`` / ``registration`` / ``fusion``)."""
        return {str(k): str(v) for k, v in (self.metadata.get("path_choice") or {}).items()}

    def build(self) -> nn.Module:
        """The base network with its weights, on the CPU, in eval mode."""
        spec = self.weights["network"]
        net = build(spec["name"], **dict(spec.get("overrides") or {}))
        net.load_state_dict(self.weights["model"])
        return net.eval()

    def info(self) -> dict[str, Any]:
        """The ``adaptation.base`` entry of the metadata."""
        return {
            "name": self.metadata.get("name"),
            "version": self.metadata.get("version"),
            "sha256": self.sha256,
            "weights_sha256": self.weights_sha256,
            "weights_source": self.weights_source,
            "git_sha": self.metadata.get("git_sha"),
        }


def onnx_parity(net: nn.Module, onnx_path: Path, tolerance: float = 1e-3) -> float:
    """Max |ONNX Runtime - PyTorch| of the network's high-level outputs on a random 48^3 input."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    outs = [o.name for o in sess.get_outputs()]
    gen = torch.Generator().manual_seed(0)
    xs = []
    for name in names:
        if name == "moving_labels":
            xs.append(torch.randint(0, 5, (1, 1, 48, 48, 48), generator=gen).float())
        else:
            xs.append(torch.rand((1, 1, 48, 48, 48), generator=gen) * 2 - 1)
    with torch.no_grad():
        flat = net.eval()(dict(zip(names, xs, strict=True))).flat()
    got = sess.run(outs, {n: x.numpy() for n, x in zip(names, xs, strict=True)})
    return max(float(np.abs(flat[o].numpy() - g).max()) for o, g in zip(outs, got, strict=True))


def _checkpoint_candidates(model_dir: Path, meta: Mapping[str, Any]) -> list[Path]:
    """Training checkpoints that may hold the weights of a model without ``weights.pt``.

    ``metadata["checkpoint"]`` (a path relative to the version folder) first, then the
    ``checkpoints/*.pt`` of the model repository (``<root>/<name>/<version>`` ->
    ``<root>/checkpoints``), the one whose step and git sha match the metadata first.
    """
    found: list[Path] = []
    named = meta.get("checkpoint")
    if isinstance(named, Mapping):
        named = named.get("file")
    if isinstance(named, str) and named:
        found.append((model_dir / named).resolve())
    repo = model_dir.resolve().parent.parent / "checkpoints"
    if repo.is_dir():
        found += sorted(repo.glob("*.pt"))
    return list(dict.fromkeys(found))


def resolve_base(
    model_dir: Path | str | None = None, weights: Path | str | None = None
) -> BaseModel:
    """Find the base model and its torch weights.

    The weights are, in this order: the ``weights`` file given; ``weights.pt`` beside
    ``model.onnx`` (written by ``jrs export``; checked against the sha256 in the metadata); a
    training checkpoint named by ``metadata["checkpoint"]`` or found in the model repository's
    ``checkpoints/`` folder (bundled models exported before ``weights.pt`` existed). Weights not
    read from the model's own ``weights.pt`` must reproduce its ``model.onnx`` (ONNX Runtime vs
    PyTorch on a random input, max |diff| <= 1e-3), so that the base of the adaptation is the
    model that was validated.

    Args:
        model_dir: A model version folder, or a folder of numeric versions (the newest); default
            the bundled model (``jrs.inference.registry.default_model_dir``).
        weights: A ``weights.pt`` or training checkpoint to use.

    Returns:
        The base model.

    Raises:
        InvalidInput: No model there, or no weights that reproduce it.
    """
    if model_dir is None:
        from jrs.inference.registry import default_model_dir

        folder = default_model_dir()
    else:
        folder = Path(model_dir)
        if folder.is_dir() and not (folder / "metadata.json").is_file():
            versions = sorted(
                (p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()),
                key=lambda p: int(p.name),
            )
            if versions:
                folder = versions[-1]
    if not (folder / "metadata.json").is_file() or not (folder / "model.onnx").is_file():
        raise InvalidInput(
            f"{folder}: not a model version folder (expected model.onnx and metadata.json, as "
            "`jrs export` writes them)"
        )
    meta = dict(read_metadata(folder).raw)
    tried: list[str] = []
    candidates: list[Path] = []
    if weights is not None:
        candidates.append(Path(weights))
    else:
        entry = meta.get("weights") if isinstance(meta.get("weights"), Mapping) else None
        own = folder / (str(entry.get("file")) if entry else WEIGHTS_FILE)
        if own.is_file():
            payload = load_weights(own, str(entry["sha256"]) if entry else None)
            return BaseModel(folder, meta, payload, own.name, file_sha256(own))
        candidates += _checkpoint_candidates(folder, meta)
    training = meta.get("training") or {}

    def rank(p: Path) -> int:
        return 0 if training.get("step") is not None and f"{training.get('step')}" in p.name else 1

    for path in sorted(candidates, key=rank) if weights is None else candidates:
        try:
            payload = read_any_weights(path)
        except InvalidInput as exc:
            tried.append(f"{path.name}: {exc.message}")
            continue
        if weights is None and (
            training.get("step") not in (None, payload.get("step"))
            or training.get("git_sha") not in (None, "unknown", payload.get("git_sha"))
        ):
            tried.append(f"{path.name}: step/git sha differ from the model's")
            continue
        spec = payload["network"]
        base = BaseModel(folder, meta, payload, path.name, file_sha256(path))
        try:
            diff = onnx_parity(base.build(), folder / "model.onnx")
        except Exception as exc:  # a network that cannot be built or run on the graph's inputs
            tried.append(f"{path.name}: {type(exc).__name__}: {exc}")
            continue
        if diff <= 1e-3:
            log.info("base weights from %s (%s; ONNX parity %.1e)", path.name, spec["name"], diff)
            return base
        tried.append(f"{path.name}: does not reproduce model.onnx (max |diff| {diff:.2e})")
    raise InvalidInput(
        f"{folder}: no torch weights for this model ({'; '.join(tried) or 'none found'}); "
        f"export it again with `jrs export` (which writes {WEIGHTS_FILE}) or pass the training "
        "checkpoint with --base-weights"
    )


def read_any_weights(path: Path) -> dict[str, Any]:
    """A ``weights.pt`` payload, or that of a training checkpoint."""
    try:
        return load_weights(path)
    except InvalidInput:
        return weights_from_checkpoint(path)
