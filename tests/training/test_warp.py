"""Tests of the one grid-sample helper: axis order, direction, identity, gradients."""

from __future__ import annotations

import pytest
import torch

from jrs.training.warp import identity_grid, one_hot, sampling_grid, warp, warp_labels


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


SHAPE = (6, 7, 8)  # (D, H, W), all different so an axis mix-up cannot pass


def _pattern() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.rand(2, 3, *SHAPE)


def test_identity_grid_channel_order():
    g = identity_grid(SHAPE)
    assert g.shape == (1, 3, *SHAPE)
    z, y, x = 2, 3, 5
    assert g[0, :, z, y, x].tolist() == [x, y, z]


def test_sampling_grid_normalisation_corners():
    dvf = torch.zeros(1, 3, *SHAPE)
    grid = sampling_grid(dvf, SHAPE)
    assert grid.shape == (1, *SHAPE, 3)
    torch.testing.assert_close(grid[0, 0, 0, 0], torch.tensor([-1.0, -1.0, -1.0]))
    torch.testing.assert_close(grid[0, -1, -1, -1], torch.tensor([1.0, 1.0, 1.0]))


def test_zero_displacement_is_identity():
    img = _pattern()
    out = warp(img, torch.zeros(2, 3, *SHAPE))
    torch.testing.assert_close(out, img, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("channel", "axis"), [(0, 4), (1, 3), (2, 2)])
def test_unit_shift_along_each_axis(channel: int, axis: int):
    """u = +1 along one component: warped(p) = moving(p + e), i.e. pattern moves by -1."""
    img = _pattern()
    dvf = torch.zeros(2, 3, *SHAPE)
    dvf[:, channel] = 1.0
    out = warp(img, dvf)
    n = img.shape[axis]
    # warped[i] = moving[i + 1] for i < n - 1; the last voxel takes the border value moving[n-1].
    torch.testing.assert_close(
        out.narrow(axis, 0, n - 1), img.narrow(axis, 1, n - 1), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        out.narrow(axis, n - 1, 1), img.narrow(axis, n - 1, 1), atol=1e-6, rtol=0
    )


@pytest.mark.parametrize(("channel", "axis"), [(0, 4), (1, 3), (2, 2)])
def test_negative_shift_moves_a_point_forward(channel: int, axis: int):
    """u = -1: a single bright voxel at index 2 appears at index 3 of the warped image."""
    img = torch.zeros(1, 1, *SHAPE)
    img[0, 0, 2, 2, 2] = 1.0
    dvf = torch.zeros(1, 3, *SHAPE)
    dvf[:, channel] = -1.0
    out = warp(img, dvf)
    idx = [2, 2, 2]
    idx[axis - 2] = 3
    assert out[0, 0, idx[0], idx[1], idx[2]].item() == pytest.approx(1.0, abs=1e-6)
    assert out.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_half_voxel_shift_is_trilinear():
    img = torch.arange(8, dtype=torch.float32).view(1, 1, 1, 1, 8).expand(1, 1, 3, 3, 8).clone()
    dvf = torch.zeros(1, 3, 3, 3, 8)
    dvf[:, 0] = 0.5
    out = warp(img, dvf)
    torch.testing.assert_close(out[0, 0, 1, 1, :7], torch.arange(7, dtype=torch.float32) + 0.5)


def test_border_padding():
    img = _pattern()
    dvf = torch.full((2, 3, *SHAPE), 100.0)
    out = warp(img, dvf)
    expected = img[..., -1:, -1:, -1:].expand_as(img)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_gradient_flows_to_dvf():
    img = _pattern()
    dvf = (0.3 * torch.randn(2, 3, *SHAPE)).requires_grad_(True)
    warp(img, dvf).square().sum().backward()
    assert dvf.grad is not None
    assert torch.isfinite(dvf.grad).all()
    for c in range(3):
        assert dvf.grad[:, c].abs().sum() > 0


def test_one_hot_and_label_warp():
    labels = torch.randint(0, 5, (2, 1, *SHAPE)).float()
    oh = one_hot(labels)
    assert oh.shape == (2, 5, *SHAPE)
    torch.testing.assert_close(oh.sum(1), torch.ones(2, *SHAPE))
    assert torch.equal(oh.argmax(1, keepdim=True).float(), labels)
    dvf = (0.4 * torch.randn(2, 3, *SHAPE)).requires_grad_(True)
    soft = warp_labels(labels, dvf)
    torch.testing.assert_close(soft.sum(1), torch.ones(2, *SHAPE), atol=1e-5, rtol=0)
    soft[:, 1:].sum().backward()
    assert dvf.grad is not None and dvf.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="label ids"):
        one_hot(torch.full((1, 1, 2, 2, 2), 7.0))
