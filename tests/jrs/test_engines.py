"""The inference engines (real ONNX Runtime and OpenVINO sessions on the bundled model).

* engine and precision selection, and the errors of impossible combinations;
* the accuracy guard: OpenVINO bf16 against ONNX Runtime fp32 on a small window (the differences
  are reported as test properties and bounded), OpenVINO fp32 equal to ONNX Runtime fp32;
* a whole-scan tiled prediction through OpenVINO equal to ONNX Runtime's;
* compiled window shapes cached within a memory budget, one model per process;
* inference without OpenVINO installed (fallback) and the message when it is asked for.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from jrs.core.errors import InvalidInput, ModelNotReady
from jrs.inference import CPU_PROVIDER, load_model, openvino_available
from jrs.inference.registry import default_model_dir

pytestmark = pytest.mark.skipif(not openvino_available(), reason="OpenVINO is not installed")

#: bf16 keeps 8 significant bits: a few 1e-3 relative after the network; bounded with margin.
BF16_RELATIVE_BOUND = 0.03
#: fp32 against fp32: only the order of the operations differs.
FP32_RELATIVE_BOUND = 1e-4


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return default_model_dir()


@pytest.fixture(scope="module")
def reference(model_dir: Path):  # type: ignore[no-untyped-def]
    return load_model(model_dir, "cpu", engine="onnxruntime")


@pytest.fixture(scope="module")
def ov_fp32(model_dir: Path):  # type: ignore[no-untyped-def]
    return load_model(model_dir, "cpu", engine="openvino", precision="fp32")


def _has_bf16() -> bool:
    from jrs.inference.openvino_cpu import cpu_capabilities

    return "BF16" in cpu_capabilities()


def window(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A (1, 1, n, n, n) input window: a body with three organs, the planning shifted by ~2 mm."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(
        *(np.arange(n, dtype=np.float32) - n / 2 for _ in range(3)), indexing="ij"
    )

    def ball(c: tuple[float, float, float], r: float) -> np.ndarray:
        return ((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) <= r * r

    fixed = np.full((n, n, n), -0.95, np.float32)
    fixed[ball((0, 0, 0), n * 0.45)] = 0.02
    moving = fixed.copy()
    labels = np.zeros((n, n, n), np.float32)
    for lab, c, r in ((1, (0, -6, 0), 9), (2, (0, 10, 0), 5), (4, (-3, 0, 2), 6)):
        fixed[ball(c, r)] = 0.05 + 0.01 * lab
        moved = ball((c[0] + 2, c[1] - 1, c[2] + 1), r)
        moving[moved] = 0.05 + 0.01 * lab
        labels[moved] = lab
    fixed += rng.normal(0, 0.01, fixed.shape).astype(np.float32)
    moving += rng.normal(0, 0.01, moving.shape).astype(np.float32)
    return {
        "fixed": fixed[None, None],
        "moving": moving[None, None],
        "moving_labels": labels[None, None],
    }


def _relative_max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(1.0, float(np.abs(b).max())))


# ---------------------------------------------------------------------------------- selection
def test_auto_on_the_cpu_is_openvino_with_an_explicit_precision(model_dir: Path) -> None:
    model = load_model(model_dir, "cpu")
    info = model.info()
    assert info["engine"] == "openvino" and info["device"] == "cpu"
    assert info["precision"] == ("bf16" if _has_bf16() else "fp32")
    assert model.execution_provider == "OpenVINO:CPU" and not model.on_gpu
    assert model.session is None and model.precision == info["precision"]
    # the precision was set, not left to OpenVINO's own choice
    compiled_hint = model.engine._config["INFERENCE_PRECISION_HINT"]  # type: ignore[attr-defined]
    assert compiled_hint == ("bf16" if _has_bf16() else "f32")


def test_onnxruntime_engine_is_the_fp32_reference(reference) -> None:  # type: ignore[no-untyped-def]
    assert reference.info()["engine"] == "onnxruntime"
    assert reference.execution_provider == CPU_PROVIDER and reference.precision == "fp32"


def test_impossible_combinations_are_clear_errors(model_dir: Path) -> None:
    with pytest.raises(InvalidInput, match="OpenVINO engine runs on the CPU"):
        load_model(model_dir, "cuda", engine="openvino")
    with pytest.raises(InvalidInput, match="fp32 only"):
        load_model(model_dir, "cpu", engine="onnxruntime", precision="bf16")
    with pytest.raises(InvalidInput, match="engine 'tensorflow' unknown"):
        load_model(model_dir, "cpu", engine="tensorflow")
    with pytest.raises(InvalidInput, match="precision 'int4' unknown"):
        load_model(model_dir, "cpu", precision="int4")
    with pytest.raises(InvalidInput, match="fp16"):
        load_model(model_dir, "cpu", engine="openvino", precision="fp16")


def test_bf16_is_chosen_only_where_the_cpu_has_it() -> None:
    from jrs.inference.openvino_cpu import resolve_precision

    assert resolve_precision("auto", ["FP32", "BF16", "INT8"]) == "bf16"
    assert resolve_precision("auto", ["FP32", "INT8"]) == "fp32"
    assert resolve_precision("fp32", ["FP32", "BF16"]) == "fp32"
    with pytest.raises(InvalidInput, match="AMX or AVX512-BF16"):
        resolve_precision("bf16", ["FP32", "INT8"])


# ---------------------------------------------------------------------------------- accuracy
@pytest.mark.skipif(not _has_bf16(), reason="this CPU has no bf16 arithmetic")
def test_bf16_parity_with_onnxruntime_fp32_on_a_small_window(
    model_dir: Path,
    reference,
    record_property: pytest.RecordProperty,
    caplog: pytest.LogCaptureFixture,  # type: ignore[no-untyped-def]
) -> None:
    bf16 = load_model(model_dir, "cpu", engine="openvino", precision="bf16")
    batch = window(64)
    ref, got = reference.run(batch), bf16.run(batch)
    assert set(got) == set(ref) == {"seg_high", "dvf_high"}
    seg = _relative_max_diff(got["seg_high"], ref["seg_high"])
    dvf = float(np.abs(got["dvf_high"] - ref["dvf_high"]).max())
    agree = float((got["seg_high"].argmax(1) == ref["seg_high"].argmax(1)).mean())
    record_property("bf16_seg_logits_max_rel_diff", seg)
    record_property("bf16_dvf_max_abs_diff_voxels", dvf)
    record_property("bf16_argmax_agreement", agree)
    logging.getLogger("tests.engines").info(
        "bf16 vs fp32: seg logits %.4g (relative), DVF %.4g voxels, arg-max agreement %.4f",
        seg,
        dvf,
        agree,
    )
    assert np.abs(ref["dvf_high"]).max() > 0.5  # the window produces a real field to compare
    assert 0 < seg <= BF16_RELATIVE_BOUND
    assert 0 < dvf <= BF16_RELATIVE_BOUND * max(1.0, float(np.abs(ref["dvf_high"]).max()))
    assert agree >= 0.99


def test_openvino_fp32_equals_onnxruntime_fp32(reference, ov_fp32) -> None:  # type: ignore[no-untyped-def]
    batch = window(52, seed=3)
    ref, got = reference.run(batch), ov_fp32.run(batch)
    for name in ref:
        assert _relative_max_diff(got[name], ref[name]) <= FP32_RELATIVE_BOUND, name


def test_tiled_whole_scan_prediction_matches_onnxruntime(reference, ov_fp32) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(5)
    shape = (30, 41, 37)
    vols = (
        rng.uniform(-1, 1, shape).astype(np.float32),
        rng.uniform(-1, 1, shape).astype(np.float32),
        rng.integers(0, 5, shape).astype(np.uint8),
    )
    a = reference.predict(*vols, window=64)
    b = ov_fp32.predict(*vols, window=64)
    assert b.timings.tiles == a.timings.tiles > 1
    assert b.timings.engine == "openvino" and b.timings.precision == "fp32"
    assert _relative_max_diff(b.dvf, a.dvf) <= FP32_RELATIVE_BOUND
    assert _relative_max_diff(b.seg_logits, a.seg_logits) <= FP32_RELATIVE_BOUND
    np.testing.assert_array_equal(b.labels, np.argmax(b.seg_logits, axis=0))


# ---------------------------------------------------------------------------------- compiling
def test_window_shapes_are_compiled_once_and_cached_within_a_budget(model_dir: Path) -> None:
    model = load_model(
        model_dir,
        "cpu",
        engine="openvino",
        precision="fp32",
        openvino_options={"cache_budget_mb": 4096},
    )
    vols = window(48)
    vol3 = tuple(v[0, 0, 18:30, 18:30, 18:30] for v in vols.values())  # 12^3
    first = model.predict(*vol3, window=48)  # 48^3 windows, 8 tiles
    again = model.predict(*vol3, window=48)
    assert first.timings.tiles == 8 and first.timings.window == (48, 48, 48)
    assert first.timings.compile_s > 0 and again.timings.compile_s == 0
    assert np.array_equal(first.dvf, again.dvf)
    whole = model.predict(*vol3, window=52)  # another window shape: compiled and cached beside
    assert whole.timings.tiles == 1 and whole.timings.compile_s > 0
    engine = model.engine
    assert len(engine.cached_shapes) == 2  # type: ignore[attr-defined]
    # a budget below one shape's estimate keeps only the newest shape
    small = load_model(
        model_dir,
        "cpu",
        engine="openvino",
        precision="fp32",
        openvino_options={"cache_budget_mb": 1},
    )
    small.predict(*vol3, window=48)
    small.predict(*vol3, window=52)
    assert small.engine.cached_shapes == [(1, 1, 52, 52, 52)]  # type: ignore[attr-defined]


def test_dynamic_shapes_give_the_static_result(model_dir: Path, ov_fp32) -> None:  # type: ignore[no-untyped-def]
    dynamic = load_model(
        model_dir,
        "cpu",
        engine="openvino",
        precision="fp32",
        openvino_options={"static_shapes": False},
    )
    batch = window(48, seed=1)
    a, b = ov_fp32.run(batch), dynamic.run(batch)
    for name in a:
        assert _relative_max_diff(b[name], a[name]) <= FP32_RELATIVE_BOUND


def test_concurrent_runs_on_one_engine_are_serialised_and_correct(ov_fp32) -> None:  # type: ignore[no-untyped-def]
    batches = [window(48, seed=s) for s in range(3)]
    expected = [ov_fp32.run(b)["dvf_high"] for b in batches]
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        results[i] = ov_fp32.run(batches[i])["dvf_high"]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, exp in enumerate(expected):
        np.testing.assert_array_equal(results[i], exp)


# ---------------------------------------------------------------------------------- no OpenVINO
def test_without_openvino_auto_falls_back_and_openvino_is_not_ready(model_dir: Path) -> None:
    code = textwrap.dedent(
        f"""
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("openvino", "torch"):
                    raise ImportError(f"{{name}} is blocked in this interpreter")
                return None

        sys.meta_path.insert(0, Block())
        from jrs.core.errors import ModelNotReady
        from jrs.inference import load_model, openvino_available

        assert not openvino_available()
        model = load_model({str(model_dir)!r}, "cpu")
        print("AUTO", model.info()["engine"], model.execution_provider, model.precision)
        try:
            load_model({str(model_dir)!r}, "cpu", engine="openvino")
        except ModelNotReady as exc:
            print("NOT READY", exc.message)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    assert "AUTO onnxruntime CPUExecutionProvider fp32" in out.stdout
    assert "NOT READY OpenVINO is not installed" in out.stdout
    assert "--engine onnxruntime" in out.stdout


def test_unknown_model_folder_is_not_ready_for_every_engine(tmp_path: Path) -> None:
    for engine in ("auto", "openvino", "onnxruntime"):
        with pytest.raises(ModelNotReady, match="nowhere"):
            load_model(tmp_path / "nowhere", "cpu", engine=engine)


def test_cli_options_are_checked_before_any_work(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from jrs.cli import app

    args = ["--planning-ct", str(tmp_path), "--planning-rtstruct", str(tmp_path / "rs.dcm")]
    args += ["--daily-ct", str(tmp_path), "--out", str(tmp_path / "out")]
    bad_engine = CliRunner().invoke(app, ["recontour", *args, "--engine", "tensorflow"])
    assert bad_engine.exit_code == 2 and "engine 'tensorflow' unknown" in bad_engine.stderr
    bad_spacing = CliRunner().invoke(app, ["recontour", *args, "--dvf-spacing", "-1"])
    assert bad_spacing.exit_code == 2 and "--dvf-spacing must be >= 0" in bad_spacing.stderr
    batch = CliRunner().invoke(
        app,
        [
            "batch",
            "--manifest",
            str(tmp_path / "m.csv"),
            "--out",
            str(tmp_path),
            "--precision",
            "int8",
        ],
    )
    assert batch.exit_code == 2 and "precision 'int8' unknown" in batch.stderr
