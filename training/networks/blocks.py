"""Building blocks of the networks of METHOD.md.

All tensors are channels-first 3-D volumes ``(B, C, D, H, W)``. Convolutions are "valid" (no
padding) unless stated; the stride-2 down-sampling block uses TensorFlow's "same" padding for a
3-wide kernel with stride 2 on an even size, i.e. 0 voxels before and 1 voxel after on each axis.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

#: Standard deviation of the normal initialisation of every convolution weight.
CONV_INIT_STD = 0.02
#: Negative slope of the LeakyReLU.
LEAKY_SLOPE = 0.2
#: BatchNorm momentum (PyTorch convention: weight of the new batch statistic).
BN_MOMENTUM = 0.1
#: BatchNorm epsilon (the Keras default of the original).
BN_EPS = 1e-3


def init_conv(conv: nn.Conv3d) -> None:
    """Initialise a convolution in place: weights ~ N(0, 0.02), bias 0."""
    nn.init.normal_(conv.weight, mean=0.0, std=CONV_INIT_STD)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class ConvBlock(nn.Module):
    """Conv3d 3x3x3 (with bias) -> LeakyReLU(0.2) -> BatchNorm3d.

    With ``stride=1`` the convolution is "valid":
    ``(B, C_in, D, H, W) -> (B, C_out, D-2, H-2, W-2)``.
    With ``stride=2`` the input is first padded with 0 voxels before and 1 after on each axis
    (TF "same" for even sizes), so ``D -> (D + 1 - 3) // 2 + 1 = D // 2`` for even ``D``
    (``ceil(D / 2)`` in general).

    Args:
        in_channels: Number of input channels ``C_in``.
        out_channels: Number of output channels ``C_out``.
        stride: 1 (valid block) or 2 (down-sampling block).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        self.stride = stride
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size=3, stride=stride, bias=True)
        self.act = nn.LeakyReLU(LEAKY_SLOPE)
        self.norm = nn.BatchNorm3d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM)
        init_conv(self.conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block.

        Args:
            x: ``(B, C_in, D, H, W)``.

        Returns:
            ``(B, C_out, D', H', W')`` with ``D' = D - 2`` (stride 1) or ``ceil(D / 2)`` (stride 2).
        """
        if self.stride == 2:
            # functional.pad takes (W_before, W_after, H_before, H_after, D_before, D_after).
            x = functional.pad(x, (0, 1, 0, 1, 0, 1))
        return self.norm(self.act(self.conv(x)))


def down_block(in_channels: int, out_channels: int) -> ConvBlock:
    """Stride-2 down-sampling block with TF-"same" padding (0 before, 1 after)."""
    return ConvBlock(in_channels, out_channels, stride=2)


def upsample(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour up-sampling by 2 on each spatial axis.

    Args:
        x: ``(B, C, D, H, W)``.

    Returns:
        ``(B, C, 2D, 2H, 2W)``; output voxel ``i`` copies input voxel ``i // 2``.
    """
    return functional.interpolate(x, scale_factor=2.0, mode="nearest")


def center_crop(x: torch.Tensor, crop: int) -> torch.Tensor:
    """Remove ``crop`` voxels on each side of each spatial axis.

    Args:
        x: ``(B, C, D, H, W)``.
        crop: Voxels removed per side (>= 0).

    Returns:
        ``(B, C, D - 2 crop, H - 2 crop, W - 2 crop)``.
    """
    if crop < 0:
        raise ValueError(f"crop must be >= 0, got {crop}")
    if crop == 0:
        return x
    if min(x.shape[2:]) <= 2 * crop:
        raise ValueError(f"cannot crop {crop} voxels per side from spatial shape {tuple(x.shape)}")
    return x[..., crop:-crop, crop:-crop, crop:-crop]


class Head(nn.Module):
    """1x1x1 convolution head (no activation), optionally with a fixed output scale.

    Maps ``(B, C_in, D, H, W) -> (B, C_out, D, H, W)``: 5 segmentation logits or 3 displacement
    components. With ``scale != 1`` the output is ``scale * conv(x)`` and the convolution is
    initialised with weights ``N(0, 0.02 / scale)``: the initial outputs are distributed as with
    ``scale = 1``, but each optimiser step moves the output ``scale`` times as far (a per-head
    learning-rate multiplier that survives Adam's gradient normalisation). The scale is a
    constructor argument, not a parameter: state dicts are the same for every scale.

    Args:
        in_channels: ``C_in``.
        out_channels: ``C_out``.
        scale: Fixed output multiplier (> 0; 1: the plain head of the paper).
    """

    def __init__(self, in_channels: int, out_channels: int, scale: float = 1.0) -> None:
        super().__init__()
        if not scale > 0:
            raise ValueError(f"head scale must be > 0, got {scale}")
        self.scale = float(scale)
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size=1, bias=True)
        init_conv(self.conv)
        if self.scale != 1.0:
            with torch.no_grad():
                self.conv.weight.div_(self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the head to ``x`` of shape ``(B, C_in, D, H, W)``."""
        y = self.conv(x)
        return y * self.scale if self.scale != 1.0 else y


class CrossStitch(nn.Module):
    """Cross-stitch unit (Misra et al. 2016) between a segmentation and a registration branch.

    Per channel ``c`` a learnable 2x2 matrix ``alpha[c]``; at every voxel
    ``out_seg = a00 * x_seg + a01 * x_reg`` and ``out_reg = a10 * x_seg + a11 * x_reg``.
    Initialised from a normal distribution of mean 0.5 and std 0.25 truncated to ``[0, 1]``.

    Args:
        channels: Number of channels ``C`` of both branches at this point.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.empty(channels, 2, 2))
        nn.init.trunc_normal_(self.alpha, mean=0.5, std=0.25, a=0.0, b=1.0)

    def forward(
        self, x_seg: torch.Tensor, x_reg: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix the two branches.

        Args:
            x_seg: Segmentation-branch features ``(B, C, D, H, W)``.
            x_reg: Registration-branch features ``(B, C, D, H, W)``.

        Returns:
            ``(out_seg, out_reg)``, each ``(B, C, D, H, W)``.
        """
        if x_seg.shape != x_reg.shape:
            raise ValueError(
                f"cross-stitch inputs differ in shape: {tuple(x_seg.shape)} vs {tuple(x_reg.shape)}"
            )
        a = self.alpha.view(1, -1, 2, 2, 1, 1, 1)
        out_seg = a[:, :, 0, 0] * x_seg + a[:, :, 0, 1] * x_reg
        out_reg = a[:, :, 1, 0] * x_seg + a[:, :, 1, 1] * x_reg
        return out_seg, out_reg
