"""Tests of whole-scan evaluation: post-processing, Jacobian statistics, tables, trained vs not."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from jrs.core.errors import InvalidInput
from jrs.core.labels import BLADDER, PROSTATE, SEMINAL_VESICLES
from jrs.inference.tiling import plan_tiles
from jrs.training.evaluate import (
    evaluate,
    jacobian_stats,
    organ_metrics,
    postprocess,
    predict_pair,
    predict_volume,
    report_markdown,
)
from jrs.training.networks import build
from jrs.training.synthetic import synthetic_pair
from tests.model_export.test_export import tiny_net


def test_postprocess_keeps_largest_components() -> None:
    lab = np.zeros((20, 20, 20), np.uint8)
    lab[2:8, 2:8, 2:8] = PROSTATE  # big
    lab[15:17, 15:17, 15:17] = PROSTATE  # small island: dropped
    lab[2:6, 12:16, 2:6] = SEMINAL_VESICLES
    lab[12:15, 2:5, 12:15] = SEMINAL_VESICLES  # second SV component: kept
    lab[18, 18, 18] = SEMINAL_VESICLES  # third: dropped
    out = postprocess(lab)
    assert (out == PROSTATE).sum() == 216
    assert (out == SEMINAL_VESICLES).sum() == 64 + 27
    assert out[18, 18, 18] == 0 and out[16, 16, 16] == 0
    assert not (out == BLADDER).any()


def test_jacobian_stats() -> None:
    zero = np.zeros((3, 10, 12, 14), np.float32)
    s = jacobian_stats(zero)
    assert (
        s["jac_std"] == pytest.approx(0)
        and s["folding"] == 0
        and s["log_jac_std"] == pytest.approx(0)
    )
    # u_x = 0.5 x: det = 1.5 everywhere
    x = np.arange(14, dtype=np.float32)
    lin = zero.copy()
    lin[0] = 0.5 * x[None, None, :]
    interior = np.zeros((10, 12, 14), np.uint8)
    interior[1:-1, 1:-1, 1:-1] = 1  # SimpleITK's derivative differs on the border voxels
    assert jacobian_stats(lin, interior)["jac_std"] == pytest.approx(0, abs=1e-5)
    # u_x = -2 x: det = -1: all folded
    fold = zero.copy()
    fold[0] = -2.0 * x[None, None, :]
    assert jacobian_stats(fold, interior)["folding"] == pytest.approx(1.0)


def test_jacobian_stats_matches_core_and_validates() -> None:
    from jrs.core.geometry import Geometry, Volume
    from jrs.qa.figures import jacobian_stats as core

    rng = np.random.default_rng(0)
    dvf = rng.normal(scale=0.3, size=(3, 8, 9, 10)).astype(np.float32)
    mask = np.ones((8, 9, 10), np.uint8)
    geo = Geometry(shape=(8, 9, 10), origin=np.zeros(3), spacing=np.ones(3))
    ref = core(Volume(np.moveaxis(dvf, 0, -1), geo), mask)
    got = jacobian_stats(dvf, mask)
    assert got == {
        "jac_std": ref["std"],
        "folding": ref["folding_fraction"],
        "log_jac_std": ref["log_std"],
    }
    assert all(np.isnan(v) for v in jacobian_stats(dvf, np.zeros_like(mask)).values())
    with pytest.raises(InvalidInput, match="3, D, H, W"):
        jacobian_stats(dvf[:2])


def test_tiled_equals_single_window_torch() -> None:
    """predict_volume's tiles (jrs.inference.tiling's default layout) reproduce one whole-volume window."""
    torch.set_num_threads(2)
    net = tiny_net()  # cross-stitch 4/8/8 with calibrated BatchNorm: O(1) outputs
    shape = (27, 26, 21)  # no axis a multiple of 4; window 56: 16-voxel outputs, 2 per axis
    rng = np.random.default_rng(1)
    fixed = rng.uniform(-1, 1, shape).astype(np.float32)
    moving = rng.uniform(-1, 1, shape).astype(np.float32)
    labels = rng.integers(0, 5, shape).astype(np.uint8)
    # reference: one window over the whole volume, padded by 20 (+ end padding to a valid size)
    win = [max(44, -(-(s + 40) // 4) * 4) for s in shape]
    x = np.empty((3, 1, 1, *win), np.float32)
    x[0], x[1], x[2] = -1.0, -1.0, 0.0
    for c, v in enumerate((fixed, moving, labels)):
        x[c, 0, 0, 20 : 20 + shape[0], 20 : 20 + shape[1], 20 : 20 + shape[2]] = v
    with torch.no_grad():
        out = net(*(torch.from_numpy(a) for a in x))
    crop = (0, slice(None), slice(0, shape[0]), slice(0, shape[1]), slice(0, shape[2]))
    ref = {"seg": out.seg["high"][crop].numpy(), "dvf": out.dvf["high"][crop].numpy()}
    assert np.abs(ref["seg"]).max() > 0.05  # O(1) outputs: the comparison means something

    tiled = predict_volume(net, fixed, moving, labels, window=56, batch_size=4)
    assert len(plan_tiles(shape, 56)) == 8
    for key in ("seg", "dvf"):
        assert tiled[key].shape == ref[key].shape and tiled[key].dtype == np.float32
        assert np.abs(tiled[key] - ref[key]).max() <= 1e-5, key
    plain = predict_volume(net, fixed, moving, labels, 56, 4, seam_overlap=0, alignment=1)
    assert np.abs(plain["dvf"] - ref["dvf"]).max() > 1e-3  # METHOD.md's layout shows seams


def test_organ_metrics_identity_and_missing() -> None:
    p = synthetic_pair(3, 40)
    m = organ_metrics(p.fixed_labels, p.fixed_labels)
    assert all(v["dsc"] == 1.0 and v["msd"] == 0.0 for v in m.values())
    empty = organ_metrics(np.zeros_like(p.fixed_labels), p.fixed_labels)
    assert all(v["dsc"] == 0.0 and np.isnan(v["msd"]) for v in empty.values())


def test_predict_pair_shapes_and_report(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = build("cross-stitch", channels=(4, 8, 8))
    pairs = [synthetic_pair(10 + i, 40) for i in range(3)]
    pred = predict_pair(net, pairs[0], window=96)
    assert pred.seg is not None and pred.seg.shape == pairs[0].fixed.shape
    assert pred.dvf is not None and pred.dvf.shape == (3, *pairs[0].fixed.shape)
    assert pred.warped is not None and pred.warped.dtype == np.uint8
    assert net.training  # mode restored
    seg_only = build("seg", channels=(4, 8, 8))
    report = evaluate({"a": net, "b": seg_only}, pairs, out_dir=tmp_path, window=96)
    # a network with both paths is also scored on their fusion
    assert {r["path"] for r in report.rows if r["model"] == "a"} == {"seg", "reg", "fused"}
    assert {r["path"] for r in report.rows if r["model"] == "b"} == {"seg"}
    assert len(report.rows) == (3 + 1) * 4 * 3
    assert "| a | fused |" in report.markdown
    md = (tmp_path / "report.md").read_text()
    for title in ("## DSC", "## MSD (mm)", "## HD95 (mm)", "Jacobian", "Wilcoxon"):
        assert title in md
    assert (tmp_path / "metrics.csv").read_text().count("\n") == len(report.rows) + 1
    assert report_markdown(report.rows) == report_markdown(report.rows)


def test_figures_survive_a_failing_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """metrics.csv is written before the report is composed: a report bug loses no scores."""
    import jrs.training.evaluate as ev

    def broken(*_: Any, **__: Any) -> str:
        raise RuntimeError("report bug")

    monkeypatch.setattr(ev, "report_markdown", broken)
    torch.manual_seed(0)
    net = build("seg", channels=(4, 8, 8))
    with pytest.raises(RuntimeError, match="report bug"):
        evaluate({"a": net}, [synthetic_pair(12, 40)], out_dir=tmp_path, window=96)
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("model,path,pair,organ")
    assert len(lines) == 1 + 4  # one row per organ of the one pair and path
    assert not (tmp_path / "report.md").exists()


def test_report_of_pairs_without_an_organ() -> None:
    """Real planning scans without seminal vesicles (Pelvic-Ref): "n/a" cells, no crash."""
    rows = [
        {
            "model": "m",
            "path": path,
            "pair": pair,
            "organ": organ,
            "dsc": d,
            "msd": 1.0,
            "hd95": 2.0,
        }
        for path, d in (("seg", 0.9), ("reg", 0.8))
        for pair in ("f1", "f2")
        for organ in (BLADDER, PROSTATE)
    ]
    md = report_markdown(rows)
    seg_row = next(line for line in md.splitlines() if line.startswith("| m | seg | 0.90"))
    assert seg_row.count("n/a") == 2  # seminal vesicles and rectum: no pair delineates them
    assert "Wilcoxon" in md


def test_fused_path_of_the_evaluation() -> None:
    from jrs.inference.fusion import FusionSpec

    torch.manual_seed(0)
    net = build("cross-stitch", channels=(4, 8, 8))
    pair = synthetic_pair(21, 40)
    plain = predict_pair(net, pair, window=96)
    assert plain.seg_logits is None and plain.reg_probs is None  # nothing kept by default
    pred = predict_pair(net, pair, window=96, keep_soft=True)
    assert pred.seg_logits is not None and pred.seg_logits.shape == (5, *pair.fixed.shape)
    assert pred.reg_probs is not None and pred.reg_probs.shape == (5, *pair.fixed.shape)
    np.testing.assert_allclose(pred.reg_probs.sum(axis=0), 1.0, atol=1e-4)
    np.testing.assert_array_equal(pred.reg_probs.argmax(axis=0), pred.warped)
    np.testing.assert_array_equal(pred.seg, plain.seg)
    np.testing.assert_array_equal(pred.warped, plain.warped)
    # weights (0, 1): the fused organs are the registration path's (P_reg >= 0.5 = its arg-max
    # away from ties), post-processed
    reg_only = FusionSpec(
        weights=dict.fromkeys(("bladder", "rectum", "seminal_vesicles", "prostate"), (0.0, 1.0))
    )
    no_fusion = evaluate({"a": net}, [pair], window=96, fusion=None)
    assert {r["path"] for r in no_fusion.rows} == {"seg", "reg"}
    fused = evaluate({"a": net}, [pair], window=96, fusion=reg_only)
    by = {(r["path"], r["organ"]): r["dsc"] for r in fused.rows}
    for organ in (1, 2, 3, 4):
        assert by[("fused", organ)] == pytest.approx(by[("reg", organ)], abs=0.02)
    staple = evaluate({"a": net}, [pair], window=96, fusion="staple")
    assert {r["path"] for r in staple.rows} == {"seg", "reg", "fused"}
    evidence = evaluate({"a": net}, [pair], window=96, fusion="evidence")
    assert {r["path"] for r in evidence.rows} == {"seg", "reg", "fused"}
    with pytest.raises(InvalidInput, match="fusion method"):
        evaluate({"a": net}, [pair], window=96, fusion="vote")


class _HalfWayNet(torch.nn.Module):
    """A network that registers half of a translation: half the shift between the two images'
    centroids (intensity above air) as a constant pull field, and no segmentation."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # (the device of the network)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor, labels: torch.Tensor) -> Any:
        def centroid(img: torch.Tensor) -> torch.Tensor:
            w = (img[0, 0] + 1.0).clamp(min=0)
            grids = torch.meshgrid(
                *(torch.arange(n, dtype=w.dtype) for n in w.shape), indexing="ij"
            )
            zyx = torch.stack([(g * w).sum() / w.sum() for g in grids])
            return zyx.flip(0)  # x, y, z

        shift = 0.5 * (centroid(moving) - centroid(fixed))
        dvf = shift.view(1, 3, 1, 1, 1).expand(fixed.shape[0], 3, *fixed.shape[2:])
        return SimpleNamespace(seg={}, dvf={"high": dvf.contiguous()})


def test_predict_pair_runs_the_pipelines_network_passes() -> None:
    """``passes`` scores a network as the pipeline runs it (`jrs.inference.cascade`): 1, 2 and 3 passes
    of a half-way network give 1/2, 3/4 and 7/8 of a translation."""
    import dataclasses

    shape = (40, 44, 48)
    z, y, x = np.indices(shape, dtype=np.float64)
    t = np.array([4.0, -4.0, 2.0])  # x, y, z mm

    def blob(cx: float, cy: float, cz: float) -> np.ndarray:
        r2 = ((x - cx) / 7.0) ** 2 + ((y - cy) / 6.0) ** 2 + ((z - cz) / 5.0) ** 2
        return (2.0 * np.exp(-r2) - 1.0).astype(np.float32)

    moving = blob(24.0, 22.0, 20.0)
    pair = dataclasses.replace(
        synthetic_pair(22, 40),
        fixed=blob(24.0 - t[0], 22.0 - t[1], 20.0 - t[2]),
        moving=moving,
        moving_labels=(moving > 0).astype(np.uint8),
        fixed_labels=(moving > 0).astype(np.uint8),
        body=np.ones(shape, np.uint8),
    )
    net = _HalfWayNet()
    for passes, fraction in ((1, 0.5), (2, 0.75), (3, 0.875)):
        pred = predict_pair(net, pair, window=96, null_correction=True, passes=passes)
        assert pred.dvf is not None and pred.warped is not None
        inner = pred.dvf[:, 8:-8, 8:-8, 8:-8].reshape(3, -1)
        np.testing.assert_allclose(inner.mean(axis=1), fraction * t, atol=0.1)
    # the same scan twice: the null-corrected first field is exactly zero, no pass runs
    same = dataclasses.replace(pair, fixed=pair.moving)
    zero = predict_pair(net, same, window=96, null_correction=True, passes=3)
    assert zero.dvf is not None and not np.any(zero.dvf)
    np.testing.assert_array_equal(zero.warped, pair.moving_labels)


@pytest.mark.slow
def test_trained_beats_untrained(tmp_path: Path) -> None:
    """A tiny-trained network evaluates better than the same network untrained (honest numbers)."""
    from jrs.training.config import parse_config
    from jrs.training.trainer import Trainer

    torch.set_num_threads(2)
    cfg = parse_config(
        {
            "network": {"name": "cross-stitch", "overrides": {"channels": [8, 16, 32]}},
            "data": {"synthetic": {"count": 2, "size": 48}},
            "patch_size": 48,
            "iterations": 200,  # measured: ~4 min on 2 idle cores, much longer when shared
            "lr": 2e-3,
            "device": "cpu",
            "tensorboard": False,
            "output_dir": str(tmp_path / "run"),
        }
    )
    torch.manual_seed(0)
    untrained = build("cross-stitch", channels=(8, 16, 32))
    trainer = Trainer(cfg, [synthetic_pair(0, 48), synthetic_pair(1, 48)], [], progress=False)
    trainer.run()
    held_out = [synthetic_pair(200 + i, 48) for i in range(3)]
    report = evaluate({"untrained": untrained, "trained": trainer.net}, held_out, tmp_path / "ev")
    print(report.markdown)  # noqa: T201
    s = report.summary()
    for path in ("seg", "reg"):
        trained = np.mean([s[("trained", path, o)]["dsc"] for o in (1, 2, 3, 4)])
        base = np.mean([s[("untrained", path, o)]["dsc"] for o in (1, 2, 3, 4)])
        assert trained > base, (path, trained, base)


def test_cli_evaluates_a_store_source_with_evidence_fusion(tmp_path: Path) -> None:
    """`jrs evaluate --store S --source validation --fusion evidence`: the release's validation."""
    import dataclasses

    from typer.testing import CliRunner

    from jrs.cli import app
    from jrs.training.store import save_pair, write_index
    from jrs.training.trainer import Trainer
    from tests.training.test_trainer import tiny_config

    store = tmp_path / "store"
    records = []
    for key, seed, source in (
        ("t1", 1, "phantom"),
        ("v1", 2, "validation"),
        ("v2", 3, "validation"),
    ):
        pair = dataclasses.replace(synthetic_pair(seed, 48), key=key)
        records.append(save_pair(pair, store, {"source": source, "group": key}))
    write_index(store, records)
    trainer = Trainer(
        tiny_config(tmp_path / "run", iterations=1),
        [synthetic_pair(0, 48)],
        [synthetic_pair(50, 48)],
        progress=False,
    )
    trainer.run()
    args = ["evaluate", "--checkpoint", str(tmp_path / "run" / "checkpoints" / "last.pt")]
    args += ["--store", str(store), "--source", "validation", "--window", "104"]
    res = CliRunner().invoke(app, [*args, "--fusion", "evidence", "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    rows = (tmp_path / "ev" / "metrics.csv").read_text().splitlines()
    assert {r.split(",")[2] for r in rows[1:]} == {"v1", "v2"}  # the validation pairs only
    assert {r.split(",")[1] for r in rows[1:]} == {"seg", "reg", "fused"}
    metrics = json.loads((tmp_path / "ev" / "export_metrics.json").read_text())
    assert metrics["pairs"] == ["v1", "v2"] and metrics["fusion"] == {"method": "evidence"}
    assert set(metrics["path_dsc"]) == {"segmentation", "registration", "fusion"}
    # what jrs export --metrics makes of it: a validated path per organ, the fusion method
    from jrs.model_export.settings import fusion_settings, path_choice

    choice = path_choice(metrics)
    assert set(choice) == {"bladder", "rectum", "seminal_vesicles", "prostate"}
    for organ, path in choice.items():
        best = max(metrics["path_dsc"][p][organ] for p in ("segmentation", "registration"))
        assert metrics["path_dsc"][{"fusion": "fusion"}.get(path, path)][organ] >= best - 1e-9
    assert fusion_settings(metrics)["method"] == "evidence"
    res = CliRunner().invoke(app, [*args, "--fusion", "vote", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "use weighted, staple, evidence" in res.output
