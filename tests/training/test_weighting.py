"""Tests of the loss-weighting schemes: equal, homoscedastic (learned), DWA (scripted epochs)."""

from __future__ import annotations

import math

import pytest
import torch

from jrs.training.losses import TASK_NAMES
from jrs.training.weighting import (
    DWAWeighting,
    EqualWeighting,
    HomoscedasticWeighting,
    build_weighting,
)


def _losses(seg: float = 0.5, reg: float = 0.8, reg_dsc: float = 0.3) -> dict[str, torch.Tensor]:
    return {"seg": torch.tensor(seg), "reg": torch.tensor(reg), "reg_dsc": torch.tensor(reg_dsc)}


def test_equal_is_ones():
    w = build_weighting("equal", TASK_NAMES)
    assert isinstance(w, EqualWeighting)
    assert w.weights() == {"seg": 1.0, "reg": 1.0, "reg_dsc": 1.0}
    assert w(_losses()).item() == pytest.approx(1.6)
    assert list(w.parameters()) == []


def test_homoscedastic_formula_at_init():
    w = build_weighting("homoscedastic", TASK_NAMES)
    assert isinstance(w, HomoscedasticWeighting)
    assert w.weights() == {"seg": 1.0, "reg": 1.0, "reg_dsc": 1.0}
    with torch.no_grad():
        w.log_vars["reg"].fill_(math.log(4.0))
    expected = 0.5 + 0.8 / 4 + 0.5 * math.log(4.0) + 0.3
    assert w(_losses()).item() == pytest.approx(expected, rel=1e-6)


def test_homoscedastic_weights_are_learned_by_the_optimiser():
    w = build_weighting("homoscedastic", ("seg", "reg", "reg_dsc"))
    params = list(w.parameters())
    assert len(params) == 3 and all(p.requires_grad for p in params)
    net = torch.nn.Linear(2, 1)
    optimiser = torch.optim.RAdam([*net.parameters(), *w.parameters()], lr=1e-2)
    before = w.weights()
    out = net(torch.ones(1, 2)).squeeze()
    losses = {"seg": out.square(), "reg": 2 + out.abs(), "reg_dsc": torch.tensor(0.1)}
    optimiser.zero_grad()
    w(losses).backward()
    optimiser.step()
    after = w.weights()
    assert all(after[t] != before[t] for t in before)
    # d/ds (exp(-s) L + s/2) = 0.5 - L at s=0: L > 0.5 raises s (lowers the weight).
    assert after["reg"] < 1.0 < after["reg_dsc"]


def test_bending_energy_is_not_a_weighted_task():
    for name in ("equal", "homoscedastic", "dwa"):
        with pytest.raises(ValueError, match="bending"):
            build_weighting(name, ("seg", "reg", "bending"))
    w = build_weighting("homoscedastic", ("reg",))
    assert len(list(w.parameters())) == 1  # only L_reg's own weight; BE stays at 0.5 inside it


def _dwa_expected(prev: dict[str, float], prev2: dict[str, float], t: float) -> dict[str, float]:
    r = {k: prev[k] / prev2[k] for k in prev}
    z = sum(math.exp(v / t) for v in r.values())
    return {k: len(r) * math.exp(v / t) / z for k, v in r.items()}


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_dwa_follows_formula_on_scripted_epochs(temperature: float):
    w = build_weighting("dwa", TASK_NAMES, temperature=temperature)
    assert isinstance(w, DWAWeighting)
    epochs = [
        {"seg": 1.0, "reg": 1.0, "reg_dsc": 1.0},
        {"seg": 0.5, "reg": 0.9, "reg_dsc": 0.8},
        {"seg": 0.45, "reg": 0.45, "reg_dsc": 0.8},
        {"seg": 0.4, "reg": 0.44, "reg_dsc": 0.2},
    ]
    assert w.weights() == dict.fromkeys(TASK_NAMES, 1.0)  # epoch 0
    w.end_epoch(epochs[0])
    assert w.weights() == dict.fromkeys(TASK_NAMES, 1.0)  # epoch 1
    for t in range(1, len(epochs)):
        w.end_epoch(epochs[t])
        expected = _dwa_expected(epochs[t], epochs[t - 1], temperature)
        got = w.weights()
        for k in TASK_NAMES:
            assert got[k] == pytest.approx(expected[k], rel=1e-12)
        assert sum(got.values()) == pytest.approx(3.0)
    # The task whose loss fell least (reg: 0.45 -> 0.44) gets the largest weight after epoch 3.
    assert max(w.weights(), key=w.weights().__getitem__) == "reg"


def test_dwa_default_temperature_and_accumulation():
    w = DWAWeighting(("seg", "reg"))
    assert w.temperature == 1.0
    w.train()
    for seg, reg in ((1.0, 2.0), (3.0, 2.0)):  # epoch 0 means: seg 2, reg 2
        total = w({"seg": torch.tensor(seg), "reg": torch.tensor(reg)})
        assert total.item() == pytest.approx(seg + reg)
    w.end_epoch()
    w({"seg": torch.tensor(1.0), "reg": torch.tensor(2.0)})  # epoch 1 means: seg 1, reg 2
    w.end_epoch()
    expected = _dwa_expected({"seg": 1.0, "reg": 2.0}, {"seg": 2.0, "reg": 2.0}, 1.0)
    got = w.weights()
    assert got == pytest.approx(expected)
    loss = w({"seg": torch.tensor(1.0), "reg": torch.tensor(1.0)})
    assert loss.item() == pytest.approx(sum(expected.values()))
    # History survives a checkpoint round trip.
    clone = DWAWeighting(("seg", "reg"))
    clone.load_state_dict(w.state_dict())
    assert clone.history == w.history and clone.weights() == pytest.approx(got)
    with pytest.raises(ValueError, match="no losses"):
        DWAWeighting(("seg",)).end_epoch()


def test_unknown_weighting_rejected():
    with pytest.raises(ValueError, match="unknown loss weighting"):
        build_weighting("gradnorm", TASK_NAMES)
