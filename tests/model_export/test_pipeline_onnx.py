"""End to end: a trained-format network exported to ONNX re-contours a phantom fraction through
the ``jrs recontour`` command, in an interpreter where torch cannot be imported."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pydicom
import pytest

from jrs.synth import generate_fraction, generate_patient, write_fraction, write_patient


@pytest.mark.integration
def test_recontour_command_with_an_exported_model_and_no_torch(tmp_path: Path) -> None:
    from jrs.model_export.export import export_checkpoint
    from jrs.training.networks import build

    net = build("cross-stitch", channels=(8, 16, 32)).eval()
    model_dir = export_checkpoint(
        net, tmp_path / "models", name="tiny", version=3, exporter="legacy"
    )
    patient = generate_patient(21, matrix=192, slice_thickness=3.0)
    write_patient(patient, tmp_path / "case")
    write_fraction(generate_fraction(patient, 1), tmp_path / "case" / "fraction_1")
    out = tmp_path / "out"
    args = [
        "recontour",
        "--planning-ct",
        str(tmp_path / "case" / "planning" / "ct"),
        "--planning-rtstruct",
        str(tmp_path / "case" / "planning" / "rtstruct.dcm"),
        "--daily-ct",
        str(tmp_path / "case" / "fraction_1" / "ct"),
        "--out",
        str(out),
        "--model",
        str(model_dir),
        "--device",
        "cpu",
    ]
    code = textwrap.dedent(
        f"""
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "training", "model_export"):
                    raise ImportError(name + " is blocked in this interpreter")
                return None

        sys.meta_path.insert(0, Block())
        from jrs.cli import app
        try:
            app({args!r})
        except SystemExit as exc:
            code = exc.code
        else:
            code = 0
        bad = [m for m in ("torch", "training", "model_export") if m in sys.modules]
        print("MODULES", bad)
        sys.exit(code)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "MODULES []" in proc.stdout
    for name in ("rtstruct.dcm", "dvf.mha", "registration.dcm", "qa.json", "review.png"):
        assert (out / name).is_file(), name
    qa = json.loads((out / "qa.json").read_text())
    assert qa["model"]["name"] == "tiny" and str(qa["model"]["version"]) == "3"
    # the CPU engine --engine auto picks (OpenVINO where installed; before there were several
    # engines this was always ONNX Runtime's CPUExecutionProvider); qa.json says which
    from jrs.inference import openvino_available

    engine = "openvino" if openvino_available() else "onnxruntime"
    assert qa["model"]["engine"] == engine and qa["model"]["device"] == "cpu"
    assert qa["model"]["execution_provider"] == (
        "OpenVINO:CPU" if engine == "openvino" else "CPUExecutionProvider"
    )
    assert qa["model"]["precision"] in ("bf16", "fp32")
    assert qa["timings_s"]["network"] > 0
    ds = pydicom.dcmread(out / "rtstruct.dcm")
    assert len(ds.StructureSetROISequence) == len(patient.structures)
