"""What the pipeline needs of a loaded network: the `NetworkBackend` protocol and its prediction."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


class NetworkPrediction(Protocol):
    """What a network backend returns (see `jrs.inference`)."""

    @property
    def seg_probs(self) -> npt.NDArray[np.float32] | None:
        """(5, nz, ny, nx) class probabilities on the input grid, or None."""

    @property
    def dvf(self) -> npt.NDArray[np.float32]:
        """(3, nz, ny, nx) displacement, voxels of the 1 mm grid (= mm), channels x, y, z."""


class Predictor(Protocol):
    """What the null pass and the cascade need of a network: whole-volume prediction."""

    def predict(
        self,
        fixed: npt.NDArray[np.float32],
        moving: npt.NDArray[np.float32],
        moving_labels: npt.NDArray[np.float32],
    ) -> NetworkPrediction:
        """Whole-volume tiled prediction on the 1 mm grid."""


class NetworkBackend(Predictor, Protocol):
    """A loaded network with its ``metadata.json`` (`jrs.inference.Model` is one)."""

    metadata: dict[str, Any]

    def predict(
        self,
        fixed: npt.NDArray[np.float32],
        moving: npt.NDArray[np.float32],
        moving_labels: npt.NDArray[np.float32],
    ) -> NetworkPrediction:
        """Whole-volume tiled prediction on the 1 mm grid."""
