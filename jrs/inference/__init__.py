"""Whole-scan network inference (numpy + an inference runtime, never torch).

A model folder ``models/<name>/<version>/`` holds ``model.onnx`` (the network only, written by
``model_export``) and ``metadata.json``; :func:`load_model` reads nothing else and compiles the
network once with one of three engines (one file each):

================  ==========================  ===============================================
engine            device                      file
================  ==========================  ===============================================
``onnxruntime``   CUDA (TensorRT first where  :mod:`jrs.inference.onnxruntime_cuda`
                  installed)
``openvino``      CPU, bf16 where the CPU has :mod:`jrs.inference.openvino_cpu`
                  it (AMX, AVX512-BF16)
``onnxruntime``   CPU, fp32 (fallback)        :mod:`jrs.inference.onnxruntime_cpu`
================  ==========================  ===============================================

``engine="auto"`` (the default of ``--engine`` and ``JRS_ENGINE``) takes ONNX Runtime on CUDA when
the device allows it, else OpenVINO on the CPU when it is installed, else ONNX Runtime on the CPU.
``device="auto"`` falls back to the CPU with a logged warning when CUDA is missing or fails to
start. :meth:`Model.predict` tiles a whole scan (:mod:`jrs.inference.model`).

Example::

    model = load_model("models/crossstitch/2", device="auto", engine="auto")
    pred = model.predict(fixed, moving, moving_labels)
    labels, dvf = pred.labels, pred.dvf          # (D, H, W) uint8, (3, D, H, W) voxels = mm
    model.info()  # engine, device, precision, execution provider
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any, Literal

from jrs.core.errors import InvalidInput, ModelNotReady
from jrs.inference._onnxruntime import CPU_PROVIDER, CUDA_PROVIDER, TENSORRT_PROVIDER
from jrs.inference.engine import (
    ENGINE_NAMES,
    PRECISION_NAMES,
    Engine,
    EngineName,
    EngineUnavailable,
    PrecisionName,
)
from jrs.inference.metadata import (
    DEFAULT_BYTES_PER_VOXEL,
    INPUT_MEANINGS,
    INPUT_PAD_VALUES,
    METADATA_FILE,
    METADATA_FORMAT,
    METADATA_VERSION,
    MODEL_FILE,
    ModelMetadata,
    read_metadata,
    read_model_file,
)
from jrs.inference.model import (
    DEFAULT_MEMORY_BUDGET_MB,
    InferenceTimings,
    Model,
    OnnxModel,
    Prediction,
    softmax,
)
from jrs.inference.tiling import SEAM_OVERLAP

log = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda"]

__all__ = [
    "CPU_PROVIDER",
    "CUDA_PROVIDER",
    "DEFAULT_BYTES_PER_VOXEL",
    "DEFAULT_MEMORY_BUDGET_MB",
    "ENGINE_NAMES",
    "INPUT_MEANINGS",
    "INPUT_PAD_VALUES",
    "METADATA_FILE",
    "METADATA_FORMAT",
    "METADATA_VERSION",
    "MODEL_FILE",
    "PRECISION_NAMES",
    "SEAM_OVERLAP",
    "TENSORRT_PROVIDER",
    "Engine",
    "EngineName",
    "EngineUnavailable",
    "InferenceTimings",
    "Model",
    "ModelMetadata",
    "OnnxModel",
    "PrecisionName",
    "Prediction",
    "available_providers",
    "check_engine_options",
    "load_model",
    "openvino_available",
    "parse_device",
    "read_metadata",
    "softmax",
]


def available_providers() -> list[str]:
    """ONNX Runtime execution providers of this installation (e.g. TensorRT, CUDA, CPU)."""
    import onnxruntime as ort

    return list(ort.get_available_providers())


def openvino_available() -> bool:
    """Whether the OpenVINO runtime can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("openvino") is not None
    except (ImportError, ValueError):
        return False


def parse_device(device: str) -> tuple[str, int | None]:
    """``auto``/``cpu``/``cuda``/``cuda:N`` -> (kind, CUDA device index or None).

    Raises:
        InvalidInput: For any other name.
    """
    d = str(device).strip().lower()
    if d in ("auto", "cpu", "cuda"):
        return d, None
    if d.startswith("cuda:") and d[5:].isdigit():
        return "cuda", int(d[5:])
    raise InvalidInput(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def check_engine_options(engine: str, precision: str) -> tuple[str, str]:
    """Normalise and validate ``--engine`` / ``--precision`` values.

    Returns:
        ``(engine, precision)`` in lower case.

    Raises:
        InvalidInput: For an unknown name (the message lists the accepted ones).
    """
    e, p = str(engine).strip().lower(), str(precision).strip().lower()
    if e not in ENGINE_NAMES:
        raise InvalidInput(f"engine {engine!r} unknown; use {', '.join(ENGINE_NAMES)}")
    if p not in PRECISION_NAMES:
        raise InvalidInput(f"precision {precision!r} unknown; use {', '.join(PRECISION_NAMES)}")
    return e, p


def _session_providers(device: str) -> list[Any]:
    """ONNX Runtime providers (without TensorRT) for a device name, as ONNX Runtime takes them.

    Raises:
        ModelNotReady: ``cuda`` asked for and this build has no CUDA provider.
    """
    from jrs.inference.onnxruntime_cuda import cuda_providers

    kind, index = parse_device(device)
    available = available_providers()
    if kind == "cpu":
        return [CPU_PROVIDER]
    if CUDA_PROVIDER in available:
        return cuda_providers(index, available)
    if kind == "cuda":
        raise ModelNotReady(
            f"device {device!r} requested but ONNX Runtime has no {CUDA_PROVIDER} "
            f"(available providers: {', '.join(available)}); install onnxruntime-gpu with a "
            "CUDA GPU, or use --device auto or cpu"
        )
    return [CPU_PROVIDER]


def _cpu_engine(
    engine: str,
    source: Path,
    data: bytes,
    meta: ModelMetadata,
    precision: str,
    threads: int | None,
    inter_op_threads: int | None,
    openvino_options: dict[str, Any],
) -> Engine:
    """The CPU engine for ``engine`` (``auto``: OpenVINO when installed, else ONNX Runtime)."""
    from jrs.inference.onnxruntime_cpu import OnnxRuntimeCpuEngine

    if engine == "openvino" or (engine == "auto" and openvino_available()):
        from jrs.inference.openvino_cpu import OpenVinoCpuEngine

        try:
            return OpenVinoCpuEngine(
                source, meta, precision=precision, threads=threads, **openvino_options
            )
        except EngineUnavailable:
            if engine == "openvino":
                raise
            log.warning("OpenVINO cannot be used; running ONNX Runtime on the CPU")
    return OnnxRuntimeCpuEngine(
        data,
        source,
        meta,
        precision=precision,
        intra_op_threads=threads,
        inter_op_threads=inter_op_threads,
    )


def load_model(
    model_dir: str | Path,
    device: Device | str = "auto",
    *,
    engine: EngineName | str = "auto",
    precision: PrecisionName | str = "auto",
    intra_op_threads: int | None = None,
    inter_op_threads: int | None = None,
    verify_sha256: bool = True,
    tensorrt: bool | None = None,
    openvino_options: dict[str, Any] | None = None,
) -> Model:
    """Load a model version folder and compile it with an engine (once; keep the result).

    Args:
        model_dir: ``models/<name>/<version>`` holding ``model.onnx`` and ``metadata.json``.
        device: ``auto`` (CUDA, else the CPU with a logged warning), ``cpu``, ``cuda`` or
            ``cuda:N`` (CUDA device N).
        engine: ``auto`` (ONNX Runtime on CUDA, else OpenVINO on the CPU when installed, else
            ONNX Runtime on the CPU), ``onnxruntime`` or ``openvino`` (CPU only).
        precision: ``auto`` (bf16 on a CPU that has it with OpenVINO, else fp32), ``fp32``,
            ``bf16`` (OpenVINO) or ``fp16`` (CUDA with TensorRT).
        intra_op_threads: Threads of one run (``None``: the runtime's default, one per core).
        inter_op_threads: ONNX Runtime threads across operators (``None``: default).
        verify_sha256: Check ``model.onnx`` against the digest in the metadata.
        tensorrt: Use ONNX Runtime's TensorRT provider on CUDA where installed (``None``: yes
            unless ``JRS_TENSORRT=0``).
        openvino_options: Extra keyword arguments of
            :class:`~jrs.inference.openvino_cpu.OpenVinoCpuEngine` (``static_shapes``,
            ``cache_budget_mb``, ``cache_dir``).

    Returns:
        The loaded model.

    Raises:
        ModelNotReady: When a file is missing, corrupt or inconsistent (the message names it),
            or an engine asked for explicitly is unavailable (``cuda`` without CUDA: the message
            lists the providers; ``openvino`` not installed).
        InvalidInput: For an unknown device, engine or precision, or a combination the engine
            cannot run (``openvino`` on ``cuda``, ``bf16`` on a CPU without it).
    """
    engine, precision = check_engine_options(engine, precision)
    kind, index = parse_device(str(device))
    folder = Path(model_dir)
    if not folder.is_dir():
        raise ModelNotReady(f"{folder}: model folder not found")
    meta = read_metadata(folder)
    source, data = read_model_file(folder, meta, verify_sha256)
    if engine == "openvino" and kind == "cuda":
        raise InvalidInput(
            f"the OpenVINO engine runs on the CPU, not on {device!r}; use --device cpu (or "
            "auto), or --engine onnxruntime for CUDA"
        )
    ov_options = dict(openvino_options or {})

    chosen: Engine | None = None
    if kind in ("cuda", "auto") and engine != "openvino":
        from jrs.inference.onnxruntime_cuda import OnnxRuntimeCudaEngine

        available = available_providers()
        if kind == "auto" and CUDA_PROVIDER not in available:
            log.warning(
                "device auto: %s not available (providers: %s); running on the CPU",
                CUDA_PROVIDER,
                ", ".join(available),
            )
        else:
            try:
                chosen = OnnxRuntimeCudaEngine(
                    data,
                    source,
                    meta,
                    available,
                    index=index,
                    precision=precision,
                    tensorrt=tensorrt,
                    intra_op_threads=intra_op_threads,
                    inter_op_threads=inter_op_threads,
                )
            except EngineUnavailable as exc:
                if kind == "cuda":
                    raise ModelNotReady(exc.message) from exc
                log.warning(
                    "device auto: %s failed to start (%s); running on the CPU",
                    CUDA_PROVIDER,
                    exc.message,
                )
    if chosen is None:
        try:
            chosen = _cpu_engine(
                engine,
                source,
                data,
                meta,
                precision,
                intra_op_threads,
                inter_op_threads,
                ov_options,
            )
        except EngineUnavailable as exc:
            raise ModelNotReady(exc.message) from exc
    model = Model(folder, meta, chosen, str(device))
    log.info(
        "loaded model %s v%s from %s: %s on %s, %s (%s)",
        meta.name,
        meta.version,
        folder,
        chosen.name,
        chosen.device,
        chosen.precision,
        chosen.execution_provider,
    )
    return model
