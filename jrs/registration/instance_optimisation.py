"""Instance optimisation: refine the network's field on the actual pair (no torch).

A network trained on one generator of anatomical change under-registers changes it has not
seen (a bladder that filled more, or differently, than its training data: issue 30). The
learned-registration systems that hold on unseen data refine their prediction on the pair at
hand (uniGradICON's instance optimisation, the Learn2Reg winners). Here, with SimpleITK on the
CPU:

1. the planning CT (already pre-aligned, on the 1 mm network grid) is warped once by the
   network's field ``u``;
2. a coarse B-spline transform ``v`` registers the daily CT to that warped image, inside the
   network box and the body: Mattes mutual information, control grid `RefineSettings.grid_mm`,
   coarse-to-fine image levels, a fixed fraction of the voxels sampled with a fixed seed, on one
   thread (deterministic: the same pair gives the same field);
3. the refined field is ``u'(p) = v(p) + u(p + v(p))`` (`jrs.core.fields.compose`);
4. per organ, the refinement is kept only where it improves the image agreement around the
   organ (NCC of the daily CT and the mapped planning CT in a band around the organ's contour,
   `per_organ_gate`), so a prostate the network already fits is not pulled by a neighbour:
   the final field is ``u + s (u' - u)`` (``s`` = 0 within `RefineSettings.blend_mm` of an
   organ the refinement does not improve, 1 elsewhere, smoothed between).

How far the refinement moved each organ's surface (mean and 95th percentile of ``|u' - u|`` on
the organ's boundary) and whether it was kept are recorded in ``qa.json`` (``refine``): the
segmentation path is not refined, so the difference is evidence for the path choice and QA.

A time budget stops the optimiser early (then the result depends on the machine's speed, and
``qa.json`` says ``stopped_by_budget``); the default budget is generous for the default
settings on two CPU cores.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from scipy import ndimage

from jrs.core.errors import InvalidInput
from jrs.core.fields import affine_to_dvf, compose, dvf_to_sitk
from jrs.core.geometry import Geometry, Volume
from jrs.registration.prealign import itk_seed

log = logging.getLogger(__name__)

#: refinement modes: ``on`` (the default: refine, keep it per organ where it helps), ``off``
REFINE_MODES: tuple[str, ...] = ("on", "off")


@dataclass(frozen=True)
class RefineSettings:
    """Settings of the refinement.

    Attributes:
        grid_mm: B-spline control-point spacing at the finest level, mm.
        shrink_factors: image shrink factor per level (the network grid is 1 mm).
        smoothing_mm: Gaussian smoothing per level, mm.
        iterations: L-BFGS iterations per level.
        sampling: fraction of the box's body voxels sampled per iteration.
        seed: sampling seed.
        budget_s: wall-time cap of the optimiser, s.
        band_mm: half-width of the band around an organ's contour where the gate compares the
            image agreement, mm.
        min_gain: NCC gain in the band below which an organ keeps the network's field.
        blend_mm: smoothing of the per-organ weight map, mm.
    """

    grid_mm: float = 24.0
    shrink_factors: tuple[int, ...] = (4, 2)
    smoothing_mm: tuple[float, ...] = (2.0, 1.0)
    iterations: int = 30
    sampling: float = 0.03
    seed: int = 0
    budget_s: float = 60.0
    band_mm: float = 4.0
    min_gain: float = 0.0
    blend_mm: float = 6.0


@dataclass
class RefineReport:
    """What the refinement did (``qa.json`` ``refine``).

    Attributes:
        applied: whether a refinement ran.
        seconds: wall time, s.
        iterations: optimiser iterations run (all levels).
        stopped_by_budget: whether the time budget stopped it.
        organs: organ key -> ``kept`` (bool), ``surface_shift_mm`` (mean ``|u' - u|`` on its
            contour), ``surface_shift_p95_mm``, ``ncc_network`` and ``ncc_refined`` (the band's
            agreement before and after).
        reason: why it did not run (empty when it ran).
    """

    applied: bool
    seconds: float = 0.0
    iterations: int = 0
    stopped_by_budget: bool = False
    organs: dict[str, dict[str, Any]] = field(default_factory=dict)
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "applied": self.applied,
            "seconds": round(self.seconds, 3),
            "iterations": self.iterations,
            "stopped_by_budget": self.stopped_by_budget,
            "organs": self.organs,
            "reason": self.reason,
        }


def check_refine_mode(mode: str) -> str:
    """Validate a refinement mode (``on`` or ``off``).

    Raises:
        InvalidInput: for any other value.
    """
    if mode not in REFINE_MODES:
        raise InvalidInput(f"refinement {mode!r} unknown; use one of {', '.join(REFINE_MODES)}")
    return mode


def _warp(image: npt.NDArray[np.float32], dvf: npt.NDArray[np.float32], grid: Geometry) -> Any:
    """``image(p + u(p))`` on its own grid (linear, edge value outside), float32."""
    src = Volume(image, grid).to_sitk()
    tx = dvf_to_sitk(Volume(dvf, grid))
    out = sitk.Resample(src, src, tx, sitk.sitkLinear, float(image.min()))
    return sitk.GetArrayFromImage(out)


def _band(mask: npt.NDArray[np.bool_], grid: Geometry, band_mm: float) -> npt.NDArray[np.bool_]:
    radius = max(1, round(band_mm / float(grid.spacing.min())))
    structure = ndimage.generate_binary_structure(3, 1)
    outer = ndimage.binary_dilation(mask, structure, iterations=radius)
    inner = ndimage.binary_erosion(mask, structure, iterations=radius)
    return outer & ~inner


def _ncc(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> float:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    da, db = a64 - a64.mean(), b64 - b64.mean()
    den = float(np.sqrt((da * da).sum() * (db * db).sum()))
    return float((da * db).sum() / den) if den > 0 else 0.0


def _boundary(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    return mask & ~ndimage.binary_erosion(mask)


def _bspline(
    fixed: npt.NDArray[np.float32],
    moving: npt.NDArray[np.float32],
    mask: npt.NDArray[np.uint8],
    grid: Geometry,
    settings: RefineSettings,
) -> tuple[sitk.Transform, int, bool]:
    """The B-spline ``v`` registering ``fixed`` to ``moving`` (pull), iterations, budget stop."""
    f = Volume(fixed, grid).to_sitk()
    m = Volume(moving, grid).to_sitk()
    levels = len(settings.shrink_factors)
    coarsest = 2 ** (levels - 1)
    mesh = [max(1, round(float(e) / settings.grid_mm / coarsest)) for e in grid.extent_mm]
    bspline = sitk.BSplineTransformInitializer(f, mesh, order=3)
    reg = sitk.ImageRegistrationMethod()
    reg.SetNumberOfThreads(1)
    reg.SetNumberOfWorkUnits(1)
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetMetricFixedMask(Volume(mask, grid).to_sitk())
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(settings.sampling, itk_seed(settings.seed))
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsLBFGS2(
        solutionAccuracy=1e-5,
        numberOfIterations=settings.iterations,
        deltaConvergenceTolerance=1e-4,
    )
    reg.SetInitialTransformAsBSpline(
        bspline, inPlace=True, scaleFactors=[2**i for i in range(levels)]
    )
    reg.SetShrinkFactorsPerLevel(list(settings.shrink_factors))
    reg.SetSmoothingSigmasPerLevel(list(settings.smoothing_mm))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    t0 = time.perf_counter()
    count = [0]
    stopped = [False]

    def on_iteration() -> None:
        count[0] += 1
        if time.perf_counter() - t0 > settings.budget_s and not stopped[0]:
            stopped[0] = True
            reg.StopRegistration()

    reg.AddCommand(sitk.sitkIterationEvent, on_iteration)
    out = reg.Execute(f, m)
    return out, count[0], stopped[0]


def per_organ_gate(
    fixed: npt.NDArray[np.float32],
    warped_network: npt.NDArray[np.float32],
    warped_refined: npt.NDArray[np.float32],
    organs: Mapping[str, npt.NDArray[np.bool_]],
    grid: Geometry,
    settings: RefineSettings,
) -> dict[str, dict[str, Any]]:
    """Per organ: the band's NCC before and after, and whether the refinement is kept.

    Args:
        fixed: daily CT on the network grid (normalised), (nz, ny, nx).
        warped_network: planning CT mapped by the network's field.
        warped_refined: planning CT mapped by the refined field.
        organs: organ key -> (nz, ny, nx) the organ after the network's mapping.
        grid: the network grid.
        settings: the refinement settings (band, minimum gain).

    Returns:
        organ key -> ``ncc_network``, ``ncc_refined``, ``kept``.
    """
    out: dict[str, dict[str, Any]] = {}
    for organ, mask in organs.items():
        if not mask.any():
            continue
        band = _band(mask, grid, settings.band_mm)
        before = _ncc(fixed[band], warped_network[band])
        after = _ncc(fixed[band], warped_refined[band])
        out[organ] = {
            "ncc_network": round(before, 4),
            "ncc_refined": round(after, 4),
            "kept": bool(after - before > settings.min_gain),
        }
    return out


def refine_field(
    fixed: npt.NDArray[np.float32],
    moving: npt.NDArray[np.float32],
    dvf: npt.NDArray[np.float32],
    grid: Geometry,
    body: npt.NDArray[np.uint8],
    organs: Mapping[str, npt.NDArray[np.bool_]],
    settings: RefineSettings | None = None,
) -> tuple[npt.NDArray[np.float32], RefineReport]:
    """Refine a pull field on the pair it was predicted for.

    Args:
        fixed: daily CT on the network grid, normalised, (nz, ny, nx) float32.
        moving: pre-aligned planning CT on the same grid, normalised.
        dvf: (nz, ny, nx, 3) the network's pull field, mm, LPS components.
        grid: the network grid (1 mm).
        body: (nz, ny, nx) the daily body mask (the metric's region).
        organs: organ key -> (nz, ny, nx) the organ as the network's field maps it (the
            registration path), for the per-organ gate and the report.
        settings: refinement settings.

    Returns:
        The final field ((nz, ny, nx, 3) float32, mm) and the report.
    """
    s = settings or RefineSettings()
    t0 = time.perf_counter()
    if dvf.shape != (*grid.shape, 3) or fixed.shape != grid.shape or moving.shape != grid.shape:
        raise InvalidInput(
            f"refinement needs the images {grid.shape} and the field {(*grid.shape, 3)} on "
            f"one grid, got {fixed.shape}, {moving.shape} and {dvf.shape}"
        )
    warped = _warp(moving, dvf, grid)
    if np.allclose(warped, fixed, rtol=0.0, atol=1e-5):  # (round-off of the resampling)
        return dvf, RefineReport(False, time.perf_counter() - t0, reason="the images agree")
    v_tx, iterations, stopped = _bspline(fixed, warped, body, grid, s)
    v = affine_to_dvf(v_tx, grid).array  # (any transform: T(p) - p on the grid)
    refined = compose(Volume(v, grid), Volume(dvf, grid)).array
    del v
    warped_refined = _warp(moving, refined, grid)
    gate = per_organ_gate(fixed, warped, warped_refined, organs, grid, s)
    # the refinement is kept everywhere but around the organs it does not improve: there the
    # weight is 0 out to `blend_mm` from the organ, and rises smoothly beyond (sigma a quarter
    # of that: at the organ's contour the refinement's share is below 1e-4)
    refused = np.zeros(grid.shape, bool)
    for organ, mask in organs.items():
        if organ in gate and not gate[organ]["kept"]:
            refused |= mask
    weight = np.ones(grid.shape, np.float32)
    if refused.any():
        spacing = np.asarray(grid.spacing, float)[::-1]
        near = ndimage.distance_transform_edt(~refused, sampling=spacing) <= s.blend_mm
        weight[near] = 0.0
        weight = ndimage.gaussian_filter(weight, s.blend_mm / 4.0 / spacing).astype(np.float32)
    delta = refined - dvf
    final = (dvf + weight[..., None] * delta).astype(np.float32)
    change = np.sqrt((delta * delta).sum(axis=-1)) * weight
    for organ, mask in organs.items():
        if organ not in gate:
            continue
        edge = change[_boundary(mask)]
        gate[organ]["surface_shift_mm"] = round(float(edge.mean()), 3) if edge.size else 0.0
        gate[organ]["surface_shift_p95_mm"] = (
            round(float(np.percentile(edge, 95)), 3) if edge.size else 0.0
        )
    seconds = time.perf_counter() - t0
    log.info(
        "refinement: %d iterations, %.1f s; organs kept %s",
        iterations,
        seconds,
        sorted(o for o, g in gate.items() if g["kept"]),
    )
    return final, RefineReport(True, seconds, iterations, stopped, gate)
