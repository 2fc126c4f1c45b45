"""Continue the CPU campaign from a checkpoint trained on a lent GPU (not bit for bit).

Run as::

    python -m research.gpu.continue_from --checkpoint GPU_OUT/gpu_last.pt --run-dir
    runs/crossstitch_v3

``jrs train --resume`` resumes from ``<output_dir>/checkpoints/last.pt`` only and has no hook for
another checkpoint, so this module rewrites the checkpoint of :mod:`research.gpu.gpu_run` into one
that
the trainer resumes on the full store:

* kept: model, optimiser (RAdam moments), lr scheduler, loss-weighting state, AMP scaler state
  (unused on the CPU), step, epoch, best validation Dice and the config, i.e. the training state;
* replaced: the patch sampler's generator and the python / numpy / torch random states, freshly
  seeded (default seed: the config's seed plus the step) exactly as ``seed_everything`` and
  ``PatchSampler(seed=...)`` would seed them; the CUDA generator state is dropped. The GPU
  segment sampled the pack's crops, so no sampler position on the full store corresponds to it:
  the resume across the device boundary is NOT bit for bit (a CPU resume from a CPU checkpoint
  stays bit for bit, as before);
* appended: a ``provenance`` entry (``kind: cpu-continuation``); the trainer carries the history
  into every later checkpoint.

With ``--run-dir`` it writes ``RUN/checkpoints/last.pt`` (the previous one, if any, is kept as
``last_before_gpu_step<N>.pt``) and appends the GPU segment's ``gpu_train_log.csv`` (found beside
the checkpoint, or ``--gpu-log``) to ``RUN/train_log.csv`` after the rows up to the segment's start
step. It refuses when the run has moved past the step the GPU segment started from (the CPU
campaign went on meanwhile: two branches) unless ``--force`` discards the CPU steps after it.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import logging
import random
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jrs.core.errors import InvalidInput

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "jrs-train-checkpoint"

__all__ = [
    "continue_from",
    "cpu_resumable",
    "fresh_random_state",
    "gpu_segment",
    "merge_train_log",
]


def fresh_random_state(seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The random states that ``seed_everything(seed)`` and ``PatchSampler(seed=seed)`` start from.

    Computed on private generators: the process's own random states are left alone.

    Args:
        seed: The seed.

    Returns:
        ``(rng, sampler)``: the checkpoint's ``rng`` entry (``torch``, ``numpy``, ``python``)
        and the sampler's generator state.
    """
    gen = torch.Generator()
    gen.manual_seed(seed)
    rng = {
        "torch": gen.get_state(),
        "numpy": np.random.RandomState(seed % 2**32).get_state(),
        "python": random.Random(seed).getstate(),
    }
    sampler = dict(np.random.default_rng(seed).bit_generator.state)
    return rng, sampler


def gpu_segment(ckpt: Mapping[str, Any]) -> dict[str, Any] | None:
    """The last GPU-segment provenance entry of a checkpoint (``None`` when it has none)."""
    for entry in reversed(list(ckpt.get("provenance", []))):
        if entry.get("kind") == "gpu-segment":
            return dict(entry)
    return None


def cpu_resumable(
    ckpt: Mapping[str, Any], *, seed: int | None = None, source: str = ""
) -> dict[str, Any]:
    """A copy of a training checkpoint with freshly seeded sampler and random states.

    Args:
        ckpt: A jrs training checkpoint (loaded with ``map_location="cpu"``).
        seed: Seed of the new states (default: the config's seed plus the checkpoint's step).
        source: What the checkpoint was read from (recorded in the provenance).

    Returns:
        The checkpoint to save as ``last.pt``.

    Raises:
        InvalidInput: For anything but a jrs training checkpoint.
    """
    if not isinstance(ckpt, Mapping) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise InvalidInput(f"{source or 'checkpoint'}: not a jrs training checkpoint")
    out = dict(ckpt)
    step = int(out["step"])
    seed = int((out.get("config") or {}).get("seed", 0)) + step if seed is None else int(seed)
    rng, sampler = fresh_random_state(seed)
    out["rng"] = rng
    out["sampler"] = sampler
    segment = gpu_segment(out)
    out["provenance"] = [
        *(dict(p) for p in out.get("provenance", [])),
        {
            "kind": "cpu-continuation",
            "from": source,
            "step": step,
            "seed": seed,
            "after_gpu_segment": None
            if segment is None
            else [segment.get("start_step"), segment.get("end_step")],
            "bit_for_bit": False,
            "note": "sampler and random states freshly seeded for the full store: the resume "
            "across the device boundary is not bit for bit",
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    ]
    return out


def _rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return [], []
    return rows[0], [r for r in rows[1:] if r]


def _drop_rows_after(path: Path, step: int) -> None:
    """Drop the rows of a step-indexed CSV logged after ``step`` (a discarded CPU branch)."""
    if not path.is_file():
        return
    header, rows = _rows(path)
    kept = [r for r in rows if int(float(r[0])) <= step]
    if len(kept) == len(rows):
        return
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(kept)


def merge_train_log(run_log: Path, gpu_log: Path, start_step: int) -> int:
    """Append a GPU segment's log to a run's log after the rows up to ``start_step``.

    Args:
        run_log: The run's ``train_log.csv`` (created when missing).
        gpu_log: The segment's ``gpu_train_log.csv`` (the trainer's columns).
        start_step: The step the segment started from; run rows after it are dropped.

    Returns:
        Rows of the merged log.

    Raises:
        InvalidInput: When the two logs have different columns.
    """
    gpu_header, gpu_rows = _rows(gpu_log)
    header, rows = _rows(run_log) if run_log.is_file() else ([], [])
    if header and gpu_header and header != gpu_header:
        raise InvalidInput(
            f"{gpu_log}: columns differ from {run_log} (another network or weighting?)"
        )
    kept = [r for r in rows if int(float(r[0])) <= start_step]
    merged = kept + [r for r in gpu_rows if int(float(r[0])) > start_step]
    tmp = run_log.with_suffix(".tmp")
    run_log.parent.mkdir(parents=True, exist_ok=True)
    with tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header or gpu_header)
        writer.writerows(merged)
    tmp.replace(run_log)
    return len(merged)


def continue_from(
    checkpoint: Path,
    *,
    out: Path | None = None,
    run_dir: Path | None = None,
    gpu_log: Path | None = None,
    seed: int | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Rewrite a GPU checkpoint into a CPU-resumable one (see the module docstring).

    Args:
        checkpoint: The checkpoint of :mod:`research.gpu.gpu_run` (``gpu_last.pt``).
        out: Write the rewritten checkpoint here (an existing file is refused unless ``force``).
        run_dir: Or: the run folder to resume (``RUN/checkpoints/last.pt`` and
            ``RUN/train_log.csv``; the previous ``last.pt`` is kept as a copy).
        gpu_log: The segment's train log (default ``gpu_train_log.csv`` beside ``checkpoint``;
            merged into ``RUN/train_log.csv`` with ``run_dir``).
        seed: Seed of the fresh sampler and random states (default: config seed + step).
        force: Replace ``out``, or a run that has moved past the segment's start step.

    Returns:
        A summary: written path, step, seed, segment steps, log rows.

    Raises:
        InvalidInput: For a bad checkpoint, neither or both of ``out`` / ``run_dir``, or a
            destination that ``force`` would be needed to replace.
    """
    checkpoint = Path(checkpoint)
    if (out is None) == (run_dir is None):
        raise InvalidInput("give exactly one of --out FILE or --run-dir RUN")
    if not checkpoint.is_file():
        raise InvalidInput(f"{checkpoint}: no such checkpoint")
    data = checkpoint.read_bytes()
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    source = f"{checkpoint.name} sha256:{hashlib.sha256(data).hexdigest()[:16]}"
    new = cpu_resumable(ckpt, seed=seed, source=source)
    segment = gpu_segment(new)
    if segment is None:
        log.warning("%s has no GPU-segment provenance; rewriting it anyway", checkpoint)
    start = int(segment["start_step"]) if segment else int(new["step"])
    dest = Path(out) if out is not None else Path(run_dir or ".") / "checkpoints" / "last.pt"
    backup: Path | None = None
    if dest.exists():
        if out is not None and not force:
            raise InvalidInput(f"{dest}: exists; pass --force to replace it")
        old = torch.load(dest, map_location="cpu", weights_only=False)
        old_step = int(old.get("step", -1))
        if old_step > start and not force:
            raise InvalidInput(
                f"{dest}: the run is at step {old_step}, past step {start} that the GPU segment "
                f"started from (the two branches diverged); --force discards the CPU steps "
                f"{start + 1}..{old_step}"
            )
        if run_dir is not None:
            backup = dest.with_name(f"last_before_gpu_step{old_step}.pt")
            shutil.copyfile(dest, backup)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    torch.save(new, tmp)
    tmp.replace(dest)
    rows = None
    if run_dir is not None:
        glog = Path(gpu_log) if gpu_log is not None else checkpoint.with_name("gpu_train_log.csv")
        if glog.is_file():
            rows = merge_train_log(Path(run_dir) / "train_log.csv", glog, start)
        else:
            log.warning("%s: no GPU train log; %s/train_log.csv left as it is", glog, run_dir)
        _drop_rows_after(Path(run_dir) / "validation.csv", start)
    return {
        "written": str(dest),
        "backup": None if backup is None else str(backup),
        "step": int(new["step"]),
        "seed": int(new["provenance"][-1]["seed"]),
        "gpu_segment": None if segment is None else [start, segment.get("end_step")],
        "log_rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    """Command-line entry."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, required=True, help="gpu_last.pt")
    dest = ap.add_mutually_exclusive_group(required=True)
    dest.add_argument("--out", type=Path, help="write the CPU-resumable checkpoint here")
    dest.add_argument("--run-dir", type=Path, help="or resume this run folder (last.pt + log)")
    ap.add_argument("--gpu-log", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        res = continue_from(
            args.checkpoint,
            out=args.out,
            run_dir=args.run_dir,
            gpu_log=args.gpu_log,
            seed=args.seed,
            force=args.force,
        )
    except InvalidInput as exc:
        log.error("%s", exc)
        return 2
    log.info("%s", res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
