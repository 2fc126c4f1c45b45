"""A training set prepared once and memory-mapped: one folder of ``.npy`` arrays per pair.

Layout of a store (``jrs``'s own, built by :mod:`jrs.training.build_data`)::

    STORE/index.json                 {"version", "pairs": [{"key", "group", "source", ...}]}
    STORE/<key>/fixed.npy            (nz, ny, nx) float16 normalised daily CT (HU / 1000)
    STORE/<key>/moving.npy           (nz, ny, nx) float16 pre-aligned planning CT
    STORE/<key>/fixed_labels.npy     (nz, ny, nx) uint8 daily labels 0..4
    STORE/<key>/moving_labels.npy    (nz, ny, nx) uint8 pre-aligned planning labels 0..4
    STORE/<key>/body.npy             (nz, ny, nx) uint8 daily body mask
    STORE/<key>/regions.npz          sampling regions: sub-sampled voxel lists + their stride
    STORE/<key>/meta.json            known classes, source, patient group, crop box, timings

Arrays are opened with ``numpy.load(mmap_mode="r")``: a step reads only the voxels of its patches
(from the page cache after the first epoch), so the data stay off the training step's clock and
the resident memory does not grow with the size of the set. Images are float16 (0.5 HU steps at
the scale of the network's intensities, well below CT noise).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from jrs.core.errors import InvalidInput
from jrs.training.data import REGION_STRIDE, REGIONS, TrainingPair

log = logging.getLogger(__name__)

STORE_VERSION = 1

_ARRAYS = ("fixed", "moving", "fixed_labels", "moving_labels", "body")

__all__ = [
    "STORE_VERSION",
    "compute_regions",
    "list_store",
    "load_store",
    "load_stored_pair",
    "save_pair",
    "write_index",
]


def compute_regions(
    fixed_labels: npt.NDArray[np.uint8], body: npt.NDArray[np.uint8]
) -> dict[str, npt.NDArray[np.int32]]:
    """Sub-sampled voxel lists of the sampling regions (targets, organs at risk, torso).

    Args:
        fixed_labels: ``(nz, ny, nx)`` daily labels.
        body: ``(nz, ny, nx)`` daily body mask.

    Returns:
        Region name -> ``(N, 3)`` int32 (z, y, x) voxels on a lattice of stride
        :data:`REGION_STRIDE`; a sampler adds a uniform jitter of up to one stride. Empty regions
        are left out; the torso falls back to the whole volume when the body mask is empty.
    """
    out: dict[str, npt.NDArray[np.int32]] = {}
    for name, labs in REGIONS.items():
        s = REGION_STRIDE[name]
        sub = np.isin(fixed_labels[::s, ::s, ::s], labs)
        idx = np.argwhere(sub).astype(np.int32) * s
        if idx.size:
            out[name] = idx
    s = REGION_STRIDE["torso"]
    sub_body = body[::s, ::s, ::s] > 0
    if not sub_body.any():
        sub_body = np.ones_like(sub_body)
    out["torso"] = np.argwhere(sub_body).astype(np.int32) * s
    return out


def save_pair(
    pair: TrainingPair, store: Path, meta: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write one pair into ``store/<pair.key>/`` (arrays, regions, meta).

    The folder is written under a temporary name and renamed at the end, so a build killed in
    the middle never leaves a half-written pair behind.

    Args:
        pair: The prepared pair.
        store: The store folder.
        meta: Extra JSON-friendly facts (source, group, parameters).

    Returns:
        The meta record written (also what :func:`write_index` lists).
    """
    final = Path(store) / pair.key
    tmp = Path(store) / f".{pair.key}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    np.save(tmp / "fixed.npy", pair.fixed.astype(np.float16))
    np.save(tmp / "moving.npy", pair.moving.astype(np.float16))
    np.save(tmp / "fixed_labels.npy", np.asarray(pair.fixed_labels, np.uint8))
    np.save(tmp / "moving_labels.npy", np.asarray(pair.moving_labels, np.uint8))
    np.save(tmp / "body.npy", np.asarray(pair.body, np.uint8))
    regions = compute_regions(pair.fixed_labels, pair.body)
    np.savez(tmp / "regions.npz", allow_pickle=False, **regions)
    record: dict[str, Any] = {
        "key": pair.key,
        "shape": list(pair.fixed.shape),
        "known": list(pair.known),
        **(meta or {}),
    }
    (tmp / "meta.json").write_text(json.dumps(record, indent=1))
    if final.exists():
        import shutil

        shutil.rmtree(final)
    tmp.rename(final)
    return record


def load_stored_pair(folder: Path) -> TrainingPair:
    """Open one stored pair memory-mapped.

    Raises:
        InvalidInput: When an array or the meta file is missing (names the file).
    """
    folder = Path(folder)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise InvalidInput(f"{meta_path}: missing; not a training-store pair folder")
    meta = json.loads(meta_path.read_text())
    arrays: dict[str, Any] = {}
    for name in _ARRAYS:
        path = folder / f"{name}.npy"
        if not path.is_file():
            raise InvalidInput(f"{path}: missing array of a stored training pair")
        arrays[name] = np.load(path, mmap_mode="r")
    with np.load(folder / "regions.npz") as z:
        regions = {k: z[k] for k in z.files}
    return TrainingPair(
        key=str(meta["key"]),
        fixed=arrays["fixed"],
        moving=arrays["moving"],
        fixed_labels=arrays["fixed_labels"],
        moving_labels=arrays["moving_labels"],
        body=arrays["body"],
        known=tuple(int(k) for k in meta.get("known", (1, 2, 3, 4))),
        regions=regions,
        group=str(meta.get("group", meta["key"])),
    )


def write_index(store: Path, records: Iterable[dict[str, Any]]) -> Path:
    """Write ``store/index.json`` listing the pairs (sorted by key)."""
    path = Path(store) / "index.json"
    pairs = sorted(records, key=lambda r: str(r["key"]))
    path.write_text(json.dumps({"version": STORE_VERSION, "pairs": pairs}, indent=1))
    return path


def list_store(store: Path) -> list[dict[str, Any]]:
    """The pair records of a store's index.

    Raises:
        InvalidInput: For a missing or foreign index.
    """
    path = Path(store) / "index.json"
    if not path.is_file():
        raise InvalidInput(
            f"{path}: no training-store index; build one with `python -m jrs.training.build_data`"
        )
    data = json.loads(path.read_text())
    if int(data.get("version", -1)) != STORE_VERSION:
        raise InvalidInput(f"{path}: store version {data.get('version')} != {STORE_VERSION}")
    return list(data["pairs"])


def load_store(
    store: Path,
    *,
    sources: Sequence[str] | None = None,
    groups: Sequence[str] | None = None,
    exclude_groups: Sequence[str] = (),
) -> list[TrainingPair]:
    """Open the pairs of a store, filtered by source and patient group.

    Args:
        store: The store folder.
        sources: Keep only these sources (e.g. ``["phantom", "real"]``); ``None``: all.
        groups: Keep only these patient groups; ``None``: all.
        exclude_groups: Drop these groups (held-out patients).

    Returns:
        Memory-mapped pairs, in index order.
    """
    out = []
    for rec in list_store(store):
        if sources is not None and rec.get("source") not in sources:
            continue
        group = str(rec.get("group", rec["key"]))
        if groups is not None and group not in groups:
            continue
        if group in exclude_groups:
            continue
        out.append(load_stored_pair(Path(store) / str(rec["key"])))
    return out
