"""DICOM Deformable Spatial Registration: write -> read round trips, validity, refused inputs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.config import settings

from jrs.core.errors import GeometryMismatch, InvalidInput
from jrs.core.fields import dvf_to_sitk, sample_dvf
from jrs.core.geometry import PATIENT_POSITION_DIRECTIONS, Geometry, Volume, reorient
from jrs.io.ct_writer import write_ct_series
from jrs.io.reg import (
    DeformableRegistration,
    matrix_type,
    read_deformable_registration,
    write_deformable_registration,
)
from jrs.io.series import DEFORMABLE_REGISTRATION_STORAGE, CTSeries, PatientInfo, new_uid

SHAPE = (20, 24, 28)  # (nz, ny, nx)
SPACING = (2.0, 2.5, 3.0)  # (x, y, z) mm
PATIENT = PatientInfo(
    patient_name="Doe^John",
    patient_id="PID-0042",
    patient_birth_date="19500101",
    patient_sex="M",
    study_date="20240301",
    study_time="101500",
    study_id="S7",
    accession_number="ACC123",
    referring_physician_name="Who^Doctor",
    study_description="pelvis",
)


def _grid(direction: np.ndarray, shape=SHAPE, spacing=SPACING) -> Geometry:
    """A grid centred near LPS (3.3, -7.1, 12.7) with the given direction."""
    size_xyz = np.array(shape[::-1], float)
    origin = np.array([3.3, -7.1, 12.7]) - direction @ (np.asarray(spacing) * (size_xyz - 1) / 2)
    return Geometry(shape, origin=origin, spacing=spacing, direction=direction)


def _ct(g: Geometry, position: str = "HFS", study: str | None = None) -> CTSeries:
    return CTSeries.from_volume(
        Volume(np.zeros(g.shape, np.float32), g.with_frame(None)),
        patient=PATIENT,
        patient_position=position,
        study_instance_uid=study,
    )


def _smooth_field(g: Geometry) -> np.ndarray:
    """A smooth, non-trivial displacement field (mm), float32 (nz, ny, nx, 3)."""
    p = g.voxel_centres()
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    u = np.stack(
        [
            4.0 * np.sin(x / 17.0) + 0.05 * y + 1.5,
            -3.0 * np.cos(z / 13.0) * np.sin(y / 11.0) - 0.7,
            2.5 * np.sin((x + y) / 19.0) + 0.03 * z,
        ],
        axis=-1,
    )
    return u.astype(np.float32)


def _case(position: str, tmp_path: Path, *, same_study: bool = False, direction=None):
    d = PATIENT_POSITION_DIRECTIONS[position] if direction is None else direction
    g = _grid(d)
    daily = _ct(g, position)
    planning = _ct(
        _grid(PATIENT_POSITION_DIRECTIONS["HFS"], shape=(16, 22, 26)),
        study=daily.study_instance_uid if same_study else None,
    )
    dvf = Volume(_smooth_field(g), g.with_frame(daily.frame_of_reference_uid))
    path = tmp_path / "registration.dcm"
    write_deformable_registration(dvf, daily, planning, path)
    return dvf, daily, planning, path


def _strict_read(path: Path) -> pydicom.Dataset:
    old = settings.reading_validation_mode
    settings.reading_validation_mode = pydicom.config.RAISE
    try:
        ds = pydicom.dcmread(path)
        ds.walk(lambda d, e: e.value)  # touch every element under strict validation
    finally:
        settings.reading_validation_mode = old
    return ds


def _ds_values(ds: pydicom.Dataset) -> list[str]:
    out: list[str] = []
    for elem in ds.iterall():
        if elem.VR == "DS" and elem.value is not None:
            raw = elem.value if elem.VM > 1 else [elem.value]
            out.extend(str(getattr(v, "original_string", v)) for v in raw)
    return out


# ------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("position", ["HFS", "FFS"])
def test_round_trip_is_exact(position: str, tmp_path: Path) -> None:
    dvf, daily, planning, path = _case(position, tmp_path)
    reg = read_deformable_registration(path)
    assert isinstance(reg, DeformableRegistration)
    assert reg.dvf.array.dtype == np.float32 and reg.dvf.array.shape == (*SHAPE, 3)
    assert np.array_equal(reg.dvf.array, dvf.array)
    g, h = reg.dvf.geometry, dvf.geometry
    assert g.shape == h.shape
    np.testing.assert_array_equal(g.direction, h.direction)
    np.testing.assert_array_equal(g.spacing, h.spacing)
    np.testing.assert_allclose(g.origin, h.origin, rtol=0, atol=1e-9)
    assert reg.registered_frame_of_reference_uid == daily.frame_of_reference_uid
    assert reg.source_frame_of_reference_uid == planning.frame_of_reference_uid
    assert g.frame_of_reference_uid == daily.frame_of_reference_uid
    assert daily.frame_of_reference_uid != planning.frame_of_reference_uid
    assert reg.referenced_image_uids == planning.sop_instance_uids
    np.testing.assert_array_equal(reg.pre_deformation, np.eye(4))
    np.testing.assert_array_equal(reg.post_deformation, np.eye(4))
    assert reg.content_label == "JRS_DVF" and reg.path == path


def test_left_handed_grid_is_restored_without_interpolation(tmp_path: Path) -> None:
    """HFS storage with slices head -> foot: the grid's third axis must be row x column."""
    d = np.diag([1.0, 1.0, -1.0])
    dvf, _, _, path = _case("HFS", tmp_path, direction=d)
    reg = read_deformable_registration(path)
    got = reg.dvf.geometry.direction
    np.testing.assert_array_equal(got[:, 2], np.cross(got[:, 0], got[:, 1]))
    assert reg.dvf.geometry.same_grid(reorient(dvf, got).geometry, tol_mm=1e-9)
    back = reorient(reg.dvf, d)
    assert back.geometry.same_grid(dvf.geometry, tol_mm=1e-9)
    assert np.array_equal(back.array, dvf.array)


@pytest.mark.parametrize("position", ["HFS", "FFS"])
def test_1000_random_points_agree_with_mha(position: str, tmp_path: Path) -> None:
    """registration.dcm read back and applied to 1000 points agrees with dvf.mha to < 0.1 mm."""
    dvf, _, _, path = _case(position, tmp_path)
    dvf.write(str(tmp_path / "dvf.mha"))
    mha = Volume.read(str(tmp_path / "dvf.mha"))
    reg = read_deformable_registration(path)

    rng = np.random.default_rng(7)
    g = dvf.geometry
    ijk = rng.uniform(0, np.asarray(g.size_xyz) - 1, size=(1000, 3))
    points = g.index_to_physical(ijk)  # LPS points inside the grid
    from_mha = points + sample_dvf(mha, points)
    from_reg = reg.map_points(points)
    err = np.linalg.norm(from_reg - from_mha, axis=1)
    assert err.max() < 0.1, err.max()
    assert err.max() < 1e-4  # the same float32 numbers on the same grid: agreement is exact
    # and an independent interpolator (SimpleITK) agrees with the REG read back
    tx = dvf_to_sitk(reg.dvf)
    via_sitk = np.array([tx.TransformPoint(tuple(p)) for p in points[:50]])
    np.testing.assert_allclose(via_sitk, from_reg[:50], atol=1e-3)
    assert sitk.ReadImage(str(tmp_path / "dvf.mha")).GetNumberOfComponentsPerPixel() == 3


def test_vector_grid_data_order_follows_the_standard(tmp_path: Path) -> None:
    """x fastest along a row, then rows (y), then planes (z); each vector (x, y, z) LPS mm."""
    dvf, _, _, path = _case("FFS", tmp_path)
    ds = pydicom.dcmread(path)
    grid = ds.DeformableRegistrationSequence[1].DeformableRegistrationGridSequence[0]
    nz, ny, nx = SHAPE
    assert [int(v) for v in grid.GridDimensions] == [nx, ny, nz]
    assert [float(v) for v in grid.GridResolution] == list(SPACING)
    raw = np.frombuffer(grid.VectorGridData, dtype="<f4")
    for k, j, i in [(0, 0, 1), (1, 2, 3), (nz - 1, ny - 1, nx - 1)]:
        offset = 3 * ((k * ny + j) * nx + i)
        np.testing.assert_array_equal(raw[offset : offset + 3], dvf.array[k, j, i])
    g = dvf.geometry
    iop = [float(v) for v in grid.ImageOrientationPatient]
    np.testing.assert_array_equal(iop, np.concatenate([g.direction[:, 0], g.direction[:, 1]]))
    np.testing.assert_allclose([float(v) for v in grid.ImagePositionPatient], g.origin, atol=1e-9)


def test_matrices_are_written_and_applied_in_the_standard_order(tmp_path: Path) -> None:
    g = _grid(PATIENT_POSITION_DIRECTIONS["HFS"])
    daily, planning = _ct(g), _ct(g)
    dvf = Volume(np.broadcast_to(np.float32([1.0, 2.0, 3.0]), (*g.shape, 3)).copy(), g)
    c, s = np.cos(0.1), np.sin(0.1)
    pre = np.array([[c, -s, 0, 5.0], [s, c, 0, -2.0], [0, 0, 1, 1.25], [0, 0, 0, 1]])
    post = np.diag([1.0, 1.0, 1.0, 1.0])
    post[:3, :3] *= 1.1
    path = tmp_path / "reg.dcm"
    write_deformable_registration(
        dvf, daily, planning, path, pre_deformation=pre, post_deformation=post
    )
    ds = pydicom.dcmread(path)
    item = ds.DeformableRegistrationSequence[1]
    assert (
        item.PreDeformationMatrixRegistrationSequence[0].get(
            "FrameOfReferenceTransformationMatrixType"
        )
        == matrix_type(pre)
        == "RIGID"
    )
    assert (
        item.PostDeformationMatrixRegistrationSequence[0].get(
            "FrameOfReferenceTransformationMatrixType"
        )
        == matrix_type(post)
        == "RIGID_SCALE"
    )
    assert matrix_type(np.diag([1.0, 2.0, 1.0, 1.0])) == "AFFINE"
    reg = read_deformable_registration(path)
    np.testing.assert_allclose(reg.pre_deformation, pre, atol=1e-12)
    np.testing.assert_allclose(reg.post_deformation, post, atol=1e-12)
    p = g.voxel_centres()[3, 4, 5]
    expected = post[:3, :3] @ (pre[:3, :3] @ p + pre[:3, 3] + [1.0, 2.0, 3.0])
    np.testing.assert_allclose(reg.map_points(p[None])[0], expected, atol=1e-9)


# ------------------------------------------------------------------------------ validity
def test_dciodvfy_reports_no_error(
    tmp_path: Path, dciodvfy: Callable[[Path], tuple[list[str], str]]
) -> None:
    for position in ("HFS", "FFS"):
        _, _, _, path = _case(position, tmp_path)
        errors, output = dciodvfy(path)
        assert errors == [], output


def test_strict_reread_ds_lengths_and_modules(tmp_path: Path) -> None:
    _, daily, planning, path = _case("FFS", tmp_path)
    ds = _strict_read(path)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == DEFORMABLE_REGISTRATION_STORAGE == ds.file_meta.MediaStorageSOPClassUID
    assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
    values = _ds_values(ds)
    assert len(values) > 30 and max(len(v) for v in values) <= 16
    # Patient, General Study (the daily study), Series, Frame of Reference
    assert ds.Modality == "REG"
    assert ds.StudyInstanceUID == daily.study_instance_uid
    assert ds.SeriesInstanceUID not in (daily.series_instance_uid, "")
    assert str(ds.PatientName) == PATIENT.patient_name and ds.PatientID == PATIENT.patient_id
    assert ds.PatientBirthDate == "19500101" and ds.StudyID == "S7"
    assert ds.FrameOfReferenceUID == daily.frame_of_reference_uid
    # Enhanced General Equipment, Content Identification
    for kw in ("Manufacturer", "ManufacturerModelName", "DeviceSerialNumber", "SoftwareVersions"):
        assert str(ds[kw].value), kw
    for kw in ("InstanceNumber", "ContentLabel", "ContentDate", "ContentTime"):
        assert str(ds[kw].value), kw
    assert "ContentDescription" in ds and "ContentCreatorName" in ds
    # Deformable Spatial Registration
    own, item = ds.DeformableRegistrationSequence
    assert own.SourceFrameOfReferenceUID == daily.frame_of_reference_uid
    assert "DeformableRegistrationGridSequence" not in own
    assert [r.ReferencedSOPInstanceUID for r in own.ReferencedImageSequence] == (
        daily.sop_instance_uids
    )
    assert item.SourceFrameOfReferenceUID == planning.frame_of_reference_uid
    assert [r.ReferencedSOPInstanceUID for r in item.ReferencedImageSequence] == (
        planning.sop_instance_uids
    )
    assert "RegistrationTypeCodeSequence" in own and "RegistrationTypeCodeSequence" in item
    # Common Instance Reference: daily in this study, planning in another one
    (same,) = ds.ReferencedSeriesSequence
    assert same.SeriesInstanceUID == daily.series_instance_uid
    assert [r.ReferencedSOPInstanceUID for r in same.ReferencedInstanceSequence] == (
        daily.sop_instance_uids
    )
    (other,) = ds.StudiesContainingOtherReferencedInstancesSequence
    assert other.StudyInstanceUID == planning.study_instance_uid
    (pser,) = other.ReferencedSeriesSequence
    assert pser.SeriesInstanceUID == planning.series_instance_uid
    assert len(pser.ReferencedInstanceSequence) == len(planning.sop_instance_uids)


def test_planning_in_the_same_study_is_listed_with_the_daily(
    tmp_path: Path, dciodvfy: Callable[[Path], tuple[list[str], str]]
) -> None:
    _, daily, planning, path = _case("HFS", tmp_path, same_study=True)
    ds = pydicom.dcmread(path)
    assert [s.SeriesInstanceUID for s in ds.ReferencedSeriesSequence] == [
        daily.series_instance_uid,
        planning.series_instance_uid,
    ]
    assert "StudiesContainingOtherReferencedInstancesSequence" not in ds
    errors, output = dciodvfy(path)
    assert errors == [], output


# ------------------------------------------------------------------------------ refused inputs
@pytest.fixture
def reg_file(tmp_path: Path) -> Path:
    return _case("HFS", tmp_path)[3]


def _edit(path: Path, edit: Callable[[pydicom.Dataset], None]) -> Path:
    ds = pydicom.dcmread(path)
    edit(ds)
    out = path.with_name("edited.dcm")
    ds.save_as(out)
    return out


def test_not_a_registration_is_refused(tmp_path: Path) -> None:
    ct = _ct(_grid(np.eye(3), shape=(2, 8, 8)))
    files = write_ct_series(ct, tmp_path / "ct")
    with pytest.raises(InvalidInput, match=r"not a Deformable Spatial Registration.*'CT'"):
        read_deformable_registration(files[0])
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(InvalidInput, match="not a DICOM file"):
        read_deformable_registration(text)
    with pytest.raises(InvalidInput, match="not found"):
        read_deformable_registration(tmp_path / "missing.dcm")


def test_rigid_registration_is_refused_with_a_hint(reg_file: Path) -> None:
    def rigid(ds: pydicom.Dataset) -> None:
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.66.1"

    with pytest.raises(InvalidInput, match="rigid Spatial Registration"):
        read_deformable_registration(_edit(reg_file, rigid))


def test_missing_deformable_registration_sequence_is_refused(reg_file: Path) -> None:
    def drop(ds: pydicom.Dataset) -> None:
        del ds.DeformableRegistrationSequence

    with pytest.raises(InvalidInput, match=r"no DeformableRegistrationSequence \(0064,0002\)"):
        read_deformable_registration(_edit(reg_file, drop))

    def no_grid(ds: pydicom.Dataset) -> None:
        del ds.DeformableRegistrationSequence[1].DeformableRegistrationGridSequence

    with pytest.raises(InvalidInput, match="no vector grid"):
        read_deformable_registration(_edit(reg_file, no_grid))


def test_vector_grid_data_of_the_wrong_length_is_refused(reg_file: Path) -> None:
    nz, ny, nx = SHAPE
    expected = 3 * nx * ny * nz * 4

    def shorten(ds: pydicom.Dataset) -> None:
        grid = ds.DeformableRegistrationSequence[1].DeformableRegistrationGridSequence[0]
        grid.VectorGridData = grid.VectorGridData[:-12]

    with pytest.raises(InvalidInput) as info:
        read_deformable_registration(_edit(reg_file, shorten))
    message = str(info.value)
    assert "VectorGridData" in message
    assert f"holds {expected - 12} bytes" in message and f"= {expected} bytes" in message


def test_non_orthonormal_orientation_is_refused(reg_file: Path) -> None:
    def skew(ds: pydicom.Dataset) -> None:
        grid = ds.DeformableRegistrationSequence[1].DeformableRegistrationGridSequence[0]
        grid.ImageOrientationPatient = [1, 0, 0, 0.3, 1, 0]

    with pytest.raises(InvalidInput, match="ImageOrientationPatient .* not orthonormal"):
        read_deformable_registration(_edit(reg_file, skew))


def test_bad_writer_inputs_are_refused(tmp_path: Path) -> None:
    g = _grid(np.eye(3))
    daily, planning = _ct(g), _ct(g)
    good = Volume(np.zeros((*g.shape, 3), np.float32), g)
    out = tmp_path / "r.dcm"
    with pytest.raises(InvalidInput, match=r"shape \(nz, ny, nx, 3\)"):
        write_deformable_registration(
            Volume(np.zeros(g.shape, np.float32), g), daily, planning, out
        )
    bad = good.array.copy()
    bad[1, 2, 3, 0] = np.nan
    with pytest.raises(InvalidInput, match="NaN or infinite"):
        write_deformable_registration(good.with_array(bad), daily, planning, out)
    elsewhere = Volume(good.array, g.with_frame(new_uid()))
    with pytest.raises(GeometryMismatch, match="daily CT's frame"):
        write_deformable_registration(elsewhere, daily, planning, out)
    with pytest.raises(InvalidInput, match="content_label"):
        write_deformable_registration(good, daily, planning, out, content_label="dvf-lower")
    with pytest.raises(InvalidInput, match=r"pre_deformation must be a finite \(4, 4\)"):
        write_deformable_registration(good, daily, planning, out, pre_deformation=np.eye(3))
    with pytest.raises(InvalidInput, match="last row"):
        write_deformable_registration(good, daily, planning, out, post_deformation=np.ones((4, 4)))
    no_frame = _ct(g)
    no_frame.volume = Volume(no_frame.volume.array, g.with_frame(None))
    with pytest.raises(InvalidInput, match="planning CT has no FrameOfReferenceUID"):
        write_deformable_registration(good, daily, no_frame, out)
    assert not out.exists()
