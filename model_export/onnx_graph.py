"""The network as an ONNX graph: export (dynamo, else the legacy exporter), checks, parity, memory.

The graph takes the network's three inputs and gives its outputs at the chosen levels, with
dynamic spatial axes and no GridSample; `parity_check` compares ONNX Runtime with PyTorch on
random inputs of two sizes.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from jrs.core.errors import InvalidInput, JrsError
from jrs.core.labels import LABELS
from jrs.inference.tiling import MIN_WINDOW, check_window

log = logging.getLogger(__name__)


#: ONNX opset of the exported graph.
OPSET = 20


#: Largest accepted max |ONNX - PyTorch| on the parity inputs.
PARITY_TOLERANCE = 1e-4


#: Default parity input sizes ``(D, H, W)``: a cube and a non-cubic volume (both valid).
PARITY_SIZES: tuple[tuple[int, int, int], ...] = ((48, 48, 48), (64, 56, 52))


#: Input size at which the activation memory per input voxel is measured.
MEMORY_PROBE_SIZE = 96


class ExportError(JrsError):
    """The export failed or the exported graph disagrees with PyTorch."""

    code = "export_failed"


@dataclass
class ParityReport:
    """ONNX Runtime vs PyTorch on random inputs.

    Attributes:
        sizes: Input sizes ``(D, H, W)`` checked.
        max_abs_diff: Per size (``"DxHxW"``) and output name, max |ONNX - PyTorch|.
        max_abs_ref: Per size and output, max |PyTorch| (scale of the figures above).
        tolerance: The accepted maximum.
    """

    sizes: list[tuple[int, int, int]]
    max_abs_diff: dict[str, dict[str, float]] = field(default_factory=dict)
    max_abs_ref: dict[str, dict[str, float]] = field(default_factory=dict)
    tolerance: float = PARITY_TOLERANCE

    @property
    def worst(self) -> float:
        """Largest difference over every size and output."""
        return max((v for d in self.max_abs_diff.values() for v in d.values()), default=0.0)

    @property
    def passed(self) -> bool:
        """Whether every difference is within the tolerance."""
        return self.worst <= self.tolerance

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form for ``metadata.json``."""
        return {
            "sizes": [list(s) for s in self.sizes],
            "max_abs_diff": self.max_abs_diff,
            "max_abs_reference": self.max_abs_ref,
            "worst": self.worst,
            "tolerance": self.tolerance,
            "runtime": "onnxruntime CPUExecutionProvider",
        }


class NetworkGraph(nn.Module):
    """The exported wrapper: named tensors in, a tuple of chosen outputs out (eval mode)."""

    def __init__(self, net: nn.Module, inputs: Sequence[str], outputs: Sequence[str]) -> None:
        super().__init__()
        self.net = net
        self.input_names = tuple(inputs)
        self.output_names = tuple(outputs)

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(B, 1, D, H, W)`` tensors in :attr:`input_names` order -> chosen outputs."""
        flat = self.net(dict(zip(self.input_names, xs, strict=True))).flat()
        return tuple(flat[name] for name in self.output_names)


# --------------------------------------------------------------------------- helpers
def network_io(net: nn.Module, levels: Sequence[str]) -> tuple[list[str], list[str]]:
    """The network's input names and its output names at ``levels`` (from a small forward pass).

    Raises:
        InvalidInput: no declared inputs, or no output at the levels asked for.
    """
    inputs = list(getattr(net, "inputs", ()))
    if not inputs:
        raise InvalidInput(f"{type(net).__name__} declares no input names (attribute 'inputs')")
    size = (1, 1, MIN_WINDOW, MIN_WINDOW, MIN_WINDOW)
    with torch.no_grad():
        names = list(net(*random_inputs(inputs, size, seed=0)).flat())
    outputs = [n for n in names if n.rsplit("_", 1)[-1] in levels]
    if not outputs:
        raise InvalidInput(f"network outputs {names} hold none of the levels {list(levels)}")
    return inputs, outputs


def random_inputs(
    names: Sequence[str], shape: tuple[int, ...], seed: int
) -> tuple[torch.Tensor, ...]:
    """Random network inputs: images ~ U(-1, 1) (HU / 1000), labels random ids 0..4 as float."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for name in names:
        if name == "moving_labels":
            out.append(torch.randint(0, len(LABELS) + 1, shape, generator=gen).float())
        else:
            out.append(torch.rand(shape, generator=gen) * 2.0 - 1.0)
    return tuple(out)


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Silence the exporters' chatter (deprecation, tracer and torchvision notices)."""
    names = ("torch.onnx", "torch.export", "torch._export", "onnxscript", "onnx_ir")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            for lg in loggers:
                lg.setLevel(logging.ERROR)
            yield
        finally:
            for lg, lv in zip(loggers, levels, strict=True):
                lg.setLevel(lv)


def _export_dynamo(graph: NetworkGraph, example: tuple[torch.Tensor, ...], path: Path) -> None:
    # Dim.AUTO lets torch.export derive the size guards (multiple of 4, >= 44, equal across
    # inputs); Dim.DYNAMIC would make the strict trace fail on them and the exporter fall back to
    # slow draft exports.
    auto = torch.export.Dim.AUTO
    # one entry per forward parameter: the single varargs tuple ``*xs``
    dyn = (tuple({0: auto, 2: auto, 3: auto, 4: auto} for _ in example),)
    program = torch.onnx.export(
        graph,
        example,
        dynamo=True,
        dynamic_shapes=dyn,
        input_names=list(graph.input_names),
        output_names=list(graph.output_names),
        opset_version=OPSET,
        optimize=True,
        verbose=False,
        report=False,
    )
    if program is None:  # pragma: no cover - torch returns the program for dynamo=True
        raise ExportError("torch.onnx.export(dynamo=True) returned no program")
    program.save(str(path))


def _export_legacy(graph: NetworkGraph, example: tuple[torch.Tensor, ...], path: Path) -> None:
    axes = {0: "batch", 2: "depth", 3: "height", 4: "width"}
    names = [*graph.input_names, *graph.output_names]
    torch.onnx.export(
        graph,
        example,
        str(path),
        dynamo=False,
        input_names=list(graph.input_names),
        output_names=list(graph.output_names),
        dynamic_axes={n: dict(axes) for n in names},
        opset_version=OPSET,
        do_constant_folding=True,
    )


def _check_graph(path: Path, inputs: Sequence[str], outputs: Sequence[str]) -> None:
    """Opset, names and dynamic batch/spatial axes of the written graph."""
    import onnx

    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    opsets = {o.domain: o.version for o in model.opset_import}
    if opsets.get("", opsets.get("ai.onnx")) != OPSET:
        raise ExportError(f"{path}: graph has opsets {opsets}, expected ai.onnx {OPSET}")
    got_in = [i.name for i in model.graph.input]
    got_out = [o.name for o in model.graph.output]
    if got_in != list(inputs) or got_out != list(outputs):
        raise ExportError(
            f"{path}: graph I/O {got_in} -> {got_out}, expected {inputs} -> {outputs}"
        )
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        fixed = [i for i in (0, 2, 3, 4) if dims[i].HasField("dim_value")]
        if len(dims) != 5 or fixed:
            raise ExportError(f"{path}: {value.name} has static axes {fixed}; expected dynamic")
    if any(n.op_type == "GridSample" for n in model.graph.node):
        raise ExportError(f"{path}: the graph contains GridSample; export the network only")


def export_graph(graph: NetworkGraph, path: Path, exporter: str) -> str:
    """Write the ONNX graph with the chosen exporter; returns the exporter used."""
    example = random_inputs(graph.input_names, (1, 1, 48, 48, 48), seed=1)
    errors: list[str] = []
    order = {"auto": ["dynamo", "legacy"], "dynamo": ["dynamo"], "legacy": ["legacy"]}
    if exporter not in order:
        raise InvalidInput(f"exporter must be 'auto', 'dynamo' or 'legacy', got {exporter!r}")
    for kind in order[exporter]:
        try:
            with _quiet_export(), torch.no_grad():
                (_export_dynamo if kind == "dynamo" else _export_legacy)(graph, example, path)
            _check_graph(path, graph.input_names, graph.output_names)
        except Exception as exc:
            errors.append(f"{kind}: {type(exc).__name__}: {exc}")
            if exporter == "auto":
                log.warning("%s ONNX exporter failed (%s); trying the next one", kind, exc)
            continue
        return kind
    raise ExportError("ONNX export failed: " + " | ".join(errors))


def parity_check(
    net: nn.Module,
    onnx_path: str | Path,
    sizes: Sequence[Sequence[int]] = PARITY_SIZES,
    tolerance: float = PARITY_TOLERANCE,
    seed: int = 0,
) -> ParityReport:
    """Compare ONNX Runtime (CPU) with PyTorch on random inputs of several sizes.

    The first size runs with batch 1, the others with batch 2 (the batch axis is dynamic too).

    Args:
        net: The network, in eval mode.
        onnx_path: The exported graph.
        sizes: Input sizes ``(D, H, W)``, each axis a multiple of 4 and ``>= 44``.
        tolerance: Accepted max |diff| (recorded in the report; not raised here).
        seed: Seed of the random inputs.

    Returns:
        The report (check :attr:`ParityReport.passed`).
    """
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    in_names = [i.name for i in sess.get_inputs()]
    out_names = [o.name for o in sess.get_outputs()]
    graph = NetworkGraph(net, in_names, out_names).eval()
    report = ParityReport(sizes=[], tolerance=tolerance)
    for k, size in enumerate(sizes):
        dims = tuple(int(s) for s in size)
        for n in dims:
            check_window(n)
        key = "x".join(str(s) for s in dims)
        xs = random_inputs(in_names, (1 if k == 0 else 2, 1, *dims), seed=seed + k)
        with torch.no_grad():
            ref = [t.numpy() for t in graph(*xs)]
        got = sess.run(out_names, {n: x.numpy() for n, x in zip(in_names, xs, strict=True)})
        report.sizes.append((dims[0], dims[1], dims[2]))
        report.max_abs_diff[key] = {}
        report.max_abs_ref[key] = {}
        for name, r, g in zip(out_names, ref, got, strict=True):
            if r.shape != g.shape:
                raise ExportError(f"{name} at {key}: ONNX shape {g.shape} != PyTorch {r.shape}")
            report.max_abs_diff[key][name] = float(np.abs(r - g).max())
            report.max_abs_ref[key][name] = float(np.abs(r).max())
    return report


def activation_bytes_per_voxel(net: nn.Module, size: int = MEMORY_PROBE_SIZE) -> float:
    """Float32 bytes of every intermediate activation per input voxel (no buffer reuse).

    Forward hooks on the leaf modules sum the output sizes of one ``size^3`` forward pass. The
    figure is an upper bound of what a runtime keeps alive at once; :mod:`jrs.inference` uses it
    to choose the window from a memory budget.

    Args:
        net: The network.
        size: Probe input size (valid).

    Returns:
        Bytes per input voxel.
    """
    total = 0

    def hook(_m: nn.Module, _i: Any, out: Any) -> None:
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out.numel() * 4
        elif isinstance(out, tuple):
            total += sum(t.numel() * 4 for t in out if isinstance(t, torch.Tensor))

    leaves = [m for m in net.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            net(*random_inputs(getattr(net, "inputs", ("fixed",)), (1, 1, size, size, size), 0))
    finally:
        for h in handles:
            h.remove()
    return total / float(size**3)
