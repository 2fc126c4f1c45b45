"""Cascaded network passes: the network registers what its first field left over.

A registration network trained on a small compute budget under-registers large motion: the
bladder, whose volume changes by up to 60 % between fractions, is where the v3 checkpoints
trailed the iterative baseline most on the held-out real patient (docs/benchmarks.md). A
cascade runs the same network again on the residual: the planning scan and its labels are
warped by the first field ``u1``, the network registers the daily scan to that warped planning
scan (``u2``), and the two pull fields are composed::

    u(x) = u2(x) + u1(x + u2(x))

Each refining pass is null-corrected like the first (`jrs.inference.null_correction`): with the
warped planning scan as both images (one more network pass), or, given the planning scan's null
field (`jrs.inference.null_cache`), by that field moved with the content (one warp). The same scan
twice still
gives exactly zero: ``u1`` is then 0, the pass is skipped, and ``u`` stays 0. A pass costs one
or two network passes plus three or four warps; the segmentation of the last pass (with the
warped planning labels, now closer to the daily anatomy, as its prior) is the one the pipeline
uses.

A model's ``metadata.json`` sets the number of passes (``"network_passes"``, absent: 1);
`jrs.pipeline.options.RecontourOptions.network_passes` overrides it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from jrs.core.fields import compose, dvf_to_sitk, warp
from jrs.core.geometry import Geometry, Volume
from jrs.inference.backend import Predictor
from jrs.inference.null_cache import warp_null
from jrs.inference.null_correction import null_correct, subtract_null

__all__ = ["MAX_PASSES", "CascadeReport", "network_passes", "refine"]

#: The most passes a caller may ask for (each costs about as much as the first).
MAX_PASSES = 4
#: The normalised intensity of air (-1000 HU, `jrs.inference.preprocess.normalise_hu`): the warped
#: planning scan's value where the field reaches outside it.
_AIR = -1.0


def network_passes(metadata: Mapping[str, Any], override: int | None = None) -> int:
    """How many network passes register a pair.

    Args:
        metadata: the model's ``metadata.json`` content; its optional integer
            ``network_passes`` (absent or invalid: 1).
        override: the caller's number (None: the model's).

    Returns:
        1 to `MAX_PASSES`.

    Raises:
        ValueError: ``override`` is not an integer from 1 to `MAX_PASSES`.
    """
    if override is None:
        raw = metadata.get("network_passes", 1)
        return raw if _valid(raw) else 1
    if not _valid(override):
        raise ValueError(
            f"network passes {override!r}: use an integer from 1 to {MAX_PASSES} "
            "(1: the network once, 2: once more on what the first field left over)"
        )
    return override


def _valid(passes: object) -> bool:
    return isinstance(passes, int) and not isinstance(passes, bool) and 1 <= passes <= MAX_PASSES


@dataclass
class CascadeReport:
    """What the refining passes did.

    Attributes:
        residual_max_mm: per refining pass, the largest |u2| inside the body (mm): what that
            pass added to the field before composition.
        seconds: wall time of the refining passes (network, null passes, warps), s.
    """

    residual_max_mm: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passes(self) -> int:
        """Network passes run on the pair (1: no refinement)."""
        return 1 + len(self.residual_max_mm)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form (``qa.json``, ``network.cascade``)."""
        return {
            "passes": self.passes,
            "residual_max_mm": [round(v, 3) for v in self.residual_max_mm],
            "seconds": round(self.seconds, 3),
        }


def refine(
    backend: Predictor,
    grid: Geometry,
    fixed: npt.NDArray[np.float32],
    moving: npt.NDArray[np.float32],
    moving_labels: npt.NDArray[np.float32],
    dvf: npt.NDArray[np.float32],
    passes: int,
    *,
    null_correction: bool = True,
    body: npt.NDArray[Any] | None = None,
    prediction: Any = None,
    null_field: npt.NDArray[np.float32] | None = None,
) -> tuple[npt.NDArray[np.float32], Any, CascadeReport]:
    """Run ``passes - 1`` refining passes of the network on a registered pair.

    Args:
        backend: the loaded network (`jrs.inference.backend.NetworkBackend`).
        grid: the network grid (1 mm, identity direction) all arrays live on.
        fixed: (nz, ny, nx) daily CT, network intensities.
        moving: (nz, ny, nx) pre-aligned planning CT, network intensities.
        moving_labels: (nz, ny, nx) pre-aligned planning label map (ids 0..4 as float).
        dvf: (3, nz, ny, nx) the first pass's (null-corrected) pull field, channels x, y, z, mm.
        passes: total passes, 1 to `MAX_PASSES` (1: ``dvf`` is returned as it is).
        null_correction: null-correct each refining pass as the first.
        body: (nz, ny, nx) body mask of the daily scan for the statistics (None: everywhere).
        prediction: the first pass's prediction, returned when no refining pass runs.
        null_field: (3, nz, ny, nx) the null field of the unwarped planning scan on ``grid``
            (`jrs.inference.null_cache.transport`): a refining pass then subtracts it moved with the
            content (`jrs.inference.null_cache.warp_null`) instead of running its own null pass.

    Returns:
        The composed (3, nz, ny, nx) field (float32, mm), the last pass's prediction (its
        segmentation output) and the report.
    """
    report = CascadeReport()
    if passes <= 1 or not np.any(dvf):  # nothing moved: the field stays exactly zero
        return dvf, prediction, report
    t0 = time.perf_counter()
    total = Volume(np.ascontiguousarray(np.moveaxis(dvf, 0, -1), np.float32), grid)
    moving_vol = Volume(np.asarray(moving, np.float32), grid)
    labels_vol = Volume(np.asarray(moving_labels, np.float32), grid)
    inside = body > 0 if body is not None and np.any(body) else None
    for _ in range(passes - 1):
        tx = dvf_to_sitk(total)
        warped = warp(moving_vol, total, "linear", _AIR, transform=tx).array.astype(np.float32)
        warped_labels = warp(labels_vol, total, "nearest", 0.0, transform=tx).array.astype(
            np.float32
        )
        moved_null = (
            warp_null(null_field, grid, tx) if null_correction and null_field is not None else None
        )
        del tx
        prediction = backend.predict(fixed, warped, warped_labels)
        residual = np.asarray(prediction.dvf, np.float32)
        if moved_null is not None:
            residual, _, _ = subtract_null(moved_null, residual)
            del moved_null
        elif null_correction:
            residual, _ = null_correct(backend, warped, warped_labels, residual, body)
        mag = np.sqrt((residual**2).sum(axis=0))
        sel = mag[inside] if inside is not None else mag.ravel()
        report.residual_max_mm.append(float(sel.max()) if sel.size else 0.0)
        step = Volume(np.ascontiguousarray(np.moveaxis(residual, 0, -1)), grid)
        total = compose(step, total)
    report.seconds = time.perf_counter() - t0
    return np.ascontiguousarray(np.moveaxis(total.array, -1, 0)), prediction, report
