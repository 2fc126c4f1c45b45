"""The inference settings an export writes into ``metadata.json``, from held-out metrics.

Per organ, the output path the pipeline uses (``path_choice``), the paths validated for output and
those whose disagreement is a QA signal, the fusion weights, and how the pipeline runs the network
(null-field correction, field smoothing, passes). Read by the export and by the model card.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from jrs.core.errors import InvalidInput
from jrs.core.labels import LABELS
from jrs.inference.cascade import network_passes
from jrs.inference.fusion import FusionSpec, weights_from_dice
from jrs.inference.smoothing import field_smoothing_sigma
from jrs.qa.figures import qa_reference_paths

#: Path names of the validation DSC figures, and the names they may go by.
_PATH_NAMES: dict[str, str] = {
    "segmentation": "segmentation",
    "seg": "segmentation",
    "registration": "registration",
    "reg": "registration",
    "fusion": "fusion",
    "fused": "fusion",
}
#: What the pipeline accepts as a path choice.
PATH_CHOICES: tuple[str, ...] = ("segmentation", "registration", "fusion")
#: The rule of the ``weighted`` fusion weights, as written to ``metadata.json``.
FUSION_WEIGHT_RULE = (
    "w_seg = DSC_seg / (DSC_seg + DSC_reg), w_reg = 1 - w_seg, from each path's validation DSC "
    "of the organ (0.5 / 0.5 when both are 0); organs without figures use 0.5 / 0.5"
)


def path_dsc(metrics: Mapping[str, Any] | None) -> dict[str, dict[str, float]]:
    """Each output path's validation DSC per organ, as the metrics give them.

    Read from ``metrics["path_dsc"]`` (path -> organ key -> mean DSC; paths ``segmentation``,
    ``registration``, ``fusion``, or ``seg``, ``reg``, ``fused``), else from flat keys
    ``dice_<path>_<organ>`` (the names of the trainer's validation, ``validation.csv``). A
    figure that is None or NaN counts as missing.

    Args:
        metrics: the held-out metrics given to the export.

    Returns:
        ``{"segmentation" | "registration" | "fusion": {organ: dsc}}`` (empty without figures).

    Raises:
        InvalidInput: For an unknown path or organ, or a DSC that is not a number in [0, 1].
    """
    if not metrics:
        return {}
    found: dict[str, dict[str, Any]] = {}
    table = metrics.get("path_dsc")
    if table is not None:
        if not isinstance(table, Mapping) or not all(
            isinstance(v, Mapping) for v in table.values()
        ):
            raise InvalidInput(
                "metrics 'path_dsc' must map paths (segmentation, registration, fusion) to "
                f"{{organ: DSC}}, got {table!r}"
            )
        for path, per_organ in table.items():
            if path not in _PATH_NAMES:
                raise InvalidInput(
                    f"metrics 'path_dsc' names path {path!r}; use segmentation, registration "
                    "or fusion"
                )
            found.setdefault(_PATH_NAMES[path], {}).update(per_organ)
    else:
        organs = set(LABELS.values())
        for key, value in metrics.items():
            parts = str(key).split("_", 2)
            if len(parts) == 3 and parts[0] == "dice" and parts[1] in _PATH_NAMES:
                # (other dice_* keys, e.g. dice_mean, are not per-path figures)
                if parts[2] not in organs:
                    continue
                found.setdefault(_PATH_NAMES[parts[1]], {})[parts[2]] = value
    out: dict[str, dict[str, float]] = {}
    for path, per_organ in found.items():
        for organ, value in per_organ.items():
            if organ not in LABELS.values():
                raise InvalidInput(
                    f"metrics name organ {organ!r} for the {path} path; use organ keys "
                    f"{', '.join(LABELS.values())}"
                )
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue  # no figure (e.g. an organ absent from the validation scans)
            try:
                dsc = float(value)
            except (TypeError, ValueError):
                dsc = float("nan")
            if not 0.0 <= dsc <= 1.0:
                raise InvalidInput(
                    f"metrics give the {path} path's DSC of {organ} as {value!r}; expected a "
                    "number in [0, 1]"
                )
            out.setdefault(path, {})[str(organ)] = dsc
    return out


def path_choice(metrics: Mapping[str, Any] | None) -> dict[str, str]:
    """Per-organ output path validated on held-out data.

    ``metrics["path_choice"]`` (organ -> ``segmentation``, ``registration`` or ``fusion``) as
    given; for the organs it leaves open, the path with the best validation DSC
    (:func:`path_dsc`): ``fusion`` only when the metrics hold a fused figure and it beats both
    paths, ``registration`` when it beats the segmentation path (ties: ``segmentation``, the
    pipeline's default). The pipeline reads the result from the top level of
    ``metadata.json`` for organs its options leave open.
    """
    choice = (metrics or {}).get("path_choice") or {}
    if not isinstance(choice, Mapping) or any(v not in PATH_CHOICES for v in choice.values()):
        raise InvalidInput(
            f"metrics 'path_choice' must map organ keys to 'segmentation', 'registration' or "
            f"'fusion', got {choice!r}"
        )
    out = {str(k): str(v) for k, v in choice.items()}
    figures = path_dsc(metrics)
    for organ in LABELS.values():
        if organ in out:
            continue
        scores = {p: figures[p][organ] for p in PATH_CHOICES if organ in figures.get(p, {})}
        if not scores.keys() & {"segmentation", "registration"}:
            continue
        paths = [p for p in ("segmentation", "registration") if p in scores]
        best: str = max(paths, key=lambda p: (scores[p], p == "segmentation"))
        if "fusion" in scores and scores["fusion"] > scores[best]:
            best = "fusion"
        out[organ] = best
    return out


#: Gaussian sigma (mm) on the final field that exported models ask for (``dvf_smoothing_mm``):
#: on the step-10,000 checkpoint's 8 held-out cases, 1.5 mm took body folding from at most
#: 0.160 % to none, for at most 0.012 DSC (seminal vesicles; docs/benchmarks.md, "Field
#: smoothing").
DEFAULT_DVF_SMOOTHING_MM = 1.5

#: Network passes that exported models ask for (``network_passes``, `jrs.inference.cascade`): on the
#: step-12,000 checkpoint's 8 held-out cases a second pass raised every organ's DSC of the
#: written contours (phantom bladder 0.888 -> 0.914, the real patient's rectum 0.923 -> 0.933)
#: for about 2.5 s more on 2 cores (docs/benchmarks.md, "Cascaded network passes").
DEFAULT_NETWORK_PASSES = 2

#: A path is vouched for (``validated_paths``) when its validation DSC for the organ is within
#: this margin of the better of the two paths: a working second opinion for the QA's
#: ``path_disagreement`` flag, not a broken path (model v2's segmentation path: DSC 0.00-0.11).
VALIDATED_PATH_MARGIN = 0.05


def validated_path_table(metrics: Mapping[str, Any] | None) -> dict[str, list[str]]:
    """Per organ, the output paths the validation figures vouch for (``validated_paths``).

    A path (``segmentation``, ``registration``) is validated for an organ when the metrics give
    its validation DSC and that DSC is at least the better path's minus
    :data:`VALIDATED_PATH_MARGIN`. Organs without figures are left out: the pipeline then
    vouches for the chosen path alone (:func:`jrs.qa.figures.validated_paths`), and the QA's path
    disagreement stays silent for them.

    Returns:
        Organ key -> sorted list of validated paths (empty dict when the metrics give nothing).
    """
    figures = path_dsc(metrics)
    out: dict[str, list[str]] = {}
    for organ in LABELS.values():
        scores = {
            p: figures[p][organ]
            for p in ("segmentation", "registration")
            if organ in figures.get(p, {})
        }
        if not scores:
            continue
        best = max(scores.values())
        out[organ] = sorted(p for p, v in scores.items() if v >= best - VALIDATED_PATH_MARGIN)
    return out


def qa_reference_path_table(metrics: Mapping[str, Any] | None) -> dict[str, list[str]]:
    """Per organ, the paths whose disagreement is a QA signal (``qa_reference_paths``).

    The validated paths plus every path whose validation DSC for the organ is at least
    :data:`jrs.qa.figures.QA_REFERENCE_MIN_DSC` (:func:`jrs.qa.figures.qa_reference_paths` reads the
    same rule from the figures when a model's metadata lacks the table).

    Returns:
        Organ key -> sorted list of paths (empty dict when the metrics give nothing).
    """
    validated = validated_path_table(metrics)
    if not validated:
        return {}
    meta = {"validated_paths": validated, "metrics": {"path_dsc": path_dsc(metrics)}}
    return {organ: sorted(qa_reference_paths(meta, organ)) for organ in validated}


def inference_settings(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """The pipeline settings of ``metadata.json`` (null correction, smoothing, passes).

    The keys are ``null_correction``, ``dvf_smoothing_mm`` and ``network_passes``. Exported
    models get the defaults (on, `DEFAULT_DVF_SMOOTHING_MM`, `DEFAULT_NETWORK_PASSES`);
    ``metrics["inference"]`` overrides any of them, e.g. a patient model adapted from a base
    keeps the base's settings, so that the two are compared as the pipeline runs each.

    Raises:
        InvalidInput: ``metrics["inference"]`` is not a mapping, names another key, or a value
            is out of range.
    """
    out: dict[str, Any] = {
        "null_correction": True,
        "dvf_smoothing_mm": DEFAULT_DVF_SMOOTHING_MM,
        "network_passes": DEFAULT_NETWORK_PASSES,
    }
    given = (metrics or {}).get("inference")
    if given is None:
        return out
    if not isinstance(given, Mapping) or set(given) - set(out):
        raise InvalidInput(
            f"metrics 'inference' must map some of {', '.join(out)} to values, got {given!r}"
        )
    if "null_correction" in given:
        if not isinstance(given["null_correction"], bool):
            raise InvalidInput("metrics 'inference' null_correction must be true or false")
        out["null_correction"] = given["null_correction"]
    # the pipeline's own checks of the values (`jrs.inference.smoothing`, `jrs.inference.cascade`)
    try:
        if "dvf_smoothing_mm" in given:
            sigma = given["dvf_smoothing_mm"]
            if isinstance(sigma, bool) or not isinstance(sigma, int | float):
                raise ValueError(f"dvf smoothing sigma {sigma!r} mm: use a number >= 0")
            out["dvf_smoothing_mm"] = field_smoothing_sigma({}, sigma)
        if "network_passes" in given:
            out["network_passes"] = network_passes({}, given["network_passes"])
    except ValueError as exc:
        raise InvalidInput(f"metrics 'inference': {exc}") from exc
    return out


def fusion_settings(metrics: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The ``fusion`` entry of ``metadata.json`` (None when the metrics say nothing of it).

    The method is ``metrics["fusion"]["method"]`` (default ``weighted``); the per-organ weights
    are ``metrics["fusion"]["weights"]`` where given, else derived from each path's validation
    DSC (:func:`path_dsc`) by :func:`jrs.inference.fusion.weights_from_dice`: each path's DSC over
    the sum of both (:data:`FUSION_WEIGHT_RULE`).
    """
    given = (metrics or {}).get("fusion")
    figures = path_dsc(metrics)
    derived = {
        organ: weights_from_dice(dsc, figures["registration"][organ])
        for organ, dsc in figures.get("segmentation", {}).items()
        if organ in figures.get("registration", {})
    }
    if given is None and not derived:
        return None
    spec = FusionSpec.from_json(given, "metrics 'fusion'")
    weights = {**derived, **spec.weights}
    entry = FusionSpec(spec.method, weights).to_json()
    entry["rule"] = (
        FUSION_WEIGHT_RULE
        if not spec.weights
        else "given for " + ", ".join(sorted(spec.weights)) + "; else " + FUSION_WEIGHT_RULE
    )
    return entry
