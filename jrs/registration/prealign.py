"""Affine pre-alignment of a planning CT onto a daily CT (SimpleITK).

The result is a transform in SimpleITK's pull convention: it maps a point of the daily (fixed)
scan to the corresponding point of the planning (moving) scan, so that resampling the planning
scan with it gives the planning scan on the daily grid. Two stages, each multi-resolution on
coarse, smoothed copies of the scans with a randomly sampled metric restricted to the body:
rigid (Euler, initialised by the body centres of mass), then full affine.

Reproducibility: the same inputs give bit-identical transforms. Two things make ITK registration
vary from run to run, and both are fixed here: a sampling seed of 0 is ITK's "seed from the wall
clock" (``sitk.sitkWallClock``), so user seeds are shifted to non-zero ITK seeds (`itk_seed`); and
the metric's multi-threaded accumulation (Mattes mutual information with a B-spline transform adds
per-thread joint-histogram derivatives in whatever order the threads finish) depends on the
thread count and timing, so each registration runs its metric on a fixed number of threads
(`REGISTRATION_THREADS`, 1 by default: results then also agree across machines with different
core counts).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import SimpleITK as sitk

from jrs.core.errors import InvalidInput
from jrs.core.geometry import Volume

log = logging.getLogger(__name__)

BODY_HU = -400.0
BONE_HU = 200.0
#: threads of one registration (metric and optimiser). More threads are faster but make the
#: result depend on the thread count and, for Mattes mutual information, on thread timing.
REGISTRATION_THREADS = 1


def itk_seed(seed: int) -> int:
    """The ITK sampling seed for a user seed: never 0 (0 is ``sitk.sitkWallClock``: random).

    Args:
        seed: a non-negative seed.

    Returns:
        ``seed + 1`` (so seeds 0, 1, 2, ... stay distinct and reproducible).

    Raises:
        InvalidInput: for a negative seed.
    """
    if seed < 0:
        raise InvalidInput(f"registration seed must be >= 0, got {seed}")
    return int(seed) + 1


def check_threads(threads: int) -> None:
    """Raise `InvalidInput` unless ``threads`` (registration threads) is at least 1."""
    if threads < 1:
        raise InvalidInput(f"registration threads must be >= 1, got {threads}")


@dataclass
class AffineResult:
    """Outcome of `affine_prealign`.

    Attributes:
        transform: daily (fixed) LPS point -> planning (moving) LPS point, mm.
        rigid: the rigid stage alone (same convention).
        metric: final metric value of the affine stage (lower is better).
        seconds: wall time per stage.
    """

    transform: sitk.AffineTransform
    rigid: sitk.Euler3DTransform
    metric: float
    seconds: dict[str, float] = field(default_factory=dict)

    def map_points(self, points: np.ndarray) -> np.ndarray:
        """Map (N, 3) daily LPS points (mm) to planning LPS points (mm)."""
        return np.array([self.transform.TransformPoint(tuple(map(float, p))) for p in points])


#: Spacing of the pre-alignment's coarse copies (mm). 5 mm rather than 4 mm: on 3 mm slices the
#: slices are then averaged in pairs, which makes the registration 3x faster (1.05-1.25 s instead
#: of 3.05-3.66 s on the two Pelvic-Ref planning CTs) at the same accuracy against known rigid setup
#: errors (mean error 0.13 mm at both spacings; 0.28 vs 0.13 mm on a 1.2 mm-slice phantom);
#: ``jrs benchmark prealign --planning-ct CT --prealign-spacings 4,5``, docs/benchmarks.md.
PREALIGN_SPACING_MM = 5.0


def _coarse(volume: Volume, spacing: float) -> sitk.Image:
    """Block-averaged, clipped float copy of a CT with voxels of about `spacing` mm.

    Integer block averaging (BinShrink) is one pass over the data, anti-aliases by itself and is
    several times faster than Gaussian smoothing plus resampling of a 512 x 512 x 150 scan.
    """
    image = sitk.Cast(volume.to_sitk(), sitk.sitkFloat32)
    factors = [max(1, round(spacing / s)) for s in image.GetSpacing()]
    if any(f > 1 for f in factors):
        image = sitk.BinShrink(image, factors)
    return sitk.Clamp(image, sitk.sitkFloat32, -1000.0, 1500.0)


def body_mask(image: sitk.Image, threshold: float = BODY_HU) -> sitk.Image:
    """The patient's body: the largest connected component above `threshold` HU, holes filled.

    Args:
        image: CT in HU.
        threshold: HU above which a voxel is tissue.

    Returns:
        A uint8 mask image on the same grid.
    """
    mask = sitk.BinaryThreshold(image, threshold, 1e9, 1, 0)
    cc = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True)
    largest = sitk.BinaryThreshold(cc, 1, 1, 1, 0)
    return sitk.Cast(sitk.BinaryFillhole(largest), sitk.sitkUInt8)


def _register(
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_mask: sitk.Image,
    initial: sitk.Transform,
    *,
    iterations: int,
    sampling: float | None,
    seed: int,
    threads: int,
    scales_from_shift: bool = True,
    learning_rate: float = 2.0,
    min_step: float = 1e-2,
    shrink_factors: tuple[int, ...] = (2, 1),
    smoothing_voxels: tuple[float, ...] = (1.0, 0.0),
) -> tuple[sitk.Transform, float]:
    """Correlation, regular-step gradient descent, on the voxels of ``fixed_mask``.

    ``sampling`` is the fraction of those voxels drawn at random per iteration (seeded), or None
    for every voxel. Returns the optimised transform (a composite holding it) and the metric.
    """
    reg = sitk.ImageRegistrationMethod()
    reg.SetNumberOfThreads(threads)
    reg.SetNumberOfWorkUnits(threads)
    reg.SetMetricAsCorrelation()
    reg.SetMetricFixedMask(fixed_mask)
    if sampling is None:
        reg.SetMetricSamplingStrategy(reg.NONE)
    else:
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(sampling, itk_seed(seed))
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=learning_rate,
        minStep=min_step,
        numberOfIterations=iterations,
        relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-6,
    )
    if scales_from_shift:
        reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(shrink_factors))
    reg.SetSmoothingSigmasPerLevel(list(smoothing_voxels))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransform(initial, inPlace=False)
    out = reg.Execute(fixed, moving)
    return out, float(reg.GetMetricValue())


def affine_prealign(
    fixed: Volume,
    moving: Volume,
    *,
    spacing_mm: float = PREALIGN_SPACING_MM,
    stages: Literal["rigid", "affine"] = "affine",
    sampling: float = 0.1,
    iterations: int = 60,
    seed: int = 0,
    threads: int = REGISTRATION_THREADS,
) -> AffineResult:
    """Align a planning CT (moving) onto a daily CT (fixed): rigid, then affine.

    Args:
        fixed: daily CT, HU, (nz, ny, nx) with LPS geometry.
        moving: planning CT, HU, with LPS geometry.
        spacing_mm: spacing of the coarse copies the metric is computed on, mm (integer block
            averaging: each axis shrinks by ``round(spacing_mm / its spacing)``).
        stages: ``rigid`` stops after the rigid stage; ``affine`` adds the affine stage.
        sampling: fraction of the fixed body voxels sampled per iteration.
        iterations: maximum iterations per resolution level.
        seed: sampling seed (>= 0; the same seed and thread count give identical results).
        threads: threads of each registration stage (see `REGISTRATION_THREADS`).

    Returns:
        The transforms (daily point -> planning point) with metric value and timings.
    """
    if fixed.is_vector or moving.is_vector:
        raise InvalidInput("affine_prealign needs scalar CT volumes (HU), got a vector volume")
    check_threads(threads)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    f = _coarse(fixed, spacing_mm)
    m = _coarse(moving, spacing_mm)
    f_body = body_mask(f)
    m_body = body_mask(m)
    if (
        sitk.GetArrayViewFromImage(f_body).sum() < 50
        or sitk.GetArrayViewFromImage(m_body).sum() < 50
    ):
        raise InvalidInput(
            f"pre-alignment found no body (no connected region above {BODY_HU:.0f} HU) in the "
            "daily or planning CT; are these CT images in Hounsfield units?"
        )
    times["prepare"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    init = sitk.CenteredTransformInitializer(
        f_body, m_body, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    rigid_tx, rigid_metric = _register(
        f, m, f_body, init, iterations=iterations, sampling=sampling, seed=seed, threads=threads
    )
    rigid = sitk.Euler3DTransform(sitk.CompositeTransform(rigid_tx).GetNthTransform(0))
    times["rigid"] = time.perf_counter() - t1

    affine = sitk.AffineTransform(3)
    affine.SetCenter(rigid.GetCenter())
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    metric = rigid_metric
    if stages == "affine":
        t2 = time.perf_counter()
        affine_tx, metric = _register(
            f,
            m,
            f_body,
            affine,
            iterations=iterations,
            sampling=sampling,
            seed=seed + 1,
            threads=threads,
        )
        affine = sitk.AffineTransform(sitk.CompositeTransform(affine_tx).GetNthTransform(0))
        times["affine"] = time.perf_counter() - t2
    times["total"] = time.perf_counter() - t0
    log.info(
        "pre-alignment: rigid metric %.4f, final %.4f, %.2f s", rigid_metric, metric, times["total"]
    )
    return AffineResult(transform=affine, rigid=rigid, metric=metric, seconds=times)
