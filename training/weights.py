"""``weights.pt``: the torch weights of an exported model, kept beside its ``model.onnx``.

The ONNX graph is all the inference needs, but fine-tuning a model (patient-specific adaptation,
:mod:`jrs.training.adapt`) needs its torch weights. The export (:mod:`jrs.model_export.export`)
writes them
next to ``model.onnx`` as a small file of plain tensors and JSON-able values (loadable with
``torch.load(..., weights_only=True)``; no pickled code, no optimiser state), and names it in
``metadata.json`` (``weights``: file, sha256, bytes, format)::

    {"format": "jrs-weights", "version": 1,
     "network": {"name": "cross-stitch", "overrides": {...}},
     "model": <state dict, float32, CPU>,
     "weighting": {"name": "equal", "state": <state dict>},
     "tasks": ["seg", "reg", "reg_dsc"], "patch_size": 64,
     "config": <resolved training config>, "git_sha": "...", "step": 400}

The cross-stitch network of METHOD.md takes about 3.1 MB.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from jrs.core.errors import InvalidInput
from jrs.training.networks import build

#: File name of the weights inside a model version folder.
WEIGHTS_FILE = "weights.pt"
#: ``format`` / ``version`` of the file.
WEIGHTS_FORMAT = "jrs-weights"
WEIGHTS_VERSION = 1

__all__ = [
    "WEIGHTS_FILE",
    "WEIGHTS_FORMAT",
    "WEIGHTS_VERSION",
    "file_sha256",
    "load_weights",
    "save_weights",
    "weights_from_checkpoint",
    "weights_payload",
]


def file_sha256(path: Path) -> str:
    """Hex SHA-256 digest of a file."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _plain(value: Any) -> Any:
    """JSON-able data only (what ``weights_only=True`` loading accepts besides tensors)."""
    import json

    return json.loads(json.dumps(value, default=str))


def weights_payload(
    net: nn.Module,
    network: Mapping[str, Any],
    *,
    weighting: Mapping[str, Any] | None = None,
    tasks: list[str] | None = None,
    patch_size: int | None = None,
    config: Mapping[str, Any] | None = None,
    git_sha: str | None = None,
    step: int | None = None,
) -> dict[str, Any]:
    """The content of ``weights.pt`` for a network.

    Args:
        net: The network (its state dict is copied to the CPU as float32).
        network: ``{"name", "overrides"}`` rebuilding it with ``jrs.training.networks.build``.
        weighting: ``{"name", "state"}`` of the loss weighting it was trained with.
        tasks: Task names of its losses.
        patch_size: Training patch edge (voxels).
        config: The resolved training configuration (JSON-able).
        git_sha: Commit of the training code.
        step: Optimiser steps it was trained for.

    Returns:
        The payload for :func:`save_weights`.
    """
    state = {
        k: (v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu())
        for k, v in net.state_dict().items()
    }
    wstate = dict((weighting or {}).get("state") or {})
    return {
        "format": WEIGHTS_FORMAT,
        "version": WEIGHTS_VERSION,
        "network": {
            "name": str(network["name"]),
            "overrides": _plain(dict(network.get("overrides") or {})),
        },
        "model": state,
        "weighting": {
            "name": str((weighting or {}).get("name") or "equal"),
            "state": {k: v.detach().cpu() for k, v in wstate.items()},
        },
        "tasks": list(tasks or []),
        "patch_size": int(patch_size) if patch_size is not None else None,
        "config": _plain(dict(config or {})),
        "git_sha": str(git_sha or "unknown"),
        "step": int(step) if step is not None else None,
    }


def save_weights(path: Path, payload: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``weights.pt`` atomically.

    Args:
        path: Target file.
        payload: From :func:`weights_payload`.

    Returns:
        The ``metadata.json`` entry: ``{"file", "format", "sha256", "bytes"}``.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(dict(payload), tmp)
    tmp.replace(path)
    return {
        "file": path.name,
        "format": WEIGHTS_FORMAT,
        "sha256": file_sha256(path),
        "bytes": path.stat().st_size,
    }


def load_weights(path: Path, sha256: str | None = None) -> dict[str, Any]:
    """Read a ``weights.pt`` (``weights_only``: no code is unpickled).

    Args:
        path: The file.
        sha256: Expected digest (e.g. from ``metadata.json``); checked when given.

    Returns:
        The payload (see the module docstring).

    Raises:
        InvalidInput: Missing, unreadable, of another format, or not matching ``sha256``.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"{path}: weights file not found")
    if sha256 is not None and file_sha256(path) != sha256:
        raise InvalidInput(f"{path}: sha256 differs from the one recorded in metadata.json")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InvalidInput(f"{path}: not a readable weights file ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != WEIGHTS_FORMAT:
        raise InvalidInput(f"{path}: not a jrs weights file (format {WEIGHTS_FORMAT!r})")
    return payload


def rebuild_from_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Read a :class:`jrs.training.trainer.Trainer` checkpoint and rebuild its network.

    Args:
        path: ``last.pt`` / ``best.pt`` of a run (a trusted file: it is unpickled).

    Returns:
        ``(network with the checkpoint's weights, on the CPU, the whole checkpoint dict)``.

    Raises:
        InvalidInput: When the file is missing, unreadable or not a training checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise InvalidInput(f"{path}: not a readable torch checkpoint ({exc})") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt or "network" not in ckpt:
        raise InvalidInput(
            f"{path}: not a jrs training checkpoint (expected the entries 'model' and 'network')"
        )
    spec = ckpt["network"]
    try:
        net = build(spec["name"], **dict(spec.get("overrides") or {}))
        net.load_state_dict(ckpt["model"])
    except (KeyError, ValueError, RuntimeError) as exc:
        raise InvalidInput(f"{path}: cannot rebuild network {spec!r}: {exc}") from exc
    return net, ckpt


def weights_from_checkpoint(path: Path) -> dict[str, Any]:
    """The ``weights.pt`` payload of a :class:`jrs.training.trainer.Trainer` checkpoint.

    Args:
        path: ``last.pt`` / ``best.pt`` of a run (a trusted file: it is unpickled).

    Returns:
        The payload (network, float32 weights, weighting state, patch size, config, sha, step).

    Raises:
        InvalidInput: When the file is missing, unreadable or not a training checkpoint.
    """
    net, ckpt = rebuild_from_checkpoint(path)
    spec = ckpt["network"]
    config = ckpt.get("config") or {}
    weighting_name = (config.get("weighting") or {}).get("name", "equal")
    return weights_payload(
        net,
        spec,
        weighting={"name": weighting_name, "state": ckpt.get("weighting") or {}},
        tasks=list(ckpt.get("tasks") or []),
        patch_size=ckpt.get("patch_size"),
        config=config,
        git_sha=ckpt.get("git_sha"),
        step=ckpt.get("step"),
    )
