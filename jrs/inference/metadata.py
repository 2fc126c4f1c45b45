"""The model artefact: ``metadata.json`` (validated) and the ONNX file it names.

A model folder ``models/<name>/<version>/`` holds ``model.onnx`` (the network only, written by
``model_export``) and ``metadata.json``; the inference reads nothing else. Every engine starts from
:func:`read_model_file`, which checks the file against the digest in the metadata.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jrs.core.errors import ModelNotReady
from jrs.inference.tiling import MARGIN, MIN_WINDOW

#: File names inside a model version folder.
MODEL_FILE = "model.onnx"
METADATA_FILE = "metadata.json"
#: ``format`` / ``format_version`` of ``metadata.json``.
METADATA_FORMAT = "jrs-onnx-model"
METADATA_VERSION = 1
#: Meaning of each network input (written to the metadata by the export).
INPUT_MEANINGS: dict[str, str] = {
    "fixed": "daily CT on the 1 mm grid, clip(HU, -1000, 1000) / 1000",
    "moving": "pre-aligned planning CT on the same grid, clip(HU, -1000, 1000) / 1000",
    "moving_labels": "pre-aligned planning label map on the same grid, ids 0..4 as float",
}
#: Padding value of each input outside the scan (air after the transform; background).
INPUT_PAD_VALUES: dict[str, float] = {"fixed": -1.0, "moving": -1.0, "moving_labels": 0.0}
#: Fallback bytes per input voxel when the metadata lacks the figure (cross-stitch 16/32/64).
DEFAULT_BYTES_PER_VOXEL = 3000.0

__all__ = [
    "DEFAULT_BYTES_PER_VOXEL",
    "INPUT_MEANINGS",
    "INPUT_PAD_VALUES",
    "METADATA_FILE",
    "METADATA_FORMAT",
    "METADATA_VERSION",
    "MODEL_FILE",
    "ModelMetadata",
    "read_metadata",
    "read_model_file",
]


@dataclass(frozen=True)
class ModelMetadata:
    """The parts of ``metadata.json`` the inference relies on (all of it in :attr:`raw`).

    Attributes:
        name: Model name.
        version: Model version.
        inputs: Input names in graph order (among ``fixed``, ``moving``, ``moving_labels``).
        outputs: Output names (``seg_high`` and/or ``dvf_high``, maybe more levels).
        sha256: Hex digest of ``model.onnx``.
        bytes_per_voxel: Summed float32 activations per input voxel (memory estimate).
        labels: Label id -> organ key (0 background).
        raw: The whole parsed file.
    """

    name: str
    version: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    sha256: str
    bytes_per_voxel: float
    labels: dict[int, str]
    raw: dict[str, Any] = field(repr=False)

    @property
    def pad_values(self) -> tuple[float, ...]:
        """Padding value per input, in :attr:`inputs` order."""
        table = {i["name"]: float(i.get("pad_value", 0.0)) for i in self.raw["inputs"]}
        return tuple(table.get(n, INPUT_PAD_VALUES.get(n, 0.0)) for n in self.inputs)

    @property
    def used_outputs(self) -> tuple[str, ...]:
        """The outputs the whole-scan inference reads (``seg_high`` if present, ``dvf_high``)."""
        return tuple(o for o in ("seg_high", "dvf_high") if o in self.outputs)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = METADATA_FILE) -> ModelMetadata:
        """Validate a parsed ``metadata.json``.

        Raises:
            ModelNotReady: Naming ``source`` and the offending key.
        """
        if raw.get("format") != METADATA_FORMAT:
            raise ModelNotReady(
                f"{source}: 'format' is {raw.get('format')!r}, not {METADATA_FORMAT!r}"
            )
        if raw.get("format_version") != METADATA_VERSION:
            raise ModelNotReady(
                f"{source}: unsupported 'format_version' {raw.get('format_version')!r} "
                f"(this jrs reads {METADATA_VERSION})"
            )
        try:
            inputs = tuple(str(i["name"]) for i in raw["inputs"])
            outputs = tuple(str(o["name"]) for o in raw["outputs"])
            valid = raw["valid_sizes"]
            labels = {int(k): str(v) for k, v in raw["labels"].items()}
            meta = cls(
                name=str(raw["name"]),
                version=int(raw["version"]),
                inputs=inputs,
                outputs=outputs,
                sha256=str(raw["sha256"]),
                bytes_per_voxel=float(
                    (raw.get("memory") or {}).get(
                        "activation_bytes_per_input_voxel", DEFAULT_BYTES_PER_VOXEL
                    )
                ),
                labels=labels,
                raw=dict(raw),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelNotReady(f"{source}: missing or invalid entry {exc}") from exc
        bad = [n for n in inputs if n not in INPUT_MEANINGS]
        if not inputs or bad:
            raise ModelNotReady(f"{source}: invalid input names {list(inputs)}")
        if "dvf_high" not in outputs:
            raise ModelNotReady(
                f"{source}: outputs {list(outputs)} lack dvf_high (the pipeline needs the DVF; "
                "seg_high is optional)"
            )
        geometry = (valid.get("multiple_of"), valid.get("minimum"), valid.get("high_output_offset"))
        if geometry != (4, MIN_WINDOW, MARGIN):
            raise ModelNotReady(
                f"{source}: valid sizes (multiple_of, minimum, offset) = {geometry}; this jrs "
                f"tiles networks with (4, {MIN_WINDOW}, {MARGIN})"
            )
        if meta.bytes_per_voxel <= 0:
            raise ModelNotReady(f"{source}: non-positive activation_bytes_per_input_voxel")
        return meta


def read_metadata(model_dir: str | Path) -> ModelMetadata:
    """Read and validate ``model_dir/metadata.json``.

    Raises:
        ModelNotReady: When the file is missing, not JSON or invalid (the message names it).
    """
    path = Path(model_dir) / METADATA_FILE
    if not path.is_file():
        raise ModelNotReady(f"{path}: model metadata not found (expected {METADATA_FILE} there)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelNotReady(f"{path}: unreadable model metadata ({exc})") from exc
    if not isinstance(raw, dict):
        raise ModelNotReady(f"{path}: model metadata must be a JSON object")
    return ModelMetadata.from_dict(raw, str(path))


def read_model_file(
    folder: Path, meta: ModelMetadata, verify_sha256: bool = True
) -> tuple[Path, bytes]:
    """The ONNX file a model folder's metadata names, checked against its digest.

    Args:
        folder: The model version folder.
        meta: Its validated metadata.
        verify_sha256: Check the bytes against ``meta.sha256``.

    Returns:
        The file's path and its bytes.

    Raises:
        ModelNotReady: When the file is missing or its digest differs (the message names it).
    """
    onnx_path = folder / str(meta.raw.get("model_file", MODEL_FILE))
    if not onnx_path.is_file():
        raise ModelNotReady(f"{onnx_path}: model file not found")
    data = onnx_path.read_bytes()
    if verify_sha256 and hashlib.sha256(data).hexdigest() != meta.sha256:
        raise ModelNotReady(
            f"{onnx_path}: sha256 does not match {folder / METADATA_FILE} (corrupt or replaced "
            "model file; re-export the model)"
        )
    return onnx_path, data
