"""What a patient-specific adaptation is asked to do (`AdaptOptions`), its budgets and boxes."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from jrs.core.errors import InvalidInput, JrsError

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


class AdaptationInterrupted(JrsError):
    """The adaptation was asked to stop; its work folder lets a later run continue."""

    code = "interrupted"


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


def json_safe(value: Any) -> Any:
    """A value with non-finite floats as None and numpy scalars as Python values (for JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return json_safe(value.item())
    return value
