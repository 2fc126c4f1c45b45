"""The training loop: RAdam, seeds, AMP, checkpoints with bit-for-bit resume, logs, validation.

``Trainer(config).run()`` trains ``config.network`` with ``config.weighting`` on patches drawn by
:class:`jrs.training.data.KeyedPatchSampler` (batch ``k`` depends on the seed, the process's rank
and
``k`` only; ``config.workers`` loader processes draw ahead). Everything that decides the next step
is in the checkpoint (model, optimiser, weighting state, AMP scaler, the sampler's position and the
python / numpy / torch random states, step and epoch), so ``Trainer(config, resume=True).run()``
after a run of ``N`` steps continues exactly as a straight run would: the losses and weights of
steps ``N+1..`` are identical (on the same device and thread count, with any number of loader
workers). ``resume=PATH`` continues from another checkpoint file in the same way;
``init_from=PATH`` starts a new run (step 0, fresh optimiser, loss weighting and sampler) with the
network weights of a checkpoint.

Launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the trainer joins the process
group (NCCL on CUDA, Gloo on the CPU), puts each process on ``cuda:LOCAL_RANK`` (or the CPU),
wraps the network in ``DistributedDataParallel`` and draws each rank's batches from its own seed
stream. The task losses are averaged over the ranks before the loss weighting sees them (the
weighting state stays the same on every rank; the network's gradients are averaged by DDP), and
only rank 0 writes checkpoints, logs, plots and runs the validation.

Run folder (``config.output_dir``)::

    checkpoints/last.pt, checkpoints/best.pt   (best = highest mean validation Dice)
    train_log.csv        every loss term per task and level, loss weights, cross-stitch alphas
    validation.csv       Dice per organ and output path, whole-scan tiled inference
    tensorboard/         the same scalars for TensorBoard
    plots/*.png          losses, loss weights, cross-stitch alphas, validation Dice
    config.yaml          the resolved config
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml
from torch import nn
from tqdm import tqdm

from jrs.core.errors import InvalidInput
from jrs.core.labels import LABELS
from jrs.training.data import (
    KeyedPatchSampler,
    PatchBatch,
    PatchSampler,
    TrainingPair,
)
from jrs.training.evaluate import ORGANS, organ_metrics, postprocess, predict_pair
from jrs.training.losses import TASKS_BY_NETWORK, TaskLoss, compute_task_losses
from jrs.training.networks import build
from jrs.training.phase import network_overrides
from jrs.training.plots import plot_run
from jrs.training.run_log import (
    LOSS_TERMS,
    CsvLog,
    alpha_summary,
    loss_columns,
    tensorboard_tag,
    truncate_csv,
)
from jrs.training.runtime import (
    DISTRIBUTED_TIMEOUT,
    autocast_dtype,
    distributed_info,
    git_sha,
    resolve_device,
    seed_everything,
)
from jrs.training.sources import load_pairs
from jrs.training.weighting import HomoscedasticWeighting, LossWeighting, build_weighting

if TYPE_CHECKING:  # annotations only: the trainer runs without pydantic (e.g. on a lent GPU)
    from jrs.training.config import TrainConfig

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "jrs-train-checkpoint"
CHECKPOINT_VERSION = 1

__all__ = ["TrainResult", "Trainer", "lr_factor"]


def lr_factor(step: int, iterations: int, warmup: int, kind: str, min_ratio: float) -> float:
    """Multiplier of the base lr at optimiser step ``step`` (0-based).

    ``constant``: 1. ``cosine``: linear from 0.1 to 1 over ``warmup`` steps, then
    ``min_ratio + (1 - min_ratio) (1 + cos(pi t)) / 2`` with ``t`` going from 0 to 1 at
    ``iterations`` (and staying there).
    """
    if kind == "constant":
        return 1.0
    if warmup and step < warmup:
        return 0.1 + 0.9 * step / warmup
    span = max(iterations - warmup, 1)
    t = min(max(step - warmup, 0) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


@dataclass
class TrainResult:
    """Summary of a finished :meth:`Trainer.run`.

    Attributes:
        step: Steps done in total.
        last_losses: The last step's logged values.
        best_dice: Best mean validation Dice (NaN without validation).
        last_checkpoint: Path of ``last.pt``.
        wall_s: Wall time of this call (s).
        steps_per_s: Training steps per second of this call (excluding validation).
        rank: The process's rank (0 wrote the files; the others only trained).
    """

    step: int
    last_losses: dict[str, float]
    best_dice: float
    last_checkpoint: Path
    wall_s: float
    steps_per_s: float
    rank: int = 0


class Trainer:
    """Train one network with one loss weighting (METHOD.md, Training).

    Args:
        config: The run configuration.
        train_pairs: Training pairs; loaded from ``config.data`` when ``None``.
        val_pairs: Validation pairs; loaded from ``config.data.validation`` when ``None`` and
            ``train_pairs`` is ``None`` too.
        resume: ``True``: continue from ``<output_dir>/checkpoints/last.pt``; a path: continue
            from that checkpoint file (logs and later checkpoints go to ``output_dir``).
        progress: Show a tqdm progress bar.
        init_from: Start a new run (step 0, fresh optimiser, loss weighting and sampler) with the
            network weights of this training checkpoint, whose network and settings must be the
            config's; ``output_dir`` must not hold a run yet.

    Raises:
        InvalidInput: For a checkpoint that cannot be resumed or initialised from (named, with
            what would be accepted), ``resume`` and ``init_from`` together, or a device this
            machine lacks.
    """

    def __init__(
        self,
        config: TrainConfig,
        train_pairs: Sequence[TrainingPair] | None = None,
        val_pairs: Sequence[TrainingPair] | None = None,
        resume: bool | Path | str = False,
        progress: bool = True,
        init_from: Path | str | None = None,
    ) -> None:
        self.config = config
        self.out = Path(config.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.progress = progress
        if init_from is not None and resume is not False:
            raise InvalidInput(
                f"{init_from}: init-from starts a new run and resume continues one; give one"
            )
        resume_path: Path | None = None
        if isinstance(resume, str | Path):
            resume_path = Path(resume)
        elif resume:
            resume_path = self.ckpt_dir / "last.pt"
        if init_from is not None and (self.ckpt_dir / "last.pt").exists():
            raise InvalidInput(
                f"{self.out}: holds a run already (checkpoints/last.pt); init-from starts a new "
                "run: choose another output folder, or continue that run with resume"
            )
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.dist = distributed_info()
        self.rank = self.dist.rank
        self.world_size = self.dist.world_size
        self.is_main = self.rank == 0
        self.device = resolve_device(
            config.device, self.dist.local_rank if self.dist.enabled else None
        )
        self._own_group = False
        if self.dist.enabled:
            self._join_group()
        self.amp = bool(config.amp and self.device.type == "cuda")
        self.autocast = autocast_dtype(self.device, config.amp, config.precision)
        if train_pairs is None:
            # rank 0 prepares (and caches) the pairs first; the others read its cache
            if self.dist.enabled and not self.is_main:
                torch.distributed.barrier()
            train, valid = load_pairs(config.data, self.out / "cache")
            if self.dist.enabled and self.is_main:
                torch.distributed.barrier()
        else:
            train, valid = list(train_pairs), list(val_pairs or [])
        self.val_pairs = valid
        seed_everything(config.seed)
        name = config.network.name
        self.net = build(name, **config.network.overrides).to(self.device)
        self.tasks = TASKS_BY_NETWORK[name]
        kwargs = (
            {"temperature": config.weighting.temperature} if config.weighting.name == "dwa" else {}
        )
        self.weighting: LossWeighting = build_weighting(
            config.weighting.name, self.tasks, **kwargs
        ).to(self.device)
        params = list(self.net.parameters()) + list(self.weighting.parameters())
        self.optimizer = torch.optim.RAdam(params, lr=config.lr)
        sch = config.schedule
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_factor(
                step,
                sch.horizon or config.iterations,
                sch.warmup,
                sch.name,
                sch.min_lr / config.lr,
            ),
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        # a config read from an older checkpoint (research.gpu.gpu_run.RunConfig) has no workers
        self.workers = int(getattr(config, "workers", 0) or 0)
        self.sampler: PatchSampler = KeyedPatchSampler(
            train,
            patch_size=config.patch_size,
            pairs_per_batch=config.pairs_per_batch,
            patches_per_pair=config.patches_per_pair,
            swap=config.swap,
            seed=config.seed,
            rank=self.rank,
            workers=self.workers,
            identity_share=config.data.identity_share,
            synthmorph_share=config.data.synthmorph_share,
        )
        self.data_s = 0.0  # wall time spent drawing batches in this process
        self.step = 0
        self.epoch = 0
        self.best_dice = -math.inf
        self.best_step = -1
        self.sha = git_sha()
        self.columns = [
            "step", "epoch", "wall_s", "data_s", "lr", *loss_columns(self.tasks, LOSS_TERMS)
        ]  # fmt: skip
        self.columns += [f"weight_{t}" for t in self.tasks]
        if isinstance(self.weighting, HomoscedasticWeighting):
            self.columns += [f"log_var_{t}" for t in self.tasks]
        self.columns += list(alpha_summary(self.net))
        # segments of this run's history that ran elsewhere (e.g. on a lent GPU with a data
        # subset, see research.gpu.gpu_run); carried from checkpoint to checkpoint, never
        # computed on
        self.provenance: list[dict[str, Any]] = []
        if resume_path is not None:
            self._load(resume_path)
        if init_from is not None:
            self._init_from(Path(init_from))
        # the module that trains: the network itself, or its DDP wrapper (same parameters)
        self.model: nn.Module = self.net
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(
                self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self._wall0 = time.monotonic()

    # ------------------------------------------------------------------ distributed
    def _join_group(self) -> None:
        """Join the process group of a ``torchrun`` launch (NCCL on CUDA, Gloo on the CPU)."""
        import torch.distributed as dist

        if not dist.is_available():
            raise InvalidInput("WORLD_SIZE > 1 but this torch has no torch.distributed")
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if dist.is_initialized():
            if dist.get_world_size() != self.world_size:
                raise InvalidInput(
                    f"a process group of {dist.get_world_size()} processes is initialised, "
                    f"WORLD_SIZE says {self.world_size}"
                )
            return
        dist.init_process_group(backend=backend, timeout=DISTRIBUTED_TIMEOUT)
        self._own_group = True
        log.info("rank %d of %d (%s, %s)", self.rank, self.world_size, backend, self.device)

    def _rank_mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over the ranks of a 1-D float tensor (the tensor itself on one process)."""
        if not self.dist.enabled:
            return values
        out = values.detach().to(self.device, torch.float32).clone()
        torch.distributed.all_reduce(out)
        return out / self.world_size

    def close(self) -> None:
        """Stop the loader workers and leave a process group this trainer joined."""
        close = getattr(self.sampler, "close", None)
        if callable(close):
            close()
        if self._own_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self._own_group = False

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        """Everything needed to continue bit for bit, plus provenance."""
        rng: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        }
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        state: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "step": self.step,
            "epoch": self.epoch,
            "network": {
                "name": self.config.network.name,
                "overrides": dict(self.config.network.overrides),
            },
            "tasks": list(self.tasks),
            "patch_size": self.config.patch_size,
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "weighting": self.weighting.state_dict(),
            "scaler": self.scaler.state_dict(),
            "sampler": self.sampler.state(),
            "rng": rng,
            "best": {"dice": self.best_dice, "step": self.best_step},
            "config": self.config.resolved(),
            "git_sha": self.sha,
            "torch_version": torch.__version__,
        }
        if self.dist.enabled:
            state["world_size"] = self.world_size
        if self.provenance:
            state["provenance"] = [dict(p) for p in self.provenance]
        return state

    def save(self, path: Path) -> None:
        """Write a checkpoint atomically (temporary file, then rename)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(self.state(), tmp)
        tmp.replace(path)

    def _read_checkpoint(self, path: Path, what: str) -> dict[str, Any]:
        """A training checkpoint whose network is the config's (name and every setting).

        Args:
            path: The checkpoint file.
            what: ``"resume"`` or ``"init-from"`` (for the messages).

        Returns:
            The checkpoint, tensors on the CPU.

        Raises:
            InvalidInput: Naming the file, for a missing or unreadable file, anything but a
                ``jrs-train-checkpoint``, or another network than the config's.
        """
        name = self.config.network.name
        accepted = (
            f"{what} accepts a {CHECKPOINT_FORMAT} file (checkpoints/last.pt or best.pt of a "
            f"jrs train run) of network {name!r} with the config's network settings"
        )
        if not path.is_file():
            raise InvalidInput(f"{path}: no checkpoint to {what} from; {accepted}")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # torch raises many kinds for a file that is no checkpoint
            raise InvalidInput(f"{path}: not readable as a checkpoint ({exc}); {accepted}") from exc
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise InvalidInput(f"{path}: not a jrs training checkpoint; {accepted}")
        if ckpt["network"]["name"] != name:
            raise InvalidInput(
                f"{path}: checkpoint of network {ckpt['network']['name']!r}, config asks for "
                f"{name!r}; {accepted}"
            )

        trained = network_overrides(name, ckpt["network"].get("overrides") or {})
        asked = network_overrides(name, self.config.network.overrides)
        if trained != asked:
            diff = {k: [trained.get(k), asked.get(k)] for k in asked if trained.get(k) != asked[k]}
            hint = (
                "; to change them mid-campaign run python -m jrs.training.phase --config CONFIG, "
                "which converts the checkpoint"
                if what == "resume"
                else f"; {accepted} (set network.overrides in the config to the checkpoint's)"
            )
            raise InvalidInput(
                f"{path}: trained with other network settings than the config asks for "
                f"(setting: [checkpoint, config]) {diff}{hint}"
            )
        return ckpt

    def _load(self, path: Path) -> None:
        ckpt = self._read_checkpoint(path, "resume")
        self.net.load_state_dict(ckpt["model"])
        self.weighting.load_state_dict(ckpt["weighting"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if "scheduler" in ckpt:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if isinstance(self.sampler, KeyedPatchSampler):
            self.sampler.set_state(ckpt["sampler"], step=int(ckpt["step"]))
        else:  # pragma: no cover - a sampler set from outside before the load
            self.sampler.set_state(ckpt["sampler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        np.random.set_state(ckpt["rng"]["numpy"])
        random.setstate(ckpt["rng"]["python"])
        if "cuda" in ckpt["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        self.step = int(ckpt["step"])
        self.epoch = int(ckpt["epoch"])
        self.best_dice = float(ckpt["best"]["dice"])
        self.best_step = int(ckpt["best"]["step"])
        self.provenance = [dict(p) for p in ckpt.get("provenance", [])]
        saved_world = int(ckpt.get("world_size", 1))
        if saved_world != self.world_size:
            log.warning(
                "%s was written by %d process(es), this run has %d: each step now averages %d "
                "batches instead of %d",
                path,
                saved_world,
                self.world_size,
                self.world_size,
                saved_world,
            )
        if self.is_main:
            for name in ("train_log.csv", "validation.csv"):
                truncate_csv(self.out / name, self.step)
        log.info("resumed from %s at step %d (epoch %d)", path, self.step, self.epoch)

    def _init_from(self, path: Path) -> None:
        """Take the network weights of a checkpoint; everything else stays a new run's."""
        ckpt = self._read_checkpoint(path, "init-from")
        try:
            self.net.load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            raise InvalidInput(
                f"{path}: its weights do not fit the config's network "
                f"{self.config.network.name!r} ({str(exc).splitlines()[0]})"
            ) from exc
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        self.provenance.append(
            {
                "kind": "init-from",
                "from": str(path),
                "sha256": digest,
                "step": int(ckpt.get("step", 0)),
                "git_sha": ckpt.get("git_sha", "unknown"),
                "output_dir": (ckpt.get("config") or {}).get("output_dir"),
                "note": "network weights only; step, optimiser, lr schedule, loss weighting, "
                "sampler and random states are this run's own",
                "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
        )
        log.info(
            "new run initialised with the network weights of %s (step %d, sha256 %s)",
            path,
            int(ckpt.get("step", 0)),
            digest[:16],
        )

    # ------------------------------------------------------------------ one step
    def _tensors(self, batch: PatchBatch) -> tuple[torch.Tensor, ...]:
        def t(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(self.device)

        return t(batch.fixed), t(batch.moving), t(batch.fixed_labels), t(batch.moving_labels)

    def _extras(self, batch: PatchBatch) -> dict[str, torch.Tensor | None]:
        """Per-sample class masks, segmentation validity and identity flags as tensors."""

        def t(a: np.ndarray | None, dtype: torch.dtype) -> torch.Tensor | None:
            if a is None:
                return None
            return torch.from_numpy(np.ascontiguousarray(a)).to(self.device, dtype)

        return {
            "class_mask": t(batch.class_mask, torch.float32),
            "seg_valid": t(batch.seg_valid, torch.bool),
            "identity": t(batch.identity, torch.bool),
        }

    def forward_losses(
        self,
        fixed: torch.Tensor,
        moving: torch.Tensor,
        fixed_labels: torch.Tensor,
        moving_labels: torch.Tensor,
        extras: Mapping[str, torch.Tensor | None],
    ) -> dict[str, TaskLoss]:
        """The network on one batch (autocast as configured) and its task losses in float32.

        Args:
            fixed: ``(B, 1, D, H, W)`` daily patches.
            moving: ``(B, 1, D, H, W)`` pre-aligned planning patches.
            fixed_labels: ``(B, 1, D, H, W)`` daily labels 0..4.
            moving_labels: ``(B, 1, D, H, W)`` planning labels 0..4.
            extras: :meth:`_extras` of the batch (class masks, segmentation validity, identity).

        Returns:
            Task name -> :class:`TaskLoss`.
        """
        with torch.autocast(
            self.device.type,
            dtype=self.autocast or torch.float32,
            enabled=self.autocast is not None,
        ):
            out = self.model(fixed, moving, moving_labels)
        # losses in float32 (NCC and Dice sums are fragile in half precision)
        out.seg = {k: v.float() for k, v in out.seg.items()}
        out.dvf = {k: v.float() for k, v in out.dvf.items()}
        return compute_task_losses(
            out,
            fixed,
            moving,
            fixed_labels,
            moving_labels,
            self.tasks,
            class_mask=extras["class_mask"],
            seg_valid=extras["seg_valid"],
            identity=extras["identity"],
            reg_dice_present_only=self.config.losses.reg_dice_classes == "present",
        )

    def train_step(self) -> dict[str, float]:
        """Draw a batch, do one optimiser step, and return the logged values of this step."""
        t_data = time.perf_counter()
        batch = self.sampler.sample()
        fixed, moving, fixed_labels, moving_labels = self._tensors(batch)
        extras = self._extras(batch)
        self.data_s += time.perf_counter() - t_data
        losses = self.forward_losses(fixed, moving, fixed_labels, moving_labels, extras)
        weights = self.weighting.weights()  # the weights used for this step
        totals = {t: v.total for t, v in losses.items()}
        logged: dict[str, float] | None = None
        if self.dist.enabled:
            totals, logged = self._ranks_averaged(losses)
        total = self.weighting(totals)
        if not torch.isfinite(total):
            raise FloatingPointError(f"non-finite total loss at step {self.step + 1}: {total}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        row = self._row(total, losses, weights, logged)
        if self.step % self.config.steps_per_epoch == 0:
            self.weighting.end_epoch()
            self.epoch += 1
        return row

    def _ranks_averaged(
        self, losses: Mapping[str, TaskLoss]
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Task losses whose values are the mean over the ranks, and the logged loss columns.

        One all-reduce per step. Each returned task loss has the value of the ranks' mean and the
        gradient of this rank's own loss (``mean + (own - own.detach())``: the added term is
        exactly 0), so the loss weighting sees the same numbers on every rank (DWA's epoch means,
        the homoscedastic weights' gradients) and DDP averages the network's gradients.
        """
        own = _loss_values(losses)
        names = [c for c in self.columns if c.startswith("loss_") and c != "loss_total"]
        flat = torch.stack(
            [
                own[c].float() if c in own else torch.tensor(math.nan, device=self.device)
                for c in names
            ]
        )
        mean = self._rank_mean(flat)
        logged = {c: float(v) for c, v in zip(names, mean.tolist(), strict=True)}
        index = {c: i for i, c in enumerate(names)}
        totals = {
            t: mean[index[f"loss_{t}"]].to(tl.total.dtype) + (tl.total - tl.total.detach())
            for t, tl in losses.items()
        }
        return totals, logged

    def _row(
        self,
        total: torch.Tensor,
        losses: Mapping[str, TaskLoss],
        weights: Mapping[str, float],
        logged: Mapping[str, float] | None = None,
    ) -> dict[str, float]:
        row: dict[str, float] = {
            "step": self.step,
            "epoch": self.epoch,
            "wall_s": time.monotonic() - self._wall0,
            "data_s": self.data_s,
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "loss_total": float(total.detach()),
        }
        if logged is not None:  # the mean over the ranks
            row.update(logged)
        else:
            row.update({k: float(v) for k, v in _loss_values(losses).items()})
        for t, w in weights.items():
            row[f"weight_{t}"] = w
        if isinstance(self.weighting, HomoscedasticWeighting):
            for t, s in self.weighting.log_variances().items():
                row[f"log_var_{t}"] = s
        row.update(alpha_summary(self.net))
        return row

    # ------------------------------------------------------------------ validation
    def validate(self) -> dict[str, float]:
        """Dice per organ and output path on the validation pairs (whole-scan tiled inference).

        Returns:
            ``{"dice_<path>_<organ>": mean over pairs, ..., "dice_mean": ...}``; ``dice_mean`` is
            the mean over organs of the segmentation path when the network has one, else of the
            registration path (the criterion of ``best.pt``).
        """
        acc: dict[str, list[float]] = {}
        for pair in self.val_pairs:
            pred = predict_pair(
                self.net, pair, window=self.config.data.validation.window, amp=self.amp
            )
            for path, labels in pred.labels().items():
                metrics = organ_metrics(postprocess(labels), np.asarray(pair.fixed_labels))
                for organ in ORGANS:
                    if organ not in pair.known:  # not delineated in this scan
                        continue
                    acc.setdefault(f"dice_{path}_{LABELS[organ]}", []).append(metrics[organ]["dsc"])
        res = {k: float(np.mean(v)) for k, v in sorted(acc.items())}
        path = "seg" if any(k.startswith("dice_seg_") for k in res) else "reg"
        res["dice_mean"] = float(
            np.mean([v for k, v in res.items() if k.startswith(f"dice_{path}_")])
        )
        return res

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        """Train to ``config.iterations`` steps; checkpoint, log, validate and plot on the way.

        In a distributed run every rank trains; rank 0 alone writes the run folder and validates,
        and every rank returns once rank 0's last checkpoint is written.
        """
        cfg = self.config
        main = self.is_main
        writer: Any = None
        train_log: CsvLog | None = None
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(cfg.resolved(), sort_keys=False))
            writer = self._tensorboard()
            train_log = CsvLog(self.out / "train_log.csv", self.columns)
        val_log: CsvLog | None = None
        last_ckpt_time = time.monotonic()
        start_step = self.step
        t0 = time.monotonic()
        val_time = 0.0
        row: dict[str, float] = {}
        bar = tqdm(
            total=cfg.iterations,
            initial=self.step,
            desc=f"train {cfg.network.name}/{cfg.weighting.name}",
            unit="step",
            disable=not (self.progress and main),
        )
        self.model.train()
        self.weighting.train()
        try:
            while self.step < cfg.iterations:
                row = self.train_step()
                bar.update(1)
                out_of_time = self._out_of_time(t0)
                if not main:
                    if out_of_time:
                        break
                    continue
                if train_log is not None and (
                    self.step % cfg.log_every == 0 or self.step == cfg.iterations
                ):
                    train_log.write(row)
                    if writer is not None:
                        for k, v in row.items():
                            if k not in ("step", "epoch"):
                                writer.add_scalar(tensorboard_tag(k), v, self.step)
                    bar.set_postfix(loss=f"{row['loss_total']:.4f}")
                every = cfg.data.validation.every
                if self.val_pairs and every and self.step % every == 0:
                    tv = time.monotonic()
                    vres = self.validate()
                    val_time += time.monotonic() - tv
                    if val_log is None:
                        val_log = CsvLog(self.out / "validation.csv", ["step", *vres])
                    val_log.write({"step": self.step, **vres})
                    if writer is not None:
                        for k, v in vres.items():
                            writer.add_scalar(f"validation/{k}", v, self.step)
                    log.info("step %d validation mean Dice %.4f", self.step, vres["dice_mean"])
                    if vres["dice_mean"] > self.best_dice:
                        self.best_dice, self.best_step = vres["dice_mean"], self.step
                        self.save(self.ckpt_dir / "best.pt")
                minutes = (time.monotonic() - last_ckpt_time) / 60.0
                if (
                    self.step % cfg.checkpoint_every == 0
                    or minutes >= cfg.checkpoint_minutes
                    or self.step == cfg.iterations
                ):
                    self.save(self.ckpt_dir / "last.pt")
                    last_ckpt_time = time.monotonic()
                if self.step % cfg.plot_every == 0:
                    plot_run(self.out)
                if out_of_time:
                    log.info(
                        "time budget of %g min spent at step %d: last.pt saved (--resume)",
                        cfg.time_budget_minutes,
                        self.step,
                    )
                    self.save(self.ckpt_dir / "last.pt")
                    break
        finally:
            bar.close()
            close = getattr(self.sampler, "close", None)
            if callable(close):  # stop the loader workers
                close()
            if train_log is not None:
                train_log.close()
            if val_log is not None:
                val_log.close()
            if writer is not None:
                writer.close()
        if main:
            if self.step == start_step:
                self.save(self.ckpt_dir / "last.pt")
            plot_run(self.out)
        if self.dist.enabled:
            torch.distributed.barrier()  # rank 0's files are complete when any rank returns
        self.close()
        wall = time.monotonic() - t0
        done = self.step - start_step
        return TrainResult(
            step=self.step,
            last_losses=row,
            best_dice=self.best_dice if self.best_step >= 0 else math.nan,
            last_checkpoint=self.ckpt_dir / "last.pt",
            wall_s=wall,
            steps_per_s=done / max(wall - val_time, 1e-9),
            rank=self.rank,
        )

    def _out_of_time(self, t0: float) -> bool:
        """Has the run spent its time budget? Every process gets rank 0's answer (DDP)."""
        budget = self.config.time_budget_minutes
        if budget is None:
            return False
        over = (time.monotonic() - t0) / 60.0 >= budget
        if self.dist.enabled:  # all ranks must stop at the same step
            flag = torch.tensor([1.0 if over else 0.0], device=self.device)
            torch.distributed.broadcast(flag, src=0)
            over = bool(flag.item() > 0)
        return over

    def _tensorboard(self) -> Any:
        if not self.config.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # pragma: no cover - tensorboard is in the train extra
            log.warning("tensorboard not installed; no TensorBoard logs")
            return None
        return SummaryWriter(str(self.out / "tensorboard"), purge_step=self.step + 1)


def _loss_values(losses: Mapping[str, TaskLoss]) -> dict[str, torch.Tensor]:
    """The logged loss columns of one step (detached scalars), ``loss_total`` aside."""
    out: dict[str, torch.Tensor] = {}
    for t, tl in losses.items():
        out[f"loss_{t}"] = tl.total.detach()
        for lv, v in tl.per_level.items():
            out[f"loss_{t}_{lv}"] = v.detach()
        for term, v in tl.terms.items():
            out[f"loss_{t}_{term}"] = v.detach()
    return out
