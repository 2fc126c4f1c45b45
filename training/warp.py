"""Backward warping of images and labels by a displacement field (the one grid-sample helper).

Axis convention (fixed here, tested in ``tests/training/test_warp.py``): volumes are
``(B, C, D, H, W)`` and a displacement field ``u`` is ``(B, 3, D, H, W)`` in voxels of its own grid,
with channel 0 the displacement along W (x), channel 1 along H (y) and channel 2 along D (z). The
warp is "pull": ``warped(p) = moving(p + u(p))``, trilinear, border padding. ``grid_sample`` wants
the sampling grid as ``(B, D, H, W, 3)`` with the last axis ordered (x, y, z) = (W, H, D) and
normalised to ``[-1, 1]`` with ``align_corners=True`` (``-1`` = centre of voxel 0, ``+1`` = centre
of the last voxel), so the (x, y, z) channel order needs no permutation of components.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.nn import functional

WarpMode = Literal["bilinear", "nearest"]


def identity_grid(
    shape: tuple[int, int, int],
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Voxel coordinates of a grid in the (x, y, z) channel order.

    Args:
        shape: Spatial shape ``(D, H, W)``.
        device: Device of the result.
        dtype: Floating dtype of the result.

    Returns:
        ``(1, 3, D, H, W)``: channel 0 the W index (x), 1 the H index (y), 2 the D index (z).
    """
    d, h, w = shape
    zz, yy, xx = torch.meshgrid(
        torch.arange(d, device=device, dtype=dtype),
        torch.arange(h, device=device, dtype=dtype),
        torch.arange(w, device=device, dtype=dtype),
        indexing="ij",
    )
    return torch.stack([xx, yy, zz], dim=0).unsqueeze(0)


def sampling_grid(dvf: torch.Tensor, moving_shape: tuple[int, int, int]) -> torch.Tensor:
    """Normalised ``grid_sample`` grid of the positions ``p + u(p)``.

    Args:
        dvf: ``(B, 3, D, H, W)`` displacement in voxels, channels (x, y, z).
        moving_shape: Spatial shape ``(D_m, H_m, W_m)`` of the image that will be sampled; the
            positions are voxel indices of that image.

    Returns:
        ``(B, D, H, W, 3)`` grid with last axis (x, y, z) normalised for ``align_corners=True``.
    """
    if dvf.dim() != 5 or dvf.shape[1] != 3:
        raise ValueError(f"dvf must be (B, 3, D, H, W), got shape {tuple(dvf.shape)}")
    spatial = (int(dvf.shape[2]), int(dvf.shape[3]), int(dvf.shape[4]))
    pos = identity_grid(spatial, device=dvf.device, dtype=dvf.dtype) + dvf
    d_m, h_m, w_m = moving_shape
    # Sizes in (x, y, z) order; a 1-voxel axis maps to 0 (its only centre).
    size = torch.tensor(
        [max(w_m - 1, 1), max(h_m - 1, 1), max(d_m - 1, 1)], device=dvf.device, dtype=dvf.dtype
    ).view(1, 3, 1, 1, 1)
    grid = 2.0 * pos / size - 1.0
    return grid.permute(0, 2, 3, 4, 1)


def warp(
    moving: torch.Tensor,
    dvf: torch.Tensor,
    mode: WarpMode = "bilinear",
) -> torch.Tensor:
    """Backward-warp ``moving`` by ``dvf``: ``warped(p) = moving(p + u(p))``.

    Args:
        moving: ``(B, C, D_m, H_m, W_m)`` image or one-hot labels (float).
        dvf: ``(B, 3, D, H, W)`` displacement in voxels of ``moving``'s grid, channels (x, y, z)
            = displacement along (W, H, D). Usually ``D, H, W == D_m, H_m, W_m``.
        mode: ``"bilinear"`` (trilinear for 3-D; differentiable in ``dvf``) or ``"nearest"``
            (evaluation only: no gradient to ``dvf``).

    Returns:
        ``(B, C, D, H, W)`` warped volume; positions outside ``moving`` take the border value.
    """
    if moving.dim() != 5:
        raise ValueError(f"moving must be (B, C, D, H, W), got shape {tuple(moving.shape)}")
    if dvf.shape[0] != moving.shape[0]:
        raise ValueError(
            f"batch sizes differ: moving {tuple(moving.shape)}, dvf {tuple(dvf.shape)}"
        )
    moving_shape = (int(moving.shape[2]), int(moving.shape[3]), int(moving.shape[4]))
    grid = sampling_grid(dvf, moving_shape)
    return functional.grid_sample(
        moving.to(dvf.dtype), grid, mode=mode, padding_mode="border", align_corners=True
    )


def one_hot(labels: torch.Tensor, num_classes: int = 5) -> torch.Tensor:
    """One-hot encode an integer label map given as ids (int or float channel).

    Args:
        labels: ``(B, 1, D, H, W)`` or ``(B, D, H, W)`` label ids ``0..num_classes-1`` (floats are
            rounded).
        num_classes: Number of classes.

    Returns:
        ``(B, num_classes, D, H, W)`` float32 one-hot map.
    """
    if labels.dim() == 5:
        if labels.shape[1] != 1:
            raise ValueError(f"label map must have one channel, got shape {tuple(labels.shape)}")
        labels = labels[:, 0]
    if labels.dim() != 4:
        raise ValueError(f"label map must be (B, 1, D, H, W), got shape {tuple(labels.shape)}")
    ids = torch.round(labels).long() if labels.is_floating_point() else labels.long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_classes):
        raise ValueError(
            f"label ids must lie in 0..{num_classes - 1}, got {int(ids.min())}..{int(ids.max())}"
        )
    return functional.one_hot(ids, num_classes).permute(0, 4, 1, 2, 3).to(torch.float32)


def warp_labels(labels: torch.Tensor, dvf: torch.Tensor, num_classes: int = 5) -> torch.Tensor:
    """Warp a label map as trilinearly interpolated one-hot channels (differentiable in ``dvf``).

    Args:
        labels: ``(B, 1, D, H, W)`` label ids, or an already one-hot ``(B, K, D, H, W)`` map with
            ``K == num_classes``.
        dvf: ``(B, 3, D, H, W)`` displacement in voxels, channels (x, y, z).
        num_classes: Number of classes ``K``.

    Returns:
        ``(B, K, D, H, W)`` soft labels (each voxel sums to 1); ``argmax`` over the channel axis
        gives a hard label map for evaluation.
    """
    oh = (
        labels
        if labels.shape[1] == num_classes and num_classes > 1
        else one_hot(labels, num_classes)
    )
    return warp(oh, dvf, mode="bilinear")
