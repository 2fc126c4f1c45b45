"""Tests of whole-scan tiling and stitching (numpy only)."""

from __future__ import annotations

import numpy as np
import pytest

from jrs.errors import InvalidInput
from jrs.tiling import (
    MARGIN,
    Stitcher,
    axis_starts,
    axis_window,
    pad_volume,
    plan_tiles,
    run_tiled,
)


def crop_network(batch: np.ndarray) -> dict[str, np.ndarray]:
    """A fake network: its 'high-level output' is the input cropped by 20 per side."""
    m = MARGIN
    return {"out": batch[:, :, m:-m, m:-m, m:-m] * 1.0}


@pytest.mark.parametrize(
    "shape,window",
    [
        ((57, 61, 73), 44),
        ((100, 37, 129), 96),
        ((3, 1, 5), 96),
        ((1, 1, 1), 44),
        ((56, 56, 56), 96),
        ((57, 112, 113), 96),
        ((13, 90, 200), 64),
    ],
)
def test_identity_and_coverage(shape: tuple[int, int, int], window: int) -> None:
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(2, *shape)).astype(np.float32)
    out = run_tiled(vol, window, crop_network, fill=(-1.0, 0.0), batch_size=3)
    assert out["out"].shape == vol.shape
    np.testing.assert_array_equal(out["out"], vol)

    plan = plan_tiles(shape, window)
    st = Stitcher(plan, 1)
    for s in plan.tiles():
        st.add(np.ones((1, 1, *plan.output), np.float32), [s])
    assert st.count.min() >= 1  # every voxel written
    # windows only overlap at the last (shifted) tile of an axis
    for axis, starts in enumerate(plan.starts):
        assert starts[0] == 0
        assert starts[-1] + plan.output[axis] == plan.covered[axis]
        steps = np.diff(starts)
        assert np.all(steps[:-1] == plan.output[axis]) if len(steps) > 1 else True
        assert np.all((steps > 0) & (steps <= plan.output[axis]))
        assert plan.window[axis] % 4 == 0 and 44 <= plan.window[axis] <= window


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
    assert axis_starts(112, 96) == (0, 56)
    assert axis_starts(113, 96) == (0, 56, 57)


def test_pad_volume_fill_values() -> None:
    plan = plan_tiles((5, 6, 7), 44)
    vol = np.ones((2, 5, 6, 7), np.float32)
    padded = pad_volume(vol, plan, fill=(-1.0, 0.0))
    assert padded.shape == (2, *plan.padded_shape)
    assert padded[0, 0, 0, 0] == -1.0 and padded[1, 0, 0, 0] == 0.0
    assert padded[0, MARGIN, MARGIN, MARGIN] == 1.0


def test_invalid_window_and_shapes() -> None:
    with pytest.raises(InvalidInput, match="multiple of 4"):
        plan_tiles((10, 10, 10), 50)
    with pytest.raises(InvalidInput, match="multiple of 4"):
        plan_tiles((10, 10, 10), 40)
    with pytest.raises(InvalidInput, match="shape"):
        plan_tiles((10, 10), 44)
    plan = plan_tiles((10, 10, 10), 44)
    st = Stitcher(plan, 2)
    with pytest.raises(InvalidInput, match="expected"):
        st.add(np.zeros((1, 2, 3, 3, 3)), [(0, 0, 0)])
    with pytest.raises(InvalidInput, match="not covered"):
        st.result()
