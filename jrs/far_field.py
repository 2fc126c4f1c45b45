"""The field far from the prostate: the bony match outside the network box, blended smoothly.

The pipeline's mapping inside the network box is ``A_f(p + u(p))``: the prostate-centred rigid
pre-alignment ``A_f`` (`jrs.focus_prealign`) plus the network's (or the iterative method's)
field ``u``, tapered to zero at the box's faces. ``A_f`` fits the prostate; a rotation that fits
the prostate is millimetres off 15 cm away (femoral heads, the body outline, nodes, the ends of
the scan), and before this module ``A_f`` alone was the mapping everywhere outside the box.

Here the mapping outside the box follows the **bony match** ``A_b``: a rigid registration of the
planning CT onto the daily CT restricted to the bones (HU above `BONY_HU` on coarse copies,
dilated by one voxel), started from the whole-body rigid match (`bony_prealign`). Between the
two, a cosine weight ``w`` of the distance to the box (1 on the box, 0 beyond `BLEND_MM`) blends
them in the pre-alignment's input space:

    T(p) = A_f(p + u(p) + h(p)),   h(p) = (1 - w(p)) r(p),   r(p) = A_f^{-1}(A_b(p)) - p,

so ``T = A_f(p + u)`` on the box and ``T = A_b`` from `BLEND_MM` away from it. Since ``A_f`` and
``A_b`` are affine, ``r`` is an affine field and ``T(p) = w (A_f(p + u)) + (1 - w) A_b(p)`` outside
the box exactly. The blend's Jacobian adds ``grad w`` times ``|A_f(p) - A_b(p)|`` (at most
``pi / (2 BLEND_MM)`` times a few mm): with `BLEND_MM` = 60 mm and the matches at most
`MAX_BONY_SHIFT_MM` apart no folding is introduced (`FarField.max_gradient` is recorded, and the
tests check det J > 0).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from jrs.geometry import Geometry, Volume
from jrs.registration import (
    PREALIGN_SPACING_MM,
    REGISTRATION_THREADS,
    AffineResult,
    _check_threads,
    _coarse,
    _register,
)

log = logging.getLogger(__name__)

#: HU above which a coarse voxel of the daily CT counts as bone for the bony match
BONY_HU = 150.0
#: width of the blend from the network box to the bony match, mm
BLEND_MM = 60.0
#: the bony match refines the whole-body rigid match: larger changes are refused
MAX_BONY_SHIFT_MM = 15.0
MAX_BONY_ANGLE_DEG = 6.0
#: spacing of the coarse displacement grid that carries the blend into SimpleITK, mm
FAR_GRID_MM = 4.0


def _rigid_as_affine(rigid: sitk.Euler3DTransform) -> sitk.AffineTransform:
    affine = sitk.AffineTransform(3)
    affine.SetCenter(rigid.GetCenter())
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    return affine


def _angle_deg(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> float:
    r = a.T @ b
    return float(np.degrees(np.arccos(np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0))))


@dataclass(frozen=True)
class BonyReport:
    """What the bony match did (``qa.json`` ``prealign.bony``).

    Attributes:
        accepted: whether its transform replaced the whole-body rigid match.
        shift_mm: largest displacement of the bone region's bounding-box corners from the
            start, mm.
        angle_deg: rotation relative to the start, degrees.
        voxels: coarse bone voxels the metric used.
        seconds: wall time.
        reason: why it was refused (empty when accepted).
    """

    accepted: bool
    shift_mm: float
    angle_deg: float
    voxels: int
    seconds: float
    reason: str = ""

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return {
            "accepted": self.accepted,
            "shift_mm": round(self.shift_mm, 3),
            "angle_deg": round(self.angle_deg, 3),
            "voxels": self.voxels,
            "seconds": round(self.seconds, 3),
            "reason": self.reason,
        }


def bony_prealign(
    fixed: Volume,
    moving: Volume,
    start: AffineResult,
    *,
    spacing_mm: float = PREALIGN_SPACING_MM,
    iterations: int = 100,
    threads: int = REGISTRATION_THREADS,
) -> tuple[sitk.AffineTransform, BonyReport]:
    """Rigid match of the planning CT onto the daily CT on the bones alone.

    Deterministic: every voxel of the bone region is used (no random sampling), on ``threads``
    threads. Bones do not fill or empty, so the match is not pulled by the bladder or rectum.

    Args:
        fixed: daily CT, HU, (nz, ny, nx) with LPS geometry.
        moving: planning CT, HU.
        start: the whole-body pre-alignment; its rigid stage is the starting point.
        spacing_mm: spacing of the coarse copies, mm.
        iterations: optimiser iterations.
        threads: registration threads.

    Returns:
        The bony match (daily point -> planning point, as an affine transform holding a rigid
        one; the start's rigid stage when the match was refused or found no bone) and the
        report.
    """
    _check_threads(threads)
    t0 = time.perf_counter()
    rigid0 = sitk.Euler3DTransform(start.rigid)
    f = _coarse(fixed, spacing_mm)
    m = _coarse(moving, spacing_mm)
    bone = sitk.BinaryThreshold(f, BONY_HU, 1e9, 1, 0)
    bone = sitk.BinaryDilate(bone, [1, 1, 1], sitk.sitkBall)
    voxels = int(sitk.GetArrayViewFromImage(bone).sum())
    if voxels < 200:
        report = BonyReport(False, 0.0, 0.0, voxels, time.perf_counter() - t0, "too little bone")
        log.info("bony match skipped: %s", report.reason)
        return _rigid_as_affine(rigid0), report
    out, _ = _register(
        f,
        m,
        bone,
        sitk.Euler3DTransform(rigid0),
        iterations=iterations,
        sampling=None,
        seed=0,
        threads=threads,
        learning_rate=1.0,
        min_step=1e-3,
        shrink_factors=(1,),
        smoothing_voxels=(0.0,),
    )
    rigid = sitk.Euler3DTransform(sitk.CompositeTransform(out).GetNthTransform(0))
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(bone)
    x0, y0, z0, sx, sy, sz = stats.GetBoundingBox(1)
    corners = [
        f.TransformIndexToPhysicalPoint((x, y, z))
        for x in (x0, x0 + sx - 1)
        for y in (y0, y0 + sy - 1)
        for z in (z0, z0 + sz - 1)
    ]
    shift = max(
        float(np.linalg.norm(np.subtract(rigid.TransformPoint(c), rigid0.TransformPoint(c))))
        for c in corners
    )
    angle = _angle_deg(
        np.asarray(rigid0.GetMatrix()).reshape(3, 3), np.asarray(rigid.GetMatrix()).reshape(3, 3)
    )
    seconds = time.perf_counter() - t0
    if shift > MAX_BONY_SHIFT_MM or angle > MAX_BONY_ANGLE_DEG:
        reason = (
            f"moved the bones by {shift:.1f} mm / {angle:.1f} deg from the whole-body match "
            f"(limits {MAX_BONY_SHIFT_MM:.0f} mm / {MAX_BONY_ANGLE_DEG:.0f} deg)"
        )
        log.warning("bony match refused: %s", reason)
        return _rigid_as_affine(rigid0), BonyReport(False, shift, angle, voxels, seconds, reason)
    log.info(
        "bony match: %.2f mm, %.2f deg from the whole-body match, %.2f s", shift, angle, seconds
    )
    return _rigid_as_affine(rigid), BonyReport(True, shift, angle, voxels, seconds)


def _affine_parts(
    transform: sitk.AffineTransform,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """``(M, k)`` with ``T(p) = M p + k``."""
    m = np.asarray(transform.GetMatrix(), float).reshape(3, 3)
    c = np.asarray(transform.GetCenter(), float)
    t = np.asarray(transform.GetTranslation(), float)
    return m, c + t - m @ c


@dataclass(frozen=True)
class FarField:
    """The correction ``h`` that carries the mapping from the network box to the bony match.

    Attributes:
        focus: ``A_f``, the pre-alignment the network box's field is added to.
        bony: ``A_b``, the mapping far from the box.
        lower: LPS lower corner of the network box, mm, (3,).
        upper: LPS upper corner of the network box, mm, (3,).
        blend_mm: width of the blend, mm.
    """

    focus: sitk.AffineTransform
    bony: sitk.AffineTransform
    lower: npt.NDArray[np.float64]
    upper: npt.NDArray[np.float64]
    blend_mm: float = BLEND_MM

    def weight(self, points: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """``w``: 1 on the box, cosine down to 0 at ``blend_mm`` from it; points (..., 3) mm."""
        gap = np.maximum(np.maximum(self.lower - points, 0.0), points - self.upper)
        d = np.sqrt((gap * gap).sum(axis=-1))
        s = np.clip(d / self.blend_mm, 0.0, 1.0)
        return 0.5 + 0.5 * np.cos(np.pi * s)

    def _mismatch(self, points: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """``r(p) = A_f^{-1}(A_b(p)) - p`` at LPS points (..., 3), mm (an affine field)."""
        mf, kf = _affine_parts(self.focus)
        mb, kb = _affine_parts(self.bony)
        inv = np.linalg.inv(mf)
        return points @ (inv @ mb - np.eye(3)).T + inv @ (kb - kf)

    def correction(self, points: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """``h(p) = (1 - w(p)) r(p)`` at LPS points (..., 3), mm.

        Added to a daily point before ``A_f`` it gives ``A_b`` far from the box.
        """
        return (1.0 - self.weight(points))[..., None] * self._mismatch(points)

    def max_gradient(self) -> float:
        """An upper bound of ``|grad h|`` (spectral norm, unitless) over the blend zone.

        ``grad h = (1 - w) grad r - r (x) grad w`` with ``|grad w| <= pi / (2 blend_mm)``; ``r``
        is affine, so its largest length over the zone is at the zone's corners.
        """
        lo, hi = self.lower - self.blend_mm, self.upper + self.blend_mm
        corners = np.array(
            [[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
        )
        r = self._mismatch(corners)
        reach = float(np.sqrt((r * r).sum(axis=-1)).max())
        linear = self._mismatch(np.eye(3)) - self._mismatch(np.zeros((1, 3)))
        return float(np.pi / (2.0 * self.blend_mm) * reach + np.linalg.norm(linear, 2))

    def is_identity(self) -> bool:
        """Whether the two matches agree (then ``h`` is zero everywhere)."""
        mf, kf = _affine_parts(self.focus)
        mb, kb = _affine_parts(self.bony)
        return bool(np.array_equal(mf, mb) and np.array_equal(kf, kb))

    def on_grid(self, reference: Geometry) -> Volume:
        """``h`` sampled on a coarse LPS-aligned grid covering ``reference`` and the blend.

        Args:
            reference: the daily CT grid.

        Returns:
            (nz, ny, nx, 3) float32 displacement, mm, on a `FAR_GRID_MM` grid.
        """
        corners = reference.corners()
        lo = corners.min(axis=0) - 2 * FAR_GRID_MM
        hi = corners.max(axis=0) + 2 * FAR_GRID_MM
        n = np.ceil((hi - lo) / FAR_GRID_MM).astype(int) + 1
        grid = Geometry(
            (int(n[2]), int(n[1]), int(n[0])),
            lo,
            np.full(3, FAR_GRID_MM),
            np.eye(3),
            reference.frame_of_reference_uid,
        )
        return Volume(self.correction(grid.voxel_centres()).astype(np.float32), grid)

    def reach_mm(self, reference: Geometry) -> float:
        """The largest ``|h|`` over the daily CT's corners (``h`` grows with distance), mm."""
        h = self.correction(reference.corners())
        return float(np.sqrt((h * h).sum(axis=-1)).max())


def far_field_transform(far: FarField | None, reference: Geometry) -> sitk.Transform | None:
    """``p -> p + h(p)`` as a SimpleITK displacement-field transform (None when ``h`` = 0).

    Args:
        far: the far-field correction, or None.
        reference: the daily CT grid.

    Returns:
        The transform to add (first) before the pre-alignment, or None.
    """
    if far is None or far.is_identity():
        return None
    h = far.on_grid(reference)
    image = sitk.GetImageFromArray(h.array.astype(np.float64), isVector=True)
    h.geometry.apply_to_sitk(image)
    return sitk.DisplacementFieldTransform(image)
