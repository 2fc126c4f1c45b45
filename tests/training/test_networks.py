"""Tests of the six networks: parameter counts, output geometry, inputs, init, cross-stitch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from jrs.training.networks import (
    LEVELS,
    NETWORK_NAMES,
    PAPER_PARAMETER_COUNTS,
    CrossStitchNet,
    NetworkOutput,
    UNetNetwork,
    build,
    crop_to_level,
    level_size,
)
from jrs.training.networks.blocks import ConvBlock, CrossStitch, center_crop, upsample


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


SMALL = (4, 6, 8)  # small channel widths for fast forward passes


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _inputs(n: int, batch: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "fixed": torch.randn(batch, 1, n, n, n, generator=g),
        "moving": torch.randn(batch, 1, n, n, n, generator=g),
        "moving_labels": torch.randint(0, 5, (batch, 1, n, n, n), generator=g).float(),
    }


# ---------------------------------------------------------------- parameter counts


@pytest.mark.parametrize("name", NETWORK_NAMES)
def test_parameter_count_matches_paper(name: str):
    count = _n_params(build(name))
    paper = PAPER_PARAMETER_COUNTS[name]
    assert abs(count - paper) / paper < 0.02, f"{name}: {count} vs paper {paper}"


def test_parameter_counts_exact_where_the_paper_is_exact():
    # Seg, Reg, Dense and SEDD reproduce the paper's counts exactly; cross-stitch's 779,000 is
    # the two branches (779,000) plus 576 cross-stitch alphas; JRS-reg has one more input than Reg.
    assert _n_params(build("seg")) == 779_436
    assert _n_params(build("reg")) == 779_733
    assert _n_params(build("dense")) == 781_164
    assert _n_params(build("sedd")) == 722_936
    cs = build("cross-stitch")
    n_alpha = sum(a.numel() for a in cs.cross_stitch_alphas().values())
    assert n_alpha == 4 * (16 + 32 + 64 + 32)
    assert _n_params(cs) - n_alpha == 779_000
    assert _n_params(build("jrs-reg")) == 779_733 + 27 * 23


# ---------------------------------------------------------------- geometry


@pytest.mark.parametrize(("n", "sizes"), [(96, (17, 30, 56)), (48, (5, 6, 8)), (64, (9, 14, 24))])
def test_level_size(n: int, sizes: tuple[int, int, int]):
    assert tuple(level_size(n, k) for k in LEVELS) == sizes


@pytest.mark.parametrize("n", [40, 46, 50])
def test_invalid_patch_size_rejected(n: int):
    net = build("seg", channels=SMALL)
    with pytest.raises(ValueError, match="multiple of 4"):
        net(torch.zeros(1, 1, n, n, n))


@pytest.mark.parametrize("name", NETWORK_NAMES)
@pytest.mark.parametrize("n", [48, 52])
def test_output_shapes_small(name: str, n: int):
    net = build(name, channels=SMALL)
    out = net(_inputs(n, batch=2))
    assert isinstance(out, NetworkOutput)
    has_seg = name in ("seg", "dense", "sedd", "cross-stitch")
    has_dvf = name != "seg"
    assert bool(out.seg) == has_seg and bool(out.dvf) == has_dvf
    for k in LEVELS:
        s = level_size(n, k)
        if has_seg:
            assert out.seg[k].shape == (2, 5, s, s, s)
        if has_dvf:
            assert out.dvf[k].shape == (2, 3, s, s, s)
    kinds = ["seg"] * has_seg + ["dvf"] * has_dvf
    assert set(out.flat()) == {f"{kind}_{k}" for kind in kinds for k in LEVELS}


def test_output_shapes_96_cross_stitch():
    net = build("cross-stitch").eval()
    with torch.no_grad():
        out = net(_inputs(96))
    for k, s in zip(LEVELS, (17, 30, 56), strict=True):
        assert out.seg[k].shape == (1, 5, s, s, s)
        assert out.dvf[k].shape == (1, 3, s, s, s)
        assert torch.isfinite(out.seg[k]).all() and torch.isfinite(out.dvf[k]).all()


def test_non_cubic_input():
    net = build("dense", channels=SMALL)
    x = torch.randn(1, 1, 48, 52, 56)
    out = net(x, x, x.abs().round().clamp(0, 4))
    assert out.dvf["high"].shape == (1, 3, 8, 12, 16)
    assert out.seg["low"].shape == (1, 5, 5, 6, 7)


# ---------------------------------------------------------------- receptive-field alignment


def _positive_net() -> UNetNetwork:
    """A tiny Seg net with positive weights (so gradients are > 0 on the receptive field)."""
    net = UNetNetwork(("fixed",), channels=(2, 2, 2), seg_head=True)
    for m in net.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.constant_(m.weight, 0.05)
            nn.init.zeros_(m.bias)
    return net.eval()


def _support_centre(net: UNetNetwork, n: int, level: str, k: int) -> list[float]:
    x = torch.ones(1, 1, n, n, n, requires_grad=True)
    net(x).seg[level][0, 0, k, k, k].backward()
    assert x.grad is not None
    support = x.grad[0, 0] > 0
    centres = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = torch.nonzero(support.any(dim=other[1]).any(dim=other[0])).flatten()
        centres.append((idx.min().item() + idx.max().item()) / 2)
    return centres


@pytest.mark.parametrize(
    ("level", "k", "centre", "offset"),
    [("high", 3, 3 + 20, 0), ("mid", 2, 2 * 2 + 19, 1), ("low", 1, 4 * 1 + 17, 3)],
)
def test_output_voxel_sits_over_stated_input_voxel(level: str, k: int, centre: int, offset: int):
    """Voxel k of a level sits over input voxel h+20 / 2m+19 / 4l+17 (skip path), and the
    crop-and-stride target of that voxel is the input voxel 0 / 1 / 3 before that centre."""
    n = 48
    net = _positive_net()
    # Keep only the skip path into the level (the up-sampled path widens the field asymmetrically).
    with torch.no_grad():
        if level == "mid":
            net.decoder.m0.conv.weight[:, :2] = 0.0  # up-sampled low features come first
        if level == "high":
            net.decoder.h0.conv.weight[:, :2] = 0.0  # up-sampled mid features come first
    assert _support_centre(net, n, level, k) == [centre] * 3
    # The target helper picks input voxel centre - offset for output voxel k, on every axis.
    coords = torch.arange(n, dtype=torch.float32)
    for axis in (2, 3, 4):
        shape = [1, 1, 1, 1, 1]
        shape[axis] = n
        vol = coords.view(shape).expand(1, 1, n, n, n)
        target = crop_to_level(vol, level)
        assert target.shape[2:] == (level_size(n, level),) * 3
        assert target.select(axis, k).flatten()[0].item() == centre - offset


def test_crop_to_level_sizes_96():
    x = torch.zeros(1, 2, 96, 96, 96)
    assert crop_to_level(x, "high").shape == (1, 2, 56, 56, 56)
    assert crop_to_level(x, "mid").shape == (1, 2, 30, 30, 30)
    assert crop_to_level(x, "low").shape == (1, 2, 17, 17, 17)


# ---------------------------------------------------------------- blocks and init


def test_down_block_tf_same_padding():
    block = ConvBlock(1, 1, stride=2)
    for n in (92, 42, 44):
        assert block(torch.zeros(1, 1, n, n, n)).shape[-1] == n // 2
    # Padding is after: output voxel 0 reads input voxels 0..2 only.
    with torch.no_grad():
        block.conv.weight.fill_(1.0)
        block.conv.bias.zero_()
    x = torch.zeros(1, 1, 8, 8, 8, requires_grad=True)
    block.eval()(x)[0, 0, 0, 0, 0].backward()
    assert x.grad is not None
    assert torch.nonzero(x.grad[0, 0]).max().item() == 2


def test_upsample_and_crop():
    x = torch.arange(4.0).view(1, 1, 1, 1, 4).expand(1, 1, 4, 4, 4)
    up = upsample(x)
    assert up.shape == (1, 1, 8, 8, 8)
    assert up[0, 0, 0, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert center_crop(up, 2).shape == (1, 1, 4, 4, 4)


def test_init_and_batchnorm_settings():
    torch.manual_seed(0)
    net = build("seg")
    weights = torch.cat([m.weight.flatten() for m in net.modules() if isinstance(m, nn.Conv3d)])
    assert abs(weights.mean().item()) < 1e-3
    assert weights.std().item() == pytest.approx(0.02, rel=0.05)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm3d)]
    assert bns and all(b.momentum == 0.1 and b.eps == 1e-3 for b in bns)
    acts = [m for m in net.modules() if isinstance(m, nn.LeakyReLU)]
    assert acts and all(a.negative_slope == 0.2 for a in acts)


# ---------------------------------------------------------------- inputs and cross-stitch


def test_inputs_by_mapping_or_tensors_agree():
    net = build("jrs-reg", channels=SMALL).eval()
    inp = _inputs(48)
    a = net(inp)
    b = net(inp["fixed"], inp["moving"], inp["moving_labels"])
    torch.testing.assert_close(a.dvf["high"], b.dvf["high"])
    with pytest.raises(ValueError, match="moving_labels"):
        net(inp["fixed"], inp["moving"])


def test_configurable_input_sets():
    net = build("cross-stitch", channels=SMALL, reg_inputs=("fixed", "moving"))
    assert isinstance(net, CrossStitchNet)
    assert net.reg_encoder.e0a.conv.in_channels == 2
    out = net(torch.randn(1, 1, 48, 48, 48), torch.randn(1, 1, 48, 48, 48))
    assert out.dvf["high"].shape == (1, 3, 8, 8, 8)
    assert build("reg").encoder.e0a.conv.in_channels == 2
    assert build("jrs-reg").encoder.e0a.conv.in_channels == 3
    with pytest.raises(ValueError, match="does not accept"):
        build("seg", seg_inputs=("fixed",))
    with pytest.raises(ValueError, match="unknown network"):
        build("vnet")


def test_cross_stitch_alphas():
    torch.manual_seed(0)
    net = build("cross-stitch")
    assert isinstance(net, CrossStitchNet)
    alphas = net.cross_stitch_alphas()
    assert list(alphas) == ["d0", "d1", "u1", "u0"]
    assert [tuple(a.shape) for a in alphas.values()] == [
        (16, 2, 2),
        (32, 2, 2),
        (64, 2, 2),
        (32, 2, 2),
    ]
    flat = torch.cat([a.flatten() for a in alphas.values()])
    assert flat.min() >= 0 and flat.max() <= 1
    assert flat.mean().item() == pytest.approx(0.5, abs=0.05)
    assert not any(a.requires_grad for a in alphas.values())


def test_cross_stitch_unit_mixes_per_channel():
    unit = CrossStitch(2)
    with torch.no_grad():
        unit.alpha.copy_(torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.25, 0.75], [0.5, 0.5]]]))
    s = torch.ones(1, 2, 2, 2, 2)
    r = 3 * torch.ones(1, 2, 2, 2, 2)
    out_s, out_r = unit(s, r)
    assert out_s[0, :, 0, 0, 0].tolist() == [1.0, 0.25 + 2.25]
    assert out_r[0, :, 0, 0, 0].tolist() == [3.0, 2.0]


def test_cross_stitch_gradients_reach_both_branches_and_alphas():
    net = build("cross-stitch", channels=SMALL)
    assert isinstance(net, CrossStitchNet)
    out = net(_inputs(48))
    out.seg["high"].sum().backward()  # a seg-only loss still trains the reg encoder via stitches
    assert net.reg_encoder.e0a.conv.weight.grad is not None
    assert net.reg_encoder.e0a.conv.weight.grad.abs().sum() > 0
    for unit in net.stitches.values():
        assert isinstance(unit, CrossStitch)
        assert unit.alpha.grad is not None and unit.alpha.grad.abs().sum() > 0
