"""Planning CT + RTSTRUCT + daily CT -> daily RTSTRUCT, DVF, DICOM REG, QA and review figure.

The one function the command line, batch re-contouring and the REST service all call:
`recontour`. Stages (each timed in ``qa.json``):

1. read: planning CT, planning RTSTRUCT (checked against the planning CT), daily CT;
2. labels: map the planning ROI names to the label table (synonym table);
3. prealign: rigid then affine registration of the planning CT onto the daily CT (or, by
   default, rigid then a rigid match centred on the prostate: `jrs.registration.focus`);
4. prepare: a box around the pre-aligned organs (+ margin) on the 1 mm canonical grid, both scans
   and the planning labels resampled there, intensities normalised;
5. network (or iterative B-spline): both output paths — segmentation (soft-max, arg-max) and
   registration (planning labels warped by the DVF) — post-processed (largest components);
6. choose: per organ, the segmentation or the registration path, or their fusion
   (`jrs.inference.fusion`, computed inside the fused organs' boxes only) (configurable; by default
   the model's validated choice);
7. dvf: the full field, pre-alignment folded in:
   ``U(p) = A(p + w(p) u(p)) - p`` with ``u`` the network DVF inside the box and ``w`` a taper that
   brings it smoothly to zero at the box border (outside, the field is the affine alone). It is
   written on a grid over the daily CT with :data:`DEFAULT_DVF_SPACING_MM` (3 mm) spacing by
   default (``dvf_spacing_mm``; an axis whose CT spacing is coarser keeps the CT's), or on the
   daily CT grid itself on request (``dvf_spacing_mm=None``): a 174 x 512 x 512 daily CT gives
   547 MB per file on its own grid and about 25 MB at 3 mm. The affine part is linear, so
   trilinear interpolation of the coarse grid reproduces it exactly; the network part is smooth
   (docs/benchmarks.md gives the measured difference from the full-grid field inside the body);
8. propagate: every other planning ROI (PTV, femoral heads, body, ...) through the same mapping,
   each warped only inside its own bounding box (the affine alone outside the network box);
9. write: ``rtstruct.dcm``, ``dvf.mha``, ``registration.dcm``, ``qa.json``, ``review.png``.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from jrs.core.errors import InvalidInput, ModelNotReady
from jrs.core.geometry import Volume
from jrs.core.labels import (
    LABELS,
    SynonymTable,
    is_external_roi,
    is_target_volume,
    label_map_from_mapping,
)
from jrs.core.metrics import dice, surface_distances, volume_cc
from jrs.inference.backend import NetworkBackend
from jrs.inference.null_cache import (
    PlanningNull,
    cache_for,
    planning_null,
)
from jrs.inference.preprocess import HU_SCALE, prepare_pair
from jrs.pipeline.options import FAR_FIELD_MODES, RecontourOptions, RecontourResult
from jrs.pipeline.stages import (
    fuse_paths,
    json_default,
    load_backend,
    network_reference,
    refine_paths,
    residual_shifts,
    review_crop,
    run_iterative,
    run_model,
)
from jrs.qa.contour_fit import contour_fit
from jrs.qa.family import flag_same_organ
from jrs.qa.figures import (
    StructureQa,
    flag_dvf,
    flag_structure,
    image_evidence,
    jacobian_report,
    qa_reference_paths,
    structure_evidence,
)
from jrs.qa.plausibility import check_coverage, check_planning, enforce
from jrs.registration.boxes import crop, index_box, nonzero_box, organ_box, sub_grid, touches_border
from jrs.registration.composition import box_field, composed_field, dvf_grid, full_transform, taper
from jrs.registration.far_field import INSET_MM, FarField, bony_prealign, far_field_transform
from jrs.registration.focus import prealign_pair
from jrs.registration.instance_optimisation import RefineReport, check_refine_mode
from jrs.registration.prealign import AffineResult, affine_prealign
from jrs.registration.propagation import (
    mask_on_grid,
    planned_on_daily,
    propagate_mask,
    propagation_region,
    with_overlaps,
)

if TYPE_CHECKING:
    from jrs.io.series import CTSeries

log = logging.getLogger(__name__)


def recontour(
    planning_ct: Path | str,
    planning_rtstruct: Path | str,
    daily_ct: Path | str,
    out: Path | str,
    options: RecontourOptions | None = None,
    *,
    backend: NetworkBackend | None = None,
) -> RecontourResult:
    """Re-contour a daily CT from the planning CT and its contours.

    Args:
        planning_ct: folder (or files) of the planning CT series.
        planning_rtstruct: the planning RTSTRUCT file.
        daily_ct: folder of the daily CT series.
        out: output folder (created).
        options: see `RecontourOptions`.
        backend: an already loaded network (the service keeps one); loaded from the options
            when None and the method is ``network``.

    Returns:
        The written files and the QA data.
    """
    from jrs.io.ct import read_ct_series
    from jrs.io.reg import write_deformable_registration
    from jrs.io.rtstruct import masks_from_files, write_rtstruct
    from jrs.qa.review import render_review

    opts = options or RecontourOptions()
    out_dir = Path(out)
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    def lap(stage: str, t0: float) -> float:
        now = time.perf_counter()
        times[stage] = round(now - t0, 4)
        return now

    t = time.perf_counter()
    if opts.method == "network" and backend is None:
        backend = load_backend(opts)
    t = lap("load_model", t)
    # the daily CT is read beside the planning CT and RTSTRUCT, and the pre-alignment (one
    # thread: deterministic) runs beside the label checks; errors come in the order of the
    # stages (a refused case raises before the pre-alignment's result is awaited)
    # the pre-alignment starts as soon as both CTs are read, while the planning ROIs are
    # rasterised (one worker: it runs after the daily read)
    background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jrs-pipeline")
    background_far = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jrs-far-field")
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
    t = lap("read", t)
    prealign_job = prealign_jobs[0]
    background.shutdown(wait=False)

    # ROI names -> organs (shown in the log and qa.json), then the plausibility checks: a case
    # the network cannot handle is refused here (InvalidInput), before any registration
    mapping = (opts.synonyms or SynonymTable()).resolve(planning_masks)
    mapping.log(log)
    pgrid = planning.volume.geometry
    findings = enforce(
        check_planning(planning_masks, mapping, pgrid, planning.volume, opts.plausibility),
        opts.method,
    )
    used = mapping.used
    if used:
        arrays = {k: v.array for k, v in planning_masks.items()}
        planning_labels = planning.volume.with_array(label_map_from_mapping(arrays, mapping)[0])
        box_labels = planning_labels
    else:  # iterative, no organ: register around the other ROIs, propagate them all
        planning_labels = planning.volume.with_array(np.zeros(pgrid.shape, np.uint8))
        box_labels = propagation_region(structure_set, planning_masks, planning.volume)
    t = lap("labels", t)
    whole = prealign_job.result()
    prealign, focus = prealign_pair(
        daily.volume, planning.volume, planning_labels, opts.prealign, start=whole
    )
    if opts.far_field not in FAR_FIELD_MODES:
        raise InvalidInput(
            f"far field {opts.far_field!r} unknown; use one of {', '.join(FAR_FIELD_MODES)}"
        )

    # the bones' rigid match, for the mapping far from the network box
    # (`jrs.registration.far_field`)
    far_job = (
        background_far.submit(bony_prealign, daily.volume, planning.volume, whole)
        if opts.far_field == "bony"
        else None
    )
    if focus is None and opts.prealign == "prostate":
        log.info("no prostate or seminal vesicles: the whole-body pre-alignment is kept")
    findings += enforce(
        check_coverage(
            planning_masks,
            mapping,
            pgrid,
            prealign.transform,
            daily.volume.geometry,
            opts.plausibility,
        ),
        opts.method,
    )
    t = lap("prealign", t)

    box = organ_box(box_labels, prealign.transform, daily.volume.geometry, opts.margin_mm)
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
    planning_labels_box = planning_labels if footprint is None else crop(planning_labels, footprint)
    pair = prepare_pair(
        daily.volume, planning_ct_box, planning_labels_box, box=box, prealign=prealign
    )
    far: FarField | None = None
    far_record: dict[str, Any] = {}
    if far_job is not None:
        far_map, bony_report = far_job.result()
        far_record["bony"] = bony_report.as_dict()
        far_record["matrix"] = list(far_map.GetMatrix())
        far_record["translation_mm"] = list(far_map.GetTranslation())
        far_record["center_mm"] = list(far_map.GetCenter())
        # the blend starts inside the box, around the organs, and reaches the bony match
        # outside it: the network's field is weighted down towards the box's faces
        corners = pair.grid.corners()
        inset = min(INSET_MM, 2.0 * opts.margin_mm / 3.0)
        far = FarField(
            prealign.transform,
            far_map,
            corners.min(axis=0) + inset,
            corners.max(axis=0) - inset,
            daily.volume.geometry,
        )
    background_far.shutdown(wait=False)
    far_tx = far_field_transform(far)
    far_reach = far.reach_mm() if far is not None else 0.0
    outer = full_transform(prealign.transform, None, far_tx) if far_tx is not None else None
    t = lap("prepare", t)

    def planning_null_of(net: NetworkBackend) -> PlanningNull:
        """The planning scan's null field (`jrs.inference.null_cache`), on its box as a pair's."""
        own_box = organ_box(
            box_labels, sitk.AffineTransform(3), planning.volume.geometry, opts.margin_mm
        )
        return planning_null(
            net, planning.volume, planning_labels, own_box, cache_for(opts.cache_dir)
        )

    refine_report = RefineReport(False, reason="not asked for")
    if opts.method == "network":
        if backend is None:  # pragma: no cover - load_backend raises first
            raise ModelNotReady("no network loaded")
        net = backend
        paths = run_model(backend, opts, pair, lambda: planning_null_of(net))
        t = lap("network", t)
        if check_refine_mode(opts.refine) == "on":
            refine_report = refine_paths(paths, pair, used)
            t = lap("refine", t)
    elif opts.method == "iterative":
        paths = run_iterative(pair)
        t = lap("iterative", t)
    else:
        raise InvalidInput(f"method {opts.method!r} unknown; use 'network' or 'iterative'")
    # the iterative method's second opinion: the network's mapping of the same organs
    reference: npt.NDArray[np.uint8] | None = None
    if opts.method == "iterative" and used and opts.method_consensus:
        reference = network_reference(backend, opts, pair, planning_null_of)
        t = lap("reference", t)

    # choose a path per organ (or fuse the two, inside the fused organs' boxes: `fuse_paths`)
    model_choice: Mapping[str, str] = (
        backend.metadata.get("path_choice", {}) if backend is not None else {}
    )
    wants: dict[int, str] = {}
    for lab in sorted(used):
        organ = LABELS[lab]
        want = opts.path_choice.get(organ, model_choice.get(organ, "segmentation"))
        if want not in ("segmentation", "registration", "fusion"):
            raise InvalidInput(
                f"path choice {want!r} for {organ} unknown; use 'segmentation', 'registration' "
                "or 'fusion'"
            )
        wants[lab] = want
    fused = fuse_paths(
        paths,
        pair,
        [lab for lab, want in wants.items() if want == "fusion" or opts.keep_fusion],
        backend.metadata if backend is not None else {},
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
    t = lap("choose", t)

    # the full DVF, affine folded in, tapered network field inside the box
    u_taper = paths.dvf * taper(pair.grid)[..., None]
    if far is not None:
        u_taper *= far.weight_on(pair.grid)[..., None]
    reach_mm = float(np.sqrt((u_taper**2).sum(axis=-1)).max()) if u_taper.size else 0.0
    u_box = Volume(u_taper.astype(np.float32, copy=False), pair.grid)
    full = full_transform(prealign.transform, u_box, far_tx)
    out_grid = dvf_grid(daily.volume.geometry, opts.dvf_spacing_mm)
    dvf = composed_field(prealign.transform, u_box, out_grid, far=far)
    jac, organ_jac = jacobian_report(
        box_field(
            prealign.transform,
            u_box.array
            if far_tx is None or far is None
            else u_box.array + far.correction(pair.grid.voxel_centres()).astype(np.float32),
            pair.grid,
        ),
        pair.body,
        {name: (LABELS[lab], chosen == lab) for lab, name in used.items()},
        opts.thresholds,
    )
    del u_taper
    t = lap("dvf", t)
    # every output is written into a hidden folder of out_dir and moved into place once all of
    # them exist (the folder is removed on a failure: no partial output is left behind); the DVF
    # and the DICOM REG in the background from now on, beside propagation, QA and the RTSTRUCT
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = tempfile.TemporaryDirectory(dir=out_dir, prefix=".jrs-fields-")

    def write_fields() -> tuple[Path, Path]:
        folder = Path(staging.name)
        dvf.write(str(folder / "dvf.mha"), compress=False)
        write_deformable_registration(dvf, daily, planning, folder / "registration.dcm")
        return folder / "dvf.mha", folder / "registration.dcm"

    field_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jrs-fields")
    fields_job = field_writer.submit(write_fields)
    field_writer.shutdown(wait=False)
    try:
        # daily masks: organs from the chosen labels, every other ROI through the full mapping,
        # each only where it can land (its own box; the network box is all the labels can cover)
        daily_geom = daily.volume.geometry
        network_box = index_box(daily_geom, pair.grid.corners(), 0.0)
        chosen_daily = np.zeros(daily_geom.shape, np.uint8)
        organs_box = nonzero_box(chosen, 2)
        if organs_box is not None:
            organs = crop(Volume(chosen, pair.grid), organs_box)
            target = index_box(daily_geom, organs.geometry.corners(), 0.0)
            if target is not None:
                chosen_daily[target] = organs.resample(
                    sub_grid(daily_geom, target), "label", 0
                ).array
        # an organ moved by the registration is its own planning contour moved like every other
        # ROI, so that it keeps its overlaps with its neighbours (seminal vesicles entering the
        # prostate), which a one-label-per-voxel map cuts off. An organ drawn by the network's
        # segmentation (or the fusion) comes from the label map, plus its planning overlaps with
        # the other organs, moved (`with_overlaps`): the overlaps of the clinician's contours
        # are kept whatever the path.
        drawn = {
            name: lab
            for lab, name in used.items()
            if sources.get(lab) not in ("registration", "iterative")
        }
        # the ROIs are resampled two at a time (SimpleITK and numpy release the GIL)
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="jrs-propagate") as pool:
            jobs = {
                name: pool.submit(
                    propagate_mask,
                    mask,
                    daily_geom,
                    prealign.transform,
                    full,
                    network_box,
                    reach_mm,
                    outer,
                    far_reach,
                )
                for name, mask in planning_masks.items()
            }
            moved = {lab: jobs[name].result() for lab, name in used.items()}
            daily_masks: dict[str, npt.NDArray[np.bool_]] = {
                name: with_overlaps(chosen_daily, drawn[name], moved)
                if name in drawn
                else jobs[name].result()
                for name in planning_masks
            }
            del moved
        organ_of_name = {name: lab for lab, name in used.items()}
        t = lap("propagate", t)

        # QA
        meta = backend.metadata if backend is not None else {}
        # image evidence per organ (model-independent): daily CT vs planning CT mapped onto it, and
        # the centroid's shift from the pre-alignment; inside each organ's bounding box only
        evidence = image_evidence(
            pair.fixed,
            pair.moving,
            u_box.array,
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
        outline = {
            r.name for r in structure_set.rois if is_external_roi(r.name, r.interpreted_type)
        }
        types = {r.name: r.interpreted_type for r in structure_set.rois if r.interpreted_type}
        roi_evidence: dict[str, dict[str, Any]] = {}
        for name, daily_mask in daily_masks.items():
            if name in organ_of_name or name in outline or not daily_mask.any():
                continue
            on_grid = mask_on_grid(daily_mask, daily_geom, pair.grid)
            figures = image_evidence(
                pair.fixed,
                pair.moving,
                u_box.array,
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
            full,
            {n: m for n, m in daily_masks.items() if n not in outline},
        )
        family = {d.roi: d.organ for d in mapping.decisions if d.organ}
        structures: list[StructureQa] = []
        for name, daily_mask in daily_masks.items():
            organ_label = organ_of_name.get(name)
            path_dice = None
            path_msd = None
            method_dice = None
            method_msd = None
            border = False
            both_valid = True
            if organ_label is not None:
                both_valid = len(qa_reference_paths(meta, LABELS[organ_label])) == 2
                # a fused contour is made of both paths: their disagreement is worth a look
                both_valid = both_valid or sources.get(organ_label) == "fusion"
                if paths.segmentation is not None:
                    seg_mask = paths.segmentation == organ_label
                    reg_mask = paths.registration == organ_label
                    path_dice = dice(seg_mask, reg_mask)
                    path_msd = surface_distances(seg_mask, reg_mask, pair.grid).msd
                border = touches_border(chosen == organ_label)
                if reference is not None:
                    own, theirs = chosen == organ_label, reference == organ_label
                    method_dice = dice(own, theirs)
                    method_msd = surface_distances(own, theirs, pair.grid).msd
            default_source = "iterative" if opts.method == "iterative" else "registration"
            qa_item = StructureQa(
                name=name,
                organ=LABELS[organ_label] if organ_label is not None else None,
                source=sources.get(organ_label, default_source)
                if organ_label is not None
                else default_source,
                planning_cc=round(
                    volume_cc(planning_masks[name].array, planning.volume.geometry), 3
                ),
                daily_cc=round(volume_cc(daily_mask, daily_geom), 3),
                path_dice=None if path_dice is None else round(path_dice, 4),
                path_msd_mm=None
                if path_msd is None or not math.isfinite(path_msd)
                else round(path_msd, 3),
                touches_crop_border=border,
                paths_validated=both_valid,
                target_volume=organ_label is None and is_target_volume(name, types.get(name, "")),
                jacobian=organ_jac.get(name),
                **structure_evidence(
                    evidence.get(organ_label) if organ_label is not None else roi_evidence.get(name)
                ),
                **residuals.get(name, {}),
                method_dice=None if method_dice is None else round(method_dice, 4),
                method_msd_mm=None
                if method_msd is None or not math.isfinite(method_msd)
                else round(method_msd, 3),
                organ_family=family.get(name),
            )
            structures.append(flag_structure(qa_item, opts.thresholds))
        # a mapping in doubt around one contour of an organ is in doubt for its other contours
        flag_same_organ(structures)
        dvf_flags = flag_dvf(jac, opts.thresholds)
        t = lap("qa", t)

        # outputs
        colors = {r.name: r.color for r in structure_set.rois if r.color is not None}
        flagged = [s.name for s in structures if s.flags]

        def review() -> Path:
            planned = planned_on_daily(planning_masks, used, prealign.transform, daily_geom)
            # the review shows the organs and every flagged ROI (the patient's outline aside)
            shown = list(dict.fromkeys([*used.values(), *(n for n in flagged if n not in outline)]))
            shown = shown or [n for n in daily_masks if n not in outline and daily_masks[n].any()]
            organ_masks = {name: daily_masks[name] for name in shown}
            review_ct, organ_masks, planned = review_crop(daily.volume, organ_masks, planned)
            return render_review(
                review_ct,
                organ_masks,
                Path(staging.name) / "review.png",
                planned=planned,
                colors=colors,
                focus=used.get(4),
                flagged={s.name: s.flags for s in structures if s.flags},
                title=(
                    f"jrs {opts.method}: solid = new contours, "
                    "dashed = planning after pre-alignment"
                ),
            )

        # the review (resampling and drawing) runs beside the DICOM writing: both take seconds, and
        # much of each is spent outside the GIL (SimpleITK, zlib, file I/O)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="jrs-review") as pool:
            review_job = pool.submit(review)
            staged_rt = Path(staging.name) / "rtstruct.dcm"
            write_rtstruct(
                daily_masks,
                daily,
                staged_rt,
                colors=colors,
                interpreted_types=types,
                structure_set_label="JRS",
                series_description=f"jrs re-contoured ({opts.method})",
            )
            staged_dvf, staged_reg = fields_job.result()
            staged_review = review_job.result()
        # every output was written into the staging folder: now they take their places
        rt_path, dvf_path, reg_path, review_path = (
            out_dir / "rtstruct.dcm",
            out_dir / "dvf.mha",
            out_dir / "registration.dcm",
            out_dir / "review.png",
        )
        for staged, final in (
            (staged_rt, rt_path),
            (staged_dvf, dvf_path),
            (staged_reg, reg_path),
            (staged_review, review_path),
        ):
            os.replace(staged, final)
        staging.cleanup()
    except BaseException:
        # nothing half-written stays behind: wait for the field writer, drop its folder
        concurrent.futures.wait([fields_job])
        staging.cleanup()
        raise
    t = lap("write", t)
    times["total"] = round(time.perf_counter() - t_all, 4)

    engine = getattr(backend, "engine", None)
    qa_data: dict[str, Any] = {
        "method": opts.method,
        "model": {
            "name": meta.get("name"),
            "version": meta.get("version"),
            "git_sha": meta.get("git_sha"),
            "sha256": meta.get("sha256"),
            "execution_provider": getattr(backend, "execution_provider", None),
            "engine": getattr(engine, "name", None),
            "device": getattr(engine, "device", None),
            "precision": getattr(engine, "precision", None),
        },
        "structures": [s.__dict__ for s in structures],
        "dvf": {
            **{k: round(v, 6) for k, v in jac.items()},
            "flags": dvf_flags,
            "grid": {
                "shape_zyx": list(out_grid.shape),
                "spacing_mm": [float(s) for s in out_grid.spacing],
                "daily_ct_grid": out_grid is daily_geom,
            },
        },
        "prealign": {
            "mode": opts.prealign,
            "focus": focus.as_dict() if focus is not None else None,
            "metric": prealign.metric,
            "matrix": list(prealign.transform.GetMatrix()),
            "translation_mm": list(prealign.transform.GetTranslation()),
            "center_mm": list(prealign.transform.GetCenter()),
            "far_field": {
                "mode": opts.far_field,
                **far_record,
                "blend_mm": far.blend_mm if far is not None else None,
                "min_det_jacobian": round(far.min_det_jacobian(), 4) if far is not None else None,
                "largest_correction_mm": round(far_reach, 3),
            },
        },
        "network_box_mm": {"lower": box[0].tolist(), "upper": box[1].tolist()},
        "network": paths.network,
        "refine": refine_report.as_dict(),
        "flagged": flagged + (["DVF"] if dvf_flags else []),
        "roi_mapping": mapping.to_json(),
        "plausibility": [f.to_dict() for f in findings],
        "warnings": list(
            dict.fromkeys(
                [
                    *daily.warnings,
                    *planning.warnings,
                    *structure_set.warnings,
                    *(f.message for f in findings),
                ]
            )
        ),
        "timings_s": times,
    }
    qa_path = out_dir / "qa.json"
    qa_path.write_text(json.dumps(qa_data, indent=2, default=json_default))
    log.info(
        "re-contoured in %.1f s (%s); %d structure(s) flagged",
        times["total"],
        opts.method,
        len(flagged),
    )
    path_labels = {"registration": Volume(paths.registration, pair.grid)}
    if paths.segmentation is not None:
        path_labels["segmentation"] = Volume(paths.segmentation, pair.grid)
    if fused is not None:
        path_labels["fusion"] = Volume(fused, pair.grid)
    path_labels["chosen"] = Volume(chosen, pair.grid)
    if opts.keep_fusion:  # validation: the planning organs after the pre-alignment alone,
        # and as they lie in patient coordinates (no registration at all)
        path_labels["prealigned"] = Volume(pair.moving_labels, pair.grid)
        path_labels["unaligned"] = Volume(
            planning_labels.resample(pair.grid, "label", 0).array.astype(np.uint8), pair.grid
        )
    return RecontourResult(
        out_dir, rt_path, dvf_path, reg_path, qa_path, review_path, qa_data, path_labels
    )
