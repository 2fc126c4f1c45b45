"""PNG plots of a training run (matplotlib, Agg): losses, loss weights, cross-stitch alphas.

Reads ``train_log.csv`` / ``validation.csv`` of a run folder and writes ``plots/``:

* ``losses.png``: each task loss (deep-supervised) and the total, plus per-level curves;
* ``loss_weights.png``: the loss weights per task (the paper's Figure 4; homoscedastic
  ``exp(-s_i)``, DWA ``w_k``, equal 1);
* ``cross_stitch_alphas.png``: per cross-stitch unit the channel mean of each 2x2 entry
  (the paper's Figure 3), only for the cross-stitch network;
* ``validation_dice.png``: validation Dice per organ and path, when validated.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["plot_run", "read_log"]


def read_log(path: Path) -> dict[str, np.ndarray]:
    """Read a CSV log into column name -> float array (empty dict when absent or empty)."""
    if not path.is_file():
        return {}
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return {}
    cols: dict[str, np.ndarray] = {}
    for name in rows[0]:
        vals = []
        for r in rows:
            try:
                vals.append(float(r[name]))
            except (TypeError, ValueError):
                vals.append(math.nan)
        cols[name] = np.asarray(vals, dtype=np.float64)
    return cols


def _smooth(y: np.ndarray, width: int) -> np.ndarray:
    if width <= 1 or y.size < width:
        return y
    kernel = np.ones(width) / width
    pad = np.concatenate([np.full(width - 1, y[0]), y])
    return np.convolve(pad, kernel, mode="valid")


def _lineplot(
    path: Path,
    x: np.ndarray,
    series: Sequence[tuple[str, np.ndarray]],
    title: str,
    ylabel: str,
    log_y: bool = False,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    width = max(1, x.size // 100)
    for label, y in series:
        ax.plot(x, _smooth(y, width), label=label, linewidth=1.2)
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_run(run_dir: Path | str) -> list[Path]:
    """Draw the plots of a run folder.

    Args:
        run_dir: The run's ``output_dir``.

    Returns:
        The PNG files written.
    """
    run = Path(run_dir)
    out = run / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    train = read_log(run / "train_log.csv")
    if train and train["step"].size:
        x = train["step"]
        tasks = [c[len("weight_") :] for c in train if c.startswith("weight_")]
        series = [("total", train["loss_total"])] + [(t, train[f"loss_{t}"]) for t in tasks]
        series += [
            (c[len("loss_") :], train[c])
            for c in train
            if c.startswith("loss_")
            and c.count("_") >= 2
            and c != "loss_total"
            and c[len("loss_") :] not in tasks
        ]
        p = out / "losses.png"
        _lineplot(p, x, series, "Training losses (deep-supervised; per level and term)", "loss")
        written.append(p)
        p = out / "loss_weights.png"
        _lineplot(
            p, x, [(t, train[f"weight_{t}"]) for t in tasks], "Loss weights (Figure 4)", "weight"
        )
        written.append(p)
        alphas = [c for c in train if c.startswith("alpha_")]
        if alphas:
            written.append(_plot_alphas(out / "cross_stitch_alphas.png", x, train, alphas))
    val = read_log(run / "validation.csv")
    if val and val["step"].size:
        p = out / "validation_dice.png"
        cols = [c for c in val if c.startswith("dice_")]
        _lineplot(p, val["step"], [(c[5:], val[c]) for c in cols], "Validation Dice", "Dice")
        written.append(p)
    return written


def _plot_alphas(
    path: Path, x: np.ndarray, train: dict[str, np.ndarray], columns: Sequence[str]
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    units = sorted({c.split("_")[1] for c in columns}, key=["d0", "d1", "u1", "u0"].index)
    fig, axes = plt.subplots(1, len(units), figsize=(3.2 * len(units), 3.4), dpi=100, sharey=True)
    axes = np.atleast_1d(axes)
    names = {"00": "seg<-seg", "01": "seg<-reg", "10": "reg<-seg", "11": "reg<-reg"}
    for ax, unit in zip(axes, units, strict=True):
        for ij, label in names.items():
            col = f"alpha_{unit}_{ij}"
            if col in train:
                ax.plot(x, train[col], label=label, linewidth=1.2)
        ax.set_title(f"unit {unit}")
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("channel-mean alpha")
    axes[-1].legend(fontsize=7)
    fig.suptitle("Cross-stitch units (Figure 3)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
