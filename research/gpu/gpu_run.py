"""One training segment on a lent GPU: resume the packed checkpoint, train with AMP, bring it back.

Run as ``python -m research.gpu.gpu_run --pack gpu_pack --out $OUT``
(``research/gpu/gpu_train.sh`` is the one-call wrapper), or ``--dry-run`` to run the same code
on the CPU with a few steps.

What it does, within a wall-clock budget counted from its start (default 9 minutes):

1. reads the pack of :mod:`research.gpu.gpu_pack` (crops of a stratified subset of the store's
training
   pairs, and the checkpoint to resume);
2. builds :class:`jrs.training.trainer.Trainer` from the checkpoint's own config (device ``cuda``,
   AMP: fp16 autocast of the network + ``GradScaler``, losses and optimiser state in fp32; TF32 is
   switched off so that the fp32 losses stay fp32), and loads the model, optimiser, lr scheduler,
   loss-weighting state, step and epoch of the checkpoint. The sampler and the random generators
   are seeded afresh: the data differ from the store's, so the segment is not bit for bit;
3. trains with ``Trainer.train_step`` (the CPU campaign's step, unchanged) on the packed crops,
   batches drawn by ``workers`` processes ahead of the GPU, and stops before the budget is spent;
4. writes into ``--out``: ``gpu_last.pt`` (the resumable checkpoint, tensors on the CPU, with a
   ``provenance`` entry saying that the segment ran on a GPU with a data subset; rewritten every
   ``checkpoint_minutes`` too, so a killed run still returns one), ``gpu_train_log.csv`` (the
   trainer's columns), ``gpu_summary.json`` (steps, steps/s, data share, GPU memory, device, torch
   version, start and end step, loss before and after) and ``gpu_train.log``.

"Loss before / after" is the total loss on the same fixed probe batches (drawn from the pack with a
fixed seed, network in eval mode, no gradient) before the first and after the last step; the
summary also gives the mean training loss of the first and last 50 steps.

It imports nothing that the GPU image lacks (no SimpleITK, pydicom or pydantic): the config is
read from the checkpoint into plain attribute objects (validated by ``jrs.training.config`` where
pydantic is installed). The CPU campaign continues from ``gpu_last.pt`` through
:mod:`research.gpu.continue_from`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import numpy as np
import torch

from jrs.core.errors import InvalidInput
from jrs.training.data import PatchBatch, PatchSampler, TrainingPair
from jrs.training.run_log import CsvLog
from jrs.training.runtime import seed_everything
from jrs.training.trainer import CHECKPOINT_FORMAT, Trainer
from jrs.training.weights import file_sha256
from research.gpu.gpu_pack import Pack, load_pack

if TYPE_CHECKING:
    from jrs.training.config import TrainConfig

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "gpu_last.pt"
LOG_NAME = "gpu_train_log.csv"
SUMMARY_NAME = "gpu_summary.json"
TEXT_LOG_NAME = "gpu_train.log"
#: Largest file the lent machine brings back (bytes).
RETURN_LIMIT = 16 * 1024 * 1024
#: Seed of the fixed probe batches (loss before / after).
PROBE_SEED = 20261202
#: Steps left out of the steady-state steps/s (CUDA and cuDNN warm-up).
WARMUP_STEPS = 20
_SECTIONS = frozenset(
    {
        "network",
        "weighting",
        "data",
        "validation",
        "schedule",
        "store",
        "phantoms",
        "synthetic",
        "losses",
    }
)
#: Sections later versions of the config added, with the values that keep older checkpoints'
#: behaviour (a checkpoint written before a section existed trained with these).
_ADDED_SECTIONS: dict[str, dict[str, Any]] = {"losses": {"reg_dice_classes": "known"}}

__all__ = [
    "CHECKPOINT_NAME",
    "LOG_NAME",
    "SUMMARY_NAME",
    "LoaderSampler",
    "RunConfig",
    "main",
    "probe_loss",
    "run_segment",
    "sampler_settings",
    "segment_device",
    "segment_start",
    "segment_trainer",
]


class RunConfig(SimpleNamespace):
    """A training config as attributes, read from a checkpoint's resolved config (no pydantic).

    Sections (``network``, ``data``, ``schedule``, ...) become nested namespaces; every other
    value (``network.overrides`` included) stays as stored. :meth:`resolved` returns the dict.
    """

    def __init__(self, raw: Mapping[str, Any]) -> None:
        full = copy.deepcopy(dict(raw))
        for section, defaults in _ADDED_SECTIONS.items():
            full[section] = {**defaults, **dict(full.get(section) or {})}
        super().__init__(**_attrs(full))
        self._raw = full

    def resolved(self) -> dict[str, Any]:
        """The configuration as plain JSON-able data (what ``TrainConfig.resolved`` gives)."""
        return copy.deepcopy(self._raw)


def _attrs(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: SimpleNamespace(**_attrs(v)) if k in _SECTIONS and isinstance(v, Mapping) else v
        for k, v in raw.items()
    }


class _Stream(torch.utils.data.IterableDataset[PatchBatch]):
    """Endless batches of one :class:`PatchSampler` per loader worker (seeded per worker)."""

    def __init__(self, pairs: Sequence[TrainingPair], seed: int, kwargs: Mapping[str, Any]):
        self.pairs = list(pairs)
        self.seed = seed
        self.kwargs = dict(kwargs)

    def __iter__(self) -> Iterator[PatchBatch]:
        info = torch.utils.data.get_worker_info()
        wid = 0 if info is None else int(info.id)
        seed = int(np.random.SeedSequence([self.seed, wid]).generate_state(1)[0])
        sampler = PatchSampler(self.pairs, seed=seed, **self.kwargs)
        while True:
            yield sampler.sample()


def _as_is(batch: Any) -> Any:
    """The loader's collate function: a batch passes as drawn (``batch_size=None``)."""
    return batch


def _worker_init(_wid: int) -> None:
    torch.set_num_threads(1)


class LoaderSampler(PatchSampler):
    """A :class:`PatchSampler` whose batches ``workers`` processes draw ahead of the GPU.

    With ``workers=0`` it is the plain sampler (drawn in this process). With workers, each one
    samples from its own seeded generator, so the batch sequence depends on the worker count and
    timing; :meth:`state` is then the (unused) generator state of this process, valid for a
    resume but not a position in that sequence.

    Args:
        pairs: The training pairs (the pack's crops).
        workers: Loader processes (0: none).
        seed: Sampling seed.
        **kwargs: The other :class:`PatchSampler` arguments.
    """

    def __init__(
        self, pairs: Sequence[TrainingPair], *, workers: int, seed: int, **kwargs: Any
    ) -> None:
        super().__init__(pairs, seed=seed, **kwargs)
        self.workers = int(workers)
        self._it: Iterator[PatchBatch] | None = None
        if self.workers > 0:
            loader = torch.utils.data.DataLoader(
                _Stream(self.pairs, seed, kwargs),
                batch_size=None,
                num_workers=self.workers,
                collate_fn=_as_is,
                worker_init_fn=_worker_init,
                prefetch_factor=4,
            )
            self._it = iter(loader)

    def sample(self) -> PatchBatch:
        """The next batch (from the workers when there are any)."""
        if self._it is None:
            return super().sample()
        return next(self._it)

    def close(self) -> None:
        """Stop the loader workers."""
        self._it = None


def _to_cpu(obj: Any) -> Any:
    """A copy of a (nested) state with every tensor moved to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(v) for v in obj)
    return obj


def probe_loss(trainer: Trainer, batches: Sequence[PatchBatch]) -> float:
    """Mean weighted total loss on fixed batches, network in eval mode, without gradients.

    The forward pass and losses are those of ``Trainer.train_step`` (same autocast, losses in
    fp32); nothing is updated (eval mode: BatchNorm uses its running statistics and the loss
    weighting does not record). The train/eval modes are restored.

    Args:
        trainer: The trainer.
        batches: The probe batches.

    Returns:
        The mean total loss (NaN without batches).
    """
    if not batches:
        return math.nan
    modes = (trainer.net.training, trainer.weighting.training)
    trainer.net.eval()
    trainer.weighting.eval()
    totals: list[float] = []
    try:
        with torch.no_grad():
            for batch in batches:
                fixed, moving, fixed_labels, moving_labels = trainer._tensors(batch)
                losses = trainer.forward_losses(
                    fixed, moving, fixed_labels, moving_labels, trainer._extras(batch)
                )
                total = trainer.weighting({t: v.total for t, v in losses.items()})
                totals.append(float(total))
    finally:
        trainer.net.train(modes[0])
        trainer.weighting.train(modes[1])
    return float(np.mean(totals))


def _load_start(trainer: Trainer, ckpt: Mapping[str, Any]) -> None:
    """Load the learning state of a checkpoint into a fresh trainer (no sampler / rng state)."""
    trainer.net.load_state_dict(ckpt["model"])
    trainer.weighting.load_state_dict(ckpt["weighting"])
    trainer.optimizer.load_state_dict(ckpt["optimizer"])
    if "scheduler" in ckpt:
        trainer.scheduler.load_state_dict(ckpt["scheduler"])
    if trainer.amp and ckpt.get("scaler"):  # a CPU checkpoint has no scaler state: start afresh
        trainer.scaler.load_state_dict(ckpt["scaler"])
    trainer.step = int(ckpt["step"])
    trainer.epoch = int(ckpt["epoch"])
    trainer.best_dice = float(ckpt["best"]["dice"])
    trainer.best_step = int(ckpt["best"]["step"])
    trainer.provenance = [dict(p) for p in ckpt.get("provenance", [])]


def _validate(raw: Mapping[str, Any]) -> None:
    """Validate a config with ``jrs.training.config`` where pydantic is installed (not on GPU)."""
    if importlib.util.find_spec("pydantic") is None:
        return
    try:
        from jrs.training.config import parse_config
    except ImportError:  # a pydantic that cannot be imported: as good as none
        return
    parse_config(dict(raw), "checkpoint config")


def _device_facts(device: torch.device) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "device": device.type,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "cpu_cores": os.cpu_count(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts.update(
            device_name=torch.cuda.get_device_name(device),
            cuda_version=torch.version.cuda,
            cudnn_version=torch.backends.cudnn.version(),
            gpu_memory_total_mib=round(props.total_memory / 2**20),
            capability=f"{props.major}.{props.minor}",
        )
    else:
        facts["device_name"] = platform.processor() or platform.machine()
    return facts


def segment_device(dry_run: bool) -> torch.device:
    """The device of a lent-GPU segment, set up for training (the CPU for a dry run).

    On CUDA: cuDNN autotuning on (fixed patch size), TF32 off (the losses' box-sum convolutions
    stay fp32), peak-memory statistics reset.

    Args:
        dry_run: Run on the CPU instead.

    Returns:
        ``cuda`` or, for a dry run, ``cpu``.

    Raises:
        InvalidInput: Without CUDA (and not ``dry_run``).
    """
    if dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise InvalidInput(
            "no CUDA GPU visible to torch: this is the lent-GPU run; use --dry-run on the CPU"
        )
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.cuda.reset_peak_memory_stats(device)
    return device


class SegmentStart(NamedTuple):
    """What every lent-GPU entry point sets up first (`segment_start`; unpacks in this order).

    Attributes:
        t0: ``time.monotonic()`` at the process start, s.
        deadline: ``t0`` plus the budget, s (monotonic clock).
        out_dir: The output folder (created).
        device: :func:`segment_device`.
        pack: The loaded pack.
    """

    t0: float
    deadline: float
    out_dir: Path
    device: torch.device
    pack: Pack


def segment_start(
    out_dir: Path | str,
    pack_dir: Path | str,
    budget_s: float,
    dry_run: bool,
    started: float | None = None,
) -> SegmentStart:
    """Clock, output folder, device and pack of a lent-GPU run (shared by its entry points).

    Args:
        out_dir: The output folder (created when absent).
        pack_dir: The pack folder (`research.gpu.gpu_pack`).
        budget_s: Wall-time budget from ``started``, s.
        dry_run: Run on the CPU instead.
        started: ``time.monotonic()`` at the process start (default: now).

    Returns:
        The `SegmentStart`.

    Raises:
        InvalidInput: Without CUDA (and not ``dry_run``), or for a bad pack.
    """
    t0 = time.monotonic() if started is None else float(started)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = segment_device(dry_run)
    return SegmentStart(t0, t0 + float(budget_s), out, device, load_pack(Path(pack_dir)))


def segment_trainer(
    checkpoint: Path, pack: Pack, device: torch.device, *, dry_run: bool, output_dir: Path
) -> tuple[Trainer, dict[str, Any]]:
    """A trainer on the pack's crops with the learning state of a checkpoint, for a segment.

    The config is the checkpoint's own (validated where pydantic is installed), run on
    ``device`` with AMP; the model, optimiser, scheduler, loss weighting, step and epoch are the
    checkpoint's (:func:`_load_start`); the sampler is the trainer's fresh one.

    Args:
        checkpoint: A jrs training checkpoint.
        pack: The GPU pack (its crops are the training pairs).
        device: :func:`segment_device`.
        dry_run: Run on the CPU with one thread.
        output_dir: The run's ``output_dir`` (logs).

    Returns:
        The trainer (its ``config`` a :class:`RunConfig`) and the checkpoint's config as stored.

    Raises:
        InvalidInput: Not a training checkpoint, or one for another patch size than the pack's.
    """
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise InvalidInput(f"{checkpoint}: not a jrs training checkpoint")
    campaign = dict(ckpt["config"])
    if int(campaign.get("patch_size", 0)) != int(pack.index["patch_size"]):
        raise InvalidInput(
            f"{checkpoint}: trains {campaign.get('patch_size')}^3 patches, the pack "
            f"{pack.folder} holds crops for {pack.index['patch_size']}^3"
        )
    _validate(campaign)
    raw = copy.deepcopy(campaign)
    raw.update(
        device=device.type,
        amp=True,
        num_threads=1 if dry_run else None,
        output_dir=str(output_dir),
        tensorboard=False,
    )
    trainer = Trainer(
        cast("TrainConfig", RunConfig(raw)), train_pairs=pack.pairs, val_pairs=[], progress=False
    )
    _load_start(trainer, ckpt)
    return trainer, campaign


def sampler_settings(config: Any) -> dict[str, Any]:
    """The :class:`PatchSampler` arguments of a training config, seed and pairs aside."""
    return {
        "patch_size": config.patch_size,
        "pairs_per_batch": config.pairs_per_batch,
        "patches_per_pair": config.patches_per_pair,
        "swap": config.swap,
        "identity_share": config.data.identity_share,
        "synthmorph_share": config.data.synthmorph_share,
    }


def _save(trainer: Trainer, path: Path, config: Mapping[str, Any], entry: dict[str, Any]) -> int:
    """Write the segment's checkpoint atomically (CPU tensors, campaign config, provenance)."""
    state = _to_cpu(trainer.state())
    state["config"] = copy.deepcopy(dict(config))  # the campaign's config, not the GPU overrides
    state["provenance"] = [*(dict(p) for p in trainer.provenance), dict(entry)]
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return path.stat().st_size


def run_segment(
    pack_dir: Path,
    out_dir: Path,
    *,
    dry_run: bool = False,
    budget_s: float = 540.0,
    max_steps: int | None = None,
    workers: int = 0,
    seed: int | None = None,
    log_every: int | None = None,
    probe_batches: int = 8,
    checkpoint_minutes: float = 3.0,
    started: float | None = None,
) -> dict[str, Any]:
    """Train one segment from a GPU pack and write checkpoint, log and summary into ``out_dir``.

    Args:
        pack_dir: The pack (:func:`research.gpu.gpu_pack.build_pack`).
        out_dir: Where the files to bring back go (``$OUT`` on the lent machine).
        dry_run: Run on the CPU (the same code; for CI and a check before a GPU is spent).
        budget_s: Wall-clock budget from ``started`` (s); training stops early enough to probe
            and save within it.
        max_steps: Stop after this many steps (``None``: only the budget).
        workers: Loader processes drawing batches ahead (0: in this process).
        seed: Seed of the sampler and of the random generators (default: the config's seed plus
            the start step, so each segment draws differently).
        log_every: CSV row every this many steps (default: the config's ``log_every``).
        probe_batches: Fixed batches of the loss before / after.
        checkpoint_minutes: Rewrite the checkpoint at least this often (s / 60).
        started: ``time.monotonic()`` at the process start (default: now).

    Returns:
        The summary (also written as ``gpu_summary.json``).

    Raises:
        InvalidInput: Without CUDA (and not ``dry_run``), or for a bad pack or checkpoint.
    """
    t0, deadline, out_dir, device, pack = segment_start(
        out_dir, pack_dir, budget_s, dry_run, started
    )
    trainer, campaign = segment_trainer(
        pack.checkpoint, pack, device, dry_run=dry_run, output_dir=out_dir
    )
    config = cast(RunConfig, trainer.config)
    start_step = trainer.step
    lr_start = float(trainer.optimizer.param_groups[0]["lr"])
    seg_seed = int(campaign.get("seed", 0)) + start_step if seed is None else int(seed)
    seed_everything(seg_seed)
    sampler_kwargs = sampler_settings(config)
    probe = PatchSampler(pack.pairs, seed=PROBE_SEED, **sampler_kwargs)
    probe_set = [probe.sample() for _ in range(max(0, probe_batches))]
    tp = time.monotonic()
    loss_before = probe_loss(trainer, probe_set)
    probe_s = time.monotonic() - tp
    sampler = LoaderSampler(pack.pairs, workers=workers, seed=seg_seed, **sampler_kwargs)
    trainer.sampler = sampler
    ckpt_path = out_dir / CHECKPOINT_NAME
    entry: dict[str, Any] = {
        "kind": "gpu-segment",
        **_device_facts(device),
        "dry_run": dry_run,
        "amp": f"{trainer.autocast} autocast, GradScaler {'on' if trainer.amp else 'off'}",
        "data": "GPU pack: crops of a stratified subset of the store's training pairs",
        "pack": {
            "pairs": len(pack.index["pairs"]),
            "crops": len(pack.pairs),
            "strata": pack.index["strata"]["packed"],
            "store": pack.index["store"],
            "seed": pack.index["seed"],
            "crop": pack.index["crop"],
            "keys": [p["key"] for p in pack.index["pairs"]],
        },
        "from_checkpoint": dict(pack.index["checkpoint"]),
        "start_step": start_step,
        "end_step": start_step,
        "seed": seg_seed,
        "bit_for_bit": False,
        "sampler": "not a position on the full store: continue with research.gpu.continue_from",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    every = int(log_every or config.log_every)
    log.info(
        "resuming step %d (lr %.3g) of %s on %s %s; pack %d pairs %s; budget %.0f s, "
        "%d loader workers, seed %d; loss on %d probe batches %.4f",
        start_step,
        lr_start,
        pack.index["checkpoint"]["from"],
        entry["device"],
        entry["device_name"],
        len(pack.index["pairs"]),
        pack.index["strata"]["packed"],
        budget_s,
        workers,
        seg_seed,
        len(probe_set),
        loss_before,
    )
    for name in (LOG_NAME, SUMMARY_NAME, CHECKPOINT_NAME):
        with contextlib.suppress(FileNotFoundError):
            (out_dir / name).unlink()
    train_log = CsvLog(out_dir / LOG_NAME, trainer.columns)
    losses: list[float] = []
    step_times: list[float] = []
    stop = "time budget"
    reserve = 1.5 * probe_s + 5.0
    t_loop = time.monotonic()
    last_save = t_loop
    data0 = trainer.data_s
    row: dict[str, float] = {}
    trainer.net.train()
    trainer.weighting.train()
    try:
        while True:
            done = trainer.step - start_step
            if max_steps is not None and done >= max_steps:
                stop = "max steps"
                break
            recent = float(np.mean(step_times[-20:])) if step_times else 0.0
            if time.monotonic() + recent + reserve > deadline:
                stop = "time budget"
                break
            ts = time.monotonic()
            try:
                row = trainer.train_step()
            except (FloatingPointError, torch.cuda.OutOfMemoryError) as exc:
                # raised before the optimiser step: the state is that of the last whole step
                stop = f"{type(exc).__name__}: {exc}"
                log.error("%s", stop)
                break
            step_times.append(time.monotonic() - ts)
            losses.append(float(row["loss_total"]))
            if trainer.step % every == 0:
                train_log.write(row)
            if (trainer.step - start_step) % 100 == 0:
                el = time.monotonic() - t_loop
                log.info(
                    "step %d: %.2f steps/s, data %.0f %%, loss %.4f",
                    trainer.step,
                    (trainer.step - start_step) / el,
                    100.0 * (trainer.data_s - data0) / el,
                    row["loss_total"],
                )
            if time.monotonic() - last_save >= 60.0 * checkpoint_minutes:
                entry["end_step"] = trainer.step
                _save(trainer, ckpt_path, campaign, entry)
                last_save = time.monotonic()
    finally:
        sampler.close()
        if row and trainer.step % every != 0:
            train_log.write(row)
        train_log.close()
    loop_s = time.monotonic() - t_loop
    steps = trainer.step - start_step
    loss_after = probe_loss(trainer, probe_set)
    steady = step_times[WARMUP_STEPS:] if len(step_times) > 2 * WARMUP_STEPS else step_times
    entry["end_step"] = trainer.step
    entry["steps"] = steps
    entry["steps_per_s"] = round(steps / loop_s, 3) if loop_s > 0 else None
    ckpt_bytes = _save(trainer, ckpt_path, campaign, entry)
    k = min(50, len(losses))
    summary: dict[str, Any] = {
        "dry_run": dry_run,
        **_device_facts(device),
        "start_step": start_step,
        "end_step": trainer.step,
        "steps": steps,
        "stopped_by": stop,
        "wall_s": round(time.monotonic() - t0, 2),
        "train_s": round(loop_s, 2),
        "steps_per_s": round(steps / loop_s, 4) if loop_s > 0 else None,
        "steps_per_s_steady": round(len(steady) / sum(steady), 4) if steady else None,
        "data_s": round(trainer.data_s - data0, 2),
        "data_share": round((trainer.data_s - data0) / loop_s, 4) if loop_s > 0 else None,
        "workers": workers,
        "loss_before": loss_before,
        "loss_after": loss_after,
        "probe_batches": len(probe_set),
        "train_loss_first": float(np.mean(losses[:k])) if k else None,
        "train_loss_last": float(np.mean(losses[-k:])) if k else None,
        "lr_start": lr_start,
        "lr_end": float(trainer.optimizer.param_groups[0]["lr"]),
        "amp": {
            "autocast": str(trainer.autocast),
            "grad_scaler": trainer.amp,
            "scale_end": float(trainer.scaler.get_scale()) if trainer.amp else None,
        },
        "seed": seg_seed,
        "budget_s": budget_s,
        "pack": {k: v for k, v in entry["pack"].items() if k != "keys"},
        "checkpoint": {
            "file": CHECKPOINT_NAME,
            "bytes": ckpt_bytes,
            "sha256": file_sha256(ckpt_path),
            "returns": ckpt_bytes <= RETURN_LIMIT,
            "from": dict(pack.index["checkpoint"]),
        },
    }
    if device.type == "cuda":
        summary["gpu_memory_mib"] = {
            "max_allocated": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
            "max_reserved": round(torch.cuda.max_memory_reserved(device) / 2**20, 1),
        }
    if ckpt_bytes > RETURN_LIMIT:
        log.warning(
            "%s is %.1f MiB: over the 16 MiB a file that comes back", ckpt_path, ckpt_bytes / 2**20
        )
    (out_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    """Command-line entry (``research/gpu/gpu_train.sh`` calls it)."""
    started = time.monotonic()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pack", type=Path, default=Path("gpu_pack"))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_out"))
    ap.add_argument("--dry-run", action="store_true", help="the same code on the CPU, few steps")
    ap.add_argument("--minutes", type=float, default=None, help="wall budget (9; dry run 2)")
    ap.add_argument("--max-steps", type=int, default=None, help="(dry run: 3)")
    ap.add_argument("--workers", type=int, default=None, help="loader processes (dry run: 0)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--log-every", type=int, default=None)
    ap.add_argument("--probe-batches", type=int, default=None, help="(8; dry run 1)")
    ap.add_argument("--checkpoint-minutes", type=float, default=3.0)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    fmt = "%(asctime)s %(levelname)s %(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt, stream=sys.stderr)
    handler = logging.FileHandler(args.out / TEXT_LOG_NAME, mode="w")
    handler.setFormatter(logging.Formatter(fmt))
    logging.getLogger().addHandler(handler)
    dry = bool(args.dry_run)
    minutes = args.minutes if args.minutes is not None else (2.0 if dry else 9.0)
    max_steps = args.max_steps if args.max_steps is not None else (3 if dry else None)
    workers = (
        args.workers
        if args.workers is not None
        else (0 if dry else max(1, min(8, (os.cpu_count() or 4) - 2)))
    )
    probes = args.probe_batches if args.probe_batches is not None else (1 if dry else 8)
    try:
        summary = run_segment(
            args.pack,
            args.out,
            dry_run=dry,
            budget_s=60.0 * minutes,
            max_steps=max_steps,
            workers=workers,
            seed=args.seed,
            log_every=args.log_every,
            probe_batches=probes,
            checkpoint_minutes=args.checkpoint_minutes,
            started=started,
        )
    except InvalidInput as exc:
        log.error("%s", exc)
        return 2
    log.info(
        "%s %s: steps %d -> %d (%d), %.3f steps/s (steady %s), data %.1f %%, loss %.4f -> %.4f, %s",
        summary["device"],
        summary["device_name"],
        summary["start_step"],
        summary["end_step"],
        summary["steps"],
        summary["steps_per_s"] or 0.0,
        summary["steps_per_s_steady"],
        100.0 * (summary["data_share"] or 0.0),
        summary["loss_before"],
        summary["loss_after"],
        summary["stopped_by"],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
