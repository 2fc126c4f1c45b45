"""The network method gives the same contours on the same input, run after run (issue 13).

Issue 13 found two runs of one method on one real pelvic pair giving prostate DSC 0.919 and 0.890
against the same truth. ``--method iterative`` is guarded in `test_pipeline_safety`. Here the
network method: the bundled model through the engine a user gets on this machine (OpenVINO where
installed, else ONNX Runtime), with the real pre-alignment, null correction and fusion, twice on
one phantom pair, in separate output folders. Every written contour, the DVF and the paths'
label maps must be bit-identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jrs.core.geometry import Volume
from jrs.inference.registry import default_model_dir
from jrs.io.rtstruct import masks_from_files
from jrs.pipeline.options import RecontourOptions
from jrs.pipeline.run import recontour
from jrs.synth import generate_fraction, generate_patient, write_fraction, write_patient


@pytest.mark.integration
def test_network_method_twice_gives_identical_contours(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    if not (default_model_dir() / "model.onnx").is_file():
        pytest.skip("no bundled model")
    patient = generate_patient(33, matrix=256, slice_thickness=3.0)
    write_patient(patient, tmp_path / "case")
    daily = tmp_path / "case" / "fraction_1"
    write_fraction(generate_fraction(patient, 1), daily)
    plan = tmp_path / "case" / "planning"
    args = (plan / "ct", plan / "rtstruct.dcm", daily / "ct")
    opts = RecontourOptions(device="cpu")

    first = recontour(*args, tmp_path / "a", opts)
    second = recontour(*args, tmp_path / "b", opts)

    # the pair moved: the run is not the trivial same-scan shortcut
    assert np.abs(Volume.read(str(first.dvf)).array).max() > 1.0
    np.testing.assert_array_equal(
        Volume.read(str(first.dvf)).array, Volume.read(str(second.dvf)).array
    )
    assert first.path_labels.keys() == second.path_labels.keys()
    for key in first.path_labels:
        np.testing.assert_array_equal(
            first.path_labels[key].array, second.path_labels[key].array, err_msg=key
        )
    _, _, a = masks_from_files(daily / "ct", first.rtstruct)
    _, _, b = masks_from_files(daily / "ct", second.rtstruct)
    assert a.keys() == b.keys()
    assert {"Prostate", "SeminalVesicles", "Rectum", "Bladder"} <= set(a)
    for name in a:
        np.testing.assert_array_equal(a[name].array, b[name].array, err_msg=name)
    qa_a = json.loads(Path(first.qa).read_text())
    qa_b = json.loads(Path(second.qa).read_text())
    assert [(s["name"], s["flags"]) for s in qa_a["structures"]] == [
        (s["name"], s["flags"]) for s in qa_b["structures"]
    ]
    assert qa_a["model"]["engine"] == qa_b["model"]["engine"]
