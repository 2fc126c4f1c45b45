"""A patient's training pairs: the planning scan cropped to its organs, deformed into fractions."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from jrs.core.errors import InvalidInput
from jrs.core.geometry import Volume
from jrs.core.labels import LABELS, SynonymTable, label_map_from_mapping
from jrs.inference.preprocess import mask_box, prepare_pair
from jrs.io.rtstruct import masks_from_files
from jrs.registration.boxes import crop, organ_box
from jrs.registration.focus import prealign_pair
from jrs.synth.engine import synthesize_fraction
from jrs.training.adapt_options import (
    PLANNING_CROP_MM,
    TRAIN_BOX_MM,
    VALIDATION_BOX_MM,
    AdaptationInterrupted,
    AdaptOptions,
)
from jrs.training.data import TrainingPair

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ planning
@dataclass
class Planning:
    """The planning scan of the patient, cropped around the organs.

    Attributes:
        ct: Planning CT, HU, cropped to the organs + `PLANNING_CROP_MM`.
        labels: Label map 0..4 on the same grid (ROI names mapped as the pipeline maps them).
        known: Organ label ids delineated.
        series_sha256: Hex SHA-256 of the planning SeriesInstanceUID.
    """

    ct: Volume
    labels: Volume
    known: tuple[int, ...]
    series_sha256: str

    @property
    def organs(self) -> list[str]:
        """Organ keys delineated (``prostate``, ``rectum`` ...)."""
        return [LABELS[k] for k in self.known]


def series_sha256(uid: str) -> str:
    """Hex SHA-256 of a UID (what the adaptation records instead of the UID)."""
    return hashlib.sha256(uid.encode()).hexdigest()


def crop_to_organs(
    ct: Volume, labels: Volume, margin_mm: float = PLANNING_CROP_MM
) -> tuple[Volume, Volume]:
    """Both volumes cut to the organs' bounding box grown by ``margin_mm`` (clipped to the scan).

    Args:
        ct: (nz, ny, nx) planning CT.
        labels: (nz, ny, nx) label map on the same grid.
        margin_mm: Margin, mm.

    Returns:
        The cropped CT and labels (same spacing, direction and frame).
    """
    idx = np.argwhere(np.asarray(labels.array) > 0)
    if idx.size == 0:
        raise InvalidInput("the planning label map is empty: no organ to adapt to")
    pad = np.ceil(margin_mm / np.asarray(ct.geometry.spacing, float)[::-1]).astype(int)
    lo = np.maximum(idx.min(axis=0) - pad, 0)
    hi = np.minimum(idx.max(axis=0) + pad + 1, ct.geometry.shape)
    box = (
        slice(int(lo[0]), int(hi[0])),
        slice(int(lo[1]), int(hi[1])),
        slice(int(lo[2]), int(hi[2])),
    )
    return contiguous(crop(ct, box)), contiguous(crop(labels, box))


def read_planning(
    ct_dir: Path | str, rtstruct: Path | str, synonyms: SynonymTable | None = None
) -> Planning:
    """Read a planning CT + RTSTRUCT into a cropped planning scan with its label map.

    Args:
        ct_dir: Planning CT series folder.
        rtstruct: Its RTSTRUCT.
        synonyms: ROI-name synonym table (default: the built-in one).

    Returns:
        The planning scan.

    Raises:
        InvalidInput: Unreadable files, or no ROI mapping to an organ.
        GeometryMismatch: The RTSTRUCT does not belong to the CT.
    """
    _, series, masks = masks_from_files(ct_dir, rtstruct)
    mapping = (synonyms or SynonymTable()).resolve(masks)
    arrays = {k: v.array for k, v in masks.items()}
    label_array, used = label_map_from_mapping(arrays, mapping)
    del arrays, masks
    key = series.series_instance_uid or series.frame_of_reference_uid or series.sop_instance_uids[0]
    ct, labels = crop_to_organs(series.volume, series.volume.with_array(label_array))
    known = tuple(int(k) for k in sorted(used) if np.any(labels.array == k))
    log.info(
        "planning scan: organs %s, cropped to %s voxels",
        [LABELS[k] for k in known],
        ct.geometry.shape,
    )
    return Planning(ct, labels, known, series_sha256(key))


# ------------------------------------------------------------------------------ pairs
def half_precision(a: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Round to float16 and back: the cached arrays, so fresh and resumed runs see the same."""
    return a.astype(np.float16).astype(np.float32)


def make_pair(
    planning: Planning, k: int, seed: int, held_back: bool, strength: float = 1.0
) -> TrainingPair:
    """Synthetic fraction ``k`` of the planning scan as a pair on the 1 mm network grid.

    Args:
        planning: The (cropped) planning scan.
        k: Fraction number (training fractions 1..F, held-back ones 1001..1000+V).
        seed: Seed of the adaptation.
        held_back: Held-back pair: box = pre-aligned planning organs + `VALIDATION_BOX_MM` (as
            the pipeline's network box); else daily organs + `TRAIN_BOX_MM`.
        strength: Amplitude factor of the deformation engine.

    Returns:
        The pair: fixed = synthetic daily CT, moving = pre-aligned planning CT, fixed labels = the
        planning labels warped by the known field.
    """
    rng = np.random.default_rng([int(seed), int(k), 0x5EED])
    frac = synthesize_fraction(planning.ct, planning.labels, {}, rng, strength=strength)
    if held_back:
        reg, _ = prealign_pair(frac.ct, planning.ct, planning.labels)  # as the pipeline
        box = organ_box(planning.labels, reg.transform, frac.ct.geometry, VALIDATION_BOX_MM)
        prepared = prepare_pair(
            frac.ct, planning.ct, planning.labels, daily_labels=frac.labels, box=box, prealign=reg
        )
    else:
        box = mask_box(np.asarray(frac.labels.array) > 0, frac.labels.geometry, TRAIN_BOX_MM)
        prepared = prepare_pair(
            frac.ct, planning.ct, planning.labels, daily_labels=frac.labels, box=box
        )
    pair = TrainingPair.from_prepared(f"{'val' if held_back else 'train'}_{k}", prepared)
    pair.fixed, pair.moving = half_precision(pair.fixed), half_precision(pair.moving)
    pair.known = planning.known
    pair.group = "patient"
    return pair


def make_pairs(
    planning: Planning,
    options: AdaptOptions,
    cache: Path | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[list[TrainingPair], list[TrainingPair]]:
    """The training and held-back pairs of an adaptation (cached in ``cache`` when given).

    Args:
        planning: The planning scan.
        options: Fraction counts, seed and strength.
        cache: Folder of ``<key>.npz`` files (made pairs are read back from it).
        should_stop: Checked after each pair; True raises `AdaptationInterrupted`.

    Returns:
        ``(training pairs, held-back pairs)``.
    """
    jobs = [(k, False) for k in range(1, options.fractions + 1)]
    jobs += [(1000 + k, True) for k in range(1, options.val_fractions + 1)]
    train: list[TrainingPair] = []
    val: list[TrainingPair] = []
    for k, held in jobs:
        key = f"{'val' if held else 'train'}_{k}"
        path = cache / f"{key}.npz" if cache is not None else None
        pair: TrainingPair | None = None
        if path is not None and path.is_file():
            try:
                pair = TrainingPair.load(key, path)
                pair.known, pair.group = planning.known, "patient"
            except (OSError, ValueError, KeyError, InvalidInput) as exc:
                log.warning("cached pair %s unreadable (%s); making it again", key, exc)
        if pair is None:
            t0 = time.perf_counter()
            pair = make_pair(planning, k, options.seed, held, options.strength)
            if path is not None:
                pair.save(path)
            log.info(
                "synthetic fraction %s: %s voxels in %.1f s",
                key,
                pair.fixed.shape,
                time.perf_counter() - t0,
            )
        (val if held else train).append(pair)
        if should_stop is not None and should_stop():
            raise AdaptationInterrupted("stop requested while making the synthetic fractions")
    return train, val


def contiguous(volume: Volume) -> Volume:
    """A copy of a (cropped) volume with its own contiguous array (the crop is a view)."""
    return Volume(np.ascontiguousarray(volume.array), volume.geometry)
