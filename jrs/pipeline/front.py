"""The first stages of a run: read, labels, pre-alignment and the network box (``prepare``).

Each stage takes what the previous ones made and returns a small record of its own; the timings
of `StageClock` go into ``qa.json``. The daily CT is read beside the planning CT and RTSTRUCT,
and the whole-body pre-alignment (one thread: deterministic) starts as soon as both CTs are read,
while the planning ROIs are rasterised; the bones' rigid match runs beside the focused match.
Errors come in the order of the stages: a refused case raises before a background result is
awaited.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from jrs.core.errors import InvalidInput
from jrs.core.geometry import Volume
from jrs.core.labels import SynonymTable, label_map_from_mapping
from jrs.inference.preprocess import PreparedPair, prepare_pair
from jrs.io.ct import read_ct_series
from jrs.io.rtstruct import masks_from_files
from jrs.io.series import CTSeries
from jrs.pipeline.options import FAR_FIELD_MODES, RecontourOptions
from jrs.qa.plausibility import Finding, check_coverage, check_planning, enforce
from jrs.registration.boxes import crop, index_box, organ_box
from jrs.registration.composition import full_transform
from jrs.registration.far_field import INSET_MM, FarField, bony_prealign, far_field_transform
from jrs.registration.focus import FocusReport, prealign_pair
from jrs.registration.prealign import AffineResult, affine_prealign
from jrs.registration.propagation import propagation_region

log = logging.getLogger(__name__)


@dataclass
class StageClock:
    """Wall time per stage, seconds (``qa.json`` ``timings_s``)."""

    times: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    _last: float = field(default_factory=time.perf_counter)

    def lap(self, stage: str) -> None:
        """Record the time since the previous lap (or the start) as ``stage``'s."""
        now = time.perf_counter()
        self.times[stage] = round(now - self._last, 4)
        self._last = now

    def total(self) -> None:
        """Record the whole run's time as ``total``."""
        self.times["total"] = round(time.perf_counter() - self.started, 4)


@dataclass
class Inputs:
    """The three inputs, read and checked; the whole-body pre-alignment still running."""

    daily: CTSeries
    planning: CTSeries
    structure_set: Any
    planning_masks: dict[str, Volume]
    whole_body: Future[AffineResult]


def read_inputs(
    planning_ct: Path | str, planning_rtstruct: Path | str, daily_ct: Path | str
) -> Inputs:
    """Read the planning CT and RTSTRUCT and the daily CT; start the whole-body pre-alignment.

    Raises:
        JrsError: an input is unreadable or inconsistent (the message names the file).
    """
    background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jrs-pipeline")
    daily_job = background.submit(read_ct_series, daily_ct)
    prealign_jobs: list[Future[AffineResult]] = []

    def start_prealign(planning_series: CTSeries) -> None:
        prealign_jobs.append(
            background.submit(
                lambda: affine_prealign(daily_job.result().volume, planning_series.volume)
            )
        )

    structure_set, planning, planning_masks = masks_from_files(
        planning_ct, planning_rtstruct, on_ct=start_prealign
    )
    daily = daily_job.result()
    background.shutdown(wait=False)
    return Inputs(daily, planning, structure_set, planning_masks, prealign_jobs[0])


@dataclass
class Organs:
    """ROI names mapped to organs, the plausibility findings, and the labels the box is made of."""

    mapping: Any
    findings: list[Finding]
    planning_labels: Volume
    box_labels: Volume

    @property
    def used(self) -> dict[int, str]:
        """Label id -> the ROI name that gives it."""
        return dict(self.mapping.used)


def resolve_organs(inputs: Inputs, opts: RecontourOptions) -> Organs:
    """Map ROI names to organs (synonym table) and refuse a case the method cannot handle.

    Raises:
        InvalidInput: a plausibility check refuses the planning contours.
    """
    planning = inputs.planning
    mapping = (opts.synonyms or SynonymTable()).resolve(inputs.planning_masks)
    mapping.log(log)
    pgrid = planning.volume.geometry
    findings = enforce(
        check_planning(inputs.planning_masks, mapping, pgrid, planning.volume, opts.plausibility),
        opts.method,
    )
    if mapping.used:
        arrays = {k: v.array for k, v in inputs.planning_masks.items()}
        planning_labels = planning.volume.with_array(label_map_from_mapping(arrays, mapping)[0])
        box_labels = planning_labels
    else:  # iterative, no organ: register around the other ROIs, propagate them all
        planning_labels = planning.volume.with_array(np.zeros(pgrid.shape, np.uint8))
        box_labels = propagation_region(
            inputs.structure_set, inputs.planning_masks, planning.volume
        )
    return Organs(mapping, list(findings), planning_labels, box_labels)


@dataclass
class Alignment:
    """The pre-alignment the network box follows, and the bones' match still running."""

    whole_body: AffineResult
    prealign: AffineResult
    focus: FocusReport | None
    bony: Future[Any] | None


def align(inputs: Inputs, organs: Organs, opts: RecontourOptions) -> Alignment:
    """Whole-body, then (by default) prostate-centred pre-alignment; coverage checks.

    Raises:
        InvalidInput: an unknown far-field mode, or the organs leave the daily CT.
    """
    whole = inputs.whole_body.result()
    prealign, focus = prealign_pair(
        inputs.daily.volume,
        inputs.planning.volume,
        organs.planning_labels,
        opts.prealign,
        start=whole,
    )
    if opts.far_field not in FAR_FIELD_MODES:
        raise InvalidInput(
            f"far field {opts.far_field!r} unknown; use one of {', '.join(FAR_FIELD_MODES)}"
        )
    # the bones' rigid match, for the mapping far from the network box (`far_field`)
    bony = None
    if opts.far_field == "bony":
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jrs-far-field")
        bony = pool.submit(bony_prealign, inputs.daily.volume, inputs.planning.volume, whole)
        pool.shutdown(wait=False)
    if focus is None and opts.prealign == "prostate":
        log.info("no prostate or seminal vesicles: the whole-body pre-alignment is kept")
    organs.findings += enforce(
        check_coverage(
            inputs.planning_masks,
            organs.mapping,
            inputs.planning.volume.geometry,
            prealign.transform,
            inputs.daily.volume.geometry,
            opts.plausibility,
        ),
        opts.method,
    )
    return Alignment(whole, prealign, focus, bony)


@dataclass
class Prepared:
    """The network box with both scans on it, and the far field around it."""

    box: tuple[np.ndarray, np.ndarray]
    pair: PreparedPair
    far: FarField | None
    far_record: dict[str, Any]
    far_transform: sitk.Transform | None
    far_reach_mm: float
    outer: sitk.Transform | None


def prepare(
    inputs: Inputs, organs: Organs, alignment: Alignment, opts: RecontourOptions
) -> Prepared:
    """Cut the network box around the pre-aligned organs; blend in the bones' match outside it."""
    daily, planning = inputs.daily, inputs.planning
    prealign = alignment.prealign
    box = organ_box(organs.box_labels, prealign.transform, daily.volume.geometry, opts.margin_mm)
    # only the planning region the box's pre-aligned image covers is ever sampled
    corners = np.array(
        [
            [x, y, z]
            for x in (box[0][0], box[1][0])
            for y in (box[0][1], box[1][1])
            for z in (box[0][2], box[1][2])
        ]
    )
    reached = np.array([prealign.transform.TransformPoint(tuple(map(float, p))) for p in corners])
    pgeom = planning.volume.geometry
    footprint = index_box(pgeom, reached, 2.0 * float(pgeom.spacing.max()) + 2.0)
    planning_ct_box = planning.volume if footprint is None else crop(planning.volume, footprint)
    labels = organs.planning_labels
    planning_labels_box = labels if footprint is None else crop(labels, footprint)
    pair = prepare_pair(
        daily.volume, planning_ct_box, planning_labels_box, box=box, prealign=prealign
    )
    far: FarField | None = None
    far_record: dict[str, Any] = {}
    if alignment.bony is not None:
        far_map, bony_report = alignment.bony.result()
        far_record["bony"] = bony_report.as_dict()
        far_record["matrix"] = list(far_map.GetMatrix())
        far_record["translation_mm"] = list(far_map.GetTranslation())
        far_record["center_mm"] = list(far_map.GetCenter())
        # the blend starts inside the box, around the organs, and reaches the bony match
        # outside it: the network's field is weighted down towards the box's faces
        box_corners = pair.grid.corners()
        inset = min(INSET_MM, 2.0 * opts.margin_mm / 3.0)
        far = FarField(
            prealign.transform,
            far_map,
            box_corners.min(axis=0) + inset,
            box_corners.max(axis=0) - inset,
            daily.volume.geometry,
        )
    far_tx = far_field_transform(far)
    far_reach = far.reach_mm() if far is not None else 0.0
    outer = full_transform(prealign.transform, None, far_tx) if far_tx is not None else None
    return Prepared(box, pair, far, far_record, far_tx, far_reach, outer)


def planning_box(inputs: Inputs, organs: Organs, opts: RecontourOptions) -> Any:
    """The planning scan's own network box (identity pre-alignment): its null pass's box."""
    return organ_box(
        organs.box_labels, sitk.AffineTransform(3), inputs.planning.volume.geometry, opts.margin_mm
    )
