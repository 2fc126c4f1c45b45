"""A loaded model: metadata + an engine, and whole-scan tiled prediction on top of it.

:meth:`Model.predict` follows METHOD.md, "Inference on a whole scan", with the tiling of
:mod:`jrs.inference.tiling`: the 1 mm volumes are padded by 20 voxels per side (images with -1 = air
after the intensity transform, labels with 0) and cut into input windows of size ``n``; unless
given, the window is chosen from a memory budget (:meth:`Model.choose_window`). The high-level
segmentation logits and DVF of the windows are stitched into whole volumes; the pipeline then takes
the arg-max and warps the whole moving labels once.

By default (``align=True, seam_overlap=4``) the windows are aligned to multiples of 4 and overlap
by 4 output voxels, which keeps the stitched result equal to a single window covering the whole
volume (up to float rounding; tested); ``align=False, seam_overlap=0`` gives METHOD.md's plain
abutting windows, with their 4-voxel seams. :mod:`jrs.inference.tiling` explains why.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from jrs.core.errors import InvalidInput
from jrs.inference.engine import Engine
from jrs.inference.metadata import ModelMetadata
from jrs.inference.tiling import (
    ALIGNMENT,
    MARGIN,
    MIN_WINDOW,
    SEAM_OVERLAP,
    check_window,
    plan_tiles,
    run_tiled,
)

log = logging.getLogger("jrs.inference")

#: Default memory budget of one network call (MiB) of the ONNX Runtime engines; each engine
#: carries its own (:attr:`Engine.default_memory_budget_mb`).
DEFAULT_MEMORY_BUDGET_MB = 2048.0

__all__ = [
    "DEFAULT_MEMORY_BUDGET_MB",
    "InferenceTimings",
    "Model",
    "Prediction",
    "softmax",
]


def softmax(logits: npt.NDArray[np.floating[Any]], axis: int = 0) -> npt.NDArray[np.float32]:
    """Numerically stable softmax over ``axis`` (float32 out)."""
    x = np.asarray(logits, dtype=np.float32)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    e /= e.sum(axis=axis, keepdims=True)
    return e


@dataclass
class InferenceTimings:
    """Timings of one :meth:`Model.predict` call.

    Attributes:
        session_s: Time inside the engine's runs summed over the batches (the bare runtime time
            for these tiles, compilation for new shapes excluded).
        compile_s: Time compiling the network for new window shapes during the call (OpenVINO).
        total_s: Whole call: validation, padding, tile extraction, compilation, runs, stitching.
        tiles: Number of windows.
        batches: Number of runs.
        window: Input window per axis ``(n_z, n_y, n_x)``.
        batch_size: Windows per run.
        estimated_memory_mb: Activation memory estimate of one run.
        provider: What ran the network (execution provider, or ``OpenVINO:CPU``).
        engine: ``onnxruntime`` or ``openvino``.
        precision: ``fp32``, ``bf16`` or ``fp16``.
    """

    session_s: float = 0.0
    compile_s: float = 0.0
    total_s: float = 0.0
    tiles: int = 0
    batches: int = 0
    window: tuple[int, int, int] = (0, 0, 0)
    batch_size: int = 1
    estimated_memory_mb: float = 0.0
    provider: str = ""
    engine: str = ""
    precision: str = ""

    @property
    def overhead_ratio(self) -> float:
        """``total_s / session_s`` (1.0 = no overhead beyond the runtime)."""
        return self.total_s / self.session_s if self.session_s > 0 else math.inf

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form (for ``qa.json`` and service metrics)."""
        return {
            "session_s": self.session_s,
            "compile_s": self.compile_s,
            "total_s": self.total_s,
            "overhead_ratio": self.overhead_ratio,
            "tiles": self.tiles,
            "batches": self.batches,
            "window": list(self.window),
            "batch_size": self.batch_size,
            "estimated_memory_mb": self.estimated_memory_mb,
            "provider": self.provider,
            "engine": self.engine,
            "precision": self.precision,
        }


@dataclass
class Prediction:
    """Stitched network outputs on the 1 mm input grid.

    Attributes:
        seg_logits: ``(5, D, H, W)`` float32 logits for labels 0..4, or ``None`` when the model
            has no segmentation output.
        dvf: ``(3, D, H, W)`` float32 pull displacement, channels (x, y, z) = (W, H, D) array
            axes, in voxels of the 1 mm grid (= mm).
        timings: Where the time went.
    """

    seg_logits: npt.NDArray[np.float32] | None
    dvf: npt.NDArray[np.float32]
    timings: InferenceTimings

    @cached_property
    def probabilities(self) -> npt.NDArray[np.float32]:
        """``(5, D, H, W)`` softmax of :attr:`seg_logits` (float32)."""
        if self.seg_logits is None:
            raise InvalidInput("the model has no segmentation output")
        return softmax(self.seg_logits, axis=0)

    @property
    def seg_probs(self) -> npt.NDArray[np.float32] | None:
        """``(5, D, H, W)`` class probabilities, or ``None`` without a segmentation output."""
        return None if self.seg_logits is None else self.probabilities

    @cached_property
    def labels(self) -> npt.NDArray[np.uint8]:
        """``(D, H, W)`` arg-max label map (uint8 ids 0..4; the arg-max of the logits, no softmax).

        Raises:
            InvalidInput: When the model has no segmentation output.
        """
        if self.seg_logits is None:
            raise InvalidInput("the model has no segmentation output")
        return np.argmax(self.seg_logits, axis=0).astype(np.uint8)


class Model:
    """A loaded model: an engine + metadata. Build it with :func:`jrs.inference.load_model`.

    Attributes:
        model_dir: The version folder.
        spec: The validated metadata (:attr:`metadata` is the raw dict).
        engine: What runs the network.
        device: The device asked for (``auto``, ``cpu``, ``cuda``, ``cuda:N``).

    Args:
        model_dir: The version folder.
        spec: Its validated metadata.
        engine: The compiled network.
        device: The device asked for.
    """

    def __init__(self, model_dir: Path, spec: ModelMetadata, engine: Engine, device: str) -> None:
        self.model_dir = model_dir
        self.spec = spec
        self.engine = engine
        self.device = device
        #: The whole ``metadata.json`` (name, version, sha256, git_sha, path_choice, ...).
        self.metadata: dict[str, Any] = spec.raw
        self._outputs = list(spec.used_outputs)

    # ------------------------------------------------------------ what runs it
    @property
    def session(self) -> Any:
        """The ONNX Runtime session of an ONNX Runtime engine (``None`` for OpenVINO)."""
        return getattr(self.engine, "session", None)

    @property
    def providers(self) -> list[str]:
        """Execution providers of the engine, in priority order."""
        return self.engine.providers

    @property
    def execution_provider(self) -> str:
        """What runs the network: an execution provider's name, or ``OpenVINO:CPU``."""
        return self.engine.execution_provider

    @property
    def engine_name(self) -> str:
        """``onnxruntime`` or ``openvino``."""
        return self.engine.name

    @property
    def precision(self) -> str:
        """``fp32``, ``bf16`` or ``fp16``."""
        return self.engine.precision

    @property
    def on_gpu(self) -> bool:
        """Whether the network runs on a GPU."""
        return self.engine.on_gpu

    def info(self) -> dict[str, Any]:
        """Name, version, sha256, engine, device, precision, providers (logs, qa.json, metrics).

        ``device`` is where the network runs (``cpu``, ``cuda:N``); ``device_requested`` what
        was asked for (``auto`` may have fallen back to the CPU).
        """
        return {
            "name": self.spec.name,
            "version": self.spec.version,
            "sha256": self.spec.sha256,
            "path": str(self.model_dir),
            "device_requested": self.device,
            **self.engine.info(),
        }

    # ------------------------------------------------------------ raw runs
    def run(self, batch: Mapping[str, npt.NDArray[np.float32]]) -> dict[str, npt.NDArray[Any]]:
        """Run the bare network on one batch of windows.

        Args:
            batch: Input name -> ``(B, 1, n_z, n_y, n_x)`` float32 (every axis valid).

        Returns:
            Output name -> ``(B, C, n_z - 40, n_y - 40, n_x - 40)`` for the high level.
        """
        feed = {n: np.ascontiguousarray(batch[n], dtype=np.float32) for n in self.spec.inputs}
        return self.engine.run(feed, self._outputs)

    # ------------------------------------------------------------ memory
    @property
    def default_memory_budget_mb(self) -> float:
        """The engine's default memory budget of one run (MiB)."""
        return float(self.engine.default_memory_budget_mb)

    def estimate_memory_mb(self, window: Sequence[int], batch_size: int = 1) -> float:
        """Estimated peak activation memory of one run (MiB).

        ``batch * n_z * n_y * n_x * activation_bytes_per_input_voxel * live fraction`` (the
        engine's) plus the input and output windows; the stitched volumes are not included.

        Args:
            window: Input window per axis.
            batch_size: Windows per run.
        """
        voxels = float(np.prod([int(w) for w in window])) * batch_size
        inputs = voxels * 4 * len(self.spec.inputs)
        acts = voxels * self.spec.bytes_per_voxel * self.engine.activation_live_fraction
        return (acts + inputs) / 2**20

    def choose_window(
        self,
        shape: Sequence[int],
        memory_budget_mb: float | None = None,
        seam_overlap: int = SEAM_OVERLAP,
        align: bool = True,
    ) -> int:
        """The window with the least network work among those that fit the memory budget.

        Every valid ``n`` from 48 up to the one covering the volume in one window per axis whose
        estimated run memory fits the budget is considered; the one with the fewest input voxels
        processed in total (windows x window volume, plus a fixed per-run cost of a 44^3 window)
        wins, ties going to the larger window. This is the largest fitting window unless a
        slightly smaller one tiles the volume with less overlap. When even a 48 window exceeds
        the budget it is used anyway, with a warning.

        Args:
            shape: ``(D, H, W)`` of the volume.
            memory_budget_mb: Budget of one run (MiB; ``None``: the engine's default).
            seam_overlap: As in :meth:`predict`.
            align: As in :meth:`predict`.

        Returns:
            The requested window ``n`` (per-axis windows follow
            :func:`jrs.inference.tiling.plan_tiles`).
        """
        budget = self.default_memory_budget_mb if memory_budget_mb is None else memory_budget_mb
        alignment = ALIGNMENT if align else 1
        cap = max(MIN_WINDOW + 4, *(-(-(int(s) + 2 * MARGIN) // 4) * 4 for s in shape))
        best, best_cost = MIN_WINDOW + 4, math.inf
        for n in range(MIN_WINDOW + 4, cap + 1, 4):
            plan = plan_tiles(shape, n, seam_overlap, alignment)
            if self.estimate_memory_mb(plan.window) > budget:
                continue
            cost = len(plan) * (float(np.prod(plan.window)) + MIN_WINDOW**3)
            if cost <= best_cost:
                best, best_cost = n, cost
        if math.isinf(best_cost):
            log.warning(
                "memory budget %.0f MiB is below the estimate %.0f MiB of the smallest window; "
                "using window %d",
                budget,
                self.estimate_memory_mb(plan_tiles(shape, best, seam_overlap, alignment).window),
                best,
            )
        return best

    # ------------------------------------------------------------ whole scans
    def _stack_inputs(
        self,
        fixed: npt.ArrayLike,
        moving: npt.ArrayLike | None,
        moving_labels: npt.ArrayLike | None,
    ) -> npt.NDArray[np.float32]:
        given = {"fixed": fixed, "moving": moving, "moving_labels": moving_labels}
        arrays = []
        shape: tuple[int, ...] | None = None
        for name in self.spec.inputs:
            value = given[name]
            if value is None:
                raise InvalidInput(
                    f"model {self.spec.name} needs input {name!r} "
                    f"(inputs: {list(self.spec.inputs)})"
                )
            arr = np.asarray(value)
            if arr.ndim != 3 or min(arr.shape) < 1:
                raise InvalidInput(f"{name} must be a (D, H, W) volume, got shape {arr.shape}")
            if shape is not None and arr.shape != shape:
                raise InvalidInput(f"{name} has shape {arr.shape}, expected {shape} as fixed")
            shape = arr.shape
            arr = arr.astype(np.float32, copy=False)
            if not np.isfinite(arr).all():
                raise InvalidInput(f"{name} contains NaN or infinite values")
            arrays.append(arr)
        return np.stack(arrays)

    def predict(
        self,
        fixed: npt.ArrayLike,
        moving: npt.ArrayLike | None = None,
        moving_labels: npt.ArrayLike | None = None,
        *,
        window: int | None = None,
        memory_budget_mb: float | None = None,
        batch_size: int | None = None,
        align: bool = True,
        seam_overlap: int = SEAM_OVERLAP,
        progress: Callable[[int, int], None] | None = None,
    ) -> Prediction:
        """Tiled whole-scan inference (METHOD.md, "Inference on a whole scan").

        Args:
            fixed: Daily CT ``(D, H, W)`` on the 1 mm grid, already ``clip(HU) / 1000``.
            moving: Pre-aligned planning CT ``(D, H, W)``, same grid and transform.
            moving_labels: Pre-aligned planning labels ``(D, H, W)``, ids 0..4 (any dtype).
            window: Input window ``n`` (a multiple of 4, ``>= 44``); chosen from
                ``memory_budget_mb`` when ``None``.
            memory_budget_mb: Activation memory budget of one run (MiB; ``None``: the engine's
                default); sets the window when ``window`` is ``None`` and the batch size when
                ``batch_size`` is ``None``.
            batch_size: Windows per run; by default as many as fit the budget, at most the
                engine's ``max_batch`` (8 on CUDA, 1 on CPUs, where batching brings no speed).
            align: Pad each axis to a multiple of 4 first so that every window sits on the same
                sampling phase (``alignment=4`` of :func:`jrs.inference.tiling.plan_tiles`).
            seam_overlap: Voxels by which consecutive windows' high-level outputs overlap, so
                that the last 4 of each window (touched by the stride-2 blocks' end padding) are
                overwritten by the next window. ``align=False, seam_overlap=0`` gives METHOD.md's
                plain abutting windows (:mod:`jrs.inference.tiling` explains the deviation).
            progress: Called with ``(windows done, windows in total)`` after each run.

        Returns:
            The stitched prediction on the input grid, with timings.

        Raises:
            InvalidInput: For missing, mis-shaped or non-finite inputs, or an invalid window.
        """
        t0 = time.perf_counter()
        budget = self.default_memory_budget_mb if memory_budget_mb is None else memory_budget_mb
        volume = self._stack_inputs(fixed, moving, moving_labels)
        alignment = ALIGNMENT if align else 1
        if window is None:
            window = self.choose_window(volume.shape[1:], budget, seam_overlap, align)
        check_window(window)
        plan = plan_tiles(volume.shape[1:], window, seam_overlap, alignment)
        one = self.estimate_memory_mb(plan.window)
        if batch_size is None:
            cap = max(1, int(self.engine.max_batch))
            batch_size = max(1, min(cap, len(plan), int(budget // max(one, 1e-9))))
        if int(batch_size) < 1:
            raise InvalidInput(f"batch_size must be >= 1, got {batch_size}")
        timings = InferenceTimings(
            tiles=len(plan),
            window=plan.window,
            batch_size=int(batch_size),
            estimated_memory_mb=one * int(batch_size),
            provider=self.execution_provider,
            engine=self.engine.name,
            precision=self.engine.precision,
        )
        self.engine.take_compile_seconds()
        stitched = run_tiled(
            volume,
            plan,
            self._timed_runner(timings),
            fill=self.spec.pad_values,
            batch_size=int(batch_size),
            progress=progress,
        )
        del volume
        seg = stitched.get("seg_high")
        # views of the outputs (a single window's are cropped views): the consumers reorder or
        # reduce them anyway, a contiguous copy here would only cost time (0.3 s per 10 M voxels)
        pred = Prediction(seg_logits=seg, dvf=stitched["dvf_high"], timings=timings)
        timings.total_s = time.perf_counter() - t0
        return pred

    def _timed_runner(
        self, timings: InferenceTimings
    ) -> Callable[[npt.NDArray[Any]], dict[str, npt.NDArray[Any]]]:
        """A :func:`jrs.inference.tiling.run_tiled` predictor running the engine on stacked windows.

        Args:
            timings: Receives the run and compile times and the number of runs.

        Returns:
            Maps ``(B, C_in, n_z, n_y, n_x)`` windows to the engine's named outputs.
        """
        names = self.spec.inputs

        def runner(batch: npt.NDArray[Any]) -> dict[str, npt.NDArray[Any]]:
            feed = {
                n: np.ascontiguousarray(batch[:, c : c + 1], dtype=np.float32)
                for c, n in enumerate(names)
            }
            ts = time.perf_counter()
            got = self.engine.run(feed, self._outputs)
            elapsed = time.perf_counter() - ts
            compiled = self.engine.take_compile_seconds()
            timings.compile_s += compiled
            timings.session_s += elapsed - compiled
            timings.batches += 1
            return got

        return runner


#: The name of :class:`Model` before there were several engines.
OnnxModel = Model
