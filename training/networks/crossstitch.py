"""Cross-stitch network: two base U-Nets joined by four cross-stitch units (METHOD.md).

The segmentation branch reads ``I_f`` and the registration branch ``I_f, I_m, S_m`` (the paper's
final choice; both input sets are configurable). Channels 16, 32, 64 per branch. Cross-stitch units
sit after d0, after d1, after the up-sampling of u1 and after the up-sampling of u0 (each before the
concatenation); the skips come from each branch's own un-stitched features. Output geometry and
conventions as in :mod:`jrs.training.networks.unet`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from jrs.training.networks.blocks import CrossStitch, upsample
from jrs.training.networks.unet import (
    NUM_CLASSES,
    NUM_DVF,
    Inputs,
    NetworkOutput,
    UNetDecoder,
    UNetEncoder,
    check_input_names,
    gather_inputs,
    make_heads,
)

#: The paper's channel widths per branch.
CROSS_STITCH_CHANNELS: tuple[int, int, int] = (16, 32, 64)
#: Names of the four cross-stitch units, in forward order.
STITCH_NAMES: tuple[str, ...] = ("d0", "d1", "u1", "u0")


class CrossStitchNet(nn.Module):
    """Two U-Nets (segmentation, registration) joined by cross-stitch units.

    Args:
        seg_inputs: Input names of the segmentation branch, in channel order.
        reg_inputs: Input names of the registration branch, in channel order.
        channels: ``(c0, c1, c2)`` of each branch.
        dvf_scale: Fixed output scale of the DVF heads (1: the paper's heads; see
            :class:`~training.networks.blocks.Head`).
    """

    has_seg = True
    has_dvf = True

    def __init__(
        self,
        seg_inputs: Sequence[str] = ("fixed",),
        reg_inputs: Sequence[str] = ("fixed", "moving", "moving_labels"),
        channels: Sequence[int] = CROSS_STITCH_CHANNELS,
        dvf_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if len(channels) != 3:
            raise ValueError(f"channels must be (c0, c1, c2), got {tuple(channels)}")
        self.seg_inputs = check_input_names(seg_inputs)
        self.reg_inputs = check_input_names(reg_inputs)
        self.inputs = tuple(
            n
            for n in ("fixed", "moving", "moving_labels")
            if n in self.seg_inputs or n in self.reg_inputs
        )
        self.channels = c0, c1, c2 = tuple(int(c) for c in channels)
        self.seg_encoder = UNetEncoder(len(self.seg_inputs), self.channels)
        self.reg_encoder = UNetEncoder(len(self.reg_inputs), self.channels)
        self.seg_decoder = UNetDecoder(self.channels)
        self.reg_decoder = UNetDecoder(self.channels)
        self.stitches = nn.ModuleDict(
            {
                "d0": CrossStitch(c0),
                "d1": CrossStitch(c1),
                "u1": CrossStitch(c2),
                "u0": CrossStitch(c1),
            }
        )
        self.seg_heads = make_heads(self.channels, NUM_CLASSES)
        self.dvf_heads = make_heads(self.channels, NUM_DVF, dvf_scale)

    def cross_stitch_alphas(self) -> dict[str, torch.Tensor]:
        """The four cross-stitch matrices, detached, for logging.

        Returns:
            Unit name (``"d0"``, ``"d1"``, ``"u1"``, ``"u0"``) -> ``(C, 2, 2)`` tensor; row 0 mixes
            into the segmentation branch, row 1 into the registration branch; column 0 weighs
            the segmentation input, column 1 the registration input.
        """
        return {k: cast(CrossStitch, self.stitches[k]).alpha.detach().clone() for k in STITCH_NAMES}

    def forward(
        self,
        fixed: Inputs,
        moving: torch.Tensor | None = None,
        moving_labels: torch.Tensor | None = None,
    ) -> NetworkOutput:
        """Run both branches.

        Args:
            fixed: ``I_f`` ``(B, 1, n, n, n)`` or a mapping of named inputs.
            moving: ``I_m`` ``(B, 1, n, n, n)`` when a branch uses it.
            moving_labels: ``S_m`` ``(B, 1, n, n, n)``, label ids as float, when a branch uses it.

        Returns:
            :class:`NetworkOutput`: ``seg`` from the segmentation branch ``(B, 5, ...)`` and
            ``dvf`` from the registration branch ``(B, 3, ...)`` at levels low / mid / high.
        """
        xs = gather_inputs(self.seg_inputs, fixed, moving, moving_labels)
        xr = gather_inputs(self.reg_inputs, fixed, moving, moving_labels)
        es, er = self.seg_encoder, self.reg_encoder
        ds, dr = self.seg_decoder, self.reg_decoder
        st = self.stitches

        skip_a_s, skip_a_r = es.level0(xs), er.level0(xr)
        s, r = st["d0"](es.d0(skip_a_s), er.d0(skip_a_r))
        skip_b_s, skip_b_r = es.level1(s), er.level1(r)
        s, r = st["d1"](ds.d1(skip_b_s), dr.d1(skip_b_r))
        low_s, low_r = ds.bottom(s), dr.bottom(r)
        s, r = st["u1"](upsample(low_s), upsample(low_r))
        mid_s, mid_r = ds.mid(s, skip_b_s), dr.mid(r, skip_b_r)
        s, r = st["u0"](upsample(mid_s), upsample(mid_r))
        high_s, high_r = ds.high(s, skip_a_s), dr.high(r, skip_a_r)

        seg_feats = {"low": low_s, "mid": mid_s, "high": high_s}
        reg_feats = {"low": low_r, "mid": mid_r, "high": high_r}
        return NetworkOutput(
            seg={k: self.seg_heads[k](v) for k, v in seg_feats.items()},
            dvf={k: self.dvf_heads[k](v) for k, v in reg_feats.items()},
        )
