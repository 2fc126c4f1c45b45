"""Tests of the DVF head scale, the present-class registration Dice and campaign phases."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from jrs.core.errors import InvalidInput
from jrs.training.config import TrainConfig, parse_config
from jrs.training.losses import present_classes, reg_dsc_loss
from jrs.training.networks import LEVELS, build, level_size
from jrs.training.networks.blocks import Head
from jrs.training.phase import main as phase_main
from jrs.training.phase import start_phase
from jrs.training.synthetic import synthetic_pair
from jrs.training.trainer import Trainer


def tiny_config(out: Path, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "network": {"name": "cross-stitch", "overrides": {"channels": [4, 8, 8]}},
        "weighting": {"name": "equal"},
        "data": {
            "synthetic": {"count": 2, "size": 48},
            "validation": {"synthetic": {"count": 1, "seed": 50, "size": 48}, "every": 0},
        },
        "patch_size": 48,
        "iterations": 3,
        "steps_per_epoch": 2,
        "checkpoint_every": 100,
        "plot_every": 1000,
        "device": "cpu",
        "precision": "fp32",
        "tensorboard": False,
        "output_dir": str(out),
    }
    for key, value in kw.items():
        base[key] = value
    return parse_config(base)


def _scaled(out: Path, scale: float, **kw: Any) -> TrainConfig:
    return tiny_config(
        out,
        network={"name": "cross-stitch", "overrides": {"channels": [4, 8, 8], "dvf_scale": scale}},
        **kw,
    )


@pytest.fixture(scope="module")
def pairs() -> tuple[list, list]:
    return [synthetic_pair(0, 48), synthetic_pair(1, 48)], [synthetic_pair(50, 48)]


# ---------------------------------------------------------------- the head scale
def test_scaled_head_starts_as_the_plain_one_and_moves_scale_times_as_far_under_adam() -> None:
    x = torch.randn(2, 6, 5, 5, 5)
    torch.manual_seed(0)
    plain = Head(6, 3)
    torch.manual_seed(0)
    scaled = Head(6, 3, scale=10.0)
    torch.testing.assert_close(scaled(x), plain(x), rtol=1e-5, atol=1e-6)
    moved = []
    for head in (plain, scaled):
        before = head(x).detach()
        opt = torch.optim.Adam(head.parameters(), lr=1e-3)
        head(x).pow(2).sum().backward()  # the same gradient direction for both heads
        opt.step()
        moved.append((head(x).detach() - before).abs().mean())
    # Adam's first step is lr * sign(g) per weight: the scaled output moves 10x as far
    assert float(moved[1] / moved[0]) == pytest.approx(10.0, rel=1e-3)


def test_dvf_scale_is_a_build_override_with_the_same_state_dict() -> None:
    torch.manual_seed(1)
    a = build("cross-stitch", channels=(4, 8, 8))
    torch.manual_seed(1)
    b = build("cross-stitch", channels=(4, 8, 8), dvf_scale=10.0)
    assert a.state_dict().keys() == b.state_dict().keys()
    f = torch.randn(1, 1, 48, 48, 48)
    m = torch.randn(1, 1, 48, 48, 48)
    lab = torch.zeros(1, 1, 48, 48, 48)
    a.eval()
    b.eval()
    with torch.no_grad():
        oa, ob = a(f, m, lab), b(f, m, lab)
    for k in LEVELS:
        torch.testing.assert_close(ob.dvf[k], oa.dvf[k], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ob.seg[k], oa.seg[k])
    with pytest.raises(ValueError, match="does not accept"):
        build("seg", dvf_scale=10.0)  # no DVF heads
    with pytest.raises(ValueError, match="> 0"):
        Head(4, 3, scale=0.0)


# ---------------------------------------------------------------- present-class reg Dice
def test_present_only_reg_dice_ignores_classes_outside_the_patch() -> None:
    labels = torch.zeros(1, 1, 48, 48, 48)
    labels[..., 10:38, 10:38, 10:38] = 1  # only class 1 (and background)
    dvf = {k: torch.zeros(1, 3, *(level_size(48, k),) * 3) for k in LEVELS}
    known = reg_dsc_loss(dvf, labels, labels)
    present = reg_dsc_loss(dvf, labels, labels, present_only=True)
    # identical maps: Dice 1 for class 1; classes 2-4 absent add 0 each to the paper's mean
    assert float(known.total) == pytest.approx(0.75, abs=1e-4)
    assert float(present.total) == pytest.approx(0.0, abs=1e-4)
    # a class delineated nowhere (class mask 0) stays out either way
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0, 1.0]])
    assert float(reg_dsc_loss(dvf, labels, labels, mask, present_only=True).total) == (
        pytest.approx(0.0, abs=1e-4)
    )


def test_present_classes_counts_either_map() -> None:
    a = torch.zeros(2, 5, 4, 4, 4)
    b = torch.zeros(2, 5, 4, 4, 4)
    a[0, 1, 0, 0, 0] = 1
    b[1, 3, 1, 1, 1] = 1
    got = present_classes(a, b)
    assert got.tolist() == [[0, 1, 0, 0, 0], [0, 0, 0, 1, 0]]


def test_the_config_option_reaches_the_training_loss(
    pairs: tuple[list, list], tmp_path: Path
) -> None:
    train, val = pairs
    img = torch.randn(1, 1, 48, 48, 48)
    labels = torch.zeros(1, 1, 48, 48, 48)
    labels[..., 10:38, 10:38, 10:38] = 1  # one organ in the patch
    extras: dict[str, torch.Tensor | None] = {
        "class_mask": None,
        "seg_valid": None,
        "identity": None,
    }
    got = {}
    for mode in ("known", "present"):
        cfg = tiny_config(tmp_path / mode, losses={"reg_dice_classes": mode})
        torch.manual_seed(0)
        t = Trainer(cfg, train, val, progress=False)
        got[mode] = float(
            t.forward_losses(img, img, labels, labels, extras)["reg_dsc"].total.detach()
        )
    # the same network: the known-class mean carries 3 absent classes at Dice 0
    assert got["known"] == pytest.approx(0.75 + 0.25 * got["present"], abs=1e-3)
    assert got["present"] < 0.5


# ---------------------------------------------------------------- phases
def test_phase_switch_preserves_the_function_and_resumes(
    pairs: tuple[list, list], tmp_path: Path
) -> None:
    train, val = pairs
    out = tmp_path / "run"
    first = Trainer(tiny_config(out, iterations=2), train, val, progress=False)
    first.run()
    # the new recipe refuses to resume from the old checkpoint without the conversion
    with pytest.raises(InvalidInput, match="jrs.training.phase"):
        Trainer(_scaled(out, 10.0, iterations=4), train, val, resume=True, progress=False)
    ckpt = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    new_cfg = _scaled(out, 10.0, iterations=4, losses={"reg_dice_classes": "present"})
    converted, changes = start_phase(ckpt, new_cfg, source="last.pt")
    assert changes == {
        "network.overrides.dvf_scale": [1.0, 10.0],
        "losses.reg_dice_classes": ["known", "present"],
    }
    assert converted["provenance"][-1]["kind"] == "phase"
    assert converted["provenance"][-1]["step"] == 2
    # same function before and after the switch
    old_net = build("cross-stitch", channels=(4, 8, 8))
    old_net.load_state_dict(ckpt["model"])
    new_net = build("cross-stitch", channels=(4, 8, 8), dvf_scale=10.0)
    new_net.load_state_dict(converted["model"])
    old_net.eval()
    new_net.eval()
    f = torch.randn(1, 1, 48, 48, 48)
    with torch.no_grad():
        a, b = old_net(f, f, torch.zeros_like(f)), new_net(f, f, torch.zeros_like(f))
    for k in LEVELS:
        torch.testing.assert_close(b.dvf[k], a.dvf[k], rtol=1e-4, atol=1e-6)
    # RAdam moments follow the reparametrisation; other parameters untouched
    names = [n for n, _ in old_net.named_parameters()]
    head = names.index("dvf_heads.high.conv.weight")
    other = names.index("seg_heads.high.conv.weight")
    s0, s1 = ckpt["optimizer"]["state"], converted["optimizer"]["state"]
    torch.testing.assert_close(s1[head]["exp_avg"], s0[head]["exp_avg"] * 10)
    torch.testing.assert_close(s1[head]["exp_avg_sq"], s0[head]["exp_avg_sq"] * 100)
    assert torch.equal(s1[other]["exp_avg"], s0[other]["exp_avg"])
    # the CLI writes it, keeps the old checkpoint, and the trainer continues
    cfg_file = tmp_path / "phase.yaml"
    import yaml

    cfg_file.write_text(yaml.safe_dump(new_cfg.resolved()))
    assert phase_main(["--config", str(cfg_file)]) == 0
    assert (out / "checkpoints" / "last_before_phase_step2.pt").is_file()
    resumed = Trainer(new_cfg, train, val, resume=True, progress=False)
    assert resumed.step == 2
    resumed.run()
    assert resumed.step == 4
    assert resumed.provenance[-1]["kind"] == "phase"


def test_phase_refuses_architecture_changes_and_no_op(
    pairs: tuple[list, list], tmp_path: Path
) -> None:
    train, val = pairs
    out = tmp_path / "run"
    Trainer(tiny_config(out, iterations=1), train, val, progress=False).run()
    ckpt = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    wider = tiny_config(
        out, network={"name": "cross-stitch", "overrides": {"channels": [4, 8, 16]}}
    )
    with pytest.raises(InvalidInput, match="channels"):
        start_phase(ckpt, wider)
    with pytest.raises(InvalidInput, match="network 'cross-stitch'"):
        start_phase(ckpt, tiny_config(out, network={"name": "seg"}))
    with pytest.raises(InvalidInput, match="changes nothing"):
        start_phase(ckpt, tiny_config(out))
    with pytest.raises(InvalidInput, match="not a jrs training checkpoint"):
        start_phase({"model": {}}, tiny_config(out))
