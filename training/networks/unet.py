"""The base 3-D U-Net of METHOD.md and the single-U-Net networks Seg, Reg, JRS-reg and Dense.

Geometry (input ``n^3``, ``n`` a multiple of 4, ``n >= 44``; every spatial axis is treated alike,
so non-cubic inputs work as long as each axis satisfies the rule):

======  =========================================  ==========  =============
step    op                                         channels    size
======  =========================================  ==========  =============
e0a/b   2 valid blocks                             c0          n-2, n-4 (A)
d0      stride-2 block                             c0          n/2-2
e1a/b   2 valid blocks                             c1          n/2-4, n/2-6 (B)
d1      stride-2 block                             c1          n/4-3
b0/b1   2 valid blocks                             c2          n/4-5, n/4-7 = low
u1      up x2, concat [up, crop(B, 4)]             c2+c1       n/2-14
m0/m1   2 valid blocks                             c1          n/2-16, n/2-18 = mid
u0      up x2, concat [up, crop(A, 16)]            c1+c0       n-36
h0/h1   2 valid blocks                             c0          n-38, n-40 = high
======  =========================================  ==========  =============

Output voxel ``h`` of the high level sits over input voxel ``h + 20``; mid ``m`` over ``2m + 19``;
low ``l`` over ``4l + 17``. Training targets of a level are cut from the input patch by
:func:`crop_to_level` (crop 20 / 18 / 14 per side, stride 1 / 2 / 4), i.e. mid and low targets sit
1 and 3 input voxels before the receptive-field centre, the original's convention.

Output conventions (all networks):

* ``seg[level]``: ``(B, 5, d, h, w)`` logits for labels 0..4 (background, bladder, rectum,
  seminal vesicles, prostate); apply a softmax over the channel axis.
* ``dvf[level]``: ``(B, 3, d, h, w)`` "pull" displacement ``u`` such that fixed voxel ``p``
  corresponds to moving position ``p + u(p)``, **in voxels of that level's grid** (1, 2 and 4 mm on
  the 1 mm network grid for high, mid and low). Channel order **(x, y, z)**: channel 0 is the
  displacement along the W (last) array axis, 1 along H, 2 along D. For an array indexed
  ``(z, y, x)`` on an LPS-aligned grid this is the (x, y, z) LPS component order of DESIGN.md;
  multiply by the level's spacing to get mm.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from jrs.training.networks.blocks import ConvBlock, Head, center_crop, down_block, upsample

#: Output levels, coarse to fine.
LEVELS: tuple[str, ...] = ("low", "mid", "high")
#: Number of segmentation classes (labels 0..4).
NUM_CLASSES = 5
#: Number of displacement components (x, y, z).
NUM_DVF = 3
#: Input voxels cropped per side to obtain a level's target grid.
LEVEL_CROP: dict[str, int] = {"low": 14, "mid": 18, "high": 20}
#: Decimation of a level's target grid (its voxel size in input voxels).
LEVEL_STRIDE: dict[str, int] = {"low": 4, "mid": 2, "high": 1}
#: Valid input names, in the documented channel order of the defaults.
INPUT_NAMES: tuple[str, ...] = ("fixed", "moving", "moving_labels")
#: The paper's channel widths (c0, c1, c2).
DEFAULT_CHANNELS: tuple[int, int, int] = (23, 45, 91)

Inputs = torch.Tensor | Mapping[str, torch.Tensor]


def check_patch_size(n: int) -> None:
    """Raise ``ValueError`` unless ``n`` is a valid input size (a multiple of 4, >= 44)."""
    if n < 44 or n % 4 != 0:
        raise ValueError(f"input size must be a multiple of 4 and >= 44, got {n}")


def level_size(n: int, level: str) -> int:
    """Output size of ``level`` for input size ``n`` (96 -> low 17, mid 30, high 56)."""
    check_patch_size(n)
    return {"low": n // 4 - 7, "mid": n // 2 - 18, "high": n - 40}[level]


def crop_to_level(x: torch.Tensor, level: str) -> torch.Tensor:
    """Cut a level's target from an input-grid patch: crop per side, then decimate.

    The crop is 20 / 18 / 14 voxels per side and the stride 1 / 2 / 4 for high / mid / low, so
    target voxel ``k`` of the level is input voxel ``crop + stride * k`` on every axis.

    Args:
        x: ``(B, C, D, H, W)`` on the input grid (image, label map or one-hot labels).
        level: ``"low"``, ``"mid"`` or ``"high"``.

    Returns:
        ``(B, C, d, h, w)`` with ``d = level_size(D, level)`` (e.g. 17 / 30 / 56 for D = 96).
    """
    if level not in LEVEL_CROP:
        raise ValueError(f"unknown level {level!r}; expected one of {LEVELS}")
    if x.dim() != 5:
        raise ValueError(f"expected a (B, C, D, H, W) tensor, got shape {tuple(x.shape)}")
    for n in x.shape[2:]:
        check_patch_size(int(n))
    c, s = LEVEL_CROP[level], LEVEL_STRIDE[level]
    return x[..., c:-c:s, c:-c:s, c:-c:s]


@dataclass
class NetworkOutput:
    """Per-level outputs of a network.

    Attributes:
        seg: level -> segmentation logits ``(B, 5, d, h, w)``; empty when the network has no
            segmentation heads.
        dvf: level -> displacement ``(B, 3, d, h, w)`` in voxels of the level's grid, channels
            (x, y, z) = (W, H, D) axes; empty when the network has no registration heads.
    """

    seg: dict[str, torch.Tensor] = field(default_factory=dict)
    dvf: dict[str, torch.Tensor] = field(default_factory=dict)

    def flat(self) -> dict[str, torch.Tensor]:
        """All outputs in one dict keyed ``"seg_low"``, ..., ``"dvf_high"`` (e.g. for ONNX)."""
        out = {f"seg_{k}": v for k, v in self.seg.items()}
        out.update({f"dvf_{k}": v for k, v in self.dvf.items()})
        return out


def gather_inputs(
    names: Sequence[str],
    fixed: Inputs,
    moving: torch.Tensor | None = None,
    moving_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Concatenate the named inputs along the channel axis.

    Args:
        names: Input names in channel order, from ``"fixed"``, ``"moving"``, ``"moving_labels"``.
        fixed: Daily CT ``I_f`` ``(B, 1, D, H, W)`` (HU / 1000), or a mapping name -> tensor
            holding every input (then ``moving`` and ``moving_labels`` must be ``None``).
        moving: Pre-aligned planning CT ``I_m`` ``(B, 1, D, H, W)`` (HU / 1000).
        moving_labels: Pre-aligned planning labels ``S_m`` ``(B, 1, D, H, W)``, label ids 0..4
            as float.

    Returns:
        ``(B, len(names), D, H, W)``.
    """
    if isinstance(fixed, Mapping):
        if moving is not None or moving_labels is not None:
            raise ValueError("pass either a mapping of inputs or explicit tensors, not both")
        table: dict[str, torch.Tensor | None] = dict(fixed)
    else:
        table = {"fixed": fixed, "moving": moving, "moving_labels": moving_labels}
    parts = []
    for name in names:
        t = table.get(name)
        if t is None:
            raise ValueError(f"network input {name!r} is required but was not given")
        if t.dim() != 5 or t.shape[1] != 1:
            raise ValueError(f"input {name!r} must be (B, 1, D, H, W), got {tuple(t.shape)}")
        parts.append(t)
    x = torch.cat(parts, dim=1)
    for n in x.shape[2:]:
        check_patch_size(int(n))
    return x


def check_input_names(names: Sequence[str]) -> tuple[str, ...]:
    """Validate a tuple of input names and return it as a tuple."""
    names = tuple(names)
    if not names:
        raise ValueError("a network needs at least one input")
    bad = [n for n in names if n not in INPUT_NAMES]
    if bad or len(set(names)) != len(names):
        raise ValueError(f"invalid input names {names}; choose distinct names from {INPUT_NAMES}")
    return names


@dataclass
class EncoderFeatures:
    """Features of the U-Net encoder.

    Attributes:
        skip_a: Output of e0b, ``(B, c0, n-4, ...)``.
        skip_b: Output of e1b, ``(B, c1, n/2-6, ...)``.
    """

    skip_a: torch.Tensor
    skip_b: torch.Tensor


class UNetEncoder(nn.Module):
    """Encoder part e0a, e0b, d0, e1a, e1b of the base U-Net.

    Args:
        in_channels: Number of input channels.
        channels: ``(c0, c1, c2)`` (only c0 and c1 are used here).
    """

    def __init__(self, in_channels: int, channels: Sequence[int]) -> None:
        super().__init__()
        c0, c1 = channels[0], channels[1]
        self.e0a = ConvBlock(in_channels, c0)
        self.e0b = ConvBlock(c0, c0)
        self.d0 = down_block(c0, c0)
        self.e1a = ConvBlock(c0, c1)
        self.e1b = ConvBlock(c1, c1)

    def level0(self, x: torch.Tensor) -> torch.Tensor:
        """e0a, e0b: ``(B, C_in, n, ...) -> (B, c0, n-4, ...)`` (skip A)."""
        return self.e0b(self.e0a(x))

    def level1(self, x: torch.Tensor) -> torch.Tensor:
        """e1a, e1b on the output of d0: ``(B, c0, n/2-2, ...) -> (B, c1, n/2-6, ...)`` (skip B)."""
        return self.e1b(self.e1a(x))

    def forward(self, x: torch.Tensor) -> EncoderFeatures:
        """Run the encoder on ``x`` ``(B, C_in, n, n, n)`` and return both skips."""
        skip_a = self.level0(x)
        skip_b = self.level1(self.d0(skip_a))
        return EncoderFeatures(skip_a=skip_a, skip_b=skip_b)


class UNetDecoder(nn.Module):
    """Bottom and decoder part d1, b0, b1, u1, m0, m1, u0, h0, h1 of the base U-Net.

    Args:
        channels: ``(c0, c1, c2)``.
    """

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        c0, c1, c2 = channels
        self.d1 = down_block(c1, c1)
        self.b0 = ConvBlock(c1, c2)
        self.b1 = ConvBlock(c2, c2)
        self.m0 = ConvBlock(c2 + c1, c1)
        self.m1 = ConvBlock(c1, c1)
        self.h0 = ConvBlock(c1 + c0, c0)
        self.h1 = ConvBlock(c0, c0)

    def bottom(self, x: torch.Tensor) -> torch.Tensor:
        """b0, b1 on the output of d1: ``(B, c1, n/4-3, ...) -> (B, c2, n/4-7, ...)`` (low)."""
        return self.b1(self.b0(x))

    def mid(self, up: torch.Tensor, skip_b: torch.Tensor) -> torch.Tensor:
        """Concat [up, crop(skip B, 4)], m0, m1: ``-> (B, c1, n/2-18, ...)`` (mid).

        Args:
            up: Up-sampled low features ``(B, c2, n/2-14, ...)``.
            skip_b: Skip B ``(B, c1, n/2-6, ...)``.
        """
        return self.m1(self.m0(torch.cat([up, center_crop(skip_b, 4)], dim=1)))

    def high(self, up: torch.Tensor, skip_a: torch.Tensor) -> torch.Tensor:
        """Concat [up, crop(skip A, 16)], h0, h1: ``-> (B, c0, n-40, ...)`` (high).

        Args:
            up: Up-sampled mid features ``(B, c1, n-36, ...)``.
            skip_a: Skip A ``(B, c0, n-4, ...)``.
        """
        return self.h1(self.h0(torch.cat([up, center_crop(skip_a, 16)], dim=1)))

    def forward(self, feats: EncoderFeatures) -> dict[str, torch.Tensor]:
        """Decode the encoder features into level features ``low``, ``mid``, ``high``."""
        low = self.bottom(self.d1(feats.skip_b))
        mid = self.mid(upsample(low), feats.skip_b)
        high = self.high(upsample(mid), feats.skip_a)
        return {"low": low, "mid": mid, "high": high}


def level_channels(channels: Sequence[int]) -> dict[str, int]:
    """Feature channels at each output level: low c2, mid c1, high c0."""
    return {"low": channels[2], "mid": channels[1], "high": channels[0]}


def make_heads(channels: Sequence[int], out_channels: int, scale: float = 1.0) -> nn.ModuleDict:
    """One 1x1x1 head per level mapping the level's features to ``out_channels``.

    Args:
        channels: ``(c0, c1, c2)`` of the network.
        out_channels: Output channels of every head.
        scale: Fixed output scale of every head (see :class:`~training.networks.blocks.Head`).
    """
    return nn.ModuleDict(
        {k: Head(c, out_channels, scale) for k, c in level_channels(channels).items()}
    )


class UNetNetwork(nn.Module):
    """One base U-Net with segmentation and/or registration heads at every level.

    Configurations of METHOD.md (see :func:`jrs.training.networks.build`): Seg (inputs ``fixed``,
    seg heads), Reg (``fixed, moving``; DVF heads), JRS-reg (``fixed, moving, moving_labels``; DVF
    heads) and Dense (``fixed, moving, moving_labels``; both heads).

    Args:
        inputs: Input names in channel order.
        channels: ``(c0, c1, c2)``.
        seg_head: Whether to attach 5-class segmentation heads.
        reg_head: Whether to attach 3-component DVF heads.
        dvf_scale: Fixed output scale of the DVF heads (1: the paper's heads; see
            :class:`~training.networks.blocks.Head`).
    """

    def __init__(
        self,
        inputs: Sequence[str] = ("fixed",),
        channels: Sequence[int] = DEFAULT_CHANNELS,
        seg_head: bool = True,
        reg_head: bool = False,
        dvf_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if not (seg_head or reg_head):
            raise ValueError("a network needs segmentation heads, registration heads or both")
        if len(channels) != 3:
            raise ValueError(f"channels must be (c0, c1, c2), got {tuple(channels)}")
        self.inputs = check_input_names(inputs)
        self.channels = tuple(int(c) for c in channels)
        self.encoder = UNetEncoder(len(self.inputs), self.channels)
        self.decoder = UNetDecoder(self.channels)
        self.seg_heads = make_heads(self.channels, NUM_CLASSES) if seg_head else None
        self.dvf_heads = make_heads(self.channels, NUM_DVF, dvf_scale) if reg_head else None

    @property
    def has_seg(self) -> bool:
        """Whether the network outputs segmentation logits."""
        return self.seg_heads is not None

    @property
    def has_dvf(self) -> bool:
        """Whether the network outputs displacement fields."""
        return self.dvf_heads is not None

    def forward(
        self,
        fixed: Inputs,
        moving: torch.Tensor | None = None,
        moving_labels: torch.Tensor | None = None,
    ) -> NetworkOutput:
        """Run the network.

        Args:
            fixed: ``I_f`` ``(B, 1, n, n, n)`` or a mapping with keys among ``"fixed"``,
                ``"moving"``, ``"moving_labels"``.
            moving: ``I_m`` ``(B, 1, n, n, n)`` when the network uses it.
            moving_labels: ``S_m`` ``(B, 1, n, n, n)``, label ids as float, when used.

        Returns:
            :class:`NetworkOutput` with ``seg`` and/or ``dvf`` at levels low / mid / high
            (``n/4-7``, ``n/2-18``, ``n-40`` voxels per axis).
        """
        x = gather_inputs(self.inputs, fixed, moving, moving_labels)
        feats = self.decoder(self.encoder(x))
        out = NetworkOutput()
        if self.seg_heads is not None:
            out.seg = {k: self.seg_heads[k](feats[k]) for k in LEVELS}
        if self.dvf_heads is not None:
            out.dvf = {k: self.dvf_heads[k](feats[k]) for k in LEVELS}
        return out
