r"""The paper's Table 3 on a lent GPU: Seg, Reg, JRS-reg and Cross-stitch in lockstep, one call.

Issue #10 asks for the same-budget comparison of the four networks. On the 2-core CPU each
2,000-step run takes an hour of one core, and three times a reset of the environment lost the runs
before they were scored. On a lent GPU the four train in ONE call of at most 10 minutes:

* ``init`` (here, where pydantic parses the configs): one step-0 checkpoint per Table 3 config
  (``training/configs/table3_*.yaml``: its network, its seed, its initialisation). One of them
  is packed as the pack's own checkpoint (``python -m research.gpu.gpu_pack --checkpoint``), the
  others go into ``gpu_pack/table3/<network>.pt`` (the run takes both; 3 MB saved for crops)::

      python -m research.gpu.gpu_table3 init --out runs/table3_init training/configs/table3_*.yaml
      python -m research.gpu.gpu_pack --store data/store_v3 --out gpu_pack --seed 1 --max-mb M \
          --checkpoint runs/table3_init/cross-stitch.pt
      mkdir gpu_pack/table3 && cp runs/table3_init/{seg,reg,jrs-reg}.pt gpu_pack/table3/

* ``run`` (there; ``research/gpu/gpu_table3.sh`` is the one-call wrapper): every network resumes its
  checkpoint on the GPU with AMP (fp16 autocast, ``GradScaler``, losses and optimiser in fp32,
  exactly :meth:`jrs.training.trainer.Trainer.train_step`) and the networks take their steps in
  rounds: one step each per round, so that **all of them always have the same number of
  steps**, whenever the budget ends. Networks whose configs sample alike (same sampler shares)
  train on the very same batches: one loader per distinct sampler setting (Seg has no
  domain-randomised pairs, the other three share one stream), its batches drawn by loader
  processes from the pack's crops (:mod:`research.gpu.gpu_pack`).

  The step budget is fitted to the time: after ``warm_rounds`` rounds the round time is measured
  and the common step count becomes ``min(max_steps, what fits)``; when that is below the configs'
  schedule horizon, each network's cosine schedule is re-aimed at it (still in its warm-up, so no
  step has yet used a decayed rate), and the checkpoints record both horizons.

  Into ``--out`` (at most 8 files come back): ``<network>.pt`` per network (resumable, CPU
  tensors, a ``provenance`` entry for the segment; rewritten every ``checkpoint_minutes``),
  ``table3_summary.json`` (steps, rounds, per-network ms/step, data share, losses, GPU memory,
  device), ``table3_logs.tar.gz`` (each network's training log, the trainer's columns) and
  ``table3_train.log``.

The checkpoints are scored here, on the held-out phantoms, by ``jrs evaluate`` (docs/training.md,
"Table 3"). It imports nothing that the GPU image lacks (no SimpleITK, pydicom or pydantic).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jrs.core.errors import InvalidInput
from jrs.training.data import PatchBatch
from jrs.training.run_log import CsvLog
from jrs.training.runtime import seed_everything
from jrs.training.trainer import Trainer
from jrs.training.weights import file_sha256
from research.gpu.gpu_run import (
    RETURN_LIMIT,
    LoaderSampler,
    _device_facts,
    _save,
    sampler_settings,
    segment_start,
    segment_trainer,
)

log = logging.getLogger(__name__)

SUMMARY_NAME = "table3_summary.json"
LOGS_NAME = "table3_logs.tar.gz"
TEXT_LOG_NAME = "table3_train.log"
#: The checkpoints' folder inside the pack.
PACK_SUBDIR = "table3"
#: Order of the networks in logs and summaries (others follow by name).
ORDER = ("seg", "reg", "jrs-reg", "cross-stitch")

__all__ = ["LOGS_NAME", "PACK_SUBDIR", "SUMMARY_NAME", "init_checkpoints", "main", "run_table3"]


class _Feed:
    """A trainer's sampler that hands it the batch of the current round.

    The round's batch is drawn once by the group's loader and given to every network of the group;
    ``state`` is the loader's (what a checkpoint records).
    """

    def __init__(self, loader: LoaderSampler) -> None:
        self.loader = loader
        self.batch: PatchBatch | None = None

    def sample(self) -> PatchBatch:
        """The current round's batch."""
        if self.batch is None:
            raise RuntimeError("no batch drawn for this round")
        return self.batch

    def state(self) -> dict[str, Any]:
        """The loader's sampler state."""
        return self.loader.state()


@dataclass
class _Net:
    """One network of the comparison and its bookkeeping."""

    name: str
    trainer: Trainer
    campaign: dict[str, Any]
    group: tuple[Any, ...]
    source: str
    entry: dict[str, Any]
    train_log: CsvLog
    step_s: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    skipped: int = 0


def _order(name: str) -> tuple[int, str]:
    return (ORDER.index(name) if name in ORDER else len(ORDER), name)


def init_checkpoints(configs: Sequence[Path], out: Path) -> list[Path]:
    """Write a step-0 checkpoint per training config (needs pydantic: run it here, not on the GPU).

    The network is built and initialised exactly as ``jrs train --config`` builds it (the
    config's seed), the optimiser and schedule are fresh; the sampler state is that of a dummy
    pair (the GPU run replaces the sampler).

    Args:
        configs: Training configs (YAML), one per network; their networks must differ.
        out: Folder for ``<network>.pt``.

    Returns:
        The checkpoints written.

    Raises:
        InvalidInput: For two configs of the same network, or configs whose patch sizes differ.
    """
    from jrs.training.config import load_config
    from jrs.training.synthetic import synthetic_pair

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    names: set[str] = set()
    sizes: set[int] = set()
    for path in configs:
        config = load_config(Path(path), device="cpu")
        name = config.network.name
        if name in names:
            raise InvalidInput(f"{path}: a second config for network {name!r}")
        names.add(name)
        sizes.add(int(config.patch_size))
        if len(sizes) > 1:
            raise InvalidInput(f"{path}: patch sizes differ between the configs ({sorted(sizes)})")
        dummy = synthetic_pair(0, max(40, int(config.patch_size)))
        trainer = Trainer(config, train_pairs=[dummy], val_pairs=[], progress=False)
        target = out / f"{name}.pt"
        trainer.save(target)
        written.append(target)
        log.info("%s: step-0 checkpoint of %s (seed %d)", target, name, config.seed)
    return written


def _horizon(net: _Net) -> int:
    """The step at which a network's lr schedule ends."""
    return int(net.trainer.config.schedule.horizon or net.trainer.config.iterations)


def _reaim(net: _Net, horizon: int) -> None:
    """Point a network's lr schedule at ``horizon`` steps (the scheduler reads it every step)."""
    sched = net.trainer.config.schedule
    old = _horizon(net)
    sched.horizon = horizon
    net.trainer.config.iterations = horizon
    net.campaign["schedule"] = {**dict(net.campaign.get("schedule") or {}), "horizon": horizon}
    net.campaign["iterations"] = horizon
    net.entry["schedule_horizon"] = {"config": old, "trained": horizon}


def run_table3(
    pack_dir: Path,
    out_dir: Path,
    *,
    checkpoints: Sequence[Path] | None = None,
    dry_run: bool = False,
    budget_s: float = 480.0,
    max_steps: int = 2000,
    workers: int = 0,
    seed: int = 20261204,
    warm_rounds: int = 30,
    log_every: int = 10,
    checkpoint_minutes: float = 3.0,
    started: float | None = None,
) -> dict[str, Any]:
    """Train the Table 3 networks in lockstep from their checkpoints and write them to ``out_dir``.

    Args:
        pack_dir: The GPU pack (its crops are the training data).
        out_dir: Where the files to bring back go (``$OUT`` on the lent machine).
        checkpoints: The networks' checkpoints (default: every ``*.pt`` in ``pack_dir/table3``);
            they must all be at the same step.
        dry_run: Run on the CPU (the same code, for tests and a check before a GPU is spent).
        budget_s: Wall-clock budget from ``started`` (s); rounds stop early enough to save.
        max_steps: Steps per network (fewer when the budget cannot hold them; see the module).
        workers: Loader processes in all, shared out over the sampling groups (0: in process).
        seed: Seed of the loaders and random generators.
        warm_rounds: Rounds timed before the common step count is fixed.
        log_every: A log row every this many steps.
        checkpoint_minutes: Rewrite the checkpoints at least this often.
        started: ``time.monotonic()`` at the process start (default: now).

    Returns:
        The summary (also written as ``table3_summary.json``).

    Raises:
        InvalidInput: Without CUDA (and not ``dry_run``), or for a bad pack or checkpoints.
    """
    t0, deadline, out_dir, device, pack = segment_start(
        out_dir, pack_dir, budget_s, dry_run, started
    )
    if checkpoints:
        paths, own = [Path(p) for p in checkpoints], None
    else:  # the pack's folder, and the pack's own checkpoint unless its network is there
        own = pack.checkpoint
        folder = sorted((Path(pack_dir) / PACK_SUBDIR).glob("*.pt"))
        if not folder:
            raise InvalidInput(
                f"{Path(pack_dir) / PACK_SUBDIR}: no checkpoints; make them with "
                "`python -m research.gpu.gpu_table3 init`"
            )
        paths = [*folder, own]
    logs_tmp = Path(tempfile.mkdtemp(prefix="table3_logs_"))
    nets: list[_Net] = []
    for path in paths:
        trainer, campaign = segment_trainer(
            path, pack, device, dry_run=dry_run, output_dir=logs_tmp
        )
        name = str(campaign["network"]["name"])
        if any(n.name == name for n in nets):
            if path == own:  # the pack's copy of a network whose checkpoint is in the folder
                continue
            raise InvalidInput(f"{path}: a second checkpoint of network {name!r}")
        entry: dict[str, Any] = {
            "kind": "gpu-table3",
            **_device_facts(device),
            "dry_run": dry_run,
            "amp": f"{trainer.autocast} autocast, GradScaler {'on' if trainer.amp else 'off'}",
            "data": "GPU pack: crops of a stratified subset of the store's training pairs; "
            "networks with the same sampler settings trained on the same batches",
            "pack": {
                "pairs": len(pack.index["pairs"]),
                "crops": len(pack.pairs),
                "strata": pack.index["strata"]["packed"],
                "store": pack.index["store"],
                "seed": pack.index["seed"],
                "keys": [p["key"] for p in pack.index["pairs"]],
            },
            "from_checkpoint": {"file": path.name, "sha256": file_sha256(path)},
            "start_step": trainer.step,
            "end_step": trainer.step,
            "seed": seed,
            "bit_for_bit": False,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        nets.append(
            _Net(
                name=name,
                trainer=trainer,
                campaign=campaign,
                group=tuple(sorted(sampler_settings(trainer.config).items())),
                source=str(path),
                entry=entry,
                train_log=CsvLog(logs_tmp / f"{name}_train_log.csv", trainer.columns),
            )
        )
    if not nets:
        raise InvalidInput(f"{pack.folder}: no checkpoints to train")
    nets.sort(key=lambda n: _order(n.name))
    starts = {n.trainer.step for n in nets}
    if len(starts) != 1:
        raise InvalidInput(
            "the checkpoints are at different steps "
            f"({ {n.name: n.trainer.step for n in nets} }): lockstep needs one start step"
        )
    start_step = starts.pop()
    seed_everything(seed)
    groups: dict[tuple[Any, ...], list[_Net]] = {}
    for n in nets:
        groups.setdefault(n.group, []).append(n)
    # loader processes shared out over the groups, in proportion to their networks (>= 1 each)
    shares = [len(g) for g in groups.values()]
    if workers > 0:
        alloc = [max(1, round(workers * s / sum(shares))) for s in shares]
    else:
        alloc = [0] * len(shares)
    loaders: list[tuple[LoaderSampler, _Feed, list[_Net]]] = []
    for gi, ((kw, members), nw) in enumerate(zip(groups.items(), alloc, strict=True)):
        loader = LoaderSampler(pack.pairs, workers=nw, seed=seed + 1000 * gi, **dict(kw))
        feed = _Feed(loader)
        for n in members:
            n.trainer.sampler = feed  # type: ignore[assignment]
        loaders.append((loader, feed, members))
    log.info(
        "Table 3 on %s %s: %s from step %d; %d sampling group(s) %s with %s loader workers; "
        "pack %d pairs (%d crops) %s; budget %.0f s, at most %d steps",
        nets[0].entry["device"],
        nets[0].entry["device_name"],
        ", ".join(n.name for n in nets),
        start_step,
        len(groups),
        [[n.name for n in m] for _, _, m in loaders],
        alloc,
        len(pack.index["pairs"]),
        len(pack.pairs),
        pack.index["strata"]["packed"],
        budget_s,
        max_steps,
    )
    target = max_steps
    fitted = False
    rounds = 0
    data_s = 0.0
    round_s: list[float] = []
    stop = "max steps"
    t_loop = time.monotonic()
    last_save = t_loop
    reserve = 10.0 + 2.0 * len(nets)  # the final saves and the summary
    for n in nets:
        n.trainer.net.train()
        n.trainer.weighting.train()

    def save_all() -> None:
        for n in nets:
            n.entry["end_step"] = n.trainer.step
            _save(n.trainer, out_dir / f"{n.name}.pt", n.campaign, n.entry)

    try:
        while True:
            done = min(n.trainer.step for n in nets) - start_step
            if done >= target:
                stop = "max steps" if target == max_steps else "steps fitted to the budget"
                break
            recent = float(np.mean(round_s[-20:])) if round_s else 0.0
            if time.monotonic() + recent + reserve > deadline:
                stop = "time budget"
                break
            tr = time.monotonic()
            td = time.perf_counter()
            for loader, feed, _members in loaders:
                feed.batch = loader.sample()
            data_s += time.perf_counter() - td
            for n in nets:
                if n.trainer.step - start_step >= target:
                    continue
                ts = time.monotonic()
                try:
                    row = n.trainer.train_step()
                except FloatingPointError as exc:  # before the optimiser step: retried next round
                    n.skipped += 1
                    log.warning("%s: %s (step retried on the next batch)", n.name, exc)
                    continue
                n.step_s.append(time.monotonic() - ts)
                n.losses.append(float(row["loss_total"]))
                if n.trainer.step % log_every == 0:
                    n.train_log.write(row)
            rounds += 1
            round_s.append(time.monotonic() - tr)
            if not fitted and rounds >= warm_rounds:
                fitted = True
                per_round = float(np.mean(round_s[-max(5, warm_rounds // 2) :]))
                left = deadline - time.monotonic() - reserve
                fit = done + 1 + int(0.95 * left / per_round) if per_round > 0 else max_steps
                target = min(max_steps, fit)
                for n in nets:
                    horizon = _horizon(n)
                    if start_step + target < horizon:
                        _reaim(n, start_step + target)
                log.info(
                    "round %.1f ms after %d rounds: %d steps per network fit the budget; "
                    "training %d (schedule horizon %s)",
                    1000.0 * per_round,
                    rounds,
                    fit,
                    target,
                    sorted({_horizon(n) for n in nets}),
                )
            if rounds % 100 == 0:
                el = time.monotonic() - t_loop
                log.info(
                    "round %d: %.2f rounds/s, data %.0f %%, loss %s",
                    rounds,
                    rounds / el,
                    100.0 * data_s / el,
                    {n.name: round(n.losses[-1], 4) for n in nets if n.losses},
                )
            if time.monotonic() - last_save >= 60.0 * checkpoint_minutes:
                save_all()
                last_save = time.monotonic()
    finally:
        for loader, _feed, _members in loaders:
            loader.close()
        for n in nets:
            n.train_log.close()
    loop_s = time.monotonic() - t_loop
    save_all()
    per_net: dict[str, Any] = {}
    for n in nets:
        steady = n.step_s[10:] if len(n.step_s) > 20 else n.step_s
        k = min(50, len(n.losses))
        path = out_dir / f"{n.name}.pt"
        size = path.stat().st_size
        per_net[n.name] = {
            "from": n.source,
            "steps": n.trainer.step - start_step,
            "end_step": n.trainer.step,
            "ms_per_step_steady": round(1000.0 * float(np.mean(steady)), 2) if steady else None,
            "non_finite_retried": n.skipped,
            "train_loss_first": float(np.mean(n.losses[:k])) if k else None,
            "train_loss_last": float(np.mean(n.losses[-k:])) if k else None,
            "lr_end": float(n.trainer.optimizer.param_groups[0]["lr"]),
            "schedule_horizon": n.entry.get("schedule_horizon") or _horizon(n),
            "checkpoint": {
                "file": path.name,
                "bytes": size,
                "sha256": file_sha256(path),
                "returns": size <= RETURN_LIMIT,
            },
        }
    summary: dict[str, Any] = {
        "dry_run": dry_run,
        **{k: v for k, v in nets[0].entry.items() if k in _device_facts(device)},
        "networks": [n.name for n in nets],
        "start_step": start_step,
        "steps_per_network": min(n.trainer.step for n in nets) - start_step,
        "target_steps": target,
        "max_steps": max_steps,
        "stopped_by": stop,
        "rounds": rounds,
        "wall_s": round(time.monotonic() - t0, 2),
        "train_s": round(loop_s, 2),
        "rounds_per_s": round(rounds / loop_s, 4) if loop_s > 0 else None,
        "data_s": round(data_s, 2),
        "data_share": round(data_s / loop_s, 4) if loop_s > 0 else None,
        "workers": alloc,
        "sampling_groups": [[n.name for n in m] for _, _, m in loaders],
        "seed": seed,
        "budget_s": budget_s,
        "pack": {k: v for k, v in nets[0].entry["pack"].items() if k != "keys"},
        "per_network": per_net,
    }
    if device.type == "cuda":
        summary["gpu_memory_mib"] = {
            "max_allocated": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
            "max_reserved": round(torch.cuda.max_memory_reserved(device) / 2**20, 1),
        }
    (out_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=1))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for f in sorted(logs_tmp.glob("*.csv")):
            tar.add(f, arcname=f.name)
    (out_dir / LOGS_NAME).write_bytes(buf.getvalue())
    return summary


def read_logs(archive: Path, folder: Path) -> list[Path]:
    """Unpack ``table3_logs.tar.gz`` (CSV files only) into ``folder``.

    Args:
        archive: The archive the run wrote.
        folder: Target folder.

    Returns:
        The CSV files written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out: list[Path] = []
    with tarfile.open(archive, mode="r:gz") as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if not member.isfile() or not name.endswith(".csv"):
                continue
            src = tar.extractfile(member)
            if src is None:
                continue
            target = folder / name
            target.write_bytes(src.read())
            out.append(target)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: ``init`` (here), ``run`` (on the GPU; ``research/gpu/gpu_table3.sh``)."""
    started = time.monotonic()
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ini = sub.add_parser("init", help="step-0 checkpoints of the configs (needs pydantic)")
    ini.add_argument("configs", nargs="+", type=Path)
    ini.add_argument("--out", type=Path, default=Path("runs") / "table3_init")
    run = sub.add_parser("run", help="train them in lockstep (on the GPU)")
    run.add_argument("--pack", type=Path, default=Path("gpu_pack"))
    run.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_out"))
    run.add_argument("--checkpoint", type=Path, action="append", default=None)
    run.add_argument("--dry-run", action="store_true")
    run.add_argument("--minutes", type=float, default=None, help="wall budget (8; dry run 3)")
    run.add_argument("--max-steps", type=int, default=None, help="per network (2000; dry run 2)")
    run.add_argument("--workers", type=int, default=None, help="loader processes in all")
    run.add_argument("--seed", type=int, default=20261204)
    run.add_argument("--warm-rounds", type=int, default=None, help="(30; dry run 1)")
    run.add_argument("--log-every", type=int, default=10)
    run.add_argument("--checkpoint-minutes", type=float, default=3.0)
    args = ap.parse_args(argv)
    fmt = "%(asctime)s %(levelname)s %(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt, stream=sys.stderr)
    if args.cmd == "init":
        try:
            init_checkpoints(args.configs, args.out)
        except InvalidInput as exc:
            log.error("%s", exc)
            return 2
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(args.out / TEXT_LOG_NAME, mode="w")
    handler.setFormatter(logging.Formatter(fmt))
    logging.getLogger().addHandler(handler)
    dry = bool(args.dry_run)
    workers = (
        args.workers
        if args.workers is not None
        else (0 if dry else max(1, min(12, (os.cpu_count() or 4) - 3)))
    )
    try:
        summary = run_table3(
            args.pack,
            args.out,
            checkpoints=args.checkpoint,
            dry_run=dry,
            budget_s=60.0 * (args.minutes if args.minutes is not None else (3.0 if dry else 8.0)),
            max_steps=args.max_steps if args.max_steps is not None else (2 if dry else 2000),
            workers=workers,
            seed=args.seed,
            warm_rounds=args.warm_rounds if args.warm_rounds is not None else (1 if dry else 30),
            log_every=args.log_every,
            checkpoint_minutes=args.checkpoint_minutes,
            started=started,
        )
    except InvalidInput as exc:
        log.error("%s", exc)
        return 2
    log.info(
        "%s %s: %d steps per network (%s), %d rounds, %.3f rounds/s, data %.1f %%; ms/step %s",
        summary["device"],
        summary["device_name"],
        summary["steps_per_network"],
        summary["stopped_by"],
        summary["rounds"],
        summary["rounds_per_s"] or math.nan,
        100.0 * (summary["data_share"] or 0.0),
        {k: v["ms_per_step_steady"] for k, v in summary["per_network"].items()},
    )
    if "gpu_memory_mib" in summary:
        log.info("GPU memory (MiB): %s", summary["gpu_memory_mib"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
