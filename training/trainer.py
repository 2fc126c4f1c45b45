"""The training loop: RAdam, seeds, AMP, checkpoints with bit-for-bit resume, logs, validation.

``Trainer(config).run()`` trains ``config.network`` with ``config.weighting`` on patches drawn by
:class:`training.data.PatchSampler`. Everything that decides the next step is in the checkpoint
(model, optimiser, weighting state, AMP scaler, the sampler's and the python / numpy / torch random
states, step and epoch), so ``Trainer(config, resume=True).run()`` after a run of ``N`` steps
continues exactly as a straight run would: the losses and weights of steps ``N+1..`` are identical
(on the same device and thread count).

Run folder (``config.output_dir``)::

    checkpoints/last.pt, checkpoints/best.pt   (best = highest mean validation Dice)
    train_log.csv        every loss term per task and level, loss weights, cross-stitch alphas
    validation.csv       Dice per organ and output path, whole-scan tiled inference
    tensorboard/         the same scalars for TensorBoard
    plots/*.png          losses, loss weights, cross-stitch alphas, validation Dice
    config.yaml          the resolved config
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import random
import subprocess
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

from jrs.errors import InvalidInput
from jrs.labels import LABELS
from training.data import PatchBatch, TrainingPair, discover_pairs, load_pair, phantom_pair
from training.losses import TASKS_BY_NETWORK, TaskLoss, compute_task_losses
from training.networks import LEVELS, build
from training.store import load_store
from training.weighting import HomoscedasticWeighting, LossWeighting, build_weighting

if TYPE_CHECKING:  # annotations only: the trainer runs without pydantic (e.g. on a lent GPU)
    from training.config import DataConfig, PhantomSource, SyntheticSource, TrainConfig

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "jrs-train-checkpoint"
CHECKPOINT_VERSION = 1

__all__ = [
    "TrainResult",
    "Trainer",
    "alpha_summary",
    "git_sha",
    "load_pairs",
    "resolve_device",
    "seed_everything",
    "source_pairs",
]


def git_sha() -> str:
    """The current git commit of the source tree, or ``"unknown"`` outside a repository."""
    try:
        res = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    sha = res.stdout.strip()
    return sha if res.returncode == 0 and sha else "unknown"


def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX-BF16 or AVX512-BF16 in /proc/cpuinfo)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def autocast_dtype(device: torch.device, amp: bool, precision: str) -> torch.dtype | None:
    """The autocast dtype of the network's forward pass, or ``None`` for plain fp32.

    CUDA: fp16 when ``amp``. CPU: bf16 for ``precision="bf16"``, or for ``"auto"`` on a CPU with
    native bf16 (:func:`cpu_supports_bf16`).
    """
    if device.type == "cuda":
        return torch.float16 if amp else None
    if precision == "bf16" or (precision == "auto" and cpu_supports_bf16()):
        return torch.bfloat16
    return None


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


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global generator and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InvalidInput("device 'cuda' requested but no CUDA GPU is available; use auto or cpu")
    return torch.device(name)


def source_pairs(
    phantoms: PhantomSource | None, synthetic: SyntheticSource | None
) -> list[TrainingPair]:
    """Pairs of a phantom or synthetic source (an empty list when both are ``None``)."""
    if phantoms is not None:
        return [
            phantom_pair(phantoms.seed + i, f)
            for i in range(phantoms.count)
            for f in range(1, phantoms.fractions + 1)
        ]
    if synthetic is not None:
        from training.synthetic import synthetic_pair

        return [synthetic_pair(synthetic.seed + i, synthetic.size) for i in range(synthetic.count)]
    return []


def load_pairs(data: DataConfig, cache_dir: Path) -> tuple[list[TrainingPair], list[TrainingPair]]:
    """Load (or generate) the training and validation pairs of a data config.

    Args:
        data: The data section.
        cache_dir: Cache of prepared DICOM pairs (used with ``data.root``).

    Returns:
        ``(training pairs, validation pairs)``.

    Raises:
        InvalidInput: When training and validation overlap or no training pair is left.
    """
    val = data.validation
    if data.store is not None:
        st = data.store
        train = load_store(st.path, sources=st.sources, exclude_groups=st.exclude_groups)
        held = {p.group for p in train} & set(st.exclude_groups)
        if held:  # pragma: no cover - load_store already drops them
            raise InvalidInput(f"held-out groups {sorted(held)} found in the training pairs")
        valid: list[TrainingPair] = []
        if val.store is not None:
            valid = load_store(
                val.store.path, sources=val.store.sources, exclude_groups=val.store.exclude_groups
            )
            overlap = {p.key for p in valid} & {p.key for p in train}
            if overlap:
                raise InvalidInput(f"pairs {sorted(overlap)[:5]} are both training and validation")
        valid += source_pairs(val.phantoms, val.synthetic)
        if not train:
            raise InvalidInput(f"{st.path}: no training pair left after the source/group filters")
        return train, valid[: val.max_pairs]
    if data.root is not None:
        cache = data.cache_dir or cache_dir
        held_out = set(val.patients)
        records = discover_pairs(data.root, data.patients)
        train_rec = [r for r in records if r.patient not in held_out]
        overlap = held_out & set(data.patients or [])
        if overlap:
            raise InvalidInput(f"patients {sorted(overlap)} are both training and validation")
        val_rec = discover_pairs(data.root, sorted(held_out)) if held_out else []
        train = [load_pair(r, cache) for r in tqdm(train_rec, desc="preparing pairs", unit="pair")]
        valid = [load_pair(r, cache) for r in val_rec[: val.max_pairs]]
    else:
        for name in ("phantoms", "synthetic"):
            a, b = getattr(data, name), getattr(val, name)
            if a is not None and b is not None:
                seeds_a = set(range(a.seed, a.seed + a.count))
                common = seeds_a & set(range(b.seed, b.seed + b.count))
                if common:
                    raise InvalidInput(
                        f"validation {name} seeds {sorted(common)} are also training seeds"
                    )
        train = source_pairs(data.phantoms, data.synthetic)
        valid = source_pairs(val.phantoms, val.synthetic)[: val.max_pairs]
    if not train:
        raise InvalidInput("no training pair left after holding out the validation patients")
    return train, valid


def alpha_summary(net: nn.Module) -> dict[str, float]:
    """Mean over channels of each 2x2 cross-stitch entry per unit (``alpha_<unit>_<ij>``).

    Returns an empty dict for networks without cross-stitch units.
    """
    fn = getattr(net, "cross_stitch_alphas", None)
    if fn is None:
        return {}
    out: dict[str, float] = {}
    for unit, alpha in fn().items():
        mean = alpha.float().mean(dim=0)
        for i in range(2):
            for j in range(2):
                out[f"alpha_{unit}_{i}{j}"] = float(mean[i, j])
    return out


def _loss_columns(tasks: Sequence[str], terms: Mapping[str, Sequence[str]]) -> list[str]:
    cols = ["loss_total"]
    for t in tasks:
        cols.append(f"loss_{t}")
        cols += [f"loss_{t}_{lv}" for lv in LEVELS]
        cols += [f"loss_{t}_{term}" for term in terms.get(t, ())]
    return cols


_TERMS = {"reg": ("ncc", "bending", "identity")}


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
    """

    step: int
    last_losses: dict[str, float]
    best_dice: float
    last_checkpoint: Path
    wall_s: float
    steps_per_s: float


class Trainer:
    """Train one network with one loss weighting (METHOD.md, Training).

    Args:
        config: The run configuration.
        train_pairs: Training pairs; loaded from ``config.data`` when ``None``.
        val_pairs: Validation pairs; loaded from ``config.data.validation`` when ``None`` and
            ``train_pairs`` is ``None`` too.
        resume: Continue from ``<output_dir>/checkpoints/last.pt``.
        progress: Show a tqdm progress bar.
    """

    def __init__(
        self,
        config: TrainConfig,
        train_pairs: Sequence[TrainingPair] | None = None,
        val_pairs: Sequence[TrainingPair] | None = None,
        resume: bool = False,
        progress: bool = True,
    ) -> None:
        self.config = config
        self.out = Path(config.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.progress = progress
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.device = resolve_device(config.device)
        self.amp = bool(config.amp and self.device.type == "cuda")
        self.autocast = autocast_dtype(self.device, config.amp, config.precision)
        if train_pairs is None:
            train, valid = load_pairs(config.data, self.out / "cache")
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
        from training.data import PatchSampler

        self.sampler = PatchSampler(
            train,
            patch_size=config.patch_size,
            pairs_per_batch=config.pairs_per_batch,
            patches_per_pair=config.patches_per_pair,
            swap=config.swap,
            seed=config.seed,
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
            "step", "epoch", "wall_s", "data_s", "lr", *_loss_columns(self.tasks, _TERMS)
        ]  # fmt: skip
        self.columns += [f"weight_{t}" for t in self.tasks]
        if isinstance(self.weighting, HomoscedasticWeighting):
            self.columns += [f"log_var_{t}" for t in self.tasks]
        self.columns += list(alpha_summary(self.net))
        # segments of this run's history that ran elsewhere (e.g. on a lent GPU with a data
        # subset, see training.gpu_run); carried from checkpoint to checkpoint, never computed on
        self.provenance: list[dict[str, Any]] = []
        if resume:
            self._load(self.ckpt_dir / "last.pt")
        self._wall0 = time.monotonic()

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
        if self.provenance:
            state["provenance"] = [dict(p) for p in self.provenance]
        return state

    def save(self, path: Path) -> None:
        """Write a checkpoint atomically (temporary file, then rename)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(self.state(), tmp)
        tmp.replace(path)

    def _load(self, path: Path) -> None:
        if not path.is_file():
            raise InvalidInput(f"{path}: no checkpoint to resume from")
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise InvalidInput(f"{path}: not a jrs training checkpoint")
        if ckpt["network"]["name"] != self.config.network.name:
            raise InvalidInput(
                f"{path}: checkpoint of network {ckpt['network']['name']!r}, config asks for "
                f"{self.config.network.name!r}"
            )
        from training.phase import network_overrides

        name = self.config.network.name
        trained = network_overrides(name, ckpt["network"].get("overrides") or {})
        asked = network_overrides(name, self.config.network.overrides)
        if trained != asked:
            diff = {k: [trained.get(k), asked.get(k)] for k in asked if trained.get(k) != asked[k]}
            raise InvalidInput(
                f"{path}: trained with other network settings than the config asks for "
                f"(setting: [checkpoint, config]) {diff}; to change them mid-campaign run "
                "python -m training.phase --config CONFIG, which converts the checkpoint"
            )
        self.net.load_state_dict(ckpt["model"])
        self.weighting.load_state_dict(ckpt["weighting"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if "scheduler" in ckpt:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
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
        for name in ("train_log.csv", "validation.csv"):
            _truncate_csv(self.out / name, self.step)
        log.info("resumed from %s at step %d (epoch %d)", path, self.step, self.epoch)

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
            out = self.net(fixed, moving, moving_labels)
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
        total = self.weighting({t: v.total for t, v in losses.items()})
        if not torch.isfinite(total):
            raise FloatingPointError(f"non-finite total loss at step {self.step + 1}: {total}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        row = self._row(total, losses, weights)
        if self.step % self.config.steps_per_epoch == 0:
            self.weighting.end_epoch()
            self.epoch += 1
        return row

    def _row(
        self, total: torch.Tensor, losses: Mapping[str, TaskLoss], weights: Mapping[str, float]
    ) -> dict[str, float]:
        row: dict[str, float] = {
            "step": self.step,
            "epoch": self.epoch,
            "wall_s": time.monotonic() - self._wall0,
            "data_s": self.data_s,
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "loss_total": float(total.detach()),
        }
        for t, tl in losses.items():
            row[f"loss_{t}"] = float(tl.total.detach())
            for lv, v in tl.per_level.items():
                row[f"loss_{t}_{lv}"] = float(v.detach())
            for term, v in tl.terms.items():
                row[f"loss_{t}_{term}"] = float(v.detach())
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
        from training.evaluate import ORGANS, organ_metrics, postprocess, predict_pair

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
        """Train to ``config.iterations`` steps; checkpoint, log, validate and plot on the way."""
        from training.plots import plot_run

        cfg = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(yaml.safe_dump(cfg.resolved(), sort_keys=False))
        writer = self._tensorboard()
        train_log = _CsvLog(self.out / "train_log.csv", self.columns)
        val_log: _CsvLog | None = None
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
            disable=not self.progress,
        )
        self.net.train()
        self.weighting.train()
        try:
            while self.step < cfg.iterations:
                row = self.train_step()
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.iterations:
                    train_log.write(row)
                    if writer is not None:
                        for k, v in row.items():
                            if k not in ("step", "epoch"):
                                writer.add_scalar(_tb_tag(k), v, self.step)
                    bar.set_postfix(loss=f"{row['loss_total']:.4f}")
                every = cfg.data.validation.every
                if self.val_pairs and every and self.step % every == 0:
                    tv = time.monotonic()
                    vres = self.validate()
                    val_time += time.monotonic() - tv
                    if val_log is None:
                        val_log = _CsvLog(self.out / "validation.csv", ["step", *vres])
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
        finally:
            bar.close()
            train_log.close()
            if val_log is not None:
                val_log.close()
            if writer is not None:
                writer.close()
        if self.step == start_step:
            self.save(self.ckpt_dir / "last.pt")
        plot_run(self.out)
        wall = time.monotonic() - t0
        done = self.step - start_step
        return TrainResult(
            step=self.step,
            last_losses=row,
            best_dice=self.best_dice if self.best_step >= 0 else math.nan,
            last_checkpoint=self.ckpt_dir / "last.pt",
            wall_s=wall,
            steps_per_s=done / max(wall - val_time, 1e-9),
        )

    def _tensorboard(self) -> Any:
        if not self.config.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # pragma: no cover - tensorboard is in the train extra
            log.warning("tensorboard not installed; no TensorBoard logs")
            return None
        return SummaryWriter(str(self.out / "tensorboard"), purge_step=self.step + 1)


def _tb_tag(column: str) -> str:
    for prefix, group in (("loss_", "loss/"), ("weight_", "weight/"), ("log_var_", "log_var/")):
        if column.startswith(prefix):
            return group + column[len(prefix) :]
    if column.startswith("alpha_"):
        return "cross_stitch/" + column[len("alpha_") :]
    return "train/" + column


class _CsvLog:
    """Append rows to a CSV file, writing the header when the file is new or empty."""

    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        self.path = path
        self.columns = list(columns)
        new = not path.is_file() or path.stat().st_size == 0
        self.fh = path.open("a", newline="")
        self.writer = csv.DictWriter(self.fh, fieldnames=self.columns, extrasaction="ignore")
        if new:
            self.writer.writeheader()

    def write(self, row: Mapping[str, Any]) -> None:
        self.writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
        self.fh.flush()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.fh.close()


def _truncate_csv(path: Path, step: int) -> None:
    """Drop rows logged after ``step`` (written after the checkpoint a run resumes from)."""
    if not path.is_file():
        return
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return
    header, body = rows[0], rows[1:]
    kept = [r for r in body if r and int(float(r[0])) <= step]
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(kept)
