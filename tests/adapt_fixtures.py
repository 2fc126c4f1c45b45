"""Helpers of the adaptation tests: a tiny exported base model and small phantom planning scans."""

from __future__ import annotations

from pathlib import Path

#: A cross-stitch network small enough to fine-tune in seconds (channels per level).
TINY = {"channels": [4, 8, 16]}
#: Registration path for every organ: an untrained segmentation path is noise.
PATH_CHOICE = {
    "prostate": "registration",
    "seminal_vesicles": "registration",
    "rectum": "registration",
    "bladder": "registration",
}


def tiny_base(root: Path, version: int = 1) -> Path:
    """Export a tiny, BatchNorm-calibrated cross-stitch (``weights.pt`` included) under ``root``.

    Returns:
        The model version folder ``root/crossstitch/<version>``.
    """
    import torch

    from jrs.model_export.export import export
    from jrs.training.networks import build

    torch.manual_seed(0)
    net = build("cross-stitch", **TINY)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.momentum = None
            m.reset_running_stats()
    net.train()
    with torch.no_grad():
        net(*[torch.rand(2, 1, 48, 48, 48) * 2 - 1 for _ in range(3)])
    result = export(
        net.eval(),
        root,
        name="crossstitch",
        version=version,
        network={"name": "cross-stitch", "overrides": dict(TINY)},
        checkpoint={
            "patch_size": 48,
            "step": 7,
            "git_sha": "test",
            "tasks": ["seg", "reg", "reg_dsc"],
            "config": {"weighting": {"name": "equal"}, "pairs_per_batch": 1, "patch_size": 48},
        },
        metrics={"path_choice": PATH_CHOICE},
        exporter="legacy",
        parity_sizes=((48, 48, 48),),
    )
    return result.path


def phantom_planning(root: Path, seed: int = 7, fractions: int = 0) -> Path:
    """A small phantom (128 x 128 matrix) in the ``jrs phantom`` layout; the patient folder."""
    from jrs.synth import generate_fraction, generate_patient, write_fraction, write_patient

    patient = generate_patient(seed, matrix=128)
    folder = root / f"phantom{seed}"
    write_patient(patient, folder)
    for k in range(1, fractions + 1):
        write_fraction(generate_fraction(patient, k), folder / f"fraction_{k}")
    return folder
