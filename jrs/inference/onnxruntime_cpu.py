"""ONNX Runtime on the CPU: the fallback engine (fp32), available wherever jrs is installed."""

from __future__ import annotations

from pathlib import Path

from jrs.core.errors import InvalidInput
from jrs.inference._onnxruntime import CPU_PROVIDER, OnnxRuntimeEngine, create_session
from jrs.inference.metadata import ModelMetadata

#: Fraction of the summed activations ONNX Runtime's CPU provider keeps alive at its peak
#: (its memory planner reuses buffers). Measured for the cross-stitch network: peak RSS increase
#: of one run 0.25 of the sum at n = 96, 0.33 at n = 128; 0.4 keeps a margin.
ACTIVATION_LIVE_FRACTION = 0.4


class OnnxRuntimeCpuEngine(OnnxRuntimeEngine):
    """ONNX Runtime's CPU execution provider, fp32.

    Args:
        data: The ONNX file's bytes.
        source: Its path (named in messages).
        meta: The model's metadata.
        precision: ``auto`` or ``fp32`` (the only arithmetic of this engine).
        intra_op_threads: Threads inside one operator (``None``: all physical cores).
        inter_op_threads: Threads across operators (``None``: default).

    Raises:
        InvalidInput: For any other precision.
        ModelNotReady: When ONNX Runtime cannot load the model.
    """

    activation_live_fraction = ACTIVATION_LIVE_FRACTION
    default_memory_budget_mb = 2048.0
    max_batch = 1

    def __init__(
        self,
        data: bytes,
        source: Path,
        meta: ModelMetadata,
        *,
        precision: str = "auto",
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
    ) -> None:
        if precision not in ("auto", "fp32"):
            raise InvalidInput(
                f"precision {precision!r} is not available with ONNX Runtime on the CPU (fp32 "
                "only); use --precision auto or fp32, or --engine openvino for bf16"
            )
        session = create_session(
            data,
            source,
            meta,
            [CPU_PROVIDER],
            intra_op_threads=intra_op_threads,
            inter_op_threads=inter_op_threads,
        )
        super().__init__(session, "cpu", "fp32")
