"""The v3 training campaign's pieces: masked Dice, identity term, sampler shares, SynthMorph pairs,
memory-mapped store, lr schedule and bf16 autocast."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from jrs.core.errors import InvalidInput
from jrs.training.config import parse_config
from jrs.training.data import PatchSampler, TrainingPair
from jrs.training.losses import dice_loss, reg_loss
from jrs.training.runtime import autocast_dtype
from jrs.training.store import list_store, load_store, load_stored_pair, save_pair, write_index
from jrs.training.synthetic import synthetic_pair
from jrs.training.synthmorph import integrate_velocity, synthmorph_patch
from jrs.training.trainer import Trainer, lr_factor
from jrs.training.warp import one_hot


# ---------------------------------------------------------------- masked Dice
def _maps(b: int = 2, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.zeros(b, 1, n, n, n, dtype=torch.long)
    g[:, :, :3] = 1
    g[:, :, 3:, :3] = 2
    g[:, :, 3:, 3:, :3] = 4
    g[1, :, 3:, 3:, 3:] = 3  # class 3 only in sample 1
    return g, one_hot(g, 5)


def test_masked_dice_equals_original_with_all_ones() -> None:
    _, target = _maps()
    probs = torch.softmax(torch.randn_like(target), dim=1)
    ones = torch.ones(2, 5)
    assert torch.allclose(dice_loss(probs, target), dice_loss(probs, target, class_mask=ones))


def test_masked_dice_ignores_unknown_class_of_a_sample() -> None:
    _, target = _maps()
    mask = torch.ones(2, 5)
    mask[0, 3] = 0.0  # sample 0 does not delineate class 3
    perfect = target.clone()
    spurious = target.clone()
    # sample 0 predicts class 3 where its (undelineated) truth says background-ish class 4
    spurious[0, 3, 3:, 3:, 3:] = 1.0
    spurious[0, 4, 3:, 3:, 3:] = 0.0
    base = dice_loss(perfect, target, class_mask=mask)
    assert float(base) == pytest.approx(0.0, abs=1e-6)
    # the class-3 prediction in sample 0 no longer counts; class 4 loses those voxels, so only
    # the class-4 term moves, and the class-3 term stays perfect
    got = dice_loss(spurious, target, class_mask=mask)
    unmasked = dice_loss(spurious, target)
    assert float(got) < float(unmasked)
    mask[:, 3] = 0.0
    assert math.isfinite(float(dice_loss(spurious, target, class_mask=mask)))


def test_masked_dice_with_nothing_known_is_zero_and_differentiable() -> None:
    _, target = _maps()
    probs = torch.softmax(torch.randn_like(target), dim=1).requires_grad_()
    loss = dice_loss(probs, target, class_mask=torch.zeros(2, 5))
    loss.backward()
    assert float(loss.detach()) == 0.0 and probs.grad is not None


# ---------------------------------------------------------------- identity term
def test_identity_term_is_mean_square_displacement_of_identity_samples() -> None:
    n = 48
    img = torch.rand(2, 1, n, n, n)
    dvf = {
        "low": torch.zeros(2, 3, 5, 5, 5),
        "mid": torch.zeros(2, 3, 6, 6, 6),
        "high": torch.zeros(2, 3, 8, 8, 8),
    }
    ident = torch.tensor([True, False])
    zero = reg_loss(dvf, img, img, identity=ident)
    assert float(zero.terms["identity"]) == 0.0
    for v in dvf.values():
        v[0] += 0.5  # identity sample moved by half a voxel
        v[1] += 3.0  # the other sample's motion is not penalised by this term
    moved = reg_loss(dvf, img, img, identity=ident, identity_weight=2.0)
    assert float(moved.terms["identity"]) == pytest.approx(0.25)
    no_ident = reg_loss(dvf, img, img)
    assert float(moved.total - no_ident.total) == pytest.approx(2.0 * 0.25, rel=1e-5)


# ---------------------------------------------------------------- SynthMorph pairs
def test_integrate_velocity_zero_and_translation() -> None:
    assert np.all(integrate_velocity(np.zeros((3, 8, 8, 8))) == 0)
    v = np.zeros((3, 12, 12, 12))
    v[0] = 1.5  # constant velocity: the flow at time 1 is that translation
    u = integrate_velocity(v)
    assert np.allclose(u[0, 2:-2, 2:-2, 2:-2], 1.5, atol=1e-6)


def test_synthmorph_patch_is_deterministic_and_well_formed() -> None:
    a = synthmorph_patch(48, np.random.default_rng(5))
    b = synthmorph_patch(48, np.random.default_rng(5))
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)
    f, m, fl, ml = a
    assert f.shape == m.shape == fl.shape == ml.shape == (48, 48, 48)
    assert f.dtype == np.float32 and fl.dtype == np.uint8
    assert fl.max() <= 4 and f.min() >= -1.0 and f.max() <= 1.0
    changed = float(np.mean(fl != ml))
    assert 0.0 < changed < 0.6  # moved, but the same scene


# ---------------------------------------------------------------- sampler
@pytest.fixture(scope="module")
def pairs() -> list[TrainingPair]:
    a, b = synthetic_pair(0, 56), synthetic_pair(1, 56)
    b.known = (1, 2, 4)  # a scan without seminal vesicles
    return [a, b]


def test_sampler_identity_and_synthmorph_slots(pairs: list[TrainingPair]) -> None:
    s = PatchSampler(pairs, 48, pairs_per_batch=2, seed=1, identity_share=0.5, synthmorph_share=0.3)
    seen_ident = seen_sm = seen_plain = 0
    for _ in range(12):
        b = s.sample()
        assert b.fixed.shape == (4, 1, 48, 48, 48)
        assert b.class_mask is not None and b.identity is not None and b.seg_valid is not None
        for i in range(4):
            if b.identity[i]:
                seen_ident += 1
                assert np.array_equal(b.fixed[i], b.moving[i])
                assert np.array_equal(b.fixed_labels[i], b.moving_labels[i])
            elif not b.seg_valid[i]:
                seen_sm += 1
                assert np.all(b.class_mask[i] == 1)
            else:
                seen_plain += 1
    assert seen_ident and seen_sm and seen_plain


def test_sampler_class_mask_follows_known_labels(pairs: list[TrainingPair]) -> None:
    s = PatchSampler([pairs[1]], 48, pairs_per_batch=1, seed=0)
    b = s.sample()
    assert b.class_mask is not None
    assert b.class_mask[0].tolist() == [1.0, 1.0, 1.0, 0.0, 1.0]


def test_sampler_without_shares_draws_as_before(pairs: list[TrainingPair]) -> None:
    a = PatchSampler(pairs, 48, seed=3)
    b = PatchSampler(pairs, 48, seed=3, identity_share=0.0, synthmorph_share=0.0)
    for _ in range(3):
        x, y = a.sample(), b.sample()
        assert np.array_equal(x.fixed, y.fixed) and np.array_equal(x.moving_labels, y.moving_labels)


def test_sampler_rejects_bad_share(pairs: list[TrainingPair]) -> None:
    with pytest.raises(InvalidInput, match="identity_share"):
        PatchSampler(pairs, 48, identity_share=1.5)


# ---------------------------------------------------------------- store
def test_store_round_trip_is_memory_mapped(tmp_path: Path, pairs: list[TrainingPair]) -> None:
    recs = [
        save_pair(pairs[0], tmp_path, {"source": "phantom", "group": "p0"}),
        save_pair(pairs[1], tmp_path, {"source": "real", "group": "r1"}),
    ]
    write_index(tmp_path, recs)
    assert [r["key"] for r in list_store(tmp_path)] == sorted(p.key for p in pairs)
    back = load_stored_pair(tmp_path / pairs[1].key)
    assert isinstance(back.fixed, np.memmap)
    assert back.fixed.dtype == np.float16
    assert np.allclose(back.fixed, pairs[1].fixed, atol=1e-3)
    assert np.array_equal(back.fixed_labels, pairs[1].fixed_labels)
    assert back.known == (1, 2, 4) and back.group == "r1"
    assert back.regions is not None and set(back.regions) >= {"torso"}
    assert [p.group for p in load_store(tmp_path, sources=["real"])] == ["r1"]
    assert [p.group for p in load_store(tmp_path, exclude_groups=["r1"])] == ["p0"]
    # a sampler draws from stored pairs with jittered centres
    batch = PatchSampler([back], 48, pairs_per_batch=1, seed=0).sample()
    assert batch.fixed.shape == (2, 1, 48, 48, 48)


def test_store_without_index_names_the_command(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="jrs.training.build_data"):
        list_store(tmp_path)


# ---------------------------------------------------------------- schedule and precision
def test_lr_factor_warmup_and_cosine() -> None:
    assert lr_factor(0, 100, 10, "constant", 0.1) == 1.0
    assert lr_factor(0, 100, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(10, 100, 10, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine", 0.1) == pytest.approx(0.55)
    assert lr_factor(100, 100, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(500, 100, 10, "cosine", 0.1) == pytest.approx(0.1)


def test_autocast_dtype_choice() -> None:
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu, True, "fp32") is None
    assert autocast_dtype(cpu, True, "bf16") is torch.bfloat16


def test_bf16_training_step_keeps_fp32_state(tmp_path: Path, pairs: list[TrainingPair]) -> None:
    cfg = parse_config(
        {
            "network": {"name": "cross-stitch", "overrides": {"channels": [4, 8, 16]}},
            "data": {"synthetic": {"count": 2, "size": 56}, "identity_share": 0.25},
            "patch_size": 48,
            "iterations": 2,
            "precision": "bf16",
            "schedule": {"name": "cosine", "warmup": 1},
            "tensorboard": False,
            "device": "cpu",
            "output_dir": str(tmp_path),
        }
    )
    t = Trainer(cfg, train_pairs=pairs, progress=False)
    assert t.autocast is torch.bfloat16
    row = t.train_step()
    assert math.isfinite(row["loss_total"]) and "loss_reg_identity" in row
    assert all(p.dtype == torch.float32 for p in t.net.parameters())
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(cfg.lr)  # warm-up done


def test_shipped_data_spec_is_valid() -> None:
    from jrs.training.build_data import load_spec

    spec = load_spec(Path(__file__).resolve().parents[2] / "training/data_specs/data_v3.yaml")
    assert sum(p.count * p.fractions for p in spec.phantoms if p.source == "phantom") >= 180
    assert {r.group for r in spec.real if r.source == "validation"} == {"pelvic-ref-005"}
    assert all(r.source != "validation" for r in spec.real if r.group == "pelvic-ref-002")
