"""Training configuration: a pydantic model read from YAML (one file per network x weighting).

Every section forbids unknown keys, so a typo (``learning_rate:`` for ``lr:``) is an error that
names the key and the file instead of a silently ignored setting. Example
(``training/configs/cross-stitch_equal.yaml``)::

    network: {name: cross-stitch}
    weighting: {name: equal}
    data:
      phantoms: {count: 8, seed: 0, fractions: 3}
      validation: {phantoms: {count: 2, seed: 1000, fractions: 1}}
    iterations: 200000
    output_dir: runs/cross-stitch_equal

Data come from one of three sources: ``root`` (a dataset folder in the ``jrs phantom`` layout,
prepared once and cached), ``phantoms`` (generated in memory by :mod:`jrs.synth`), or
``synthetic`` (tiny moving-blob pairs for smoke tests and CI, no DICOM at all).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from jrs.core.errors import InvalidInput

__all__ = [
    "DataConfig",
    "LossConfig",
    "NetworkConfig",
    "PhantomSource",
    "ScheduleConfig",
    "StoreSource",
    "SyntheticSource",
    "TrainConfig",
    "ValidationConfig",
    "WeightingConfig",
    "load_config",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class NetworkConfig(_Strict):
    """Which network, and constructor overrides passed to ``jrs.training.networks.build``.

    Attributes:
        name: One of ``seg, reg, jrs-reg, dense, sedd, cross-stitch``.
        overrides: E.g. ``{channels: [8, 16, 32]}`` or ``{seg_inputs: [fixed]}``.
    """

    name: str
    overrides: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        names = ("seg", "reg", "jrs-reg", "dense", "sedd", "cross-stitch")
        if v.lower() not in names:
            raise ValueError(f"unknown network {v!r}; expected one of {names}")
        return v.lower()


class WeightingConfig(_Strict):
    """Loss weighting scheme (METHOD.md): ``equal``, ``homoscedastic`` or ``dwa``.

    Attributes:
        name: The scheme.
        temperature: DWA temperature ``T`` (paper: 1).
    """

    name: Literal["equal", "homoscedastic", "dwa"] = "equal"
    temperature: float = Field(default=1.0, gt=0)


class PhantomSource(_Strict):
    """Phantom patients generated in memory by :mod:`jrs.synth`.

    Attributes:
        count: Number of patients.
        seed: Seed of the first patient (patient ``i`` uses ``seed + i``).
        fractions: Daily fractions per patient (fractions ``1..fractions``).
    """

    count: int = Field(ge=1)
    seed: int = 0
    fractions: int = Field(default=1, ge=1)


class SyntheticSource(_Strict):
    """Small synthetic pairs (organ-like blobs that move), for smoke tests without DICOM.

    Attributes:
        count: Number of pairs.
        seed: Seed of the first pair.
        size: Edge of the cubic volume (voxels, 1 mm).
    """

    count: int = Field(ge=1)
    seed: int = 0
    size: int = Field(default=64, ge=24)


class StoreSource(_Strict):
    """A training set built once by ``python -m jrs.training.build_data`` and memory-mapped.

    Attributes:
        path: The store folder (``index.json`` + one folder per pair).
        sources: Keep only these sources (e.g. ``[phantom, real]``); ``None``: all.
        exclude_groups: Patient groups held out (never trained on).
    """

    path: Path
    sources: list[str] | None = None
    exclude_groups: list[str] = Field(default_factory=list)


class ScheduleConfig(_Strict):
    """Learning-rate schedule (METHOD.md allows one for a small compute budget).

    Attributes:
        name: ``constant`` (the paper's fixed lr) or ``cosine`` (linear warm-up, then a cosine
            decay from ``lr`` to ``min_lr`` at ``iterations``).
        warmup: Warm-up steps (lr rises linearly from ``lr / 10``).
        min_lr: Final learning rate of the cosine.
        horizon: Step at which the cosine reaches ``min_lr`` (default: ``iterations``); fix it
            when a campaign is run in stages with growing ``iterations``.
    """

    name: Literal["constant", "cosine"] = "constant"
    warmup: int = Field(default=0, ge=0)
    min_lr: float = Field(default=1e-5, ge=0)
    horizon: int | None = Field(default=None, ge=1)


class LossConfig(_Strict):
    """Options of the task losses (METHOD.md, Losses; the defaults are the paper's formulas).

    Attributes:
        reg_dice_classes: Classes of ``L_regDSC`` per level and sample: ``known`` (every class
            delineated in the scan, the paper's mean; a class outside the patch adds a constant)
            or ``present`` (only the classes that occur in the level's region of the fixed or
            moving labels; a documented deviation, see ``jrs.training.losses.reg_dsc_loss``).
    """

    reg_dice_classes: Literal["known", "present"] = "known"


class ValidationConfig(_Strict):
    """Held-out pairs and how often to validate.

    Attributes:
        patients: Patient folder names held out from ``data.root`` (used for validation only).
        phantoms: Held-out phantoms (seeds must differ from the training ones).
        synthetic: Held-out synthetic pairs.
        store: Held-out pairs of a built store (e.g. ``sources: [validation]``).
        every: Validate every this many steps (0: never).
        window: Input window of the whole-scan tiled inference (multiple of 4, >= 44).
        max_pairs: Validate on at most this many pairs.
    """

    patients: list[str] = Field(default_factory=list)
    phantoms: PhantomSource | None = None
    synthetic: SyntheticSource | None = None
    store: StoreSource | None = None
    every: int = Field(default=1000, ge=0)
    window: int = 96
    max_pairs: int = Field(default=8, ge=1)

    @field_validator("window")
    @classmethod
    def _window(cls, v: int) -> int:
        if v < 44 or v % 4:
            raise ValueError(f"validation window must be a multiple of 4 and >= 44, got {v}")
        return v


class DataConfig(_Strict):
    """Where the training pairs come from (exactly one source).

    Attributes:
        root: Dataset folder in the ``jrs phantom`` layout.
        patients: Restrict training to these patients of ``root`` (default: all but validation).
        phantoms: Generate phantoms in memory.
        synthetic: Synthetic blob pairs.
        store: A built, memory-mapped training set.
        identity_share: Share of drawn slots that are identity pairs (same scan twice).
        synthmorph_share: Share of slots that are domain-randomised pairs (SynthMorph).
        cache_dir: Cache of prepared pairs (default ``<output_dir>/cache``).
        validation: Held-out data and schedule.
    """

    root: Path | None = None
    patients: list[str] | None = None
    phantoms: PhantomSource | None = None
    synthetic: SyntheticSource | None = None
    store: StoreSource | None = None
    identity_share: float = Field(default=0.0, ge=0, le=1)
    synthmorph_share: float = Field(default=0.0, ge=0, le=1)
    cache_dir: Path | None = None
    validation: ValidationConfig = Field(default_factory=lambda: ValidationConfig())

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        names = ("root", "phantoms", "synthetic", "store")
        given = [k for k in names if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"data needs exactly one of {names}; got {given or 'none'}")
        if self.identity_share + self.synthmorph_share > 1:
            raise ValueError("identity_share + synthmorph_share must not exceed 1")
        return self


class TrainConfig(_Strict):
    """A whole training run.

    Attributes:
        network: Network name and overrides.
        weighting: Loss weighting.
        data: Training and validation data.
        patch_size: Input patch edge ``n`` (multiple of 4, >= 44; paper 96).
        pairs_per_batch: Distinct pairs per batch (2).
        patches_per_pair: Patches drawn per pair.
        swap: Also use each patch swapped (doubles the batch).
        lr: RAdam learning rate (paper 1e-4, fixed).
        iterations: Total optimiser steps.
        steps_per_epoch: Steps that make an "epoch" (DWA updates its weights per epoch).
        seed: Seed of python, numpy, torch and the patch sampler.
        checkpoint_every: Save ``last.pt`` every this many steps.
        checkpoint_minutes: ...and at least every this many minutes of wall time.
        time_budget_minutes: Stop after this many minutes of wall time (at a step boundary, with
            ``last.pt`` saved: ``--resume`` continues); None: run to ``iterations``.
        log_every: Write a CSV / TensorBoard row every this many steps.
        plot_every: Redraw the PNG plots every this many steps (and at the end).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``. Under ``torchrun``
            ``auto`` and ``cuda`` put each process on ``cuda:LOCAL_RANK``.
        workers: Loader processes that draw the patch batches ahead of the training step (0: in
            the training process). The batches do not depend on it (see
            :class:`jrs.training.data.KeyedPatchSampler`), so a run may resume with another count.
        amp: Mixed precision (fp16 autocast + gradient scaling) on CUDA.
        precision: CPU compute precision of the network: ``bf16`` (autocast; losses, loss
            weights and optimiser state stay fp32), ``fp32``, or ``auto`` (bf16 where the CPU has
            AMX or AVX512-BF16, else fp32).
        schedule: Learning-rate schedule.
        losses: Options of the task losses.
        num_threads: CPU threads for torch (``None``: torch's default).
        tensorboard: Also write TensorBoard event files.
        output_dir: Run folder (checkpoints, logs, plots).
    """

    network: NetworkConfig
    weighting: WeightingConfig = Field(default_factory=lambda: WeightingConfig())
    data: DataConfig
    patch_size: int = 96
    pairs_per_batch: int = Field(default=2, ge=1)
    patches_per_pair: int = Field(default=1, ge=1)
    swap: bool = True
    lr: float = Field(default=1e-4, gt=0)
    iterations: int = Field(default=200_000, ge=0)
    steps_per_epoch: int = Field(default=1000, ge=1)
    seed: int = 0
    checkpoint_every: int = Field(default=1000, ge=1)
    checkpoint_minutes: float = Field(default=30.0, gt=0)
    time_budget_minutes: float | None = Field(default=None, gt=0)
    log_every: int = Field(default=1, ge=1)
    plot_every: int = Field(default=5000, ge=1)
    device: str = "auto"
    workers: int = Field(default=0, ge=0)
    amp: bool = True
    precision: Literal["auto", "fp32", "bf16"] = "fp32"
    schedule: ScheduleConfig = Field(default_factory=lambda: ScheduleConfig())
    losses: LossConfig = Field(default_factory=lambda: LossConfig())
    num_threads: int | None = Field(default=None, ge=1)
    tensorboard: bool = True
    output_dir: Path = Path("runs/default")

    @field_validator("patch_size")
    @classmethod
    def _patch(cls, v: int) -> int:
        if v < 44 or v % 4:
            raise ValueError(f"patch_size must be a multiple of 4 and >= 44, got {v}")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N (N a GPU index), got {v!r}")
        return v

    def resolved(self) -> dict[str, Any]:
        """The configuration as plain JSON-able data (stored in checkpoints)."""
        return self.model_dump(mode="json")


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown key '{loc}' (not a setting of this section)")
        elif err["type"] == "missing":
            lines.append(f"missing required key '{loc}'")
        else:
            lines.append(f"'{loc}': {err['msg']} (got {err.get('input')!r})")
    return f"{source}: invalid training config: " + "; ".join(lines)


def parse_config(data: dict[str, Any], source: str = "<config>") -> TrainConfig:
    """Validate a configuration mapping.

    Args:
        data: The parsed YAML mapping.
        source: Name of its origin, for messages.

    Returns:
        The validated config.

    Raises:
        InvalidInput: Naming every unknown key, missing key or bad value and the source.
    """
    if not isinstance(data, dict):
        raise InvalidInput(f"{source}: a training config must be a YAML mapping")
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(_format_errors(exc, source)) from exc


def load_config(path: Path | str, **overrides: Any) -> TrainConfig:
    """Read and validate a YAML training config.

    Args:
        path: The YAML file.
        **overrides: Top-level keys replacing the file's values (e.g. ``iterations=10``,
            ``output_dir=...``); ``None`` values are ignored.

    Returns:
        The validated config; a relative ``output_dir`` stays relative to the working directory.

    Raises:
        InvalidInput: For a missing or unreadable file, bad YAML or an invalid config.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"{path}: training config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InvalidInput(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise InvalidInput(f"{path}: a training config must be a YAML mapping")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return parse_config(data, str(path))
