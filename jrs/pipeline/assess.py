"""The QA stage of a run: per structure its figures and flags, and the field's flags.

Image evidence per organ (model-independent: the daily CT against the planning CT mapped onto
it, inside each organ's box), the fit of each contour to the daily CT's edges, how far off the
mapping is around each contour (`residual_shift`), the two paths' and the two methods'
agreement, the Jacobian inside each organ; then the flags (`jrs.qa.figures.flag_structure`) and
the flags shared by one organ's contours (`jrs.qa.family`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from jrs.core.geometry import Volume
from jrs.core.labels import LABELS, is_external_roi, is_target_volume
from jrs.core.metrics import dice, surface_distances, volume_cc
from jrs.inference.preprocess import HU_SCALE
from jrs.pipeline.front import Inputs, Organs, Prepared
from jrs.pipeline.mapping import Choice, MappingField
from jrs.pipeline.methods import NetworkPaths
from jrs.pipeline.options import RecontourOptions
from jrs.qa.contour_fit import contour_fit
from jrs.qa.family import flag_same_organ
from jrs.qa.figures import StructureQa, flag_dvf, flag_structure, qa_reference_paths
from jrs.qa.image_evidence import image_evidence, structure_evidence
from jrs.qa.residual_shift import (
    RESIDUAL_BAND_MM,
    RESIDUAL_RANGE_MM,
    RESIDUAL_SMOOTH_MM,
    residual_shift,
)
from jrs.registration.boxes import nonzero_box, sub_grid, touches_border
from jrs.registration.propagation import mask_on_grid


@dataclass
class Assessment:
    """The QA of a run: one record per structure, the field's flags, the ROI roles."""

    structures: list[StructureQa]
    dvf_flags: list[str]
    outline: set[str]
    types: dict[str, str]

    @property
    def flagged(self) -> list[str]:
        """Names of the flagged structures."""
        return [s.name for s in self.structures if s.flags]


def assess(
    inputs: Inputs,
    organs: Organs,
    prepared: Prepared,
    paths: NetworkPaths,
    choice: Choice,
    field: MappingField,
    daily_masks: Mapping[str, npt.NDArray[np.bool_]],
    reference: npt.NDArray[np.uint8] | None,
    metadata: Mapping[str, Any],
    opts: RecontourOptions,
) -> Assessment:
    """Figures and flags of every daily contour, and of the field.

    Args:
        inputs: the run's inputs (the daily and planning CTs, the structure set).
        organs: the ROI-to-organ mapping.
        prepared: the network box with both scans on it.
        paths: the method's paths on the network grid.
        choice: the chosen organ labels and their sources.
        field: the mapping (its box field and the full transform).
        daily_masks: ROI name -> (nz, ny, nx) mask on the daily CT.
        reference: the other method's organ labels on the network grid (None: none).
        metadata: the model's ``metadata.json`` content (empty for the iterative method alone).
        opts: the run's options (QA thresholds).
    """
    pair, used, chosen = prepared.pair, organs.used, choice.chosen
    structure_set = inputs.structure_set
    daily, planning = inputs.daily, inputs.planning
    daily_geom = daily.volume.geometry
    organ_of_name = {name: lab for lab, name in used.items()}
    evidence = image_evidence(
        pair.fixed,
        pair.moving,
        field.u_box.array,
        pair.grid,
        chosen,
        pair.moving_labels,
        used,
        hu_per_unit=HU_SCALE,
    )
    # does each organ's contour sit on the daily CT's edges? (a wrong planning contour,
    # faithfully propagated, does not)
    for lab in used:
        evidence.setdefault(lab, {}).update(
            contour_fit(pair.fixed, chosen == lab, pair.grid, hu_per_unit=HU_SCALE)
        )
    # the other ROIs (PTV, femoral heads, ...), the patient's outline aside: the scans'
    # agreement around each on the network grid, its fit to the edges on the daily CT
    outline = {r.name for r in structure_set.rois if is_external_roi(r.name, r.interpreted_type)}
    types = {r.name: r.interpreted_type for r in structure_set.rois if r.interpreted_type}
    roi_evidence: dict[str, dict[str, Any]] = {}
    for name, daily_mask in daily_masks.items():
        if name in organ_of_name or name in outline or not daily_mask.any():
            continue
        on_grid = mask_on_grid(daily_mask, daily_geom, pair.grid)
        figures = image_evidence(
            pair.fixed,
            pair.moving,
            field.u_box.array,
            pair.grid,
            on_grid,
            np.zeros_like(on_grid),
            [1],
            hu_per_unit=HU_SCALE,
        ).get(1, {})
        if not is_target_volume(name, types.get(name, "")):
            # a target volume is a margin in tissue: it has no edge of its own to fit
            figures.update(contour_fit(daily.volume.array, daily_mask, daily_geom))
        roi_evidence[name] = figures
    # how far off is the mapping around each contour (organs and other ROIs alike)?
    residuals = residual_shifts(
        daily.volume,
        planning.volume,
        field.full,
        {n: m for n, m in daily_masks.items() if n not in outline},
    )
    family = {d.roi: d.organ for d in organs.mapping.decisions if d.organ}
    default_source = "iterative" if opts.method == "iterative" else "registration"
    structures: list[StructureQa] = []
    for name, daily_mask in daily_masks.items():
        organ_label = organ_of_name.get(name)
        agreement = _agreement(organ_label, paths, choice, reference, pair.grid, metadata)
        qa_item = StructureQa(
            name=name,
            organ=LABELS[organ_label] if organ_label is not None else None,
            source=choice.sources.get(organ_label, default_source)
            if organ_label is not None
            else default_source,
            planning_cc=round(
                volume_cc(inputs.planning_masks[name].array, planning.volume.geometry), 3
            ),
            daily_cc=round(volume_cc(daily_mask, daily_geom), 3),
            target_volume=organ_label is None and is_target_volume(name, types.get(name, "")),
            jacobian=field.organ_jacobian.get(name),
            **agreement,
            **structure_evidence(
                evidence.get(organ_label) if organ_label is not None else roi_evidence.get(name)
            ),
            **residuals.get(name, {}),
            organ_family=family.get(name),
        )
        structures.append(flag_structure(qa_item, opts.thresholds))
    # a mapping in doubt around one contour of an organ is in doubt for its other contours
    flag_same_organ(structures)
    return Assessment(structures, flag_dvf(field.jacobian, opts.thresholds), outline, types)


def _agreement(
    organ_label: int | None,
    paths: NetworkPaths,
    choice: Choice,
    reference: npt.NDArray[np.uint8] | None,
    grid: Any,
    metadata: Mapping[str, Any],
) -> dict[str, Any]:
    """An organ's two paths' and two methods' agreement (DSC, MSD mm) and its box contact."""
    out: dict[str, Any] = {
        "path_dice": None,
        "path_msd_mm": None,
        "touches_crop_border": False,
        "paths_validated": True,
        "method_dice": None,
        "method_msd_mm": None,
    }
    if organ_label is None:
        return out
    both_valid = len(qa_reference_paths(metadata, LABELS[organ_label])) == 2
    # a fused contour is made of both paths: their disagreement is worth a look
    out["paths_validated"] = both_valid or choice.sources.get(organ_label) == "fusion"
    if paths.segmentation is not None:
        seg_mask = paths.segmentation == organ_label
        reg_mask = paths.registration == organ_label
        out["path_dice"] = round(dice(seg_mask, reg_mask), 4)
        out["path_msd_mm"] = _finite(surface_distances(seg_mask, reg_mask, grid).msd)
    out["touches_crop_border"] = touches_border(choice.chosen == organ_label)
    if reference is not None:
        own, theirs = choice.chosen == organ_label, reference == organ_label
        out["method_dice"] = round(dice(own, theirs), 4)
        out["method_msd_mm"] = _finite(surface_distances(own, theirs, grid).msd)
    return out


def _finite(msd: float) -> float | None:
    return round(msd, 3) if math.isfinite(msd) else None


def residual_shifts(
    daily: Volume,
    planning: Volume,
    full: sitk.Transform,
    masks: Mapping[str, npt.NDArray[np.bool_]],
) -> dict[str, dict[str, Any]]:
    """`residual_shift` of each daily contour, the planning CT mapped onto one box around all.

    Args:
        daily: the daily CT (HU).
        planning: the planning CT (HU).
        full: daily point -> planning point (the final mapping, pre-alignment included).
        masks: ROI name -> (nz, ny, nx) contour on the daily grid.

    Returns:
        ROI name -> its `residual_shift` figures (non-empty contours only).
    """
    present = {name: m for name, m in masks.items() if m.any()}
    if not present:
        return {}
    geom = daily.geometry
    pad_mm = RESIDUAL_BAND_MM + RESIDUAL_RANGE_MM + 3.0 * RESIDUAL_SMOOTH_MM + 2.0
    pad = np.ceil(pad_mm / np.asarray(geom.spacing, float)[::-1]).astype(int)
    boxes = [b for b in (nonzero_box(m) for m in present.values()) if b is not None]
    z, y, x = (
        slice(
            max(min(b[i].start for b in boxes) - int(pad[i]), 0),
            min(max(b[i].stop for b in boxes) + int(pad[i]), geom.shape[i]),
        )
        for i in range(3)
    )
    box = (z, y, x)
    sub = sub_grid(geom, box)
    mapped = planning.resample(sub, "linear", -1000.0, transform=full).array
    image = np.asarray(daily.array[box])
    return {name: residual_shift(image, mapped, m[box], sub) for name, m in present.items()}
