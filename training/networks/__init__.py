"""The six networks of METHOD.md and their factory.

``build(name, **overrides)`` returns a fresh, initialised network. Every network's ``forward``
takes ``(fixed, moving=None, moving_labels=None)`` tensors of shape ``(B, 1, n, n, n)`` (``n`` a
multiple of 4, ``n >= 44``; intensities HU / 1000, labels as float ids 0..4) or one mapping with
those keys, and returns a :class:`NetworkOutput` with per-level ``seg`` logits ``(B, 5, ...)``
and/or ``dvf`` displacements ``(B, 3, ...)`` (channels x, y, z = W, H, D axes; voxels of the
level grid) at ``"low"``, ``"mid"``, ``"high"`` (``n/4-7``, ``n/2-18``, ``n-40`` per axis:
17, 30, 56 for 96).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from jrs.training.networks.crossstitch import CROSS_STITCH_CHANNELS, STITCH_NAMES, CrossStitchNet
from jrs.training.networks.sedd import SEDD, SEDD_CHANNELS
from jrs.training.networks.unet import (
    DEFAULT_CHANNELS,
    INPUT_NAMES,
    LEVEL_CROP,
    LEVEL_STRIDE,
    LEVELS,
    NUM_CLASSES,
    NUM_DVF,
    NetworkOutput,
    UNetNetwork,
    check_patch_size,
    crop_to_level,
    level_size,
)

#: Names accepted by :func:`build`.
NETWORK_NAMES: tuple[str, ...] = ("seg", "reg", "jrs-reg", "dense", "sedd", "cross-stitch")

#: Parameter counts reported in the paper (Elmahdy et al. 2021), for reference and tests.
PAPER_PARAMETER_COUNTS: dict[str, int] = {
    "seg": 779_436,
    "reg": 779_733,
    "jrs-reg": 779_733,
    "dense": 781_164,
    "sedd": 722_936,
    "cross-stitch": 779_000,
}

#: Default constructor arguments per network name; ``build`` overrides merge into these.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "seg": {
        "inputs": ("fixed",),
        "channels": DEFAULT_CHANNELS,
        "seg_head": True,
        "reg_head": False,
    },
    "reg": {
        "inputs": ("fixed", "moving"),
        "channels": DEFAULT_CHANNELS,
        "seg_head": False,
        "reg_head": True,
        "dvf_scale": 1.0,
    },
    "jrs-reg": {
        "inputs": ("fixed", "moving", "moving_labels"),
        "channels": DEFAULT_CHANNELS,
        "seg_head": False,
        "reg_head": True,
        "dvf_scale": 1.0,
    },
    "dense": {
        "inputs": ("fixed", "moving", "moving_labels"),
        "channels": DEFAULT_CHANNELS,
        "seg_head": True,
        "reg_head": True,
        "dvf_scale": 1.0,
    },
    "sedd": {
        "inputs": ("fixed", "moving", "moving_labels"),
        "channels": SEDD_CHANNELS,
        "dvf_scale": 1.0,
    },
    "cross-stitch": {
        "seg_inputs": ("fixed",),
        "reg_inputs": ("fixed", "moving", "moving_labels"),
        "channels": CROSS_STITCH_CHANNELS,
        "dvf_scale": 1.0,
    },
}

_CLASSES: dict[str, Callable[..., nn.Module]] = {
    "seg": UNetNetwork,
    "reg": UNetNetwork,
    "jrs-reg": UNetNetwork,
    "dense": UNetNetwork,
    "sedd": SEDD,
    "cross-stitch": CrossStitchNet,
}


def build(name: str, **overrides: Any) -> nn.Module:
    """Build a network by name.

    Args:
        name: One of :data:`NETWORK_NAMES`.
        **overrides: Constructor arguments replacing the defaults, e.g. ``channels=(8, 16, 32)``,
            ``inputs=("fixed", "moving")`` (single U-Net networks and SEDD) or
            ``seg_inputs=(...)``, ``reg_inputs=(...)`` (cross-stitch), ``dvf_scale=10.0``
            (networks with DVF heads: a fixed output scale, see
            :class:`~training.networks.blocks.Head`).

    Returns:
        The initialised network (train mode), whose forward returns a :class:`NetworkOutput`.

    Raises:
        ValueError: For an unknown name or an override the network does not accept.
    """
    key = name.lower()
    if key not in _DEFAULTS:
        raise ValueError(f"unknown network {name!r}; expected one of {NETWORK_NAMES}")
    unknown = set(overrides) - set(_DEFAULTS[key])
    if unknown:
        raise ValueError(
            f"network {name!r} does not accept {sorted(unknown)}; valid: {sorted(_DEFAULTS[key])}"
        )
    kwargs = {**_DEFAULTS[key], **overrides}
    return _CLASSES[key](**kwargs)


__all__ = [
    "INPUT_NAMES",
    "LEVELS",
    "LEVEL_CROP",
    "LEVEL_STRIDE",
    "NETWORK_NAMES",
    "NUM_CLASSES",
    "NUM_DVF",
    "PAPER_PARAMETER_COUNTS",
    "SEDD",
    "STITCH_NAMES",
    "CrossStitchNet",
    "NetworkOutput",
    "UNetNetwork",
    "build",
    "check_patch_size",
    "crop_to_level",
    "level_size",
]
