"""Planning CT + RTSTRUCT + daily CT -> daily RTSTRUCT, DVF, DICOM REG, QA and review figure.

The one function the command line, batch re-contouring and the REST service all call:
`recontour`. Stages (each timed in ``qa.json``):

1. read: planning CT, planning RTSTRUCT (checked against the planning CT), daily CT;
2. labels: map the planning ROI names to the label table (synonym table);
3. prealign: rigid then affine registration of the planning CT onto the daily CT;
4. prepare: a box around the pre-aligned organs (+ margin) on the 1 mm canonical grid, both scans
   and the planning labels resampled there, intensities normalised;
5. network (or iterative B-spline): both output paths — segmentation (soft-max, arg-max) and
   registration (planning labels warped by the DVF) — post-processed (largest components);
6. choose: per organ, the segmentation or the registration path (configurable; by default the
   model's validated choice);
7. dvf: the full field on the daily grid, pre-alignment folded in:
   ``U(p) = A(p + w(p) u(p)) - p`` with ``u`` the network DVF inside the box and ``w`` a taper that
   brings it smoothly to zero at the box border (outside, the field is the affine alone);
8. propagate: every other planning ROI (PTV, femoral heads, body, ...) through the same mapping;
9. write: ``rtstruct.dcm``, ``dvf.mha``, ``registration.dcm``, ``qa.json``, ``review.png``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from jrs.errors import InvalidInput, ModelNotReady
from jrs.geometry import Geometry, Volume
from jrs.labels import LABELS, SynonymTable, label_map_from_masks
from jrs.metrics import dice, volume_cc
from jrs.postprocess import keep_largest_components
from jrs.preprocess import PreparedPair, prepare_pair
from jrs.qa import QaThresholds, StructureQa, flag_dvf, flag_structure, jacobian_stats
from jrs.registration import affine_prealign, bspline_register
from jrs.transforms import warp

log = logging.getLogger(__name__)

Path_ = Literal["segmentation", "registration"]
TAPER_MM = 10.0
#: where the bundled models live (``models/<name>/<version>``), overridable by JRS_MODEL_DIR.
BUNDLED_MODELS = Path(__file__).resolve().parents[1] / "models"


class NetworkPrediction(Protocol):
    """What a network backend returns (see `jrs.inference`)."""

    @property
    def seg_probs(self) -> npt.NDArray[np.float32] | None:
        """(5, nz, ny, nx) class probabilities on the input grid, or None."""

    @property
    def dvf(self) -> npt.NDArray[np.float32]:
        """(3, nz, ny, nx) displacement, voxels of the 1 mm grid (= mm), channels x, y, z."""


class NetworkBackend(Protocol):
    """A loaded network (`jrs.inference.OnnxModel` is one)."""

    metadata: dict[str, Any]

    def predict(
        self,
        fixed: npt.NDArray[np.float32],
        moving: npt.NDArray[np.float32],
        moving_labels: npt.NDArray[np.float32],
    ) -> NetworkPrediction:
        """Whole-volume tiled prediction on the 1 mm grid."""


@dataclass
class RecontourOptions:
    """Options of `recontour`.

    Attributes:
        method: ``network`` (the model) or ``iterative`` (B-spline baseline, registration path).
        model_dir: ``models/<name>/<version>`` folder; default the bundled model.
        device: ``auto``, ``cpu`` or ``cuda`` (network method).
        synonyms: ROI-name synonym table.
        path_choice: organ key -> ``segmentation`` or ``registration``; missing organs use the
            model's validated choice (metadata ``path_choice``), else ``segmentation``.
        margin_mm: margin around the pre-aligned planning organs for the network box, mm.
        thresholds: QA thresholds.
        dvf_spacing_mm: write the DVF on a coarser grid (same box and orientation as the daily
            CT) with this spacing; None = the daily CT grid itself.
    """

    method: Literal["network", "iterative"] = "network"
    model_dir: Path | None = None
    device: str = "auto"
    synonyms: SynonymTable | None = None
    path_choice: Mapping[str, Path_] = field(default_factory=dict)
    margin_mm: float = 30.0
    thresholds: QaThresholds = field(default_factory=QaThresholds)
    dvf_spacing_mm: float | None = None


@dataclass
class RecontourResult:
    """Files written by `recontour` and the QA it computed.

    Attributes:
        out_dir: output folder.
        rtstruct: daily RTSTRUCT.
        dvf: ``dvf.mha`` (pull, mm, daily grid, affine folded in).
        registration: DICOM Deformable Spatial Registration.
        qa: ``qa.json``.
        review: ``review.png``.
        qa_data: the content of ``qa.json``.
        path_labels: the organ label maps (ids of `jrs.labels`, post-processed) of each output
            path on the network grid (1 mm box): ``segmentation`` (network method only),
            ``registration`` (or the iterative result) and ``chosen``; kept for validation,
            not written.
    """

    out_dir: Path
    rtstruct: Path
    dvf: Path
    registration: Path
    qa: Path
    review: Path
    qa_data: dict[str, Any]
    path_labels: dict[str, Volume] = field(default_factory=dict)


def default_model_dir(name: str = "crossstitch") -> Path:
    """The newest numeric version folder of a bundled model (or under ``$JRS_MODEL_DIR``)."""
    root = Path(os.environ.get("JRS_MODEL_DIR", BUNDLED_MODELS)) / name
    versions = sorted(
        (p for p in root.glob("*") if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)
    )
    if not versions:
        raise ModelNotReady(
            f"no model under {root}: expected {root}/<version>/model.onnx (export one with "
            "`jrs export`, or pass --model DIR)"
        )
    return versions[-1]


def load_backend(options: RecontourOptions) -> NetworkBackend:
    """Load the ONNX model named by the options (never imports torch)."""
    model_dir = options.model_dir or default_model_dir()
    from jrs.inference import load_model

    backend: NetworkBackend = load_model(model_dir, device=options.device)
    return backend


def _organ_box(
    planning_labels: Volume, transform: sitk.Transform, daily: Geometry, margin_mm: float
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """LPS box (lower, upper) in the daily scan around the pre-aligned planning organs."""
    idx = np.argwhere(planning_labels.array > 0)
    lo, hi = idx.min(axis=0)[::-1], idx.max(axis=0)[::-1]
    corners = np.array(
        [[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])], float
    )
    pts = planning_labels.geometry.index_to_physical(corners)
    inverse = transform.GetInverse()
    daily_pts = np.array([inverse.TransformPoint(tuple(map(float, p))) for p in pts])
    lower = daily_pts.min(axis=0) - margin_mm
    upper = daily_pts.max(axis=0) + margin_mm
    ct_corners = daily.corners()
    lower = np.maximum(lower, ct_corners.min(axis=0))
    upper = np.minimum(upper, ct_corners.max(axis=0))
    if np.any(upper - lower < 4.0):
        raise InvalidInput(
            "the planning organs, once pre-aligned, fall outside the daily CT's field of view; "
            "check that the daily CT covers the pelvis of the same patient"
        )
    return lower, upper


def _taper(grid: Geometry, width_mm: float = TAPER_MM) -> npt.NDArray[np.float32]:
    """(nz, ny, nx) weights: 1 inside, smoothly 0 at the grid's faces (cosine ramp)."""
    weights = np.ones(grid.shape, np.float32)
    for axis in range(3):
        n = grid.shape[axis]
        spacing = float(grid.spacing[2 - axis])
        d = np.minimum(np.arange(n), np.arange(n)[::-1]) * spacing
        ramp = np.clip(d / width_mm, 0.0, 1.0)
        ramp = (0.5 - 0.5 * np.cos(np.pi * ramp)).astype(np.float32)
        shape = [1, 1, 1]
        shape[axis] = n
        weights *= ramp.reshape(shape)
    return weights


def _full_transform(prealign: sitk.Transform, dvf_grid: Volume | None) -> sitk.Transform:
    """Daily point -> planning point: ``A(p + u(p))`` (``u`` = 0 outside its grid)."""
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(prealign)
    if dvf_grid is not None:
        image = sitk.GetImageFromArray(dvf_grid.array.astype(np.float64), isVector=True)
        dvf_grid.geometry.apply_to_sitk(image)
        composite.AddTransform(sitk.DisplacementFieldTransform(image))
    return composite


def dense_field(transform: sitk.Transform, reference: Geometry, slab: int = 16) -> Volume:
    """``T(p) - p`` on a grid, float32, computed a slab of slices at a time to bound memory.

    Args:
        transform: daily point -> planning point.
        reference: the output grid.
        slab: slices per chunk.

    Returns:
        (nz, ny, nx, 3) float32 DVF, mm.
    """
    out = np.empty((*reference.shape, 3), np.float32)
    for k0 in range(0, reference.shape[0], slab):
        k1 = min(k0 + slab, reference.shape[0])
        origin = reference.index_to_physical([0.0, 0.0, float(k0)])
        sub = Geometry(
            (k1 - k0, reference.shape[1], reference.shape[2]),
            origin,
            reference.spacing,
            reference.direction,
        )
        field_img = sitk.TransformToDisplacementField(
            transform,
            sitk.sitkVectorFloat64,
            list(sub.size_xyz),
            tuple(float(v) for v in sub.origin),
            tuple(float(v) for v in sub.spacing),
            tuple(float(v) for v in sub.direction.reshape(-1)),
        )
        out[k0:k1] = sitk.GetArrayViewFromImage(field_img)
    return Volume(out, reference.with_frame(reference.frame_of_reference_uid))


def _touches_border(mask: npt.NDArray[np.bool_]) -> bool:
    return bool(
        mask[0].any()
        or mask[-1].any()
        or mask[:, 0].any()
        or mask[:, -1].any()
        or mask[:, :, 0].any()
        or mask[:, :, -1].any()
    )


@dataclass
class _Paths:
    segmentation: npt.NDArray[np.uint8] | None
    registration: npt.NDArray[np.uint8]
    dvf: npt.NDArray[np.float32]  # (nz, ny, nx, 3) mm on the prepared grid


def _run_network(backend: NetworkBackend, pair: PreparedPair) -> _Paths:
    pred = backend.predict(pair.fixed, pair.moving, pair.moving_labels.astype(np.float32))
    dvf = np.moveaxis(np.asarray(pred.dvf, np.float32), 0, -1)
    seg = None
    if pred.seg_probs is not None:
        seg = keep_largest_components(np.argmax(pred.seg_probs, axis=0).astype(np.uint8))
    warped = warp(Volume(pair.moving_labels, pair.grid), Volume(dvf, pair.grid), "label", 0)
    return _Paths(seg, keep_largest_components(warped.array), dvf)


def _run_iterative(pair: PreparedPair) -> _Paths:
    fixed = Volume(pair.fixed, pair.grid)
    moving = Volume(pair.moving, pair.grid)
    result = bspline_register(fixed, moving, fixed_mask=Volume(pair.body, pair.grid))
    dvf = dense_field(result.transform, pair.grid).array
    warped = Volume(pair.moving_labels, pair.grid).resample(
        pair.grid, "label", 0, transform=result.transform
    )
    return _Paths(None, keep_largest_components(warped.array), dvf)


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
    from jrs.dicom.ct import read_ct_series
    from jrs.dicom.reg import write_deformable_registration
    from jrs.dicom.rtstruct import masks_from_files, write_rtstruct
    from jrs.review import render_review

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
    structure_set, planning, planning_masks = masks_from_files(planning_ct, planning_rtstruct)
    daily = read_ct_series(daily_ct)
    t = lap("read", t)

    label_array, used = label_map_from_masks(
        {k: v.array for k, v in planning_masks.items()}, opts.synonyms
    )
    planning_labels = planning.volume.with_array(label_array)
    prealign = affine_prealign(daily.volume, planning.volume)
    t = lap("prealign", t)

    box = _organ_box(planning_labels, prealign.transform, daily.volume.geometry, opts.margin_mm)
    pair = prepare_pair(daily.volume, planning.volume, planning_labels, box=box, prealign=prealign)
    t = lap("prepare", t)

    if opts.method == "network":
        if backend is None:  # pragma: no cover - load_backend raises first
            raise ModelNotReady("no network loaded")
        paths = _run_network(backend, pair)
    elif opts.method == "iterative":
        paths = _run_iterative(pair)
    else:
        raise InvalidInput(f"method {opts.method!r} unknown; use 'network' or 'iterative'")
    t = lap("network" if opts.method == "network" else "iterative", t)

    # choose a path per organ
    model_choice: Mapping[str, str] = (
        backend.metadata.get("path_choice", {}) if backend is not None else {}
    )
    chosen = np.zeros(pair.grid.shape, np.uint8)
    sources: dict[int, str] = {}
    for lab in sorted(used):
        organ = LABELS[lab]
        want = opts.path_choice.get(organ, model_choice.get(organ, "segmentation"))
        if want not in ("segmentation", "registration"):
            raise InvalidInput(
                f"path choice {want!r} for {organ} unknown; use 'segmentation' or 'registration'"
            )
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
    taper = _taper(pair.grid)[..., None]
    u_box = Volume((paths.dvf * taper).astype(np.float32), pair.grid)
    full = _full_transform(prealign.transform, u_box)
    dvf_grid = daily.volume.geometry
    if opts.dvf_spacing_mm is not None:
        dvf_grid = dvf_grid.resampled_grid(opts.dvf_spacing_mm)
    dvf = dense_field(full, dvf_grid)
    box_field = dense_field(full, pair.grid)
    jac = jacobian_stats(box_field, pair.body)
    t = lap("dvf", t)

    # daily masks: organs from the chosen labels, every other ROI through the full mapping
    daily_geom = daily.volume.geometry
    chosen_daily = Volume(chosen, pair.grid).resample(daily_geom, "label", 0).array
    organ_of_name = {name: lab for lab, name in used.items()}
    daily_masks: dict[str, npt.NDArray[np.bool_]] = {}
    for name, mask in planning_masks.items():
        if name in organ_of_name:
            daily_masks[name] = chosen_daily == organ_of_name[name]
        else:
            warped = mask.with_array(mask.array.astype(np.float32)).resample(
                daily_geom, "linear", 0.0, transform=full
            )
            daily_masks[name] = warped.array >= 0.5
    t = lap("propagate", t)

    # QA
    structures: list[StructureQa] = []
    for name, daily_mask in daily_masks.items():
        organ_label = organ_of_name.get(name)
        path_dice = None
        border = False
        if organ_label is not None:
            if paths.segmentation is not None:
                path_dice = dice(
                    paths.segmentation == organ_label, paths.registration == organ_label
                )
            border = _touches_border(chosen == organ_label)
        default_source = "iterative" if opts.method == "iterative" else "registration"
        qa_item = StructureQa(
            name=name,
            organ=LABELS[organ_label] if organ_label is not None else None,
            source=sources.get(organ_label, default_source)
            if organ_label is not None
            else default_source,
            planning_cc=round(volume_cc(planning_masks[name].array, planning.volume.geometry), 3),
            daily_cc=round(volume_cc(daily_mask, daily_geom), 3),
            path_dice=None if path_dice is None else round(path_dice, 4),
            touches_crop_border=border,
        )
        structures.append(flag_structure(qa_item, opts.thresholds))
    dvf_flags = flag_dvf(jac, opts.thresholds)
    t = lap("qa", t)

    # outputs
    out_dir.mkdir(parents=True, exist_ok=True)
    colors = {r.name: r.color for r in structure_set.rois if r.color is not None}
    types = {r.name: r.interpreted_type for r in structure_set.rois if r.interpreted_type}
    rt_path = out_dir / "rtstruct.dcm"
    write_rtstruct(
        daily_masks,
        daily,
        rt_path,
        colors=colors,
        interpreted_types=types,
        structure_set_label="JRS",
        series_description=f"jrs re-contoured ({opts.method})",
    )
    dvf_path = out_dir / "dvf.mha"
    dvf.write(str(dvf_path), compress=False)
    reg_path = out_dir / "registration.dcm"
    write_deformable_registration(dvf, daily, planning, reg_path)
    planned = _planned_on_daily(planning_masks, used, prealign.transform, daily_geom)
    flagged = [s.name for s in structures if s.flags]
    review_path = render_review(
        daily.volume,
        {name: daily_masks[name] for name in used.values()},
        out_dir / "review.png",
        planned=planned,
        colors=colors,
        focus=used.get(4),
        flagged=flagged,
        title=f"jrs {opts.method}: solid = new contours, dashed = planning after pre-alignment",
    )
    t = lap("write", t)
    times["total"] = round(time.perf_counter() - t_all, 4)

    meta = backend.metadata if backend is not None else {}
    qa_data: dict[str, Any] = {
        "method": opts.method,
        "model": {
            "name": meta.get("name"),
            "version": meta.get("version"),
            "git_sha": meta.get("git_sha"),
            "sha256": meta.get("sha256"),
            "execution_provider": getattr(backend, "execution_provider", None),
        },
        "structures": [s.__dict__ for s in structures],
        "dvf": {
            **{k: round(v, 6) for k, v in jac.items()},
            "flags": dvf_flags,
            "grid": {
                "shape_zyx": list(dvf_grid.shape),
                "spacing_mm": [float(s) for s in dvf_grid.spacing],
            },
        },
        "prealign": {
            "metric": prealign.metric,
            "matrix": list(prealign.transform.GetMatrix()),
            "translation_mm": list(prealign.transform.GetTranslation()),
            "center_mm": list(prealign.transform.GetCenter()),
        },
        "network_box_mm": {"lower": box[0].tolist(), "upper": box[1].tolist()},
        "flagged": flagged + (["DVF"] if dvf_flags else []),
        "warnings": list(
            dict.fromkeys([*daily.warnings, *planning.warnings, *structure_set.warnings])
        ),
        "timings_s": times,
    }
    qa_path = out_dir / "qa.json"
    qa_path.write_text(json.dumps(qa_data, indent=2, default=_json_default))
    log.info(
        "re-contoured in %.1f s (%s); %d structure(s) flagged",
        times["total"],
        opts.method,
        len(flagged),
    )
    path_labels = {"registration": Volume(paths.registration, pair.grid)}
    if paths.segmentation is not None:
        path_labels["segmentation"] = Volume(paths.segmentation, pair.grid)
    path_labels["chosen"] = Volume(chosen, pair.grid)
    return RecontourResult(
        out_dir, rt_path, dvf_path, reg_path, qa_path, review_path, qa_data, path_labels
    )


def _planned_on_daily(
    planning_masks: Mapping[str, Volume],
    used: Mapping[int, str],
    prealign: sitk.Transform,
    daily: Geometry,
) -> dict[str, npt.NDArray[np.bool_]]:
    """Planning organ masks after pre-alignment only (the dashed contours of the review)."""
    out: dict[str, npt.NDArray[np.bool_]] = {}
    for name in used.values():
        m = planning_masks[name]
        out[name] = (
            m.with_array(m.array.astype(np.float32))
            .resample(daily, "linear", 0.0, transform=prealign)
            .array
            >= 0.5
        )
    return out


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
