"""Figures of an earlier evaluation, read back so that networks scored apart are compared paired.

``jrs evaluate`` scores every network on the same held-out pairs and tests the differences per
pair (Wilcoxon). When the networks of one comparison are trained in different working periods
(the paper's Table 3 on a 2-core CPU), the earlier ones may no longer be on disk by the time the
last is trained. Their ``metrics.csv`` (and ``jacobian.csv``) are small; this module reads them
back (``jrs evaluate --with-metrics FILE``), checks that they score exactly the pairs of the new
evaluation, and hands their rows to :func:`jrs.training.evaluate.evaluate`, which reports them
beside
the new ones.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jrs.core.errors import InvalidInput

#: Columns of ``metrics.csv`` (:func:`jrs.training.evaluate.evaluate`) this reader needs.
METRIC_COLUMNS: tuple[str, ...] = ("model", "path", "pair", "organ", "dsc", "msd", "hd95")
#: Name of the Jacobian table beside ``metrics.csv``.
JACOBIAN_FILE = "jacobian.csv"

__all__ = ["JACOBIAN_FILE", "METRIC_COLUMNS", "EarlierEvaluation", "read_evaluation"]


@dataclass
class EarlierEvaluation:
    """The rows of one earlier ``jrs evaluate`` run.

    Attributes:
        source: The ``metrics.csv`` they come from (named in every error).
        rows: One dict per (model, path, pair, organ): ``organ`` an int label, ``dsc`` / ``msd``
            (mm) / ``hd95`` (mm) floats (NaN where undefined), as `evaluate` makes them.
        jacobian: One dict per (model, pair) from ``jacobian.csv`` beside it (empty without).
    """

    source: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    jacobian: list[dict[str, Any]] = field(default_factory=list)

    @property
    def models(self) -> set[str]:
        """The model names of the rows."""
        return {str(r["model"]) for r in self.rows}

    @property
    def pairs(self) -> set[str]:
        """The pair keys of the rows."""
        return {str(r["pair"]) for r in self.rows}

    def check_pairs(self, pairs: Iterable[str]) -> None:
        """Raise `InvalidInput` unless these rows score exactly ``pairs``.

        Args:
            pairs: The pair keys of the new evaluation.
        """
        want = set(pairs)
        if self.pairs != want:
            missing, extra = sorted(want - self.pairs), sorted(self.pairs - want)
            raise InvalidInput(
                f"{self.source}: scores other pairs than this evaluation (missing "
                f"{missing[:5]}, not in this evaluation {extra[:5]}); a paired comparison needs "
                "the same held-out pairs: use the same --phantoms/--seed/--fractions, --store "
                "and --source, or --data as the run that wrote it"
            )


def _float(value: str) -> float:
    return math.nan if value.strip() in ("", "nan", "NaN") else float(value)


def _read_csv(path: Path, needed: Sequence[str]) -> list[dict[str, str]]:
    try:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in needed if c not in (reader.fieldnames or [])]
            if missing:
                raise InvalidInput(
                    f"{path}: not a jrs evaluate table (columns {missing} missing; expected "
                    f"{list(needed)})"
                )
            return list(reader)
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read it ({exc.strerror})") from exc


def read_evaluation(path: Path | str) -> EarlierEvaluation:
    """Read an earlier evaluation's ``metrics.csv`` and, when present, its ``jacobian.csv``.

    Args:
        path: A ``metrics.csv`` written by ``jrs evaluate`` (or its folder).

    Returns:
        The :class:`EarlierEvaluation`.

    Raises:
        InvalidInput: When the file is missing, unreadable, empty or not an evaluation table.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.csv"
    if not p.is_file():
        raise InvalidInput(f"{p}: no such metrics.csv (the table jrs evaluate --out writes)")
    rows: list[dict[str, Any]] = []
    for i, raw in enumerate(_read_csv(p, METRIC_COLUMNS), start=2):
        try:
            rows.append(
                {
                    "model": raw["model"],
                    "path": raw["path"],
                    "pair": raw["pair"],
                    "organ": int(raw["organ"]),
                    **{k: _float(raw[k]) for k in ("dsc", "msd", "hd95")},
                }
            )
        except ValueError as exc:
            raise InvalidInput(f"{p}, line {i}: not a number ({exc})") from exc
    if not rows:
        raise InvalidInput(f"{p}: no rows")
    jacobian: list[dict[str, Any]] = []
    jac_path = p.parent / JACOBIAN_FILE
    if jac_path.is_file():
        for i, raw in enumerate(_read_csv(jac_path, ("model", "pair")), start=2):
            try:
                jacobian.append(
                    {
                        "model": raw["model"],
                        "pair": raw["pair"],
                        **{
                            k: _float(v)
                            for k, v in raw.items()
                            if k not in ("model", "pair") and v is not None
                        },
                    }
                )
            except ValueError as exc:
                raise InvalidInput(f"{jac_path}, line {i}: not a number ({exc})") from exc
    return EarlierEvaluation(p, rows, jacobian)
