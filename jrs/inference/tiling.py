"""Whole-scan tiled inference: plan input windows and stitch high-level outputs (numpy only).

The one implementation of METHOD.md's "Inference on a whole scan" tiling, shared by the ONNX
Runtime inference (:mod:`jrs.inference`) and the torch evaluation (``jrs.training.evaluate``).

**The spec's layout** (``seam_overlap=0, alignment=1``): the 1 mm volumes are padded by
:data:`MARGIN` (20) voxels per side and cut into input windows of size ``n`` (a multiple of 4,
``>= 44``) with stride ``n - 40``, so that the high-level outputs (``n - 40`` voxels per axis) abut;
the last window on an axis is shifted back to end at the border. A high-level output voxel ``h`` of
a window sits over input voxel ``h + 20`` of that window, so a window whose input starts at ``s``
in *padded* coordinates produces the output for voxels ``[s, s + n - 40)`` of the *unpadded*
volume.

**The default layout** (``seam_overlap=4, alignment=4``) deviates from that on purpose, so that the
stitched result equals one window covering the whole volume (up to float rounding; tested for the
ONNX graph in ``tests/jrs/test_inference.py`` and for the torch network in
``tests/training/test_evaluate.py``). With the spec's layout the networks show two artefacts:

* **seams**: the two stride-2 down-sampling blocks pad one voxel at the *end* of each axis
  (TensorFlow "same"), which changes the last :data:`SEAM_OVERLAP` (4) high-level output voxels of
  every window compared with a larger window. With abutting windows every tile boundary carries a
  4-voxel seam. The default stride is therefore ``n - 40 - seam_overlap`` (``n - 44``): the next
  window overwrites that tail in the :class:`Stitcher` (later windows win), so only the volume's
  own end keeps tail values, as a single window would;
* **phase**: down-sampling twice by 2 makes the networks translation-equivariant only for shifts
  that are multiples of 4 voxels, so the last window of an axis, shifted back to the border, sits on
  another sampling phase than the others. Each axis is therefore first padded at its end to a
  multiple of ``alignment`` (4; with the padding fill, cropped off again by
  :meth:`Stitcher.result`), which makes every window start, the last one included, a multiple
  of 4.

The price is up to ``((n - 40) / (n - 44))^3`` more windows (1.25x at n = 96, 1.1x at n = 160).

When an axis of the volume is shorter than ``n - 40`` the window on that axis shrinks to the
smallest valid size (a multiple of 4, at least 44) that covers it; when even a 44 window's output
(4 voxels) is longer than the axis, the volume is padded further at the end and the stitched result
cropped back. Windows may therefore be non-cubic; the networks accept any valid size per axis.

This module has no torch dependency.

Example::

    plan = plan_tiles(volume.shape, 96)                      # aligned, 4-voxel seam overlap
    spec = plan_tiles(volume.shape, 96, seam_overlap=0, alignment=1)  # METHOD.md's layout
    stitched = run_tiled(np.stack([fixed, moving, labels]), plan, predict, fill=(-1.0, -1.0, 0.0))
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from jrs.core.errors import InvalidInput

#: Voxels cropped per side between a window's input and its high-level output.
MARGIN = 20
#: Smallest valid window (a multiple of 4, ``>= 44``).
MIN_WINDOW = 44
#: High-level output voxels at the far end of a window that the stride-2 blocks' end padding
#: (TF "same": 0 before, 1 after) reaches; measured identical for every window size. Default
#: output overlap of consecutive windows.
SEAM_OVERLAP = 4
#: Default alignment of every axis (and so of every window start): the networks' total
#: down-sampling factor.
ALIGNMENT = 4

Shape3 = tuple[int, int, int]

__all__ = [
    "ALIGNMENT",
    "MARGIN",
    "MIN_WINDOW",
    "SEAM_OVERLAP",
    "Stitcher",
    "TilePlan",
    "axis_starts",
    "axis_window",
    "check_window",
    "pad_volume",
    "plan_tiles",
    "run_tiled",
]


def check_window(n: int) -> None:
    """Raise :class:`~jrs.core.errors.InvalidInput` unless ``n`` is a multiple of 4 and >= 44."""
    if int(n) != n or n < MIN_WINDOW or n % 4 != 0:
        raise InvalidInput(f"window size must be a multiple of 4 and >= {MIN_WINDOW}, got {n}")


def _ceil_to(x: int, multiple: int) -> int:
    return -(-int(x) // multiple) * multiple


def axis_window(size: int, n: int) -> int:
    """Window used on an axis of ``size`` voxels when ``n`` is requested.

    The requested ``n`` unless a smaller valid window already covers the axis in one tile.

    Args:
        size: Axis length of the unpadded volume (voxels, ``>= 1``).
        n: Requested window (multiple of 4, ``>= 44``).

    Returns:
        ``min(n, max(44, ceil4(size + 40)))``.
    """
    check_window(n)
    return min(n, max(MIN_WINDOW, _ceil_to(size + 2 * MARGIN, 4)))


def axis_starts(size: int, window: int, seam_overlap: int = SEAM_OVERLAP) -> tuple[int, ...]:
    """Output starts along one axis (= input starts in padded coordinates).

    Args:
        size: Axis length to cover (voxels), at least ``window - 40``.
        window: Input window on this axis.
        seam_overlap: Output voxels by which consecutive windows overlap (a multiple of 4,
            ``>= 0``); 0 gives METHOD.md's abutting outputs.

    Returns:
        Starts ``0, s, 2s, ...`` with stride ``s = window - 40 - seam_overlap``, the last one
        shifted back to ``size - (window - 40)`` so that the outputs end exactly at the border.

    Raises:
        InvalidInput: When the axis is shorter than one output, or when more than one window is
            needed and the stride is not a positive multiple of 4.
    """
    out = window - 2 * MARGIN
    if size < out:
        raise InvalidInput(f"axis of {size} voxels is shorter than the output {out} of window")
    if seam_overlap < 0 or seam_overlap % 4:
        raise InvalidInput(f"seam overlap must be a multiple of 4 and >= 0, got {seam_overlap}")
    if size == out:
        return (0,)
    stride = out - seam_overlap
    if stride < 4:
        raise InvalidInput(
            f"window {window} leaves a stride of {stride} voxels with a seam overlap of "
            f"{seam_overlap}; use a window >= {MIN_WINDOW + seam_overlap + 4}"
        )
    starts = list(range(0, size - out + 1, stride))
    if starts[-1] + out < size:
        starts.append(size - out)
    return tuple(starts)


@dataclass(frozen=True)
class TilePlan:
    """Where the windows of a whole-scan inference go.

    Attributes:
        shape: ``(D, H, W)`` of the unpadded volume (voxels).
        window: Input window per axis ``(n_z, n_y, n_x)``.
        covered: Axis lengths covered by the outputs (``>= shape``: the alignment padding and the
            end padding of tiny axes come on top).
        starts: Per axis, the output starts in unpadded coordinates, which are also the input
            starts in padded coordinates.
        seam_overlap: Output voxels by which consecutive windows overlap.
        alignment: Multiple to which each axis was padded.
    """

    shape: Shape3
    window: Shape3
    covered: Shape3
    starts: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
    seam_overlap: int = SEAM_OVERLAP
    alignment: int = ALIGNMENT

    @property
    def output(self) -> Shape3:
        """High-level output size per axis ``window - 40``."""
        return (
            self.window[0] - 2 * MARGIN,
            self.window[1] - 2 * MARGIN,
            self.window[2] - 2 * MARGIN,
        )

    @property
    def padded_shape(self) -> Shape3:
        """Shape of the padded volume ``covered + 40``."""
        return (
            self.covered[0] + 2 * MARGIN,
            self.covered[1] + 2 * MARGIN,
            self.covered[2] + 2 * MARGIN,
        )

    def __len__(self) -> int:
        """Number of windows."""
        return len(self.starts[0]) * len(self.starts[1]) * len(self.starts[2])

    def tiles(self) -> Iterator[Shape3]:
        """Every window's start ``(z, y, x)``, in C order (the order :class:`Stitcher` needs)."""
        for s in itertools.product(*self.starts):
            yield (int(s[0]), int(s[1]), int(s[2]))

    def input_slices(self, start: Shape3) -> tuple[slice, slice, slice]:
        """Slices of the padded volume that form the input window at ``start``."""
        return (
            slice(start[0], start[0] + self.window[0]),
            slice(start[1], start[1] + self.window[1]),
            slice(start[2], start[2] + self.window[2]),
        )

    def output_slices(self, start: Shape3) -> tuple[slice, slice, slice]:
        """Slices of the (covered) output volume written by the window at ``start``."""
        o = self.output
        return (
            slice(start[0], start[0] + o[0]),
            slice(start[1], start[1] + o[1]),
            slice(start[2], start[2] + o[2]),
        )


def plan_tiles(
    shape: Sequence[int],
    window: int,
    seam_overlap: int = SEAM_OVERLAP,
    alignment: int = ALIGNMENT,
) -> TilePlan:
    """Plan the windows covering a volume.

    Args:
        shape: ``(D, H, W)`` of the unpadded 1 mm volume.
        window: Requested input window ``n`` (a multiple of 4, ``>= 44``); larger is faster. With
            a seam overlap, a volume that needs several windows on an axis needs
            ``n >= 48 + seam_overlap`` there.
        seam_overlap: Output voxels by which consecutive windows overlap (default 4, see the
            module docstring); 0 for METHOD.md's abutting windows.
        alignment: Each axis is padded at its end to a multiple of this (default 4, see the module
            docstring); 1 for none, as METHOD.md.

    Returns:
        The plan.

    Raises:
        InvalidInput: For an invalid window, shape, overlap or alignment.
    """
    check_window(window)
    dims = tuple(int(s) for s in shape)
    if len(dims) != 3 or min(dims) < 1:
        raise InvalidInput(
            f"volume shape must be 3 positive integers (D, H, W), got {tuple(shape)}"
        )
    if int(alignment) != alignment or alignment < 1:
        raise InvalidInput(f"alignment must be a positive integer, got {alignment}")
    wins = tuple(axis_window(s, window) for s in dims)
    covered = tuple(
        max(_ceil_to(s, alignment), w - 2 * MARGIN) for s, w in zip(dims, wins, strict=True)
    )
    starts = tuple(axis_starts(c, w, seam_overlap) for c, w in zip(covered, wins, strict=True))
    return TilePlan(
        shape=(dims[0], dims[1], dims[2]),
        window=(wins[0], wins[1], wins[2]),
        covered=(covered[0], covered[1], covered[2]),
        starts=(starts[0], starts[1], starts[2]),
        seam_overlap=int(seam_overlap),
        alignment=int(alignment),
    )


def pad_volume(
    volume: npt.NDArray[np.generic],
    plan: TilePlan,
    fill: float | Sequence[float] = 0.0,
) -> npt.NDArray[np.generic]:
    """Pad a volume for the plan: 20 voxels per side, plus the alignment and tiny-axis end padding.

    Args:
        volume: ``(D, H, W)`` or channels-first ``(C, D, H, W)`` array on the plan's grid.
        plan: The plan.
        fill: Constant fill value, or one per channel (e.g. ``-1`` for normalised air in images,
            ``0`` for background labels).

    Returns:
        ``(C, *plan.padded_shape)`` (or ``plan.padded_shape`` for a 3-D input), same dtype.
    """
    arr = np.asarray(volume)
    squeeze = arr.ndim == 3
    if squeeze:
        arr = arr[None]
    if arr.ndim != 4 or tuple(arr.shape[1:]) != plan.shape:
        raise InvalidInput(
            f"volume of shape {tuple(np.asarray(volume).shape)} does not fit the plan's "
            f"grid {plan.shape}"
        )
    fills = (
        [float(fill)] * arr.shape[0] if isinstance(fill, int | float) else [float(f) for f in fill]
    )
    if len(fills) != arr.shape[0]:
        raise InvalidInput(f"{len(fills)} fill values for {arr.shape[0]} channels")
    out = np.empty((arr.shape[0], *plan.padded_shape), dtype=arr.dtype)
    d, h, w = plan.shape
    for c in range(arr.shape[0]):
        out[c] = fills[c]
        out[c, MARGIN : MARGIN + d, MARGIN : MARGIN + h, MARGIN : MARGIN + w] = arr[c]
    return out[0] if squeeze else out


class Stitcher:
    """Accumulates high-level window outputs into full volumes.

    Where windows overlap, the later one overwrites the earlier one. Add the windows in the C order
    of :meth:`TilePlan.tiles`: then the last writer of every voxel is, on each axis, the window
    with the largest start covering it, so a window's tail (the :data:`SEAM_OVERLAP` voxels that
    its end padding reaches) survives only at the volume's own end. :attr:`count` records how many
    windows wrote each voxel (for tests and sanity checks).

    Args:
        plan: The tile plan.
        channels: Number of output channels ``C``.
        dtype: Dtype of the stitched volume.
    """

    def __init__(self, plan: TilePlan, channels: int, dtype: npt.DTypeLike = np.float32) -> None:
        self.plan = plan
        self.data = np.zeros((channels, *plan.covered), dtype=dtype)
        self.count = np.zeros(plan.covered, dtype=np.uint16)

    def add(self, outputs: npt.NDArray[np.generic], starts: Sequence[Shape3]) -> None:
        """Write a batch of window outputs.

        Args:
            outputs: ``(B, C, o_z, o_y, o_x)`` high-level outputs, ``o = window - 40``.
            starts: The ``B`` window starts they belong to.
        """
        out = np.asarray(outputs)
        expected = (len(starts), self.data.shape[0], *self.plan.output)
        if tuple(out.shape) != expected:
            raise InvalidInput(f"window outputs of shape {tuple(out.shape)}, expected {expected}")
        for b, start in enumerate(starts):
            sl = self.plan.output_slices(start)
            self.data[(slice(None), *sl)] = out[b]
            self.count[sl] += 1

    def result(self) -> npt.NDArray[np.generic]:
        """The stitched ``(C, D, H, W)`` volume on the unpadded grid (padding cropped off).

        Raises:
            InvalidInput: When some voxel was never written.
        """
        if not self.count.all():
            raise InvalidInput(f"{int((self.count == 0).sum())} voxels were not covered by tiles")
        d, h, w = self.plan.shape
        return self.data[:, :d, :h, :w]


def run_tiled(
    volume: npt.NDArray[np.generic],
    window: int | TilePlan,
    predict: Callable[[npt.NDArray[np.generic]], Mapping[str, npt.NDArray[np.generic]]],
    fill: float | Sequence[float] = 0.0,
    batch_size: int = 1,
    progress: Callable[[int, int], None] | None = None,
    *,
    seam_overlap: int = SEAM_OVERLAP,
    alignment: int = ALIGNMENT,
) -> dict[str, npt.NDArray[np.float32]]:
    """Run a window-wise predictor over a whole volume and stitch its high-level outputs.

    Args:
        volume: ``(C_in, D, H, W)`` inputs on the 1 mm grid (e.g. fixed, moving, moving labels).
        window: Requested input window ``n``, or a ready :class:`TilePlan` for this volume (then
            ``seam_overlap`` and ``alignment`` are the plan's).
        predict: Maps a batch ``(B, C_in, n_z, n_y, n_x)`` to named high-level outputs
            ``(B, C_k, n_z - 40, n_y - 40, n_x - 40)`` (e.g. ``{"seg": logits, "dvf": u}``).
        fill: Padding value per input channel.
        batch_size: Windows per call of ``predict``.
        progress: Called with ``(windows done, windows in total)`` after each batch.
        seam_overlap: As in :func:`plan_tiles` (0 with ``alignment=1``: METHOD.md's layout).
        alignment: As in :func:`plan_tiles`.

    Returns:
        Output name -> stitched ``(C_k, D, H, W)`` float32 volume.

    Raises:
        InvalidInput: For a mis-shaped volume, an invalid window or plan, or mis-shaped outputs.
    """
    arr = np.asarray(volume)
    if arr.ndim != 4:
        raise InvalidInput(f"volume must be (C, D, H, W), got shape {tuple(arr.shape)}")
    if isinstance(window, TilePlan):
        plan = window
    else:
        plan = plan_tiles(arr.shape[1:], window, seam_overlap, alignment)
    if int(batch_size) < 1:
        raise InvalidInput(f"batch_size must be >= 1, got {batch_size}")
    step = int(batch_size)
    padded = pad_volume(arr, plan, fill)
    tiles = list(plan.tiles())
    stitchers: dict[str, Stitcher] = {}
    if len(tiles) == 1 and tuple(plan.window) == tuple(plan.padded_shape):
        # one window covering the padded volume: no copies into a batch or a stitcher (the
        # result is what the Stitcher would give: the window's output, padding cropped off)
        d, h, w = plan.shape
        single = predict(padded[None])
        if progress is not None:
            progress(1, 1)
        return {
            k: np.asarray(np.asarray(v)[0, :, :d, :h, :w], dtype=np.float32)
            for k, v in single.items()
        }
    for i in range(0, len(tiles), step):
        chunk = tiles[i : i + step]
        batch = np.stack([padded[(slice(None), *plan.input_slices(s))] for s in chunk])
        for name, out in predict(batch).items():
            if name not in stitchers:
                stitchers[name] = Stitcher(plan, int(np.asarray(out).shape[1]))
            stitchers[name].add(out, chunk)
        if progress is not None:
            progress(i + len(chunk), len(tiles))
    return {k: np.asarray(s.result(), dtype=np.float32) for k, s in stitchers.items()}
