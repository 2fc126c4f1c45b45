"""Whole-scan network inference with ONNX Runtime (numpy + onnxruntime only, never torch).

A model folder ``models/<name>/<version>/`` holds ``model.onnx`` (the network only, written by
``model_export``) and ``metadata.json``; :func:`load_model` reads nothing else. The session runs
on CUDA when available (``device="auto"``; a logged warning when it falls back to the CPU) or on
the device asked for.

:meth:`OnnxModel.predict` follows METHOD.md, "Inference on a whole scan", with the tiling of
:mod:`jrs.tiling`: the 1 mm volumes are padded by 20 voxels per side (images with -1 = air after
the intensity transform, labels with 0) and cut into input windows of size ``n``; unless given, the
window is chosen from a memory budget (:meth:`OnnxModel.choose_window`). The high-level
segmentation logits and DVF of the windows are stitched into whole volumes; the pipeline then takes
the softmax / arg-max and warps the whole moving labels once.

By default (``align=True, seam_overlap=4``) the windows are aligned to multiples of 4 and overlap
by 4 output voxels, which keeps the stitched result equal to a single window covering the whole
volume (up to float rounding; tested); ``align=False, seam_overlap=0`` gives METHOD.md's plain
abutting windows, with their 4-voxel seams. :mod:`jrs.tiling` explains why.

Example::

    model = load_model("models/crossstitch/1", device="auto")
    pred = model.predict(fixed, moving, moving_labels, memory_budget_mb=2048)
    labels, dvf = pred.labels, pred.dvf          # (D, H, W) uint8, (3, D, H, W) voxels = mm
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from jrs.errors import InvalidInput, ModelNotReady
from jrs.tiling import (
    ALIGNMENT,
    MARGIN,
    MIN_WINDOW,
    SEAM_OVERLAP,
    check_window,
    plan_tiles,
    run_tiled,
)

log = logging.getLogger(__name__)

#: File names inside a model version folder.
MODEL_FILE = "model.onnx"
METADATA_FILE = "metadata.json"
#: ``format`` / ``format_version`` of ``metadata.json``.
METADATA_FORMAT = "jrs-onnx-model"
METADATA_VERSION = 1
#: Meaning of each network input (written to the metadata by the export).
INPUT_MEANINGS: dict[str, str] = {
    "fixed": "daily CT on the 1 mm grid, clip(HU, -1000, 1000) / 1000",
    "moving": "pre-aligned planning CT on the same grid, clip(HU, -1000, 1000) / 1000",
    "moving_labels": "pre-aligned planning label map on the same grid, ids 0..4 as float",
}
#: Padding value of each input outside the scan (air after the transform; background).
INPUT_PAD_VALUES: dict[str, float] = {"fixed": -1.0, "moving": -1.0, "moving_labels": 0.0}
#: Default memory budget of one network call (MiB).
DEFAULT_MEMORY_BUDGET_MB = 2048.0
#: Fraction of the summed activations (``activation_bytes_per_input_voxel``) that ONNX Runtime
#: keeps alive at its peak; its memory planner reuses buffers. Measured on the CPU provider for
#: the cross-stitch network (peak RSS increase of one run: 0.25 of the sum at n = 96, 0.33 at
#: n = 128); 0.4 keeps a margin. Not measured on CUDA (cuDNN workspaces come on top).
ACTIVATION_LIVE_FRACTION = 0.4
#: Fallback bytes per input voxel when the metadata lacks the figure (cross-stitch 16/32/64).
DEFAULT_BYTES_PER_VOXEL = 3000.0

Device = Literal["auto", "cpu", "cuda"]
CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"

__all__ = [
    "CPU_PROVIDER",
    "CUDA_PROVIDER",
    "DEFAULT_MEMORY_BUDGET_MB",
    "INPUT_MEANINGS",
    "INPUT_PAD_VALUES",
    "METADATA_FILE",
    "METADATA_FORMAT",
    "METADATA_VERSION",
    "MODEL_FILE",
    "SEAM_OVERLAP",
    "InferenceTimings",
    "ModelMetadata",
    "OnnxModel",
    "Prediction",
    "available_providers",
    "load_model",
    "read_metadata",
    "softmax",
]


def available_providers() -> list[str]:
    """ONNX Runtime execution providers of this installation (e.g. CUDA, CPU)."""
    import onnxruntime as ort

    return list(ort.get_available_providers())


def softmax(logits: npt.NDArray[np.floating[Any]], axis: int = 0) -> npt.NDArray[np.float32]:
    """Numerically stable softmax over ``axis`` (float32 out)."""
    x = np.asarray(logits, dtype=np.float32)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    e /= e.sum(axis=axis, keepdims=True)
    return e


# --------------------------------------------------------------------------- metadata
@dataclass(frozen=True)
class ModelMetadata:
    """The parts of ``metadata.json`` the inference relies on (all of it in :attr:`raw`).

    Attributes:
        name: Model name.
        version: Model version.
        inputs: Input names in graph order (among ``fixed``, ``moving``, ``moving_labels``).
        outputs: Output names (``seg_high`` and/or ``dvf_high``, maybe more levels).
        sha256: Hex digest of ``model.onnx``.
        bytes_per_voxel: Summed float32 activations per input voxel (memory estimate).
        labels: Label id -> organ key (0 background).
        raw: The whole parsed file.
    """

    name: str
    version: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    sha256: str
    bytes_per_voxel: float
    labels: dict[int, str]
    raw: dict[str, Any] = field(repr=False)

    @property
    def pad_values(self) -> tuple[float, ...]:
        """Padding value per input, in :attr:`inputs` order."""
        table = {i["name"]: float(i.get("pad_value", 0.0)) for i in self.raw["inputs"]}
        return tuple(table.get(n, INPUT_PAD_VALUES.get(n, 0.0)) for n in self.inputs)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = METADATA_FILE) -> ModelMetadata:
        """Validate a parsed ``metadata.json``.

        Raises:
            ModelNotReady: Naming ``source`` and the offending key.
        """
        if raw.get("format") != METADATA_FORMAT:
            raise ModelNotReady(
                f"{source}: 'format' is {raw.get('format')!r}, not {METADATA_FORMAT!r}"
            )
        if raw.get("format_version") != METADATA_VERSION:
            raise ModelNotReady(
                f"{source}: unsupported 'format_version' {raw.get('format_version')!r} "
                f"(this jrs reads {METADATA_VERSION})"
            )
        try:
            inputs = tuple(str(i["name"]) for i in raw["inputs"])
            outputs = tuple(str(o["name"]) for o in raw["outputs"])
            valid = raw["valid_sizes"]
            labels = {int(k): str(v) for k, v in raw["labels"].items()}
            meta = cls(
                name=str(raw["name"]),
                version=int(raw["version"]),
                inputs=inputs,
                outputs=outputs,
                sha256=str(raw["sha256"]),
                bytes_per_voxel=float(
                    (raw.get("memory") or {}).get(
                        "activation_bytes_per_input_voxel", DEFAULT_BYTES_PER_VOXEL
                    )
                ),
                labels=labels,
                raw=dict(raw),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelNotReady(f"{source}: missing or invalid entry {exc}") from exc
        bad = [n for n in inputs if n not in INPUT_MEANINGS]
        if not inputs or bad:
            raise ModelNotReady(f"{source}: invalid input names {list(inputs)}")
        if "dvf_high" not in outputs:
            raise ModelNotReady(
                f"{source}: outputs {list(outputs)} lack dvf_high (the pipeline needs the DVF; "
                "seg_high is optional)"
            )
        geometry = (valid.get("multiple_of"), valid.get("minimum"), valid.get("high_output_offset"))
        if geometry != (4, MIN_WINDOW, MARGIN):
            raise ModelNotReady(
                f"{source}: valid sizes (multiple_of, minimum, offset) = {geometry}; this jrs "
                f"tiles networks with (4, {MIN_WINDOW}, {MARGIN})"
            )
        if meta.bytes_per_voxel <= 0:
            raise ModelNotReady(f"{source}: non-positive activation_bytes_per_input_voxel")
        return meta


def read_metadata(model_dir: str | Path) -> ModelMetadata:
    """Read and validate ``model_dir/metadata.json``.

    Raises:
        ModelNotReady: When the file is missing, not JSON or invalid (the message names it).
    """
    path = Path(model_dir) / METADATA_FILE
    if not path.is_file():
        raise ModelNotReady(f"{path}: model metadata not found (expected {METADATA_FILE} there)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelNotReady(f"{path}: unreadable model metadata ({exc})") from exc
    if not isinstance(raw, dict):
        raise ModelNotReady(f"{path}: model metadata must be a JSON object")
    return ModelMetadata.from_dict(raw, str(path))


# --------------------------------------------------------------------------- results
@dataclass
class InferenceTimings:
    """Timings of one :meth:`OnnxModel.predict` call.

    Attributes:
        session_s: Time inside ``InferenceSession.run`` summed over the batches (the bare ONNX
            Runtime time for these tiles).
        total_s: Whole call: validation, padding, tile extraction, runs, stitching.
        tiles: Number of windows.
        batches: Number of session runs.
        window: Input window per axis ``(n_z, n_y, n_x)``.
        batch_size: Windows per run.
        estimated_memory_mb: Activation memory estimate of one run.
        provider: Execution provider that ran the session.
    """

    session_s: float = 0.0
    total_s: float = 0.0
    tiles: int = 0
    batches: int = 0
    window: tuple[int, int, int] = (0, 0, 0)
    batch_size: int = 1
    estimated_memory_mb: float = 0.0
    provider: str = ""

    @property
    def overhead_ratio(self) -> float:
        """``total_s / session_s`` (1.0 = no overhead beyond ONNX Runtime)."""
        return self.total_s / self.session_s if self.session_s > 0 else math.inf

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form (for ``qa.json`` and service metrics)."""
        return {
            "session_s": self.session_s,
            "total_s": self.total_s,
            "overhead_ratio": self.overhead_ratio,
            "tiles": self.tiles,
            "batches": self.batches,
            "window": list(self.window),
            "batch_size": self.batch_size,
            "estimated_memory_mb": self.estimated_memory_mb,
            "provider": self.provider,
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
        """``(D, H, W)`` arg-max label map (uint8 ids 0..4)."""
        if self.seg_logits is None:
            raise InvalidInput("the model has no segmentation output")
        return np.argmax(self.seg_logits, axis=0).astype(np.uint8)


# --------------------------------------------------------------------------- model
class OnnxModel:
    """A loaded model: ONNX Runtime session + metadata. Build it with :func:`load_model`.

    Attributes:
        spec: The validated metadata (:attr:`metadata` is the raw dict).

    Args:
        model_dir: The version folder.
        spec: Its validated metadata.
        session: The ONNX Runtime session.
        device: The device asked for (``auto``, ``cpu``, ``cuda``).
    """

    def __init__(self, model_dir: Path, spec: ModelMetadata, session: Any, device: str) -> None:
        self.model_dir = model_dir
        self.spec = spec
        self.session = session
        self.device = device
        #: The whole ``metadata.json`` (name, version, sha256, git_sha, path_choice, ...).
        self.metadata: dict[str, Any] = spec.raw
        self._outputs = [o for o in ("seg_high", "dvf_high") if o in spec.outputs]

    @property
    def providers(self) -> list[str]:
        """Execution providers of the session, in priority order."""
        return list(self.session.get_providers())

    @property
    def execution_provider(self) -> str:
        """The provider that runs the network (``CUDAExecutionProvider`` or the CPU one)."""
        return self.providers[0]

    @property
    def on_gpu(self) -> bool:
        """Whether the session runs on CUDA."""
        return self.execution_provider == CUDA_PROVIDER

    def info(self) -> dict[str, Any]:
        """Name, version, sha256 and providers (for logs, ``qa.json`` and metrics)."""
        return {
            "name": self.spec.name,
            "version": self.spec.version,
            "sha256": self.spec.sha256,
            "path": str(self.model_dir),
            "device": self.device,
            "execution_provider": self.execution_provider,
            "providers": self.providers,
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
        got = self.session.run(self._outputs, feed)
        return dict(zip(self._outputs, got, strict=True))

    # ------------------------------------------------------------ memory
    def estimate_memory_mb(self, window: Sequence[int], batch_size: int = 1) -> float:
        """Estimated peak activation memory of one run (MiB).

        ``batch * n_z * n_y * n_x * activation_bytes_per_input_voxel * live fraction`` plus the
        input and output windows; the stitched volumes are not included.

        Args:
            window: Input window per axis.
            batch_size: Windows per run.
        """
        voxels = float(np.prod([int(w) for w in window])) * batch_size
        inputs = voxels * 4 * len(self.spec.inputs)
        acts = voxels * self.spec.bytes_per_voxel * ACTIVATION_LIVE_FRACTION
        return (acts + inputs) / 2**20

    def choose_window(
        self,
        shape: Sequence[int],
        memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
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
            memory_budget_mb: Budget of one run (MiB).
            seam_overlap: As in :meth:`predict`.
            align: As in :meth:`predict`.

        Returns:
            The requested window ``n`` (per-axis windows follow :func:`jrs.tiling.plan_tiles`).
        """
        alignment = ALIGNMENT if align else 1
        cap = max(MIN_WINDOW + 4, *(-(-(int(s) + 2 * MARGIN) // 4) * 4 for s in shape))
        best, best_cost = MIN_WINDOW + 4, math.inf
        for n in range(MIN_WINDOW + 4, cap + 1, 4):
            plan = plan_tiles(shape, n, seam_overlap, alignment)
            if self.estimate_memory_mb(plan.window) > memory_budget_mb:
                continue
            cost = len(plan) * (float(np.prod(plan.window)) + MIN_WINDOW**3)
            if cost <= best_cost:
                best, best_cost = n, cost
        if math.isinf(best_cost):
            log.warning(
                "memory budget %.0f MiB is below the estimate %.0f MiB of the smallest window; "
                "using window %d",
                memory_budget_mb,
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
        memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
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
            memory_budget_mb: Activation memory budget of one run (MiB); sets the window when
                ``window`` is ``None`` and the batch size when ``batch_size`` is ``None``.
            batch_size: Windows per run; by default as many as fit the budget, at most 8 on CUDA
                and 1 on the CPU (where batching brings no speed).
            align: Pad each axis to a multiple of 4 first so that every window sits on the same
                sampling phase (``alignment=4`` of :func:`jrs.tiling.plan_tiles`).
            seam_overlap: Voxels by which consecutive windows' high-level outputs overlap, so
                that the last 4 of each window (touched by the stride-2 blocks' end padding) are
                overwritten by the next window. ``align=False, seam_overlap=0`` gives METHOD.md's
                plain abutting windows (:mod:`jrs.tiling` explains the deviation).
            progress: Called with ``(windows done, windows in total)`` after each run.

        Returns:
            The stitched prediction on the input grid, with timings.

        Raises:
            InvalidInput: For missing, mis-shaped or non-finite inputs, or an invalid window.
        """
        t0 = time.perf_counter()
        volume = self._stack_inputs(fixed, moving, moving_labels)
        alignment = ALIGNMENT if align else 1
        if window is None:
            window = self.choose_window(volume.shape[1:], memory_budget_mb, seam_overlap, align)
        check_window(window)
        plan = plan_tiles(volume.shape[1:], window, seam_overlap, alignment)
        one = self.estimate_memory_mb(plan.window)
        if batch_size is None:
            cap = 8 if self.on_gpu else 1
            batch_size = max(1, min(cap, len(plan), int(memory_budget_mb // max(one, 1e-9))))
        if int(batch_size) < 1:
            raise InvalidInput(f"batch_size must be >= 1, got {batch_size}")
        timings = InferenceTimings(
            tiles=len(plan),
            window=plan.window,
            batch_size=int(batch_size),
            estimated_memory_mb=one * int(batch_size),
            provider=self.execution_provider,
        )
        stitched = run_tiled(
            volume,
            plan,
            self._timed_runner(timings),
            fill=self.spec.pad_values,
            batch_size=int(batch_size),
            progress=progress,
        )
        seg = stitched.get("seg_high")
        pred = Prediction(
            seg_logits=np.ascontiguousarray(seg) if seg is not None else None,
            dvf=np.ascontiguousarray(stitched["dvf_high"]),
            timings=timings,
        )
        timings.total_s = time.perf_counter() - t0
        return pred

    def _timed_runner(
        self, timings: InferenceTimings
    ) -> Callable[[npt.NDArray[Any]], dict[str, npt.NDArray[Any]]]:
        """A :func:`jrs.tiling.run_tiled` predictor running the session on stacked windows.

        Args:
            timings: Receives the session time and the number of runs.

        Returns:
            Maps ``(B, C_in, n_z, n_y, n_x)`` windows to the session's named outputs.
        """
        names = self.spec.inputs

        def runner(batch: npt.NDArray[Any]) -> dict[str, npt.NDArray[Any]]:
            feed = {n: np.ascontiguousarray(batch[:, c : c + 1]) for c, n in enumerate(names)}
            ts = time.perf_counter()
            got = self.session.run(self._outputs, feed)
            timings.session_s += time.perf_counter() - ts
            timings.batches += 1
            return dict(zip(self._outputs, got, strict=True))

        return runner


# --------------------------------------------------------------------------- loading
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


def _session_providers(device: str) -> list[Any]:
    kind, index = parse_device(device)
    available = available_providers()
    cuda: Any = CUDA_PROVIDER if index is None else (CUDA_PROVIDER, {"device_id": index})
    if kind == "cpu":
        return [CPU_PROVIDER]
    if kind == "cuda":
        if CUDA_PROVIDER not in available:
            raise ModelNotReady(
                f"device {device!r} requested but ONNX Runtime has no {CUDA_PROVIDER} "
                f"(available providers: {', '.join(available)}); install onnxruntime-gpu with a "
                "CUDA GPU, or use --device auto or cpu"
            )
        return [cuda, CPU_PROVIDER]
    if CUDA_PROVIDER in available:
        return [cuda, CPU_PROVIDER]
    log.warning(
        "device auto: %s not available (providers: %s); running on the CPU",
        CUDA_PROVIDER,
        ", ".join(available),
    )
    return [CPU_PROVIDER]


def load_model(
    model_dir: str | Path,
    device: Device | str = "auto",
    *,
    intra_op_threads: int | None = None,
    inter_op_threads: int | None = None,
    verify_sha256: bool = True,
) -> OnnxModel:
    """Load a model version folder into an ONNX Runtime session.

    Args:
        model_dir: ``models/<name>/<version>`` holding ``model.onnx`` and ``metadata.json``.
        device: ``auto`` (CUDA, else the CPU with a logged warning), ``cpu``, ``cuda`` or
            ``cuda:N`` (CUDA device N).
        intra_op_threads: Threads inside one operator (``None``: ONNX Runtime's default, all
            physical cores).
        inter_op_threads: Threads across operators (``None``: default).
        verify_sha256: Check ``model.onnx`` against the digest in the metadata.

    Returns:
        The loaded model.

    Raises:
        ModelNotReady: When a file is missing, corrupt or inconsistent (the message names it),
            or ``cuda`` is asked for and unavailable (the message lists the providers).
        InvalidInput: For an unknown device name.
    """
    import onnxruntime as ort

    folder = Path(model_dir)
    if not folder.is_dir():
        raise ModelNotReady(f"{folder}: model folder not found")
    meta = read_metadata(folder)
    onnx_path = folder / str(meta.raw.get("model_file", MODEL_FILE))
    if not onnx_path.is_file():
        raise ModelNotReady(f"{onnx_path}: model file not found")
    data = onnx_path.read_bytes()
    if verify_sha256 and hashlib.sha256(data).hexdigest() != meta.sha256:
        raise ModelNotReady(
            f"{onnx_path}: sha256 does not match {folder / METADATA_FILE} (corrupt or replaced "
            "model file; re-export the model)"
        )
    providers = _session_providers(str(device))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads is not None:
        options.intra_op_num_threads = int(intra_op_threads)
    if inter_op_threads is not None:
        options.inter_op_num_threads = int(inter_op_threads)
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(data, sess_options=options, providers=providers)
    except Exception as exc:
        raise ModelNotReady(f"{onnx_path}: ONNX Runtime cannot load the model ({exc})") from exc
    graph_inputs = [i.name for i in session.get_inputs()]
    graph_outputs = {o.name for o in session.get_outputs()}
    if graph_inputs != list(meta.inputs) or not set(meta.outputs) <= graph_outputs:
        raise ModelNotReady(
            f"{onnx_path}: graph inputs {graph_inputs} / outputs {sorted(graph_outputs)} do not "
            f"match {METADATA_FILE} ({list(meta.inputs)} / {list(meta.outputs)})"
        )
    active = session.get_providers()
    asked = [p if isinstance(p, str) else p[0] for p in providers]
    if CUDA_PROVIDER in asked and CUDA_PROVIDER not in active:
        if parse_device(str(device))[0] == "cuda":
            raise ModelNotReady(
                f"{onnx_path}: {CUDA_PROVIDER} failed to start (active providers: {active})"
            )
        log.warning("device auto: %s failed to start; running on the CPU", CUDA_PROVIDER)
    model = OnnxModel(folder, meta, session, str(device))
    log.info(
        "loaded model %s v%s from %s on %s",
        meta.name,
        meta.version,
        folder,
        model.execution_provider,
    )
    return model
