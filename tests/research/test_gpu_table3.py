"""Table 3 on a lent GPU: step-0 checkpoints, lockstep training (dry run on the CPU), the script."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from jrs.core.errors import InvalidInput
from jrs.training.config import parse_config
from jrs.training.store import save_pair, write_index
from jrs.training.synthetic import synthetic_pair
from jrs.training.trainer import Trainer
from research.gpu.gpu_pack import build_pack
from research.gpu.gpu_table3 import LOGS_NAME, SUMMARY_NAME, init_checkpoints, read_logs, run_table3

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "research" / "gpu" / "gpu_table3.sh"
SIZE = 40
NETWORKS = ("seg", "reg", "cross-stitch")


def _config(store: Path, network: str, out: Path, horizon: int = 100) -> dict[str, Any]:
    return {
        "network": {"name": network, "overrides": {"channels": [4, 8, 8]}},
        "weighting": {"name": "equal"},
        "data": {
            "store": {"path": str(store), "sources": ["phantom"]},
            "identity_share": 0.25,
            "synthmorph_share": 0.0 if network == "seg" else 0.25,
            "validation": {"store": {"path": str(store), "sources": ["validation"]}, "every": 0},
        },
        "patch_size": 48,
        "iterations": horizon,
        "schedule": {"name": "cosine", "warmup": 2, "min_lr": 1.0e-5, "horizon": horizon},
        "log_every": 1,
        "steps_per_epoch": 50,
        "seed": 3,
        "device": "cpu",
        "num_threads": 1,
        "tensorboard": False,
        "output_dir": str(out / network),
    }


def _start(pack: Path, net: str) -> Path:
    """A network's step-0 checkpoint in the pack (the last network's is the pack's own)."""
    path = pack / "table3" / f"{net}.pt"
    return path if path.is_file() else pack / "checkpoint.pt"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    records = []
    for i, (source, group) in enumerate(
        [("phantom", "a"), ("phantom", "b"), ("phantom", "c"), ("validation", "v")]
    ):
        pair = dataclasses.replace(synthetic_pair(i, SIZE), key=f"{source}_{group}_f1")
        records.append(save_pair(pair, root, {"source": source, "group": group}))
    write_index(root, records)
    return root


@pytest.fixture(scope="module")
def configs(store: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("configs")
    paths = []
    for net in NETWORKS:
        path = folder / f"table3_{net}.yaml"
        path.write_text(yaml.safe_dump(_config(store, net, folder / "runs")))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def pack(store: Path, configs: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("pack")
    written = init_checkpoints(configs, root / "init")
    assert [p.name for p in written] == [f"{n}.pt" for n in NETWORKS]
    out = root / "gpu_pack"  # the pack is written afresh, then the checkpoints go into it
    build_pack(store, out, checkpoint=written[-1], max_mb=20.0, seed=1, tree_bytes=None)
    (out / "table3").mkdir()
    for p in written[:-1]:  # the pack holds the last one as its own checkpoint
        (out / "table3" / p.name).write_bytes(p.read_bytes())
    return out


@pytest.fixture(scope="module")
def dry_run(pack: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("table3_out")
    summary = run_table3(
        pack, out, dry_run=True, max_steps=3, workers=0, warm_rounds=1, log_every=1, seed=5
    )
    return out, summary


def test_init_writes_step_zero_checkpoints_initialised_as_jrs_train_does(
    pack: Path, configs: list[Path]
) -> None:
    for net, cfg in zip(NETWORKS, configs, strict=True):
        ckpt = torch.load(_start(pack, net), map_location="cpu", weights_only=False)
        assert ckpt["step"] == 0 and ckpt["network"]["name"] == net
        assert ckpt["config"]["schedule"]["horizon"] == 100
        # the same initial weights as the trainer that `jrs train --config` would build
        config = parse_config({**yaml.safe_load(cfg.read_text()), "device": "cpu"})
        fresh = Trainer(config, train_pairs=[synthetic_pair(0, SIZE)], val_pairs=[], progress=False)
        for k, v in fresh.net.state_dict().items():
            assert torch.equal(v, ckpt["model"][k]), k


def test_init_refuses_two_configs_of_one_network(configs: list[Path], tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="second config for network 'seg'"):
        init_checkpoints([configs[0], configs[0]], tmp_path)


def test_lockstep_gives_every_network_the_same_steps_and_shares_batches_by_sampler(
    dry_run: tuple[Path, dict[str, Any]],
) -> None:
    out, summary = dry_run
    assert summary["steps_per_network"] == 3 and summary["rounds"] == 3
    assert summary["stopped_by"] == "max steps"
    # Seg samples no domain-randomised pairs: its own stream; the others share one
    assert summary["sampling_groups"] == [["seg"], ["reg", "cross-stitch"]]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{n}.pt" for n in NETWORKS] + [SUMMARY_NAME, LOGS_NAME]
    )
    for net in NETWORKS:
        info = summary["per_network"][net]
        assert info["steps"] == 3 and info["end_step"] == 3 and info["non_finite_retried"] == 0
        ckpt = torch.load(out / f"{net}.pt", map_location="cpu", weights_only=False)
        assert ckpt["step"] == 3
        entry = ckpt["provenance"][-1]
        assert entry["kind"] == "gpu-table3" and entry["start_step"] == 0
        assert entry["end_step"] == 3 and entry["bit_for_bit"] is False
        # the schedule was re-aimed at the 3 steps trained (the config said 100)
        assert entry["schedule_horizon"] == {"config": 100, "trained": 3}
        assert ckpt["config"]["schedule"]["horizon"] == 3 and ckpt["config"]["iterations"] == 3


def test_lockstep_checkpoints_differ_from_their_start_and_resume_in_the_trainer(
    dry_run: tuple[Path, dict[str, Any]], pack: Path, tmp_path: Path
) -> None:
    out, _ = dry_run
    for net in NETWORKS:
        start = torch.load(_start(pack, net), map_location="cpu", weights_only=False)
        end = torch.load(out / f"{net}.pt", map_location="cpu", weights_only=False)
        moved = [k for k, v in start["model"].items() if not torch.equal(v, end["model"][k])]
        assert moved, f"{net}: no weight changed in 3 steps"
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes((out / "reg.pt").read_bytes())
    cfg = torch.load(out / "reg.pt", map_location="cpu", weights_only=False)["config"]
    config = parse_config({**cfg, "output_dir": str(run), "device": "cpu"})
    trainer = Trainer(
        config, train_pairs=[synthetic_pair(0, SIZE)], val_pairs=[], resume=True, progress=False
    )
    assert trainer.step == 3


def test_logs_archive_holds_each_networks_training_log(
    dry_run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    out, _ = dry_run
    with tarfile.open(out / LOGS_NAME) as tar:
        assert sorted(tar.getnames()) == sorted(f"{n}_train_log.csv" for n in NETWORKS)
    files = read_logs(out / LOGS_NAME, tmp_path)
    for f in files:
        lines = f.read_text().splitlines()
        assert lines[0].startswith("step,") and len(lines) == 4  # header + steps 1..3


def test_checkpoints_at_different_steps_are_refused(
    pack: Path, dry_run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    out, _ = dry_run
    with pytest.raises(InvalidInput, match="different steps"):
        run_table3(
            pack,
            tmp_path,
            checkpoints=[pack / "table3" / "seg.pt", out / "reg.pt"],
            dry_run=True,
            max_steps=1,
        )


def test_the_real_run_without_cuda_refuses(pack: Path, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(InvalidInput, match="dry-run"):
        run_table3(pack, tmp_path, max_steps=1)


def test_script_is_executable_valid_bash_and_bounded_in_time() -> None:
    assert SCRIPT.stat().st_mode & 0o111, "gpu_table3.sh must be executable"
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert 'JRS_GPU_ENTRY="research.gpu.gpu_table3 run"' in SCRIPT.read_text()
    train = (REPO / "research" / "gpu" / "gpu_train.sh").read_text()  # the wrapper it runs
    assert "timeout" in train and "JRS_GPU_TRAIN_TIMEOUT:-585" in train
    assert "${JRS_GPU_ENTRY:-research.gpu.gpu_run}" in train


def test_script_dry_run_trains_the_networks_of_the_pack(pack: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "JRS_GPU_PACK": str(pack)}
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--max-steps", "1", "--workers", "0"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert sorted(p.name for p in out.glob("*.pt")) == sorted(f"{n}.pt" for n in NETWORKS)
    assert (out / "table3_train.log").is_file() and (out / SUMMARY_NAME).is_file()
