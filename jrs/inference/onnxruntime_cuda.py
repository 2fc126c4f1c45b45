"""ONNX Runtime on a CUDA GPU, with the TensorRT execution provider first where it is installed.

TensorRT builds an engine per input shape the first time it meets it (seconds to minutes); the
built engines are cached on disk (``cache_dir``, by default ``~/.cache/jrs/tensorrt``) so a
restarted service reuses them. CUDA alone needs no build. Windows are batched (up to 8 per run).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from jrs.core.errors import InvalidInput
from jrs.inference._onnxruntime import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    TENSORRT_PROVIDER,
    OnnxRuntimeEngine,
    create_session,
)
from jrs.inference.engine import EngineUnavailable
from jrs.inference.metadata import ModelMetadata

log = logging.getLogger(__name__)

#: Fraction of the summed activations kept alive (as the CPU provider's; cuDNN workspaces come
#: on top and are not measured).
ACTIVATION_LIVE_FRACTION = 0.4


def default_cache_dir() -> Path:
    """TensorRT's engine cache: ``$JRS_TRT_CACHE_DIR``, else ``~/.cache/jrs/tensorrt``."""
    env = os.environ.get("JRS_TRT_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "jrs" / "tensorrt"


def cuda_providers(
    index: int | None,
    available: list[str],
    *,
    tensorrt: bool = False,
    fp16: bool = False,
    cache_dir: Path | None = None,
) -> list[Any]:
    """ONNX Runtime providers for a CUDA device, in priority order.

    Args:
        index: CUDA device index (``None``: the default device, 0).
        available: Providers of this ONNX Runtime build.
        tensorrt: Put the TensorRT provider first (when available).
        fp16: Let TensorRT run fp16 kernels.
        cache_dir: TensorRT engine cache folder.

    Returns:
        ``[TensorRT?, CUDA, CPU]`` entries as names or ``(name, options)`` pairs.
    """
    cuda: Any = CUDA_PROVIDER if index is None else (CUDA_PROVIDER, {"device_id": index})
    providers: list[Any] = [cuda, CPU_PROVIDER]
    if tensorrt and TENSORRT_PROVIDER in available:
        cache = cache_dir or default_cache_dir()
        options = {
            "device_id": index or 0,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(cache),
            "trt_fp16_enable": bool(fp16),
        }
        providers.insert(0, (TENSORRT_PROVIDER, options))
    return providers


class OnnxRuntimeCudaEngine(OnnxRuntimeEngine):
    """ONNX Runtime on CUDA (TensorRT first where present).

    Args:
        data: The ONNX file's bytes.
        source: Its path (named in messages).
        meta: The model's metadata.
        available: Providers of this ONNX Runtime build.
        index: CUDA device index (``None``: device 0).
        precision: ``auto``/``fp32``, or ``fp16`` (needs TensorRT).
        tensorrt: Use TensorRT when installed (``None``: yes, unless ``JRS_TENSORRT=0``).
        cache_dir: TensorRT engine cache.
        intra_op_threads: CPU threads of the session's CPU part.
        inter_op_threads: Threads across operators.

    Raises:
        EngineUnavailable: When this build has no CUDA provider or it fails to start.
        InvalidInput: For a precision this engine cannot run.
        ModelNotReady: When ONNX Runtime cannot load the model.
    """

    activation_live_fraction = ACTIVATION_LIVE_FRACTION
    default_memory_budget_mb = 2048.0
    max_batch = 8

    def __init__(
        self,
        data: bytes,
        source: Path,
        meta: ModelMetadata,
        available: list[str],
        *,
        index: int | None = None,
        precision: str = "auto",
        tensorrt: bool | None = None,
        cache_dir: Path | None = None,
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
    ) -> None:
        device = f"cuda:{index or 0}"
        if CUDA_PROVIDER not in available:
            raise EngineUnavailable(
                f"device {device if index is not None else 'cuda'!r} requested but ONNX Runtime "
                f"has no {CUDA_PROVIDER} (available providers: {', '.join(available)}); install "
                "onnxruntime-gpu with a CUDA GPU, or use --device auto or cpu"
            )
        if tensorrt is None:
            tensorrt = os.environ.get("JRS_TENSORRT", "1").strip() not in ("0", "false", "no")
        use_trt = bool(tensorrt) and TENSORRT_PROVIDER in available
        if precision not in ("auto", "fp32", "fp16"):
            raise InvalidInput(
                f"precision {precision!r} is not available with ONNX Runtime on CUDA; use auto, "
                "fp32 or (with TensorRT) fp16"
            )
        if precision == "fp16" and not use_trt:
            raise InvalidInput(
                f"precision fp16 on CUDA needs the {TENSORRT_PROVIDER} (not installed or "
                "disabled); use --precision fp32"
            )
        providers = cuda_providers(
            index, available, tensorrt=use_trt, fp16=precision == "fp16", cache_dir=cache_dir
        )
        if use_trt:
            (cache_dir or default_cache_dir()).mkdir(parents=True, exist_ok=True)
        session = create_session(
            data,
            source,
            meta,
            providers,
            intra_op_threads=intra_op_threads,
            inter_op_threads=inter_op_threads,
        )
        active = session.get_providers()
        if CUDA_PROVIDER not in active:
            raise EngineUnavailable(
                f"{source}: {CUDA_PROVIDER} failed to start on {device} (active providers: "
                f"{active})"
            )
        super().__init__(session, device, "fp16" if precision == "fp16" else "fp32")
        log.info("ONNX Runtime on %s with %s", device, ", ".join(active))
