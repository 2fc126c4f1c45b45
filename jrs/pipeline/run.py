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
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from jrs.core.errors import InvalidInput, JrsError, ModelNotReady
from jrs.core.geometry import Geometry, Volume
from jrs.core.labels import (
    LABELS,
    SynonymTable,
    is_external_roi,
    is_target_volume,
    label_map_from_mapping,
)
from jrs.core.metrics import dice, surface_distances, volume_cc
from jrs.inference.cascade import network_passes, refine
from jrs.inference.null_cache import (
    PlanningNull,
    cache_for,
    check_null_pass,
    default_cache_root,
    planning_null,
    transport,
)
from jrs.inference.null_correction import (
    NullCorrection,
    null_correct,
    null_correction_enabled,
    subtract_null,
)
from jrs.inference.postprocess import COMPONENTS_KEPT, keep_largest_components
from jrs.inference.preprocess import HU_SCALE, PreparedPair, mask_box, prepare_pair
from jrs.inference.smoothing import field_smoothing_sigma, smooth_field
from jrs.qa.contour_fit import contour_fit
from jrs.qa.family import flag_same_organ
from jrs.qa.figures import (
    QaThresholds,
    StructureQa,
    flag_dvf,
    flag_structure,
    image_evidence,
    jacobian_report,
    qa_reference_paths,
    structure_evidence,
)
from jrs.qa.plausibility import PlausibilityLimits, check_coverage, check_planning, enforce
from jrs.qa.residual_shift import (
    RESIDUAL_BAND_MM,
    RESIDUAL_RANGE_MM,
    RESIDUAL_SMOOTH_MM,
    residual_shift,
)
from jrs.registration.far_field import INSET_MM, FarField, bony_prealign, far_field_transform
from jrs.registration.focus import DEFAULT_PREALIGN, PrealignMode, prealign_pair
from jrs.registration.instance_optimisation import RefineReport, check_refine_mode, refine_field
from jrs.registration.iterative import bspline_register
from jrs.registration.prealign import AffineResult, affine_prealign

if TYPE_CHECKING:
    from jrs.io.series import CTSeries

log = logging.getLogger(__name__)

Path_ = Literal["segmentation", "registration", "fusion"]
FarFieldMode = Literal["bony", "focus"]
FAR_FIELD_MODES: tuple[str, ...] = ("bony", "focus")
#: The output paths a path choice may name.
PATHS: tuple[str, ...] = ("segmentation", "registration", "fusion")


def parse_path_choice(
    values: Iterable[str] | None, source: str = "--path-choice"
) -> dict[str, str]:
    """Parse ``ORGAN=PATH`` items (comma-separated or repeated) into organ key -> path.

    ``ORGAN`` is an organ key (``prostate``, ``seminal_vesicles``, ``rectum``, ``bladder``) or
    ``all``; ``PATH`` is ``segmentation``, ``registration`` or ``fusion``. Later items win.

    Args:
        values: The items, e.g. ``["all=registration", "prostate=fusion"]`` or
            ``["all=registration,prostate=fusion"]``.
        source: Where they come from (``--path-choice``, ``JRS_PATH_CHOICE``), for errors.

    Returns:
        Organ key -> path (empty for no items).

    Raises:
        InvalidInput: For an item that is not ``ORGAN=PATH`` with a known organ and path.
    """
    from jrs.core.labels import LABELS

    organs = list(LABELS.values())
    out: dict[str, str] = {}
    for item in (part.strip() for value in values or [] for part in value.split(",")):
        if not item:
            continue
        organ, sep, path = (x.strip() for x in item.partition("="))
        if not sep or path not in PATHS or organ not in (*organs, "all"):
            raise InvalidInput(
                f"{source} {item!r}: expected ORGAN=PATH with ORGAN one of "
                f"{', '.join(organs)} or all, and PATH one of {', '.join(PATHS)}"
            )
        out.update(dict.fromkeys(organs, path) if organ == "all" else {organ: path})
    return out


TAPER_MM = 10.0
#: Default spacing of the written DVF (``dvf.mha``, ``registration.dcm``), mm.
DEFAULT_DVF_SPACING_MM = 3.0
#: where the bundled models live (``models/<name>/<version>``), overridable by JRS_MODEL_DIR.
BUNDLED_MODELS = Path(__file__).resolve().parents[2] / "models"


class NetworkPrediction(Protocol):
    """What a network backend returns (see `jrs.inference`)."""

    @property
    def seg_probs(self) -> npt.NDArray[np.float32] | None:
        """(5, nz, ny, nx) class probabilities on the input grid, or None."""

    @property
    def dvf(self) -> npt.NDArray[np.float32]:
        """(3, nz, ny, nx) displacement, voxels of the 1 mm grid (= mm), channels x, y, z."""


class NetworkBackend(Protocol):
    """A loaded network (`jrs.inference.Model` is one)."""

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
        engine: ``auto`` (ONNX Runtime on CUDA, else OpenVINO on the CPU, else ONNX Runtime),
            ``onnxruntime`` or ``openvino`` (see `jrs.inference.load_model`).
        precision: ``auto`` (bf16 with OpenVINO on a CPU that has it, else fp32), ``fp32``,
            ``bf16`` or ``fp16`` (TensorRT).
        synonyms: ROI-name synonym table.
        path_choice: organ key -> ``segmentation``, ``registration`` or ``fusion`` (the two
            paths fused, `jrs.inference.fusion`, with the method and per-organ weights of the
            model's metadata ``fusion``; 0.5 / 0.5 ``weighted`` without); missing organs use the
            model's validated choice (metadata ``path_choice``), else ``segmentation``.
        margin_mm: margin around the pre-aligned planning organs for the network box, mm.
        thresholds: QA thresholds.
        plausibility: limits of the plausibility checks run before the network
            (`jrs.qa.plausibility`); a failed check refuses the network method, and is a warning
            of the iterative method.
        dvf_spacing_mm: write the DVF (``dvf.mha``, ``registration.dcm``) on a grid over the
            daily CT (same orientation, covering it) with this spacing, mm; an axis whose CT
            spacing is coarser keeps the CT's. None (or 0) = the daily CT grid itself.
        fusion_method: ``weighted`` or ``staple``: overrides the method of the model's metadata
            ``fusion`` for the organs fused (None: the model's, else ``weighted``).
        keep_fusion: also fuse every organ the path choice does not (network method), for
            validation: kept in `RecontourResult.path_labels` (``fusion``, and the pre-aligned
            planning organs as ``prealigned``), never written.
        null_correction: subtract the network's field for the planning scan paired with
            itself (`jrs.inference.null_correction`: the same scan twice then moves nothing);
            None: the model's metadata ``null_correction``, on when absent.
        dvf_smoothing_mm: Gaussian sigma (mm) of the filter applied to the network's final
            field (`jrs.inference.smoothing`; 0: none); None: the model's metadata
            ``dvf_smoothing_mm``, none when absent.
        network_passes: network passes on the pair (`jrs.inference.cascade`: each pass after the
            first
            registers what the field so far left over); None: the model's metadata
            ``network_passes``, 1 when absent.
        prealign: ``prostate`` (default): the whole-body rigid match refined rigidly on the
            planning prostate and seminal vesicles with their surroundings
            (`jrs.registration.focus`; the whole-body affine when the planning scan has neither);
            ``affine``: the whole-body rigid then affine match alone.
        method_consensus: with ``--method iterative``, also run the network (when a model
            loads) and compare each organ's contour with the network's registration path of it
            (`jrs.qa.figures.StructureQa.method_dice`, flag ``method_disagreement``); about a tenth
            of the iterative run (docs/benchmarks.md).
        far_field: ``bony`` (default): outside the network box the mapping follows a rigid
            match of the bones (`jrs.registration.far_field`), blended smoothly from the box's
            mapping over `jrs.registration.far_field.BLEND_MM`; ``focus``: the pre-alignment of the
            box everywhere outside it (the mapping before the bony match existed).
        refine: ``on``: the network's field is refined on the pair
            (`jrs.registration.instance_optimisation`: a coarse B-spline registration on top of it,
            kept per organ where it improves the image agreement around the organ); ``off``
            (default: on the held-out cases measured so far it changed no organ's DSC by more than
            0.001, at about 30 s on two cores, docs/benchmarks.md): the network's field as it is.
        null_pass: ``planning`` (default): the null-field correction's pass runs once per
            planning scan, on the planning box, is kept in ``cache_dir`` and is carried onto
            each pair and cascaded pass (`jrs.inference.null_cache`: two network passes fewer per
            run); ``pair``: it runs on every pair and every cascaded pass.
        cache_dir: the product's cache folder (``null-fields/``; OpenVINO's compiled models
            under ``openvino/``): ``$JRS_CACHE_DIR``, else ``~/.cache/jrs``; None: no cache
            on disk.
    """

    method: Literal["network", "iterative"] = "network"
    model_dir: Path | None = None
    device: str = "auto"
    engine: str = "auto"
    precision: str = "auto"
    synonyms: SynonymTable | None = None
    path_choice: Mapping[str, Path_] = field(default_factory=dict)
    margin_mm: float = 30.0
    thresholds: QaThresholds = field(default_factory=QaThresholds)
    plausibility: PlausibilityLimits = field(default_factory=PlausibilityLimits)
    dvf_spacing_mm: float | None = DEFAULT_DVF_SPACING_MM
    fusion_method: str | None = None
    keep_fusion: bool = False
    null_correction: bool | None = None
    dvf_smoothing_mm: float | None = None
    network_passes: int | None = None
    prealign: PrealignMode = DEFAULT_PREALIGN
    method_consensus: bool = True
    far_field: FarFieldMode = "bony"
    refine: str = "off"
    null_pass: str = "planning"
    cache_dir: Path | None = field(default_factory=default_cache_root)


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
        path_labels: the organ label maps (ids of `jrs.core.labels`, post-processed) of each output
            path on the network grid (1 mm box): ``segmentation`` (network method only),
            ``registration`` (or the iterative result), ``fusion`` (the organs fused; every
            organ with ``keep_fusion``), ``chosen`` and, with ``keep_fusion``, ``prealigned``
            (the planning organs after the pre-alignment alone) and ``unaligned`` (the planning
            organs as they lie in patient coordinates: no registration); kept for validation,
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
    """Load and compile the model named by the options (never imports torch).

    The engine, device and precision come from the options (`jrs.inference.load_model`); keep
    the result for the next cases (the service and batch workers do). OpenVINO keeps its
    compiled models in ``<cache_dir>/openvino`` (its ``CACHE_DIR``): another process meeting the
    same window shape loads it rather than compiling it.
    """
    model_dir = options.model_dir or default_model_dir()
    from jrs.inference import load_model

    ov_cache = {"cache_dir": options.cache_dir / "openvino"} if options.cache_dir else None
    backend: NetworkBackend = load_model(
        model_dir,
        device=options.device,
        engine=options.engine,
        precision=options.precision,
        openvino_options=ov_cache,
    )
    return backend


def dvf_grid(daily: Geometry, spacing_mm: float | None) -> Geometry:
    """The grid the DVF is written on: over the daily CT with ``spacing_mm``, or the CT's own.

    The grid has the daily CT's orientation and covers its voxel centres (it overhangs by less
    than one spacing, evenly on both sides); an axis whose CT spacing is already at least
    ``spacing_mm`` keeps the CT's spacing and samples.

    Args:
        daily: the daily CT grid.
        spacing_mm: target spacing, mm; ``None`` or 0 for the daily grid itself.

    Returns:
        The DVF grid (frame of reference of the daily CT).
    """
    if spacing_mm is None or spacing_mm <= 0:
        return daily
    native = np.asarray(daily.spacing, float)
    spacing = np.maximum(native, float(spacing_mm))
    n = np.asarray(daily.size_xyz, int)
    extent = (n - 1) * native
    coarse = spacing > native
    m = np.where(coarse, np.ceil(extent / spacing - 1e-6).astype(int) + 1, n)
    overhang = np.where(coarse, ((m - 1) * spacing - extent) / 2.0, 0.0)
    origin = daily.origin - daily.direction @ overhang
    return Geometry(
        (int(m[2]), int(m[1]), int(m[0])),
        origin,
        spacing,
        daily.direction,
        daily.frame_of_reference_uid,
    )


def _index_box(
    geometry: Geometry, points: npt.ArrayLike, pad_mm: float = 0.0
) -> tuple[slice, slice, slice] | None:
    """Array slices (z, y, x) of the part of a grid around LPS points (grown by ``pad_mm``).

    Args:
        geometry: the grid.
        points: (N, 3) LPS points, mm.
        pad_mm: margin added on every side, mm.

    Returns:
        The slices, clipped to the grid; None when the points fall outside it.
    """
    idx = geometry.physical_to_index(np.asarray(points, float).reshape(-1, 3))
    pad = float(pad_mm) / geometry.spacing
    size = np.asarray(geometry.size_xyz)
    lo = np.clip(np.floor(idx.min(axis=0) - pad).astype(int), 0, size)
    hi = np.clip(np.ceil(idx.max(axis=0) + pad).astype(int) + 1, 0, size)
    if np.any(hi <= lo):
        return None
    return (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))


def _sub_grid(geometry: Geometry, box: tuple[slice, slice, slice]) -> Geometry:
    """The part of a grid that array slices (z, y, x) select."""
    start = [float(box[2].start), float(box[1].start), float(box[0].start)]
    return Geometry(
        (box[0].stop - box[0].start, box[1].stop - box[1].start, box[2].stop - box[2].start),
        geometry.index_to_physical(start),
        geometry.spacing,
        geometry.direction,
        geometry.frame_of_reference_uid,
    )


def _intersect(
    a: tuple[slice, slice, slice], b: tuple[slice, slice, slice]
) -> tuple[slice, slice, slice] | None:
    out = tuple(
        slice(max(x.start, y.start), min(x.stop, y.stop)) for x, y in zip(a, b, strict=True)
    )
    return None if any(s.stop <= s.start for s in out) else out  # type: ignore[return-value]


def _crop_to_mask(mask: Volume) -> Volume | None:
    """The mask cut to its bounding box plus one empty voxel per side (None when empty)."""
    arr = np.asarray(mask.array)
    sl = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(arr.any(axis=other))
        if hit.size == 0:
            return None
        sl.append(slice(max(int(hit[0]) - 1, 0), min(int(hit[-1]) + 2, arr.shape[axis])))
    box = (sl[0], sl[1], sl[2])
    return Volume(np.ascontiguousarray(arr[box]), _sub_grid(mask.geometry, box))


def _crop(volume: Volume, box: tuple[slice, slice, slice]) -> Volume:
    """The part of a volume that array slices (z, y, x) select (a view of its array)."""
    return Volume(volume.array[box], _sub_grid(volume.geometry, box))


def _nonzero_box(array: npt.NDArray[Any], pad: int = 0) -> tuple[slice, slice, slice] | None:
    """Array slices of the bounding box of the non-zero voxels, grown by ``pad`` (clipped)."""
    sl = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(array.any(axis=other))
        if hit.size == 0:
            return None
        sl.append(slice(max(int(hit[0]) - pad, 0), min(int(hit[-1]) + 1 + pad, array.shape[axis])))
    return (sl[0], sl[1], sl[2])


def _mask_on_grid(
    mask: npt.NDArray[np.bool_], geometry: Geometry, grid: Geometry
) -> npt.NDArray[np.uint8]:
    """A mask resampled (nearest neighbour) onto another grid, only around its bounding box.

    Args:
        mask: (nz, ny, nx) mask on ``geometry``.
        geometry: its grid.
        grid: the grid to resample onto.

    Returns:
        (nz', ny', nx') 0/1 mask on ``grid`` (all 0 when the mask is empty or outside it).
    """
    out = np.zeros(grid.shape, np.uint8)
    box = _nonzero_box(mask, 1)
    if box is None:
        return out
    local = Volume(np.ascontiguousarray(mask[box], dtype=np.uint8), _sub_grid(geometry, box))
    target = _index_box(grid, local.geometry.corners(), float(np.max(grid.spacing)))
    if target is not None:
        out[target] = local.resample(_sub_grid(grid, target), "label", 0).array
    return out


def _largest_components(labels: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """`keep_largest_components`, each organ's components found inside its own bounding box.

    The same result as on the whole grid (components do not leave the box of their voxels), at
    the cost of the organs' boxes rather than of the network box.
    """
    out = np.zeros(labels.shape, np.uint8)
    for organ, keep in COMPONENTS_KEPT.items():
        box = _nonzero_box(labels == organ)
        if box is None:
            continue
        kept = keep_largest_components(np.ascontiguousarray(labels[box]), {organ: keep}) == organ
        out[box][kept] = organ
    return out


def _warp_labels(
    labels: npt.NDArray[np.uint8], dvf: npt.NDArray[np.float32], grid: Geometry, reach_mm: float
) -> npt.NDArray[np.uint8]:
    """Labels warped by a pull field on their own grid (`jrs.core.fields.warp`, ``label``).

    The result of ``warp(labels, dvf, "label", 0)``: each label's one-hot map interpolated
    linearly at ``p + u(p)`` (background outside the grid), the largest wins (ties: the lowest
    label); SimpleITK's ``sitkLabelLinear`` interpolator, multi-threaded, and only inside the
    labels' bounding box grown by the field's reach (no voxel further away can pull a label).

    Args:
        labels: (nz, ny, nx) label map on ``grid``.
        dvf: (nz, ny, nx, 3) pull displacement on ``grid``, mm, LPS (x, y, z) components.
        grid: the grid.
        reach_mm: largest displacement length, mm.

    Returns:
        (nz, ny, nx) warped label map, dtype of ``labels``.
    """
    out = np.zeros(labels.shape, labels.dtype)
    pad = int(np.ceil(reach_mm / float(grid.spacing.min()))) + 2
    box = _nonzero_box(labels, pad)
    if box is None:
        return out
    source = Volume(np.ascontiguousarray(labels[box]), _sub_grid(grid, box)).to_sitk()
    field = sitk.GetImageFromArray(np.ascontiguousarray(dvf[box], dtype=np.float64), isVector=True)
    field.CopyInformation(source)
    transform = sitk.DisplacementFieldTransform(field)
    warped = sitk.Resample(source, source, transform, sitk.sitkLabelLinear, 0)
    out[box] = sitk.GetArrayViewFromImage(warped)
    return out


def _with_overlaps(
    labels: npt.NDArray[np.uint8],
    label: int,
    moved: Mapping[int, npt.NDArray[np.bool_]],
) -> npt.NDArray[np.bool_]:
    """An organ of a label map, plus its planning overlaps with the other organs, moved.

    A label map holds one organ a voxel, so the voxels the planning contours of two organs share
    (seminal vesicles entering the prostate) went to one of them. They are given back to the
    organ: the voxels where its moved planning contour and another organ's moved planning contour
    overlap, and which the map gave to that other organ.

    Args:
        labels: (nz, ny, nx) organ label map on the daily grid (one organ a voxel).
        label: the organ's id.
        moved: organ id -> (nz, ny, nx) that organ's planning contour moved onto the daily grid
            (by the registration), for every organ delineated.

    Returns:
        (nz, ny, nx) the organ's mask.
    """
    own = labels == label
    mine = moved.get(label)
    if mine is None:
        return own
    for other, theirs in moved.items():
        if other != label:
            own |= mine & theirs & (labels == other)
    return own


def propagate_mask(
    mask: Volume,
    daily: Geometry,
    prealign: sitk.AffineTransform,
    full: sitk.Transform | None = None,
    network_box: tuple[slice, slice, slice] | None = None,
    reach_mm: float = 0.0,
    outer: sitk.Transform | None = None,
    outer_reach_mm: float = 0.0,
) -> npt.NDArray[np.bool_]:
    """A planning mask on the daily grid through ``full`` (pull: daily point -> planning point).

    Equivalent to resampling the whole 0/1 mask linearly onto the whole daily grid and keeping
    ``>= 0.5``, but only the mask's own bounding box is resampled: the daily region whose
    pre-aligned image can reach it (the affine pre-image of the box grown by ``reach_mm``, the
    largest network displacement). There ``prealign`` alone maps daily to planning points, except
    inside ``network_box`` (slices of the daily grid), where ``full`` (the affine plus the
    tapered network field, which is zero outside that box) is used.

    Args:
        mask: (nz, ny, nx) planning mask, non-zero inside.
        daily: the daily CT grid.
        prealign: the affine pre-alignment (daily point -> planning point).
        full: the whole mapping; None = the affine alone.
        network_box: where ``full`` differs from ``prealign`` (slices of the daily grid).
        reach_mm: largest length of the network displacement, mm.
        outer: the mapping outside ``network_box`` (`jrs.registration.far_field`: the pre-alignment
            after
            the far-field correction); None = ``prealign``.
        outer_reach_mm: largest length of the far-field correction, mm.

    Returns:
        (nz, ny, nx) boolean mask on the daily grid.
    """
    out = np.zeros(daily.shape, dtype=bool)
    crop = _crop_to_mask(mask)
    if crop is None:
        return out
    inverse = prealign.GetInverse()
    corners = np.array(
        [inverse.TransformPoint(tuple(map(float, p))) for p in crop.geometry.corners()]
    )
    pad = (
        2.0 * float(daily.spacing.max())
        + (float(reach_mm) if full is not None else 0.0)
        + float(outer_reach_mm)
    )
    box = _index_box(daily, corners, pad)
    if box is None:
        return out
    source = crop.with_array(crop.array.astype(np.float32))
    inner = _intersect(box, network_box) if full is not None and network_box is not None else None
    if inner != box:  # (a ROI the network box covers needs the full mapping alone)
        out[box] = (
            source.resample(_sub_grid(daily, box), "linear", 0.0, transform=outer or prealign).array
            >= 0.5
        )
    if full is not None and inner is not None:
        warped = source.resample(_sub_grid(daily, inner), "linear", 0.0, transform=full)
        out[inner] = warped.array >= 0.5
    return out


def box_field(prealign: sitk.AffineTransform, u: npt.NDArray[np.float32], grid: Geometry) -> Volume:
    """``A(p + u(p)) - p`` on a grid, computed directly (equals `dense_field` of the composite).

    Args:
        prealign: the affine ``A`` (daily point -> planning point).
        u: (nz, ny, nx, 3) displacement on ``grid``, mm, LPS components.
        grid: the grid of ``u``.

    Returns:
        (nz, ny, nx, 3) float32 field, mm.
    """
    m = np.asarray(prealign.GetMatrix(), float).reshape(3, 3)
    c = np.asarray(prealign.GetCenter(), float)
    t = np.asarray(prealign.GetTranslation(), float)
    # A(p + u) - p = (M - I) p + M u + (c + t - M c); p = origin + D S idx
    a = grid.direction * grid.spacing[None, :]
    lin = (m - np.eye(3)) @ a  # per index step
    const = (m - np.eye(3)) @ grid.origin + c + t - m @ c
    nz, ny, nx = grid.shape
    out = np.einsum("zyxc,dc->zyxd", u, m.astype(np.float32), optimize=True).astype(np.float32)
    out += (np.arange(nx, dtype=np.float32)[:, None] * lin[:, 0].astype(np.float32))[None, None]
    out += (np.arange(ny, dtype=np.float32)[:, None] * lin[:, 1].astype(np.float32))[None, :, None]
    out += (np.arange(nz, dtype=np.float32)[:, None] * lin[:, 2].astype(np.float32))[:, None, None]
    out += const.astype(np.float32)
    return Volume(out, grid)


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


def composed_field(
    prealign: sitk.AffineTransform,
    u_box: Volume,
    reference: Geometry,
    slab: int = 16,
    far: FarField | None = None,
) -> Volume:
    """``A(p + u(p) + h(p)) - p`` on any grid, ``u`` interpolated trilinearly (0 outside its grid).

    The same field as ``dense_field(_full_transform(prealign, u_box), reference)``, computed
    with numpy: the affine part is linear in the grid index, and ``u`` is interpolated only at
    the points that fall inside its own (network box) grid.

    Args:
        prealign: the affine ``A`` (daily point -> planning point).
        u_box: (nz, ny, nx, 3) displacement (mm, LPS) on its grid; zero at its faces (tapered).
        reference: the output grid.
        slab: output slices computed at a time (bounds the memory).
        far: the far-field correction ``h`` (`jrs.registration.far_field.FarField`, zero on the
            network
            box); None: ``h = 0``.

    Returns:
        (nz, ny, nx, 3) float32 field on ``reference``, mm.
    """
    from scipy import ndimage

    m = np.asarray(prealign.GetMatrix(), float).reshape(3, 3)
    c = np.asarray(prealign.GetCenter(), float)
    t = np.asarray(prealign.GetTranslation(), float)
    step = reference.direction * reference.spacing[None, :]  # LPS step per (i, j, k) index
    lin = (m - np.eye(3)) @ step
    const = (m - np.eye(3)) @ reference.origin + c + t - m @ c
    nz, ny, nx = reference.shape
    out = np.empty((nz, ny, nx, 3), np.float32)
    plane = (
        np.arange(nx, dtype=np.float64)[None, :, None] * lin[:, 0]
        + np.arange(ny, dtype=np.float64)[:, None, None] * lin[:, 1]
        + const
    )  # (ny, nx, 3)
    for k in range(nz):
        out[k] = plane + k * lin[:, 2]
    if far is not None and not far.is_identity():
        col, row = np.meshgrid(np.arange(nx, dtype=np.float64), np.arange(ny, dtype=np.float64))
        for k in range(nz):
            pts = reference.index_to_physical(np.stack([col, row, np.full_like(col, k)], axis=-1))
            out[k] += (far.correction(pts) @ m.T).astype(np.float32)
    inner = _index_box(reference, u_box.geometry.corners(), 0.0)
    if inner is None:
        return Volume(out, reference)
    box_grid = u_box.geometry
    size = np.asarray(box_grid.size_xyz, float)
    channels = [np.asarray(u_box.array[..., a], np.float32) for a in range(3)]
    for k0 in range(inner[0].start, inner[0].stop, slab):
        k1 = min(k0 + slab, inner[0].stop)
        kk, jj, ii = np.meshgrid(
            np.arange(k0, k1, dtype=np.float64),
            np.arange(inner[1].start, inner[1].stop, dtype=np.float64),
            np.arange(inner[2].start, inner[2].stop, dtype=np.float64),
            indexing="ij",
        )
        pts = reference.index_to_physical(np.stack([ii, jj, kk], axis=-1))
        idx = box_grid.physical_to_index(pts)  # (i, j, k) in the box grid
        keep = np.all((idx >= 0.0) & (idx <= size - 1.0), axis=-1)
        if not keep.any():
            continue
        coords = idx[keep][:, ::-1].T  # (k, j, i) rows
        v = np.stack(
            [ndimage.map_coordinates(ch, coords, order=1, mode="nearest") for ch in channels],
            axis=-1,
        )
        region = out[k0:k1, inner[1], inner[2]]
        region[keep] += (v @ m.T).astype(np.float32)
        out[k0:k1, inner[1], inner[2]] = region
    return Volume(out, reference)


def _full_transform(
    prealign: sitk.Transform, dvf_grid: Volume | None, far: sitk.Transform | None = None
) -> sitk.Transform:
    """Daily point -> planning point: ``A(q + h(q))``, ``q = p + u(p)`` (``u`` = 0 off its grid).

    ``h`` (the far-field correction, zero on the network box) is applied after ``u``; since
    ``u`` is zero outside the box and ``h`` zero on it, this is ``A(p + u(p) + h(p))`` up to
    ``h`` within ``|u|`` of the box's faces, where both are tapered to near zero.
    """
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(prealign)
    if far is not None:
        composite.AddTransform(far)
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


def _residual_shifts(
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
    boxes = [b for b in (_nonzero_box(m) for m in present.values()) if b is not None]
    z, y, x = (
        slice(
            max(min(b[i].start for b in boxes) - int(pad[i]), 0),
            min(max(b[i].stop for b in boxes) + int(pad[i]), geom.shape[i]),
        )
        for i in range(3)
    )
    box = (z, y, x)
    sub = _sub_grid(geom, box)
    mapped = planning.resample(sub, "linear", -1000.0, transform=full).array
    image = np.asarray(daily.array[box])
    return {name: residual_shift(image, mapped, m[box], sub) for name, m in present.items()}


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
    network: dict[str, Any] | None = None  # inference timings (window, tiles, run/compile s)
    # the backend's prediction (seg logits or probabilities), read by fusion inside organ boxes
    prediction: NetworkPrediction | None = None


def _run_network(
    backend: NetworkBackend,
    pair: PreparedPair,
    null_correction: bool,
    smoothing_mm: float = 0.0,
    passes: int = 1,
    planning: PlanningNull | None = None,
) -> _Paths:
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
            lambda: _largest_components(_warp_labels(pair.moving_labels, dvf, pair.grid, reach))
        )
        if logits_argmax is not None:
            seg = _largest_components(np.asarray(logits_argmax, np.uint8))
        elif pred.seg_probs is not None:
            seg = _largest_components(np.argmax(pred.seg_probs, axis=0).astype(np.uint8))
        registration = reg_job.result()
    timings = getattr(pred, "timings", None)
    as_dict = getattr(timings, "as_dict", None)
    network: dict[str, Any] = dict(as_dict()) if callable(as_dict) else {}
    network["null_correction"] = null.as_dict() if null is not None else {"applied": False}
    network["cascade"] = cascade.as_dict()
    network["dvf_smoothing"] = {"sigma_mm": smoothing_mm, "seconds": round(smoothing_s, 3)}
    return _Paths(seg, registration, dvf, network, pred)


def _fuse_paths(
    paths: _Paths,
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
        paths: the two paths, the DVF and the prediction of `_run_network`.
        pair: the prepared network grid, with the pre-aligned planning labels.
        organs: label ids to fuse.
        metadata: the model's ``metadata.json`` content (its ``fusion`` entry).
        method: overrides the metadata's fusion method (None: keep it).

    Returns:
        (nz, ny, nx) uint8 map of the fused organs on the network grid, or None.
    """
    if not organs or paths.segmentation is None:
        return None
    from jrs.inference.fusion import (
        FusionSpec,
        ProbabilitySource,
        fuse_network_paths,
        hard_probability,
        probability_source,
        softmax_source,
    )

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


def _refine(paths: _Paths, pair: PreparedPair, used: Mapping[int, str]) -> RefineReport:
    """Refine the network's field on the pair (`jrs.registration.instance_optimisation`), in place.

    The registration path is made again from the refined field; the segmentation path is not
    refined. The report keeps how far each organ's contour moved.
    """
    organs = {LABELS[lab]: paths.registration == lab for lab in used}
    dvf, report = refine_field(pair.fixed, pair.moving, paths.dvf, pair.grid, pair.body, organs)
    if report.applied:
        paths.dvf = dvf
        reach = float(np.sqrt((dvf**2).sum(axis=-1)).max()) if dvf.size else 0.0
        paths.registration = _largest_components(
            _warp_labels(pair.moving_labels, dvf, pair.grid, reach)
        )
    return report


def _run_iterative(pair: PreparedPair) -> _Paths:
    fixed = Volume(pair.fixed, pair.grid)
    moving = Volume(pair.moving, pair.grid)
    result = bspline_register(fixed, moving, fixed_mask=Volume(pair.body, pair.grid))
    dvf = dense_field(result.transform, pair.grid).array
    warped = Volume(pair.moving_labels, pair.grid).resample(
        pair.grid, "label", 0, transform=result.transform
    )
    return _Paths(None, _largest_components(warped.array), dvf)


def _network_reference(
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
    return _run_model(net, opts, pair, lambda: planning(net)).registration


def _run_model(
    backend: NetworkBackend,
    opts: RecontourOptions,
    pair: PreparedPair,
    planning: Callable[[], PlanningNull] | None = None,
) -> _Paths:
    """`_run_network` with the options' (else the metadata's) correction, smoothing, passes.

    ``planning`` gives the planning scan's null field (`jrs.inference.null_cache`); it is asked for
    only when the correction applies and ``opts.null_pass`` is ``planning``.
    """
    correct = null_correction_enabled(backend.metadata, opts.null_correction)
    carried = (
        planning()
        if correct and planning is not None and check_null_pass(opts.null_pass) == "planning"
        else None
    )
    return _run_network(
        backend,
        pair,
        correct,
        field_smoothing_sigma(backend.metadata, opts.dvf_smoothing_mm),
        network_passes(backend.metadata, opts.network_passes),
        carried,
    )


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
        box_labels = _propagation_region(structure_set, planning_masks, planning.volume)
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

    box = _organ_box(box_labels, prealign.transform, daily.volume.geometry, opts.margin_mm)
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
    footprint = _index_box(pgeom, reached, 2.0 * float(pgeom.spacing.max()) + 2.0)
    planning_ct_box = planning.volume if footprint is None else _crop(planning.volume, footprint)
    planning_labels_box = (
        planning_labels if footprint is None else _crop(planning_labels, footprint)
    )
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
    outer = _full_transform(prealign.transform, None, far_tx) if far_tx is not None else None
    t = lap("prepare", t)

    def planning_null_of(net: NetworkBackend) -> PlanningNull:
        """The planning scan's null field (`jrs.inference.null_cache`), on its box as a pair's."""
        own_box = _organ_box(
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
        paths = _run_model(backend, opts, pair, lambda: planning_null_of(net))
        t = lap("network", t)
        if check_refine_mode(opts.refine) == "on":
            refine_report = _refine(paths, pair, used)
            t = lap("refine", t)
    elif opts.method == "iterative":
        paths = _run_iterative(pair)
        t = lap("iterative", t)
    else:
        raise InvalidInput(f"method {opts.method!r} unknown; use 'network' or 'iterative'")
    # the iterative method's second opinion: the network's mapping of the same organs
    reference: npt.NDArray[np.uint8] | None = None
    if opts.method == "iterative" and used and opts.method_consensus:
        reference = _network_reference(backend, opts, pair, planning_null_of)
        t = lap("reference", t)

    # choose a path per organ (or fuse the two, inside the fused organs' boxes: `_fuse_paths`)
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
    fused = _fuse_paths(
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
    u_taper = paths.dvf * _taper(pair.grid)[..., None]
    if far is not None:
        u_taper *= far.weight_on(pair.grid)[..., None]
    reach_mm = float(np.sqrt((u_taper**2).sum(axis=-1)).max()) if u_taper.size else 0.0
    u_box = Volume(u_taper.astype(np.float32, copy=False), pair.grid)
    full = _full_transform(prealign.transform, u_box, far_tx)
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
        network_box = _index_box(daily_geom, pair.grid.corners(), 0.0)
        chosen_daily = np.zeros(daily_geom.shape, np.uint8)
        organs_box = _nonzero_box(chosen, 2)
        if organs_box is not None:
            organs = _crop(Volume(chosen, pair.grid), organs_box)
            target = _index_box(daily_geom, organs.geometry.corners(), 0.0)
            if target is not None:
                chosen_daily[target] = organs.resample(
                    _sub_grid(daily_geom, target), "label", 0
                ).array
        # an organ moved by the registration is its own planning contour moved like every other
        # ROI, so that it keeps its overlaps with its neighbours (seminal vesicles entering the
        # prostate), which a one-label-per-voxel map cuts off. An organ drawn by the network's
        # segmentation (or the fusion) comes from the label map, plus its planning overlaps with
        # the other organs, moved (`_with_overlaps`): the overlaps of the clinician's contours
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
                name: _with_overlaps(chosen_daily, drawn[name], moved)
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
            on_grid = _mask_on_grid(daily_mask, daily_geom, pair.grid)
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
        residuals = _residual_shifts(
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
                border = _touches_border(chosen == organ_label)
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
            planned = _planned_on_daily(planning_masks, used, prealign.transform, daily_geom)
            # the review shows the organs and every flagged ROI (the patient's outline aside)
            shown = list(dict.fromkeys([*used.values(), *(n for n in flagged if n not in outline)]))
            shown = shown or [n for n in daily_masks if n not in outline and daily_masks[n].any()]
            organ_masks = {name: daily_masks[name] for name in shown}
            review_ct, organ_masks, planned = _review_crop(daily.volume, organ_masks, planned)
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


def _review_crop(
    ct: Volume,
    contours: dict[str, npt.NDArray[np.bool_]],
    planned: dict[str, npt.NDArray[np.bool_]],
    margin_mm: float = 40.0,
) -> tuple[Volume, dict[str, npt.NDArray[np.bool_]], dict[str, npt.NDArray[np.bool_]]]:
    """The daily CT and masks cut to what `render_review` shows (its figure is unchanged).

    The review shows the box of the contours grown by ``margin_mm`` (its default); resampling
    only that part of the full-size masks saves most of its time.
    """
    union = np.zeros(ct.geometry.shape, dtype=bool)
    for mask in contours.values():
        union |= mask
    if not union.any():
        return ct, contours, planned
    lower, upper = mask_box(union, ct.geometry, margin_mm)
    corners = np.array(
        [
            [x, y, z]
            for x in (lower[0], upper[0])
            for y in (lower[1], upper[1])
            for z in (lower[2], upper[2])
        ]
    )
    box = _index_box(ct.geometry, corners, 2.0 * float(ct.geometry.spacing.max()) + 1.0)
    if box is None:
        return ct, contours, planned
    return (
        _crop(ct, box),
        {n: m[box] for n, m in contours.items()},
        {n: m[box] for n, m in planned.items()},
    )


def _propagation_region(structure_set: Any, masks: Mapping[str, Volume], ct: Volume) -> Volume:
    """The union of the ROIs but the patient's outline (all of them when that leaves none)."""
    outline = {r.name for r in structure_set.rois if is_external_roi(r.name, r.interpreted_type)}
    union = np.zeros(ct.geometry.shape, np.uint8)
    for name, mask in masks.items():
        if name not in outline:
            union |= np.asarray(mask.array, bool)
    if not union.any():
        for mask in masks.values():
            union |= np.asarray(mask.array, bool)
    return ct.with_array(union)


def _planned_on_daily(
    planning_masks: Mapping[str, Volume],
    used: Mapping[int, str],
    prealign: sitk.AffineTransform,
    daily: Geometry,
) -> dict[str, npt.NDArray[np.bool_]]:
    """Planning organ masks after pre-alignment only (the dashed contours of the review)."""
    return {name: propagate_mask(planning_masks[name], daily, prealign) for name in used.values()}


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
