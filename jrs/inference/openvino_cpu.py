"""OpenVINO on the CPU: bf16 where the CPU has it (AMX, AVX512-BF16), else fp32.

The precision is always set explicitly (``INFERENCE_PRECISION_HINT``): OpenVINO would otherwise
pick bf16 by itself on such CPUs, and a run's arithmetic must be known (it is recorded in
``qa.json``). On a 2-core AMX CPU the bundled cross-stitch network runs about 3x (fp32) and 10x
(bf16) faster than with ONNX Runtime's CPU provider (docs/benchmarks.md).

Shapes: the ONNX graph has dynamic spatial axes. A model compiled for one static window shape runs
faster, and its first run is much shorter, than one compiled with dynamic axes, but OpenVINO keeps
the activation memory of every compiled shape. Compiled shapes are therefore cached
least-recently-used within a memory budget (``cache_budget_mb``): a service meeting the same
window shapes again reuses them, a new shape costs one compilation (about 0.3-0.5 s). With
``static_shapes=False`` one dynamic-shape model serves every window instead.

Runs are serialised per engine (a lock): on a CPU a second concurrent run would only compete for
the same cores and double the activation memory.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from jrs.core.errors import InvalidInput, ModelNotReady
from jrs.inference.engine import Engine, EngineUnavailable
from jrs.inference.metadata import METADATA_FILE, ModelMetadata

log = logging.getLogger(__name__)

#: ``execution_provider`` reported for this engine (logs, metrics, ``qa.json``).
EXECUTION_PROVIDER = "OpenVINO:CPU"
#: OpenVINO's name of each precision.
OV_PRECISIONS: dict[str, str] = {"fp32": "f32", "bf16": "bf16"}
#: Fraction of the summed float32 activations alive at the peak of a run, per precision.
#: Measured (peak RSS increase of one run, cross-stitch 16/32/64, 192^3 and 192 x 224 x 216):
#: bf16 0.23, fp32 0.43 of ``activation_bytes_per_input_voxel``; rounded up.
LIVE_FRACTION: dict[str, float] = {"bf16": 0.25, "fp32": 0.45}


def cpu_capabilities() -> list[str]:
    """OpenVINO's ``OPTIMIZATION_CAPABILITIES`` of this CPU (e.g. ``BF16``, ``FP32``, ``INT8``).

    Raises:
        EngineUnavailable: When OpenVINO is not installed.
    """
    core = _core()
    return [str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


def _core() -> Any:
    try:
        import openvino as ov
    except ImportError as exc:
        raise EngineUnavailable(
            f"OpenVINO is not installed ({exc}); pip install 'jrs[serve]' (or openvino), or use "
            "--engine onnxruntime"
        ) from exc
    return ov.Core()


def resolve_precision(precision: str, capabilities: Sequence[str]) -> str:
    """The precision a run uses: ``auto`` is bf16 where the CPU has it, else fp32.

    Args:
        precision: ``auto``, ``fp32`` or ``bf16``.
        capabilities: The CPU's OpenVINO capabilities (:func:`cpu_capabilities`).

    Raises:
        InvalidInput: For bf16 on a CPU without it, or a precision the CPU engine lacks.
    """
    has_bf16 = "BF16" in capabilities
    if precision == "auto":
        return "bf16" if has_bf16 else "fp32"
    if precision == "bf16" and not has_bf16:
        raise InvalidInput(
            "precision bf16 needs a CPU with bf16 arithmetic (AMX or AVX512-BF16); this CPU "
            f"offers {', '.join(capabilities)}; use --precision auto or fp32"
        )
    if precision not in OV_PRECISIONS:
        raise InvalidInput(
            f"precision {precision!r} is not available with OpenVINO on the CPU; use auto, "
            "fp32 or bf16"
        )
    return precision


class OpenVinoCpuEngine(Engine):
    """The network compiled by OpenVINO for the CPU.

    Args:
        source: The ONNX file (already checked against the metadata's digest).
        meta: The model's metadata.
        precision: ``auto`` (bf16 where supported, else fp32), ``fp32`` or ``bf16``.
        threads: Inference threads (``None``: OpenVINO's default, one per core).
        static_shapes: Compile per window shape (cached) rather than once with dynamic axes.
        cache_budget_mb: Estimated activation memory the cached compiled shapes may hold
            together (MiB); the least recently used are dropped beyond it (the newest is always
            kept).
        cache_dir: OpenVINO's on-disk model cache (``CACHE_DIR``), or ``None``.

    Raises:
        EngineUnavailable: When OpenVINO is not installed.
        InvalidInput: For a precision this CPU or engine cannot run.
        ModelNotReady: When OpenVINO cannot read the model or its inputs/outputs differ from the
            metadata.
    """

    name = "openvino"
    device = "cpu"
    execution_provider = EXECUTION_PROVIDER
    #: 3.5 GiB: a whole pelvic network box in one window (e.g. 240 x 224 x 188 for a
    #: Pelvic-Ref case, estimated 3.0 GiB; two windows of 224 x 224 x 188 at 3 GiB cost 1 s
    #: more), process peak RSS 4.6-4.7 GiB (issue 11 bar: 6 GB).
    default_memory_budget_mb = 3584.0
    max_batch = 1

    def __init__(
        self,
        source: Path,
        meta: ModelMetadata,
        *,
        precision: str = "auto",
        threads: int | None = None,
        static_shapes: bool = True,
        cache_budget_mb: float = 3584.0,
        cache_dir: Path | None = None,
    ) -> None:
        super().__init__()
        self._core = _core()
        caps = [str(c) for c in self._core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]
        self.precision = resolve_precision(precision, caps)
        self.activation_live_fraction = LIVE_FRACTION[self.precision]
        self.meta = meta
        self.static_shapes = bool(static_shapes)
        self.cache_budget_mb = float(cache_budget_mb)
        self._config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": OV_PRECISIONS[self.precision],
            "PERFORMANCE_HINT": "LATENCY",
        }
        if threads is not None:
            self._config["INFERENCE_NUM_THREADS"] = int(threads)
        if cache_dir is not None:
            try:
                Path(cache_dir).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                log.warning("OpenVINO model cache %s not usable (%s): compiling", cache_dir, exc)
            else:
                self._core.set_property({"CACHE_DIR": str(cache_dir)})
        try:
            model = self._core.read_model(str(source))
        except Exception as exc:
            raise ModelNotReady(f"{source}: OpenVINO cannot load the model ({exc})") from exc
        inputs = [p.get_any_name() for p in model.inputs]
        outputs = {name for o in model.outputs for name in o.get_names()}
        if inputs != list(meta.inputs) or not set(meta.outputs) <= outputs:
            raise ModelNotReady(
                f"{source}: graph inputs {inputs} / outputs {sorted(outputs)} do not match "
                f"{METADATA_FILE} ({list(meta.inputs)} / {list(meta.outputs)})"
            )
        self._model = self._lean(model, meta.used_outputs)
        self._source = source
        self._compiled: OrderedDict[tuple[int, ...], tuple[Any, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self._dynamic: tuple[Any, Any] | None = None
        if not self.static_shapes:
            self._dynamic = self._compile(None)
        log.info("OpenVINO on the CPU, %s (capabilities: %s)", self.precision, ", ".join(caps))

    @staticmethod
    def _lean(model: Any, keep: Sequence[str]) -> Any:
        """The model with only the outputs the inference reads (others are never computed)."""
        import openvino as ov

        results = [r for r in model.get_results() if set(r.output(0).get_names()) & set(keep)]
        if len(results) == len(model.get_results()):
            return model
        return ov.Model(results, model.get_parameters(), model.get_friendly_name())

    def _compile(self, shape: tuple[int, ...] | None) -> tuple[Any, Any]:
        model = self._model
        if shape is not None:
            model = model.clone()
            model.reshape({p.get_any_name(): list(shape) for p in model.inputs})
        try:
            compiled = self._core.compile_model(model, "CPU", self._config)
        except Exception as exc:
            raise ModelNotReady(
                f"{self._source}: OpenVINO cannot compile the model for input shape {shape} ({exc})"
            ) from exc
        return compiled, compiled.create_infer_request()

    def _estimated_mb(self, shape: tuple[int, ...]) -> float:
        voxels = float(np.prod(shape))
        return voxels * self.meta.bytes_per_voxel * self.activation_live_fraction / 2**20

    def _request(self, shape: tuple[int, ...]) -> Any:
        """The infer request for an input shape, compiling (and caching) it when new."""
        if self._dynamic is not None:
            return self._dynamic[1]
        entry = self._compiled.get(shape)
        if entry is not None:
            self._compiled.move_to_end(shape)
            return entry[1]
        # drop least recently used shapes first, so their memory is free before compiling
        while self._compiled and (
            sum(self._estimated_mb(s) for s in self._compiled) + self._estimated_mb(shape)
            > self.cache_budget_mb
        ):
            self._compiled.popitem(last=False)
        t0 = time.perf_counter()
        entry = self._compile(shape)
        self._compile_s += time.perf_counter() - t0
        self._compiled[shape] = entry
        log.debug("OpenVINO compiled for input shape %s", shape)
        return entry[1]

    @property
    def cached_shapes(self) -> list[tuple[int, ...]]:
        """Input shapes ``(B, 1, n_z, n_y, n_x)`` with a compiled model, oldest first."""
        return list(self._compiled)

    def run(
        self, feed: Mapping[str, npt.NDArray[np.float32]], outputs: Sequence[str]
    ) -> dict[str, npt.NDArray[np.float32]]:
        """Run the compiled network once (see :meth:`Engine.run`).

        The outputs are copied out of the infer request's buffers before the lock is released
        (the next run, maybe another thread's, overwrites them).
        """
        shape = tuple(int(s) for s in next(iter(feed.values())).shape)
        with self._lock:
            request = self._request(shape)
            request.infer(dict(feed), share_inputs=True)
            return {
                name: np.array(request.get_tensor(name).data, dtype=np.float32, copy=True)
                for name in outputs
            }
