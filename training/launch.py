"""Start or continue a training run: the one path of ``jrs train`` and ``python -m jrs.training``.

``python -m jrs.training --config FILE [...]`` takes the options of ``jrs train`` and needs only
the training unit (no command line package), so that a cluster launcher runs it directly, e.g.
``torchrun --nproc_per_node 4 -m jrs.training --config FILE --device cuda --workers 8``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from jrs.core.errors import InvalidInput, JrsError
from jrs.training.config import load_config
from jrs.training.trainer import Trainer, TrainResult

log = logging.getLogger(__name__)


def train_run(
    config: Path,
    *,
    resume: bool = False,
    resume_from: Path | None = None,
    init_from: Path | None = None,
    iterations: int | None = None,
    out: Path | None = None,
    device: str | None = None,
    workers: int | None = None,
    amp: bool | None = None,
    precision: str | None = None,
    time_budget_minutes: float | None = None,
) -> TrainResult:
    """Train from a YAML config with command-line overrides (None: the config's value).

    Args:
        config: the YAML training config.
        resume: continue bit for bit from ``<output_dir>/checkpoints/last.pt``.
        resume_from: continue from this checkpoint instead (implies ``resume``).
        init_from: start a NEW run with this checkpoint's network weights.
        iterations: total optimiser steps.
        out: the run folder.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        workers: loader processes.
        amp: CUDA mixed precision.
        precision: CPU precision (``auto``, ``fp32``, ``bf16``).
        time_budget_minutes: stop after this much wall time, with ``last.pt`` saved.

    Returns:
        The run's result (step, losses, best validation Dice, checkpoint, speed, rank).

    Raises:
        InvalidInput: ``init_from`` together with a resume, or an invalid config.
    """
    if init_from is not None and (resume or resume_from is not None):
        raise InvalidInput(
            f"--init-from {init_from} starts a new run; --resume / --resume-from continue one: "
            "give one of them"
        )
    cfg = load_config(
        config,
        iterations=iterations,
        output_dir=out,
        device=device,
        workers=workers,
        amp=amp,
        precision=precision,
        time_budget_minutes=time_budget_minutes,
    )
    start: bool | Path = resume_from if resume_from is not None else resume
    return Trainer(cfg, resume=start, init_from=init_from).run()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m jrs.training``: the options of ``jrs train``; exit 2 on bad input."""
    ap = argparse.ArgumentParser(prog="python -m jrs.training", description=__doc__)
    ap.add_argument("--config", type=Path, required=True, help="YAML training config")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
    ap.add_argument("--resume-from", type=Path, help="continue from this checkpoint file")
    ap.add_argument("--init-from", type=Path, help="new run with this checkpoint's weights")
    ap.add_argument("--iterations", type=int, help="total optimiser steps")
    ap.add_argument("--out", type=Path, help="run folder")
    ap.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--workers", type=int, help="loader processes")
    ap.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"))
    ap.add_argument("--time-budget", type=float, dest="time_budget", help="minutes of wall time")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = train_run(
            args.config,
            resume=args.resume,
            resume_from=args.resume_from,
            init_from=args.init_from,
            iterations=args.iterations,
            out=args.out,
            device=args.device,
            workers=args.workers,
            amp=args.amp,
            precision=args.precision,
            time_budget_minutes=args.time_budget,
        )
    except JrsError as exc:
        log.error("error (%s): %s", exc.code, exc.message)
        return 2 if isinstance(exc, InvalidInput) else 1
    if result.rank == 0:
        log.info(
            "step %d: %.3f steps/s, best validation Dice %.4f, checkpoint %s",
            result.step,
            result.steps_per_s,
            result.best_dice,
            result.last_checkpoint,
        )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
