"""Training-throughput benchmark: steps/s and peak memory per network.

Run as ``python -m jrs.training.benchmark``.

Each network is timed in its own subprocess (so that the peak resident memory, from
``resource.getrusage``, belongs to that network alone): one training step = sample a batch of
``pairs_per_batch`` pairs (+ their swaps) of ``n^3`` patches, forward, all task losses, backward,
RAdam step, exactly as :class:`jrs.training.trainer.Trainer` does, on synthetic pairs. A few warm-up
steps are excluded from the timing.

Example::

    python -m jrs.training.benchmark --patch-size 96 --steps 3 --warmup 1 --threads 2

Precision comparison (fp32 against bf16 autocast, the same network, data and seed, steps
interleaved in one process so that a shared, noisy machine slows both alike), with the share of
each step spent drawing the batch from the memory-mapped training store::

    python -m jrs.training.benchmark --compare-precision --networks cross-stitch --patch-size 64 \
        --steps 20 --warmup 3 --threads 2 --store data/store_v3
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jrs.training.config import parse_config
from jrs.training.runtime import cpu_supports_bf16
from jrs.training.synthetic import synthetic_pair
from jrs.training.trainer import Trainer

log = logging.getLogger(__name__)

NETWORKS = ("seg", "reg", "jrs-reg", "dense", "sedd", "cross-stitch")


def bench_one(
    network: str, patch_size: int, steps: int, warmup: int, threads: int, device: str
) -> dict[str, float | str | int]:
    """Time training steps of one network in this process.

    Args:
        network: Network name.
        patch_size: Patch edge ``n``.
        steps: Timed steps.
        warmup: Untimed steps before.
        threads: torch CPU threads.
        device: ``cpu``, ``cuda`` or ``auto``.

    Returns:
        ``{"network", "steps_per_s", "s_per_step", "peak_rss_mib", "params", ...}``.
    """
    import torch

    torch.set_num_threads(threads)
    size = max(patch_size + 8, 64)
    pairs = [synthetic_pair(i, size) for i in range(2)]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = parse_config(
            {
                "network": {"name": network},
                "data": {"synthetic": {"count": 2, "size": size}},
                "patch_size": patch_size,
                "iterations": steps + warmup,
                "tensorboard": False,
                "device": device,
                "output_dir": tmp,
            }
        )
        trainer = Trainer(cfg, train_pairs=pairs, progress=False)
        for _ in range(warmup):
            trainer.train_step()
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        gpu_mib = (
            torch.cuda.max_memory_allocated() / 2**20 if trainer.device.type == "cuda" else 0.0
        )
        params = sum(p.numel() for p in trainer.net.parameters())
        batch = trainer.sampler.batch_size
    return {
        "network": network,
        "patch_size": patch_size,
        "batch": batch,
        "steps_per_s": steps / dt,
        "s_per_step": dt / steps,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "peak_gpu_mib": gpu_mib,
        "params": params,
        "device": str(trainer.device),
        "threads": threads,
    }


def compare_precision(
    network: str,
    patch_size: int,
    steps: int,
    warmup: int,
    threads: int,
    store: Path | None,
    identity_share: float = 0.1,
    synthmorph_share: float = 0.15,
) -> dict[str, object]:
    """fp32 vs bf16 training steps of one network, interleaved step by step in this process.

    Args:
        network: Network name.
        patch_size: Patch edge ``n``.
        steps: Timed steps per precision.
        warmup: Untimed steps per precision before.
        threads: torch CPU threads.
        store: A training store (memory-mapped pairs, as the campaign uses); synthetic pairs when
            ``None``.
        identity_share: Identity-slot share of the sampler (as in the campaign).
        synthmorph_share: SynthMorph-slot share of the sampler.

    Returns:
        Per precision: s/step (median of the timed steps), steps/s, data share (time drawing
        batches / step time), plus the bf16 speed-up and the process's peak RSS.
    """
    import statistics

    import torch

    torch.set_num_threads(threads)
    if store is not None:
        from jrs.training.store import load_store

        pairs = load_store(store, sources=["phantom", "real"])
    else:
        size = max(patch_size + 8, 64)
        pairs = [synthetic_pair(i, size) for i in range(2)]
    trainers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for prec in ("fp32", "bf16"):
            cfg = parse_config(
                {
                    "network": {"name": network},
                    "data": {
                        "synthetic": {"count": 2},
                        "identity_share": identity_share,
                        "synthmorph_share": synthmorph_share,
                    },
                    "patch_size": patch_size,
                    "iterations": steps + warmup,
                    "precision": prec,
                    "tensorboard": False,
                    "device": "cpu",
                    "output_dir": str(Path(tmp) / prec),
                }
            )
            trainers[prec] = Trainer(cfg, train_pairs=pairs, progress=False)
        times: dict[str, list[float]] = {p: [] for p in trainers}
        data: dict[str, list[float]] = {p: [] for p in trainers}
        for i in range(warmup + steps):
            for prec, tr in trainers.items():
                d0 = tr.data_s
                t0 = time.perf_counter()
                tr.train_step()
                if i >= warmup:
                    times[prec].append(time.perf_counter() - t0)
                    data[prec].append(tr.data_s - d0)
    res: dict[str, object] = {
        "network": network,
        "patch_size": patch_size,
        "batch": trainers["fp32"].sampler.batch_size,
        "threads": threads,
        "store": str(store) if store else "synthetic",
        "pairs": len(pairs),
        "cpu_bf16": cpu_supports_bf16(),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }
    for prec in trainers:
        med = statistics.median(times[prec])
        res[prec] = {
            "s_per_step": med,
            "steps_per_s": 1.0 / med,
            "data_share": sum(data[prec]) / sum(times[prec]),
        }
    res["bf16_speedup"] = res["fp32"]["s_per_step"] / res["bf16"]["s_per_step"]  # type: ignore[index]
    return res


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: benchmark each network in a subprocess and print a Markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--networks", nargs="*", default=list(NETWORKS))
    ap.add_argument("--patch-size", type=int, default=96)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    ap.add_argument(
        "--compare-precision",
        action="store_true",
        help="fp32 vs bf16 autocast, interleaved, with the data share of a step",
    )
    ap.add_argument(
        "--store", type=Path, default=None, help="Training store for --compare-precision."
    )
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.compare_precision:
        cmp = compare_precision(
            args.networks[0], args.patch_size, args.steps, args.warmup, args.threads, args.store
        )
        fp, bf = cmp["fp32"], cmp["bf16"]
        assert isinstance(fp, dict) and isinstance(bf, dict)
        lines = [
            f"Machine: {platform.machine()} {platform.processor() or ''}, {args.threads} torch "
            f"threads, CPU bf16: {cmp['cpu_bf16']}; {cmp['network']}, patch {args.patch_size}^3, "
            f"batch {cmp['batch']}, data: {cmp['store']} ({cmp['pairs']} pairs); {args.steps} "
            f"interleaved timed steps per precision after {args.warmup} warm-up",
            "",
            "| precision | s/step (median) | steps/s | data share |",
            "|---|---|---|---|",
            f"| fp32 | {fp['s_per_step']:.3f} | {fp['steps_per_s']:.3f} | {fp['data_share']:.1%} |",
            f"| bf16 | {bf['s_per_step']:.3f} | {bf['steps_per_s']:.3f} | {bf['data_share']:.1%} |",
            "",
            f"bf16 speed-up: {cmp['bf16_speedup']:.2f}x; peak RSS {cmp['peak_rss_mib']:.0f} MiB "
            "(both trainers in one process)",
        ]
        sys.stdout.write("\n".join(lines) + "\n")
        if args.json is not None:
            args.json.write_text(json.dumps(cmp, indent=2))
        return 0
    if args.one:
        res = bench_one(
            args.networks[0], args.patch_size, args.steps, args.warmup, args.threads, args.device
        )
        sys.stdout.write(json.dumps(res) + "\n")
        return 0
    results = []
    for net in args.networks:
        cmd = [
            sys.executable, "-m", "jrs.training.benchmark", "--one", "--networks", net,
            "--patch-size", str(args.patch_size), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--threads", str(args.threads), "--device", args.device,
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            return proc.returncode
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        sys.stderr.write(f"{net}: {results[-1]['s_per_step']:.2f} s/step\n")
    lines = [
        f"Machine: {platform.machine()} {platform.processor() or ''}, "
        f"{args.threads} torch threads, device {args.device}; patch {args.patch_size}^3, "
        f"{args.steps} timed steps after {args.warmup} warm-up",
        "",
        "| network | parameters | batch | s/step | steps/s | peak RSS (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['network']} | {r['params']:,} | {r['batch']} | {r['s_per_step']:.2f} | "
            f"{r['steps_per_s']:.3f} | {r['peak_rss_mib']:.0f} |"
        )
    sys.stdout.write("\n".join(lines) + "\n")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
