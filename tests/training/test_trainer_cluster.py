"""`jrs train` on a GPU workstation or a cluster: device, loader workers, AMP flags, resume from a
file, init-from, and several processes under torchrun (DDP, Gloo on the CPU)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from jrs.core.errors import InvalidInput
from jrs.training.config import TrainConfig, parse_config
from jrs.training.data import KeyedPatchSampler, PatchSampler
from jrs.training.plots import read_log
from jrs.training.runtime import distributed_info, resolve_device
from jrs.training.synthetic import synthetic_pair
from jrs.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
V3_CHECKPOINT = REPO / "models" / "checkpoints" / "crossstitch_v3_last.pt"

#: loader workers and DDP beside OpenVINO's threads crash: see tests/training/conftest.py
pytestmark = pytest.mark.fresh_interpreter


def tiny(out: Path, **kw: Any) -> dict[str, Any]:
    """A tiny run's config as a mapping (cross-stitch 4/8/8, 48^3 patches, CPU)."""
    base: dict[str, Any] = {
        "network": {"name": "cross-stitch", "overrides": {"channels": [4, 8, 8]}},
        "weighting": {"name": "dwa"},
        "data": {
            "synthetic": {"count": 2, "size": 48},
            "validation": {"synthetic": {"count": 1, "seed": 50, "size": 48}, "every": 2},
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
    return base


def tiny_config(out: Path, **kw: Any) -> TrainConfig:
    return parse_config(tiny(out, **kw))


@pytest.fixture(scope="module")
def pairs() -> list:
    return [synthetic_pair(0, 48), synthetic_pair(1, 48)]


def _losses(run: Path) -> dict[str, np.ndarray]:
    log = read_log(run / "train_log.csv")
    return {k: v for k, v in log.items() if k not in ("wall_s", "data_s")}


def _same_logs(a: Path, b: Path, steps: list[int]) -> None:
    la, lb = _losses(a), _losses(b)
    assert la.keys() == lb.keys()
    assert la["step"].tolist() == lb["step"].tolist() == steps
    for k in la:
        np.testing.assert_array_equal(la[k], lb[k], err_msg=k)


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _batches_equal(x: Any, y: Any) -> bool:
    return all(
        np.array_equal(getattr(x, f), getattr(y, f))
        for f in ("fixed", "moving", "fixed_labels", "moving_labels", "class_mask", "identity")
    )


# ---------------------------------------------------------------- device
def test_device_setting_takes_a_gpu_index(tmp_path: Path) -> None:
    assert tiny_config(tmp_path, device="cuda:1").device == "cuda:1"
    for bad in ("tpu", "cuda:x", "gpu", "cuda:"):
        with pytest.raises(InvalidInput, match="device must be auto, cpu, cuda or cuda:N"):
            tiny_config(tmp_path, device=bad)
    with pytest.raises(InvalidInput, match="workers"):
        tiny_config(tmp_path, workers=-1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages of a CPU-only machine")
def test_resolve_device_without_a_gpu() -> None:
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("auto", local_rank=1) == torch.device("cpu")
    assert resolve_device("cpu", local_rank=1) == torch.device("cpu")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(InvalidInput, match=f"device '{name}' requested but no CUDA GPU"):
            resolve_device(name)


def test_distributed_info_reads_the_torchrun_variables() -> None:
    assert not distributed_info({}).enabled
    info = distributed_info({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (info.rank, info.world_size, info.local_rank, info.enabled) == (3, 4, 1, True)
    with pytest.raises(InvalidInput, match="do not fit"):
        distributed_info({"RANK": "4", "WORLD_SIZE": "4"})


# ---------------------------------------------------------------- loader workers
def test_batches_do_not_depend_on_the_worker_count(pairs: list) -> None:
    kw: dict[str, Any] = {"patch_size": 48, "seed": 7, "identity_share": 0.3}
    here = KeyedPatchSampler(pairs, workers=0, **kw)
    loaded = KeyedPatchSampler(pairs, workers=2, **kw)
    try:
        a = [here.sample() for _ in range(4)]
        b = [loaded.sample() for _ in range(4)]
        assert all(_batches_equal(x, y) for x, y in zip(a, b, strict=True))
        assert not _batches_equal(a[0], a[1])
        assert loaded.state() == here.state() == {"scheme": "keyed", "seed": 7, "next": 4}
        # a sampler set to a saved position continues there, with another worker count
        again = KeyedPatchSampler(pairs, workers=1, **kw)
        again.set_state({"scheme": "keyed", "seed": 7, "next": 2})
        assert _batches_equal(again.sample(), a[2]) and _batches_equal(again.sample(), a[3])
        again.close()
        # each rank draws its own stream; rank 0's is the single process's
        other = KeyedPatchSampler(pairs, workers=0, rank=1, **kw)
        assert not _batches_equal(other.sample(), a[0])
    finally:
        loaded.close()


def test_resume_with_workers_is_bit_for_bit(tmp_path: Path, pairs: list) -> None:
    """2 loader workers, resumed with 2 workers: the same losses and weights as a straight run
    in the training process (the batches do not depend on the worker count)."""
    torch.set_num_threads(2)
    straight = Trainer(tiny_config(tmp_path / "a", iterations=5), pairs, [], progress=False)
    straight.run()
    first = Trainer(tiny_config(tmp_path / "b", iterations=3, workers=2), pairs, [], progress=False)
    assert first.workers == 2
    first.run()
    cfg = tiny_config(tmp_path / "b", iterations=5, workers=2)
    resumed = Trainer(cfg, pairs, [], resume=True, progress=False)
    assert resumed.step == 3 and resumed.sampler.state()["next"] == 3
    resumed.run()
    _same_logs(tmp_path / "a", tmp_path / "b", [1, 2, 3, 4, 5])
    _same_weights(straight.net.state_dict(), resumed.net.state_dict())


def test_a_checkpoint_of_the_one_generator_sampler_continues_its_stream(
    tmp_path: Path, pairs: list, caplog: pytest.LogCaptureFixture
) -> None:
    """Checkpoints written before keyed sampling (or by research.gpu.continue_from) hold the state of
    PatchSampler's one generator: in the training process that stream goes on as it always did."""
    Trainer(tiny_config(tmp_path, iterations=2), pairs, [], progress=False).run()
    path = tmp_path / "checkpoints" / "last.pt"
    ckpt = torch.load(path, weights_only=False)
    legacy = dict(np.random.default_rng(99).bit_generator.state)
    ckpt["sampler"] = legacy
    torch.save(ckpt, path)
    old = PatchSampler(pairs, patch_size=48, seed=0)
    old.set_state(legacy)
    expected = [old.sample(), old.sample()]

    cfg = tiny_config(tmp_path, iterations=4)
    resumed = Trainer(cfg, pairs, [], resume=True, progress=False)
    assert _batches_equal(resumed.sampler.sample(), expected[0])
    assert _batches_equal(resumed.sampler.sample(), expected[1])
    assert "bit_generator" in resumed.sampler.state()  # still the one generator

    with caplog.at_level(logging.WARNING, logger="jrs.training.data"):
        workers = Trainer(
            tiny_config(tmp_path, iterations=4, workers=2), pairs, [], resume=True, progress=False
        )
    assert "keyed by" in caplog.text
    assert workers.sampler.state() == {"scheme": "keyed", "seed": 0, "next": 2}
    fresh = KeyedPatchSampler(pairs, patch_size=48, seed=0)
    assert _batches_equal(workers.sampler.sample(), fresh.draw(2))
    workers.close()


# ---------------------------------------------------------------- resume from a file
def test_resume_from_a_checkpoint_file_continues_from_its_step(tmp_path: Path, pairs: list) -> None:
    torch.set_num_threads(2)
    straight = Trainer(tiny_config(tmp_path / "a", iterations=5), pairs, [], progress=False)
    straight.run()
    Trainer(tiny_config(tmp_path / "b", iterations=3), pairs, [], progress=False).run()
    saved = tmp_path / "kept" / "step3.pt"
    saved.parent.mkdir()
    shutil.copyfile(tmp_path / "b" / "checkpoints" / "last.pt", saved)
    shutil.rmtree(tmp_path / "b")
    resumed = Trainer(
        tiny_config(tmp_path / "c", iterations=5), pairs, [], resume=saved, progress=False
    )
    assert resumed.step == 3
    resumed.run()
    la, lc = _losses(tmp_path / "a"), _losses(tmp_path / "c")
    assert lc["step"].tolist() == [4, 5]
    for k in la:
        np.testing.assert_array_equal(la[k][3:], lc[k], err_msg=k)
    _same_weights(straight.net.state_dict(), resumed.net.state_dict())
    assert torch.load(tmp_path / "c" / "checkpoints" / "last.pt", weights_only=False)["step"] == 5


# ---------------------------------------------------------------- init-from
def test_init_from_starts_a_new_run_with_the_network_weights(tmp_path: Path, pairs: list) -> None:
    src_cfg = tiny_config(tmp_path / "src", iterations=3, weighting={"name": "homoscedastic"})
    Trainer(src_cfg, pairs, [], progress=False).run()
    src_path = tmp_path / "src" / "checkpoints" / "last.pt"
    src = torch.load(src_path, weights_only=False)
    assert src["step"] == 3 and src["optimizer"]["state"]

    cfg = tiny_config(tmp_path / "new", iterations=1, weighting={"name": "homoscedastic"}, seed=5)
    new = Trainer(cfg, pairs, [], init_from=src_path, progress=False)
    # the weights the first step starts from are the source's (BatchNorm statistics included)
    _same_weights(new.net.state_dict(), src["model"])
    assert (new.step, new.epoch) == (0, 0)
    assert new.optimizer.state_dict()["state"] == {}
    assert new.scheduler.state_dict()["last_epoch"] == 0
    fresh = Trainer(cfg, pairs, [], progress=False)
    _same_weights(new.weighting.state_dict(), fresh.weighting.state_dict())
    assert not all(
        torch.equal(v, src["weighting"][k]) for k, v in fresh.weighting.state_dict().items()
    )
    assert new.sampler.state() == {"scheme": "keyed", "seed": 5, "next": 0}
    entry = new.provenance[-1]
    assert entry["kind"] == "init-from" and entry["from"] == str(src_path) and entry["step"] == 3
    new.run()
    log = _losses(tmp_path / "new")
    assert log["step"].tolist() == [1]
    ckpt = torch.load(tmp_path / "new" / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["step"] == 1 and ckpt["provenance"][-1]["kind"] == "init-from"
    assert any(not torch.equal(v, src["model"][k]) for k, v in ckpt["model"].items())  # trained


def test_init_from_refuses_another_network_naming_the_file(tmp_path: Path, pairs: list) -> None:
    Trainer(tiny_config(tmp_path / "src", iterations=0), pairs, [], progress=False).run()
    src = tmp_path / "src" / "checkpoints" / "last.pt"
    wider = tiny_config(
        tmp_path / "x", network={"name": "cross-stitch", "overrides": {"channels": [4, 8, 16]}}
    )
    with pytest.raises(InvalidInput) as exc:
        Trainer(wider, pairs, [], init_from=src, progress=False)
    msg = str(exc.value)
    assert str(src) in msg and "channels" in msg and "[4, 8, 8], [4, 8, 16]" in msg
    assert "jrs-train-checkpoint" in msg and "'cross-stitch'" in msg
    seg = tiny_config(tmp_path / "x", network={"name": "seg", "overrides": {"channels": [4, 8, 8]}})
    with pytest.raises(
        InvalidInput, match="checkpoint of network 'cross-stitch', config asks for 'seg'"
    ) as exc:
        Trainer(seg, pairs, [], init_from=src, progress=False)
    assert str(src) in str(exc.value)
    other = tmp_path / "weights.pt"
    torch.save({"model": {}}, other)
    with pytest.raises(
        InvalidInput, match="not a jrs training checkpoint; init-from accepts"
    ) as exc:
        Trainer(tiny_config(tmp_path / "x"), pairs, [], init_from=other, progress=False)
    assert str(other) in str(exc.value)
    with pytest.raises(InvalidInput, match="no checkpoint to init-from from"):
        Trainer(
            tiny_config(tmp_path / "x"), pairs, [], init_from=tmp_path / "nope.pt", progress=False
        )
    with pytest.raises(InvalidInput, match="holds a run already"):  # a new run needs a new folder
        Trainer(tiny_config(tmp_path / "src"), pairs, [], init_from=src, progress=False)
    with pytest.raises(InvalidInput, match="give one"):
        Trainer(tiny_config(tmp_path / "x"), pairs, [], resume=True, init_from=src, progress=False)


@pytest.mark.skipif(not V3_CHECKPOINT.is_file(), reason="the committed v3 checkpoint is absent")
def test_init_from_the_committed_v3_checkpoint(tmp_path: Path) -> None:
    """The documented fine-tuning start: a v3-config network takes the v3 weights."""
    v3 = yaml.safe_load((REPO / "training" / "configs" / "crossstitch_v3.yaml").read_text())
    cfg = tiny_config(tmp_path / "v4", network=v3["network"], iterations=0)
    pair = [synthetic_pair(0, 48)]
    trainer = Trainer(cfg, pair, [], init_from=V3_CHECKPOINT, progress=False)
    _same_weights(trainer.net.state_dict(), torch.load(V3_CHECKPOINT, weights_only=False)["model"])
    assert trainer.step == 0 and trainer.provenance[-1]["step"] == 20000


# ---------------------------------------------------------------- the command
def test_cli_train_device_workers_precision_resume_from_and_init_from(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from jrs.cli import app

    f = tmp_path / "tiny.yaml"
    f.write_text(yaml.safe_dump(tiny(tmp_path / "unused", num_threads=2)))
    runner = CliRunner()

    def train(*args: str) -> Any:
        return runner.invoke(app, ["train", "--config", str(f), *args])

    run = tmp_path / "run"
    res = train("--iterations", "2", "--out", str(run), "--device", "cpu", "--workers", "1",
                "--no-amp", "--precision", "fp32")  # fmt: skip
    assert res.exit_code == 0, res.output
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["device"], saved["workers"], saved["amp"], saved["precision"]) == (
        "cpu", 1, False, "fp32"
    )  # fmt: skip
    last = run / "checkpoints" / "last.pt"
    res = train("--iterations", "3", "--out", str(tmp_path / "cont"), "--resume-from", str(last))
    assert res.exit_code == 0, res.output
    assert (
        torch.load(tmp_path / "cont" / "checkpoints" / "last.pt", weights_only=False)["step"] == 3
    )
    res = train("--iterations", "3", "--out", str(run), "--resume")
    assert res.exit_code == 0, res.output
    assert torch.load(last, weights_only=False)["step"] == 3
    res = train("--iterations", "1", "--out", str(tmp_path / "v4"), "--init-from", str(last))
    assert res.exit_code == 0, res.output
    ckpt = torch.load(tmp_path / "v4" / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["step"] == 1 and ckpt["provenance"][-1]["from"] == str(last)

    wide = tmp_path / "wide.yaml"
    wide.write_text(
        yaml.safe_dump(
            tiny(
                tmp_path / "w",
                network={"name": "cross-stitch", "overrides": {"channels": [4, 8, 16]}},
            )
        )
    )
    res = runner.invoke(app, ["train", "--config", str(wide), "--init-from", str(last)])
    assert res.exit_code == 2 and str(last) in res.output and "channels" in res.output
    res = train("--out", str(tmp_path / "z"), "--init-from", str(last), "--resume")
    assert res.exit_code == 2 and "give one of them" in res.output
    res = train("--out", str(tmp_path / "z"), "--device", "tpu")
    assert res.exit_code == 2 and "device must be auto, cpu, cuda or cuda:N" in res.output
    res = train("--out", str(tmp_path / "z"), "--precision", "fp8")
    assert res.exit_code == 2 and "precision" in res.output
    if not torch.cuda.is_available():
        res = train("--out", str(tmp_path / "z"), "--device", "cuda:0")
        assert res.exit_code == 2 and "no CUDA GPU" in res.output


# ---------------------------------------------------------------- several processes (torchrun)
def _gloo() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


needs_gloo = pytest.mark.skipif(not _gloo(), reason="torch.distributed with Gloo is unavailable")


def _torchrun(
    config: Path, *args: str, nproc: int = 2, entry: tuple[str, ...] = ("jrs.cli", "train")
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
        str(nproc), "-m", *entry, "--config", str(config), *args,
    ]  # fmt: skip
    return subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False
    )


def _ddp_config(tmp_path: Path, **kw: Any) -> Path:
    f = tmp_path / "ddp.yaml"
    f.write_text(yaml.safe_dump(tiny(tmp_path / "unused", num_threads=1, **kw)))
    return f


@needs_gloo
@pytest.mark.integration
def test_torchrun_two_processes_write_one_run_that_loads(tmp_path: Path) -> None:
    """Two Gloo processes: one checkpoint / log set, written by rank 0; each rank drew its own
    batches, and the logged step-1 loss is the mean of the two ranks' losses."""
    config = _ddp_config(tmp_path, iterations=3, weighting={"name": "equal"})
    run = tmp_path / "run"
    # the cluster entry point: python -m jrs.training (the training unit alone, no command package)
    proc = _torchrun(config, "--out", str(run), "--workers", "1", entry=("jrs.training",))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (proc.stdout + proc.stderr).count("step 3:") == 1  # the summary line of rank 0 only
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoints", "config.yaml", "plots", "train_log.csv", "validation.csv"
    ]  # fmt: skip
    log = _losses(run)
    assert log["step"].tolist() == [1, 2, 3]
    assert read_log(run / "validation.csv")["step"].tolist() == [2]
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["step"] == 3 and ckpt["world_size"] == 2
    assert not any(k.startswith("module.") for k in ckpt["model"])
    assert ckpt["sampler"] == {"scheme": "keyed", "seed": 0, "next": 3}

    # step 1: both ranks start from the same weights; each rank's batch 0 is its own stream's
    cfg = parse_config(yaml.safe_load(config.read_text()) | {"output_dir": str(tmp_path / "one")})
    one = Trainer(cfg, progress=False)
    one.net.train()
    per_rank = []
    for rank in (0, 1):
        sampler = KeyedPatchSampler(one.sampler.pairs, seed=0, rank=rank, patch_size=48)
        batch = sampler.draw(0)
        losses = one.forward_losses(*one._tensors(batch), one._extras(batch))
        per_rank.append({t: float(v.total.detach()) for t, v in losses.items()})
    assert per_rank[0] != per_rank[1]
    for t in per_rank[0]:
        mean = (per_rank[0][t] + per_rank[1][t]) / 2
        assert log[f"loss_{t}"][0] == pytest.approx(mean, rel=1e-4), t
    assert log["loss_total"][0] == pytest.approx(
        sum(log[f"loss_{t}"][0] for t in per_rank[0]), rel=1e-6
    )

    # the checkpoint resumes in one process, too
    resumed = Trainer(
        parse_config(
            yaml.safe_load(config.read_text()) | {"output_dir": str(run), "iterations": 4}
        ),
        resume=True,
        progress=False,
    )
    assert resumed.step == 3
    _same_weights(resumed.net.state_dict(), ckpt["model"])


@needs_gloo
@pytest.mark.slow
@pytest.mark.integration
def test_torchrun_resume_is_bit_for_bit(tmp_path: Path) -> None:
    """Two processes for 4 steps, or for 2 and resumed to 4: the same log and weights."""
    config = _ddp_config(tmp_path, iterations=4)
    straight, parted = tmp_path / "a", tmp_path / "b"
    for args in (
        ("--out", str(straight)),
        ("--out", str(parted), "--iterations", "2"),
        ("--out", str(parted), "--resume", "--workers", "1"),
    ):
        proc = _torchrun(config, *args)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _same_logs(straight, parted, [1, 2, 3, 4])
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(parted / "checkpoints" / "last.pt", weights_only=False)
    _same_weights(a["model"], b["model"])
    assert a["weighting"]["_extra_state"]["history"] == b["weighting"]["_extra_state"]["history"]


def test_time_budget_stops_at_a_step_with_last_saved_and_resume_finishes(tmp_path: Path) -> None:
    """``--time-budget``: stop at a step boundary with ``last.pt``; ``--resume`` goes on."""
    from jrs.training.launch import train_run

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny(tmp_path / "run", iterations=4, num_threads=1)))
    first = train_run(config, time_budget_minutes=1e-6)  # spent after the first step
    assert first.step == 1
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["step"] == 1
    rest = train_run(config, resume=True)
    assert rest.step == 4


def test_python_m_jrs_training_refuses_a_missing_config_with_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "jrs.training", "--config", str(tmp_path / "none.yaml")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "none.yaml: training config file not found" in proc.stderr
