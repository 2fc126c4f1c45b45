"""``jrs benchmark gpu``: the one-call measurement for a lent GPU (at most 8 minutes).

Warm network latency per window, the end-to-end p50 and batch fractions per hour with ONNX
Runtime CUDA (TensorRT when installed); ``dry_run`` runs the same code on the CPU with small
sizes.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jrs.core.errors import InvalidInput
from jrs.inference import CUDA_PROVIDER, TENSORRT_PROVIDER, available_providers, load_model
from jrs.inference.registry import default_model_dir
from jrs.pipeline.batch import run_batch
from jrs.pipeline.benchmark import _p50, phantom_case
from jrs.pipeline.options import RecontourOptions
from jrs.pipeline.run import recontour
from jrs.synth import generate_fraction, generate_patient, write_fraction

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ GPU
#: Windows whose warm network latency ``jrs benchmark gpu`` measures.
GPU_WINDOWS: tuple[int, ...] = (96, 128, 160, 192, 224)


#: Wall-clock budget of ``jrs benchmark gpu`` (s): a lent GPU allows 8 minutes.
GPU_DEADLINE_S = 450.0


@dataclass
class _Clock:
    deadline: float

    def left(self) -> float:
        return self.deadline - time.perf_counter()


def _window_latency(
    model: Any, n: int, repeats: int, clock: _Clock, warmup: int = 2
) -> dict[str, Any]:
    rng = np.random.default_rng(n)
    shape = (1, 1, n, n, n)
    feed = {
        "fixed": rng.uniform(-1, 1, shape).astype(np.float32),
        "moving": rng.uniform(-1, 1, shape).astype(np.float32),
        "moving_labels": rng.integers(0, 5, shape).astype(np.float32),
    }
    t0 = time.perf_counter()
    for _ in range(warmup):
        model.run(feed)
    first_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        if clock.left() < 0:
            break
        t = time.perf_counter()
        model.run(feed)
        times.append(time.perf_counter() - t)
    return {
        "window": n,
        "warmup_s": round(first_s, 3),
        "p50_ms": round(1000 * float(np.median(times)), 2) if times else None,
        "runs": len(times),
        "output_voxels_per_s": round((n - 40) ** 3 / float(np.median(times))) if times else None,
    }


def bench_gpu(
    *,
    dry_run: bool = False,
    model: Path | None = None,
    windows: Sequence[int] | None = None,
    repeats: int = 3,
    fractions: int = 4,
    deadline_s: float = GPU_DEADLINE_S,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The measurements to take when a GPU is lent, in one call bounded in time.

    1. warm network latency per window size, ONNX Runtime on CUDA, then with the TensorRT
       execution provider when installed (its engine builds are part of ``warmup_s``);
    2. end-to-end re-contouring p50 of a 512 x 512 x ~150 phantom pair, model kept loaded;
    3. ``jrs batch`` throughput: fractions per hour for ``fractions`` fractions, one worker.

    Each step checks the deadline and is skipped (reported as such) when the time is up, so the
    whole call stays within ``deadline_s``. ``dry_run`` runs the same code on the CPU (the
    ``auto`` engine: OpenVINO where installed) with small windows, a small phantom and 2
    fractions: a check that the script works before a GPU is spent on it.

    Args:
        dry_run: CPU, small sizes.
        model: model version folder (default: the newest bundled model).
        windows: window sizes (default `GPU_WINDOWS`; dry run 48 and 64).
        repeats: timed runs per window and re-contourings for the end-to-end p50.
        fractions: fractions of the batch measurement.
        deadline_s: wall-clock budget, s.
        progress: called with a message after each step.

    Returns:
        The JSON-able report.
    """
    clock = _Clock(time.perf_counter() + float(deadline_s))
    say = progress or (lambda _m: None)
    providers = available_providers()
    model_dir = model or default_model_dir()
    device = "cpu" if dry_run else "cuda"
    engine = "auto" if dry_run else "onnxruntime"
    sizes = tuple(windows or ((48, 64) if dry_run else GPU_WINDOWS))
    report: dict[str, Any] = {
        "benchmark": "gpu",
        "dry_run": dry_run,
        "device": device,
        "providers": providers,
        "model": str(model_dir),
        "latency": {},
    }
    if not dry_run and CUDA_PROVIDER not in providers:
        raise InvalidInput(
            f"no {CUDA_PROVIDER} in this ONNX Runtime ({', '.join(providers)}); install "
            "onnxruntime-gpu on a CUDA machine, or run with --dry-run"
        )
    variants: list[tuple[str, bool | None]] = [("cpu", None)] if dry_run else [("cuda", False)]
    if not dry_run and TENSORRT_PROVIDER in providers:
        variants.append(("tensorrt", True))
    loaded: dict[str, Any] = {}
    for label, trt in variants:
        if clock.left() < 60:
            report["latency"][label] = {"skipped": "time budget"}
            continue
        t0 = time.perf_counter()
        m = load_model(model_dir, device, engine=engine, tensorrt=trt)
        rows = [{"load_s": round(time.perf_counter() - t0, 3), "provider": m.execution_provider}]
        for n in sizes:
            if clock.left() < 30:
                rows.append({"window": n, "skipped": "time budget"})
                continue
            rows.append(_window_latency(m, n, repeats, clock))
        report["latency"][label] = rows
        report.setdefault("engines", {})[label] = m.engine.info()
        loaded[label] = m
        say(f"latency {label}: {rows}")
    best = loaded.get("tensorrt") or loaded.get("cuda") or loaded.get("cpu")

    with tempfile.TemporaryDirectory(prefix="jrs-gpu-bench-") as tmp:
        root = Path(tmp)
        matrix, slice_mm = (128, 3.0) if dry_run else (512, 1.2)
        case = phantom_case(root / "case", 500, slice_mm, matrix=matrix)
        report["case"] = case.description
        opts = RecontourOptions(model_dir=model_dir, device=device, engine=engine)
        totals: list[dict[str, float]] = []
        for r in range(max(1, repeats)):
            if clock.left() < 40 or best is None:
                break
            res = recontour(
                case.planning_ct,
                case.planning_rtstruct,
                case.daily_ct,
                root / f"e2e{r}",
                opts,
                backend=best,
            )
            totals.append({k: float(v) for k, v in res.qa_data["timings_s"].items()})
            shutil.rmtree(root / f"e2e{r}", ignore_errors=True)
        report["end_to_end"] = (
            {
                "runs": totals,
                "p50": {k: _p50([t[k] for t in totals]) for k in totals[0]},
                "provider": best.execution_provider if best is not None else None,
            }
            if totals
            else {"skipped": "time budget"}
        )
        say(f"end to end: {report['end_to_end'].get('p50', {}).get('total')}")
        n_batch = min(fractions, 2) if dry_run else fractions
        report["batch"] = _batch_throughput(
            root, (500, matrix, slice_mm), n_batch, opts, best, clock
        )
        say(f"batch: {report['batch']}")
    report["wall_s"] = round(float(deadline_s) - clock.left(), 1)
    return report


def _batch_throughput(
    root: Path,
    phantom: tuple[int, int, float],
    n: int,
    opts: Any,
    backend: Any,
    clock: _Clock,
) -> dict[str, Any]:
    """Fractions per hour of `jrs.pipeline.batch.run_batch` (one worker, model kept loaded).

    Args:
        root: folder holding the case's ``case/planning`` (the patient of ``phantom``).
        phantom: (seed, matrix, slice mm) of that patient; fractions 1..n are written for it.
        n: fractions in the manifest.
        opts: re-contouring options.
        backend: the loaded model.
        clock: the deadline.
    """
    if backend is None or clock.left() < 60:
        return {"skipped": "time budget"}
    seed, matrix, slice_mm = phantom
    patient_root = root / "case"
    patient = generate_patient(seed, matrix=matrix, slice_thickness=slice_mm)
    rows = ["id,planning_ct,planning_rtstruct,daily_ct"]
    for k in range(1, n + 1):
        folder = patient_root / f"batch_fraction_{k}"
        write_fraction(generate_fraction(patient, k), folder)
        rows.append(
            f"f{k},{patient_root / 'planning' / 'ct'},{patient_root / 'planning' / 'rtstruct.dcm'},"
            f"{folder / 'ct'}"
        )
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    t0 = time.perf_counter()
    summary = run_batch(manifest, root / "batch", opts, workers=1, backend=backend)
    seconds = time.perf_counter() - t0
    done = len(summary.done)
    return {
        "fractions": n,
        "done": done,
        "failed": len(summary.failed),
        "seconds": round(seconds, 2),
        "fractions_per_hour": round(3600.0 * done / seconds, 1) if seconds > 0 else None,
    }


__all__ = ["GPU_DEADLINE_S", "GPU_WINDOWS", "bench_gpu"]
