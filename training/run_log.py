"""A run's logs: CSV rows per step (resumable), TensorBoard tags, loss and cross-stitch columns."""

from __future__ import annotations

import contextlib
import csv
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from jrs.training.networks import LEVELS

log = logging.getLogger(__name__)


def loss_columns(tasks: Sequence[str], terms: Mapping[str, Sequence[str]]) -> list[str]:
    """The loss columns of the training log: the total, per task, per level and per term."""
    cols = ["loss_total"]
    for t in tasks:
        cols.append(f"loss_{t}")
        cols += [f"loss_{t}_{lv}" for lv in LEVELS]
        cols += [f"loss_{t}_{term}" for term in terms.get(t, ())]
    return cols


LOSS_TERMS = {"reg": ("ncc", "bending", "identity")}


def tensorboard_tag(column: str) -> str:
    """The TensorBoard tag of a log column (grouped: loss/, weight/, log_var/, cross_stitch/)."""
    for prefix, group in (("loss_", "loss/"), ("weight_", "weight/"), ("log_var_", "log_var/")):
        if column.startswith(prefix):
            return group + column[len(prefix) :]
    if column.startswith("alpha_"):
        return "cross_stitch/" + column[len("alpha_") :]
    return "train/" + column


class CsvLog:
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
        """Append one row (floats exactly, as their repr) and flush."""
        self.writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
        self.fh.flush()

    def close(self) -> None:
        """Close the file (errors ignored)."""
        with contextlib.suppress(OSError):
            self.fh.close()


def truncate_csv(path: Path, step: int) -> None:
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
