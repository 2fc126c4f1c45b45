"""jrs.inference: loading, devices, errors, tiled whole-scan prediction, no torch at run time."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from jrs.core.errors import InvalidInput, ModelNotReady
from jrs.inference import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    Prediction,
    available_providers,
    load_model,
)

HAS_CUDA = CUDA_PROVIDER in available_providers()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny cross-stitch (channels 4/8/8, calibrated BatchNorm) exported to ONNX."""
    pytest.importorskip("torch")
    from jrs.model_export.export import export_checkpoint
    from tests.model_export.test_export import tiny_net

    root = tmp_path_factory.mktemp("models")
    return export_checkpoint(tiny_net(), root, exporter="legacy")


@pytest.fixture(scope="module")
def model(model_dir: Path):  # type: ignore[no-untyped-def]
    # ONNX Runtime fp32: the reference the tiling tests compare with (OpenVINO: test_engines.py)
    return load_model(model_dir, "cpu", engine="onnxruntime", intra_op_threads=1)


def volumes(shape: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    return (
        rng.uniform(-1, 1, shape).astype(np.float32),
        rng.uniform(-1, 1, shape).astype(np.float32),
        rng.integers(0, 5, shape).astype(np.uint8),
    )


def single_window_reference(model, vols: tuple[np.ndarray, ...]) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    """Run the bare ONNX graph once on the whole volume padded by 20 per side (+ end padding
    to a valid size): the ground truth a tiled run must reproduce."""
    shape = vols[0].shape
    win = [max(44, -(-(s + 40) // 4) * 4) for s in shape]
    batch = {}
    for name, vol, fill in zip(
        ["fixed", "moving", "moving_labels"], vols, [-1.0, -1.0, 0.0], strict=True
    ):
        arr = np.full((1, 1, *win), fill, np.float32)
        arr[0, 0, 20 : 20 + shape[0], 20 : 20 + shape[1], 20 : 20 + shape[2]] = vol
        batch[name] = arr
    out = model.run(batch)
    return {k: v[0, :, : shape[0], : shape[1], : shape[2]] for k, v in out.items()}


# ---------------------------------------------------------------------------------- tiling
@pytest.mark.parametrize("shape", [(61, 50, 47), (44, 52, 40)])
def test_tiled_equals_single_window(model, shape: tuple[int, int, int]) -> None:  # type: ignore[no-untyped-def]
    vols = volumes(shape, seed=1)
    ref = single_window_reference(model, vols)
    tiled = model.predict(*vols, window=64)
    assert tiled.timings.tiles >= 8  # really tiled: 24-voxel outputs, 2-3 windows per axis
    assert tiled.seg_logits.shape == (5, *shape) and tiled.dvf.shape == (3, *shape)
    assert tiled.seg_logits.dtype == np.float32 and tiled.dvf.dtype == np.float32
    assert np.abs(ref["seg_high"]).max() > 0.05  # O(1) outputs: the comparison means something
    assert np.abs(tiled.seg_logits - ref["seg_high"]).max() <= 1e-4
    assert np.abs(tiled.dvf - ref["dvf_high"]).max() <= 1e-4
    whole = model.predict(*vols, window=200)
    assert whole.timings.tiles == 1
    assert np.abs(whole.seg_logits - ref["seg_high"]).max() <= 1e-4


def test_plain_abutting_tiles_show_seams(model) -> None:  # type: ignore[no-untyped-def]
    """Why the defaults pad to a multiple of 4 and overlap windows by 4 output voxels."""
    vols = volumes((61, 50, 47), seed=2)
    ref = single_window_reference(model, vols)
    plain = model.predict(*vols, window=64, seam_overlap=0)
    unaligned = model.predict(*vols, window=64, align=False)
    assert np.abs(plain.dvf - ref["dvf_high"]).max() > 1e-3
    assert np.abs(unaligned.dvf - ref["dvf_high"]).max() > 1e-3


def test_batching_and_outputs(model) -> None:  # type: ignore[no-untyped-def]
    vols = volumes((40, 36, 44), seed=3)
    one = model.predict(*vols, window=64, batch_size=1)
    three = model.predict(*vols, window=64, batch_size=3)
    assert three.timings.batches == -(-three.timings.tiles // 3)
    assert np.abs(one.seg_logits - three.seg_logits).max() <= 1e-5
    assert np.abs(one.dvf - three.dvf).max() <= 1e-5
    probs = one.probabilities
    assert probs.shape == (5, 40, 36, 44) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    assert one.labels.dtype == np.uint8
    np.testing.assert_array_equal(one.labels, probs.argmax(axis=0))


def test_timings_and_info(model) -> None:  # type: ignore[no-untyped-def]
    pred = model.predict(*volumes((30, 30, 30)), window=64)
    t = pred.timings
    assert isinstance(pred, Prediction)
    assert 0 < t.session_s <= t.total_s and t.overhead_ratio >= 1.0
    assert t.provider == CPU_PROVIDER and t.window == (64, 64, 64) and t.batches == t.tiles
    info = model.info()
    assert info["execution_provider"] == CPU_PROVIDER and info["providers"] == [CPU_PROVIDER]
    assert info["name"] == "crossstitch" and info["version"] == 1 and len(info["sha256"]) == 64
    assert json.loads(json.dumps(t.as_dict()))["window"] == [64, 64, 64]
    # what jrs.pipeline.run reads: metadata dict, execution_provider, seg_probs, dvf
    assert model.metadata["name"] == "crossstitch" and model.metadata["sha256"] == info["sha256"]
    assert model.execution_provider == CPU_PROVIDER
    assert pred.seg_probs is not None and pred.seg_probs.shape == (5, 30, 30, 30)


def test_window_from_memory_budget(model) -> None:  # type: ignore[no-untyped-def]
    shape = (120, 160, 160)
    small = model.choose_window(shape, memory_budget_mb=24)
    large = model.choose_window(shape, memory_budget_mb=2048)
    assert 48 <= small < large <= 200 and small % 4 == 0 and large % 4 == 0
    assert model.estimate_memory_mb((small,) * 3) <= 24
    assert model.estimate_memory_mb((large,) * 3) <= 2048
    vols = volumes((44, 40, 36))
    pred = model.predict(*vols, memory_budget_mb=1024)
    assert pred.timings.tiles == 1  # the whole small volume fits in one window


def test_tiny_budget_warns(model, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    with caplog.at_level(logging.WARNING, logger="jrs.inference"):
        assert model.choose_window((100, 100, 100), memory_budget_mb=0.001) == 48
    assert "memory budget" in caplog.text


def test_input_validation(model) -> None:  # type: ignore[no-untyped-def]
    f, m, labels = volumes((20, 20, 20))
    with pytest.raises(InvalidInput, match="moving_labels"):
        model.predict(f, m)
    with pytest.raises(InvalidInput, match="shape"):
        model.predict(f, m[:-1], labels)
    bad = f.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(InvalidInput, match="NaN"):
        model.predict(bad, m, labels)
    with pytest.raises(InvalidInput, match="multiple of 4"):
        model.predict(f, m, labels, window=50)


# ---------------------------------------------------------------------------------- devices
@pytest.mark.skipif(HAS_CUDA, reason="CUDA provider present")
def test_auto_falls_back_to_cpu_with_warning(
    model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="jrs.inference"):
        m = load_model(model_dir, "auto", engine="onnxruntime")
    assert m.execution_provider == CPU_PROVIDER and not m.on_gpu
    assert any(
        r.levelno == logging.WARNING and CUDA_PROVIDER in r.getMessage() for r in caplog.records
    )


@pytest.mark.skipif(HAS_CUDA, reason="CUDA provider present")
def test_cuda_unavailable_is_model_not_ready(model_dir: Path) -> None:
    with pytest.raises(ModelNotReady, match=CUDA_PROVIDER) as err:
        load_model(model_dir, "cuda")
    assert CPU_PROVIDER in str(err.value)  # lists what is available
    assert err.value.code == "model_not_ready"


def test_unknown_device(model_dir: Path) -> None:
    with pytest.raises(InvalidInput, match="device"):
        load_model(model_dir, "tpu")
    with pytest.raises(InvalidInput, match="cuda:N"):
        load_model(model_dir, "cuda:x")


def test_device_names_parse_with_a_cuda_index() -> None:
    from jrs.inference import _session_providers, parse_device

    assert parse_device("auto") == ("auto", None)
    assert parse_device(" CUDA:1 ") == ("cuda", 1)
    assert parse_device("cpu") == ("cpu", None)
    assert _session_providers("cpu") == [CPU_PROVIDER]
    if HAS_CUDA:
        assert _session_providers("cuda:1")[0] == (CUDA_PROVIDER, {"device_id": 1})


@pytest.mark.skipif(HAS_CUDA, reason="CUDA provider present")
def test_cuda_index_unavailable_is_model_not_ready(model_dir: Path) -> None:
    with pytest.raises(ModelNotReady, match="'cuda:0'"):
        load_model(model_dir, "cuda:0")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA provider")
def test_cuda_matches_cpu(model_dir: Path, model) -> None:  # type: ignore[no-untyped-def]
    gpu = load_model(model_dir, "cuda")
    assert gpu.on_gpu
    vols = volumes((40, 40, 40))
    a, b = gpu.predict(*vols, window=64), model.predict(*vols, window=64)
    assert np.abs(a.dvf - b.dvf).max() < 1e-3


# ---------------------------------------------------------------------------------- errors
@pytest.fixture
def copy_dir(model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model_dir, tmp_path / "1"))


def test_missing_folder_and_files(copy_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelNotReady, match="nowhere"):
        load_model(tmp_path / "nowhere")
    (copy_dir / "model.onnx").unlink()
    with pytest.raises(ModelNotReady, match=r"model\.onnx"):
        load_model(copy_dir, "cpu")
    (copy_dir / "metadata.json").unlink()
    with pytest.raises(ModelNotReady, match=r"metadata\.json"):
        load_model(copy_dir, "cpu")


def test_corrupt_metadata(copy_dir: Path) -> None:
    meta_path = copy_dir / "metadata.json"
    good = json.loads(meta_path.read_text())
    meta_path.write_text("{not json")
    with pytest.raises(ModelNotReady, match=r"metadata\.json"):
        load_model(copy_dir, "cpu")
    for key, value, match in [
        ("format", "something-else", "format"),
        ("outputs", [{"name": "seg_high"}], "dvf_high"),
        ("inputs", [{"name": "ct"}], "input names"),
    ]:
        meta_path.write_text(json.dumps({**good, key: value}))
        with pytest.raises(ModelNotReady, match=match) as err:
            load_model(copy_dir, "cpu")
        assert "metadata.json" in str(err.value)
    meta_path.write_text(json.dumps({k: v for k, v in good.items() if k != "sha256"}))
    with pytest.raises(ModelNotReady, match="sha256"):
        load_model(copy_dir, "cpu")


def test_corrupt_model_file(copy_dir: Path) -> None:
    onnx_path = copy_dir / "model.onnx"
    data = bytearray(onnx_path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64
    onnx_path.write_bytes(bytes(data))
    with pytest.raises(ModelNotReady, match=r"model\.onnx.*sha256"):
        load_model(copy_dir, "cpu")
    onnx_path.write_bytes(b"garbage")
    with pytest.raises(ModelNotReady, match=r"model\.onnx"):
        load_model(copy_dir, "cpu", verify_sha256=False)


# ---------------------------------------------------------------------------------- no torch
def test_inference_runs_where_torch_cannot_be_imported(model_dir: Path) -> None:
    code = textwrap.dedent(
        f"""
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "training", "model_export"):
                    raise ImportError(f"{{name}} is blocked in this interpreter")
                return None

        sys.meta_path.insert(0, Block())
        try:
            import torch  # noqa: F401
        except ImportError:
            pass
        else:
            raise SystemExit("torch is importable")

        import numpy as np
        from jrs.inference import load_model

        model = load_model({str(model_dir)!r}, device="auto")
        rng = np.random.default_rng(0)
        shape = (30, 26, 22)
        pred = model.predict(
            rng.uniform(-1, 1, shape).astype(np.float32),
            rng.uniform(-1, 1, shape).astype(np.float32),
            rng.integers(0, 5, shape).astype(np.uint8),
            window=64,
        )
        assert pred.labels.shape == shape and pred.dvf.shape == (3, *shape)
        bad = [m for m in ("torch", "training", "model_export") if m in sys.modules]
        print("OK", pred.timings.tiles, bad)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith("OK") and out.stdout.strip().endswith("[]")
