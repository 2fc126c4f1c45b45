"""Tests of the training config, the trainer (resume bit for bit, logs, plots) and the CLI."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from jrs.core.errors import InvalidInput
from jrs.training.config import TrainConfig, load_config, parse_config
from jrs.training.losses import compute_task_losses
from jrs.training.plots import read_log
from jrs.training.run_log import alpha_summary
from jrs.training.synthetic import synthetic_pair
from jrs.training.trainer import Trainer

CONFIG_DIR = Path(__file__).resolve().parents[2] / "training" / "configs"


def tiny_config(out: Path, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "network": {"name": "cross-stitch", "overrides": {"channels": [4, 8, 8]}},
        "weighting": {"name": "dwa"},
        "data": {
            "synthetic": {"count": 2, "size": 48},
            "validation": {
                "synthetic": {"count": 1, "seed": 50, "size": 48},
                "every": 2,
                "window": 96,  # shrinks to 88: one tile covers the 48^3 volume
            },
        },
        "patch_size": 48,
        "iterations": 4,
        "steps_per_epoch": 1,
        "checkpoint_every": 100,
        "plot_every": 1000,
        "device": "cpu",
        "tensorboard": False,
        "output_dir": str(out),
    }
    base.update(kw)
    return parse_config(base)


# ---------------------------------------------------------------- config
def test_shipped_configs_are_valid() -> None:
    files = sorted(CONFIG_DIR.glob("*.yaml"))
    assert len(files) >= 14
    names = {f.stem for f in files}
    assert {
        "cross-stitch_equal",
        "cross-stitch_homoscedastic",
        "cross-stitch_dwa",
        "seg",
        "reg",
    } <= names
    for f in files:
        cfg = load_config(f)
        assert cfg.patch_size % 4 == 0


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    data = yaml.safe_load((CONFIG_DIR / "cross-stitch_equal.yaml").read_text())
    data["learning_rate"] = 1e-3
    data["weighting"]["temprature"] = 2
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(data))
    with pytest.raises(InvalidInput) as exc:
        load_config(f)
    msg = str(exc.value)
    assert str(f) in msg and "learning_rate" in msg and "weighting.temprature" in msg


@pytest.mark.parametrize(
    "patch,match",
    [
        ({"patch_size": 50}, "multiple of 4"),
        ({"network": {"name": "unet"}}, "unknown network"),
        ({"weighting": {"name": "uncertainty"}}, "weighting.name"),
        ({"data": {}}, "exactly one"),
        ({"data": {"synthetic": {"count": 1}, "phantoms": {"count": 1}}}, "exactly one"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_config_errors(patch: dict[str, Any], match: str) -> None:
    base: dict[str, Any] = {"network": {"name": "seg"}, "data": {"synthetic": {"count": 1}}}
    base.update(patch)
    with pytest.raises(InvalidInput, match=match):
        parse_config(base, "x.yaml")


def test_missing_file_and_overrides(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="not found"):
        load_config(tmp_path / "nope.yaml")
    cfg = load_config(CONFIG_DIR / "seg.yaml", iterations=7, output_dir=tmp_path)
    assert cfg.iterations == 7 and cfg.output_dir == tmp_path and cfg.lr == 1e-4


# ---------------------------------------------------------------- trainer
@pytest.fixture(scope="module")
def pairs() -> tuple[list, list]:
    return [synthetic_pair(0, 48), synthetic_pair(1, 48)], [synthetic_pair(50, 48)]


def _losses(run: Path) -> dict[str, np.ndarray]:
    log = read_log(run / "train_log.csv")
    return {k: v for k, v in log.items() if k not in ("wall_s", "data_s")}


def test_resume_is_bit_for_bit(tmp_path: Path, pairs: tuple[list, list]) -> None:
    torch.set_num_threads(2)
    train, val = pairs
    straight = Trainer(tiny_config(tmp_path / "a", iterations=5), train, val, progress=False)
    straight.run()
    first = Trainer(tiny_config(tmp_path / "b", iterations=3), train, val, progress=False)
    first.run()
    resumed = Trainer(
        tiny_config(tmp_path / "b", iterations=5), train, val, resume=True, progress=False
    )
    assert resumed.step == 3 and resumed.epoch == 3
    resumed.run()
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert a.keys() == b.keys()
    assert a["step"].tolist() == b["step"].tolist() == [1, 2, 3, 4, 5]
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    sa, sb = straight.net.state_dict(), resumed.net.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    wa, wb = straight.weighting.state_dict(), resumed.weighting.state_dict()
    assert wa["_extra_state"]["history"] == wb["_extra_state"]["history"]
    va = read_log(tmp_path / "a" / "validation.csv")
    vb = read_log(tmp_path / "b" / "validation.csv")
    np.testing.assert_array_equal(va["dice_mean"], vb["dice_mean"])


def test_run_writes_logs_plots_and_checkpoints(tmp_path: Path, pairs: tuple[list, list]) -> None:
    train, val = pairs
    cfg = tiny_config(tmp_path, weighting={"name": "homoscedastic"}, tensorboard=True)
    result = Trainer(cfg, train, val, progress=False).run()
    assert result.step == 4 and np.isfinite(result.best_dice)
    log = read_log(tmp_path / "train_log.csv")
    for task in ("seg", "reg", "reg_dsc"):
        for suffix in ("", "_low", "_mid", "_high"):
            assert np.all(np.isfinite(log[f"loss_{task}{suffix}"]))
        assert f"weight_{task}" in log and f"log_var_{task}" in log
    assert "loss_reg_ncc" in log and "loss_reg_bending" in log
    assert {
        f"alpha_{u}_{ij}" for u in ("d0", "d1", "u1", "u0") for ij in ("00", "01", "10", "11")
    } <= set(log)
    val_log = read_log(tmp_path / "validation.csv")
    assert val_log["step"].tolist() == [2, 4]
    assert "dice_seg_prostate" in val_log and "dice_reg_bladder" in val_log
    for name in ("losses", "loss_weights", "cross_stitch_alphas", "validation_dice"):
        assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 1000
    assert any((tmp_path / "tensorboard").iterdir())
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["step"] == 4 and ckpt["config"]["network"]["name"] == "cross-stitch"
    assert set(ckpt["rng"]) >= {"torch", "numpy", "python"} and "sampler" in ckpt
    assert isinstance(ckpt["git_sha"], str) and ckpt["git_sha"]
    assert (tmp_path / "checkpoints" / "best.pt").is_file()
    # homoscedastic log-variances are optimised
    assert any(abs(v) > 0 for k, v in log.items() if k.startswith("log_var_") for v in v[-1:])


def test_alpha_summary_empty_for_plain_unet() -> None:
    from jrs.training.networks import build

    assert alpha_summary(build("seg", channels=(4, 8, 8))) == {}


def test_cli_train_and_evaluate(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from jrs.cli import app

    cfg = yaml.safe_load((CONFIG_DIR / "smoke.yaml").read_text())
    cfg["network"]["overrides"] = {"channels": [4, 8, 8]}
    cfg["tensorboard"] = False
    f = tmp_path / "smoke.yaml"
    f.write_text(yaml.safe_dump(cfg))
    runner = CliRunner()
    res = runner.invoke(
        app, ["train", "--config", str(f), "--iterations", "2", "--out", str(tmp_path / "run")]
    )
    assert res.exit_code == 0, res.output
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    assert ckpt.is_file()
    res = runner.invoke(
        app,
        [
            "train",
            "--config",
            str(f),
            "--iterations",
            "3",
            "--out",
            str(tmp_path / "run"),
            "--resume",
        ],
    )
    assert res.exit_code == 0, res.output
    assert torch.load(ckpt, weights_only=False)["step"] == 3
    res = runner.invoke(
        app,
        [
            "evaluate",
            "--checkpoint",
            str(ckpt),
            "--synthetic",
            "1",
            "--window",
            "104",
            "--out",
            str(tmp_path / "ev"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "## MSD (mm)" in res.output and (tmp_path / "ev" / "report.md").is_file()
    bad = tmp_path / "bad.yaml"
    bad.write_text(f.read_text() + "\nbogus_key: 1\n")
    res = runner.invoke(app, ["train", "--config", str(bad)])
    assert res.exit_code == 2 and "bogus_key" in res.output


# ---------------------------------------------------------------- does it learn?
def _fixed_batch(pairs: list) -> list[torch.Tensor]:
    """Patches centred on each pair's organs, with swaps: every class present at every level."""
    from jrs.training.data import PatchSampler

    sampler = PatchSampler(pairs, patch_size=48, seed=0)
    fs: list[np.ndarray] = []
    ms: list[np.ndarray] = []
    fl: list[np.ndarray] = []
    ml: list[np.ndarray] = []
    for p in pairs:
        c = np.array(p.fixed.shape) // 2
        f, m = sampler._crop(p.fixed, c, -1.0), sampler._crop(p.moving, c, -1.0)
        a, b = sampler._crop(p.fixed_labels, c, 0), sampler._crop(p.moving_labels, c, 0)
        fs += [f, m]
        ms += [m, f]
        fl += [a, b]
        ml += [b, a]
    return [torch.from_numpy(np.stack(x)[:, None].astype(np.float32)) for x in (fs, ms, fl, ml)]


@pytest.mark.slow
def test_tiny_run_lowers_every_task_loss(tmp_path: Path) -> None:
    """Acceptance: a tiny run (48^3 patches) lowers every task loss by >= 50 % within 200 steps.

    Measured on a fixed evaluation batch (the patch at the centre of each of the two training
    pairs, plus the swapped copies; network deep-copied in train mode, i.e. batch statistics,
    no side effect) before and after 200 training steps on region-balanced random patches.

    Why this is a meaningful target (diagnosed in issue 3): with 48^3 patches the output windows
    are only 8^3 / 6^3 / 5^3 voxels, and METHOD.md's soft Dice counts a class absent from both
    maps as Dice 0. On the first synthetic generator (organs of ~100-600 voxels scattered around
    the centre) the evaluation windows held one or two organs as slivers of 0-10 voxels, so
    ``L_seg`` and ``L_regDSC`` had floors near 0.5 and even the exact inverse displacement raised
    the low-level ``L_regDSC``; the run reached only -17 % / -43 % / -16 %. No alignment bug was
    found: targets, skip crops and warps line up (best shift of the trained prediction is 0, the
    true inverse displacement lowers NCC 0.73 -> 0.10 at the high level), gradients reach every
    module, and a seg network alone overfits one batch at the low and mid levels. The generator
    now makes the four organs meet at the centre, so every organ is present, with tens of voxels
    or more, at every level of the evaluation batch (asserted below).

    Measured (2 shared CPU cores, lr 5e-3): drops seg 73 %, reg 57 %, reg_dsc 58 %; ~4-10 min.
    """
    from jrs.training.networks import LEVELS, crop_to_level
    from jrs.training.warp import one_hot

    torch.set_num_threads(2)
    pairs = [synthetic_pair(0, 48), synthetic_pair(1, 48)]
    cfg = tiny_config(
        tmp_path,
        network={"name": "cross-stitch", "overrides": {"channels": [8, 16, 32]}},
        weighting={"name": "equal"},
        iterations=200,
        lr=5e-3,
        steps_per_epoch=50,
    )
    trainer = Trainer(cfg, pairs, [], progress=False)
    batch = _fixed_batch(pairs)
    for level in LEVELS:
        for labels in (batch[2], batch[3]):
            per_class = crop_to_level(one_hot(labels), level)[:, 1:].sum(dim=(0, 2, 3, 4))
            assert bool((per_class >= 10).all()), (level, per_class.tolist())

    def losses() -> dict[str, float]:
        net = copy.deepcopy(trainer.net).train()  # batch statistics, no side effect
        with torch.no_grad():
            out = net(batch[0], batch[1], batch[3])
            return {
                k: float(v.total)
                for k, v in compute_task_losses(out, *batch, trainer.tasks).items()
            }

    before = losses()
    t0 = time.monotonic()
    trainer.run()
    wall = time.monotonic() - t0
    after = losses()
    drops = {k: 1 - after[k] / before[k] for k in before}
    print(f"tiny run: {wall:.1f} s; before {before}; after {after}; drops {drops}")  # noqa: T201
    assert set(drops) == {"seg", "reg", "reg_dsc"}
    assert all(d >= 0.5 for d in drops.values()), drops
