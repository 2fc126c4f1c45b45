"""The training and validation pairs of a config: synthetic pairs, phantom pairs, a built store."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from jrs.core.errors import InvalidInput
from jrs.training.data import (
    TrainingPair,
    discover_pairs,
    load_pair,
    phantom_pair,
)
from jrs.training.store import load_store

if TYPE_CHECKING:  # annotations only: the trainer runs without pydantic (e.g. on a lent GPU)
    from jrs.training.config import DataConfig, PhantomSource, SyntheticSource

log = logging.getLogger(__name__)


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
        from jrs.training.synthetic import synthetic_pair

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
