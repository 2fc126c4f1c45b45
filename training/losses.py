"""Losses of METHOD.md: soft Dice, local NCC, bending energy, deep supervision and task losses.

Every task loss is computed at the three output levels and combined with weights 1/3 each (deep
supervision). A level's targets are cut from the input patch by
:func:`jrs.training.networks.crop_to_level` (crop 20 / 18 / 14 voxels per side, stride 1 / 2 / 4 for
high / mid / low). Task losses:

* ``L_seg = DSC(softmax(seg logits), S_f)``;
* ``L_reg = NCC(I_f, I_m o u) + 0.5 BE(u)`` (the bending-energy weight is fixed, never learned);
* ``L_regDSC = DSC(S_m o u, S_f)`` with the one-hot ``S_m`` warped trilinearly (differentiable).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch.nn import functional

from jrs.training.networks.unet import LEVELS, NUM_CLASSES, NetworkOutput, crop_to_level
from jrs.training.warp import one_hot, warp

#: Weight of each level in deep supervision.
LEVEL_WEIGHTS: dict[str, float] = {level: 1.0 / 3.0 for level in LEVELS}
#: Fixed weight of the bending energy inside ``L_reg``.
BENDING_WEIGHT = 0.5
#: Weight of the zero-field term of identity samples (same image twice), in voxels^-2.
IDENTITY_WEIGHT = 1.0
#: Foreground classes over which the Dice loss is averaged (background excluded).
DICE_CLASSES: tuple[int, ...] = (1, 2, 3, 4)
#: Side of the NCC box window, in voxels of the level.
NCC_WINDOW = 9
#: Lower clamp of the local cross term and variances of the NCC.
NCC_CLAMP = 1e-4
#: Names of the task losses, as keyed in :func:`compute_task_losses` and the weighting schemes.
TASK_NAMES: tuple[str, ...] = ("seg", "reg", "reg_dsc")
#: Task losses each network trains (METHOD.md): Seg L_seg, Reg L_reg, joint networks all they can.
TASKS_BY_NETWORK: dict[str, tuple[str, ...]] = {
    "seg": ("seg",),
    "reg": ("reg",),
    "jrs-reg": ("reg", "reg_dsc"),
    "dense": TASK_NAMES,
    "sedd": TASK_NAMES,
    "cross-stitch": TASK_NAMES,
}

__all__ = [
    "BENDING_WEIGHT",
    "IDENTITY_WEIGHT",
    "LEVEL_WEIGHTS",
    "TASKS_BY_NETWORK",
    "TASK_NAMES",
    "TaskLoss",
    "bending_energy",
    "compute_task_losses",
    "crop_to_level",
    "deep_supervision",
    "dice_loss",
    "ncc_loss",
    "present_classes",
    "reg_dsc_loss",
    "reg_loss",
    "seg_loss",
]


def dice_loss(
    probs: torch.Tensor,
    target: torch.Tensor,
    classes: Sequence[int] = DICE_CLASSES,
    eps: float = 1e-7,
    class_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Soft Dice loss over the given classes, summed over batch and voxels.

    ``1 - mean_c 2 sum(p_c g_c) / (sum(p_c) + sum(g_c) + eps)``.

    With ``class_mask`` a class is summed only over the samples where it is known (a label that
    a training scan does not delineate, e.g. seminal vesicles of a patient without them, is
    excluded from that sample's Dice terms instead of being counted as background), and a class
    known in no sample of the batch is left out of the mean (METHOD.md, deviations).

    Args:
        probs: ``(B, K, D, H, W)`` class probabilities (softmax output or warped one-hot).
        target: ``(B, K, D, H, W)`` one-hot ground truth.
        classes: Channel indices included (default 1..4: background excluded).
        eps: Added to the denominator.
        class_mask: ``(B, K)`` 1 where class k is delineated in sample b, 0 where it is unknown;
            ``None``: every class known everywhere (the original formula).

    Returns:
        Scalar loss in ``[0, 1]``: 0 for identical one-hot maps, 1 for disjoint ones. (A class
        absent from both maps contributes 0 to the mean Dice, i.e. raises the loss; this is the
        formula of the original.)
    """
    if probs.shape != target.shape:
        raise ValueError(
            f"probs and target differ in shape: {tuple(probs.shape)} vs {tuple(target.shape)}"
        )
    idx = list(classes)
    if class_mask is None:
        p = probs[:, idx].transpose(0, 1).reshape(len(idx), -1)
        g = target[:, idx].transpose(0, 1).reshape(len(idx), -1).to(p.dtype)
        dice = 2.0 * (p * g).sum(dim=1) / (p.sum(dim=1) + g.sum(dim=1) + eps)
        return 1.0 - dice.mean()
    if class_mask.shape != probs.shape[:2]:
        raise ValueError(
            f"class_mask must be (B, K) = {tuple(probs.shape[:2])}, got {tuple(class_mask.shape)}"
        )
    b = probs.shape[0]
    p = probs[:, idx].reshape(b, len(idx), -1)
    g = target[:, idx].reshape(b, len(idx), -1).to(p.dtype)
    w = class_mask[:, idx].to(p.dtype)  # (B, C)
    inter = (w * (p * g).sum(dim=2)).sum(dim=0)
    denom = (w * (p.sum(dim=2) + g.sum(dim=2))).sum(dim=0)
    known = w.sum(dim=0) > 0
    if not bool(known.any()):
        return probs.sum() * 0.0  # nothing to learn here; keeps the graph
    dice = 2.0 * inter[known] / (denom[known] + eps)
    return 1.0 - dice.mean()


def ncc_loss(
    fixed: torch.Tensor,
    warped: torch.Tensor,
    window: int = NCC_WINDOW,
    clamp: float = NCC_CLAMP,
) -> torch.Tensor:
    """Local normalised cross-correlation loss, ``1 - mean(cc)``.

    Box window ``window^3`` with zero padding. With the local sums ``S`` over the window and
    ``N`` the number of in-volume voxels in the window (``window^3`` in the interior),
    ``cross = S(IJ) - S(I) S(J) / N``, ``var_I = S(I^2) - S(I)^2 / N`` (likewise ``var_J``); cross
    and both variances are clamped at ``>= clamp`` and ``cc = cross / sqrt(var_I var_J)`` (not
    squared). In the interior this is the original's (VoxelMorph) formula; normalising by the
    in-volume count at the border keeps the loss exactly invariant to ``a I + b`` (``a > 0``).

    Args:
        fixed: ``(B, C, D, H, W)`` fixed image ``I``.
        warped: ``(B, C, D, H, W)`` warped moving image ``J``.
        window: Side of the box window (odd).
        clamp: Lower clamp of cross and variances.

    Returns:
        Scalar loss; 0 for identical (non-flat) images, at most about 1.
    """
    if fixed.shape != warped.shape:
        raise ValueError(
            f"fixed and warped differ in shape: {tuple(fixed.shape)} vs {tuple(warped.shape)}"
        )
    if fixed.dim() != 5:
        raise ValueError(f"expected (B, C, D, H, W) images, got shape {tuple(fixed.shape)}")
    if window % 2 != 1:
        raise ValueError(f"NCC window must be odd, got {window}")
    b, c = fixed.shape[:2]
    spatial = fixed.shape[2:]
    i = fixed.reshape(b * c, 1, *spatial)
    j = warped.reshape(b * c, 1, *spatial).to(i.dtype)
    kernel = torch.ones(1, 1, window, window, window, device=i.device, dtype=i.dtype)
    pad = window // 2

    def box(t: torch.Tensor) -> torch.Tensor:
        return functional.conv3d(t, kernel, padding=pad)

    # One convolution for the five local sums.
    sums = box(torch.cat([i, j, i * i, j * j, i * j], dim=0)).split(b * c, dim=0)
    s_i, s_j, s_ii, s_jj, s_ij = sums
    count = box(torch.ones_like(i[:1]))
    cross = (s_ij - s_i * s_j / count).clamp_min(clamp)
    var_i = (s_ii - s_i * s_i / count).clamp_min(clamp)
    var_j = (s_jj - s_j * s_j / count).clamp_min(clamp)
    cc = cross / torch.sqrt(var_i * var_j)
    return 1.0 - cc.mean()


def _central_diff(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Central difference ``(t[i+1] - t[i-1]) / 2`` along ``dim``; that axis shrinks by 2."""
    n = t.shape[dim]
    return (t.narrow(dim, 2, n - 2) - t.narrow(dim, 0, n - 2)) / 2.0


def _crop_spatial(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Centre-crop the spatial axes (2, 3, 4) of ``t`` to ``shape``."""
    for k, target in enumerate(shape):
        dim = 2 + k
        start = (t.shape[dim] - target) // 2
        t = t.narrow(dim, start, target)
    return t


def bending_energy(dvf: torch.Tensor) -> torch.Tensor:
    """Bending energy of a displacement field, in voxel units of its grid.

    Second derivatives by central differences applied twice along the spatial axes (2, 3, 4) of
    the channels-first tensor; the energy
    ``u_xx^2 + u_yy^2 + u_zz^2 + 2 (u_xy^2 + u_xz^2 + u_yz^2)`` is averaged over the batch, the
    three components and the interior voxels (2 voxels cropped per side, where every second
    derivative is defined).

    Args:
        dvf: ``(B, 3, D, H, W)`` displacement in voxels; ``D, H, W >= 5``.

    Returns:
        Scalar, 0 for any affine field, finite.
    """
    if dvf.dim() != 5:
        raise ValueError(f"dvf must be (B, 3, D, H, W), got shape {tuple(dvf.shape)}")
    if min(dvf.shape[2:]) < 5:
        raise ValueError(
            f"bending energy needs >= 5 voxels per spatial axis, got shape {tuple(dvf.shape)}"
        )
    interior = [int(s) - 4 for s in dvf.shape[2:]]
    first = {dim: _central_diff(dvf, dim) for dim in (2, 3, 4)}
    terms = torch.zeros_like(_crop_spatial(dvf, interior))
    for a in (2, 3, 4):
        for b in (2, 3, 4):
            if b < a:
                continue
            second = _crop_spatial(_central_diff(first[a], b), interior)
            terms = terms + (1.0 if a == b else 2.0) * second.pow(2)
    return terms.mean()


def deep_supervision(per_level: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Combine a loss computed at the three levels with weights 1/3 each.

    Args:
        per_level: ``{"low": ..., "mid": ..., "high": ...}`` scalar losses.

    Returns:
        ``sum_level LEVEL_WEIGHTS[level] * per_level[level]``.
    """
    if set(per_level) != set(LEVELS):
        raise ValueError(f"deep supervision needs levels {LEVELS}, got {sorted(per_level)}")
    total = LEVEL_WEIGHTS[LEVELS[0]] * per_level[LEVELS[0]]
    for k in LEVELS[1:]:
        total = total + LEVEL_WEIGHTS[k] * per_level[k]
    return total


@dataclass
class TaskLoss:
    """A deep-supervised task loss with its parts, for the optimiser and for logging.

    Attributes:
        total: Scalar, levels combined with weights 1/3.
        per_level: level -> scalar loss of that level.
        terms: Term name -> scalar deep-supervised term (e.g. ``"ncc"``, ``"bending"``).
    """

    total: torch.Tensor
    per_level: dict[str, torch.Tensor]
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


def _check_levels(outputs: Mapping[str, torch.Tensor], what: str) -> None:
    if set(outputs) != set(LEVELS):
        raise ValueError(f"{what} must hold levels {LEVELS}, got {sorted(outputs)}")


def seg_loss(
    seg_logits: Mapping[str, torch.Tensor],
    fixed_labels: torch.Tensor,
    class_mask: torch.Tensor | None = None,
) -> TaskLoss:
    """``L_seg``: soft Dice of the softmax of each level's logits against the fixed labels.

    Args:
        seg_logits: level -> ``(B, 5, d, h, w)`` logits.
        fixed_labels: ``S_f`` ``(B, 1, n, n, n)`` label ids on the input grid.
        class_mask: ``(B, 5)`` classes delineated per sample (see :func:`dice_loss`).

    Returns:
        :class:`TaskLoss`.
    """
    _check_levels(seg_logits, "seg_logits")
    target = one_hot(fixed_labels, NUM_CLASSES)
    per_level = {
        k: dice_loss(
            torch.softmax(seg_logits[k], dim=1), crop_to_level(target, k), class_mask=class_mask
        )
        for k in LEVELS
    }
    return TaskLoss(total=deep_supervision(per_level), per_level=per_level)


def reg_loss(
    dvf: Mapping[str, torch.Tensor],
    fixed: torch.Tensor,
    moving: torch.Tensor,
    bending_weight: float = BENDING_WEIGHT,
    identity: torch.Tensor | None = None,
    identity_weight: float = IDENTITY_WEIGHT,
) -> TaskLoss:
    """``L_reg = NCC(I_f, I_m o u) + 0.5 BE(u)`` at each level, deep-supervised.

    At each level the fixed and moving images are cropped and decimated like the targets; the
    moving one is warped by that level's DVF. For identity samples (the same image twice, whose
    true field is zero) the term ``identity_weight * mean(u^2)`` (voxels of the level, over those
    samples) is added: "nothing moved" must give no displacement.

    Args:
        dvf: level -> ``(B, 3, d, h, w)`` displacement in voxels of the level grid, (x, y, z).
        fixed: ``I_f`` ``(B, 1, n, n, n)``.
        moving: ``I_m`` ``(B, 1, n, n, n)``.
        bending_weight: Fixed weight of the bending energy (0.5; not learned).
        identity: ``(B,)`` bool, True for identity samples; ``None``: none.
        identity_weight: Weight of the zero-field term of identity samples.

    Returns:
        :class:`TaskLoss` with terms ``"ncc"``, ``"bending"`` and ``"identity"``.
    """
    _check_levels(dvf, "dvf")
    ncc: dict[str, torch.Tensor] = {}
    be: dict[str, torch.Tensor] = {}
    ident: dict[str, torch.Tensor] = {}
    use_identity = identity is not None and bool(identity.any())
    for k in LEVELS:
        warped = warp(crop_to_level(moving, k), dvf[k])
        ncc[k] = ncc_loss(crop_to_level(fixed, k), warped)
        be[k] = bending_energy(dvf[k])
        ident[k] = dvf[k][identity].pow(2).mean() if use_identity else dvf[k].sum() * 0.0
    per_level = {k: ncc[k] + bending_weight * be[k] + identity_weight * ident[k] for k in LEVELS}
    return TaskLoss(
        total=deep_supervision(per_level),
        per_level=per_level,
        terms={
            "ncc": deep_supervision(ncc),
            "bending": deep_supervision(be),
            "identity": deep_supervision(ident),
        },
    )


def present_classes(*one_hots: torch.Tensor) -> torch.Tensor:
    """Which classes occur in a sample of any of the given one-hot maps.

    Args:
        *one_hots: ``(B, K, d, h, w)`` one-hot maps of the same shape.

    Returns:
        ``(B, K)`` float 1 where class k has at least one voxel in sample b of any map, else 0.
    """
    hits = torch.stack([t.flatten(2).sum(dim=2) > 0 for t in one_hots]).any(dim=0)
    return hits.to(one_hots[0].dtype)


def reg_dsc_loss(
    dvf: Mapping[str, torch.Tensor],
    fixed_labels: torch.Tensor,
    moving_labels: torch.Tensor,
    class_mask: torch.Tensor | None = None,
    present_only: bool = False,
) -> TaskLoss:
    """``L_regDSC``: soft Dice of the trilinearly warped one-hot moving labels vs fixed labels.

    With ``present_only`` each level's Dice runs only over the classes that occur in that level's
    output region of the fixed or the moving labels of a sample. A class outside the region
    otherwise adds a constant Dice of 0 to the mean: no gradient, yet it dilutes the gradient of
    the classes that are there (on a 64^3 patch the high level sees 24^3 voxels, which often hold
    one or two organs). A documented deviation (METHOD.md, docs/training.md).

    Args:
        dvf: level -> ``(B, 3, d, h, w)`` displacement in voxels of the level grid, (x, y, z).
        fixed_labels: ``S_f`` ``(B, 1, n, n, n)`` label ids.
        moving_labels: ``S_m`` ``(B, 1, n, n, n)`` label ids.
        class_mask: ``(B, 5)`` classes delineated per sample (see :func:`dice_loss`).
        present_only: Restrict each level's Dice to the classes present in its region.

    Returns:
        :class:`TaskLoss` (differentiable in ``dvf``).
    """
    _check_levels(dvf, "dvf")
    target = one_hot(fixed_labels, NUM_CLASSES)
    source = one_hot(moving_labels, NUM_CLASSES)
    per_level: dict[str, torch.Tensor] = {}
    for k in LEVELS:
        t, s = crop_to_level(target, k), crop_to_level(source, k)
        mask = class_mask
        if present_only:
            here = present_classes(t, s)
            mask = here if class_mask is None else class_mask.to(here.dtype) * here
        per_level[k] = dice_loss(warp(s, dvf[k]), t, class_mask=mask)
    return TaskLoss(total=deep_supervision(per_level), per_level=per_level)


def compute_task_losses(
    output: NetworkOutput,
    fixed: torch.Tensor,
    moving: torch.Tensor,
    fixed_labels: torch.Tensor,
    moving_labels: torch.Tensor,
    tasks: Sequence[str] = TASK_NAMES,
    *,
    class_mask: torch.Tensor | None = None,
    seg_valid: torch.Tensor | None = None,
    identity: torch.Tensor | None = None,
    identity_weight: float = IDENTITY_WEIGHT,
    reg_dice_present_only: bool = False,
) -> dict[str, TaskLoss]:
    """Compute the requested task losses from a network output.

    Args:
        output: The network's :class:`~training.networks.NetworkOutput`.
        fixed: ``I_f`` ``(B, 1, n, n, n)``.
        moving: ``I_m`` ``(B, 1, n, n, n)``.
        fixed_labels: ``S_f`` ``(B, 1, n, n, n)`` label ids.
        moving_labels: ``S_m`` ``(B, 1, n, n, n)`` label ids.
        tasks: Subset of :data:`TASK_NAMES` (see :data:`TASKS_BY_NETWORK`).
        class_mask: ``(B, 5)`` classes delineated per sample (both Dice losses); ``None``: all.
        seg_valid: ``(B,)`` bool, False for samples whose labels are not organs (domain-
            randomised pairs): left out of ``L_seg``; ``None``: all valid.
        identity: ``(B,)`` bool identity samples (zero true field), see :func:`reg_loss`.
        identity_weight: Weight of their zero-field term.
        reg_dice_present_only: ``L_regDSC`` over the classes present per level and sample only
            (see :func:`reg_dsc_loss`).

    Returns:
        Task name -> :class:`TaskLoss`, in the order of ``tasks``.

    Raises:
        ValueError: For an unknown task or one the output cannot serve (e.g. ``"seg"`` without
            segmentation logits).
    """
    losses: dict[str, TaskLoss] = {}
    for task in tasks:
        if task not in TASK_NAMES:
            raise ValueError(f"unknown task {task!r}; expected one of {TASK_NAMES}")
        needs = output.seg if task == "seg" else output.dvf
        if not needs:
            kind = "segmentation logits" if task == "seg" else "displacement fields"
            raise ValueError(f"task {task!r} needs {kind}, which this network does not output")
        if task == "seg":
            seg_mask = class_mask
            if seg_valid is not None:
                base = (
                    class_mask
                    if class_mask is not None
                    else torch.ones(
                        (fixed.shape[0], NUM_CLASSES), device=fixed.device, dtype=fixed.dtype
                    )
                )
                seg_mask = base * seg_valid.to(base.dtype)[:, None]
            losses[task] = seg_loss(output.seg, fixed_labels, class_mask=seg_mask)
        elif task == "reg":
            losses[task] = reg_loss(
                output.dvf, fixed, moving, identity=identity, identity_weight=identity_weight
            )
        else:
            losses[task] = reg_dsc_loss(
                output.dvf,
                fixed_labels,
                moving_labels,
                class_mask=class_mask,
                present_only=reg_dice_present_only,
            )
    return losses
