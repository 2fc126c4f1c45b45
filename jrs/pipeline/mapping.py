"""The middle stages of a run: choose a path per organ, build the mapping, propagate every ROI.

``choose``: per organ the segmentation or the registration path, or their fusion (computed inside
the fused organs' boxes only). ``dvf``: the full field, pre-alignment folded in,
``U(p) = A(p + w(p) u(p)) - p`` with ``u`` the network's field inside its box and ``w`` a taper
to zero at the box's faces (and towards the bony far field outside it), written on the output
grid. ``propagate``: the organs from the chosen labels, every other ROI through the same mapping,
each only where it can land.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from jrs.core.errors import InvalidInput
from jrs.core.geometry import Geometry, Volume
from jrs.core.labels import LABELS
from jrs.inference.backend import NetworkBackend
from jrs.inference.preprocess import PreparedPair
from jrs.pipeline.front import Inputs, Prepared
from jrs.pipeline.methods import NetworkPaths, fuse_paths
from jrs.pipeline.options import PATHS, RecontourOptions
from jrs.qa.figures import jacobian_report
from jrs.registration.boxes import crop, index_box, nonzero_box, sub_grid
from jrs.registration.composition import box_field, composed_field, dvf_grid, full_transform, taper
from jrs.registration.propagation import propagate_mask, with_overlaps


@dataclass
class Choice:
    """The organs' labels on the network grid and, per organ, the path they come from."""

    chosen: npt.NDArray[np.uint8]
    sources: dict[int, str]
    fused: npt.NDArray[np.uint8] | None


def choose_paths(
    paths: NetworkPaths,
    pair: PreparedPair,
    used: Mapping[int, str],
    opts: RecontourOptions,
    backend: NetworkBackend | None,
) -> Choice:
    """Per organ the path the options (else the model's metadata) ask for; fuse where asked.

    Raises:
        InvalidInput: a path choice that is not segmentation, registration or fusion.
    """
    metadata: Mapping[str, Any] = backend.metadata if backend is not None else {}
    model_choice: Mapping[str, str] = metadata.get("path_choice", {})
    wants: dict[int, str] = {}
    for lab in sorted(used):
        organ = LABELS[lab]
        want = opts.path_choice.get(organ, model_choice.get(organ, "segmentation"))
        if want not in PATHS:
            raise InvalidInput(
                f"path choice {want!r} for {organ} unknown; use 'segmentation', 'registration' "
                "or 'fusion'"
            )
        wants[lab] = want
    fused = fuse_paths(
        paths,
        pair,
        [lab for lab, want in wants.items() if want == "fusion" or opts.keep_fusion],
        metadata,
        opts.fusion_method,
    )
    paths.prediction = None  # (the logits are not read any more)
    chosen = np.zeros(pair.grid.shape, np.uint8)
    sources: dict[int, str] = {}
    for lab in sorted(used):
        want = wants[lab]
        if want == "fusion" and fused is not None:
            chosen[fused == lab] = lab
            sources[lab] = "fusion"
            continue
        src = (
            paths.segmentation
            if want == "segmentation" and paths.segmentation is not None
            else paths.registration
        )
        sources[lab] = (
            "iterative"
            if opts.method == "iterative"
            else ("segmentation" if src is paths.segmentation else "registration")
        )
        chosen[src == lab] = lab
    return Choice(chosen, sources, fused)


@dataclass
class MappingField:
    """The whole mapping: the box field, the full transform, the output DVF and its Jacobian."""

    u_box: Volume
    full: sitk.Transform
    reach_mm: float
    out_grid: Geometry
    dvf: Volume
    jacobian: dict[str, float]
    organ_jacobian: dict[str, Any]


def mapping_field(
    paths: NetworkPaths,
    prepared: Prepared,
    prealign: sitk.AffineTransform,
    daily: Geometry,
    used: Mapping[int, str],
    chosen: npt.NDArray[np.uint8],
    opts: RecontourOptions,
) -> MappingField:
    """The full DVF (pre-alignment folded in, tapered box field) and its Jacobian figures."""
    pair, far, far_tx = prepared.pair, prepared.far, prepared.far_transform
    u_taper = paths.dvf * taper(pair.grid)[..., None]
    if far is not None:
        u_taper *= far.weight_on(pair.grid)[..., None]
    reach_mm = float(np.sqrt((u_taper**2).sum(axis=-1)).max()) if u_taper.size else 0.0
    u_box = Volume(u_taper.astype(np.float32, copy=False), pair.grid)
    full = full_transform(prealign, u_box, far_tx)
    out_grid = dvf_grid(daily, opts.dvf_spacing_mm)
    dvf = composed_field(prealign, u_box, out_grid, far=far)
    jac, organ_jac = jacobian_report(
        box_field(
            prealign,
            u_box.array
            if far_tx is None or far is None
            else u_box.array + far.correction(pair.grid.voxel_centres()).astype(np.float32),
            pair.grid,
        ),
        pair.body,
        {name: (LABELS[lab], chosen == lab) for lab, name in used.items()},
        opts.thresholds,
    )
    return MappingField(u_box, full, reach_mm, out_grid, dvf, jac, organ_jac)


def propagate(
    inputs: Inputs,
    prepared: Prepared,
    prealign: sitk.AffineTransform,
    field: MappingField,
    choice: Choice,
    used: Mapping[int, str],
) -> dict[str, npt.NDArray[np.bool_]]:
    """Every planning ROI on the daily CT: organs from the chosen labels, the rest mapped.

    An organ moved by the registration is its own planning contour moved like every other ROI,
    so that it keeps its overlaps with its neighbours (seminal vesicles entering the prostate),
    which a one-label-per-voxel map cuts off. An organ drawn by the network's segmentation (or
    the fusion) comes from the label map, plus its planning overlaps with the other organs, moved
    (`with_overlaps`): the overlaps of the clinician's contours are kept whatever the path.

    Returns:
        ROI name -> (nz, ny, nx) mask on the daily CT grid.
    """
    pair = prepared.pair
    daily_geom = inputs.daily.volume.geometry
    network_box = index_box(daily_geom, pair.grid.corners(), 0.0)
    chosen_daily = np.zeros(daily_geom.shape, np.uint8)
    organs_box = nonzero_box(choice.chosen, 2)
    if organs_box is not None:
        organs = crop(Volume(choice.chosen, pair.grid), organs_box)
        target = index_box(daily_geom, organs.geometry.corners(), 0.0)
        if target is not None:
            chosen_daily[target] = organs.resample(sub_grid(daily_geom, target), "label", 0).array
    drawn = {
        name: lab
        for lab, name in used.items()
        if choice.sources.get(lab) not in ("registration", "iterative")
    }
    masks = inputs.planning_masks
    # the ROIs are resampled two at a time (SimpleITK and numpy release the GIL)
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="jrs-propagate") as pool:
        jobs = {
            name: pool.submit(
                propagate_mask,
                mask,
                daily_geom,
                prealign,
                field.full,
                network_box,
                field.reach_mm,
                prepared.outer,
                prepared.far_reach_mm,
            )
            for name, mask in masks.items()
        }
        moved = {lab: jobs[name].result() for lab, name in used.items()}
        return {
            name: with_overlaps(chosen_daily, drawn[name], moved)
            if name in drawn
            else jobs[name].result()
            for name in masks
        }
