"""Issue 'Foundation' acceptance: phantoms written in each patient position round-trip exactly.

For HFS, HFP, FFS and FFP: a phantom patient is written as DICOM (CT series + RTSTRUCT) by the
product's writers, re-read by its readers, and every organ's mask is compared with the in-memory
truth in patient coordinates; every DS value is <= 16 characters, the RTSTRUCT re-reads under
pydicom's strict validation, and dciodvfy reports no error on a CT slice and the RTSTRUCT.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.config import settings

from jrs.core.metrics import centroid_mm, dice
from jrs.io.ct import read_ct_series
from jrs.io.rtstruct import read_rtstruct, rtstruct_to_masks
from jrs.synth import generate_patient, write_patient

ORGANS = ("Bladder", "Rectum", "SeminalVesicles", "Prostate")


def _ds_values(ds: pydicom.Dataset) -> list[str]:
    out: list[str] = []
    for elem in ds.iterall():
        if elem.VR == "DS" and elem.value is not None:
            raw = elem.value if elem.VM > 1 else [elem.value]
            out.extend(str(getattr(v, "original_string", v)) for v in raw)
    return out


@pytest.mark.integration
@pytest.mark.parametrize("position", ["HFS", "HFP", "FFS", "FFP"])
def test_phantom_round_trip_per_patient_position(
    position: str, tmp_path: Path, dciodvfy: Callable[[Path], tuple[list[str], str]]
) -> None:
    patient = generate_patient(3, position, matrix=256, slice_thickness=2.5)
    write_patient(patient, tmp_path)
    ct_dir, rs_path = tmp_path / "planning" / "ct", tmp_path / "planning" / "rtstruct.dcm"

    series = read_ct_series(ct_dir)
    assert series.patient_position == position
    np.testing.assert_allclose(series.volume.geometry.direction, patient.ct.geometry.direction)
    assert series.volume.geometry.same_grid(patient.ct.geometry, tol_mm=1e-3)

    masks = rtstruct_to_masks(read_rtstruct(rs_path), series)
    g = series.volume.geometry
    for organ in ORGANS:
        truth = patient.structures[organ]
        got = masks[organ].array
        assert dice(got, truth) >= 0.98, organ
        err = np.linalg.norm(centroid_mm(got, g) - centroid_mm(truth, g))
        assert err < 0.5, (organ, err)

    # strict re-read and DS lengths
    old = settings.reading_validation_mode
    settings.reading_validation_mode = pydicom.config.RAISE
    try:
        rs = pydicom.dcmread(rs_path)
        ct0 = pydicom.dcmread(sorted(ct_dir.iterdir())[0])
        rs.walk(lambda d, e: e.value)  # touch every element under strict validation
    finally:
        settings.reading_validation_mode = old
    for ds in (rs, ct0):
        too_long = [v for v in _ds_values(ds) if len(v) > 16]
        assert not too_long, too_long[:5]

    for path in (rs_path, sorted(ct_dir.iterdir())[len(series.sop_instance_uids) // 2]):
        errors, out = dciodvfy(path)
        assert errors == [], out


def test_organs_in_the_same_lps_place_for_every_position() -> None:
    ref = generate_patient(3, "HFS", matrix=256, slice_thickness=2.5)
    for position in ("HFP", "FFS", "FFP"):
        p = generate_patient(3, position, matrix=256, slice_thickness=2.5)
        for organ in ORGANS:
            a = centroid_mm(ref.structures[organ], ref.ct.geometry)
            b = centroid_mm(p.structures[organ], p.ct.geometry)
            assert np.linalg.norm(a - b) < 0.01, (position, organ)
