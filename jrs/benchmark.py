"""Benchmarks behind ``jrs benchmark`` (speed and memory are measured, never asserted in tests).

Each benchmark runs in the calling process and reports wall times and the process's peak
resident memory (``ru_maxrss``); run one benchmark per process for clean memory figures.

* ``phantom``: generate and write one synthetic patient with K fractions (the ``jrs phantom`` job).
* ``prealign``: affine pre-alignment of a 512 x 512 x N phantom CT onto a copy moved by a known
  rigid setup error; time per stage and mean error over the body (mm).
* ``recontour``: the whole pipeline on a phantom fraction, per-stage latency from ``qa.json``,
  for the network and/or the iterative method, with the agreement of the result with the truth.
"""

from __future__ import annotations

import os
import platform
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def machine() -> dict[str, Any]:
    """A short description of the machine the figures were taken on."""
    return {
        "cpu_cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bench_phantom(
    fractions: int = 3, seed: int = 0, slice_mm: float | None = None
) -> dict[str, Any]:
    """Time generating and writing one phantom patient with `fractions` fractions."""
    from jrs.phantom import generate_fraction, generate_patient, write_fraction, write_patient

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        patient = generate_patient(seed, slice_thickness=slice_mm)
        t_gen = time.perf_counter() - t0
        write_patient(patient, Path(tmp))
        per_fraction = []
        for k in range(1, fractions + 1):
            t1 = time.perf_counter()
            write_fraction(generate_fraction(patient, k), Path(tmp) / f"fraction_{k}")
            per_fraction.append(round(time.perf_counter() - t1, 2))
        total = time.perf_counter() - t0
    return {
        "benchmark": "phantom",
        "grid_zyx": list(patient.ct.geometry.shape),
        "spacing_mm": [round(float(s), 3) for s in patient.ct.geometry.spacing],
        "planning_generate_s": round(t_gen, 2),
        "fraction_s": per_fraction,
        "total_s": round(total, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def bench_prealign(slices: int = 150, trials: int = 3, seed: int = 0) -> dict[str, Any]:
    """Pre-alignment time and accuracy on a 512 x 512 x `slices` phantom with known setup errors."""
    import SimpleITK as sitk

    from jrs.phantom import generate_patient
    from jrs.registration import affine_prealign

    patient = generate_patient(seed)
    g0 = patient.ct.geometry
    # restack to the requested number of slices over the same z range
    thickness = float(g0.extent_mm[2]) / max(slices - 1, 1)
    target = g0.resampled_grid([float(g0.spacing[0]), float(g0.spacing[1]), thickness])
    planning = patient.ct.resample(target, "linear", -1000.0)
    body = planning.array > -400
    pts = target.index_to_physical(np.argwhere(body)[::997, ::-1].astype(float))
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(trials):
        angles = rng.uniform(-3, 3, 3)
        shift = rng.uniform(-10, 10, 3)
        centre = target.index_to_physical((np.asarray(target.size_xyz) - 1) / 2)
        true = sitk.Euler3DTransform(tuple(centre), *np.deg2rad(angles), tuple(shift))
        daily = planning.resample(target, "linear", -1000.0, transform=true)
        t0 = time.perf_counter()
        result = affine_prealign(daily, planning)
        wall = time.perf_counter() - t0
        truth = np.array([true.TransformPoint(tuple(map(float, p))) for p in pts])
        err = np.linalg.norm(result.map_points(pts) - truth, axis=1)
        rows.append(
            {
                "setup_deg": [round(float(a), 2) for a in angles],
                "setup_mm": [round(float(s), 2) for s in shift],
                "wall_s": round(wall, 3),
                "stages_s": {k: round(v, 3) for k, v in result.seconds.items()},
                "mean_error_mm": round(float(err.mean()), 3),
                "max_error_mm": round(float(err.max()), 3),
            }
        )
    return {
        "benchmark": "prealign",
        "grid_zyx": list(target.shape),
        "trials": rows,
        "mean_wall_s": round(float(np.mean([r["wall_s"] for r in rows])), 3),
        "mean_error_mm": round(float(np.mean([r["mean_error_mm"] for r in rows])), 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def bench_recontour(
    method: str = "network",
    model: Path | None = None,
    seed: int = 0,
    device: str = "auto",
    slice_mm: float | None = None,
) -> dict[str, Any]:
    """The whole pipeline on a phantom fraction: per-stage latency, peak memory, agreement."""
    from jrs.dicom.rtstruct import masks_from_files
    from jrs.metrics import dice
    from jrs.phantom import generate_fraction, generate_patient, write_fraction, write_patient
    from jrs.pipeline import RecontourOptions, recontour

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        patient = generate_patient(seed, slice_thickness=slice_mm)
        write_patient(patient, root)
        fraction = generate_fraction(patient, 1)
        write_fraction(fraction, root / "fraction_1")
        rss_before = peak_rss_mb()
        t0 = time.perf_counter()
        result = recontour(
            root / "planning" / "ct",
            root / "planning" / "rtstruct.dcm",
            root / "fraction_1" / "ct",
            root / "out",
            RecontourOptions(method=method, model_dir=model, device=device),  # type: ignore[arg-type]
        )
        wall = time.perf_counter() - t0
        _, _, new = masks_from_files(root / "fraction_1" / "ct", result.rtstruct)
        organs = ("Prostate", "SeminalVesicles", "Rectum", "Bladder")
        dsc = {o: round(dice(new[o].array, fraction.structures[o]), 3) for o in organs}
        qa = result.qa_data
    return {
        "benchmark": "recontour",
        "method": method,
        "daily_grid_zyx": list(fraction.ct.geometry.shape),
        "wall_s": round(wall, 2),
        "stages_s": qa["timings_s"],
        "network_box_mm": qa["network_box_mm"],
        "execution_provider": qa["model"]["execution_provider"],
        "dice_vs_truth": dsc,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_rss_before_mb": round(rss_before, 1),
    }
