"""No patient name, ID or folder path in the logs of DICOM reading and writing (issue 13).

Folder names of exported DICOM series often carry the patient's name or ID (``Pelvic-Ref-005``,
``Doe^John``), and logs are kept and shipped where patient data must not go. The logs say how many
slices, which size and spacing, never where the files are. Warnings kept for the user (in the
series' ``warnings`` and ``qa.json``) may still name the files the user gave.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from jrs.core.geometry import Geometry, Volume
from jrs.io.ct import read_ct_series
from jrs.io.ct_writer import write_ct_series
from jrs.io.reg import write_deformable_registration
from jrs.io.series import CTSeries, PatientInfo, new_uid

FOLDER = "Pelvic-Ref-005_Doe^John_PID0042"
SECRETS = ("Pelvic-Ref-005", "Doe", "PID0042", "Roe", "MRN-7781")


def _series(seed: int = 0) -> CTSeries:
    rng = np.random.default_rng(seed)
    g = Geometry(
        (6, 12, 16), origin=np.array([-30.0, -20.0, 10.0]), spacing=np.array([0.8, 1.1, 2.5])
    )
    volume = Volume(rng.uniform(-1000.0, 1000.0, g.shape).astype(np.float32), g)
    patient = PatientInfo(patient_name="Roe^Richard", patient_id="MRN-7781")
    return CTSeries.from_volume(volume, patient=patient)


def _assert_private(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} in the logs:\n{text}"


def _edit(path: Path | str, **changes: object) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        if value is None:
            del ds[keyword]
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)


def test_reading_and_writing_a_ct_series_logs_no_folder_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / FOLDER / "ct"
    with caplog.at_level(logging.DEBUG, logger="jrs"):
        write_ct_series(_series(), folder)
        read = read_ct_series(folder)
    assert read.volume.geometry.shape == (6, 12, 16)
    # the logs still say what was read and written
    assert "read CT series of 6 slices (12 x 16)" in caplog.text
    assert "spacing" in caplog.text
    assert "wrote CT series of 6 slices" in caplog.text
    _assert_private(caplog.text)


def test_warnings_of_a_read_name_the_folder_for_the_user_but_not_in_the_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / FOLDER / "ct"
    series = _series()
    write_ct_series(series, folder)
    for path in series.files:
        _edit(path, FrameOfReferenceUID=None)
    scout = folder / "Doe_John_scout.dcm"
    shutil.copy(series.files[0], scout)
    _edit(scout, SOPInstanceUID=new_uid(), ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="jrs"):
        read = read_ct_series(folder)
    assert len(read.warnings) == 2
    assert any("localizer" in w and "Doe_John_scout.dcm" in w for w in read.warnings)
    assert any("FrameOfReferenceUID" in w and FOLDER in w for w in read.warnings)
    assert "localizer" in caplog.text and "FrameOfReferenceUID is missing" in caplog.text
    _assert_private(caplog.text)


def test_writing_a_registration_logs_no_folder_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    daily, planning = _series(1), _series(2)
    g = daily.volume.geometry.with_frame(daily.frame_of_reference_uid)
    dvf = Volume(np.zeros((*g.shape, 3), np.float32), g)
    with caplog.at_level(logging.DEBUG, logger="jrs"):
        write_deformable_registration(
            dvf, daily, planning, tmp_path / FOLDER / "out" / "registration.dcm"
        )
    assert "wrote deformable registration" in caplog.text
    _assert_private(caplog.text)


def test_writing_and_reading_an_rtstruct_logs_no_folder_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from jrs.io.rtstruct import masks_from_files
    from jrs.io.rtstruct_writer import write_rtstruct

    series = _series(3)
    ct_folder = tmp_path / FOLDER / "ct"
    write_ct_series(series, ct_folder)
    written = read_ct_series(ct_folder)
    mask = np.zeros(written.volume.geometry.shape, np.uint8)
    mask[2:4, 3:8, 4:10] = 1
    empty = np.zeros_like(mask)
    rt_path = tmp_path / FOLDER / "rtstruct.dcm"
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="jrs"):
        write_rtstruct({"Prostate": mask, "Empty": empty}, written, rt_path)
        _, _, masks = masks_from_files(ct_folder, rt_path)
    assert int(masks["Prostate"].array.sum()) == int(mask.sum())
    assert "wrote RTSTRUCT with 2 ROIs" in caplog.text
    # the empty ROI is warned about in the log, without the file's path
    assert "Empty" in caplog.text and "RTSTRUCT:" in caplog.text
    _assert_private(caplog.text)
