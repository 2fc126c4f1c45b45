"""Scoring a model on a patient's held-back fractions, and the keep-or-discard decision."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from jrs.core.fields import warp
from jrs.core.geometry import Geometry, Volume
from jrs.core.labels import LABELS
from jrs.core.metrics import dice, surface_distances
from jrs.inference import load_model
from jrs.inference.cascade import network_passes, refine
from jrs.inference.fusion import FusionSpec, fuse_network_paths, softmax_source
from jrs.inference.null_correction import null_correct, null_correction_enabled
from jrs.inference.postprocess import keep_largest_components
from jrs.inference.smoothing import field_smoothing_sigma, smooth_field
from jrs.training.adapt_options import AdaptationInterrupted, json_safe
from jrs.training.data import TrainingPair

log = logging.getLogger(__name__)


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
        return json_safe(asdict(self) | {"mean_dsc": self.mean_dsc})

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


# ------------------------------------------------------------------------------ scoring
def inference_of(metadata: Mapping[str, Any]) -> dict[str, Any]:
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
                paths["fusion"] = fused_labels(paths, pred, pair, dvf, geo, fused, fusion)
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


def fused_labels(
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
