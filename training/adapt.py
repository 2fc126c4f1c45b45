"""Patient-specific adaptation: fine-tune a model on synthetic fractions of ONE planning scan.

METHOD.md ("Patient-specific adaptation", after Elmahdy et al., ISBI 2020): the planning CT is the
moving image, synthetic daily fractions of it made by the deformation engine
(:func:`jrs.synth.engine.synthesize_fraction`) are the fixed images, and the planning contours
warped by the known field are the fixed labels. The base model is fine-tuned with its own losses
and loss weighting (:class:`jrs.training.trainer.Trainer`, bf16 autocast on a CPU that has it, AMP
on
CUDA) for as long as a time budget allows, and the adapted weights are kept only when held-back
synthetic fractions of the same scan score at least as well as with the base model.

:func:`adapt` runs these phases, each recorded in ``<work>/state.json`` so that a process stopped
at any point (a service restart, a killed batch) continues where it was with the same work folder:

1. ``pairs``: read the planning CT + RTSTRUCT (ROI names mapped by the synonym table as the
   pipeline maps them), crop it to the organs plus `PLANNING_CROP_MM` (the engine and the
   pre-alignment then work on a quarter of the voxels), and make ``fractions`` training and
   ``val_fractions`` held-back fractions; each is pre-aligned and resampled like a re-contouring
   (:func:`jrs.inference.preprocess.prepare_pair`): training pairs on the organs + `TRAIN_BOX_MM`,
   held-back pairs on the pipeline's network box (pre-aligned planning organs +
   `VALIDATION_BOX_MM`); cached in ``<work>/pairs/``;
2. ``base_validation``: the base model's ``model.onnx`` on the held-back pairs through the
   deployed inference engine (:func:`jrs.inference.load_model`: OpenVINO bf16 on this CPU,
   ONNX Runtime CUDA on a GPU), scored per organ (DSC, MSD) on the path the model's metadata
   chooses per organ, after the pipeline's post-processing (largest components);
3. ``training``: fine-tune from the base weights until the budget (``minutes``, the whole run
   included) leaves just the time the last two phases are expected to take; ``last.pt`` is
   saved every `CHECKPOINT_S` seconds and on a stop request;
4. ``export``: the adapted network as a normal model artefact (``model.onnx`` with the parity
   check, ``metadata.json``, ``MODEL_CARD.md``, ``weights.pt``) by the injected
   :class:`ArtefactWriter` (``model_export`` sits above ``training``);
5. ``validation``: the exported model on the same held-back pairs, same engine, same scoring;
6. ``decide``: :func:`decide` keeps the adapted model only if no organ loses more than
   ``tolerance`` DSC and the mean DSC over organs rises; otherwise the base model is written to
   the output folder instead (its ``model.onnx`` unchanged) and the result says why.

The output folder is a model version folder in either case (``jrs recontour --model OUT``); its
``metadata.json`` holds an ``adaptation`` section: the base model's name, version and sha256, the
sha256 of the planning SeriesInstanceUID (no patient data), the decision and its reason, the steps,
the times per phase and the validation figures of both models. Nothing identifying the patient is
logged or written.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import datetime as _dt
import fcntl
import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from jrs.core.errors import InvalidInput, JrsError
from jrs.core.fields import warp
from jrs.core.geometry import Geometry, Volume
from jrs.core.labels import LABELS, SynonymTable, label_map_from_mapping
from jrs.core.metrics import dice, surface_distances
from jrs.inference import load_model, read_metadata
from jrs.inference.cascade import network_passes, refine
from jrs.inference.fusion import FusionSpec, fuse_network_paths, softmax_source
from jrs.inference.null_correction import null_correct, null_correction_enabled
from jrs.inference.postprocess import keep_largest_components
from jrs.inference.preprocess import mask_box, prepare_pair
from jrs.inference.smoothing import field_smoothing_sigma, smooth_field
from jrs.io.rtstruct import masks_from_files
from jrs.registration.boxes import crop, organ_box
from jrs.registration.focus import prealign_pair
from jrs.synth.engine import synthesize_fraction
from jrs.training.config import parse_config
from jrs.training.data import TrainingPair
from jrs.training.networks import build
from jrs.training.trainer import Trainer
from jrs.training.weights import (
    WEIGHTS_FILE,
    file_sha256,
    load_weights,
    save_weights,
    weights_from_checkpoint,
)

log = logging.getLogger(__name__)

#: Default time budget of one adaptation (minutes, every phase included).
DEFAULT_MINUTES = 15.0
#: Default synthetic fractions used for fine-tuning / held back for the keep-or-base decision.
DEFAULT_FRACTIONS = 6
DEFAULT_VAL_FRACTIONS = 2
#: Margin around the planning organs kept before making fractions (mm): it holds the training
#: boxes after any engine motion (setup <= 5 mm, organ motion <= 6 mm) with room to spare.
PLANNING_CROP_MM = 70.0
#: Margin of the training pairs' box around the daily organs (mm; as ``jrs.training.build_data``).
TRAIN_BOX_MM = 44.0
#: Margin of the held-back pairs' box around the pre-aligned planning organs (mm; the
#: pipeline's default network box).
VALIDATION_BOX_MM = 30.0
#: Seconds between two training checkpoints.
CHECKPOINT_S = 60.0
#: Seconds reserved for the export (legacy exporter + parity check) before it has been timed.
EXPORT_RESERVE_S = 45.0
#: Files of the work folder.
STATE_FILE = "state.json"
PROGRESS_FILE = "progress.json"
LOCK_FILE = ".lock"
TRAIN_LOG = "adapt_log.csv"
#: Why the base stays when no fine-tuning step fitted in the budget.
NO_STEP_REASON = (
    "no fine-tuning step fitted in the time budget after making the fractions and validating the "
    "base model; the base model stays"
)
#: Version of the state file (a different version starts afresh).
STATE_VERSION = 1

__all__ = [
    "DEFAULT_FRACTIONS",
    "DEFAULT_MINUTES",
    "DEFAULT_VAL_FRACTIONS",
    "AdaptOptions",
    "AdaptResult",
    "AdaptationInterrupted",
    "ArtefactWriter",
    "BaseModel",
    "Figures",
    "Planning",
    "adapt",
    "decide",
    "make_pairs",
    "read_planning",
    "resolve_base",
    "score_model",
    "series_sha256",
]


class AdaptationInterrupted(JrsError):
    """The adaptation was asked to stop; its work folder lets a later run continue."""

    code = "interrupted"


class ArtefactWriter(Protocol):
    """What the adaptation needs of the export (``jrs.model_export.export.ArtefactWriter``)."""

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
        """Write a model version folder at ``dest`` (absent before); return its metadata."""
        ...

    def card(self, metadata: Mapping[str, Any]) -> str:
        """The ``MODEL_CARD.md`` text of a model's metadata."""
        ...


# ------------------------------------------------------------------------------ options
@dataclass
class AdaptOptions:
    """Settings of one adaptation.

    Attributes:
        minutes: Time budget of the whole run (data, validation, fine-tuning, export), minutes;
            the fine-tuning stops when what is left covers the export and the last validation.
        fractions: Synthetic fractions to fine-tune on.
        val_fractions: Synthetic fractions held back for the keep-or-base decision.
        seed: Seed of the fractions, the patch sampling and the network's random state.
        lr: RAdam learning rate (constant; METHOD.md's 1e-4).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        precision: CPU precision of the fine-tuning: ``auto`` (bf16 on a CPU with AMX /
            AVX512-BF16), ``bf16`` or ``fp32``; CUDA always uses AMP (fp16 autocast).
        threads: Torch CPU threads (``None``: torch's default, one per core).
        engine: Inference engine of the validation (as ``jrs recontour --engine``).
        tolerance: DSC an organ may lose on the held-back fractions and still keep the adapted
            model (0: never worse).
        min_steps: Fine-tuning steps done even when the budget is spent.
        max_steps: At most this many fine-tuning steps (``None``: as many as the budget allows).
        patch_size: Training patch edge (``None``: the base model's training patch, else 64).
        strength: Amplitude factor of the synthetic deformations (1: the engine's defaults).
        exporter: ONNX exporter of the adapted model (``legacy``: seconds; ``dynamo``: a minute).
        keep_work: Keep the work folder after a finished run (default: removed).
    """

    minutes: float = DEFAULT_MINUTES
    fractions: int = DEFAULT_FRACTIONS
    val_fractions: int = DEFAULT_VAL_FRACTIONS
    seed: int = 0
    lr: float = 1e-4
    device: str = "auto"
    precision: str = "auto"
    threads: int | None = None
    engine: str = "auto"
    tolerance: float = 0.0
    min_steps: int = 0
    max_steps: int | None = None
    patch_size: int | None = None
    strength: float = 1.0
    exporter: str = "legacy"
    keep_work: bool = False

    def check(self) -> None:
        """Raise `InvalidInput` naming the first bad value."""
        if not (self.minutes > 0 and math.isfinite(self.minutes)):
            raise InvalidInput(f"minutes must be a positive number, got {self.minutes}")
        if self.fractions < 1 or self.val_fractions < 1:
            raise InvalidInput(
                f"fractions ({self.fractions}) and val_fractions ({self.val_fractions}) must "
                "be >= 1"
            )
        if not self.lr > 0:
            raise InvalidInput(f"lr must be > 0, got {self.lr}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise InvalidInput(f"device {self.device!r} unknown; use auto, cpu or cuda")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise InvalidInput(f"precision {self.precision!r} unknown; use auto, bf16 or fp32")
        if self.tolerance < 0:
            raise InvalidInput(f"tolerance must be >= 0, got {self.tolerance}")
        if self.min_steps < 0 or (self.max_steps is not None and self.max_steps < self.min_steps):
            raise InvalidInput(
                f"need 0 <= min_steps <= max_steps, got {self.min_steps} and {self.max_steps}"
            )
        if self.patch_size is not None and (self.patch_size < 44 or self.patch_size % 4):
            raise InvalidInput(f"patch size must be a multiple of 4 >= 44, got {self.patch_size}")


@dataclass
class Figures:
    """Validation figures of one model on the held-back fractions.

    Attributes:
        dsc: Organ key -> mean DSC (chosen path) over the held-back fractions.
        msd: Organ key -> mean MSD (mm; NaN where a mask is empty).
        paths: Path (``segmentation``, ``registration``) -> organ -> mean DSC.
        per_fraction: One dict per fraction: ``fraction``, ``organ``, ``dsc``, ``msd``.
        seconds: Wall time of the scoring.
    """

    dsc: dict[str, float] = field(default_factory=dict)
    msd: dict[str, float] = field(default_factory=dict)
    paths: dict[str, dict[str, float]] = field(default_factory=dict)
    per_fraction: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def mean_dsc(self) -> float:
        """Mean DSC over organs (NaN counted as 0)."""
        vals = [0.0 if not math.isfinite(v) else v for v in self.dsc.values()]
        return float(np.mean(vals)) if vals else math.nan

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form (NaN as None)."""
        return _json_safe(asdict(self) | {"mean_dsc": self.mean_dsc})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Figures:
        """Inverse of :meth:`as_dict`."""

        def nan(d: Mapping[str, Any]) -> dict[str, float]:
            return {k: math.nan if v is None else float(v) for k, v in d.items()}

        return cls(
            dsc=nan(data.get("dsc") or {}),
            msd=nan(data.get("msd") or {}),
            paths={p: nan(v) for p, v in (data.get("paths") or {}).items()},
            per_fraction=list(data.get("per_fraction") or []),
            seconds=float(data.get("seconds") or 0.0),
        )


@dataclass
class AdaptResult:
    """What :func:`adapt` produced.

    Attributes:
        out: The model version folder written.
        kept: Whether the adapted weights were kept (else the folder holds the base model).
        reason: Why (one line, organ figures included).
        metadata: The ``metadata.json`` written.
        steps: Fine-tuning steps done.
        seconds: Wall time of all attempts together.
        resumed: Whether this run continued an interrupted one (or found it finished).
    """

    out: Path
    kept: bool
    reason: str
    metadata: dict[str, Any]
    steps: int
    seconds: float
    resumed: bool = False


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    return value


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


def _parity(net: nn.Module, onnx_path: Path, tolerance: float = 1e-3) -> float:
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
            payload = _read_any_weights(path)
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
            diff = _parity(base.build(), folder / "model.onnx")
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


def _read_any_weights(path: Path) -> dict[str, Any]:
    """A ``weights.pt`` payload, or that of a training checkpoint."""
    try:
        return load_weights(path)
    except InvalidInput:
        return weights_from_checkpoint(path)


# ------------------------------------------------------------------------------ planning
@dataclass
class Planning:
    """The planning scan of the patient, cropped around the organs.

    Attributes:
        ct: Planning CT, HU, cropped to the organs + `PLANNING_CROP_MM`.
        labels: Label map 0..4 on the same grid (ROI names mapped as the pipeline maps them).
        known: Organ label ids delineated.
        series_sha256: Hex SHA-256 of the planning SeriesInstanceUID.
    """

    ct: Volume
    labels: Volume
    known: tuple[int, ...]
    series_sha256: str

    @property
    def organs(self) -> list[str]:
        """Organ keys delineated (``prostate``, ``rectum`` ...)."""
        return [LABELS[k] for k in self.known]


def series_sha256(uid: str) -> str:
    """Hex SHA-256 of a UID (what the adaptation records instead of the UID)."""
    return hashlib.sha256(uid.encode()).hexdigest()


def crop_to_organs(
    ct: Volume, labels: Volume, margin_mm: float = PLANNING_CROP_MM
) -> tuple[Volume, Volume]:
    """Both volumes cut to the organs' bounding box grown by ``margin_mm`` (clipped to the scan).

    Args:
        ct: (nz, ny, nx) planning CT.
        labels: (nz, ny, nx) label map on the same grid.
        margin_mm: Margin, mm.

    Returns:
        The cropped CT and labels (same spacing, direction and frame).
    """
    idx = np.argwhere(np.asarray(labels.array) > 0)
    if idx.size == 0:
        raise InvalidInput("the planning label map is empty: no organ to adapt to")
    pad = np.ceil(margin_mm / np.asarray(ct.geometry.spacing, float)[::-1]).astype(int)
    lo = np.maximum(idx.min(axis=0) - pad, 0)
    hi = np.minimum(idx.max(axis=0) + pad + 1, ct.geometry.shape)
    box = (
        slice(int(lo[0]), int(hi[0])),
        slice(int(lo[1]), int(hi[1])),
        slice(int(lo[2]), int(hi[2])),
    )
    return _contiguous(crop(ct, box)), _contiguous(crop(labels, box))


def read_planning(
    ct_dir: Path | str, rtstruct: Path | str, synonyms: SynonymTable | None = None
) -> Planning:
    """Read a planning CT + RTSTRUCT into a cropped planning scan with its label map.

    Args:
        ct_dir: Planning CT series folder.
        rtstruct: Its RTSTRUCT.
        synonyms: ROI-name synonym table (default: the built-in one).

    Returns:
        The planning scan.

    Raises:
        InvalidInput: Unreadable files, or no ROI mapping to an organ.
        GeometryMismatch: The RTSTRUCT does not belong to the CT.
    """
    _, series, masks = masks_from_files(ct_dir, rtstruct)
    mapping = (synonyms or SynonymTable()).resolve(masks)
    arrays = {k: v.array for k, v in masks.items()}
    label_array, used = label_map_from_mapping(arrays, mapping)
    del arrays, masks
    key = series.series_instance_uid or series.frame_of_reference_uid or series.sop_instance_uids[0]
    ct, labels = crop_to_organs(series.volume, series.volume.with_array(label_array))
    known = tuple(int(k) for k in sorted(used) if np.any(labels.array == k))
    log.info(
        "planning scan: organs %s, cropped to %s voxels",
        [LABELS[k] for k in known],
        ct.geometry.shape,
    )
    return Planning(ct, labels, known, series_sha256(key))


# ------------------------------------------------------------------------------ pairs
def _f16(a: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Round to float16 and back: the cached arrays, so fresh and resumed runs see the same."""
    return a.astype(np.float16).astype(np.float32)


def make_pair(
    planning: Planning, k: int, seed: int, held_back: bool, strength: float = 1.0
) -> TrainingPair:
    """Synthetic fraction ``k`` of the planning scan as a pair on the 1 mm network grid.

    Args:
        planning: The (cropped) planning scan.
        k: Fraction number (training fractions 1..F, held-back ones 1001..1000+V).
        seed: Seed of the adaptation.
        held_back: Held-back pair: box = pre-aligned planning organs + `VALIDATION_BOX_MM` (as
            the pipeline's network box); else daily organs + `TRAIN_BOX_MM`.
        strength: Amplitude factor of the deformation engine.

    Returns:
        The pair: fixed = synthetic daily CT, moving = pre-aligned planning CT, fixed labels = the
        planning labels warped by the known field.
    """
    rng = np.random.default_rng([int(seed), int(k), 0x5EED])
    frac = synthesize_fraction(planning.ct, planning.labels, {}, rng, strength=strength)
    if held_back:
        reg, _ = prealign_pair(frac.ct, planning.ct, planning.labels)  # as the pipeline
        box = organ_box(planning.labels, reg.transform, frac.ct.geometry, VALIDATION_BOX_MM)
        prepared = prepare_pair(
            frac.ct, planning.ct, planning.labels, daily_labels=frac.labels, box=box, prealign=reg
        )
    else:
        box = mask_box(np.asarray(frac.labels.array) > 0, frac.labels.geometry, TRAIN_BOX_MM)
        prepared = prepare_pair(
            frac.ct, planning.ct, planning.labels, daily_labels=frac.labels, box=box
        )
    pair = TrainingPair.from_prepared(f"{'val' if held_back else 'train'}_{k}", prepared)
    pair.fixed, pair.moving = _f16(pair.fixed), _f16(pair.moving)
    pair.known = planning.known
    pair.group = "patient"
    return pair


def make_pairs(
    planning: Planning,
    options: AdaptOptions,
    cache: Path | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[list[TrainingPair], list[TrainingPair]]:
    """The training and held-back pairs of an adaptation (cached in ``cache`` when given).

    Args:
        planning: The planning scan.
        options: Fraction counts, seed and strength.
        cache: Folder of ``<key>.npz`` files (made pairs are read back from it).
        should_stop: Checked after each pair; True raises `AdaptationInterrupted`.

    Returns:
        ``(training pairs, held-back pairs)``.
    """
    jobs = [(k, False) for k in range(1, options.fractions + 1)]
    jobs += [(1000 + k, True) for k in range(1, options.val_fractions + 1)]
    train: list[TrainingPair] = []
    val: list[TrainingPair] = []
    for k, held in jobs:
        key = f"{'val' if held else 'train'}_{k}"
        path = cache / f"{key}.npz" if cache is not None else None
        pair: TrainingPair | None = None
        if path is not None and path.is_file():
            try:
                pair = TrainingPair.load(key, path)
                pair.known, pair.group = planning.known, "patient"
            except (OSError, ValueError, KeyError, InvalidInput) as exc:
                log.warning("cached pair %s unreadable (%s); making it again", key, exc)
        if pair is None:
            t0 = time.perf_counter()
            pair = make_pair(planning, k, options.seed, held, options.strength)
            if path is not None:
                pair.save(path)
            log.info(
                "synthetic fraction %s: %s voxels in %.1f s",
                key,
                pair.fixed.shape,
                time.perf_counter() - t0,
            )
        (val if held else train).append(pair)
        if should_stop is not None and should_stop():
            raise AdaptationInterrupted("stop requested while making the synthetic fractions")
    return train, val


# ------------------------------------------------------------------------------ scoring
def _inference_of(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The pipeline settings a model's ``metadata.json`` asks for, made explicit.

    See `jrs.model_export.export.inference_settings`: a model adapted from this one keeps them.
    """
    return {
        "null_correction": null_correction_enabled(metadata),
        "dvf_smoothing_mm": field_smoothing_sigma(metadata),
        "network_passes": network_passes(metadata),
    }


def score_model(
    model_dir: Path,
    pairs: Sequence[TrainingPair],
    path_choice: Mapping[str, str],
    organs: Sequence[int],
    *,
    device: str = "auto",
    engine: str = "auto",
    should_stop: Callable[[], bool] | None = None,
    fusion: Mapping[str, Any] | None = None,
) -> Figures:
    """Score a model folder on held-back pairs as the pipeline would contour them.

    Each pair runs through :func:`jrs.inference.load_model` (the deployed engine); the
    segmentation path is the arg-max of the logits, the registration path the moving labels
    warped by the DVF (:func:`jrs.core.fields.warp`, ``label``), both post-processed with
    :func:`jrs.inference.postprocess.keep_largest_components`; organs whose choice is ``fusion`` are
    fused from both (:func:`jrs.inference.fusion.fuse`, soft-max and warped one-hot probabilities,
    with the model's ``fusion`` entry) as the pipeline fuses them; the organ's path is the model's
    ``path_choice`` (``segmentation`` where it names none, as the pipeline).

    Args:
        model_dir: The model version folder.
        pairs: Held-back pairs with ``fixed_labels`` (truth).
        path_choice: Organ key -> ``segmentation`` / ``registration`` / ``fusion``.
        organs: Label ids scored.
        device: Inference device.
        engine: Inference engine.
        should_stop: Checked after each pair.
        fusion: The model's ``metadata.json`` ``fusion`` entry (method and weights; None: the
            defaults of :class:`jrs.inference.fusion.FusionSpec`).

    Returns:
        Mean DSC / MSD per organ of the chosen path, per-path DSC (``fusion``: the fused
        organs only), per-fraction rows.
    """
    t0 = time.perf_counter()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(model_dir, device=device, engine=engine)
    fused = [lab for lab in organs if path_choice.get(LABELS[lab]) == "fusion"]
    rows: list[dict[str, Any]] = []
    by_path: dict[str, dict[str, list[float]]] = {}
    for pair in pairs:
        shape = pair.fixed.shape
        geo = Geometry(shape, origin=np.zeros(3), spacing=np.ones(3))
        labels_f = pair.moving_labels.astype(np.float32)
        pred = model.predict(pair.fixed, pair.moving, labels_f)
        raw = np.asarray(pred.dvf, np.float32)
        null = null_correction_enabled(model.metadata)
        if null:  # as the pipeline will use the model
            raw, _ = null_correct(model, pair.moving, labels_f, raw)
        raw, pred, _ = refine(
            model,
            geo,
            pair.fixed,
            pair.moving,
            labels_f,
            raw,
            network_passes(model.metadata),
            null_correction=null,
            prediction=pred,
        )
        sigma = field_smoothing_sigma(model.metadata)
        if sigma > 0:
            raw = smooth_field(raw, sigma)
        dvf = np.ascontiguousarray(np.moveaxis(raw, 0, -1))
        del raw, labels_f
        warped = warp(Volume(pair.moving_labels, geo), Volume(dvf, geo), "label", 0).array
        paths = {"registration": keep_largest_components(np.asarray(warped, np.uint8))}
        if pred.seg_logits is not None:
            paths["segmentation"] = keep_largest_components(pred.labels)
            if fused:
                paths["fusion"] = _fused_labels(paths, pred, pair, dvf, geo, fused, fusion)
        truth = np.asarray(pair.fixed_labels)
        for lab in organs:
            organ = LABELS[lab]
            for name, labels in paths.items():
                if name == "fusion" and lab not in fused:
                    continue
                by_path.setdefault(name, {}).setdefault(organ, []).append(
                    dice(labels == lab, truth == lab)
                )
            want = path_choice.get(organ, "segmentation")
            chosen = paths.get(want, paths["registration"]) == lab
            sd = surface_distances(chosen, truth == lab, geo)
            rows.append(
                {
                    "fraction": pair.key,
                    "organ": organ,
                    "dsc": dice(chosen, truth == lab),
                    "msd": sd.msd,
                }
            )
        if should_stop is not None and should_stop():
            raise AdaptationInterrupted("stop requested during validation")
    figs = Figures(seconds=round(time.perf_counter() - t0, 2), per_fraction=rows)
    for lab in organs:
        organ = LABELS[lab]
        mine = [r for r in rows if r["organ"] == organ]
        figs.dsc[organ] = round(float(np.mean([r["dsc"] for r in mine])), 4)
        msd = [r["msd"] for r in mine if math.isfinite(r["msd"])]
        figs.msd[organ] = round(float(np.mean(msd)), 3) if msd else math.nan
    figs.paths = {
        p: {o: round(float(np.mean(v)), 4) for o, v in d.items()} for p, d in by_path.items()
    }
    return figs


def _fused_labels(
    paths: Mapping[str, npt.NDArray[np.uint8]],
    pred: Any,
    pair: TrainingPair,
    dvf: npt.NDArray[np.float32],
    geo: Geometry,
    organs: Sequence[int],
    fusion: Mapping[str, Any] | None,
) -> npt.NDArray[np.uint8]:
    """The fused organs of one pair, as :func:`jrs.pipeline.run` fuses them.

    Args:
        paths: ``segmentation`` and ``registration`` label maps ``(nz, ny, nx)``.
        pred: The engine's prediction (``seg_logits`` ``(5, nz, ny, nx)``).
        pair: The pair (its pre-aligned ``moving_labels``).
        dvf: ``(nz, ny, nx, 3)`` pull displacement on ``geo`` (voxels = mm here).
        geo: The pair's unit grid.
        organs: Label ids to fuse.
        fusion: The model's ``fusion`` metadata entry.

    Returns:
        ``(nz, ny, nx)`` uint8 map holding the fused organs only.
    """
    return fuse_network_paths(
        paths["segmentation"],
        paths["registration"],
        organs,
        FusionSpec.from_json(fusion),
        seg_probability=softmax_source(pred.seg_logits),
        moving_labels=np.asarray(pair.moving_labels),
        dvf=dvf,
        grid=geo,
        fixed=np.asarray(pair.fixed),
        moving=np.asarray(pair.moving),
    )


def decide(base: Figures, adapted: Figures, tolerance: float = 0.0) -> tuple[bool, str]:
    """Keep the adapted model or the base one, from the held-back synthetic fractions.

    The adapted model is kept when no organ's mean DSC falls more than ``tolerance`` below the
    base model's and the mean DSC over organs rises. Organs the base model has no figure for are
    ignored; an organ without a figure for the adapted model counts as DSC 0.

    Args:
        base: Figures of the base model.
        adapted: Figures of the adapted model.
        tolerance: DSC an organ may lose (0: never worse).

    Returns:
        ``(keep adapted, reason)``; the reason names the figures behind the decision.
    """
    organs = [o for o in base.dsc if math.isfinite(base.dsc[o])]
    if not organs:
        return False, "no organ could be scored on the held-back fractions"

    def value(fig: Figures, organ: str) -> float:
        v = fig.dsc.get(organ, math.nan)
        return v if math.isfinite(v) else 0.0

    worse = [o for o in organs if value(adapted, o) < value(base, o) - tolerance]
    changes = ", ".join(f"{o} {value(base, o):.3f} -> {value(adapted, o):.3f}" for o in organs)
    b = float(np.mean([value(base, o) for o in organs]))
    a = float(np.mean([value(adapted, o) for o in organs]))
    if worse:
        return False, (
            f"the adapted model is worse than the base on {', '.join(worse)} (DSC {changes}); "
            "the base model stays"
        )
    if not a > b:
        return False, (
            f"no gain on the held-back fractions (mean DSC {b:.4f} -> {a:.4f}; {changes}); the "
            "base model stays"
        )
    return True, f"mean DSC {b:.4f} -> {a:.4f}, no organ worse ({changes})"


# ------------------------------------------------------------------------------ work folder
@dataclass
class _State:
    """The resumable state of an adaptation (``state.json``)."""

    fingerprint: str
    phase: str = "start"
    spent_s: float = 0.0
    attempts: int = 0
    step: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    base: dict[str, Any] | None = None
    adapted: dict[str, Any] | None = None
    step_s: float | None = None
    device: str = "cpu"
    precision: str = "fp32"
    threads: int = 1

    def save(self, work: Path) -> None:
        data = {"version": STATE_VERSION, **asdict(self)}
        tmp = work / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(_json_safe(data), indent=2))
        tmp.replace(work / STATE_FILE)

    @classmethod
    def load(cls, work: Path, fingerprint: str) -> _State | None:
        path = work / STATE_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if data.pop("version", None) != STATE_VERSION or data.get("fingerprint") != fingerprint:
            return None
        if data.get("phase") == "done":  # its output is gone (else _done_already answered)
            return None
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


@contextlib.contextmanager
def _locked(work: Path) -> Iterator[None]:
    """Hold an exclusive lock on the work folder (a second run waits for the first)."""
    work.mkdir(parents=True, exist_ok=True)
    with (work / LOCK_FILE).open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another adaptation holds this work folder; waiting for it to end")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _fingerprint(planning: Planning, base: BaseModel, options: AdaptOptions, patch: int) -> str:
    what = {
        "planning": planning.series_sha256,
        "organs": list(planning.known),
        "base": base.sha256,
        "weights": base.weights_sha256,
        "fractions": options.fractions,
        "val_fractions": options.val_fractions,
        "seed": options.seed,
        "lr": options.lr,
        "patch": patch,
        "strength": options.strength,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:20]


def _write_progress(work: Path, state: _State, budget_s: float, **extra: Any) -> None:
    data = {
        "phase": state.phase,
        "step": state.step,
        "spent_s": round(state.spent_s, 1),
        "budget_s": round(budget_s, 1),
        "step_s": state.step_s,
        "updated_at": time.time(),
        **extra,
    }
    tmp = work / (PROGRESS_FILE + ".tmp")
    tmp.write_text(json.dumps(_json_safe(data)))
    tmp.replace(work / PROGRESS_FILE)


def read_progress(work: Path) -> dict[str, Any] | None:
    """The last ``progress.json`` of a work folder (phase, step, spent_s, budget_s), or None."""
    try:
        data = json.loads((Path(work) / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ------------------------------------------------------------------------------ fine-tuning
def _train_config(base: BaseModel, options: AdaptOptions, patch: int, out: Path) -> Any:

    cfg = base.weights.get("config") or {}
    weighting = dict(cfg.get("weighting") or {"name": base.weights["weighting"]["name"]})
    return parse_config(
        {
            "network": dict(base.weights["network"]),
            "weighting": weighting,
            "data": {"synthetic": {"count": 1}},
            "patch_size": patch,
            "pairs_per_batch": int(cfg.get("pairs_per_batch") or 2),
            "patches_per_pair": 1,
            "swap": bool(cfg.get("swap", True)),
            "lr": options.lr,
            "iterations": options.max_steps or 10**9,
            "steps_per_epoch": int(cfg.get("steps_per_epoch") or 200),
            "seed": options.seed,
            "checkpoint_every": 10**9,
            "log_every": 1,
            "plot_every": 10**9,
            "device": options.device,
            "amp": True,
            "precision": options.precision,
            "schedule": {"name": "constant"},
            "num_threads": options.threads,
            "tensorboard": False,
            "output_dir": str(out),
        },
        source="jrs adapt",
    )


@dataclass
class _Clock:
    """Seconds spent by this adaptation over all its attempts."""

    before: float
    t0: float = field(default_factory=time.monotonic)

    def spent(self) -> float:
        return self.before + time.monotonic() - self.t0


def _fine_tune(
    base: BaseModel,
    train_pairs: Sequence[TrainingPair],
    options: AdaptOptions,
    patch: int,
    work: Path,
    state: _State,
    clock: _Clock,
    deadline_s: float,
    should_stop: Callable[[], bool],
    budget_s: float,
) -> Any:
    """Fine-tune from the base weights (or the last checkpoint) until the deadline; the trainer."""
    config = _train_config(base, options, patch, work / "train")
    ckpt = work / "train" / "checkpoints" / "last.pt"
    resume = ckpt.is_file() and state.step > 0
    trainer = Trainer(
        config, train_pairs=list(train_pairs), val_pairs=[], resume=resume, progress=False
    )
    if not resume:
        trainer.net.load_state_dict(base.weights["model"])
        wstate = (base.weights.get("weighting") or {}).get("state") or {}
        if wstate:
            try:
                trainer.weighting.load_state_dict(wstate)
            except (RuntimeError, KeyError) as exc:
                log.warning("loss weighting state of the base not restored (%s)", exc)
    if state.phase == "trained":
        return trainer
    trainer.net.train()
    trainer.weighting.train()
    log_path = work / TRAIN_LOG
    new_log = not log_path.is_file()
    last_save = time.monotonic()
    step_s = state.step_s or 0.0
    with log_path.open("a", newline="") as fh:
        writer = csv.writer(fh)
        if new_log:
            writer.writerow(["step", "spent_s", "step_s", "loss_total"])
        while True:
            steps = trainer.step
            if options.max_steps is not None and steps >= options.max_steps:
                break
            if steps >= options.min_steps and clock.spent() + step_s > deadline_s:
                break
            if should_stop():
                state.step = trainer.step
                state.spent_s = clock.spent()
                trainer.save(ckpt)
                state.save(work)
                raise AdaptationInterrupted(f"stop requested at fine-tuning step {trainer.step}")
            t = time.perf_counter()
            row = trainer.train_step()
            dt = time.perf_counter() - t
            step_s = dt if step_s == 0.0 else 0.8 * step_s + 0.2 * dt
            writer.writerow(
                [trainer.step, f"{clock.spent():.1f}", f"{dt:.3f}", f"{row['loss_total']:.5f}"]
            )
            if time.monotonic() - last_save >= CHECKPOINT_S:
                fh.flush()
                trainer.save(ckpt)
                state.step, state.step_s, state.spent_s = trainer.step, step_s, clock.spent()
                state.save(work)
                _write_progress(work, state, budget_s)
                last_save = time.monotonic()
    trainer.save(ckpt)
    state.step, state.step_s, state.spent_s = trainer.step, step_s, clock.spent()
    state.phase = "trained"
    state.save(work)
    return trainer


# ------------------------------------------------------------------------------ the run
def _write_folder(dest: Path, fill: Callable[[Path], None]) -> None:
    """Fill a sibling temporary folder, then move it to ``dest`` (replacing it)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
    try:
        fill(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_output(
    out: Path,
    kept: bool,
    candidate: Path,
    base: BaseModel,
    adaptation: Mapping[str, Any],
    writer: ArtefactWriter,
) -> dict[str, Any]:
    """Write the output model folder: the adapted candidate, or a copy of the base model.

    Either way ``metadata.json`` gets the ``adaptation`` section and the card its figures.

    Returns:
        The metadata written.
    """
    if kept:
        meta = json.loads((candidate / "metadata.json").read_text())
    else:
        meta = copy.deepcopy(base.metadata)
    meta["adaptation"] = _json_safe(dict(adaptation))

    def fill(tmp: Path) -> None:
        if kept:
            for item in candidate.iterdir():
                shutil.copy2(item, tmp / item.name)
        else:  # the base model unchanged, with its weights for a later adaptation
            shutil.copy2(base.model_dir / "model.onnx", tmp / "model.onnx")
            meta["weights"] = save_weights(tmp / WEIGHTS_FILE, base.weights)
        (tmp / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / "MODEL_CARD.md").write_text(writer.card(meta))

    _write_folder(out, fill)
    return dict(meta)


def _done_already(out: Path, fingerprint: str) -> dict[str, Any] | None:
    try:
        meta = json.loads((out / "metadata.json").read_text())
    except (OSError, ValueError):
        return None
    ada = meta.get("adaptation") if isinstance(meta, dict) else None
    if (
        isinstance(ada, dict)
        and ada.get("fingerprint") == fingerprint
        and (out / "model.onnx").is_file()
    ):
        return meta
    return None


def adapt(
    planning_ct: Path | str,
    planning_rtstruct: Path | str,
    out: Path | str,
    writer: ArtefactWriter,
    *,
    base: Path | str | None = None,
    base_weights: Path | str | None = None,
    options: AdaptOptions | None = None,
    synonyms: SynonymTable | None = None,
    work: Path | str | None = None,
    overwrite: bool = False,
    should_stop: Callable[[], bool] | None = None,
    progress: Callable[[str], None] | None = None,
) -> AdaptResult:
    """Adapt a model to one patient's planning scan and write a model folder (module docstring).

    Args:
        planning_ct: Planning CT series folder.
        planning_rtstruct: Its RTSTRUCT.
        out: Output model version folder (``jrs recontour --model OUT``).
        writer: Writes the exported model (``jrs.model_export.export.ArtefactWriter()``).
        base: Base model version folder (default: the bundled model).
        base_weights: Torch weights of the base (default: found by :func:`resolve_base`).
        options: Budget, fractions, device ... (:class:`AdaptOptions`).
        synonyms: ROI-name synonym table.
        work: Work folder (default ``<out parent>/.<out name>.adapt``); a run with the same work
            folder, planning scan, base and options continues an interrupted one.
        overwrite: Replace an existing ``out`` made from other inputs.
        should_stop: Polled between steps, pairs and phases; True checkpoints and raises
            `AdaptationInterrupted` (a later run continues).
        progress: Called with one line per phase (the command prints them).

    Returns:
        The result: kept or not, why, the metadata written.

    Raises:
        InvalidInput: Bad options, inputs, base model, or an ``out`` holding something else.
        AdaptationInterrupted: ``should_stop`` asked for it.
    """
    opts = options or AdaptOptions()
    opts.check()
    out = Path(out)
    work = Path(work) if work is not None else out.parent / f".{out.name}.adapt"
    stop = should_stop or (lambda: False)
    say = progress or (lambda line: log.info("%s", line))
    budget_s = opts.minutes * 60.0
    t_start = time.monotonic()

    with _locked(work):
        planning = read_planning(planning_ct, planning_rtstruct, synonyms)
        base_model = resolve_base(base, base_weights)
        patch = int(opts.patch_size or base_model.weights.get("patch_size") or 64)
        fingerprint = _fingerprint(planning, base_model, opts, patch)
        done = _done_already(out, fingerprint)
        if done is not None:
            ada = done["adaptation"]
            say(f"already adapted: {out} ({'adapted' if ada.get('kept') else 'base'} model)")
            return AdaptResult(
                out,
                bool(ada.get("kept")),
                str(ada.get("reason")),
                done,
                int(ada.get("steps") or 0),
                float(ada.get("seconds") or 0.0),
                True,
            )
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise InvalidInput(
                f"{out} already holds something other than this adaptation; choose another --out "
                "or pass --overwrite"
            )
        state = _State.load(work, fingerprint)
        resumed = state is not None
        if state is None:
            for child in work.iterdir():
                if child.name != LOCK_FILE:
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
            state = _State(fingerprint)
        else:
            say(f"continuing an interrupted adaptation (phase {state.phase}, step {state.step})")
        state.attempts += 1
        clock = _Clock(state.spent_s)
        state.save(work)

        def phase(name: str) -> None:
            state.phase = name
            state.spent_s = clock.spent()
            state.save(work)
            _write_progress(work, state, budget_s)

        def timed(name: str, t0: float) -> None:
            state.timings[name] = round(state.timings.get(name, 0.0) + time.monotonic() - t0, 2)

        def stop_here() -> bool:
            """``should_stop``, recording the time spent first (the budget counts it)."""
            if not stop():
                return False
            state.spent_s = clock.spent()
            state.save(work)
            return True

        # 1. pairs
        t = time.monotonic()
        if state.phase == "start":
            phase("pairs")
        train_pairs, val_pairs = make_pairs(planning, opts, work / "pairs", stop_here)
        timed("pairs", t)
        say(
            f"{len(train_pairs)} + {len(val_pairs)} synthetic fractions ready "
            f"({state.timings['pairs']:.0f} s)"
        )

        # 2. base validation
        organs = list(planning.known)
        if state.base is None:
            phase("base_validation")
            t = time.monotonic()
            figs = score_model(
                base_model.model_dir,
                val_pairs,
                base_model.path_choice,
                organs,
                device=opts.device,
                engine=opts.engine,
                should_stop=stop_here,
                fusion=base_model.metadata.get("fusion"),
            )
            state.base = figs.as_dict()
            timed("base_validation", t)
            state.save(work)
        base_figs = Figures.from_dict(state.base)
        say(
            f"base model on {len(val_pairs)} held-back fractions: mean DSC "
            f"{base_figs.mean_dsc:.4f} ({base_figs.seconds:.0f} s)"
        )

        # 3. fine-tuning
        if state.phase in ("pairs", "base_validation", "training"):
            state.phase = "training"
        reserve = 1.1 * base_figs.seconds + state.timings.get("export", EXPORT_RESERVE_S) + 5.0
        deadline = budget_s - reserve
        t = time.monotonic()
        if state.phase in ("training", "trained"):
            phase(state.phase)
            trainer = _fine_tune(
                base_model,
                train_pairs,
                opts,
                patch,
                work,
                state,
                clock,
                deadline,
                stop_here,
                budget_s,
            )
            timed("training", t)
            net = trainer.net
            state.device = trainer.device.type
            state.precision = (
                "amp-fp16"
                if trainer.amp
                else ("bf16" if trainer.autocast == torch.bfloat16 else "fp32")
            )
            state.threads = torch.get_num_threads()
            state.save(work)
        else:
            net = None
        device_name, precision, threads = state.device, state.precision, state.threads
        steps = state.step
        steps_per_s = steps / state.timings["training"] if state.timings.get("training") else None
        if state.phase == "trained":
            say(
                f"fine-tuned {steps} steps in {state.timings.get('training', 0.0):.0f} s "
                f"({precision} on {device_name})"
            )

        # 4. export (skipped without a step: the adapted model would be the base)
        candidate = work / "candidate"
        if steps > 0 and net is not None and state.phase == "trained":
            phase("export")
            t = time.monotonic()
            if candidate.exists():
                shutil.rmtree(candidate)
            weighting = {
                "name": trainer.config.weighting.name,
                "state": trainer.weighting.state_dict(),
            }
            writer.write(
                net.cpu().eval(),
                candidate,
                name=f"{base_model.metadata.get('name', 'model')}-patient",
                version=1,
                network=dict(base_model.weights["network"]),
                checkpoint={
                    # no local path in the artefact (it may name the patient's folder)
                    "config": {**trainer.config.resolved(), "output_dir": "adaptation work folder"},
                    "git_sha": trainer.sha,
                    "step": steps,
                    "patch_size": patch,
                    "tasks": list(trainer.tasks),
                    "torch_version": torch.__version__,
                },
                metrics={
                    "path_choice": base_model.path_choice,
                    # the base's pipeline settings: the two are compared as the pipeline runs
                    # each (null correction, field smoothing, network passes)
                    "inference": _inference_of(base_model.metadata),
                    # the base model's fusion method and weights, as validated for it
                    **(
                        {"fusion": base_model.metadata["fusion"]}
                        if base_model.metadata.get("fusion")
                        else {}
                    ),
                },
                weighting=weighting,
            )
            timed("export", t)
            state.phase = "exported"
            state.save(work)

        # 5. validation of the adapted model
        if state.phase == "exported" and state.adapted is None:
            phase("exported")
            t = time.monotonic()
            figs = score_model(
                candidate,
                val_pairs,
                base_model.path_choice,
                organs,
                device=opts.device,
                engine=opts.engine,
                should_stop=stop_here,
                fusion=base_model.metadata.get("fusion"),
            )
            state.adapted = figs.as_dict()
            timed("validation", t)
            state.save(work)

        # 6. decision and the output folder
        adapted_figs = Figures.from_dict(state.adapted) if state.adapted is not None else None
        if adapted_figs is not None:
            kept, reason = decide(base_figs, adapted_figs, opts.tolerance)
        else:
            kept, reason = False, NO_STEP_REASON
        seconds = clock.spent()
        adaptation = {
            "kind": "patient-specific",
            "kept": kept,
            "reason": reason,
            "fingerprint": fingerprint,
            "base": base_model.info(),
            "planning_series_sha256": planning.series_sha256,
            "organs": planning.organs,
            "steps": steps,
            "steps_per_s": None if steps_per_s is None else round(steps_per_s, 4),
            "seconds": round(seconds, 1),
            "budget_s": round(budget_s, 1),
            "attempts": state.attempts,
            "timings_s": dict(state.timings),
            "train_fractions": opts.fractions,
            "validation_fractions": opts.val_fractions,
            "seed": opts.seed,
            "lr": opts.lr,
            "patch_size": patch,
            "device": device_name,
            "precision": precision,
            "threads": threads,
            "validation": {
                "engine": opts.engine,
                "path_choice": base_model.path_choice,
                "tolerance": opts.tolerance,
                "base": base_figs.as_dict(),
                "adapted": adapted_figs.as_dict() if adapted_figs is not None else None,
            },
            "torch_version": torch.__version__,
            "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        }
        meta = _write_output(out, kept, candidate, base_model, adaptation, writer)
        state.phase = "done"
        state.spent_s = seconds
        state.save(work)
        _write_progress(work, state, budget_s, kept=kept)
        say(("kept the ADAPTED model: " if kept else "kept the BASE model: ") + reason)
        if not opts.keep_work:
            for child in work.iterdir():
                if child.name not in (LOCK_FILE, PROGRESS_FILE, STATE_FILE):
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        log.info(
            "adaptation written to %s in %.0f s (this run %.0f s)",
            out,
            seconds,
            time.monotonic() - t_start,
        )
        return AdaptResult(out, kept, reason, meta, steps, seconds, resumed)


def _contiguous(volume: Volume) -> Volume:
    """A copy of a (cropped) volume with its own contiguous array (the crop is a view)."""
    return Volume(np.ascontiguousarray(volume.array), volume.geometry)
