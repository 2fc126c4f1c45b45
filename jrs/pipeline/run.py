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

import logging
from pathlib import Path

import numpy as np
import numpy.typing as npt

from jrs.core.errors import InvalidInput, ModelNotReady
from jrs.core.geometry import Volume
from jrs.inference.backend import NetworkBackend
from jrs.inference.null_cache import PlanningNull, cache_for, planning_null
from jrs.pipeline.assess import assess
from jrs.pipeline.front import (
    Inputs,
    Organs,
    Prepared,
    StageClock,
    align,
    planning_box,
    prepare,
    read_inputs,
    resolve_organs,
)
from jrs.pipeline.mapping import Choice, choose_paths, mapping_field, propagate
from jrs.pipeline.methods import (
    NetworkPaths,
    load_backend,
    network_reference,
    refine_paths,
    run_iterative,
    run_model,
)
from jrs.pipeline.options import RecontourOptions, RecontourResult
from jrs.pipeline.outputs import StagedOutputs, qa_record, write_qa
from jrs.registration.instance_optimisation import RefineReport, check_refine_mode

log = logging.getLogger(__name__)

__all__ = ["RecontourOptions", "RecontourResult", "load_backend", "recontour"]


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
    opts = options or RecontourOptions()
    out_dir = Path(out)
    clock = StageClock()
    if opts.method == "network" and backend is None:
        backend = load_backend(opts)
    clock.lap("load_model")
    inputs = read_inputs(planning_ct, planning_rtstruct, daily_ct)
    clock.lap("read")
    organs = resolve_organs(inputs, opts)  # a case the method cannot handle is refused here
    clock.lap("labels")
    alignment = align(inputs, organs, opts)
    clock.lap("prealign")
    prepared = prepare(inputs, organs, alignment, opts)
    clock.lap("prepare")
    paths, refine_report, reference = _register(inputs, organs, prepared, backend, opts, clock)
    choice = choose_paths(paths, prepared.pair, organs.used, opts, backend)
    clock.lap("choose")
    transform = alignment.prealign.transform
    daily_geom = inputs.daily.volume.geometry
    field = mapping_field(paths, prepared, transform, daily_geom, organs.used, choice.chosen, opts)
    clock.lap("dvf")
    metadata = backend.metadata if backend is not None else {}
    with StagedOutputs(out_dir, field.dvf, inputs) as staged:
        daily_masks = propagate(inputs, prepared, transform, field, choice, organs.used)
        clock.lap("propagate")
        assessment = assess(
            inputs, organs, prepared, paths, choice, field, daily_masks, reference, metadata, opts
        )
        clock.lap("qa")
        written = staged.finish(inputs, organs, alignment, daily_masks, assessment, opts)
    clock.lap("write")
    clock.total()
    qa_data = qa_record(
        inputs,
        organs,
        alignment,
        prepared,
        paths,
        field,
        assessment,
        refine_report,
        backend,
        opts,
        clock.times,
    )
    qa_path = write_qa(out_dir, qa_data)
    log.info(
        "re-contoured in %.1f s (%s); %d structure(s) flagged",
        clock.times["total"],
        opts.method,
        len(assessment.flagged),
    )
    return RecontourResult(
        out_dir,
        written.rtstruct,
        written.dvf,
        written.registration,
        qa_path,
        written.review,
        qa_data,
        _path_labels(paths, prepared, organs, choice, opts),
    )


def _register(
    inputs: Inputs,
    organs: Organs,
    prepared: Prepared,
    backend: NetworkBackend | None,
    opts: RecontourOptions,
    clock: StageClock,
) -> tuple[NetworkPaths, RefineReport, npt.NDArray[np.uint8] | None]:
    """The method's paths on the network grid, the refinement's report, the second opinion."""

    def planning_null_of(net: NetworkBackend) -> PlanningNull:
        """The planning scan's null field (`jrs.inference.null_cache`), on its box as a pair's."""
        return planning_null(
            net,
            inputs.planning.volume,
            organs.planning_labels,
            planning_box(inputs, organs, opts),
            cache_for(opts.cache_dir),
        )

    refine_report = RefineReport(False, reason="not asked for")
    if opts.method == "network":
        if backend is None:  # pragma: no cover - load_backend raises first
            raise ModelNotReady("no network loaded")
        net = backend
        paths = run_model(backend, opts, prepared.pair, lambda: planning_null_of(net))
        clock.lap("network")
        if check_refine_mode(opts.refine) == "on":
            refine_report = refine_paths(paths, prepared.pair, organs.used)
            clock.lap("refine")
    elif opts.method == "iterative":
        paths = run_iterative(prepared.pair)
        clock.lap("iterative")
    else:
        raise InvalidInput(f"method {opts.method!r} unknown; use 'network' or 'iterative'")
    # the iterative method's second opinion: the network's mapping of the same organs
    reference: npt.NDArray[np.uint8] | None = None
    if opts.method == "iterative" and organs.used and opts.method_consensus:
        reference = network_reference(backend, opts, prepared.pair, planning_null_of)
        clock.lap("reference")
    return paths, refine_report, reference


def _path_labels(
    paths: NetworkPaths,
    prepared: Prepared,
    organs: Organs,
    choice: Choice,
    opts: RecontourOptions,
) -> dict[str, Volume]:
    """The label maps of the run's paths on the network grid (for evaluation)."""
    pair = prepared.pair
    path_labels = {"registration": Volume(paths.registration, pair.grid)}
    if paths.segmentation is not None:
        path_labels["segmentation"] = Volume(paths.segmentation, pair.grid)
    if choice.fused is not None:
        path_labels["fusion"] = Volume(choice.fused, pair.grid)
    path_labels["chosen"] = Volume(choice.chosen, pair.grid)
    if opts.keep_fusion:  # validation: the planning organs after the pre-alignment alone,
        # and as they lie in patient coordinates (no registration at all)
        path_labels["prealigned"] = Volume(pair.moving_labels, pair.grid)
        path_labels["unaligned"] = Volume(
            organs.planning_labels.resample(pair.grid, "label", 0).array.astype(np.uint8),
            pair.grid,
        )
    return path_labels
