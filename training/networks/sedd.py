"""SEDD: shared encoder, double decoder (METHOD.md).

The encoder e0a..e1b (through skip B) is shared; from d1 on there is one decoder path per task
(segmentation and registration), both reading the shared skips A and B. Channels 16, 32, 64.
Output geometry and conventions as in :mod:`jrs.training.networks.unet`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from jrs.training.networks.unet import (
    LEVELS,
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

#: The paper's channel widths of SEDD.
SEDD_CHANNELS: tuple[int, int, int] = (16, 32, 64)


class SEDD(nn.Module):
    """Shared-encoder double-decoder network.

    Args:
        inputs: Input names in channel order (default ``I_f, I_m, S_m``).
        channels: ``(c0, c1, c2)``.
        dvf_scale: Fixed output scale of the DVF heads (see
            :class:`~training.networks.blocks.Head`).
    """

    has_seg = True
    has_dvf = True

    def __init__(
        self,
        inputs: Sequence[str] = ("fixed", "moving", "moving_labels"),
        channels: Sequence[int] = SEDD_CHANNELS,
        dvf_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if len(channels) != 3:
            raise ValueError(f"channels must be (c0, c1, c2), got {tuple(channels)}")
        self.inputs = check_input_names(inputs)
        self.channels = tuple(int(c) for c in channels)
        self.encoder = UNetEncoder(len(self.inputs), self.channels)
        self.seg_decoder = UNetDecoder(self.channels)
        self.reg_decoder = UNetDecoder(self.channels)
        self.seg_heads = make_heads(self.channels, NUM_CLASSES)
        self.dvf_heads = make_heads(self.channels, NUM_DVF, dvf_scale)

    def forward(
        self,
        fixed: Inputs,
        moving: torch.Tensor | None = None,
        moving_labels: torch.Tensor | None = None,
    ) -> NetworkOutput:
        """Run the network.

        Args:
            fixed: ``I_f`` ``(B, 1, n, n, n)`` or a mapping of named inputs.
            moving: ``I_m`` ``(B, 1, n, n, n)``.
            moving_labels: ``S_m`` ``(B, 1, n, n, n)``, label ids as float.

        Returns:
            :class:`NetworkOutput` with ``seg`` ``(B, 5, ...)`` and ``dvf`` ``(B, 3, ...)`` at
            levels low / mid / high.
        """
        x = gather_inputs(self.inputs, fixed, moving, moving_labels)
        feats = self.encoder(x)
        seg = self.seg_decoder(feats)
        reg = self.reg_decoder(feats)
        return NetworkOutput(
            seg={k: self.seg_heads[k](seg[k]) for k in LEVELS},
            dvf={k: self.dvf_heads[k](reg[k]) for k in LEVELS},
        )
