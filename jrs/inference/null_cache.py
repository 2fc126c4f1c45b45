"""The network's null field, computed once per planning scan and carried to each daily pair.

The null-field correction (`jrs.inference.null_correction`) subtracts what the network predicts for
the planning scan paired with itself. Run per pair it costs one more network pass for the first pass
and one for every cascaded pass (`jrs.inference.cascade`): four passes where two register anything.
Yet
the null field is a property of the planning scan and the model, not of the daily scan: the
pair sees the planning scan only through the pre-alignment ``A`` (daily point -> planning
point).

So the null pass runs once per planning scan, on the planning box in the planning frame (the
grid the pair would have if the daily scan were the planning scan), and is kept on disk. For a
pair its field is carried onto the pair's grid: ``u0(x) = L^-1 N(A(x))``, with ``N`` the planning
null field and ``L`` the linear part of ``A`` (a displacement in the planning frame expressed
in the daily frame). A cascaded pass sees the planning scan warped by the field so far ``T``;
its null field is taken as ``u0(T(x))``, the null field of the content that now sits at ``x``.
For the same scan twice ``A`` is the identity, the grids coincide and ``u0`` is the null field
itself: the invariant holds as before. Elsewhere the network is not exactly equivariant to the
small rotations and sub-voxel shifts of a set-up: docs/benchmarks.md measures the difference
against the per-pair null pass (``RecontourOptions.null_pass = "pair"``).

The cache key is a digest of everything the null pass reads: the network's input arrays and
grid, the model file's digest, the engine and its precision. A backend without a model digest
(a test double) is never cached on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from jrs.core.errors import InvalidInput
from jrs.core.geometry import Geometry, Volume
from jrs.inference.null_correction import planning_segmentation_dice
from jrs.inference.preprocess import HU_MIN, canonical_grid, normalise_hu

log = logging.getLogger(__name__)

__all__ = [
    "CACHE_FORMAT",
    "NULL_PASS_MODES",
    "NullFieldCache",
    "NullPassMode",
    "PlanningNull",
    "cache_for",
    "check_null_pass",
    "default_cache_root",
    "model_tag",
    "null_key",
    "planning_null",
    "transport",
    "warp_null",
]

#: ``planning``: the null pass once per planning scan, carried to each pair (default);
#: ``pair``: the null pass on every pair and every cascaded pass (exact, twice the passes).
NullPassMode = Literal["planning", "pair"]
NULL_PASS_MODES: tuple[str, ...] = ("planning", "pair")
#: Bumped when the stored layout or the way the null field is computed changes.
CACHE_FORMAT = 1
#: Entries kept on disk (least recently used dropped beyond): about 90 MB each for a pelvic box.
MAX_ENTRIES = 16


def check_null_pass(mode: str) -> NullPassMode:
    """The null-pass mode, checked.

    Raises:
        InvalidInput: For anything but ``planning`` or ``pair``.
    """
    if mode not in NULL_PASS_MODES:
        raise InvalidInput(
            f"null pass {mode!r} unknown; use 'planning' (once per planning scan, cached) or "
            "'pair' (on every pair)"
        )
    return mode  # type: ignore[return-value]


def default_cache_root() -> Path | None:
    """The product's cache folder: ``$JRS_CACHE_DIR``, else ``~/.cache/jrs``.

    ``JRS_CACHE_DIR`` set to ``off`` (or empty) disables the on-disk caches.
    """
    value = os.environ.get("JRS_CACHE_DIR")
    if value is None:
        return Path.home() / ".cache" / "jrs"
    if value.strip().lower() in ("", "off", "none", "0"):
        return None
    return Path(value)


def model_tag(backend: Any) -> str | None:
    """What identifies a loaded network's arithmetic: model digest, engine, precision.

    Args:
        backend: a loaded network (`jrs.inference.Model`), or a test double.

    Returns:
        ``sha256/engine/precision``, or None when the backend has no model digest.
    """
    metadata = getattr(backend, "metadata", None) or {}
    digest = metadata.get("sha256") if isinstance(metadata, dict) else None
    if not digest:
        return None
    engine = getattr(backend, "engine", None)
    name = getattr(engine, "name", "unknown")
    precision = getattr(engine, "precision", "unknown")
    return f"{digest}/{name}/{precision}"


def null_key(
    tag: str,
    grid: Geometry,
    moving: npt.NDArray[np.float32],
    moving_labels: npt.NDArray[Any],
) -> str:
    """Digest of the null pass's inputs.

    Args:
        tag: `model_tag` of the network.
        grid: the planning box's 1 mm grid.
        moving: (nz, ny, nx) planning CT on it, network intensities.
        moving_labels: (nz, ny, nx) planning label map on it.

    Returns:
        A hex digest (64 characters).
    """
    h = hashlib.sha256()
    h.update(f"jrs-null/{CACHE_FORMAT}/{tag}/".encode())
    h.update(json.dumps([list(grid.shape), grid.origin.tolist(), grid.spacing.tolist()]).encode())
    h.update(np.ascontiguousarray(moving, np.float32).tobytes())
    h.update(np.ascontiguousarray(moving_labels, np.uint8).tobytes())
    return h.hexdigest()


@dataclass
class PlanningNull:
    """The network's null field of one planning scan.

    Attributes:
        u0: (3, nz, ny, nx) float32 pull field (mm, channels x, y, z) on ``grid``.
        grid: the planning box's 1 mm grid (planning frame, identity direction).
        planning_dice: per organ key, Dice of the network's segmentation of the planning scan
            against its own labels (the segmentation path's self-check).
        seconds: wall time of the null pass when it ran (s).
        key: `null_key` of its inputs ("" when not cacheable).
        from_cache: read from the on-disk cache rather than computed in this run.
    """

    u0: npt.NDArray[np.float32]
    grid: Geometry
    planning_dice: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    key: str = ""
    from_cache: bool = False


class NullFieldCache:
    """Planning null fields on disk (``<root>/<key>.npy`` + ``.json``), least recently used out.

    Writes go to a temporary name and are renamed into place, so concurrent processes (batch
    workers, service replicas) never read a half-written entry. The last entry is also kept in
    memory: a batch of fractions of one planning scan reads it once.

    Args:
        root: the cache folder (created on first write).
        max_entries: entries kept on disk.
    """

    def __init__(self, root: Path, max_entries: int = MAX_ENTRIES) -> None:
        self.root = Path(root)
        self.max_entries = int(max_entries)
        self._last: PlanningNull | None = None
        self._lock = threading.Lock()

    def get(self, key: str) -> PlanningNull | None:
        """The entry of a key, or None (a missing or unreadable entry is a miss)."""
        with self._lock:
            if self._last is not None and self._last.key == key:
                return replace(self._last, from_cache=True)
        meta_path = self.root / f"{key}.json"
        data_path = self.root / f"{key}.npy"
        try:
            meta = json.loads(meta_path.read_text())
            data = np.load(data_path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            if meta_path.exists() or data_path.exists():
                log.warning("null-field cache entry %s unreadable (%s): recomputed", key[:12], exc)
            return None
        grid = Geometry(
            shape=tuple(meta["shape"]),
            origin=np.asarray(meta["origin"], float),
            spacing=np.asarray(meta["spacing"], float),
            frame_of_reference_uid=meta.get("frame_of_reference_uid"),
        )
        if data.shape != (3, *grid.shape) or meta.get("format") != CACHE_FORMAT:
            log.warning("null-field cache entry %s inconsistent: recomputed", key[:12])
            return None
        now = time.time()
        os.utime(data_path, (now, now))
        entry = PlanningNull(
            np.asarray(data, np.float32),
            grid,
            {str(k): float(v) for k, v in meta.get("planning_dice", {}).items()},
            float(meta.get("seconds", 0.0)),
            key,
            True,
        )
        with self._lock:
            self._last = entry
        return entry

    def put(self, entry: PlanningNull) -> None:
        """Store an entry (best effort: a full or read-only disk only logs a warning)."""
        if not entry.key:
            return
        with self._lock:
            self._last = entry
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self.root / f".{entry.key}.{os.getpid()}.{threading.get_ident()}"
            with open(f"{tmp}.npy", "wb") as fh:
                np.save(fh, np.ascontiguousarray(entry.u0, np.float32))
            meta = {
                "format": CACHE_FORMAT,
                "shape": list(entry.grid.shape),
                "origin": entry.grid.origin.tolist(),
                "spacing": entry.grid.spacing.tolist(),
                "frame_of_reference_uid": entry.grid.frame_of_reference_uid,
                "planning_dice": entry.planning_dice,
                "seconds": entry.seconds,
            }
            Path(f"{tmp}.json").write_text(json.dumps(meta))
            os.replace(f"{tmp}.npy", self.root / f"{entry.key}.npy")
            os.replace(f"{tmp}.json", self.root / f"{entry.key}.json")
            self._prune()
        except OSError as exc:
            log.warning("null-field cache %s not written (%s)", self.root, exc)

    def _prune(self) -> None:
        entries = sorted(self.root.glob("*.npy"), key=lambda p: p.stat().st_mtime)
        for old in entries[: max(len(entries) - self.max_entries, 0)]:
            old.unlink(missing_ok=True)
            old.with_suffix(".json").unlink(missing_ok=True)


def _vector_image(field_: npt.NDArray[np.float32], grid: Geometry) -> sitk.Image:
    image = sitk.GetImageFromArray(
        np.ascontiguousarray(np.moveaxis(field_, 0, -1), np.float32), isVector=True
    )
    image.SetOrigin(tuple(map(float, grid.origin)))
    image.SetSpacing(tuple(map(float, grid.spacing)))
    image.SetDirection(tuple(map(float, np.asarray(grid.direction).ravel())))
    return image


def _resampled(image: sitk.Image, grid: Geometry, transform: sitk.Transform) -> npt.NDArray[Any]:
    f = sitk.ResampleImageFilter()
    f.SetReferenceImage(grid.reference_image())
    f.SetInterpolator(sitk.sitkLinear)
    f.SetTransform(transform)
    f.SetOutputPixelType(sitk.sitkVectorFloat32)
    f.UseNearestNeighborExtrapolatorOn()
    f.SetNumberOfThreads(1)
    return np.moveaxis(sitk.GetArrayFromImage(f.Execute(image)), -1, 0)


def transport(null: PlanningNull, grid: Geometry, transform: sitk.Transform) -> npt.NDArray[Any]:
    """The planning null field carried onto a pair's grid: ``u0(x) = L^-1 N(A(x))``.

    Args:
        null: the planning scan's null field.
        grid: the pair's 1 mm grid (daily frame).
        transform: the pre-alignment ``A`` (daily point -> planning point, mm): an affine or
            a rigid transform (its matrix is ``L``).

    Returns:
        (3, nz, ny, nx) float32 pull field (mm, channels x, y, z) on ``grid``. Points that the
        pre-alignment sends outside the planning box take the nearest value on the box.
    """
    out = _resampled(_vector_image(null.u0, null.grid), grid, transform)
    matrix = (
        np.asarray(transform.GetMatrix(), float).reshape(3, 3)
        if hasattr(transform, "GetMatrix")
        else np.eye(3)
    )
    if not np.allclose(matrix, np.eye(3), atol=1e-12):
        inv = np.linalg.inv(matrix).astype(np.float32)
        out = np.einsum("dc,czyx->dzyx", inv, out, optimize=True)
    return np.ascontiguousarray(out, np.float32)


def warp_null(
    null_field: npt.NDArray[np.float32], grid: Geometry, transform: sitk.Transform
) -> npt.NDArray[np.float32]:
    """A pair's null field moved with the content a cascaded pass sees: ``u0(T(x))``.

    Args:
        null_field: (3, nz, ny, nx) the pair's null field (`transport`), mm.
        grid: the pair's 1 mm grid.
        transform: the field so far ``T`` (a displacement-field transform on ``grid``).

    Returns:
        (3, nz, ny, nx) float32, mm.
    """
    image = _vector_image(null_field, grid)
    return np.ascontiguousarray(_resampled(image, grid, transform), np.float32)


#: One cache object per folder in this process (each keeps its last entry in memory).
_CACHES: dict[Path, NullFieldCache] = {}


def cache_for(root: Path | None) -> NullFieldCache | None:
    """The process's null-field cache under a cache root (``<root>/null-fields``), or None."""
    if root is None:
        return None
    folder = Path(root) / "null-fields"
    cache = _CACHES.get(folder)
    if cache is None:
        cache = _CACHES[folder] = NullFieldCache(folder)
    return cache


def planning_null(
    backend: Any,
    planning_ct: Volume,
    planning_labels: Volume,
    box: tuple[npt.ArrayLike, npt.ArrayLike],
    cache: NullFieldCache | None,
) -> PlanningNull:
    """The planning scan's null field on its box, from the cache or by one network pass.

    Args:
        backend: the loaded network (`jrs.inference.backend.NetworkBackend`).
        planning_ct: the planning CT in HU.
        planning_labels: the planning label map (ids 0..4) on the planning CT's grid.
        box: LPS box (lower, upper) around the planning organs plus the network margin, mm,
            in the planning frame (the box a pair of the planning scan with itself would get).
        cache: where to look for it and keep it (None: computed, not kept).

    Returns:
        The planning null field.
    """
    # the arrays a pair of the planning scan with itself would get (`prepare_pair` with the
    # identity), without its second resampling of the same scan and its body mask
    grid = canonical_grid(*box, frame_of_reference_uid=planning_ct.geometry.frame_of_reference_uid)
    moving = normalise_hu(planning_ct.resample(grid, "linear", HU_MIN).array)
    labels = planning_labels.resample(grid, "label", 0).array.astype(np.uint8)
    tag = model_tag(backend)
    key = null_key(tag, grid, moving, labels) if tag else ""
    if cache is not None and key:
        found = cache.get(key)
        if found is not None:
            return found
    t0 = time.perf_counter()
    pred = backend.predict(moving, moving, labels.astype(np.float32))
    scores = getattr(pred, "seg_logits", None)
    if scores is None:
        scores = getattr(pred, "seg_probs", None)
    entry = PlanningNull(
        np.ascontiguousarray(pred.dvf, np.float32),
        grid,
        planning_segmentation_dice(scores, labels),
        time.perf_counter() - t0,
        key,
    )
    if cache is not None:
        cache.put(entry)
    return entry
