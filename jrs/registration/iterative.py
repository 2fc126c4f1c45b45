"""The iterative method: a B-spline registration of the planning CT onto the daily CT.

SimpleITK, multi-resolution, Mattes mutual information (or NCC) restricted to a mask of the daily
scan, started from the pre-alignment. The same inputs give bit-identical transforms (fixed seeds
and a fixed thread count, see `jrs.registration.prealign`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import SimpleITK as sitk

from jrs.core.errors import InvalidInput
from jrs.core.geometry import Volume
from jrs.registration.prealign import REGISTRATION_THREADS, check_threads, itk_seed


@dataclass
class DeformableResult:
    """Outcome of `bspline_register`.

    Attributes:
        transform: composite transform, daily (fixed) LPS point -> planning (moving) LPS point:
            the initial (affine) transform followed by the B-spline refinement.
        metric: final metric value (lower is better).
        seconds: wall time.
    """

    transform: sitk.CompositeTransform
    metric: float
    seconds: float


def bspline_register(
    fixed: Volume,
    moving: Volume,
    *,
    initial: sitk.Transform | None = None,
    fixed_mask: Volume | None = None,
    grid_spacing_mm: float = 20.0,
    metric: Literal["ncc", "mattes"] = "mattes",
    shrink_factors: tuple[int, ...] = (4, 2, 1),
    smoothing_mm: tuple[float, ...] = (2.0, 1.0, 0.0),
    iterations: int = 60,
    sampling: float = 0.05,
    seed: int = 0,
    threads: int = REGISTRATION_THREADS,
) -> DeformableResult:
    """Iterative deformable registration (B-spline, multi-resolution): the elastix-like baseline.

    Args:
        fixed: daily CT (HU or normalised), the grid the result is defined on.
        moving: planning CT.
        initial: transform daily -> planning to start from (e.g. `AffineResult.transform`).
        fixed_mask: optional mask (same grid as `fixed`) restricting the metric.
        grid_spacing_mm: B-spline control-point spacing at the finest level, mm.
        metric: ``mattes`` (Mattes mutual information, 32 bins; the default: on phantom organ
            boxes it gave Dice 0.96/0.85/0.97/0.97 for prostate/SV/rectum/bladder against
            0.93/0.75/0.96/0.95 with ``ncc``, at about 4x the time) or ``ncc`` (ANTS
            neighbourhood correlation, radius 2).
        shrink_factors: image shrink factor per resolution level.
        smoothing_mm: Gaussian smoothing sigma per level, mm.
        iterations: L-BFGS iterations per level.
        sampling: fraction of fixed voxels sampled per iteration.
        seed: sampling seed (>= 0; the same seed and thread count give identical results).
        threads: threads of the registration (see `REGISTRATION_THREADS`; with more than one,
            Mattes mutual information is not bit-reproducible).

    Returns:
        The composite transform (initial then B-spline) with metric and timing.
    """
    if len(shrink_factors) != len(smoothing_mm):
        raise InvalidInput("shrink_factors and smoothing_mm need one entry per level")
    check_threads(threads)
    t0 = time.perf_counter()
    f = sitk.Cast(fixed.to_sitk(), sitk.sitkFloat32)
    m = sitk.Cast(moving.to_sitk(), sitk.sitkFloat32)
    extent = np.asarray(fixed.geometry.extent_mm)
    levels = len(shrink_factors)
    coarsest = 2 ** (levels - 1)  # the mesh doubles at each finer level
    mesh = [max(1, round(float(e) / grid_spacing_mm / coarsest)) for e in extent]
    bspline = sitk.BSplineTransformInitializer(f, mesh, order=3)
    reg = sitk.ImageRegistrationMethod()
    reg.SetNumberOfThreads(threads)
    reg.SetNumberOfWorkUnits(threads)
    if metric == "ncc":
        reg.SetMetricAsANTSNeighborhoodCorrelation(2)
    elif metric == "mattes":
        reg.SetMetricAsMattesMutualInformation(32)
    else:
        raise InvalidInput(f"metric {metric!r} unknown; use 'ncc' or 'mattes'")
    if fixed_mask is not None:
        fixed.geometry.require_same_grid(fixed_mask.geometry, "fixed image and its mask")
        reg.SetMetricFixedMask(sitk.Cast(fixed_mask.to_sitk() > 0, sitk.sitkUInt8))
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(sampling, itk_seed(seed))
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsLBFGS2(
        solutionAccuracy=1e-5,
        numberOfIterations=iterations,
        deltaConvergenceTolerance=1e-4,
    )
    if initial is not None:
        reg.SetMovingInitialTransform(initial)
    reg.SetInitialTransformAsBSpline(
        bspline, inPlace=True, scaleFactors=[2**i for i in range(levels)]
    )
    reg.SetShrinkFactorsPerLevel(list(shrink_factors))
    reg.SetSmoothingSigmasPerLevel(list(smoothing_mm))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    out = reg.Execute(f, m)
    composite = sitk.CompositeTransform(3)
    if initial is not None:
        composite.AddTransform(initial)
    composite.AddTransform(out)
    # CompositeTransform applies the last-added transform first: p -> initial(bspline(p))
    return DeformableResult(
        transform=composite, metric=float(reg.GetMetricValue()), seconds=time.perf_counter() - t0
    )
