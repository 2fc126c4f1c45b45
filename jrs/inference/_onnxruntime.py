"""What the two ONNX Runtime engines share: the session, its graph check, the run."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from jrs.core.errors import ModelNotReady
from jrs.inference.engine import Engine
from jrs.inference.metadata import METADATA_FILE, ModelMetadata

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
TENSORRT_PROVIDER = "TensorrtExecutionProvider"


def create_session(
    data: bytes,
    source: Path,
    meta: ModelMetadata,
    providers: Sequence[Any],
    *,
    intra_op_threads: int | None = None,
    inter_op_threads: int | None = None,
) -> Any:
    """An ONNX Runtime session for the model, its graph checked against the metadata.

    Args:
        data: The ONNX file's bytes.
        source: Its path (named in messages).
        meta: The model's metadata.
        providers: Execution providers (names or ``(name, options)``) in priority order.
        intra_op_threads: Threads inside one operator (``None``: all physical cores).
        inter_op_threads: Threads across operators (``None``: default).

    Returns:
        The ``onnxruntime.InferenceSession``.

    Raises:
        ModelNotReady: When ONNX Runtime cannot load the file or its inputs/outputs differ from
            the metadata.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads is not None:
        options.intra_op_num_threads = int(intra_op_threads)
    if inter_op_threads is not None:
        options.inter_op_num_threads = int(inter_op_threads)
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(data, sess_options=options, providers=list(providers))
    except Exception as exc:
        raise ModelNotReady(f"{source}: ONNX Runtime cannot load the model ({exc})") from exc
    graph_inputs = [i.name for i in session.get_inputs()]
    graph_outputs = {o.name for o in session.get_outputs()}
    if graph_inputs != list(meta.inputs) or not set(meta.outputs) <= graph_outputs:
        raise ModelNotReady(
            f"{source}: graph inputs {graph_inputs} / outputs {sorted(graph_outputs)} do not "
            f"match {METADATA_FILE} ({list(meta.inputs)} / {list(meta.outputs)})"
        )
    return session


class OnnxRuntimeEngine(Engine):
    """An ONNX Runtime session as an engine (subclassed per device).

    Args:
        session: The session (from :func:`create_session`).
        device: ``cpu`` or ``cuda:N``.
        precision: ``fp32`` (or ``fp16`` through TensorRT).
    """

    name = "onnxruntime"

    def __init__(self, session: Any, device: str, precision: str = "fp32") -> None:
        super().__init__()
        self.session = session
        self.device = device
        self.precision = precision

    @property
    def providers(self) -> list[str]:
        """Execution providers of the session, in priority order."""
        return list(self.session.get_providers())

    @property
    def execution_provider(self) -> str:  # type: ignore[override]
        """The provider that runs the network (the session's first)."""
        return self.providers[0]

    def run(
        self, feed: Mapping[str, npt.NDArray[np.float32]], outputs: Sequence[str]
    ) -> dict[str, npt.NDArray[np.float32]]:
        """Run the session once (see :meth:`Engine.run`)."""
        got = self.session.run(list(outputs), dict(feed))
        return dict(zip(outputs, got, strict=True))
