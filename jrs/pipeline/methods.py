"""The registration methods of a run and what they hand on.

The network (passes, null correction, field smoothing, the optional refinement), the iterative
method and its network second opinion, and the fusion of the network's two paths.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from jrs.core.errors import JrsError
from jrs.core.geometry import Volume
from jrs.core.labels import (
    LABELS,
)
from jrs.inference import load_model
from jrs.inference.backend import NetworkBackend, NetworkPrediction
from jrs.inference.cascade import network_passes, refine
from jrs.inference.fusion import (
    FusionSpec,
    ProbabilitySource,
    fuse_network_paths,
    hard_probability,
    probability_source,
    softmax_source,
)
from jrs.inference.null_cache import (
    PlanningNull,
    check_null_pass,
    transport,
)
from jrs.inference.null_correction import (
    NullCorrection,
    null_correct,
    null_correction_enabled,
    subtract_null,
)
from jrs.inference.preprocess import PreparedPair
from jrs.inference.registry import default_model_dir
from jrs.inference.smoothing import field_smoothing_sigma, smooth_field
from jrs.pipeline.options import RecontourOptions
from jrs.registration.composition import dense_field
from jrs.registration.instance_optimisation import RefineReport, refine_field
from jrs.registration.iterative import bspline_register
from jrs.registration.propagation import largest_components, warp_labels

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


@dataclass
class NetworkPaths:
    """A method's output on the network grid: its two paths' labels and its field (mm)."""

    segmentation: npt.NDArray[np.uint8] | None
    registration: npt.NDArray[np.uint8]
    dvf: npt.NDArray[np.float32]  # (nz, ny, nx, 3) mm on the prepared grid
    network: dict[str, Any] | None = None  # inference timings (window, tiles, run/compile s)
    # the backend's prediction (seg logits or probabilities), read by fusion inside organ boxes
    prediction: NetworkPrediction | None = None


def run_network(
    backend: NetworkBackend,
    pair: PreparedPair,
    null_correction: bool,
    smoothing_mm: float = 0.0,
    passes: int = 1,
    planning: PlanningNull | None = None,
) -> NetworkPaths:
    """One network run on the prepared pair: its passes, null correction and field smoothing.

    Args:
        backend: the loaded network.
        pair: the prepared network grid (planning scan pre-aligned onto the daily box).
        null_correction: subtract the planning scan's null field (the same scan twice moves
            nothing).
        smoothing_mm: Gaussian sigma of the field's smoothing, mm (0: none).
        passes: network passes (`jrs.inference.cascade`).
        planning: the planning scan's null field, cached per planning scan (None: the pair's own).

    Returns:
        The segmentation and registration paths and the (nz, ny, nx, 3) field in mm.
    """
    labels_f = pair.moving_labels.astype(np.float32)
    pred = backend.predict(pair.fixed, pair.moving, labels_f)
    raw = np.asarray(pred.dvf, np.float32)
    null = None
    u0: npt.NDArray[np.float32] | None = None
    if null_correction and planning is not None:
        t_null = time.perf_counter()
        u0 = transport(planning, pair.grid, pair.prealign.transform)
        raw, max_mm, mean_mm = subtract_null(u0, raw, pair.body)
        null = NullCorrection(
            max_mm,
            mean_mm,
            planning.planning_dice,
            time.perf_counter() - t_null + (0.0 if planning.from_cache else planning.seconds),
            source="planning",
            cached=planning.from_cache,
        )
    elif null_correction:
        raw, null = null_correct(backend, pair.moving, labels_f, raw, pair.body)
    raw, pred, cascade = refine(
        backend,
        pair.grid,
        pair.fixed,
        pair.moving,
        labels_f,
        raw,
        passes,
        null_correction=null_correction,
        body=pair.body,
        prediction=pred,
        null_field=u0,
    )
    del labels_f, u0
    smoothing_s = 0.0
    if smoothing_mm > 0:
        t_s = time.perf_counter()
        raw = smooth_field(raw, smoothing_mm, tuple(map(float, pair.grid.spacing)))
        smoothing_s = time.perf_counter() - t_s
    dvf = np.ascontiguousarray(np.moveaxis(raw, 0, -1))
    del raw
    seg = None
    # the arg-max of the logits is that of the soft-max: no need to compute the latter
    logits_argmax = (
        getattr(pred, "labels", None) if getattr(pred, "seg_logits", None) is not None else None
    )
    reach = float(np.sqrt((dvf**2).sum(axis=-1)).max()) if dvf.size else 0.0
    # the registration path (label warping, components) runs beside the segmentation path's
    # arg-max and components: each is numpy/SimpleITK work that mostly releases the GIL
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="jrs-regpath") as pool:
        reg_job = pool.submit(
            lambda: largest_components(warp_labels(pair.moving_labels, dvf, pair.grid, reach))
        )
        if logits_argmax is not None:
            seg = largest_components(np.asarray(logits_argmax, np.uint8))
        elif pred.seg_probs is not None:
            seg = largest_components(np.argmax(pred.seg_probs, axis=0).astype(np.uint8))
        registration = reg_job.result()
    timings = getattr(pred, "timings", None)
    as_dict = getattr(timings, "as_dict", None)
    network: dict[str, Any] = dict(as_dict()) if callable(as_dict) else {}
    network["null_correction"] = null.as_dict() if null is not None else {"applied": False}
    network["cascade"] = cascade.as_dict()
    network["dvf_smoothing"] = {"sigma_mm": smoothing_mm, "seconds": round(smoothing_s, 3)}
    return NetworkPaths(seg, registration, dvf, network, pred)


def fuse_paths(
    paths: NetworkPaths,
    pair: PreparedPair,
    organs: list[int],
    metadata: Mapping[str, Any],
    method: str | None,
) -> npt.NDArray[np.uint8] | None:
    """The fused label map of some organs (`jrs.inference.fusion.fuse`); None: nothing fused.

    The segmentation path's probabilities are the soft-max of the prediction's logits computed
    inside each fused organ's box only (or the backend's probabilities, read there); the
    registration path's are the planning one-hot maps warped linearly by the DVF there. Nothing
    is fused without a segmentation path (iterative method, or a model without one).

    Args:
        paths: the two paths, the DVF and the prediction of `run_network`.
        pair: the prepared network grid, with the pre-aligned planning labels.
        organs: label ids to fuse.
        metadata: the model's ``metadata.json`` content (its ``fusion`` entry).
        method: overrides the metadata's fusion method (None: keep it).

    Returns:
        (nz, ny, nx) uint8 map of the fused organs on the network grid, or None.
    """
    if not organs or paths.segmentation is None:
        return None

    spec = FusionSpec.from_metadata(metadata)
    if method is not None:
        spec = FusionSpec(method, spec.weights)  # type: ignore[arg-type]
    pred = paths.prediction
    seg_p: ProbabilitySource | None = None
    logits = getattr(pred, "seg_logits", None)
    if logits is not None:
        seg_p = softmax_source(logits)
    elif pred is not None and pred.seg_probs is not None:
        seg_p = probability_source(pred.seg_probs)
    if seg_p is None:
        seg_p = hard_probability(paths.segmentation)
    return fuse_network_paths(
        paths.segmentation,
        paths.registration,
        organs,
        spec,
        seg_probability=seg_p,
        moving_labels=pair.moving_labels,
        dvf=paths.dvf,
        grid=pair.grid,
        fixed=pair.fixed,
        moving=pair.moving,
    )


def refine_paths(paths: NetworkPaths, pair: PreparedPair, used: Mapping[int, str]) -> RefineReport:
    """Refine the network's field on the pair (`jrs.registration.instance_optimisation`), in place.

    The registration path is made again from the refined field; the segmentation path is not
    refined. The report keeps how far each organ's contour moved.
    """
    organs = {LABELS[lab]: paths.registration == lab for lab in used}
    dvf, report = refine_field(pair.fixed, pair.moving, paths.dvf, pair.grid, pair.body, organs)
    if report.applied:
        paths.dvf = dvf
        reach = float(np.sqrt((dvf**2).sum(axis=-1)).max()) if dvf.size else 0.0
        paths.registration = largest_components(
            warp_labels(pair.moving_labels, dvf, pair.grid, reach)
        )
    return report


def run_iterative(pair: PreparedPair) -> NetworkPaths:
    """The iterative method on the prepared pair: B-spline field, planning labels warped by it."""
    fixed = Volume(pair.fixed, pair.grid)
    moving = Volume(pair.moving, pair.grid)
    result = bspline_register(fixed, moving, fixed_mask=Volume(pair.body, pair.grid))
    dvf = dense_field(result.transform, pair.grid).array
    warped = Volume(pair.moving_labels, pair.grid).resample(
        pair.grid, "label", 0, transform=result.transform
    )
    return NetworkPaths(None, largest_components(warped.array), dvf)


def network_reference(
    backend: NetworkBackend | None,
    opts: RecontourOptions,
    pair: PreparedPair,
    planning: Callable[[NetworkBackend], PlanningNull],
) -> npt.NDArray[np.uint8] | None:
    """The network's registration path of the organs, beside the iterative method's result.

    Args:
        backend: a loaded network, or None to load the one the options name.
        opts: the run's options (model, engine, the model's null correction and passes).
        pair: the prepared network grid.
        planning: the planning scan's null field for a network (`jrs.inference.null_cache`).

    Returns:
        (nz, ny, nx) uint8 organ label map on the network grid (`jrs.core.labels` ids), or None when
        no model loads (the iterative method needs none: the comparison is then left out).
    """
    try:
        net = backend if backend is not None else load_backend(opts)
    except JrsError as exc:
        log.info("no network to compare the iterative method with: %s", exc)
        return None
    return run_model(net, opts, pair, lambda: planning(net)).registration


def run_model(
    backend: NetworkBackend,
    opts: RecontourOptions,
    pair: PreparedPair,
    planning: Callable[[], PlanningNull] | None = None,
) -> NetworkPaths:
    """`run_network` with the options' (else the metadata's) correction, smoothing, passes.

    ``planning`` gives the planning scan's null field (`jrs.inference.null_cache`); it is asked for
    only when the correction applies and ``opts.null_pass`` is ``planning``.
    """
    correct = null_correction_enabled(backend.metadata, opts.null_correction)
    carried = (
        planning()
        if correct and planning is not None and check_null_pass(opts.null_pass) == "planning"
        else None
    )
    return run_network(
        backend,
        pair,
        correct,
        field_smoothing_sigma(backend.metadata, opts.dvf_smoothing_mm),
        network_passes(backend.metadata, opts.network_passes),
        carried,
    )


def load_backend(options: RecontourOptions) -> NetworkBackend:
    """Load and compile the model named by the options (never imports torch).

    The engine, device and precision come from the options (`jrs.inference.load_model`); keep
    the result for the next cases (the service and batch workers do). OpenVINO keeps its
    compiled models in ``<cache_dir>/openvino`` (its ``CACHE_DIR``): another process meeting the
    same window shape loads it rather than compiling it.
    """
    model_dir = options.model_dir or default_model_dir()

    ov_cache = {"cache_dir": options.cache_dir / "openvino"} if options.cache_dir else None
    backend: NetworkBackend = load_model(
        model_dir,
        device=options.device,
        engine=options.engine,
        precision=options.precision,
        openvino_options=ov_cache,
    )
    return backend
