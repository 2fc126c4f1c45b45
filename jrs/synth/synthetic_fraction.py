"""What the deformation engines take and give: a synthetic daily fraction of a planning scan.

Both engines (`jrs.synth.engine.synthesize_fraction`, family "organ", and
`jrs.synth.dome_engine.synthesize_dome_fraction`, family "dome") take a planning CT, its label
map and its structures, check them the same way (`check_planning_inputs`, `planning_labels`),
derive the daily FrameOfReferenceUID from their draws (`derived_frame_uid`), and return an
`EngineFraction` with the realised organ volume changes (`volume_changes`). Conventions
(DESIGN.md): LPS mm, arrays (z, y, x). This module imports nothing from the engines.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.uid import generate_uid

from jrs.core.errors import InvalidInput
from jrs.core.geometry import Volume
from jrs.core.labels import BLADDER, PROSTATE

Mask = npt.NDArray[np.bool_]

#: HU below which a voxel inside the rectum counts as gas.
GAS_HU = -300.0


@dataclass(eq=False)
class EngineFraction:
    """A synthetic daily fraction of a planning scan with its exact ground truth.

    Attributes:
        ct: daily CT, HU float32 (nz, ny, nx), same grid and orientation as the planning CT, new
            FrameOfReferenceUID.
        labels: daily label map uint8 (nz, ny, nx), ids 0..4 = planning labels warped by
            `true_dvf` (``warp(..., "label")``: per-label linear + arg-max).
        structures: ROI name -> bool (nz, ny, nx) = planning structure warped by `true_dvf`
            (``warp_mask``).
        true_dvf: (nz, ny, nx, 3) float32 pull DVF in mm (LPS components) on the daily grid.
        params: JSON-friendly record of every drawn parameter and realised quantity (bladder
            volume ratio, prostate volume change, min det J, ...).
        gas: bool (nz, ny, nx) rectal gas of the daily scan (HU < `GAS_HU` inside the rectum).
    """

    ct: Volume
    labels: Volume
    structures: dict[str, np.ndarray]
    true_dvf: Volume
    params: dict[str, Any]
    gas: Mask | None = field(default=None, repr=False)


def check_planning_inputs(
    ct: Volume, labels: Volume, structures: Mapping[str, np.ndarray], strength: float
) -> None:
    """Check the planning scan an engine is given (the label map's dtype: `planning_labels`).

    Args:
        ct: planning CT, HU (nz, ny, nx).
        labels: planning label map on the CT grid.
        structures: ROI name -> (nz, ny, nx) mask on the CT grid.
        strength: factor on every amplitude.

    Raises:
        InvalidInput: a vector CT, labels or structures not on the CT grid, a strength that is
            not a finite number >= 0.
    """
    g = ct.geometry
    if ct.is_vector:
        raise InvalidInput(f"the planning CT must be a scalar volume, got shape {ct.array.shape}")
    g.require_same_grid(labels.geometry, "the planning CT and its label map")
    for name, m in structures.items():
        if np.shape(m) != g.shape:
            raise InvalidInput(
                f"structure {name!r} has shape {np.shape(m)}, the planning CT grid is {g.shape}"
            )
    if not np.isfinite(strength) or strength < 0:
        raise InvalidInput(f"strength must be a finite number >= 0, got {strength}")


def planning_labels(labels: Volume) -> npt.NDArray[np.uint8]:
    """The planning label map as uint8 (nz, ny, nx) ids of `jrs.core.labels` (no copy when uint8).

    Raises:
        InvalidInput: a label map that is not of an integer dtype.
    """
    lab = np.asarray(labels.array)
    if not np.issubdtype(lab.dtype, np.integer):
        raise InvalidInput(f"labels must be an integer label map, got dtype {lab.dtype}")
    return lab.astype(np.uint8, copy=False)


def derived_frame_uid(source: str, key: tuple[Any, ...]) -> str:
    """A FrameOfReferenceUID derived deterministically from an engine's name and draws.

    Args:
        source: the engine's name (an entropy source of the UID, e.g. ``"jrs-engine"``).
        key: the planning frame and the draws that make the fraction (its ``repr`` is hashed).

    Returns:
        The UID (same `source` and `key` -> same UID).
    """
    digest = hashlib.sha1(repr(key).encode()).hexdigest()
    return str(generate_uid(entropy_srcs=[source, digest]))


def volume_changes(planning: npt.NDArray[Any], daily: npt.NDArray[Any]) -> dict[str, float | None]:
    """The realised bladder volume ratio and prostate volume change (voxel counts).

    Args:
        planning: (nz, ny, nx) planning label map.
        daily: (nz, ny, nx) daily label map (same grid).

    Returns:
        ``{"bladder_volume_ratio": daily / planning bladder voxels, "prostate_volume_change":
        daily / planning prostate voxels - 1}``, None for an organ absent from the planning map.
    """
    out: dict[str, float | None] = {}
    for key, label_id in (("bladder", BLADDER), ("prostate", PROSTATE)):
        before = int(np.count_nonzero(planning == label_id))
        after = int(np.count_nonzero(daily == label_id))
        value = after / before if before else None
        if key == "bladder":
            out["bladder_volume_ratio"] = value
        else:
            out["prostate_volume_change"] = None if value is None else value - 1.0
    return out
