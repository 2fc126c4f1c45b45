"""Training on a lent GPU: the pack, the one-call segment (dry run on the CPU), the continuation."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from jrs.core.errors import InvalidInput
from jrs.training.config import TrainConfig, parse_config
from jrs.training.data import AIR, PatchSampler
from jrs.training.runtime import seed_everything
from jrs.training.store import REGION_STRIDE, load_stored_pair, save_pair, write_index
from jrs.training.synthetic import synthetic_pair
from jrs.training.trainer import Trainer
from research.gpu.continue_from import continue_from, cpu_resumable, fresh_random_state
from research.gpu.gpu_pack import INDEX_ALLOWANCE, build_pack, load_pack, select_pairs
from research.gpu.gpu_run import CHECKPOINT_NAME, LOG_NAME, SUMMARY_NAME, run_segment

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "research" / "gpu" / "gpu_train.sh"
MIB = 1024 * 1024
SIZE = 40  # edge of the synthetic stored pairs (voxels)
# key, seed, source, group, variety, known
PAIRS: list[tuple[str, int, str, str, str | None, tuple[int, ...]]] = [
    ("phantom_b0_f1", 0, "phantom", "b0", "broad", (1, 2, 3, 4)),
    ("phantom_b0_f2", 1, "phantom", "b0", "broad", (1, 2, 3, 4)),
    ("phantom_b1_f1", 2, "phantom", "b1", "broad", (1, 2, 3, 4)),
    ("phantom_b2_f1", 3, "phantom", "b2", "broad", (1, 2, 3, 4)),
    ("phantom_s0_f1", 4, "phantom", "s0", "standard", (1, 2, 3, 4)),
    ("real_r0_f1", 5, "real", "r0", None, (1, 2, 4)),
    ("phantom_v0_f1", 6, "phantom", "v0", "broad", (1, 2, 3, 4)),  # a validation group
    ("validation_v0_f2", 7, "validation", "v0", "broad", (1, 2, 3, 4)),
]
TRAINING_KEYS = {k for k, _, src, g, _, _ in PAIRS if src != "validation" and g != "v0"}


def tiny_config(out: Path, store: Path, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "network": {"name": "cross-stitch", "overrides": {"channels": [4, 8, 8]}},
        "weighting": {"name": "equal"},
        "data": {
            "store": {"path": str(store), "sources": ["phantom", "real"]},
            "identity_share": 0.25,
            "synthmorph_share": 0.25,
            "validation": {"store": {"path": str(store), "sources": ["validation"]}, "every": 0},
        },
        "patch_size": 48,
        "iterations": 1,
        "log_every": 1,
        "steps_per_epoch": 2,
        "device": "cpu",
        "num_threads": 1,
        "tensorboard": False,
        "output_dir": str(out),
    }
    base.update(kw)
    return parse_config(base)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    records = []
    for key, seed, source, group, variety, known in PAIRS:
        pair = dataclasses.replace(synthetic_pair(seed, SIZE), key=key, known=known)
        meta = {"source": source, "group": group, **({"variety": variety} if variety else {})}
        records.append(save_pair(pair, root, meta))
    write_index(root, records)
    return root


@pytest.fixture(scope="module")
def checkpoint(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("cpu_run")
    Trainer(tiny_config(run, store), progress=False).run()
    return run / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def pack(store: Path, checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pack") / "gpu_pack"
    build_pack(store, out, checkpoint=checkpoint, max_mb=20.0, seed=1, tree_bytes=None)
    return out


@pytest.fixture(scope="module")
def dry_run(pack: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("gpu_out")
    summary = run_segment(
        pack, out, dry_run=True, max_steps=2, workers=0, probe_batches=1, log_every=1, seed=5
    )
    return out, summary


# ---------------------------------------------------------------- pack
def test_select_pairs_keeps_the_proportions_and_takes_distinct_patients_first() -> None:
    recs = [
        {"key": f"b{g}_{f}", "group": f"b{g}", "source": "phantom", "variety": "broad"}
        for g in range(5)
        for f in range(2)
    ]
    recs += [
        {"key": f"s{i}", "group": f"s{i}", "source": "phantom", "variety": "standard"}
        for i in range(2)
    ]
    recs += [{"key": f"r{i}", "group": "r", "source": "real"} for i in range(2)]
    order = select_pairs(recs, seed=3)
    assert sorted(r["key"] for r in order) == sorted(r["key"] for r in recs)
    first = order[:7]
    strata = [f"{r['source']}-{r.get('variety')}" for r in first]
    assert strata.count("phantom-broad") == 5 and strata.count("phantom-standard") == 1
    assert strata.count("real-None") == 1
    broad_groups = [r["group"] for r in order if r.get("variety") == "broad"][:5]
    assert len(set(broad_groups)) == 5  # one fraction of each patient before a second
    assert select_pairs(recs, seed=3) == order and select_pairs(recs, seed=4) != order


def test_pack_holds_only_training_pairs_that_read_back_as_the_store_samples_them(
    store: Path, pack: Path
) -> None:
    index = json.loads((pack / "index.json").read_text())
    keys = {p["key"] for p in index["pairs"]}
    assert keys == TRAINING_KEYS  # everything fits in 20 MiB; never a validation group
    assert "v0" in index["held_out_groups"]
    assert index["strata"]["packed"] == {"phantom-broad": 4, "phantom-standard": 1, "real": 1}
    loaded = load_pack(pack)
    assert len(loaded.pairs) == len(keys) and loaded.index["crop"] == 56
    sampler = PatchSampler(loaded.pairs, patch_size=48)
    rng = np.random.default_rng(0)
    for crop, rec in zip(loaded.pairs, index["pairs"], strict=True):
        stored = load_stored_pair(store / rec["key"])
        assert crop.key == f"{rec['key']}#c0" and crop.known == tuple(rec["known"])
        origin = np.asarray(rec["crops"][0]["origin"])
        assert crop.regions
        for name, pts in crop.regions.items():
            p = pts[int(rng.integers(len(pts)))] + rng.integers(0, REGION_STRIDE[name], 3)
            a = sampler._crop(crop.fixed, p, AIR)
            b = sampler._crop(np.asarray(stored.fixed, np.float32), p + origin, AIR)
            assert np.abs(a - b).max() <= 0.5e-3 + 1e-6  # int16 HU: at most 0.5 HU off
            la = sampler._crop(crop.moving_labels, p, 0)
            lb = sampler._crop(np.asarray(stored.moving_labels), p + origin, 0)
            assert np.array_equal(la, lb)
            assert (p - 24 >= 0).all() and (p + 24 <= 56).all()  # the patch lies in the crop


def test_pack_honours_the_size_limit(
    store: Path, checkpoint: Path, pack: Path, tmp_path: Path
) -> None:
    index = json.loads((pack / "index.json").read_text())
    ckpt_bytes = checkpoint.stat().st_size
    three = sum(p["bytes"] for p in index["pairs"][:3])
    limit_mb = (ckpt_bytes + INDEX_ALLOWANCE + three + 100) / MIB
    small = build_pack(
        store, tmp_path / "p", checkpoint=checkpoint, max_mb=limit_mb, seed=1, tree_bytes=None
    )
    total = sum(f.stat().st_size for f in (tmp_path / "p").rglob("*") if f.is_file())
    assert total <= limit_mb * MIB
    assert [p["key"] for p in small["pairs"]] == [p["key"] for p in index["pairs"][:3]]
    assert small["stop"].startswith("size limit")
    assert len(load_pack(tmp_path / "p").pairs) == 3


def test_pack_refuses_limits_that_cannot_work(
    store: Path, checkpoint: Path, tmp_path: Path
) -> None:
    with pytest.raises(InvalidInput, match="working tree travels too"):
        build_pack(store, tmp_path / "a", checkpoint=checkpoint, max_mb=40, tree_bytes=30 * MIB)
    with pytest.raises(InvalidInput, match="checkpoint alone"):
        build_pack(store, tmp_path / "b", checkpoint=checkpoint, max_mb=0.01, tree_bytes=None)
    with pytest.raises(InvalidInput, match="too small"):
        build_pack(store, tmp_path / "c", checkpoint=checkpoint, crop=50, tree_bytes=None, max_mb=9)


def test_a_damaged_pack_is_refused(pack: Path, tmp_path: Path) -> None:
    copy = tmp_path / "pack"
    shutil.copytree(pack, copy)
    victim = sorted((copy / "pairs").iterdir())[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(InvalidInput, match="SHA-256"):
        load_pack(copy)


# ---------------------------------------------------------------- the segment
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_the_real_run_without_cuda_refuses_and_points_at_the_dry_run(
    pack: Path, tmp_path: Path
) -> None:
    with pytest.raises(InvalidInput, match="--dry-run"):
        run_segment(pack, tmp_path, dry_run=False)


def test_dry_run_writes_summary_log_and_a_checkpoint_the_trainer_resumes(
    dry_run: tuple[Path, dict[str, Any]], checkpoint: Path, store: Path, tmp_path: Path
) -> None:
    out, summary = dry_run
    start = torch.load(checkpoint, map_location="cpu", weights_only=False)["step"]
    assert summary["dry_run"] is True and summary["device"] == "cpu"
    assert summary["start_step"] == start and summary["end_step"] == start + 2
    assert summary["steps"] == 2 and summary["stopped_by"] == "max steps"
    assert summary["steps_per_s"] > 0 and 0 <= summary["data_share"] < 1
    for key in ("device_name", "torch_version", "loss_before", "loss_after", "train_s"):
        assert summary[key] is not None
    assert np.isfinite(summary["loss_before"]) and np.isfinite(summary["loss_after"])
    assert summary["checkpoint"]["returns"] and summary["pack"]["pairs"] == len(TRAINING_KEYS)
    assert json.loads((out / SUMMARY_NAME).read_text()) == summary
    with (out / LOG_NAME).open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [start + 1, start + 2]

    ckpt = torch.load(out / CHECKPOINT_NAME, map_location="cpu", weights_only=False)
    seg = ckpt["provenance"][-1]
    assert seg["kind"] == "gpu-segment" and seg["bit_for_bit"] is False and seg["dry_run"]
    assert (seg["start_step"], seg["end_step"], seg["steps"]) == (start, start + 2, 2)
    assert ckpt["config"]["device"] == "cpu" and ckpt["config"]["output_dir"] != str(out)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copyfile(out / CHECKPOINT_NAME, run / "checkpoints" / "last.pt")
    resumed = Trainer(tiny_config(run, store, iterations=10), resume=True, progress=False)
    assert resumed.step == start + 2 and resumed.provenance[-1]["kind"] == "gpu-segment"


def test_continuation_reseeds_the_sampler_and_keeps_the_learning_state(
    dry_run: tuple[Path, dict[str, Any]], store: Path, tmp_path: Path
) -> None:
    out, summary = dry_run
    gpu = torch.load(out / CHECKPOINT_NAME, map_location="cpu", weights_only=False)
    new = cpu_resumable(gpu, seed=11)
    for k, v in gpu["model"].items():
        assert torch.equal(new["model"][k], v)
    assert new["optimizer"] is gpu["optimizer"] and new["step"] == gpu["step"]
    assert new["sampler"] == np.random.default_rng(11).bit_generator.state
    seed_everything(11)
    assert torch.equal(new["rng"]["torch"], torch.get_rng_state())
    assert new["rng"]["python"] == random.getstate()
    assert np.array_equal(new["rng"]["numpy"][1], np.random.get_state()[1])
    assert "cuda" not in new["rng"]
    _rng, sampler = fresh_random_state(11)
    assert sampler == new["sampler"]
    assert [p["kind"] for p in new["provenance"]][-2:] == ["gpu-segment", "cpu-continuation"]
    assert new["provenance"][-1]["bit_for_bit"] is False

    # a run whose CPU branch went past the segment's start is refused, unless forced
    start, end = summary["start_step"], summary["end_step"]
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    ahead = dict(gpu, step=start + 5)
    torch.save(ahead, run / "checkpoints" / "last.pt")
    header = (out / LOG_NAME).read_text().splitlines()[0]
    blank = "," * (len(header.split(",")) - 1)
    lines = [header] + [f"{s}{blank}" for s in range(start - 1, start + 6)]
    (run / "train_log.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(InvalidInput, match="diverged"):
        continue_from(out / CHECKPOINT_NAME, run_dir=run)
    res = continue_from(out / CHECKPOINT_NAME, run_dir=run, force=True)
    assert res["step"] == end and res["gpu_segment"] == [start, end]
    assert Path(res["backup"]).is_file()
    with (run / "train_log.csv").open() as fh:
        steps = [int(float(r["step"])) for r in csv.DictReader(fh)]
    assert steps == [start - 1, start, start + 1, start + 2]
    trainer = Trainer(tiny_config(run, store, iterations=10), resume=True, progress=False)
    assert trainer.step == end
    trainer.train_step()
    assert trainer.step == end + 1
    state = trainer.state()
    assert [p["kind"] for p in state["provenance"]][-2:] == ["gpu-segment", "cpu-continuation"]
    with pytest.raises(InvalidInput, match="exists"):
        continue_from(out / CHECKPOINT_NAME, out=run / "checkpoints" / "last.pt")


# ---------------------------------------------------------------- the script
def test_script_is_executable_valid_bash_and_bounded_in_time() -> None:
    assert SCRIPT.stat().st_mode & 0o111, "gpu_train.sh must be executable"
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    text = SCRIPT.read_text()
    assert "timeout" in text and "JRS_GPU_TRAIN_TIMEOUT:-585" in text  # under the 600 s call
    notes = (REPO / "research" / "notes" / "lent-gpu.md").read_text()  # the lab notebook
    assert "## Training on a lent GPU" in notes and "bash research/gpu/gpu_train.sh" in notes
    assert "research/notes/lent-gpu.md" in (REPO / "docs" / "training.md").read_text()


@pytest.mark.slow
@pytest.mark.integration
def test_script_dry_run_needs_no_simpleitk_pydicom_or_pydantic(pack: Path, tmp_path: Path) -> None:
    stubs = tmp_path / "stubs"
    for name in ("SimpleITK", "pydicom", "pydantic"):
        (stubs / name).mkdir(parents=True)
        (stubs / name / "__init__.py").write_text(
            f"raise ImportError('{name}: not on the GPU image')\n"
        )
    out = tmp_path / "out"
    env = {
        **os.environ,
        "OUT": str(out),
        "PYTHON": sys.executable,
        "JRS_GPU_PACK": str(pack),
        "PYTHONPATH": str(stubs),
    }
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--max-steps", "1", "--workers", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert summary["steps"] == 1 and summary["workers"] == 1 and summary["dry_run"] is True
    assert (out / CHECKPOINT_NAME).is_file() and (out / "gpu_train.log").is_file()
    assert (out / LOG_NAME).read_text().count("\n") == 2
