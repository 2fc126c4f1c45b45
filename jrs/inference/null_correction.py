"""Null-field correction: the network's answer to "nothing moved" is subtracted from its field.

A registration network does not return an exactly zero field for two identical scans: trained
networks keep a small systematic response to the moving anatomy (about 2 mm at most for the v3
campaign's checkpoints), and a clinic sees it as contours that move when nothing did. The
correction runs the network a second time with the pre-aligned planning scan as *both* the fixed
and the moving image (the planning labels as usual) and subtracts that null field ``u0`` from the
field of the real pair::

    u(x) = f(I_daily, I_plan, S_plan)(x) - f(I_plan, I_plan, S_plan)(x)

For the same scan twice the two terms are the same computation, so ``u`` is exactly zero and
every contour is returned unchanged: the invariant holds by construction, not by the luck of
training. The null pass costs one more network pass on the same grid. It also segments the
planning scan, which gives a free self-check of the segmentation path on this patient: its Dice
against the clinician's planning contours (reported in ``qa.json``, ``network.null_correction``).

A model's ``metadata.json`` may switch it off (``"null_correction": false``); it is on for every
model otherwise. `jrs.pipeline.options.RecontourOptions.null_correction` overrides the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from jrs.core.labels import LABELS
from jrs.core.metrics import dice
from jrs.inference.backend import Predictor

__all__ = [
    "NullCorrection",
    "null_correct",
    "null_correction_enabled",
    "planning_segmentation_dice",
    "subtract_null",
]


def null_correction_enabled(metadata: Mapping[str, Any], override: bool | None = None) -> bool:
    """Whether the null-field correction applies.

    Args:
        metadata: the model's ``metadata.json`` content; its optional boolean
            ``null_correction`` (absent: on).
        override: the caller's choice (None: the model's).

    Returns:
        True when the correction runs.
    """
    if override is not None:
        return bool(override)
    value = metadata.get("null_correction", True)
    return bool(value) if isinstance(value, bool) else True


@dataclass
class NullCorrection:
    """What the null pass found.

    Attributes:
        max_mm: largest |u0| (mm) inside the body: how far the network moves anatomy that did
            not move (before the correction).
        mean_mm: mean |u0| (mm) inside the body.
        planning_dice: per organ key, Dice of the network's segmentation of the planning scan
            against the pre-aligned planning labels (the segmentation path's self-check on this
            patient); empty without a segmentation output.
        seconds: wall time of the null pass and the subtraction, s.
        source: ``pair`` (the null pass ran on this pair) or ``planning`` (the planning
            scan's null field, `jrs.inference.null_cache`, carried onto the pair).
        cached: the planning null field was read from the on-disk cache.
    """

    max_mm: float
    mean_mm: float
    planning_dice: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    source: str = "pair"
    cached: bool = False

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form (``qa.json``)."""
        return {
            "applied": True,
            "null_field_max_mm": round(self.max_mm, 3),
            "null_field_mean_mm": round(self.mean_mm, 3),
            "planning_segmentation_dice": {k: round(v, 4) for k, v in self.planning_dice.items()},
            "seconds": round(self.seconds, 3),
            "source": self.source,
            "cached": self.cached,
        }


def planning_segmentation_dice(
    scores: npt.NDArray[np.float32] | None, labels: npt.NDArray[Any]
) -> dict[str, float]:
    """Dice of the network's segmentation of the planning scan against its own labels.

    Args:
        scores: (5, nz, ny, nx) logits or probabilities of the null pass, or None.
        labels: (nz, ny, nx) the planning label map on the same grid (ids 0..4).

    Returns:
        Per organ key present in ``labels``, the Dice (empty without ``scores``).
    """
    out: dict[str, float] = {}
    if scores is None:
        return out
    seg = np.argmax(scores, axis=0)
    for lab in sorted(LABELS):
        truth = labels == lab
        if truth.any():
            out[LABELS[lab]] = float(dice(seg == lab, truth))
    return out


def subtract_null(
    u0: npt.NDArray[np.float32],
    dvf: npt.NDArray[np.float32],
    body: npt.NDArray[Any] | None = None,
) -> tuple[npt.NDArray[np.float32], float, float]:
    """``dvf - u0``, and the largest and mean ``|u0|`` inside the body.

    Args:
        u0: (3, nz, ny, nx) the null field, mm.
        dvf: (3, nz, ny, nx) the network's pull field of the real pair, mm.
        body: (nz, ny, nx) body mask of the fixed scan (None: everywhere).

    Returns:
        The corrected field (float32, mm), max and mean ``|u0|`` (mm).

    Raises:
        ValueError: When the shapes differ.
    """
    if u0.shape != dvf.shape:
        raise ValueError(f"null field shape {u0.shape} differs from the field's {dvf.shape}")
    mag = np.sqrt((u0**2).sum(axis=0))
    inside = mag[body > 0] if body is not None and np.any(body) else mag.ravel()
    corrected = np.subtract(np.asarray(dvf, np.float32), u0, dtype=np.float32)
    return (
        corrected,
        float(inside.max()) if inside.size else 0.0,
        float(inside.mean()) if inside.size else 0.0,
    )


def null_correct(
    backend: Predictor,
    moving: npt.NDArray[np.float32],
    moving_labels: npt.NDArray[np.float32],
    dvf: npt.NDArray[np.float32],
    body: npt.NDArray[Any] | None = None,
) -> tuple[npt.NDArray[np.float32], NullCorrection]:
    """Subtract the network's null field from its field (the null pass run on this pair).

    Args:
        backend: the loaded network (`jrs.inference.backend.NetworkBackend`).
        moving: (nz, ny, nx) pre-aligned planning CT on the network grid, network intensities.
        moving_labels: (nz, ny, nx) pre-aligned planning label map (ids 0..4 as float).
        dvf: (3, nz, ny, nx) the network's pull field of the real pair, channels x, y, z, mm.
        body: (nz, ny, nx) body mask of the fixed scan for the statistics (None: everywhere).

    Returns:
        The corrected (3, nz, ny, nx) field (float32, mm) and the null pass's figures.
    """
    import time

    t0 = time.perf_counter()
    null = backend.predict(moving, moving, moving_labels)
    u0 = np.asarray(null.dvf, np.float32)
    corrected, max_mm, mean_mm = subtract_null(u0, dvf, body)
    scores = getattr(null, "seg_logits", None)
    if scores is None:
        scores = getattr(null, "seg_probs", None)
    planning_dice = planning_segmentation_dice(scores, moving_labels)
    del u0
    stats = NullCorrection(
        max_mm=max_mm,
        mean_mm=mean_mm,
        planning_dice=planning_dice,
        seconds=time.perf_counter() - t0,
    )
    return corrected, stats
