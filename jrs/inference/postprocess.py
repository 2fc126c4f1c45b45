"""Post-processing of predicted label maps (METHOD.md, Inference on a whole scan).

Largest connected component per organ; the two largest for the seminal vesicles. Components are
ranked by size only, never by comparison with a reference (that would be an oracle).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from jrs.core.labels import BLADDER, PROSTATE, RECTUM, SEMINAL_VESICLES

#: label id -> number of connected components kept.
COMPONENTS_KEPT: dict[int, int] = {BLADDER: 1, RECTUM: 1, SEMINAL_VESICLES: 2, PROSTATE: 1}


def keep_largest_components(
    labels: npt.NDArray[np.integer[Any]], components: dict[int, int] | None = None
) -> npt.NDArray[np.uint8]:
    """Keep the largest connected component(s) of each organ of a label map.

    Connectivity is full (faces, edges and corners: 26-neighbourhood).

    Args:
        labels: (nz, ny, nx) label map 0..4.
        components: label id -> components kept (default `COMPONENTS_KEPT`); labels absent from
            it are dropped.

    Returns:
        (nz, ny, nx) uint8 label map; dropped voxels become background.
    """
    keep_by_label = COMPONENTS_KEPT if components is None else components
    arr = np.asarray(labels)
    out = np.zeros(arr.shape, dtype=np.uint8)
    for organ, keep in keep_by_label.items():
        mask = arr == organ
        if not mask.any():
            continue
        cc = sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), True)
        ranked = sitk.GetArrayFromImage(sitk.RelabelComponent(cc, sortByObjectSize=True))
        out[(ranked >= 1) & (ranked <= keep)] = organ
    return out
