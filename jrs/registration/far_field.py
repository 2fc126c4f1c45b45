"""The field far from the prostate: the bony match outside the network box, blended smoothly.

The pipeline's mapping inside the network box is ``A_f(p + u(p))``: the prostate-centred rigid
pre-alignment ``A_f`` (`jrs.registration.focus`) plus the network's (or the iterative method's)
field ``u``, tapered to zero at the box's faces. ``A_f`` fits the prostate; a rotation that fits
the prostate is millimetres off 15 cm away (femoral heads, the body outline, nodes, the ends of
the scan), and before this module ``A_f`` alone was the mapping everywhere outside the box.

Here the mapping outside the box follows the **bony match** ``B``: a rigid registration of the
planning CT onto the daily CT restricted to the bones (HU above `BONY_HU` on coarse copies,
dilated by one voxel), started from the whole-body rigid match (`bony_prealign`). A cosine
weight ``w`` of the distance to an inner box (the network box less `INSET_MM` on every side,
which still holds the organs and a margin) is 1 on the inner box and falls to 0 over
`BLEND_MM`; the mapping is

    T(p) = A_f(p + w(p) u(p) + h(p)),   h(p) = (1 - w(p)) r(p),   r(p) = A_f^{-1}(B(p)) - p,

so ``T = A_f(p + u)`` around the organs and ``T = B`` from `BLEND_MM` beyond the inner box (in
between, ``T = w A_f(p + u) + (1 - w) B(p)``, since ``A_f`` is affine). The network's field is
weighted down towards the box's faces because a network trained on setup errors about the
prostate does not correct the rest of the box (measured: 2.2 mm mean DVF error within 20 mm of
the box's faces with the weight, 4.2 mm without, on a phantom). ``h`` is sampled on a coarse
`FAR_GRID_MM` grid over the daily CT (`FarField`) and its smallest det J recorded in
``qa.json``: with the blend over `BLEND_MM` and the two matches at most `MAX_BONY_SHIFT_MM`
apart, ``|grad h|`` stays well below 1 (no folding is introduced).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from jrs.core.fields import affine_to_dvf, jacobian_determinant
from jrs.core.geometry import Geometry, Volume
from jrs.registration.focus import (
    FocusReport,
    rigid_as_affine,
    rigid_on_region,
    rotation_angle_deg,
)
from jrs.registration.prealign import (
    PREALIGN_SPACING_MM,
    REGISTRATION_THREADS,
    AffineResult,
    _coarse,
    check_threads,
)

log = logging.getLogger(__name__)

#: HU above which a coarse voxel of the daily CT counts as bone for the bony match
BONY_HU = 150.0
#: width of the blend from the network box to the bony match, mm
BLEND_MM = 60.0
#: the bony match refines the whole-body rigid match: larger changes are refused
MAX_BONY_SHIFT_MM = 15.0
MAX_BONY_ANGLE_DEG = 6.0
#: spacing of the coarse displacement grid that carries the blend, mm
FAR_GRID_MM = 4.0
#: how far inside the network box's faces the blend starts, mm (the box is the organs plus a
#: margin of `jrs.pipeline.options.RecontourOptions.margin_mm`)
INSET_MM = 20.0


#: the region of the bony match, as `jrs.registration.focus.FocusReport` names it
BONES: tuple[str, ...] = ("bones",)


def bony_prealign(
    fixed: Volume,
    moving: Volume,
    start: AffineResult,
    *,
    spacing_mm: float = PREALIGN_SPACING_MM,
    iterations: int = 100,
    threads: int = REGISTRATION_THREADS,
) -> tuple[sitk.AffineTransform, FocusReport]:
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
        report (``shift_mm``: the largest move of the bone region's box corners).
    """
    check_threads(threads)
    t0 = time.perf_counter()
    rigid0 = sitk.Euler3DTransform(start.rigid)
    f = _coarse(fixed, spacing_mm)
    m = _coarse(moving, spacing_mm)
    bone = sitk.BinaryThreshold(f, BONY_HU, 1e9, 1, 0)
    bone = sitk.BinaryDilate(bone, [1, 1, 1], sitk.sitkBall)
    voxels = int(sitk.GetArrayViewFromImage(bone).sum())
    if voxels < 200:
        report = FocusReport(
            BONES, False, 0.0, 0.0, voxels, time.perf_counter() - t0, "too little bone"
        )
        log.info("bony match skipped: %s", report.reason)
        return rigid_as_affine(rigid0), report
    rigid, _ = rigid_on_region(f, m, bone, rigid0, iterations, threads)
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
    angle = rotation_angle_deg(
        np.asarray(rigid0.GetMatrix()).reshape(3, 3), np.asarray(rigid.GetMatrix()).reshape(3, 3)
    )
    seconds = time.perf_counter() - t0
    if shift > MAX_BONY_SHIFT_MM or angle > MAX_BONY_ANGLE_DEG:
        reason = (
            f"moved the bones by {shift:.1f} mm / {angle:.1f} deg from the whole-body match "
            f"(limits {MAX_BONY_SHIFT_MM:.0f} mm / {MAX_BONY_ANGLE_DEG:.0f} deg)"
        )
        log.warning("bony match refused: %s", reason)
        return rigid_as_affine(rigid0), FocusReport(
            BONES, False, shift, angle, voxels, seconds, reason
        )
    log.info(
        "bony match: %.2f mm, %.2f deg from the whole-body match, %.2f s", shift, angle, seconds
    )
    return rigid_as_affine(rigid), FocusReport(BONES, True, shift, angle, voxels, seconds)


def _affine_parts(
    transform: sitk.AffineTransform,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """``(M, k)`` with ``T(p) = M p + k``."""
    m = np.asarray(transform.GetMatrix(), float).reshape(3, 3)
    c = np.asarray(transform.GetCenter(), float)
    t = np.asarray(transform.GetTranslation(), float)
    return m, c + t - m @ c


def _same(a: sitk.Transform, b: sitk.Transform) -> bool:
    """Whether two transforms are the same map, to the bit."""
    return (
        a.GetName() == b.GetName()
        and a.GetParameters() == b.GetParameters()
        and a.GetFixedParameters() == b.GetFixedParameters()
    )


def _far_grid(reference: Geometry) -> Geometry:
    """An LPS-aligned `FAR_GRID_MM` grid covering ``reference`` with a 2-voxel margin."""
    corners = reference.corners()
    lo = corners.min(axis=0) - 2 * FAR_GRID_MM
    hi = corners.max(axis=0) + 2 * FAR_GRID_MM
    n = np.ceil((hi - lo) / FAR_GRID_MM).astype(int) + 1
    return Geometry(
        (int(n[2]), int(n[1]), int(n[0])),
        lo,
        np.full(3, FAR_GRID_MM),
        np.eye(3),
        reference.frame_of_reference_uid,
    )


class FarField:
    """The correction ``h`` that carries the mapping from the network box to the far mapping.

    ``h(p) = (1 - w(p)) (A_f^{-1}(B(p)) - p)``, with ``B`` the far mapping (the bony match, or
    the whole-body deformable match), sampled on a coarse `FAR_GRID_MM` grid over the daily CT
    and interpolated linearly.

    Attributes:
        focus: ``A_f``, the pre-alignment the network box's field is added to.
        far: ``B``, the mapping far from the box (daily point -> planning point).
        lower: LPS lower corner of the network box, mm, (3,).
        upper: LPS upper corner of the network box, mm, (3,).
        blend_mm: width of the blend, mm.
        grid: the coarse grid of ``h``.
        field: (nz, ny, nx, 3) ``h`` on ``grid``, mm.
    """

    def __init__(
        self,
        focus: sitk.AffineTransform,
        far: sitk.Transform,
        lower: npt.ArrayLike,
        upper: npt.ArrayLike,
        reference: Geometry,
        blend_mm: float = BLEND_MM,
    ) -> None:
        """Sample ``h`` over the daily CT.

        Args:
            focus: ``A_f`` (daily point -> planning point).
            far: ``B`` (daily point -> planning point).
            lower: LPS lower corner of the network box, mm.
            upper: LPS upper corner of the network box, mm.
            reference: the daily CT grid.
            blend_mm: width of the blend, mm.
        """
        self.focus = focus
        self.far = far
        self.lower = np.asarray(lower, float)
        self.upper = np.asarray(upper, float)
        self.blend_mm = float(blend_mm)
        self.grid = _far_grid(reference)
        g = self.grid
        if _same(focus, far):  # exactly zero, not the round-off of A_f^-1(A_f(p)) - p
            self.field = np.zeros((*g.shape, 3), np.float32)
            return
        b = affine_to_dvf(far, g).array.astype(np.float64)  # B(p) - p
        pts = g.voxel_centres()
        mf, kf = _affine_parts(focus)
        r = (pts + b - kf) @ np.linalg.inv(mf).T - pts  # A_f^-1(B(p)) - p
        self.field = ((1.0 - self.weight(pts))[..., None] * r).astype(np.float32)

    def weight(self, points: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """``w``: 1 on the box, cosine down to 0 at ``blend_mm`` from it; points (..., 3) mm."""
        gap = np.maximum(np.maximum(self.lower - points, 0.0), points - self.upper)
        d = np.sqrt((gap * gap).sum(axis=-1))
        s = np.clip(d / self.blend_mm, 0.0, 1.0)
        return 0.5 + 0.5 * np.cos(np.pi * s)

    def correction(self, points: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """``h`` at LPS points (..., 3), mm, interpolated linearly (zero on the box).

        Added to a daily point before ``A_f`` it gives ``B`` far from the box.
        """
        from scipy import ndimage

        shape = points.shape[:-1]
        idx = self.grid.physical_to_index(points.reshape(-1, 3))[:, ::-1].T
        out = np.stack(
            [
                ndimage.map_coordinates(self.field[..., a], idx, order=1, mode="nearest")
                for a in range(3)
            ],
            axis=-1,
        )
        out[self.weight(points.reshape(-1, 3)) >= 1.0] = 0.0
        return out.reshape(*shape, 3)

    def weight_on(self, grid: Geometry) -> npt.NDArray[np.float32]:
        """``w`` on every voxel of a grid, (nz, ny, nx) float32.

        On an LPS-aligned grid (the network grid) the distance to the box is separable by
        axis and computed without the (nz, ny, nx, 3) array of voxel centres.
        """
        if not np.allclose(grid.direction, np.eye(3)):
            return self.weight(grid.voxel_centres()).astype(np.float32)
        gaps = []
        for axis in range(3):  # x, y, z
            n = grid.size_xyz[axis]
            x = grid.origin[axis] + grid.spacing[axis] * np.arange(n, dtype=np.float64)
            gap = np.maximum(np.maximum(self.lower[axis] - x, 0.0), x - self.upper[axis])
            shape = [1, 1, 1]
            shape[2 - axis] = n
            gaps.append((gap * gap).reshape(shape))
        d = np.sqrt(gaps[0] + gaps[1] + gaps[2])
        s = np.clip(d / self.blend_mm, 0.0, 1.0)
        return (0.5 + 0.5 * np.cos(np.pi * s)).astype(np.float32)

    def is_identity(self) -> bool:
        """Whether ``h`` is zero everywhere (the two mappings agree)."""
        return not bool(np.any(self.field))

    def min_det_jacobian(self) -> float:
        """The smallest det J of ``p -> A_f(p + h(p))`` on the coarse grid (no folding: > 0)."""
        return float(jacobian_determinant(Volume(self.field, self.grid)).min())

    def reach_mm(self) -> float:
        """The largest ``|h|``, mm."""
        return float(np.sqrt((self.field.astype(np.float64) ** 2).sum(axis=-1)).max())


def far_field_transform(far: FarField | None) -> sitk.Transform | None:
    """``p -> p + h(p)`` as a SimpleITK displacement-field transform (None when ``h`` = 0).

    Args:
        far: the far-field correction, or None.

    Returns:
        The transform to add (first) before the pre-alignment, or None.
    """
    if far is None or far.is_identity():
        return None
    image = sitk.GetImageFromArray(far.field.astype(np.float64), isVector=True)
    far.grid.apply_to_sitk(image)
    return sitk.DisplacementFieldTransform(image)
