"""ONNX export: parity with PyTorch at two sizes, metadata, model card, checkpoints, CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from jrs.core.errors import InvalidInput  # noqa: E402
from jrs.model_export.export import export_checkpoint  # noqa: E402
from jrs.model_export.onnx_graph import (  # noqa: E402
    OPSET,
    PARITY_SIZES,
    ExportError,
    parity_check,
)
from jrs.model_export.settings import inference_settings  # noqa: E402
from jrs.training.networks import build  # noqa: E402

TINY = {"channels": [4, 8, 8]}
METRICS = {
    "dsc_prostate_seg": 0.81,
    "msd_prostate_seg_mm": 1.9,
    "path_choice": {"prostate": "segmentation", "rectum": "registration"},
}


def calibrated(net: torch.nn.Module, n: int = 48, seed: int = 0) -> torch.nn.Module:
    """Give BatchNorm real running statistics so that eval outputs are O(1), not ~1e-6.

    Freshly initialised convolutions (std 0.02) shrink activations by ~10x per layer; with the
    default running statistics the outputs would be so small that any parity check passes.
    """
    torch.manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.momentum = None
            m.reset_running_stats()
    net.train()
    with torch.no_grad():
        net(*[torch.rand(2, 1, n, n, n) * 2 - 1 for _ in range(3)])
    return net.eval()


def tiny_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return calibrated(build("cross-stitch", **TINY))


def write_checkpoint(path: Path, net: torch.nn.Module, overrides: dict) -> Path:
    torch.save(
        {
            "format": "jrs-train-checkpoint",
            "version": 1,
            "step": 1234,
            "epoch": 5,
            "network": {"name": "cross-stitch", "overrides": overrides},
            "patch_size": 96,
            "model": net.state_dict(),
            "optimizer": {},
            "config": {"seed": 7, "lr": 1e-4, "patch_size": 96, "weighting": {"name": "homo"}},
            "git_sha": "abc123",
            "best": {"dice": 0.5, "step": 1000},
            "torch_version": torch.__version__,
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A tiny cross-stitch exported from a checkpoint file with the legacy (fast) exporter."""
    root = tmp_path_factory.mktemp("export")
    net = tiny_net()
    ckpt = write_checkpoint(root / "last.pt", net, TINY)
    metrics = root / "metrics.json"
    metrics.write_text(json.dumps(METRICS))
    path = export_checkpoint(ckpt, root / "models", version=3, metrics=metrics, exporter="legacy")
    return path, net


def _random(shape: tuple[int, ...], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.uniform(-1, 1, shape).astype(np.float32),
        rng.uniform(-1, 1, shape).astype(np.float32),
        rng.integers(0, 5, shape).astype(np.float32),
    ]


def _check_parity(onnx_path: Path, net: torch.nn.Module) -> float:
    """Independent parity check: ORT vs PyTorch at two valid sizes (one cube, one not)."""
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for k, size in enumerate([(48, 48, 48), (64, 56, 52)]):
        xs = _random((k + 1, 1, *size), seed=10 + k)
        with torch.no_grad():
            ref = net(*[torch.from_numpy(x) for x in xs]).flat()
        got = sess.run(
            ["seg_high", "dvf_high"],
            dict(zip(["fixed", "moving", "moving_labels"], xs, strict=True)),
        )
        for name, g in zip(["seg_high", "dvf_high"], got, strict=True):
            r = ref[name].numpy()
            assert (
                g.shape
                == r.shape
                == (k + 1, 5 if name == "seg_high" else 3, *(s - 40 for s in size))
            )
            assert np.abs(r).max() > 0.05  # outputs are O(1): the check is not vacuous
            worst = max(worst, float(np.abs(g - r).max()))
    return worst


def test_layout_and_parity_at_two_sizes(exported: tuple[Path, torch.nn.Module]) -> None:
    path, net = exported
    assert path == path.parent.parent / "crossstitch" / "3"
    assert {p.name for p in path.iterdir()} == {
        "model.onnx",
        "metadata.json",
        "MODEL_CARD.md",
        "weights.pt",
    }
    assert _check_parity(path / "model.onnx", net) <= 1e-4
    meta = json.loads((path / "metadata.json").read_text())
    parity = meta["parity"]
    assert [tuple(s) for s in parity["sizes"]] == list(PARITY_SIZES)
    assert parity["worst"] <= parity["tolerance"] == 1e-4
    assert set(parity["max_abs_diff"]) == {"48x48x48", "64x56x52"}


def test_graph_is_network_only_opset20_dynamic(exported: tuple[Path, torch.nn.Module]) -> None:
    path, _ = exported
    model = onnx.load(str(path / "model.onnx"))
    assert {o.domain: o.version for o in model.opset_import}[""] == OPSET == 20
    assert [i.name for i in model.graph.input] == ["fixed", "moving", "moving_labels"]
    assert [o.name for o in model.graph.output] == ["seg_high", "dvf_high"]
    ops = {n.op_type for n in model.graph.node}
    assert "GridSample" not in ops
    for v in [*model.graph.input, *model.graph.output]:
        dims = v.type.tensor_type.shape.dim
        assert [d.HasField("dim_value") for d in dims] == [False, True, False, False, False]


def test_metadata_content(exported: tuple[Path, torch.nn.Module]) -> None:
    path, net = exported
    meta = json.loads((path / "metadata.json").read_text())
    assert meta["format"] == "jrs-onnx-model" and meta["format_version"] == 1
    assert meta["name"] == "crossstitch" and meta["version"] == 3
    assert meta["sha256"] == hashlib.sha256((path / "model.onnx").read_bytes()).hexdigest()
    assert meta["onnx"]["opset"] == 20 and meta["onnx"]["exporter"] == "legacy"
    assert [i["name"] for i in meta["inputs"]] == ["fixed", "moving", "moving_labels"]
    assert [i["pad_value"] for i in meta["inputs"]] == [-1.0, -1.0, 0.0]
    assert all(i["shape"] == ["batch", 1, "D", "H", "W"] for i in meta["inputs"])
    seg, dvf = meta["outputs"]
    assert seg["name"] == "seg_high" and seg["channels"] == [
        "background",
        "bladder",
        "rectum",
        "seminal_vesicles",
        "prostate",
    ]
    assert dvf["name"] == "dvf_high" and dvf["channels"][0].startswith("x (W")
    assert seg["offset_voxels"] == 20 and seg["spatial_size"] == "n - 40"
    valid = meta["valid_sizes"]
    assert (valid["multiple_of"], valid["minimum"], valid["high_output_offset"]) == (4, 44, 20)
    assert valid["patch_size"] == 96
    assert meta["spacing_mm"] == [1.0, 1.0, 1.0]
    assert meta["intensity_transform"]["clip_hu"] == [-1000.0, 1000.0]
    assert meta["intensity_transform"]["scale"] == 1000.0
    assert meta["labels"] == {
        "0": "background",
        "1": "bladder",
        "2": "rectum",
        "3": "seminal_vesicles",
        "4": "prostate",
    }
    assert meta["network"]["name"] == "cross-stitch"
    assert meta["network"]["overrides"] == TINY
    assert meta["network"]["parameters"] == sum(p.numel() for p in net.parameters())
    assert meta["training"]["git_sha"] == "abc123" and meta["training"]["step"] == 1234
    assert meta["training"]["config"]["seed"] == 7
    assert meta["metrics"] == METRICS
    assert meta["path_choice"] == METRICS["path_choice"]  # lifted for the pipeline
    assert meta["git_sha"] == "abc123"
    assert meta["memory"]["activation_bytes_per_input_voxel"] > 0
    assert meta["exported_at"] and "export_git_sha" in meta


def test_model_card(exported: tuple[Path, torch.nn.Module]) -> None:
    path, _ = exported
    card = (path / "MODEL_CARD.md").read_text()
    assert "demo model trained on synthetic pelvic phantoms" in card
    assert "TODO(trainer)" in card
    assert json.loads((path / "metadata.json").read_text())["sha256"] in card
    assert "dsc_prostate_seg" in card and "abc123" in card
    # exported models ask for the light field smoothing, and the card says so
    from jrs.model_export.card import model_card
    from jrs.model_export.settings import DEFAULT_DVF_SMOOTHING_MM

    meta = json.loads((path / "metadata.json").read_text())
    assert meta["dvf_smoothing_mm"] == DEFAULT_DVF_SMOOTHING_MM > 0
    assert f"sigma {DEFAULT_DVF_SMOOTHING_MM:g} mm" in card
    assert "Field smoothing: none" in model_card({"dvf_smoothing_mm": 0})
    # ... and the second network pass (`jrs.inference.cascade`)
    from jrs.model_export.settings import DEFAULT_NETWORK_PASSES

    assert meta["network_passes"] == DEFAULT_NETWORK_PASSES == 2
    assert "Network passes: 2." in card
    assert "Network passes: 1 (" in model_card({})
    # ... and the pre-alignment the pipeline runs it behind (a deviation from the paper)
    from jrs.registration.focus import FOCUS_MARGIN_MM

    assert f"seminal vesicles dilated by {FOCUS_MARGIN_MM:g} mm" in card
    assert "`--prealign affine` restores it" in card


def test_parity_failure_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="parity"):
        export_checkpoint(tiny_net(), tmp_path, exporter="legacy", tolerance=-1.0)
    assert not (tmp_path / "crossstitch" / "1").exists()
    assert [p.name for p in (tmp_path / "crossstitch").iterdir()] == []


def test_existing_version_refused_unless_overwrite(
    exported: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    path, net = exported
    with pytest.raises(InvalidInput, match="already exists"):
        export_checkpoint(net, path.parent.parent, version=3, exporter="legacy")


def test_bad_path_choice_refused_before_export(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="path_choice"):
        export_checkpoint(tiny_net(), tmp_path, metrics={"path_choice": {"prostate": "both"}})


def test_validated_paths_from_validation_dsc() -> None:
    """A path within 0.05 DSC of the better one is vouched for; a broken path is not."""
    from jrs.model_export.settings import VALIDATED_PATH_MARGIN, validated_path_table
    from jrs.qa.figures import validated_paths

    metrics = {
        "path_dsc": {
            "segmentation": {"prostate": 0.894, "bladder": 0.05, "rectum": 0.86},
            "registration": {"prostate": 0.914, "bladder": 0.909, "rectum": 0.911},
        }
    }
    table = validated_path_table(metrics)
    assert VALIDATED_PATH_MARGIN == 0.05
    assert table == {
        "prostate": ["registration", "segmentation"],  # 0.020 apart: both
        "bladder": ["registration"],  # the segmentation path is broken here
        "rectum": ["registration"],  # 0.051 apart: only the better one
    }
    assert "seminal_vesicles" not in table and validated_path_table(None) == {}
    # what the QA reads from the metadata: path disagreement only where both are vouched for
    meta = {"validated_paths": table, "path_choice": {"prostate": "registration"}}
    assert validated_paths(meta, "prostate") == {"registration", "segmentation"}
    assert validated_paths(meta, "bladder") == {"registration"}


def test_path_choice_and_fusion_weights_from_validation_dsc() -> None:
    from jrs.inference.fusion import FusionSpec
    from jrs.model_export.card import model_card
    from jrs.model_export.settings import fusion_settings, path_choice, path_dsc

    metrics = {
        "path_dsc": {
            "segmentation": {
                "prostate": 0.6,
                "rectum": 0.9,
                "bladder": 0.0,
                "seminal_vesicles": 0.5,
            },
            "registration": {
                "prostate": 0.9,
                "rectum": 0.9,
                "bladder": 0.8,
                "seminal_vesicles": 0.7,
            },
            "fusion": {"prostate": 0.92, "rectum": 0.85},
        },
        "path_choice": {"seminal_vesicles": "segmentation"},  # given: kept as it is
    }
    # fusion where its figure beats both paths, else the better path (ties: segmentation)
    assert path_choice(metrics) == {
        "seminal_vesicles": "segmentation",
        "prostate": "fusion",
        "rectum": "segmentation",
        "bladder": "registration",
    }
    # weights: each path's DSC over the sum of both (a path with DSC 0 gets weight 0)
    entry = fusion_settings(metrics)
    assert entry is not None and entry["method"] == "weighted"
    assert entry["weights"] == {
        "prostate": [0.4, 0.6],
        "rectum": [0.5, 0.5],
        "bladder": [0.0, 1.0],
        "seminal_vesicles": [0.4167, 0.5833],
    }
    assert "DSC_seg / (DSC_seg + DSC_reg)" in entry["rule"]
    spec = FusionSpec.from_json(entry)  # what the pipeline reads
    assert spec.weights_for("bladder") == (0.0, 1.0)
    # the trainer's flat validation names give the same figures; dice_mean is not a path
    flat = {"dice_seg_prostate": 0.6, "dice_reg_prostate": 0.9, "dice_mean": 0.6}
    assert path_dsc(flat) == {"segmentation": {"prostate": 0.6}, "registration": {"prostate": 0.9}}
    assert path_choice(flat) == {"prostate": "registration"}  # no fused figure: never fusion
    # a given method and weights win over the derived ones
    given = {**flat, "fusion": {"method": "staple", "weights": {"prostate": [1, 1]}}}
    entry = fusion_settings(given)
    assert entry is not None and entry["method"] == "staple"
    assert entry["weights"] == {"prostate": [0.5, 0.5]}
    # nothing to derive from: no fusion entry, path choice as given (the metadata unchanged)
    assert fusion_settings(METRICS) is None and fusion_settings(None) is None
    assert path_choice(METRICS) == METRICS["path_choice"]
    assert path_choice({"path_choice": {"rectum": "fusion"}}) == {"rectum": "fusion"}
    # refused with a message naming the problem
    with pytest.raises(InvalidInput, match="number in"):
        path_dsc({"path_dsc": {"seg": {"prostate": 1.5}}})
    with pytest.raises(InvalidInput, match="names path 'best'"):
        path_dsc({"path_dsc": {"best": {"prostate": 0.5}}})
    with pytest.raises(InvalidInput, match="organ 'liver'"):
        path_dsc({"path_dsc": {"seg": {"liver": 0.5}}})
    with pytest.raises(InvalidInput, match="method 'vote' unknown"):
        fusion_settings({"fusion": {"method": "vote"}})
    # the model card shows the choice and the weights
    card = model_card({"path_choice": path_choice(metrics), "fusion": fusion_settings(metrics)})
    assert "| prostate | fusion | 0.4, 0.6 |" in card
    assert "Fusion method: `weighted`" in card
    assert "0.5, 0.5" in model_card({"path_choice": {"rectum": "fusion"}})


def test_bad_fusion_refused_before_export(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="fusion"):
        export_checkpoint(tiny_net(), tmp_path, metrics={"fusion": {"weights": {"x": [1, 1]}}})


def test_bad_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="not found"):
        export_checkpoint(tmp_path / "missing.pt", tmp_path)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(InvalidInput, match="bad.pt"):
        export_checkpoint(bad, tmp_path)
    torch.save({"hello": 1}, tmp_path / "other.pt")
    with pytest.raises(InvalidInput, match="not a jrs training checkpoint"):
        export_checkpoint(tmp_path / "other.pt", tmp_path)


def test_parity_check_on_other_network(tmp_path: Path) -> None:
    """A single U-Net (segmentation only, one input) exports too: I/O follow the network."""
    net = calibrated(build("seg", channels=(4, 8, 8)))
    path = export_checkpoint(
        net, tmp_path, name="seg", exporter="legacy", network={"name": "seg", "overrides": {}}
    )
    meta = json.loads((path / "metadata.json").read_text())
    assert [i["name"] for i in meta["inputs"]] == ["fixed"]
    assert [o["name"] for o in meta["outputs"]] == ["seg_high"]
    report = parity_check(net, path / "model.onnx", sizes=[(44, 48, 52)])
    assert report.passed and report.worst <= 1e-4


def test_cli_export(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from jrs.cli import app

    ckpt = write_checkpoint(tmp_path / "last.pt", tiny_net(), TINY)
    metrics = tmp_path / "m.json"
    metrics.write_text(json.dumps(METRICS))
    args = ["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "models")]
    args += ["--name", "cs", "--version", "2", "--metrics", str(metrics), "--exporter", "legacy"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "parity" in result.output and "max |diff|" in result.output
    meta = json.loads((tmp_path / "models" / "cs" / "2" / "metadata.json").read_text())
    assert meta["metrics"] == METRICS and meta["name"] == "cs" and meta["version"] == 2
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "already exists" in again.output


@pytest.mark.slow
def test_dynamo_exporter(tmp_path: Path) -> None:
    """The default (modern, torch.export-based) exporter: dynamic opset-20 graph with parity.

    Slow: 30-70 s of symbolic-shape tracing on two cores, whatever the network size.
    """
    pytest.importorskip("onnxscript")
    net = tiny_net()
    path = export_checkpoint(net, tmp_path, exporter="dynamo")
    meta = json.loads((path / "metadata.json").read_text())
    assert meta["onnx"]["exporter"] == "dynamo"
    assert _check_parity(path / "model.onnx", net) <= 1e-4
    model = onnx.load(str(path / "model.onnx"))
    assert {o.domain: o.version for o in model.opset_import}[""] == 20
    # clean graph: no Identity / Constant clutter, no warping
    ops = {n.op_type for n in model.graph.node}
    assert "GridSample" not in ops and "Identity" not in ops


def test_real_cross_stitch_parity(tmp_path: Path) -> None:
    """The paper-sized cross-stitch (16/32/64 per branch) with the legacy exporter."""
    net = calibrated(build("cross-stitch"))
    path = export_checkpoint(net, tmp_path, exporter="legacy")
    assert _check_parity(path / "model.onnx", net) <= 1e-4


@pytest.mark.slow
def test_real_cross_stitch_parity_dynamo(tmp_path: Path) -> None:
    pytest.importorskip("onnxscript")
    net = calibrated(build("cross-stitch"))
    path = export_checkpoint(net, tmp_path, exporter="auto")
    assert json.loads((path / "metadata.json").read_text())["onnx"]["exporter"] == "dynamo"
    assert _check_parity(path / "model.onnx", net) <= 1e-4


def test_weights_file_rebuilds_the_exported_network(exported: tuple[Path, torch.nn.Module]) -> None:
    """``weights.pt`` (what ``jrs adapt`` fine-tunes) holds the exported network, fp32, no code."""
    from jrs.training.weights import load_weights

    path, net = exported
    meta = json.loads((path / "metadata.json").read_text())
    entry = meta["weights"]
    assert entry["file"] == "weights.pt" and entry["format"] == "jrs-weights"
    payload = load_weights(path / "weights.pt", entry["sha256"])
    assert payload["network"] == {"name": "cross-stitch", "overrides": TINY}
    assert (
        payload["step"] == 1234 and payload["patch_size"] == 96 and payload["git_sha"] == "abc123"
    )
    assert payload["weighting"]["name"] == "homo"
    rebuilt = build("cross-stitch", **TINY)
    rebuilt.load_state_dict(payload["model"])
    xs = [torch.from_numpy(x) for x in _random((1, 1, 48, 48, 48), seed=3)]
    with torch.no_grad():
        a, b = net(*xs).flat(), rebuilt.eval()(*xs).flat()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "weights.pt" in (path / "MODEL_CARD.md").read_text()


def test_card_lists_the_recipe_phases_and_outside_segments() -> None:
    from jrs.model_export.card import model_card

    meta = {
        "training": {
            "step": 9000,
            "provenance": [
                {
                    "kind": "phase",
                    "step": 5000,
                    "changes": {"network.overrides.dvf_scale": [1.0, 10.0]},
                },
                {"kind": "gpu-segment", "start_step": 6000, "end_step": 8000, "device": "H100"},
                {"kind": "cpu-continuation", "step": 8000},
            ],
        }
    }
    card = model_card(meta)
    assert "From step 5000: `network.overrides.dvf_scale` 1 -> 10 (recipe phase)" in card
    assert "Steps 6000 -> 8000 on H100 (GPU segment)" in card
    assert "Step 8000: continued on the CPU (not bit for bit)" in card
    assert "recipe phase" not in model_card({"training": {"step": 1}})


def test_inference_settings_default_and_given() -> None:
    from jrs.model_export.settings import DEFAULT_DVF_SMOOTHING_MM, DEFAULT_NETWORK_PASSES

    defaults = {
        "null_correction": True,
        "dvf_smoothing_mm": DEFAULT_DVF_SMOOTHING_MM,
        "network_passes": DEFAULT_NETWORK_PASSES,
    }
    assert inference_settings(None) == inference_settings({"path_dsc": {}}) == defaults
    given = inference_settings({"inference": {"network_passes": 1, "dvf_smoothing_mm": 0}})
    assert given == {"null_correction": True, "dvf_smoothing_mm": 0.0, "network_passes": 1}
    for bad in (
        [],
        {"passes": 2},
        {"network_passes": 9},
        {"network_passes": True},
        {"dvf_smoothing_mm": -1.0},
        {"null_correction": 1},
    ):
        with pytest.raises(InvalidInput, match="metrics 'inference'"):
            inference_settings({"inference": bad})


def test_qa_reference_paths_from_validation_dsc() -> None:
    """The export states which paths the QA compares: validated ones and any with DSC >= 0.85."""
    from jrs.model_export.card import model_card
    from jrs.model_export.settings import qa_reference_path_table
    from jrs.qa.figures import qa_reference_paths

    metrics = {
        "path_dsc": {
            "segmentation": {"prostate": 0.869, "bladder": 0.05, "rectum": 0.934},
            "registration": {"prostate": 0.950, "bladder": 0.962, "rectum": 0.946},
        }
    }
    table = qa_reference_path_table(metrics)
    assert table == {
        "prostate": ["registration", "segmentation"],  # not shipped, but a reference
        "bladder": ["registration"],  # a dead path is never compared
        "rectum": ["registration", "segmentation"],
    }
    assert qa_reference_path_table(None) == {}
    meta = {
        "qa_reference_paths": table,
        "validated_paths": {"prostate": ["registration"]},
        "path_choice": {"prostate": "registration", "bladder": "registration"},
    }
    assert qa_reference_paths(meta, "bladder") == {"registration"}
    card = model_card(meta)
    assert "QA reference paths (path disagreement)" in card
    assert (
        "| prostate | registration | 0.5, 0.5 (default) | registration | registration, segmentation |"
        in card
    )
