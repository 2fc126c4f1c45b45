"""Per-organ fusion of the network's two output paths (METHOD.md, "Combining the two output paths").

The cross-stitch network gives two contours of every organ: the segmentation path (soft-max of the
logits on the daily CT) and the registration path (the planning labels warped by the DVF). Besides
choosing one path per organ, the pipeline may *fuse* them (path choice ``fusion``). Two methods:

* ``weighted``: per organ ``k`` and voxel ``v`` the fused membership probability is

  ``p_k(v) = w_seg,k * P_seg(k | v) + w_reg,k * P_reg(k | v)``

  with ``P_seg`` the soft-max of the segmentation logits, ``P_reg`` the planning one-hot map of
  organ ``k`` warped with linear interpolation (what SimpleITK's linear interpolator gives: the
  per-label weight of ``sitkLabelLinear``), and the two weights normalised to sum to 1 (default
  0.5 / 0.5; `weights_from_dice` derives them from validation). Weight 0 ignores a path.
* ``staple``: SimpleITK's binary STAPLE of the two paths' hard masks of organ ``k``: ``p_k(v)``
  is STAPLE's posterior foreground probability, from the rater performances it estimates. With
  two raters it decides a voxel where the paths disagree by their estimated sensitivities and
  specificities and by the foreground prior, all estimated inside the organ's box; when both
  paths are equally reliable this is close to their intersection.

* ``evidence``: the registration path, corrected by the segmentation path only where the images
  show that the registration failed:

  ``p_k(v) = a(v) * P_seg(k | v) + (1 - a(v)) * P_reg(k | v)``

  with ``a(v)`` in [0, 1] the local evidence of misalignment: the absolute value of the daily CT
  minus the planning CT warped by the DVF, averaged over a ``EVIDENCE_WINDOW_MM`` cube (the mean
  of the signed difference, so that noise averages out and a misplaced edge does not), mapped
  linearly from 0 at ``EVIDENCE_LOW_HU`` to 1 at ``EVIDENCE_HIGH_HU``. Where the warped planning
  CT matches the daily CT the registration path is kept exactly; the planning scan given again
  as the daily scan therefore returns the registration path (the planning contours when the
  field is zero), whatever the segmentation path says. Where a bladder filled or rectal gas
  appeared and the field did not follow, the segmentation path decides.

All give one probability map per fused organ; one rule turns them into a label map, the same for
every method and consistent across organs: a voxel gets the fused organ of the largest ``p_k``
among those with ``p_k >= 0.5`` (ties: the lower label id), else background, so that a voxel
gets at most one organ. Each organ is then post-processed as the paths are (largest connected
components, `jrs.inference.postprocess`).

Cost: everything happens inside each fused organ's box, the bounding box of its voxels in either
path's (post-processed) hard label map grown by a small margin; no whole-grid soft-max is ever
computed. A voxel outside both paths' masks could only be fused into an organ where one of them
gives it probability >= 0.5, i.e. at the hard masks' border (which the margin covers) or in
components the post-processing removed.

Arrays are indexed (z, y, x) as SimpleITK gives them; displacements are in mm (LPS components
x, y, z), pull convention (see DESIGN.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from jrs.core.errors import InvalidInput
from jrs.core.geometry import Geometry
from jrs.core.labels import LABEL_IDS, LABELS
from jrs.inference.postprocess import COMPONENTS_KEPT, keep_largest_components

__all__ = [
    "DEFAULT_WEIGHTS",
    "EVIDENCE_HIGH_HU",
    "EVIDENCE_LOW_HU",
    "EVIDENCE_WINDOW_MM",
    "FUSION_METHODS",
    "FUSION_THRESHOLD",
    "Box",
    "EvidenceSource",
    "FusionMethod",
    "FusionSpec",
    "ProbabilitySource",
    "evidence_probability",
    "fuse",
    "fuse_network_paths",
    "fuse_probabilities",
    "hard_probability",
    "misalignment_evidence",
    "organ_box",
    "probability_source",
    "softmax_source",
    "staple_probability",
    "warped_probability",
    "weighted_probability",
    "weights_from_dice",
]

FusionMethod = Literal["weighted", "staple", "evidence"]
#: The fusion methods, by name.
FUSION_METHODS: tuple[str, ...] = ("weighted", "staple", "evidence")
#: ``evidence``: edge of the cube over which the image difference is averaged, mm.
EVIDENCE_WINDOW_MM = 5.0
#: ``evidence``: a mean absolute image difference up to this (HU) is no evidence of misalignment.
EVIDENCE_LOW_HU = 10.0
#: ``evidence``: from this mean absolute image difference (HU) on, the segmentation path decides.
EVIDENCE_HIGH_HU = 40.0
#: (segmentation, registration) weights of an organ the model's metadata gives none for.
DEFAULT_WEIGHTS: tuple[float, float] = (0.5, 0.5)
#: A voxel joins a fused organ when its fused probability is at least this.
FUSION_THRESHOLD = 0.5
#: Array slices (z, y, x) of a box of the grid.
Box = tuple[slice, slice, slice]
#: ``(organ label id, box) -> (bz, by, bx)`` float32 probability of that organ inside the box.
ProbabilitySource = Callable[[int, Box], npt.NDArray[np.float32]]
#: ``box -> (bz, by, bx)`` float32 evidence of misalignment in [0, 1] inside the box.
EvidenceSource = Callable[[Box], npt.NDArray[np.float32]]


# ------------------------------------------------------------------------------ the spec
@dataclass(frozen=True)
class FusionSpec:
    """How to fuse: a method and the per-organ path weights of ``weighted``.

    The model's ``metadata.json`` may hold it as ``fusion``:
    ``{"method": "weighted", "weights": {"prostate": [w_seg, w_reg], ...}}`` (other keys, such as
    ``rule``, are kept for people and ignored here).

    Attributes:
        method: ``weighted`` or ``staple``.
        weights: organ key -> (w_seg, w_reg), each pair normalised to sum 1; organs not listed
            use `DEFAULT_WEIGHTS`. ``staple`` does not use them.
    """

    method: FusionMethod = "weighted"
    weights: Mapping[str, tuple[float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in FUSION_METHODS:
            raise InvalidInput(
                f"fusion method {self.method!r} unknown; use {' or '.join(FUSION_METHODS)}"
            )
        table = {}
        for organ, pair in dict(self.weights).items():
            if organ not in LABEL_IDS:
                raise InvalidInput(
                    f"fusion weights name organ {organ!r}; use organ keys "
                    f"{', '.join(LABELS.values())}"
                )
            table[str(organ)] = _normalised(pair, organ)
        object.__setattr__(self, "weights", table)

    def weights_for(self, organ: str) -> tuple[float, float]:
        """(w_seg, w_reg) of an organ key (normalised; `DEFAULT_WEIGHTS` when not listed)."""
        return tuple(self.weights.get(organ, DEFAULT_WEIGHTS))  # type: ignore[return-value]

    @classmethod
    def from_json(cls, entry: Any, source: str = "metadata.json 'fusion'") -> FusionSpec:
        """Parse the ``fusion`` entry of a model's metadata (None or absent: the defaults).

        Args:
            entry: ``{"method": ..., "weights": {organ: [w_seg, w_reg]}}`` or None.
            source: where the entry comes from (for error messages).

        Raises:
            InvalidInput: For an unknown method or organ, or weights that are not two
                non-negative numbers with a positive sum.
        """
        if entry is None:
            return cls()
        if not isinstance(entry, Mapping):
            raise InvalidInput(
                f"{source} must be an object such as "
                '{"method": "weighted", "weights": {"prostate": [0.5, 0.5]}}, got ' + repr(entry)
            )
        weights = entry.get("weights") or {}
        if not isinstance(weights, Mapping):
            raise InvalidInput(f"{source} 'weights' must map organ keys to [w_seg, w_reg]")
        return cls(method=str(entry.get("method", "weighted")), weights=weights)  # type: ignore[arg-type]

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any] | None) -> FusionSpec:
        """The spec of a model's ``metadata.json`` (its ``fusion`` entry; defaults without)."""
        return cls.from_json((metadata or {}).get("fusion"))

    def to_json(self) -> dict[str, Any]:
        """The ``fusion`` entry of ``metadata.json``."""
        return {
            "method": self.method,
            "weights": {k: [round(v[0], 4), round(v[1], 4)] for k, v in self.weights.items()},
        }


def _normalised(pair: Any, organ: str) -> tuple[float, float]:
    try:
        w_seg, w_reg = (float(v) for v in pair)
    except (TypeError, ValueError):
        raise InvalidInput(
            f"fusion weights of {organ} must be [w_seg, w_reg], got {pair!r}"
        ) from None
    if not (math.isfinite(w_seg) and math.isfinite(w_reg)) or min(w_seg, w_reg) < 0:
        raise InvalidInput(f"fusion weights of {organ} must be finite and >= 0, got {pair!r}")
    total = w_seg + w_reg
    if total <= 0:
        raise InvalidInput(f"fusion weights of {organ} must not both be 0, got {pair!r}")
    return (w_seg / total, w_reg / total)


def weights_from_dice(seg_dsc: float, reg_dsc: float) -> tuple[float, float]:
    """Per-organ ``weighted`` fusion weights from each path's validation Dice.

    The rule: each path's weight is its DSC over the sum of both (``w_seg = d_seg / (d_seg +
    d_reg)``, ``w_reg = 1 - w_seg``); a path with DSC 0 gets weight 0 (it is ignored), both 0
    (or not finite) give `DEFAULT_WEIGHTS`. DSCs are clipped to [0, 1].

    Args:
        seg_dsc: mean validation DSC of the segmentation path for the organ.
        reg_dsc: the same for the registration path.

    Returns:
        (w_seg, w_reg), summing to 1.
    """
    d = [
        min(max(float(v), 0.0), 1.0) if math.isfinite(float(v)) else 0.0 for v in (seg_dsc, reg_dsc)
    ]
    total = d[0] + d[1]
    if total <= 0:
        return DEFAULT_WEIGHTS
    return (d[0] / total, d[1] / total)


# ------------------------------------------------------------------------------ probabilities
def weighted_probability(
    seg: npt.ArrayLike, reg: npt.ArrayLike, weights: tuple[float, float]
) -> npt.NDArray[np.float32]:
    """``w_seg * seg + w_reg * reg`` (weights normalised first).

    Args:
        seg: (...) probability of the organ from the segmentation path, in [0, 1].
        reg: the same shape, from the registration path.
        weights: (w_seg, w_reg), >= 0, not both 0.

    Returns:
        float32 fused probability, the shape of the inputs.
    """
    w_seg, w_reg = _normalised(weights, "the organ")
    out = np.asarray(seg, np.float32) * np.float32(w_seg)
    out += np.asarray(reg, np.float32) * np.float32(w_reg)
    return out


def staple_probability(
    seg_mask: npt.ArrayLike, reg_mask: npt.ArrayLike, max_iterations: int = 100
) -> npt.NDArray[np.float32]:
    """SimpleITK's binary STAPLE of the two paths' masks of one organ.

    Args:
        seg_mask: (nz, ny, nx) mask of the organ in the segmentation path (non-zero inside).
        reg_mask: the same for the registration path.
        max_iterations: STAPLE's expectation-maximisation iterations at most.

    Returns:
        (nz, ny, nx) float32 posterior probability that a voxel is the organ.
    """
    a = np.ascontiguousarray(np.asarray(seg_mask) != 0, np.uint8)
    b = np.ascontiguousarray(np.asarray(reg_mask) != 0, np.uint8)
    if a.shape != b.shape or a.ndim != 3:
        raise InvalidInput(f"STAPLE needs two masks of one 3-D shape, got {a.shape} and {b.shape}")
    if not a.any() and not b.any():
        return np.zeros(a.shape, np.float32)
    staple = sitk.STAPLEImageFilter()
    staple.SetForegroundValue(1.0)
    staple.SetMaximumIterations(int(max_iterations))
    out = staple.Execute([sitk.GetImageFromArray(a), sitk.GetImageFromArray(b)])
    return sitk.GetArrayViewFromImage(out).astype(np.float32)


def hard_probability(labels: npt.NDArray[np.integer[Any]]) -> ProbabilitySource:
    """A path's hard label map as probabilities: 1 inside the organ, 0 elsewhere.

    Args:
        labels: (nz, ny, nx) label map (ids of `jrs.core.labels`).
    """

    def source(organ: int, box: Box) -> npt.NDArray[np.float32]:
        return (labels[box] == organ).astype(np.float32)

    return source


def probability_source(probabilities: npt.NDArray[np.floating[Any]]) -> ProbabilitySource:
    """Class probabilities given whole: the organ's channel, read inside the box.

    Args:
        probabilities: (5, nz, ny, nx) class probabilities (channel = label id), any view.
    """

    def source(organ: int, box: Box) -> npt.NDArray[np.float32]:
        return np.asarray(probabilities[(organ, *box)], np.float32)

    return source


def softmax_source(logits: npt.NDArray[np.floating[Any]]) -> ProbabilitySource:
    """Segmentation logits: the organ's soft-max probability, computed inside the box only.

    Args:
        logits: (5, nz, ny, nx) logits (channel = label id); may be a non-contiguous view
            (only the box is read, and copied).
    """

    def source(organ: int, box: Box) -> npt.NDArray[np.float32]:
        x = np.asarray(logits[(slice(None), *box)], np.float32)  # a copy of the box only
        e = np.exp(x - x.max(axis=0, keepdims=True))
        return (e[organ] / e.sum(axis=0)).astype(np.float32, copy=False)

    return source


def _sub_grid(grid: Geometry, box: Box) -> Geometry:
    start = [float(box[2].start), float(box[1].start), float(box[0].start)]
    return Geometry(
        (box[0].stop - box[0].start, box[1].stop - box[1].start, box[2].stop - box[2].start),
        grid.index_to_physical(start),
        grid.spacing,
        grid.direction,
    )


def _warp_box(
    image: Callable[[Box], npt.NDArray[np.float32]],
    dvf: npt.NDArray[np.floating[Any]],
    grid: Geometry,
    box: Box,
    default: float,
) -> npt.NDArray[np.float32]:
    """An image warped by the pull field inside a box (linear interpolation).

    Only the region the box can pull from (the box grown by the field's largest displacement in
    it, plus 2 voxels) is read, through ``image(region) -> (rz, ry, rx)`` float32.

    Args:
        image: Reads the moving image inside a region of ``grid``.
        dvf: (nz, ny, nx, 3) pull displacement on ``grid``, mm, LPS (x, y, z) components.
        grid: The grid of the image and the field.
        box: Where to warp.
        default: Value pulled from outside the grid.

    Returns:
        (bz, by, bx) float32 warped image.
    """
    size = np.asarray(grid.shape)
    u = np.asarray(dvf[box], np.float64)
    reach = float(np.sqrt((u**2).sum(axis=-1)).max()) if u.size else 0.0
    pad = int(np.ceil(reach / float(np.asarray(grid.spacing).min()))) + 2
    lo = [max(s.start - pad, 0) for s in box]
    hi = [min(s.stop + pad, int(n)) for s, n in zip(box, size, strict=True)]
    src: Box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
    source_img = _sub_grid(grid, src).apply_to_sitk(
        sitk.GetImageFromArray(np.ascontiguousarray(image(src), np.float32))
    )
    target = _sub_grid(grid, box)
    field_img = target.apply_to_sitk(sitk.GetImageFromArray(u, isVector=True))
    warped = sitk.Resample(
        source_img,
        target.reference_image(),
        sitk.DisplacementFieldTransform(field_img),
        sitk.sitkLinear,
        float(default),
        sitk.sitkFloat32,
    )
    return sitk.GetArrayFromImage(warped)


def warped_probability(
    labels: npt.NDArray[np.integer[Any]],
    dvf: npt.NDArray[np.floating[Any]],
    grid: Geometry,
) -> ProbabilitySource:
    """The registration path's soft label: the planning one-hot map of the organ, warped.

    Inside the box, ``P_reg(k | p) = onehot_k(p + u(p))`` interpolated linearly (SimpleITK's
    linear interpolator; 0 outside the grid), the per-label weight whose arg-max
    ``sitkLabelLinear`` takes. Only the region the box can pull from (the box grown by the
    field's largest displacement inside it) is read.

    Args:
        labels: (nz, ny, nx) moving (planning, pre-aligned) label map on ``grid``.
        dvf: (nz, ny, nx, 3) pull displacement on ``grid``, mm, LPS (x, y, z) components.
        grid: the grid of both.
    """

    def source(organ: int, box: Box) -> npt.NDArray[np.float32]:
        def onehot(region: Box) -> npt.NDArray[np.float32]:
            return (labels[region] == organ).astype(np.float32)

        return _warp_box(onehot, dvf, grid, box, 0.0)

    return source


def misalignment_evidence(
    fixed: npt.NDArray[np.floating[Any]],
    moving: npt.NDArray[np.floating[Any]],
    dvf: npt.NDArray[np.floating[Any]],
    grid: Geometry,
    *,
    hu_per_unit: float = 1000.0,
    window_mm: float = EVIDENCE_WINDOW_MM,
    low_hu: float = EVIDENCE_LOW_HU,
    high_hu: float = EVIDENCE_HIGH_HU,
) -> EvidenceSource:
    """The local evidence that the registration misaligned the scans, for ``evidence`` fusion.

    Inside a box: ``a = clip((|mean_w(I_f - I_m o u)| - low) / (high - low), 0, 1)``, with
    ``mean_w`` the mean over a ``window_mm`` cube, ``I_m o u`` the moving image warped by the
    pull field (linear interpolation), intensities in HU. Only the box grown by the window and by
    the field's largest displacement inside it is read.

    Args:
        fixed: (nz, ny, nx) daily image on ``grid`` (normalised: HU / ``hu_per_unit``).
        moving: (nz, ny, nx) pre-aligned planning image on ``grid``, same units.
        dvf: (nz, ny, nx, 3) pull displacement on ``grid``, mm, LPS (x, y, z) components.
        grid: the grid of all three.
        hu_per_unit: HU per image unit (1000 for `jrs.inference.preprocess.normalise_hu`).
        window_mm: edge of the averaging cube, mm.
        low_hu: mean absolute difference (HU) below which there is no evidence.
        high_hu: mean absolute difference (HU) from which the evidence is 1.

    Returns:
        The evidence source.

    Raises:
        InvalidInput: For images or a field that do not fit the grid, or ``high_hu <= low_hu``.
    """
    shape = tuple(int(n) for n in grid.shape)
    if fixed.shape != shape or moving.shape != shape or dvf.shape != (*shape, 3):
        raise InvalidInput(
            f"evidence fusion needs images {shape} and a field {(*shape, 3)} on the network "
            f"grid, got {fixed.shape}, {moving.shape} and {dvf.shape}"
        )
    if not high_hu > low_hu:
        raise InvalidInput(f"evidence thresholds must rise: {low_hu} HU to {high_hu} HU")
    size = np.asarray(shape)
    half = np.maximum(np.round(window_mm / (2.0 * np.asarray(grid.spacing)[::-1])), 0).astype(int)
    outside = float(np.min(moving)) if moving.size else 0.0

    def source(box: Box) -> npt.NDArray[np.float32]:
        lo = [max(b.start - int(h), 0) for b, h in zip(box, half, strict=True)]
        hi = [min(b.stop + int(h), int(n)) for b, h, n in zip(box, half, size, strict=True)]
        win: Box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
        warped = _warp_box(
            lambda region: np.asarray(moving[region], np.float32), dvf, grid, win, outside
        )
        diff = (np.asarray(fixed[win], np.float32) - warped) * np.float32(hu_per_unit)
        radius = [int(h) for h in half[::-1]]  # (x, y, z) for SimpleITK
        mean = sitk.GetArrayFromImage(sitk.Mean(sitk.GetImageFromArray(diff), radius))
        inner = tuple(
            slice(b.start - w.start, b.stop - w.start) for b, w in zip(box, win, strict=True)
        )
        a = (np.abs(mean[inner]) - low_hu) / (high_hu - low_hu)
        return np.clip(a, 0.0, 1.0).astype(np.float32)

    return source


def evidence_probability(
    seg: npt.ArrayLike, reg: npt.ArrayLike, evidence: npt.ArrayLike
) -> npt.NDArray[np.float32]:
    """``a * seg + (1 - a) * reg``: the segmentation path where the evidence ``a`` says so.

    Args:
        seg: (...) probability of the organ from the segmentation path, in [0, 1].
        reg: the same shape, from the registration path.
        evidence: the same shape, misalignment evidence ``a`` in [0, 1].

    Returns:
        float32 fused probability, the shape of the inputs.
    """
    a = np.clip(np.asarray(evidence, np.float32), 0.0, 1.0)
    return (a * np.asarray(seg, np.float32) + (1.0 - a) * np.asarray(reg, np.float32)).astype(
        np.float32, copy=False
    )


# ------------------------------------------------------------------------------ fusion
def organ_box(
    organ: int, maps: Iterable[npt.NDArray[np.integer[Any]]], margin: int = 3
) -> Box | None:
    """The bounding box of an organ's voxels in any of the label maps, grown by ``margin``.

    Args:
        organ: label id.
        maps: (nz, ny, nx) label maps of one shape.
        margin: voxels added on every side (clipped to the grid).

    Returns:
        Array slices (z, y, x), or None when no map holds the organ.
    """
    lo: npt.NDArray[np.int64] | None = None
    hi: npt.NDArray[np.int64] | None = None
    shape: tuple[int, ...] = ()
    for labels in maps:
        shape = labels.shape
        mask = labels == organ
        bounds = []
        for axis in range(3):
            other = tuple(a for a in range(3) if a != axis)
            hit = np.flatnonzero(mask.any(axis=other))
            if hit.size == 0:
                break
            bounds.append((int(hit[0]), int(hit[-1]) + 1))
        if len(bounds) < 3:
            continue
        b_lo = np.array([b[0] for b in bounds])
        b_hi = np.array([b[1] for b in bounds])
        lo = b_lo if lo is None else np.minimum(lo, b_lo)
        hi = b_hi if hi is None else np.maximum(hi, b_hi)
    if lo is None or hi is None:
        return None
    lo = np.maximum(lo - margin, 0)
    hi = np.minimum(hi + margin, np.asarray(shape))
    return (
        slice(int(lo[0]), int(hi[0])),
        slice(int(lo[1]), int(hi[1])),
        slice(int(lo[2]), int(hi[2])),
    )


def fuse_probabilities(
    probabilities: Mapping[int, npt.ArrayLike], threshold: float = FUSION_THRESHOLD
) -> npt.NDArray[np.uint8]:
    """Label map from per-organ fused probabilities (at most one organ per voxel).

    A voxel gets the organ of the largest probability among those ``>= threshold`` (ties: the
    lower label id), else background.

    Args:
        probabilities: organ label id -> (nz, ny, nx) fused probability, one shape for all.
        threshold: the least probability of an organ.

    Returns:
        (nz, ny, nx) uint8 label map.
    """
    items = [(organ, np.asarray(p, np.float32)) for organ, p in sorted(probabilities.items())]
    if not items:
        raise InvalidInput("no organ probabilities to fuse")
    shape = items[0][1].shape
    if len(shape) != 3 or any(p.shape != shape for _, p in items):
        raise InvalidInput(
            f"organ probabilities must share one 3-D shape, got {[p.shape for _, p in items]}"
        )
    full: Box = (slice(0, shape[0]), slice(0, shape[1]), slice(0, shape[2]))
    return _decide([(organ, full, p) for organ, p in items], shape, threshold)


def _decide(
    items: list[tuple[int, Box, npt.NDArray[np.float32]]],
    shape: tuple[int, ...],
    threshold: float = FUSION_THRESHOLD,
) -> npt.NDArray[np.uint8]:
    """`fuse_probabilities` of organs given inside their own boxes (0 outside them)."""
    best = np.full(shape, -1.0, np.float32)
    out = np.zeros(shape, np.uint8)
    for organ, box, p in sorted(items, key=lambda item: item[0]):
        region = best[box]
        take = (p >= threshold) & (p > region)
        out[box][take] = organ
        region[take] = p[take]
    return out


def fuse(
    segmentation: npt.NDArray[np.integer[Any]],
    registration: npt.NDArray[np.integer[Any]],
    organs: Iterable[int],
    spec: FusionSpec | None = None,
    *,
    seg_probability: ProbabilitySource | None = None,
    reg_probability: ProbabilitySource | None = None,
    evidence: EvidenceSource | None = None,
    margin: int = 3,
    postprocess: bool = True,
) -> npt.NDArray[np.uint8]:
    """Fuse the two paths of some organs into one label map.

    Each organ is fused inside its box (`organ_box` of both hard maps, grown by ``margin``):
    ``weighted`` from the two probability sources (the hard maps as 0/1 when a source is not
    given), ``staple`` from the two hard maps, ``evidence`` from the two probability sources and
    the misalignment evidence; `fuse_probabilities`' rule then decides every
    voxel (at most one organ), and each organ keeps its largest connected component(s)
    (`jrs.inference.postprocess.COMPONENTS_KEPT`, found inside its box) unless ``postprocess`` is
    False.

    Args:
        segmentation: (nz, ny, nx) segmentation-path label map (post-processed).
        registration: (nz, ny, nx) registration-path label map (post-processed).
        organs: label ids to fuse (others stay background in the result).
        spec: method and weights (default: ``weighted``, 0.5 / 0.5).
        seg_probability: the segmentation path's soft probability (`softmax_source`,
            `probability_source`), for ``weighted``.
        reg_probability: the registration path's (`warped_probability`, `probability_source`).
        evidence: the misalignment evidence (`misalignment_evidence`), for ``evidence``.
        margin: voxels around the organ's hard masks where it may be fused.
        postprocess: keep the largest connected component(s) of each fused organ.

    Returns:
        (nz, ny, nx) uint8 label map holding the fused organs only.

    Raises:
        InvalidInput: When the maps differ in shape or an organ id is unknown.
    """
    spec = spec or FusionSpec()
    if segmentation.shape != registration.shape or segmentation.ndim != 3:
        raise InvalidInput(
            f"the two paths must be label maps of one 3-D shape, got {segmentation.shape} and "
            f"{registration.shape}"
        )
    seg_p = seg_probability or hard_probability(segmentation)
    reg_p = reg_probability or hard_probability(registration)
    items: list[tuple[int, Box, npt.NDArray[np.float32]]] = []
    for organ in sorted(set(organs)):
        if organ not in LABELS:
            raise InvalidInput(f"organ label {organ} unknown; use {sorted(LABELS)}")
        box = organ_box(organ, (segmentation, registration), margin)
        if box is None:
            continue
        if spec.method == "staple":
            p = staple_probability(segmentation[box] == organ, registration[box] == organ)
        elif spec.method == "evidence":
            if evidence is None:
                raise InvalidInput(
                    "evidence fusion needs the daily and planning images and the field "
                    "(misalignment_evidence); use weighted or staple without them"
                )
            p = evidence_probability(seg_p(organ, box), reg_p(organ, box), evidence(box))
        else:
            p = weighted_probability(
                seg_p(organ, box), reg_p(organ, box), spec.weights_for(LABELS[organ])
            )
        items.append((organ, box, p))
    out = _decide(items, segmentation.shape)
    if postprocess:
        for organ, box, _ in items:
            keep = COMPONENTS_KEPT.get(organ)
            if keep is None:
                continue
            region = out[box]
            mask = region == organ
            if not mask.any():
                continue
            kept = keep_largest_components(mask.astype(np.uint8) * np.uint8(organ), {organ: keep})
            region[mask & (kept != organ)] = 0
    return out


def fuse_network_paths(
    segmentation: npt.NDArray[np.integer[Any]],
    registration: npt.NDArray[np.integer[Any]],
    organs: Iterable[int],
    spec: FusionSpec,
    *,
    seg_probability: ProbabilitySource,
    moving_labels: npt.NDArray[np.integer[Any]],
    dvf: npt.NDArray[np.floating[Any]],
    grid: Geometry,
    fixed: npt.NDArray[np.floating[Any]] | None = None,
    moving: npt.NDArray[np.floating[Any]] | None = None,
    reg_probability: ProbabilitySource | None = None,
) -> npt.NDArray[np.uint8]:
    """`fuse` of a network's two paths, with the sources every method needs built here.

    The registration probability is the moving labels warped by the field
    (`warped_probability`) unless given; ``evidence`` also reads the two images
    (`misalignment_evidence`). The pipeline, the training evaluation and the adaptation's
    scoring all fuse through this.

    Args:
        segmentation: (nz, ny, nx) segmentation-path labels (post-processed).
        registration: (nz, ny, nx) registration-path labels (post-processed).
        organs: Label ids to fuse.
        spec: Method and weights.
        seg_probability: The segmentation path's soft probability (e.g. `softmax_source`).
        moving_labels: (nz, ny, nx) pre-aligned planning labels on ``grid``.
        dvf: (nz, ny, nx, 3) pull displacement on ``grid``, mm, LPS (x, y, z).
        grid: The grid of all arrays.
        fixed: (nz, ny, nx) daily image (normalised HU / 1000), for ``evidence``.
        moving: (nz, ny, nx) pre-aligned planning image, same units, for ``evidence``.
        reg_probability: The registration path's soft probability, when already computed.

    Returns:
        (nz, ny, nx) uint8 map holding the fused organs only.

    Raises:
        InvalidInput: ``evidence`` without the two images.
    """
    evidence = None
    if spec.method == "evidence":
        if fixed is None or moving is None:
            raise InvalidInput("evidence fusion needs the daily and the planning image")
        evidence = misalignment_evidence(fixed, moving, dvf, grid)
    return fuse(
        segmentation,
        registration,
        organs,
        spec,
        seg_probability=seg_probability,
        reg_probability=reg_probability or warped_probability(moving_labels, dvf, grid),
        evidence=evidence,
    )
