"""Benchmarks behind ``jrs benchmark`` (speed and memory are measured, never asserted in tests).

Each benchmark runs in the calling process and reports wall times and the process's peak
resident memory (``ru_maxrss``); run one benchmark per process for clean memory figures.

* ``phantom``: generate and write one synthetic patient with K fractions (the ``jrs phantom`` job).
* ``prealign``: affine pre-alignment of a 512 x 512 x N phantom CT onto a copy moved by a known
  rigid setup error; time per stage and mean error over the body (mm).
* ``recontour``: the whole pipeline on one case (a phantom fraction, or a given pair) run with
  ONNX Runtime fp32, OpenVINO fp32, OpenVINO bf16 and the iterative baseline in one run: per
  stage, p50 over ``repeats`` runs with the model kept loaded, the first (cold) run, the model
  load, peak memory, output sizes, Dice against the truth, engine ratios, and the error of the
  coarse DVF grid against the full-grid field inside the body (`bench_recontour`);
* ``gpu``: a prepared one-call measurement for a lent GPU (`bench_gpu`, ``scripts/gpu_bench.sh``).
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import platform
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from jrs.core.errors import InvalidInput
from jrs.core.fields import sample_dvf
from jrs.core.geometry import Volume
from jrs.core.metrics import dice
from jrs.io.ct import read_ct_series
from jrs.io.rtstruct import masks_from_files
from jrs.pipeline.methods import load_backend
from jrs.pipeline.options import RecontourOptions
from jrs.pipeline.run import recontour
from jrs.registration.prealign import PREALIGN_SPACING_MM, affine_prealign, body_mask
from jrs.synth import generate_fraction, generate_patient, write_fraction, write_patient

log = logging.getLogger(__name__)

#: Benchmark run name -> (method, engine, precision).
RUN_CONFIGS: dict[str, tuple[str, str, str]] = {
    "onnxruntime-fp32": ("network", "onnxruntime", "fp32"),
    "openvino-fp32": ("network", "openvino", "fp32"),
    "openvino-bf16": ("network", "openvino", "bf16"),
    "auto": ("network", "auto", "auto"),
    "iterative": ("iterative", "auto", "auto"),
    # the null-field correction off (`jrs.inference.null_correction`): what its second pass costs
    "openvino-bf16-no-null": ("network", "openvino", "bf16"),
    # a set number of network passes (`jrs.inference.cascade`): what a refining pass costs and gains
    "openvino-bf16-1pass": ("network", "openvino", "bf16"),
    "openvino-bf16-2pass": ("network", "openvino", "bf16"),
}
#: Runs with the null-field correction switched off (the others use the model's setting).
NO_NULL_CORRECTION_RUNS: frozenset[str] = frozenset({"openvino-bf16-no-null"})
#: Runs with a set number of network passes (the others use the model's setting).
RUN_PASSES: dict[str, int] = {"openvino-bf16-1pass": 1, "openvino-bf16-2pass": 2}
#: What ``jrs benchmark recontour`` compares by default.
DEFAULT_RUNS: tuple[str, ...] = ("onnxruntime-fp32", "openvino-fp32", "openvino-bf16", "iterative")
#: The organs scored against the truth.
ORGAN_ROIS: tuple[str, ...] = ("Prostate", "SeminalVesicles", "Rectum", "Bladder")


def machine() -> dict[str, Any]:
    """A short description of the machine the figures were taken on (and its load now)."""
    return {
        "cpu_cores": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (all its threads), s."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return float(usage.ru_utime + usage.ru_stime)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bench_phantom(
    fractions: int = 3, seed: int = 0, slice_mm: float | None = None
) -> dict[str, Any]:
    """Time generating and writing one phantom patient with `fractions` fractions."""
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


def bench_prealign(
    slices: int = 150,
    trials: int = 3,
    seed: int = 0,
    *,
    ct: Path | None = None,
    spacings_mm: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Pre-alignment time and accuracy against known rigid setup errors.

    The planning scan is a 512 x 512 x `slices` phantom, or the given CT series (e.g. a real
    planning CT); the daily scan is that scan moved by a random rigid setup error (up to 3 degrees
    and 10 mm per axis). Every trial runs the pre-alignment once per coarse spacing in
    `spacings_mm`, so spacings are compared on the same pairs; the error is the mean (and max)
    distance over body points between the recovered and the true mapping.

    Args:
        slices: phantom slices (ignored with `ct`).
        trials: setup errors to try.
        seed: phantom and setup-error seed.
        ct: a CT series folder to use instead of the phantom.
        spacings_mm: coarse spacings to compare (default: the pipeline's,
            `jrs.registration.prealign.PREALIGN_SPACING_MM`).

    Returns:
        Per trial and spacing: wall time, stages, mean and max error; the means per spacing.
    """
    import SimpleITK as sitk

    spacings = [float(v) for v in (spacings_mm or [PREALIGN_SPACING_MM])]
    if ct is not None:
        from jrs.io.ct import read_ct_series

        planning = read_ct_series(ct).volume
        target = planning.geometry
    else:
        from jrs.synth import generate_patient

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
        truth = np.array([true.TransformPoint(tuple(map(float, p))) for p in pts])
        for spacing in spacings:
            t0 = time.perf_counter()
            result = affine_prealign(daily, planning, spacing_mm=spacing)
            wall = time.perf_counter() - t0
            err = np.linalg.norm(result.map_points(pts) - truth, axis=1)
            rows.append(
                {
                    "spacing_mm": spacing,
                    "setup_deg": [round(float(a), 2) for a in angles],
                    "setup_mm": [round(float(s), 2) for s in shift],
                    "wall_s": round(wall, 3),
                    "stages_s": {k: round(v, 3) for k, v in result.seconds.items()},
                    "mean_error_mm": round(float(err.mean()), 3),
                    "max_error_mm": round(float(err.max()), 3),
                }
            )

    def mean_of(key: str, spacing: float) -> float:
        return round(float(np.mean([r[key] for r in rows if r["spacing_mm"] == spacing])), 3)

    return {
        "benchmark": "prealign",
        "ct": "given CT series" if ct is not None else f"phantom seed {seed}",
        "grid_zyx": list(target.shape),
        "spacing_mm_of_ct": [round(float(v), 3) for v in target.spacing],
        "trials": rows,
        "per_spacing": {
            str(sp): {
                "mean_wall_s": mean_of("wall_s", sp),
                "mean_error_mm": mean_of("mean_error_mm", sp),
            }
            for sp in spacings
        },
        "mean_wall_s": mean_of("wall_s", spacings[0]),
        "mean_error_mm": mean_of("mean_error_mm", spacings[0]),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


# ------------------------------------------------------------------------------ recontour
@dataclass
class Case:
    """One planning/daily pair to re-contour.

    Attributes:
        planning_ct: planning CT folder.
        planning_rtstruct: planning RTSTRUCT.
        daily_ct: daily CT folder.
        truth_rtstruct: the daily structures' truth (a phantom fraction's RTSTRUCT), or None.
        description: what the case is (seed, grid, spacing), for the report.
    """

    planning_ct: Path
    planning_rtstruct: Path
    daily_ct: Path
    truth_rtstruct: Path | None = None
    description: dict[str, Any] = field(default_factory=dict)


def phantom_case(
    root: Path, seed: int = 500, slice_mm: float | None = 1.2, matrix: int = 512, fraction: int = 1
) -> Case:
    """Write a phantom patient and one fraction under ``root`` (DICOM) as a benchmark case.

    Args:
        root: output folder.
        seed: phantom seed (500 and up: never used in training).
        slice_mm: slice thickness (1.2 mm gives a 512 x 512 x ~150 daily CT for seed 500).
        matrix: in-plane matrix.
        fraction: fraction index.
    """
    patient = generate_patient(seed, matrix=matrix, slice_thickness=slice_mm)
    write_patient(patient, root)
    frac = generate_fraction(patient, fraction)
    folder = root / f"fraction_{fraction}"
    write_fraction(frac, folder)
    g = frac.ct.geometry
    return Case(
        root / "planning" / "ct",
        root / "planning" / "rtstruct.dcm",
        folder / "ct",
        folder / "rtstruct.dcm",
        {
            "kind": "phantom",
            "seed": seed,
            "daily_grid_zyx": list(g.shape),
            "spacing_mm": [round(float(v), 4) for v in g.spacing],
        },
    )


def given_case(
    planning_ct: Path, planning_rtstruct: Path, daily_ct: Path, truth_rtstruct: Path | None = None
) -> Case:
    """A benchmark case from files on disk (e.g. a Pelvic-Ref planning CT and a fraction of it)."""
    g = read_ct_series(daily_ct).volume.geometry
    return Case(
        Path(planning_ct),
        Path(planning_rtstruct),
        Path(daily_ct),
        None if truth_rtstruct is None else Path(truth_rtstruct),
        {
            "kind": "given",
            "daily_ct": str(daily_ct),
            "daily_grid_zyx": list(g.shape),
            "spacing_mm": [round(float(v), 4) for v in g.spacing],
        },
    )


def dice_against_truth(
    daily_ct: Path, written: Path, truth: Path, names: Sequence[str] = ORGAN_ROIS
) -> dict[str, float]:
    """Per-ROI Dice of a written RTSTRUCT against a truth RTSTRUCT on the same daily CT.

    Args:
        daily_ct: the daily CT folder both belong to.
        written: the re-contoured RTSTRUCT.
        truth: the truth RTSTRUCT.
        names: ROIs to score (those missing from either file are skipped).

    Returns:
        ROI name -> DSC (4 decimals).
    """
    _, _, got = masks_from_files(daily_ct, written)
    _, _, ref = masks_from_files(daily_ct, truth)
    return {n: round(dice(got[n].array, ref[n].array), 4) for n in names if n in got and n in ref}


def coarse_dvf_error(
    coarse: Any, full: Any, body: npt.NDArray[np.bool_], slab: int = 8
) -> dict[str, float]:
    """How far a DVF written on a coarse grid is from the full-grid field inside the body.

    The coarse field is interpolated trilinearly (as a TPS reads a DICOM REG grid) at every body
    voxel centre of the full grid and compared with the full-grid field there.

    Args:
        coarse: the coarse `jrs.core.geometry.Volume` field ``(nz, ny, nx, 3)``, mm.
        full: the field on the daily CT grid, mm.
        body: ``(nz, ny, nx)`` body mask on the daily CT grid.
        slab: slices compared at a time (bounds the memory).

    Returns:
        ``{"mean", "p99", "max"}`` of the vector difference length (mm) and ``voxels``.
    """
    g = full.geometry
    errors = []
    for k0 in range(0, g.shape[0], slab):
        sel = np.argwhere(body[k0 : k0 + slab])
        if sel.size == 0:
            continue
        kji = sel + np.array([k0, 0, 0])
        pts = g.index_to_physical(kji[:, ::-1].astype(np.float64))
        ref = np.asarray(full.array[kji[:, 0], kji[:, 1], kji[:, 2]], np.float64)
        errors.append(np.linalg.norm(sample_dvf(coarse, pts) - ref, axis=1).astype(np.float32))
    if not errors:
        return {"mean": math.nan, "p99": math.nan, "max": math.nan, "voxels": 0}
    err = np.concatenate(errors)
    return {
        "mean": round(float(err.mean()), 4),
        "p99": round(float(np.percentile(err, 99)), 4),
        "max": round(float(err.max()), 4),
        "voxels": int(err.size),
    }


def _p50(values: Sequence[float]) -> float:
    return round(float(np.median(values)), 4) if values else math.nan


def _run_config(
    case: Case,
    name: str,
    repeats: int,
    model: Path | None,
    device: str,
    out_root: Path,
    dvf_error: bool,
    dvf_spacing_mm: float | None,
) -> dict[str, Any]:
    """One benchmark configuration: load once, re-contour ``repeats`` times (own process)."""
    method, engine, precision = RUN_CONFIGS[name]
    opts = RecontourOptions(
        method=method,  # type: ignore[arg-type]
        model_dir=model,
        device=device,
        engine=engine,
        precision=precision,
        null_correction=False if name in NO_NULL_CORRECTION_RUNS else None,
        network_passes=RUN_PASSES.get(name),
    )
    if dvf_spacing_mm is not None:
        opts.dvf_spacing_mm = dvf_spacing_mm or None
    t0 = time.perf_counter()
    backend = load_backend(opts) if method == "network" else None
    load_s = time.perf_counter() - t0
    rows: list[dict[str, float]] = []
    first: Any = None
    for r in range(repeats):
        load_avg = os.getloadavg()[0]
        out = out_root / f"{name}_{r}"
        t1, c1 = time.perf_counter(), cpu_seconds()
        result = recontour(
            case.planning_ct, case.planning_rtstruct, case.daily_ct, out, opts, backend=backend
        )
        wall = time.perf_counter() - t1
        rows.append(
            {
                **{k: float(v) for k, v in result.qa_data["timings_s"].items()},
                "wall": round(wall, 4),
                # CPU time of the run (both cores): a figure the machine's load barely moves
                "cpu": round(cpu_seconds() - c1, 2),
                "load_average_1min": round(load_avg, 2),
            }
        )
        if first is None:
            first = result
        else:
            shutil.rmtree(out, ignore_errors=True)
    rss = peak_rss_mb()
    qa = first.qa_data
    stages = [k for k in rows[0] if k != "load_average_1min"]
    report: dict[str, Any] = {
        "method": method,
        "engine": qa["model"].get("engine"),
        "precision": qa["model"].get("precision"),
        "device": qa["model"].get("device"),
        "execution_provider": qa["model"].get("execution_provider"),
        "load_model_s": round(load_s, 4),
        "first": rows[0],
        "p50": {k: _p50([row[k] for row in rows]) for k in stages},
        "runs": rows,
        "peak_rss_mb": round(rss, 1),
        "registration_mb": round(first.registration.stat().st_size / 1e6, 2),
        "dvf_mha_mb": round(first.dvf.stat().st_size / 1e6, 2),
        "dvf_grid": qa["dvf"]["grid"],
        "network": qa.get("network"),
    }
    if case.truth_rtstruct is not None:
        organs = [s["name"] for s in qa["structures"] if s.get("organ")] or list(ORGAN_ROIS)
        report["dice_vs_truth"] = dice_against_truth(
            case.daily_ct, first.rtstruct, case.truth_rtstruct, organs
        )
    if dvf_error and method == "network" and not qa["dvf"]["grid"]["daily_ct_grid"]:
        report["dvf_coarse_error_mm"] = _dvf_error_of(case, opts, backend, first, out_root / "full")
    return report


def _dvf_error_of(case: Case, opts: Any, backend: Any, coarse_result: Any, out: Path) -> Any:
    """Re-run with the DVF on the daily CT grid and compare the coarse field with it."""
    import dataclasses

    import SimpleITK as sitk

    full_opts = dataclasses.replace(opts, dvf_spacing_mm=None)
    result = recontour(
        case.planning_ct, case.planning_rtstruct, case.daily_ct, out, full_opts, backend=backend
    )
    daily = read_ct_series(case.daily_ct).volume
    body = sitk.GetArrayFromImage(body_mask(daily.to_sitk())).astype(bool)
    error = coarse_dvf_error(
        Volume.read(str(coarse_result.dvf)), Volume.read(str(result.dvf)), body
    )
    error["spacing_mm"] = coarse_result.qa_data["dvf"]["grid"]["spacing_mm"]
    error["full_grid_registration_mb"] = round(result.registration.stat().st_size / 1e6, 2)
    shutil.rmtree(out, ignore_errors=True)
    return error


def _in_process(func: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run ``func(*args)`` in a fresh interpreter (clean peak memory), return its result."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        result: dict[str, Any] = pool.apply(func, args)
    return result


def _skip_reason(name: str) -> str | None:
    """Why a configuration cannot run on this machine (None when it can)."""
    _, engine, precision = RUN_CONFIGS[name]
    if engine == "openvino":
        from jrs.inference import openvino_available

        if not openvino_available():
            return "OpenVINO is not installed"
        if precision == "bf16":
            from jrs.inference.openvino_cpu import cpu_capabilities

            if "BF16" not in cpu_capabilities():
                return "this CPU has no bf16 arithmetic (AMX or AVX512-BF16)"
    return None


def bench_recontour(
    case: Case | None = None,
    *,
    runs: Sequence[str] = DEFAULT_RUNS,
    repeats: int = 3,
    model: Path | None = None,
    device: str = "cpu",
    seed: int = 500,
    slice_mm: float | None = 1.2,
    dvf_error: bool = True,
    dvf_spacing_mm: float | None = None,
    isolate: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Re-contour one case with several engines and the iterative baseline, stage by stage.

    Every configuration runs in its own fresh process (``isolate``) so that its peak memory is
    its own: the model is loaded (compiled) once, then the case is re-contoured ``repeats`` times
    with it, as the service and ``jrs batch`` do. Reported per configuration: the model load,
    the first run (cold: OpenVINO compiles its window shape and allocates on it), p50 of every
    stage over the repeats, peak RSS, output sizes, Dice against the truth. Then the ratios:
    network stage of ONNX Runtime fp32 over each engine's, network path total over the
    iterative path's. With ``dvf_error``, the first network configuration also writes the DVF
    on the daily CT grid once and the coarse field's difference from it inside the body is given
    (mean, 99th percentile, max).

    Args:
        case: the pair to re-contour; a phantom (``seed``, ``slice_mm``) when None.
        runs: configurations (`RUN_CONFIGS` names), in order.
        repeats: re-contourings per configuration (p50 over them; >= 1).
        model: model version folder (default: the newest bundled model).
        device: ``cpu`` for the CPU engines (``auto`` lets ``auto`` use a GPU).
        seed: phantom seed when ``case`` is None.
        slice_mm: phantom slice thickness when ``case`` is None.
        dvf_error: measure the coarse DVF grid's error (one extra full-grid run).
        dvf_spacing_mm: DVF spacing (None: the pipeline default; 0: the daily CT grid).
        isolate: run each configuration in a fresh process.
        progress: called with a message after each configuration.

    Returns:
        The JSON-able report (``runs``, ``ratios``, ``dvf_coarse_error_mm``, ``markdown``).
    """
    unknown = [r for r in runs if r not in RUN_CONFIGS]
    if unknown or not runs:
        raise InvalidInput(
            f"benchmark runs {unknown or list(runs)} unknown; use {', '.join(RUN_CONFIGS)}"
        )
    if repeats < 1:
        raise InvalidInput(f"repeats must be >= 1, got {repeats}")
    started = machine()
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="jrs-bench-") as tmp:
        root = Path(tmp)
        if case is None:
            case = phantom_case(root / "case", seed, slice_mm)
        report: dict[str, Any] = {
            "benchmark": "recontour",
            "case": case.description,
            "repeats": repeats,
            "runs": {},
        }
        error_done = not dvf_error
        for name in runs:
            reason = _skip_reason(name)
            if reason is not None:
                report["runs"][name] = {"skipped": reason}
                continue
            want_error = not error_done and RUN_CONFIGS[name][0] == "network"
            args = (case, name, repeats, model, device, root / name, want_error, dvf_spacing_mm)
            one = _in_process(_run_config, *args) if isolate else _run_config(*args)
            error = one.pop("dvf_coarse_error_mm", None)
            if error is not None:
                report["dvf_coarse_error_mm"] = {"run": name, **error}
                error_done = True
            report["runs"][name] = one
            shutil.rmtree(root / name, ignore_errors=True)
            if progress is not None:
                progress(f"{name}: total p50 {one['p50'].get('total', math.nan):.1f} s")
    report["ratios"] = engine_ratios(report["runs"])
    report["wall_s"] = round(time.perf_counter() - t_all, 1)
    report["machine_at_start"] = started
    report["markdown"] = recontour_markdown(report)
    return report


def engine_ratios(runs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Speed ratios between configurations (p50): network stage and total.

    Returns:
        ``network_speedup_vs_onnxruntime_fp32``: name -> ORT fp32 network s / its network s;
        ``total_fraction_of_iterative``: name -> its total / the iterative total.
    """
    ok = {n: r for n, r in runs.items() if "p50" in r}
    out: dict[str, Any] = {}
    ref = ok.get("onnxruntime-fp32")
    if ref is not None and ref["p50"].get("network"):
        out["network_speedup_vs_onnxruntime_fp32"] = {
            n: round(ref["p50"]["network"] / r["p50"]["network"], 2)
            for n, r in ok.items()
            if r["p50"].get("network")
        }
    it = ok.get("iterative")
    if it is not None and it["p50"].get("total"):
        out["total_fraction_of_iterative"] = {
            n: round(r["p50"]["total"] / it["p50"]["total"], 3)
            for n, r in ok.items()
            if n != "iterative" and r["p50"].get("total")
        }
    return out


def recontour_markdown(report: Mapping[str, Any]) -> str:
    """The per-stage table (p50 s) of a `bench_recontour` report, one column per configuration."""
    runs = {n: r for n, r in report["runs"].items() if "p50" in r}
    names = list(runs)
    stages: list[str] = []
    for r in runs.values():
        for k in r["p50"]:
            if k not in stages and k not in ("wall", "cpu"):
                stages.append(k)
    lines = [
        "| stage (p50 s) | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for st in stages:
        lines.append(
            f"| {st} | "
            + " | ".join(f"{runs[n]['p50'].get(st, math.nan):.2f}" for n in names)
            + " |"
        )
    extra = [
        ("CPU time of a run (s, p50)", lambda r: f"{r['p50'].get('cpu', math.nan):.1f}"),
        ("first run total (cold)", lambda r: f"{r['first'].get('total', math.nan):.2f}"),
        ("model load + compile", lambda r: f"{r['load_model_s']:.2f}"),
        ("peak RSS (MiB)", lambda r: f"{r['peak_rss_mb']:.0f}"),
        ("registration.dcm (MB)", lambda r: f"{r['registration_mb']:.1f}"),
    ]
    for label, fmt in extra:
        lines.append(f"| {label} | " + " | ".join(fmt(runs[n]) for n in names) + " |")
    if any("dice_vs_truth" in r for r in runs.values()):
        organs = list(dict.fromkeys(o for r in runs.values() for o in r.get("dice_vs_truth", {})))
        for organ in organs:
            lines.append(
                f"| DSC {organ} | "
                + " | ".join(
                    f"{runs[n].get('dice_vs_truth', {}).get(organ, math.nan):.4f}" for n in names
                )
                + " |"
            )
    skipped = {n: r["skipped"] for n, r in report["runs"].items() if "skipped" in r}
    for n, why in skipped.items():
        lines.append(f"\n`{n}` skipped: {why}")
    return "\n".join(lines) + "\n"


__all__ = [
    "DEFAULT_RUNS",
    "RUN_CONFIGS",
    "Case",
    "bench_phantom",
    "bench_prealign",
    "bench_recontour",
    "coarse_dvf_error",
    "dice_against_truth",
    "engine_ratios",
    "given_case",
    "machine",
    "peak_rss_mb",
    "phantom_case",
    "recontour_markdown",
]
