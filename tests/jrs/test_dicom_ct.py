"""Tests of the CT series writer and reader (jrs.io.ct)."""

from __future__ import annotations

import logging
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import config as pydicom_config
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.uid import (
    MPEG2MPML,
    UID,
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from jrs.core.errors import InvalidInput, UnsupportedData
from jrs.core.geometry import PATIENT_POSITION_DIRECTIONS, Geometry, Volume, reorient
from jrs.io.ct import read_ct_series
from jrs.io.ct_writer import format_ds, hu_to_stored, write_ct_series
from jrs.io.series import CTSeries, PatientInfo, new_uid

PATIENT = PatientInfo(
    patient_name="Müller^Jörg",
    patient_id="SECRET-ID-123",
    patient_birth_date="19600102",
    patient_sex="F",
    study_date="20240131",
    study_time="101112",
    study_id="S7",
    accession_number="ACC42",
    referring_physician_name="Doe^Jane",
    study_description="Prostate adaptive",
)


def _rotation(axis: list[float], angle_deg: float) -> np.ndarray:
    a = np.asarray(axis, dtype=float)
    a /= np.linalg.norm(a)
    t = np.radians(angle_deg)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)


def _hfs_volume(shape: tuple[int, int, int] = (8, 20, 24), seed: int = 0) -> Volume:
    rng = np.random.default_rng(seed)
    array = rng.uniform(-1024.0, 2500.0, size=shape).astype(np.float32)
    geometry = Geometry(shape, origin=[-30.25, -20.5, 12.0], spacing=[0.8, 1.1, 2.5])
    return Volume(array, geometry)


def _write(tmp: Path, volume: Volume | None = None, **kwargs: object) -> CTSeries:
    series = CTSeries.from_volume(volume if volume is not None else _hfs_volume((6, 12, 16)))
    for key, value in kwargs.items():
        setattr(series, key, value)
    write_ct_series(series, tmp)
    return series


def _edit(path: Path | str, **changes: object) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        if value is None:
            del ds[keyword]
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)


def _assert_same_voxels(read: Volume, original: Volume) -> None:
    """Every voxel of `read` sits on a voxel of `original` (LPS) with the same HU (<= 0.5)."""
    assert read.array.shape == original.array.shape
    idx = original.geometry.physical_to_index(read.geometry.voxel_centres())
    np.testing.assert_allclose(idx, np.round(idx), atol=1e-3)
    i, j, k = (np.round(idx[..., c]).astype(int) for c in range(3))
    np.testing.assert_allclose(read.array, original.array[k, j, i], atol=0.5)


# ------------------------------------------------------------------------ formatting helpers
@pytest.mark.parametrize(
    "value", [1 / 3, -1 / 3, 123456789.123456, -0.000012345678901234, 1e20, -7.5e-300, 2.5, 0.0]
)
def test_format_ds_fits_16_chars_and_keeps_value(value: float) -> None:
    text = format_ds(value)
    assert len(text) <= 16
    assert float(text) == pytest.approx(value, rel=1e-9, abs=1e-12)


def test_format_ds_rejects_non_finite() -> None:
    with pytest.raises(InvalidInput, match="finite"):
        format_ds(float("nan"))


def test_hu_to_stored_rounds_half_to_even_and_clips() -> None:
    stored = hu_to_stored(np.array([0.5, 1.5, -0.5, -2.6, 40000.0, -40000.0, np.nan]))
    assert stored.dtype == np.int16
    assert stored.tolist() == [0, 2, 0, -3, 32767, -32768, -1024]


# ------------------------------------------------------------------------ round trips
ODD_OBLIQUE = _rotation([1.0, 2.0, 0.5], 23.0)


@pytest.mark.parametrize("position", ["HFS", "HFP", "FFS", "FFP"])
def test_round_trip_patient_positions(tmp_path: Path, position: str) -> None:
    hfs = _hfs_volume()
    stored = reorient(hfs, PATIENT_POSITION_DIRECTIONS[position])
    series = CTSeries.from_volume(
        stored, patient=PATIENT, patient_position=position, series_description="daily CT"
    )
    paths = write_ct_series(series, tmp_path / "ct")
    assert [p.name for p in paths[:2]] == ["CT.0001.dcm", "CT.0002.dcm"]
    assert series.files == [str(p) for p in paths]
    shuffled = list(paths)
    random.Random(1).shuffle(shuffled)

    read = read_ct_series(shuffled)

    _assert_same_voxels(read.volume, hfs)
    g, g0 = read.volume.geometry, stored.geometry
    np.testing.assert_allclose(g.direction, g0.direction, atol=1e-9)
    np.testing.assert_allclose(g.origin, g0.origin, atol=1e-6)
    np.testing.assert_allclose(g.spacing, g0.spacing, atol=1e-9)
    assert read.volume.array.dtype == np.float32
    assert read.study_instance_uid == series.study_instance_uid
    assert read.series_instance_uid == series.series_instance_uid
    assert read.sop_instance_uids == series.sop_instance_uids
    assert read.files == [str(p) for p in paths]
    assert g.frame_of_reference_uid == series.frame_of_reference_uid != ""
    assert read.patient == PATIENT
    assert read.patient_position == position
    assert read.series_description == "daily CT"
    assert read.warnings == []


@pytest.mark.parametrize(
    ("name", "direction", "reversed_order"),
    [
        ("oblique", ODD_OBLIQUE, False),
        ("left-handed", np.diag([1.0, 1.0, -1.0]), True),
    ],
)
def test_round_trip_other_directions(
    tmp_path: Path, name: str, direction: np.ndarray, reversed_order: bool
) -> None:
    volume = _hfs_volume((7, 10, 13), seed=3)
    volume = Volume(
        volume.array,
        Geometry(volume.geometry.shape, [-123.456789012345, 7.1, -0.3], [0.7, 0.9, 3.0], direction),
    )
    series = CTSeries.from_volume(volume, patient=PATIENT)
    paths = write_ct_series(series, tmp_path)

    read = read_ct_series(tmp_path)

    _assert_same_voxels(read.volume, volume)
    expected_uids = series.sop_instance_uids[::-1] if reversed_order else series.sop_instance_uids
    assert read.sop_instance_uids == expected_uids
    assert sorted(read.files) == sorted(str(p) for p in paths)
    g = read.volume.geometry
    # right-handed: the slice axis is row x column
    np.testing.assert_allclose(np.cross(g.direction[:, 0], g.direction[:, 1]), g.direction[:, 2])


def test_hu_outside_int16_is_clipped(tmp_path: Path) -> None:
    volume = _hfs_volume((3, 4, 5))
    volume.array[0, 0, 0] = 1e6
    volume.array[1, 0, 0] = -1e6
    _write(tmp_path, volume)
    read = read_ct_series(tmp_path)
    assert read.volume.array[0, 0, 0] == 32767
    assert read.volume.array[1, 0, 0] == -32768


def test_write_is_valid_dicom_per_dciodvfy(
    tmp_path: Path, dciodvfy: Callable[[Path], tuple[list[str], str]]
) -> None:
    for name, direction in (("hfs", np.eye(3)), ("oblique", ODD_OBLIQUE)):
        volume = _hfs_volume((3, 8, 10))
        volume = Volume(
            volume.array, Geometry((3, 8, 10), [1.5, 2.5, 3.5], [0.5, 0.6, 2], direction)
        )
        series = CTSeries.from_volume(volume, patient=PATIENT, patient_position="FFP")
        paths = write_ct_series(series, tmp_path / name)
        errors, output = dciodvfy(paths[1])
        assert errors == [], output


def test_every_ds_value_fits_16_characters(tmp_path: Path) -> None:
    volume = _hfs_volume((4, 6, 7))
    geometry = Geometry(
        (4, 6, 7),
        origin=[-123.456789012345678, 1 / 3, -98765.4321098765],
        spacing=[0.333333333333, 1 / 7, 2.123456789012345],
        direction=ODD_OBLIQUE,
    )
    _write(tmp_path, Volume(volume.array, geometry))
    checked = 0
    for path in sorted(tmp_path.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        for tag in list(ds.keys()):
            raw = ds.get_item(tag)
            if raw is not None and raw.VR == "DS" and raw.value:
                for value in bytes(raw.value).split(b"\\"):
                    assert len(value.strip()) <= 16, (ds[tag].keyword, value)
                    checked += 1
    assert checked >= 4 * 12  # IPP(3) + IOP(6) + PixelSpacing(2) + thickness, location, ...


def test_write_fast_enough_smoke(tmp_path: Path) -> None:
    """Writing does not copy data sets per slice needlessly (a coarse guard, not a benchmark)."""
    import time

    volume = Volume(
        np.zeros((40, 128, 128), np.float32), Geometry((40, 128, 128), [0, 0, 0], [1, 1, 1])
    )
    start = time.perf_counter()
    _write(tmp_path, volume)
    assert time.perf_counter() - start < 5.0


# ------------------------------------------------------------------------ input selection
def test_non_dicom_and_non_image_objects_are_skipped(tmp_path: Path) -> None:
    series = _write(tmp_path / "ct")
    (tmp_path / "README.txt").write_text("not dicom")
    (tmp_path / "ct" / "notes.dcm").write_bytes(b"\x00" * 50)
    rtstruct = pydicom.Dataset()
    rtstruct.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    rtstruct.SOPInstanceUID = new_uid()
    rtstruct.Modality = "RTSTRUCT"
    rtstruct.SeriesInstanceUID = new_uid()
    rtstruct.save_as(tmp_path / "rtstruct.dcm", implicit_vr=True, little_endian=True)

    read = read_ct_series(tmp_path)
    assert read.series_instance_uid == series.series_instance_uid
    assert read.volume.geometry.shape == series.volume.geometry.shape


def test_dicomdir_export_reads(tmp_path: Path) -> None:
    from pydicom.fileset import FileSet

    series = _write(tmp_path / "src")
    fileset = FileSet()
    for path in series.files:
        fileset.add(path)
    fileset.write(tmp_path / "media")
    assert (tmp_path / "media" / "DICOMDIR").is_file()
    read = read_ct_series(tmp_path / "media")
    assert read.sop_instance_uids == series.sop_instance_uids
    with pytest.raises(InvalidInput, match="Media Storage Directory"):
        read_ct_series([tmp_path / "media" / "DICOMDIR"])


def test_nothing_usable_names_folder_and_what_was_found(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello")
    rtstruct = pydicom.Dataset()
    rtstruct.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    rtstruct.SOPInstanceUID = new_uid()
    rtstruct.Modality = "RTSTRUCT"
    rtstruct.save_as(tmp_path / "rs.dcm", implicit_vr=True, little_endian=True)
    with pytest.raises(InvalidInput) as info:
        read_ct_series(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    assert "1 non-DICOM" in message
    assert "1 RTSTRUCT" in message


def test_empty_folder_and_missing_path(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="no DICOM image slices"):
        read_ct_series(tmp_path)
    with pytest.raises(InvalidInput, match="does not exist"):
        read_ct_series(tmp_path / "nope")


def test_several_series_refused_then_chosen(tmp_path: Path) -> None:
    a = _write(tmp_path / "a")
    b = _write(
        tmp_path / "b", _hfs_volume((4, 12, 16)), series_description="second", patient=PATIENT
    )
    with pytest.raises(InvalidInput) as info:
        read_ct_series(tmp_path)
    message = str(info.value)
    assert a.series_instance_uid in message and b.series_instance_uid in message
    assert "6 slices" in message and "4 slices" in message
    assert "'second'" in message and "CT" in message and "series_uid" in message
    assert PATIENT.patient_name not in message and PATIENT.patient_id not in message

    read = read_ct_series(tmp_path, series_uid=b.series_instance_uid)
    assert read.sop_instance_uids == b.sop_instance_uids

    with pytest.raises(InvalidInput) as info:
        read_ct_series(tmp_path, series_uid="1.2.3.4")
    assert "1.2.3.4" in str(info.value) and a.series_instance_uid in str(info.value)


# ------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize("modality", ["MR", "PT"])
def test_non_ct_modality_unsupported(tmp_path: Path, modality: str) -> None:
    _write(tmp_path)
    for path in tmp_path.glob("*.dcm"):
        _edit(path, Modality=modality)
    with pytest.raises(UnsupportedData) as info:
        read_ct_series(tmp_path)
    assert f"'{modality}'" in str(info.value) and ".dcm" in str(info.value)


@pytest.mark.parametrize(
    "attribute",
    [
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
        "Rows",
        "Columns",
        "PixelData",
    ],
)
def test_missing_required_attribute(tmp_path: Path, attribute: str) -> None:
    series = _write(tmp_path)
    target = series.files[2]
    _edit(target, **{attribute: None})
    with pytest.raises(InvalidInput) as info:
        read_ct_series(tmp_path)
    assert attribute in str(info.value) and target in str(info.value)


@pytest.mark.parametrize("keep", [0.5, 700])
def test_truncated_file(tmp_path: Path, keep: float) -> None:
    series = _write(tmp_path)
    target = Path(series.files[3])
    data = target.read_bytes()
    target.write_bytes(data[: int(len(data) * keep) if keep < 1 else int(keep)])
    with pytest.raises(InvalidInput) as info:
        read_ct_series(tmp_path)
    assert str(target) in str(info.value)


def test_truncated_compressed_file(tmp_path: Path) -> None:
    series = _write(tmp_path, _hfs_volume((3, 32, 40)))
    for path in series.files:
        ds = pydicom.dcmread(path)
        ds.compress(JPEG2000Lossless)
        ds.save_as(path)
    target = Path(series.files[1])
    data = target.read_bytes()
    target.write_bytes(data[: int(len(data) * 0.9)])
    with pytest.raises(InvalidInput, match="truncated") as info:
        read_ct_series(tmp_path)
    assert str(target) in str(info.value)


def test_corrupt_file_claiming_dicom(tmp_path: Path) -> None:
    _write(tmp_path)
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"\x00" * 128 + b"DICM" + bytes(range(256)) * 8)
    with pytest.raises(InvalidInput) as info:
        read_ct_series(tmp_path)
    assert str(bad) in str(info.value) and "corrupt" in str(info.value)


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"ImageOrientationPatient": [0, 1, 0, 1, 0, 0]}, ["ImageOrientationPatient", "[0.0, 1.0"]),
        ({"Rows": 11}, ["Rows/Columns", "12x16", "11x16"]),
        ({"PixelSpacing": [1.1, 0.9]}, ["PixelSpacing", "[1.1, 0.9]", "[1.1, 0.8]"]),
    ],
)
def test_inconsistent_slices(tmp_path: Path, changes: dict[str, object], words: list[str]) -> None:
    series = _write(tmp_path)
    _edit(series.files[4], **changes)
    with pytest.raises(InvalidInput) as info:
        read_ct_series(tmp_path)
    message = str(info.value)
    assert series.files[4] in message and series.files[0] in message
    for word in words:
        assert word in message


def test_gantry_tilt_attribute(tmp_path: Path) -> None:
    series = _write(tmp_path)
    for path in series.files:
        _edit(path, GantryDetectorTilt="15")
    with pytest.raises(UnsupportedData, match=r"15 degrees.*untilted"):
        read_ct_series(tmp_path)


def test_gantry_tilt_from_positions(tmp_path: Path) -> None:
    series = _write(tmp_path)
    shift = np.tan(np.radians(10.0)) * 2.5  # 10 degrees over a 2.5 mm slice distance
    for k, path in enumerate(series.files):
        ds = pydicom.dcmread(path)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [format_ds(x), format_ds(y + k * shift), format_ds(z)]
        ds.save_as(path)
    with pytest.raises(UnsupportedData) as info:
        read_ct_series(tmp_path)
    assert "10.00 degrees" in str(info.value) and "untilted" in str(info.value)


def test_duplicate_slice(tmp_path: Path) -> None:
    series = _write(tmp_path)
    copy = tmp_path / "copy.dcm"
    shutil.copy(series.files[2], copy)
    _edit(copy, SOPInstanceUID=new_uid())
    with pytest.raises(InvalidInput) as info:
        read_ct_series(tmp_path)
    message = str(info.value)
    assert "duplicate" in message and str(copy) in message and series.files[2] in message
    z = float(series.volume.geometry.origin[2]) + 2 * 2.5
    assert f"{z:.3f}" in message


def test_missing_slice(tmp_path: Path) -> None:
    series = _write(tmp_path)
    Path(series.files[2]).unlink()
    with pytest.raises(InvalidInput) as info:
        read_ct_series(tmp_path)
    message = str(info.value)
    assert "1 slice(s) missing" in message and "2.500 mm" in message
    assert series.files[1] in message and series.files[3] in message


def test_non_uniform_spacing(tmp_path: Path) -> None:
    series = _write(tmp_path)
    ds = pydicom.dcmread(series.files[-1])
    ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 1.0
    ds.save_as(series.files[-1])
    with pytest.raises(InvalidInput) as info:
        read_ct_series(tmp_path)
    message = str(info.value)
    assert "non-uniform" in message and "3.500 mm" in message and "expected 2.500 mm" in message


def test_small_position_noise_is_tolerated(tmp_path: Path) -> None:
    series = _write(tmp_path)
    ds = pydicom.dcmread(series.files[3])
    ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 0.004
    ds.save_as(series.files[3])
    read = read_ct_series(tmp_path)
    assert read.volume.geometry.spacing[2] == pytest.approx(2.5)


def test_single_slice(tmp_path: Path) -> None:
    series = _write(tmp_path)
    with pytest.raises(InvalidInput, match="at least 2 slices"):
        read_ct_series([series.files[0]])


def test_localizer_is_skipped_with_warning(tmp_path: Path) -> None:
    series = _write(tmp_path)
    scout = tmp_path / "scout.dcm"
    shutil.copy(series.files[0], scout)
    _edit(
        scout,
        SOPInstanceUID=new_uid(),
        ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
        ImageOrientationPatient=[1, 0, 0, 0, 0, -1],
    )
    read = read_ct_series(tmp_path)
    assert read.sop_instance_uids == series.sop_instance_uids
    assert any("localizer" in w for w in read.warnings)


# ------------------------------------------------------------------------ UIDs and headers
def test_empty_uids_warn_and_group(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    series = _write(tmp_path)
    for path in series.files:
        _edit(path, StudyInstanceUID="", SeriesInstanceUID=None, FrameOfReferenceUID=None)
    with caplog.at_level(logging.WARNING, logger="jrs.io.ct"):
        read = read_ct_series(tmp_path)
    assert read.study_instance_uid == "" and read.series_instance_uid == ""
    assert read.volume.geometry.frame_of_reference_uid is None
    assert len(read.warnings) == 3
    for word in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert any(word in w for w in read.warnings)
        assert word in caplog.text
    with pytest.raises(InvalidInput, match="StudyInstanceUID"):
        read_ct_series(tmp_path, allow_empty_uids=False)
    assert read_ct_series(tmp_path, series_uid="").volume.geometry.shape == (6, 12, 16)


def test_mixed_frames_of_reference_warn(tmp_path: Path) -> None:
    series = _write(tmp_path)
    _edit(series.files[3], FrameOfReferenceUID=new_uid())
    read = read_ct_series(tmp_path)
    assert read.frame_of_reference_uid == series.frame_of_reference_uid
    assert any("2 different FrameOfReferenceUIDs" in w for w in read.warnings)


@pytest.mark.filterwarnings("ignore:.*Invalid value for VR:UserWarning")
def test_invalid_header_values_are_tolerated(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    series = _write(tmp_path, patient=PATIENT)
    mode = pydicom_config.settings.writing_validation_mode
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    try:
        for path in series.files:
            _edit(path, PatientSex="9f86d081884c7d659a2", PatientBirthDate="a1b2c3d4e5")
    finally:
        pydicom_config.settings.writing_validation_mode = mode
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        read = read_ct_series(tmp_path)
    assert read.patient.patient_sex == "9f86d081884c7d659a2"
    for secret in ("9f86d081884c7d659a2", PATIENT.patient_name, PATIENT.patient_id):
        assert secret not in caplog.text
    assert read.patient.patient_birth_date == "a1b2c3d4e5"


# ------------------------------------------------------------------------ transfer syntaxes
@pytest.mark.parametrize("syntax", [JPEG2000Lossless, RLELossless])
def test_compressed_series_reads_back_equal(tmp_path: Path, syntax: UID) -> None:
    series = _write(tmp_path, _hfs_volume((3, 32, 40)))  # openjpeg needs >= 32 pixels a side
    for path in series.files:
        ds = pydicom.dcmread(path)
        ds.compress(syntax)
        ds.save_as(path)
    assert pydicom.dcmread(series.files[0]).file_meta.TransferSyntaxUID == syntax
    read = read_ct_series(tmp_path)
    _assert_same_voxels(read.volume, series.volume)


def test_deflated_series_reads_back_equal(tmp_path: Path) -> None:
    series = _write(tmp_path)
    for path in series.files:
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        ds.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(series.files[0]).file_meta.TransferSyntaxUID.is_deflated
    read = read_ct_series(tmp_path)
    _assert_same_voxels(read.volume, series.volume)


@pytest.mark.parametrize("syntax", [MPEG2MPML, JPEGLSLossless])
def test_undecodable_transfer_syntax_unsupported(tmp_path: Path, syntax: UID) -> None:
    try:
        if get_decoder(syntax).is_available:
            pytest.skip(f"a decoder for {syntax.name} is installed here")
    except NotImplementedError:
        pass
    series = _write(tmp_path)
    target = series.files[1]
    ds = pydicom.dcmread(target)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + b"\x00" * 64])
    ds["PixelData"].VR = "OB"
    ds.save_as(target)
    with pytest.raises(UnsupportedData) as info:
        read_ct_series(tmp_path)
    assert target in str(info.value) and syntax.name in str(info.value)


# ------------------------------------------------------------------------ real data
def test_real_jpeg2000_series_with_empty_uids(shared_data: Path) -> None:
    read = read_ct_series(shared_data / "pelvis-ct" / "upper-abdomen-dicom-jpeg2000")
    g = read.volume.geometry
    assert g.shape == (20, 512, 512)
    np.testing.assert_allclose(g.spacing, [0.9765625, 0.9765625, 2.0], atol=1e-4)
    np.testing.assert_allclose(g.direction, np.eye(3), atol=1e-6)
    assert any("StudyInstanceUID" in w for w in read.warnings)
    assert any("SeriesInstanceUID" in w for w in read.warnings)
    hu = read.volume.array
    assert hu.min() >= -1100 and np.percentile(hu, 5) < -900  # air
    soft = np.mean((hu > -100) & (hu < 100))
    assert soft > 0.1  # a sizeable share of soft tissue
    assert hu.max() > 500  # bone
    # slices sorted foot -> head along +z, origin = lowest slice
    z = [
        float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2])
        for f in read.files
    ]
    assert z == sorted(z) and g.origin[2] == pytest.approx(z[0])


def test_real_nifti_lps_geometry(shared_data: Path) -> None:
    nib = pytest.importorskip("nibabel")
    path = shared_data / "pelvis-ct" / "example_ct.nii.gz"
    image = nib.load(str(path))
    nib_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ image.affine
    volume = Volume.read(str(path))
    np.testing.assert_allclose(volume.geometry.affine, nib_lps, atol=1e-3)
    data = np.asanyarray(image.dataobj)  # (i, j, k)
    assert volume.array.shape == data.shape[::-1]
    for ijk in [(0, 0, 0), (60, 50, 56), (10, 90, 100), (121, 100, 111)]:
        point = (nib_lps @ np.array([*ijk, 1.0]))[:3]
        i, j, k = np.round(volume.geometry.physical_to_index(point)).astype(int)
        assert float(volume.array[k, j, i]) == pytest.approx(float(data[ijk]), abs=1e-3)


def test_real_rt_utils_mock_ct(shared_data: Path) -> None:
    folder = shared_data / "rt-edge-cases" / "rt-utils-mock"
    read = read_ct_series(folder)  # the three RTSTRUCTs beside the CT are skipped
    g = read.volume.geometry
    assert g.shape == (2, 512, 512)
    np.testing.assert_allclose(g.spacing, [0.488281, 0.488281, 5.0], atol=1e-5)
    np.testing.assert_allclose(g.origin, [-125.0, -125.0, 60.0])
    assert read.frame_of_reference_uid != ""
    assert read.warnings == []
    assert read.volume.array.min() > -3100 and read.volume.array.max() < 3100


def test_real_single_slice_breast_ct_is_refused(shared_data: Path) -> None:
    with pytest.raises(InvalidInput, match="at least 2 slices"):
        read_ct_series(shared_data / "rt-edge-cases" / "dicompyler-breast")


def test_pixel_data_length_past_the_end_of_file(tmp_path: Path) -> None:
    """A bit flip that makes PixelData's length field 64 KiB larger than the file is truncation.

    pydicom defers reading such a large value; the check must use the raw (deferred) element.
    """
    series = _write(tmp_path)
    target = Path(series.files[1])
    data = bytearray(target.read_bytes())
    at = data.rfind(b"\xe0\x7f\x10\x00")  # (7FE0,0010) PixelData, explicit VR little endian
    assert at > 0 and data[at + 4 : at + 6] == b"OW"
    length_at = at + 8  # tag (4), VR (2), reserved (2), then the 32-bit length
    data[length_at + 2] ^= 0x01  # + 65536 bytes
    target.write_bytes(bytes(data))
    with pytest.raises(InvalidInput, match="truncated") as info:
        read_ct_series(tmp_path)
    assert str(target) in str(info.value)
