"""What every inference engine offers: run the bare network on a batch of windows.

An engine wraps one runtime (ONNX Runtime on CUDA or the CPU, OpenVINO on the CPU), compiled once
for a model and kept for the life of the process; :class:`jrs.inference.model.Model` tiles whole
scans on top of it. One engine per file:

* :mod:`jrs.inference.onnxruntime_cuda`: ONNX Runtime, CUDA (TensorRT execution provider first
  where present);
* :mod:`jrs.inference.openvino_cpu`: OpenVINO on the CPU, bf16 where the CPU has it (AMX,
  AVX512-BF16), else fp32;
* :mod:`jrs.inference.onnxruntime_cpu`: ONNX Runtime on the CPU, fp32 (the fallback).

The choice (``--engine auto|onnxruntime|openvino``, ``JRS_ENGINE``) is made by
:func:`jrs.inference.load_model`.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from jrs.core.errors import ModelNotReady

#: Engine names accepted by ``--engine`` / ``JRS_ENGINE``.
ENGINE_NAMES: tuple[str, ...] = ("auto", "onnxruntime", "openvino")
#: Precision names accepted by ``--precision`` / ``JRS_PRECISION``.
PRECISION_NAMES: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")

EngineName = Literal["auto", "onnxruntime", "openvino"]
PrecisionName = Literal["auto", "fp32", "bf16", "fp16"]

__all__ = [
    "ENGINE_NAMES",
    "PRECISION_NAMES",
    "Engine",
    "EngineName",
    "EngineUnavailable",
    "PrecisionName",
]


class EngineUnavailable(ModelNotReady):
    """An engine's runtime is missing or failed to start on this machine.

    ``device=auto`` then falls back to the CPU; an explicit request becomes a
    :class:`~jrs.core.errors.ModelNotReady`.
    """


class Engine(abc.ABC):
    """A compiled network that maps a batch of input windows to the named outputs.

    Attributes:
        name: ``onnxruntime`` or ``openvino``.
        device: Where it runs: ``cpu`` or ``cuda:N``.
        precision: Arithmetic of the run: ``fp32``, ``bf16`` or ``fp16``.
        execution_provider: What actually runs the graph, for logs and metrics (ONNX Runtime's
            provider name, e.g. ``CUDAExecutionProvider``; ``OpenVINO:CPU`` for OpenVINO).
        activation_live_fraction: Fraction of the summed float32 activations
            (``activation_bytes_per_input_voxel`` of the metadata) this runtime keeps alive at
            its peak; sets the window chosen from a memory budget.
        default_memory_budget_mb: Memory budget of one run when the caller gives none (MiB).
        max_batch: Most windows per run worth batching (1 on CPUs: no speed from batching).
    """

    name: str = ""
    device: str = "cpu"
    precision: str = "fp32"
    execution_provider: str = ""
    activation_live_fraction: float = 0.4
    default_memory_budget_mb: float = 2048.0
    max_batch: int = 1

    def __init__(self) -> None:
        #: Seconds spent compiling for new input shapes inside :meth:`run` since the last
        #: :meth:`take_compile_seconds`.
        self._compile_s = 0.0

    @property
    def providers(self) -> list[str]:
        """Runtime back-ends in priority order (ONNX Runtime providers; one for OpenVINO)."""
        return [self.execution_provider]

    @property
    def on_gpu(self) -> bool:
        """Whether the network runs on a GPU."""
        return self.device.startswith("cuda")

    @abc.abstractmethod
    def run(
        self, feed: Mapping[str, npt.NDArray[np.float32]], outputs: Sequence[str]
    ) -> dict[str, npt.NDArray[np.float32]]:
        """Run the bare network once (thread-safe).

        Args:
            feed: Input name -> ``(B, 1, n_z, n_y, n_x)`` C-contiguous float32 windows.
            outputs: Output names to return.

        Returns:
            Output name -> ``(B, C, n_z - 40, n_y - 40, n_x - 40)`` float32, arrays the caller
            owns.
        """

    def take_compile_seconds(self) -> float:
        """Compile time spent inside :meth:`run` since the last call (and reset it)."""
        seconds, self._compile_s = self._compile_s, 0.0
        return seconds

    def info(self) -> dict[str, Any]:
        """Engine, device, precision and providers (for ``qa.json``, logs and metrics)."""
        return {
            "engine": self.name,
            "device": self.device,
            "precision": self.precision,
            "execution_provider": self.execution_provider,
            "providers": self.providers,
        }
