"""Analytic tests of the losses: Dice, NCC, bending energy, deep supervision, task losses."""

from __future__ import annotations

import pytest
import torch

from jrs.training.losses import (
    BENDING_WEIGHT,
    LEVEL_WEIGHTS,
    TASKS_BY_NETWORK,
    bending_energy,
    compute_task_losses,
    deep_supervision,
    dice_loss,
    ncc_loss,
    reg_dsc_loss,
    reg_loss,
    seg_loss,
)
from jrs.training.networks import (
    LEVELS,
    NETWORK_NAMES,
    NetworkOutput,
    build,
    crop_to_level,
    level_size,
)
from jrs.training.warp import identity_grid, one_hot


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _blob_labels(n: int, shift: int = 0) -> torch.Tensor:
    """(1, 1, n, n, n) label map with four box organs (ids 1..4), optionally shifted along x."""
    lab = torch.zeros(1, 1, n, n, n)
    c = n // 2
    lab[..., c - 10 : c - 2, c - 10 : c - 2, c - 10 + shift : c - 2 + shift] = 1
    lab[..., c + 2 : c + 10, c - 10 : c - 2, c - 10 + shift : c - 2 + shift] = 2
    lab[..., c - 10 : c - 2, c + 2 : c + 10, c + 2 + shift : c + 10 + shift] = 3
    lab[..., c + 2 : c + 10, c + 2 : c + 10, c + 2 + shift : c + 10 + shift] = 4
    return lab


# ---------------------------------------------------------------- Dice


def test_dice_identical_is_zero_and_disjoint_is_one():
    lab = _blob_labels(24)
    oh = one_hot(lab)
    assert dice_loss(oh, oh).item() == pytest.approx(0.0, abs=1e-6)
    other = one_hot(torch.roll(lab, shifts=3, dims=4))
    disjoint = torch.zeros_like(oh)
    disjoint[:, 1:] = oh[:, 1:].roll(1, dims=1)  # class c's voxels predicted as class c+1
    assert dice_loss(disjoint, oh).item() == pytest.approx(1.0, abs=1e-6)
    assert 0.0 < dice_loss(other, oh).item() <= 1.0


def test_dice_ignores_background_and_sums_over_batch():
    oh = one_hot(torch.cat([_blob_labels(24), _blob_labels(24, shift=2)]))
    pred = oh.clone()
    pred[:, 0] = 1 - pred[:, 0]  # background channel wrong: loss unchanged
    assert dice_loss(pred, oh).item() == pytest.approx(0.0, abs=1e-6)
    # Half the prediction mass on the right class: Dice per class = 2*0.5g / (0.5g + g) = 2/3.
    assert dice_loss(0.5 * oh, oh).item() == pytest.approx(1 / 3, abs=1e-6)


# ---------------------------------------------------------------- NCC


def _smooth_image(n: int = 20, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 1, n, n, n, generator=g)
    return torch.nn.functional.avg_pool3d(x, 3, stride=1, padding=1) * 3


def test_ncc_identical_is_zero():
    img = _smooth_image()
    assert ncc_loss(img, img).item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize(("a", "b"), [(2.0, 0.0), (0.5, 3.0), (7.0, -1.5)])
def test_ncc_invariant_to_affine_intensity(a: float, b: float):
    fixed = _smooth_image(seed=0)
    moving = 0.7 * fixed + 0.5 * _smooth_image(seed=1)
    base = ncc_loss(fixed, moving).item()
    assert 0.05 < base < 1.0
    assert ncc_loss(fixed, a * moving + b).item() == pytest.approx(base, abs=1e-4)
    assert ncc_loss(a * fixed + b, moving).item() == pytest.approx(base, abs=1e-4)
    assert ncc_loss(fixed, a * fixed + b).item() == pytest.approx(0.0, abs=1e-4)


def test_ncc_clamps_keep_flat_images_finite():
    flat = torch.zeros(1, 1, 12, 12, 12)
    img = _smooth_image(12)[:1]
    for x, y in ((flat, flat), (flat, img), (img, -img)):
        value = ncc_loss(x, y)
        assert torch.isfinite(value)
    # cross is clamped at 1e-4, so anti-correlation gives about 1 (not 2).
    assert ncc_loss(img, -img).item() == pytest.approx(1.0, abs=1e-3)


def test_ncc_gradient_finite():
    fixed = _smooth_image(12)
    moving = _smooth_image(12, seed=3).requires_grad_(True)
    ncc_loss(fixed, moving).backward()
    assert moving.grad is not None and torch.isfinite(moving.grad).all()


# ---------------------------------------------------------------- bending energy


def test_bending_energy_zero_for_affine_field():
    grid = identity_grid((9, 10, 11)).double()
    mat = torch.tensor(
        [[0.1, -0.2, 0.05], [0.3, 0.0, -0.1], [0.02, 0.2, -0.3]], dtype=torch.float64
    )
    dvf = torch.einsum("ij,bjdhw->bidhw", mat, grid) + torch.tensor([1.0, -2.0, 0.5]).view(
        1, 3, 1, 1, 1
    )
    assert bending_energy(dvf).item() == pytest.approx(0.0, abs=1e-20)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_bending_energy_of_a_quadratic_field(axis: int):
    """u_x = c * coord^2 along one axis: u_xx = 2c everywhere, all other terms 0."""
    grid = identity_grid((9, 10, 11)).double()
    dvf = torch.zeros(1, 3, 9, 10, 11, dtype=torch.float64)
    dvf[:, 0] = 0.1 * grid[:, axis] ** 2
    # mean over the 3 components: (2 * 0.1)^2 / 3
    assert bending_energy(dvf).item() == pytest.approx(0.04 / 3, rel=1e-9)


def test_bending_energy_mixed_term_and_axes():
    grid = identity_grid((9, 10, 11)).double()
    dvf = torch.zeros(1, 3, 9, 10, 11, dtype=torch.float64)
    dvf[:, 1] = grid[:, 0] * grid[:, 2]  # u_y = x z: u_xz = 1, weight 2
    assert bending_energy(dvf).item() == pytest.approx(2.0 / 3, rel=1e-9)


def test_bending_energy_positive_finite_with_gradient():
    torch.manual_seed(0)
    dvf = torch.randn(2, 3, 8, 9, 10, requires_grad=True)
    be = bending_energy(dvf)
    assert torch.isfinite(be) and be.item() > 0
    be.backward()
    assert dvf.grad is not None and torch.isfinite(dvf.grad).all()
    with pytest.raises(ValueError, match=">= 5 voxels"):
        bending_energy(torch.zeros(1, 3, 4, 8, 8))


# ---------------------------------------------------------------- deep supervision


def test_deep_supervision_weights():
    assert LEVEL_WEIGHTS == {"low": 1 / 3, "mid": 1 / 3, "high": 1 / 3}
    per = {"low": torch.tensor(3.0), "mid": torch.tensor(6.0), "high": torch.tensor(0.0)}
    assert deep_supervision(per).item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="levels"):
        deep_supervision({"low": torch.tensor(1.0)})


# ---------------------------------------------------------------- task losses


N = 48


def _level_zeros(channels: int, requires_grad: bool = False) -> dict[str, torch.Tensor]:
    return {
        k: torch.zeros(1, channels, *(level_size(N, k),) * 3, requires_grad=requires_grad)
        for k in LEVELS
    }


def test_seg_loss_perfect_logits_near_zero():
    lab = _blob_labels(N)
    oh = one_hot(lab)
    logits = {k: 50.0 * crop_to_level(oh, k) for k in LEVELS}
    result = seg_loss(logits, lab)
    # Not all organs reach every level's crop; classes absent from both maps count as Dice 0.
    for k in LEVELS:
        present = crop_to_level(oh, k)[:, 1:].flatten(2).sum(-1).gt(0).sum().item()
        assert result.per_level[k].item() == pytest.approx(1 - present / 4, abs=1e-4)


def test_reg_loss_is_ncc_plus_half_bending_and_zero_for_identity():
    img = _smooth_image(N)[:1]
    result = reg_loss(_level_zeros(3), img, img)
    assert result.total.item() == pytest.approx(0.0, abs=1e-5)
    torch.manual_seed(0)
    dvf = {k: 0.5 * torch.randn(1, 3, *(level_size(N, k),) * 3) for k in LEVELS}
    result = reg_loss(dvf, img, _smooth_image(N, seed=5)[:1])
    expected = result.terms["ncc"] + BENDING_WEIGHT * result.terms["bending"]
    assert result.total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert BENDING_WEIGHT == 0.5


def test_reg_dsc_loss_gives_dvf_gradient_and_recovers_a_shift():
    fixed = _blob_labels(N)
    moving = _blob_labels(N, shift=2)  # organs 2 voxels further along x in the moving image
    dvf = _level_zeros(3, requires_grad=True)
    result = reg_dsc_loss(dvf, fixed, moving)
    result.total.backward()
    for k in LEVELS:
        grad = dvf[k].grad
        assert grad is not None and torch.isfinite(grad).all()
        assert grad[:, 0].abs().sum() > 0
    # The right pull field (u_x = +2 input voxels = 2 / stride level voxels) lowers the loss.
    strides = {"low": 4, "mid": 2, "high": 1}
    good = {k: torch.zeros_like(v) for k, v in dvf.items()}
    for k in LEVELS:
        good[k][:, 0] = 2.0 / strides[k]
    # (Organs that leave a level's crop in the moving image cannot come back: the moving labels
    # are cropped before warping, with border padding, as in the original.)
    better = reg_dsc_loss(good, fixed, moving)
    for k in LEVELS:
        assert better.per_level[k].item() < result.per_level[k].item() - 0.05


@pytest.mark.parametrize("name", NETWORK_NAMES)
def test_compute_task_losses_from_a_network(name: str):
    net = build(name, channels=(4, 6, 8))
    img_f, img_m = _smooth_image(N)[:1], _smooth_image(N, seed=2)[:1]
    lab_f, lab_m = _blob_labels(N), _blob_labels(N, shift=1)
    out = net(img_f, img_m, lab_m)
    assert isinstance(out, NetworkOutput)
    losses = compute_task_losses(out, img_f, img_m, lab_f, lab_m, TASKS_BY_NETWORK[name])
    assert list(losses) == list(TASKS_BY_NETWORK[name])
    total = sum(v.total for v in losses.values())
    assert isinstance(total, torch.Tensor) and torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_compute_task_losses_rejects_missing_outputs():
    out = NetworkOutput(seg=_level_zeros(5))
    img, lab = torch.zeros(1, 1, N, N, N), torch.zeros(1, 1, N, N, N)
    with pytest.raises(ValueError, match="displacement"):
        compute_task_losses(out, img, img, lab, lab, ("seg", "reg"))
