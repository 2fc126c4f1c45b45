"""Tests of whole-scan tiling and stitching (numpy only)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from jrs.core.errors import InvalidInput
from jrs.inference.tiling import (
    ALIGNMENT,
    MARGIN,
    SEAM_OVERLAP,
    Stitcher,
    axis_starts,
    axis_window,
    pad_volume,
    plan_tiles,
    run_tiled,
)

#: METHOD.md's plain layout: abutting outputs, no alignment padding.
SPEC: dict[str, int] = {"seam_overlap": 0, "alignment": 1}
DEFAULT: dict[str, int] = {}


def crop_network(batch: np.ndarray) -> dict[str, np.ndarray]:
    """A fake network: its 'high-level output' is the input cropped by 20 per side."""
    m = MARGIN
    return {"out": batch[:, :, m:-m, m:-m, m:-m] * 1.0}


def seam_phase_network(batch: np.ndarray) -> dict[str, np.ndarray]:
    """A fake network with the real networks' two artefacts, per axis.

    * phase: each output voxel adds the input at the start of its 4-voxel block, counted from
      the window's start (equivariant only for shifts by multiples of 4);
    * seam: the last 4 output voxels of the window are altered (the stride-2 end padding).
    """
    m = MARGIN
    out = batch[:, :, m:-m, m:-m, m:-m].astype(np.float64)
    for axis in (2, 3, 4):
        n = out.shape[axis]
        anchors = np.take(out, (np.arange(n) // 4) * 4, axis=axis)
        out = out + 0.5 * anchors
        tail = [slice(None)] * out.ndim
        tail[axis] = slice(n - 4, n)
        out[tuple(tail)] += 10.0
    return {"out": out}


def single_window(vol: np.ndarray, fill: tuple[float, ...], net: Any) -> np.ndarray:
    """The fake network run once on the whole volume (padded by 20 + end padding)."""
    shape = vol.shape[1:]
    win = [max(44, -(-(s + 40) // 4) * 4) for s in shape]
    arr = np.empty((vol.shape[0], *win), vol.dtype)
    for c, f in enumerate(fill):
        arr[c] = f
    arr[:, 20 : 20 + shape[0], 20 : 20 + shape[1], 20 : 20 + shape[2]] = vol
    return net(arr[None])["out"][0, :, : shape[0], : shape[1], : shape[2]]


SHAPES = [
    ((57, 61, 73), 52),
    ((100, 37, 129), 96),
    ((3, 1, 5), 96),
    ((1, 1, 1), 44),
    ((56, 56, 56), 96),
    ((57, 112, 113), 96),
    ((13, 90, 200), 64),
]


@pytest.mark.parametrize("layout", [DEFAULT, SPEC], ids=["default", "spec"])
@pytest.mark.parametrize("shape,window", SHAPES)
def test_identity_and_coverage(
    shape: tuple[int, int, int], window: int, layout: dict[str, int]
) -> None:
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(2, *shape)).astype(np.float32)
    out = run_tiled(vol, window, crop_network, fill=(-1.0, 0.0), batch_size=3, **layout)
    assert out["out"].shape == vol.shape
    np.testing.assert_array_equal(out["out"], vol)

    plan = plan_tiles(shape, window, **layout)
    overlap = layout.get("seam_overlap", SEAM_OVERLAP)
    aligned = layout.get("alignment", ALIGNMENT) == 4
    st = Stitcher(plan, 1)
    for s in plan.tiles():
        st.add(np.ones((1, 1, *plan.output), np.float32), [s])
    assert st.count.min() >= 1  # every voxel written
    for axis, starts in enumerate(plan.starts):
        assert starts[0] == 0
        assert starts[-1] + plan.output[axis] == plan.covered[axis]
        steps = np.diff(starts)
        # stride output - overlap, only the last (shifted back) window overlaps more
        assert np.all(steps[:-1] == plan.output[axis] - overlap) if len(steps) > 1 else True
        assert np.all((steps > 0) & (steps <= plan.output[axis] - overlap))
        assert plan.window[axis] % 4 == 0 and 44 <= plan.window[axis] <= window
        if aligned:
            assert plan.covered[axis] % 4 == 0 and all(s % 4 == 0 for s in starts)


@pytest.mark.parametrize("shape,window", [s for s in SHAPES if s[1] > 44])
def test_default_layout_equals_single_window(shape: tuple[int, int, int], window: int) -> None:
    """Aligned, overlapping windows reproduce one window over the whole volume exactly."""
    rng = np.random.default_rng(1)
    vol = rng.normal(size=(1, *shape))
    ref = single_window(vol, (-1.0,), seam_phase_network)
    tiled = run_tiled(vol, window, seam_phase_network, fill=-1.0, batch_size=2)["out"]
    np.testing.assert_allclose(tiled, ref, rtol=1e-6, atol=1e-5)


def test_spec_layout_shows_seams_and_phase() -> None:
    """Why the default deviates from METHOD.md: each artefact alone breaks the identity."""
    shape, window = (57, 61, 73), 52
    vol = np.random.default_rng(2).normal(size=(1, *shape))
    ref = single_window(vol, (-1.0,), seam_phase_network)
    for layout in (SPEC, {"seam_overlap": 0}, {"alignment": 1}):
        out = run_tiled(vol, window, seam_phase_network, fill=-1.0, **layout)["out"]
        assert np.abs(out - ref).max() > 1.0, layout


def test_windows_shrink_for_small_volumes() -> None:
    assert axis_window(10, 96) == 52  # 10 + 40 -> 52 (multiple of 4)
    assert axis_window(3, 96) == 44
    assert axis_window(200, 96) == 96
    plan = plan_tiles((10, 3, 200), 96)
    assert plan.window == (52, 44, 96)
    assert plan.covered == (12, 4, 200)
    assert len(plan) == len(plan.starts[2])


def test_axis_starts_exact() -> None:
    assert axis_starts(56, 96) == (0,)
    assert axis_starts(112, 96) == (0, 52, 56)  # stride 52, last shifted back
    assert axis_starts(112, 96, seam_overlap=0) == (0, 56)
    assert axis_starts(113, 96, seam_overlap=0) == (0, 56, 57)


def test_overlapping_plan() -> None:
    plan = plan_tiles((160, 160, 120), 96)
    assert plan.starts[0] == (0, 52, 104) and plan.starts[2] == (0, 52, 64)
    assert (plan.seam_overlap, plan.alignment) == (SEAM_OVERLAP, ALIGNMENT)
    assert plan_tiles((160, 160, 120), 96, **SPEC).starts[0] == (0, 56, 104)
    odd = plan_tiles((161, 10, 10), 96)
    assert odd.covered[0] == 164 and odd.starts[0] == (0, 52, 104, 108)
    assert plan_tiles((161, 10, 10), 96, **SPEC).starts[0] == (0, 56, 105)
    with pytest.raises(InvalidInput, match="window"):
        plan_tiles((100, 100, 100), 44)  # a 4-voxel output cannot overlap by 4
    with pytest.raises(InvalidInput, match="overlap"):
        plan_tiles((100, 100, 100), 96, seam_overlap=2)
    with pytest.raises(InvalidInput, match="alignment"):
        plan_tiles((100, 100, 100), 96, alignment=0)


def test_pad_volume_fill_values() -> None:
    plan = plan_tiles((5, 6, 7), 44, **SPEC)
    vol = np.ones((2, 5, 6, 7), np.float32)
    padded = pad_volume(vol, plan, fill=(-1.0, 0.0))
    assert padded.shape == (2, *plan.padded_shape)
    assert padded[0, 0, 0, 0] == -1.0 and padded[1, 0, 0, 0] == 0.0
    assert padded[0, MARGIN, MARGIN, MARGIN] == 1.0
    aligned = plan_tiles((5, 6, 7), 96)
    assert aligned.covered == (8, 8, 8)
    end = pad_volume(vol, aligned, fill=(-1.0, 0.0))[:, MARGIN + 5, MARGIN, MARGIN]
    assert end.tolist() == [-1.0, 0.0]  # the alignment padding uses the fill too


def test_invalid_window_and_shapes() -> None:
    with pytest.raises(InvalidInput, match="multiple of 4"):
        plan_tiles((10, 10, 10), 50)
    with pytest.raises(InvalidInput, match="multiple of 4"):
        plan_tiles((10, 10, 10), 40)
    with pytest.raises(InvalidInput, match="shape"):
        plan_tiles((10, 10), 44)
    with pytest.raises(InvalidInput, match="batch_size"):
        run_tiled(np.zeros((1, 4, 4, 4)), 44, crop_network, batch_size=0)
    plan = plan_tiles((10, 10, 10), 44, **SPEC)
    st = Stitcher(plan, 2)
    with pytest.raises(InvalidInput, match="expected"):
        st.add(np.zeros((1, 2, 3, 3, 3)), [(0, 0, 0)])
    with pytest.raises(InvalidInput, match="not covered"):
        st.result()


def test_progress_reports_done_and_total() -> None:
    seen: list[tuple[int, int]] = []
    vol = np.zeros((1, 30, 30, 30), np.float32)
    run_tiled(vol, 52, crop_network, batch_size=4, progress=lambda d, t: seen.append((d, t)))
    total = len(plan_tiles((30, 30, 30), 52))
    assert seen[-1] == (total, total) and all(t == total for _, t in seen)
