"""RTSTRUCT write -> read -> rasterise round trips, validity of the files, and refused inputs."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from scipy.spatial import cKDTree

from jrs.core.errors import GeometryMismatch, InvalidInput
from jrs.core.geometry import PATIENT_POSITION_DIRECTIONS, Geometry, Volume
from jrs.core.labels import DEFAULT_COLORS
from jrs.core.metrics import centroid_mm, dice
from jrs.io.contours import mask_to_contours
from jrs.io.ct_writer import write_ct_series
from jrs.io.rtstruct import Roi, StructureSet, masks_from_files, read_rtstruct, rtstruct_to_masks
from jrs.io.rtstruct_writer import format_contour_data, write_rtstruct
from jrs.io.series import RT_STRUCTURE_SET_STORAGE, CTSeries, PatientInfo, new_uid

SPACING = (0.98, 0.98, 2.5)
SHAPE = (36, 100, 104)
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


def _grid(position: str, shape=SHAPE, spacing=SPACING) -> Geometry:
    """Grid of a pelvic CT centred on LPS (0, 0, 0), stored as `position` stores it."""
    d = PATIENT_POSITION_DIRECTIONS[position]
    size_xyz = np.array(shape[::-1], float)
    origin = -d @ (np.asarray(spacing) * (size_xyz - 1) / 2)
    return Geometry(shape, origin=origin, spacing=spacing, direction=d)


def _ct(position: str, shape=SHAPE) -> CTSeries:
    g = _grid(position, shape)
    return CTSeries.from_volume(
        Volume(np.zeros(g.shape, np.float32), g), patient=PATIENT, patient_position=position
    )


def _tube(p: np.ndarray, curve: np.ndarray, radius: float) -> np.ndarray:
    dist, _ = cKDTree(curve).query(p.reshape(-1, 3))
    return (dist < radius).reshape(p.shape[:-1])


def _organs(g: Geometry) -> dict[str, np.ndarray]:
    """Phantom-like pelvic organs in LPS mm (x: left, y: posterior, z: superior)."""
    p = g.voxel_centres()
    bladder = np.linalg.norm((p - [0, -12, 22]) / [24, 18, 16], axis=-1) < 1
    prostate = np.linalg.norm((p - [0, 2, -10]) / [17, 13, 14], axis=-1) < 1
    t = np.linspace(-1, 1, 400)[:, None]
    sv_curve = np.hstack([22 * t, 14 + 6 * t**2, 6 + 8 * t**2])  # thin curved tube
    seminal = _tube(p, sv_curve, 3.5)
    z = np.linspace(-40, 25, 300)[:, None]
    rectum_curve = np.hstack([0 * z, 28 + 0.002 * (z + 10) ** 2, z])
    rectum = _tube(p, rectum_curve, 10.0) & ~_tube(p, rectum_curve, 4.0)  # lumen = hole
    return {
        "Bladder": bladder,
        "Prostate": prostate,
        "SeminalVesicles": seminal,
        "Rectum": rectum,
    }


def _strict_read(path: Path) -> Dataset:
    old = pydicom.config.settings.reading_validation_mode
    pydicom.config.settings.reading_validation_mode = pydicom.config.RAISE
    try:
        ds = pydicom.dcmread(path)
        for elem in ds.iterall():
            _ = elem.value  # convert every value under strict validation
        return ds
    finally:
        pydicom.config.settings.reading_validation_mode = old


def _walk_ds(ds: Dataset) -> list[str]:
    values: list[str] = []
    for elem in ds.iterall():
        if elem.VR == "DS":
            vals = elem.value if elem.VM > 1 else [elem.value]
            values.extend(
                str(v.original_string if hasattr(v, "original_string") else v) for v in vals
            )
    return values


# ------------------------------------------------------------------------------ round trips
@pytest.fixture(scope="module", params=["HFS", "HFP", "FFS", "FFP"])
def written(
    request, tmp_path_factory
) -> tuple[str, CTSeries, dict[str, np.ndarray], Path, Dataset]:
    position = request.param
    ct = _ct(position)
    organs = _organs(ct.volume.geometry)
    path = tmp_path_factory.mktemp(position) / "rtstruct.dcm"
    ds = write_rtstruct({**organs, "Empty": np.zeros(ct.volume.geometry.shape, bool)}, ct, path)
    return position, ct, organs, path, ds


def test_round_trip_dice_and_centroid(written) -> None:
    position, ct, organs, path, _ = written
    masks = rtstruct_to_masks(read_rtstruct(path), ct)
    assert list(masks) == [*organs, "Empty"]
    g = ct.volume.geometry
    for name, mask in organs.items():
        back = masks[name]
        assert back.array.dtype == np.uint8 and set(np.unique(back.array)) <= {0, 1}
        assert back.geometry.same_grid(g)
        assert back.geometry.frame_of_reference_uid == ct.frame_of_reference_uid
        assert mask.sum() > 200, name
        assert dice(mask, back.array) >= 0.98, (position, name)
        err = float(np.linalg.norm(centroid_mm(mask, g) - centroid_mm(back.array, g)))
        assert err < 0.5, (position, name, err)
    assert not masks["Empty"].array.any()


def test_rectum_lumen_written_as_separate_hole_contours(written) -> None:
    _, ct, organs, path, _ = written
    ss = read_rtstruct(path)
    rectum = ss.roi("Rectum")
    g = ct.volume.geometry
    ks = [round(float(np.mean(g.physical_to_index(c)[:, 2]))) for c in rectum.contours]
    per_slice = np.bincount(ks)
    assert per_slice.max() == 2  # outer wall + lumen
    back = rtstruct_to_masks(ss, ct, roi_names=["Rectum"])["Rectum"].array
    k = int(np.argmax(per_slice))
    assert organs["Rectum"][k].sum() == back[k].sum()


def test_file_is_valid_dicom(written, dciodvfy) -> None:
    _, _, _, path, _ = written
    ds = _strict_read(path)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == RT_STRUCTURE_SET_STORAGE == ds.file_meta.MediaStorageSOPClassUID
    assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
    assert ds.Modality == "RTSTRUCT" and ds.SpecificCharacterSet
    values = _walk_ds(ds)
    assert len(values) > 1000
    assert max(len(v) for v in values) <= 16
    errors, output = dciodvfy(path)
    assert errors == [], output


def test_patient_study_and_references(written) -> None:
    _, ct, _, path, _ = written
    ds = pydicom.dcmread(path)
    assert ds.StudyInstanceUID == ct.study_instance_uid
    assert ds.SeriesInstanceUID not in (ct.series_instance_uid, "")
    assert str(ds.PatientName) == PATIENT.patient_name and ds.PatientID == PATIENT.patient_id
    assert ds.PatientBirthDate == "19500101" and ds.PatientSex == "M"
    assert (ds.StudyDate, ds.StudyTime, ds.StudyID) == ("20240301", "101500", "S7")
    assert ds.AccessionNumber == "ACC123" and str(ds.ReferringPhysicianName) == "Who^Doctor"
    assert ds.FrameOfReferenceUID == ct.frame_of_reference_uid
    fref = ds.ReferencedFrameOfReferenceSequence[0]
    assert fref.FrameOfReferenceUID == ct.frame_of_reference_uid
    series = fref.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == ct.series_instance_uid
    assert [i.ReferencedSOPInstanceUID for i in series.ContourImageSequence] == ct.sop_instance_uids
    g = ct.volume.geometry
    for roi in ds.StructureSetROISequence:
        assert roi.ReferencedFrameOfReferenceUID == ct.frame_of_reference_uid
        assert roi.ROIGenerationAlgorithm == "AUTOMATIC"
        assert roi.ROIGenerationDescription.startswith("jrs ")
    checked = 0
    for rc in ds.ROIContourSequence:
        for c in rc.get("ContourSequence", []):
            assert c.ContourGeometricType == "CLOSED_PLANAR"
            assert c.NumberOfContourPoints * 3 == len(c.ContourData)
            ref = c.ContourImageSequence[0]
            assert ref.ReferencedSOPClassUID == ct.sop_class_uid
            k = ct.sop_instance_uids.index(ref.ReferencedSOPInstanceUID)
            pts = np.array(c.ContourData, float).reshape(-1, 3)
            np.testing.assert_allclose(g.physical_to_index(pts)[:, 2], k, atol=1e-3)
            checked += 1
    assert checked > 50


def test_colours_and_interpreted_types(written) -> None:
    _, _, _, path, _ = written
    ss = read_rtstruct(path)
    by_name = {r.name: r for r in ss.rois}
    assert by_name["Bladder"].color == DEFAULT_COLORS["bladder"]
    assert by_name["Rectum"].color == DEFAULT_COLORS["rectum"]
    assert by_name["SeminalVesicles"].color == DEFAULT_COLORS["seminal_vesicles"]
    assert by_name["Prostate"].color == DEFAULT_COLORS["prostate"]
    assert by_name["Empty"].color is not None
    assert {r.interpreted_type for r in ss.rois} == {"ORGAN"}
    assert by_name["Empty"].contours == [] and any("'Empty'" in w for w in ss.warnings)


def test_interpreted_types_colours_and_options(tmp_path: Path) -> None:
    ct = _ct("HFS", shape=(6, 30, 32))
    m = np.zeros(ct.volume.geometry.shape, bool)
    m[2:4, 10:20, 10:20] = True
    names = ["BODY", "External_1", "PTV_70", "ctv prostate", "GTVp", "Femur_L", "Heart"]
    ds = write_rtstruct(
        {n: m for n in names},
        ct,
        tmp_path / "rt.dcm",
        colors={"Heart": (1, 2, 3)},
        interpreted_types={"Femur_L": "AVOIDANCE"},
        structure_set_label="ADAPT",
        series_instance_uid="1.2.3.4.5",
    )
    types = [o.RTROIInterpretedType for o in ds.RTROIObservationsSequence]
    assert types == ["EXTERNAL", "EXTERNAL", "PTV", "CTV", "GTV", "AVOIDANCE", "ORGAN"]
    ss = read_rtstruct(tmp_path / "rt.dcm")
    assert ss.roi("Heart").color == (1, 2, 3)
    assert ss.roi("ctv prostate").color == DEFAULT_COLORS["prostate"]
    assert ss.roi("BODY").color != ss.roi("Femur_L").color  # palette for non-organs
    assert ss.label == "ADAPT" and ss.series_instance_uid == "1.2.3.4.5"
    assert all(o.ROIInterpreter == "" for o in ds.RTROIObservationsSequence)


def test_format_contour_data_fits_16_chars() -> None:
    pts = np.array([[-123456.789123, 1e-20, -0.0], [3.14159265358979, -99999.99999, 1e7 / 3]])
    values = format_contour_data(pts)
    assert all(len(v) <= 16 for v in values)
    np.testing.assert_allclose(np.array(values, float), pts.reshape(-1), rtol=1e-6, atol=1e-6)
    assert values[2] == "0"


def test_write_refuses_bad_masks(tmp_path: Path) -> None:
    ct = _ct("HFS", shape=(4, 10, 12))
    with pytest.raises(GeometryMismatch, match=r"mask 'A' has shape \(4, 10, 11\)"):
        write_rtstruct({"A": np.zeros((4, 10, 11), bool)}, ct, tmp_path / "a.dcm")
    with pytest.raises(InvalidInput, match="at least one mask"):
        write_rtstruct({}, ct, tmp_path / "a.dcm")
    with pytest.raises(InvalidInput, match="ROI name"):
        write_rtstruct({"a\\b": np.zeros((4, 10, 12), bool)}, ct, tmp_path / "a.dcm")


def test_write_sanitises_invalid_header_values_from_the_ct(tmp_path: Path, dciodvfy) -> None:
    ct = _ct("HFS", shape=(4, 12, 12))
    ct.patient = PatientInfo(patient_birth_date="3f9a1c", patient_sex="d41d8cd9", study_time="xx")
    m = np.zeros(ct.volume.geometry.shape, bool)
    m[1:3, 3:8, 3:9] = True
    path = tmp_path / "rt.dcm"
    write_rtstruct({"Prostate": m}, ct, path)
    ds = _strict_read(path)
    assert ds.PatientBirthDate == "" and ds.PatientSex == "" and ds.StudyTime == ""
    errors, output = dciodvfy(path)
    assert errors == [], output


def test_write_and_read_time_512x512x100(tmp_path: Path) -> None:
    """4 organs on a 512 x 512 x 100 grid: writing and reading each take a few seconds at most."""
    import time

    g = Geometry((100, 512, 512), origin=[-250, -250, -125], spacing=[0.98, 0.98, 2.5])
    ct = CTSeries(
        volume=Volume(np.zeros(g.shape, np.uint8), g.with_frame(new_uid())),
        study_instance_uid=new_uid(),
        series_instance_uid=new_uid(),
        sop_instance_uids=[new_uid() for _ in range(100)],
    )
    small = _grid("HFS")
    organs = _organs(small)
    big = {}
    for name, m in organs.items():  # place the small-grid organs in the middle of the big grid
        arr = np.zeros(g.shape, bool)
        z0, y0, x0 = (np.array(g.shape) - np.array(m.shape)) // 2
        arr[z0 : z0 + m.shape[0], y0 : y0 + m.shape[1], x0 : x0 + m.shape[2]] = m
        big[name] = arr
    t0 = time.perf_counter()
    write_rtstruct(big, ct, tmp_path / "big.dcm")
    t1 = time.perf_counter()
    masks = rtstruct_to_masks(read_rtstruct(tmp_path / "big.dcm"), ct)
    t2 = time.perf_counter()
    logging.getLogger(__name__).info("write %.2f s, read+rasterise %.2f s", t1 - t0, t2 - t1)
    for name, m in big.items():
        np.testing.assert_array_equal(masks[name].array.astype(bool), m)
    assert t1 - t0 < 20 and t2 - t1 < 20


# ------------------------------------------------------------------------------ accepted quirks
@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[CTSeries, dict[str, np.ndarray], Path]:
    ct = _ct("HFS", shape=(12, 40, 44))
    g = ct.volume.geometry
    p = g.voxel_centres()
    outer = np.linalg.norm((p - [0, 0, 0]) / [14, 12, 11], axis=-1) < 1
    masks = {"Prostate": outer & ~(np.linalg.norm(p, axis=-1) < 5), "Bladder": outer}
    path = tmp_path_factory.mktemp("small") / "rt.dcm"
    write_rtstruct({**masks, "Empty": np.zeros(g.shape, bool)}, ct, path)
    return ct, masks, path


def _modified(src: Path, dst: Path, edit) -> Path:
    ds = pydicom.dcmread(src)
    edit(ds)
    ds.save_as(dst)
    return dst


@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # pydicom, when the test writes them
def test_clinical_quirks_are_accepted(small, tmp_path: Path) -> None:
    ct, masks, path = small

    def strip_links(ds: Dataset) -> None:
        ds.ReferencedFrameOfReferenceSequence = []  # link only per ROI and by geometry
        for rc in ds.ROIContourSequence:
            for c in rc.get("ContourSequence", []):
                del c.ContourImageSequence
        ds.PatientBirthDate = "hashed-birth-date"  # invalid for DA
        ds.PatientSex = "a94a8fe5ccb19ba6"  # invalid for CS (too long)
        ds.StudyDate = "2a2b"

    quirky = _modified(path, tmp_path / "quirky.dcm", strip_links)
    ss = read_rtstruct(quirky)
    assert ss.referenced_sop_instance_uids == set()
    assert ss.frame_of_reference_uids == [ct.frame_of_reference_uid]  # from the ROIs
    assert any("ReferencedFrameOfReferenceSequence is empty" in w for w in ss.warnings)
    out = rtstruct_to_masks(ss, ct)
    for name, m in masks.items():
        np.testing.assert_array_equal(out[name].array.astype(bool), m)


def test_non_closed_planar_and_short_contours_skipped_with_warning(
    small, tmp_path: Path, caplog
) -> None:
    ct, _, path = small

    def edit(ds: Dataset) -> None:
        seq = ds.ROIContourSequence[1].ContourSequence  # Bladder
        seq[0].ContourGeometricType = "POINT"
        seq[1].ContourGeometricType = "OPEN_PLANAR"
        seq[2].ContourData = seq[2].ContourData[:6]
        seq[2].NumberOfContourPoints = 2

    caplog.set_level(logging.WARNING, logger="jrs")
    ss = read_rtstruct(_modified(path, tmp_path / "q.dcm", edit))
    text = "\n".join(ss.warnings)
    assert "ROI 'Bladder': 1 POINT contour(s) skipped" in text
    assert "ROI 'Bladder': 1 OPEN_PLANAR contour(s) skipped" in text
    assert "fewer than 3 distinct points" in text
    assert "'Bladder'" in caplog.text
    assert PATIENT.patient_name not in caplog.text and PATIENT.patient_id not in caplog.text
    out = rtstruct_to_masks(ss, ct, roi_names=["Prostate"])
    assert list(out) == ["Prostate"]


def test_zero_contour_roi_gives_empty_mask_and_warning(small, caplog) -> None:
    ct, _, path = small
    caplog.set_level(logging.WARNING, logger="jrs")
    ss = read_rtstruct(path)
    out = rtstruct_to_masks(ss, ct, roi_names=["Empty"])
    assert not out["Empty"].array.any()
    assert any("'Empty'" in w and "no contours" in w for w in ss.warnings)
    assert "'Empty'" in caplog.text


# ------------------------------------------------------------------------------ refused inputs
def test_not_an_rtstruct(tmp_path: Path) -> None:
    ct = _ct("HFS", shape=(2, 8, 8))
    files = write_ct_series(ct, tmp_path / "ct")
    with pytest.raises(InvalidInput, match=r"not an RT Structure Set: Modality is 'CT'") as exc:
        read_rtstruct(files[0])
    assert "1.2.840.10008.5.1.4.1.1.2 (CT Image Storage)" in str(exc.value)
    assert str(files[0]) in str(exc.value)
    with pytest.raises(InvalidInput, match="not found"):
        read_rtstruct(tmp_path / "nothing.dcm")


def test_corrupt_files(small, tmp_path: Path) -> None:
    _, _, path = small
    data = path.read_bytes()
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"this is not DICOM at all " * 40)
    with pytest.raises(InvalidInput, match="junk.dcm: not a DICOM file"):
        read_rtstruct(junk)
    for frac in (0.1, 0.5, 0.97):
        cut = tmp_path / f"cut{frac}.dcm"
        cut.write_bytes(data[: int(len(data) * frac)])
        with pytest.raises(InvalidInput, match=f"cut{frac}.dcm: .*(corrupt|truncated|readable)"):
            read_rtstruct(cut)


def test_contour_data_not_multiple_of_3(small, tmp_path: Path) -> None:
    _, _, path = small

    def edit(ds: Dataset) -> None:
        c = ds.ROIContourSequence[0].ContourSequence[0]
        c.ContourData = c.ContourData[:-1]

    with pytest.raises(
        InvalidInput,
        match=r"ROI 'Prostate' contour #1: ContourData has \d+ values, not a multiple of 3",
    ):
        read_rtstruct(_modified(path, tmp_path / "m3.dcm", edit))


def test_contour_data_non_numeric(small, tmp_path: Path) -> None:
    _, _, path = small
    data = bytearray(path.read_bytes())
    tag = b"\x06\x30\x50\x00DS"  # (3006,0050) ContourData, explicit VR little endian
    at = data.index(tag) + 8
    data[at : at + 3] = b"abc"
    bad = tmp_path / "nan.dcm"
    bad.write_bytes(bytes(data))
    with pytest.raises(
        InvalidInput,
        match="nan.dcm: ROI 'Prostate' contour #1: ContourData holds a non-numeric value",
    ):
        read_rtstruct(bad)


def test_missing_structure_set_roi_sequence(small, tmp_path: Path) -> None:
    _, _, path = small

    def edit(ds: Dataset) -> None:
        del ds.StructureSetROISequence

    with pytest.raises(InvalidInput, match="no StructureSetROISequence"):
        read_rtstruct(_modified(path, tmp_path / "noroi.dcm", edit))


def test_frame_of_reference_mismatch_names_both_uids(small) -> None:
    ct, _, path = small
    other = CTSeries.from_volume(Volume(ct.volume.array, ct.volume.geometry.with_frame(new_uid())))
    other.sop_instance_uids = list(ct.sop_instance_uids)
    with pytest.raises(GeometryMismatch) as exc:
        rtstruct_to_masks(read_rtstruct(path), other)
    assert ct.frame_of_reference_uid in str(exc.value)
    assert other.frame_of_reference_uid in str(exc.value)


def test_references_images_of_another_series(small) -> None:
    ct, _, path = small
    other = CTSeries.from_volume(ct.volume)  # same frame of reference, other series and images
    assert other.frame_of_reference_uid == ct.frame_of_reference_uid
    with pytest.raises(GeometryMismatch, match="none of which is in") as exc:
        rtstruct_to_masks(read_rtstruct(path), other)
    assert ct.series_instance_uid in str(exc.value)
    assert other.series_instance_uid in str(exc.value)


def test_partially_missing_images(small) -> None:
    ct, masks, path = small
    g = ct.volume.geometry
    part_geometry = Geometry(
        (5, *g.shape[1:]), g.origin, g.spacing, g.direction, g.frame_of_reference_uid
    )
    part = CTSeries(
        volume=Volume(ct.volume.array[:5], part_geometry),
        study_instance_uid=ct.study_instance_uid,
        series_instance_uid=ct.series_instance_uid,
        sop_instance_uids=ct.sop_instance_uids[:5],
    )
    ss = read_rtstruct(path)
    with pytest.raises(
        GeometryMismatch,
        match=r"references 12 CT images, 7 of them are not in the CT series .*allow_partial=True / --allow-partial",
    ):
        rtstruct_to_masks(ss, part)
    out = rtstruct_to_masks(ss, part, allow_partial=True)
    for name, m in masks.items():
        np.testing.assert_array_equal(out[name].array.astype(bool), m[:5])
    assert any("7 of them are not in" in w for w in ss.warnings)
    assert any("do not fall on the CT grid" in w for w in ss.warnings)


def test_unknown_roi_name(small) -> None:
    ct, _, path = small
    with pytest.raises(
        InvalidInput,
        match=r"no ROI named 'Liver'; available ROIs: \['Prostate', 'Bladder', 'Empty'\]",
    ):
        rtstruct_to_masks(read_rtstruct(path), ct, roi_names=["Liver"])


def test_structure_set_in_memory_without_references(small) -> None:
    ct, masks, _ = small
    g = ct.volume.geometry
    roi_contours = [c.points for c in mask_to_contours(masks["Prostate"], g)]
    ss = StructureSet(
        rois=[
            Roi(
                number=1,
                name="P",
                contours=roi_contours,
                contour_image_uids=[[]] * len(roi_contours),
            ),
            Roi(number=2, name="Nothing"),
        ]
    )
    out = rtstruct_to_masks(ss, ct)
    np.testing.assert_array_equal(out["P"].array.astype(bool), masks["Prostate"])
    assert not out["Nothing"].array.any()
    assert ss.warnings == ["ROI 'Nothing' (number 2) has no contours; its mask is empty"]


# ------------------------------------------------------------------------------ real files
def test_real_rt_utils_frame_mismatch(shared_data: Path) -> None:
    folder = shared_data / "rt-edge-cases" / "rt-utils-mock"
    ss = read_rtstruct(folder / "rt.dcm")
    from jrs.io.ct import read_ct_series

    ct = read_ct_series(folder)
    with pytest.raises(GeometryMismatch) as exc:
        rtstruct_to_masks(ss, ct)
    assert "1.2.826.0.1.3680043.8.498.41321784967516118556817630335498661397" in str(exc.value)
    assert ct.frame_of_reference_uid in str(exc.value)
    with pytest.raises(GeometryMismatch, match=ct.frame_of_reference_uid):
        masks_from_files(folder, folder / "rt.dcm")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("invalid_reference_rt.dcm", "references 5 CT images, 3 of them are not in the CT series"),
        (
            "non_existent_reference_rt.dcm",
            "references 3 CT images, 1 of them is not in the CT series",
        ),
    ],
)
def test_real_rt_utils_missing_references(shared_data: Path, name: str, message: str) -> None:
    folder = shared_data / "rt-edge-cases" / "rt-utils-mock"
    with pytest.raises(GeometryMismatch, match=message):
        masks_from_files(folder, folder / name)
    ss, ct, masks = masks_from_files(folder, folder / name, allow_partial=True)
    assert ct.volume.geometry.shape == (2, 512, 512)
    assert len(masks) == 4 and all(m.array.any() for m in masks.values())
    assert any("do not fall on the CT grid" in w for w in ss.warnings)


def test_real_dicompyler_breast_single_slice(shared_data: Path) -> None:
    folder = shared_data / "rt-edge-cases" / "dicompyler-breast"
    ss = read_rtstruct(folder / "rtss.dcm")
    assert len(ss.rois) == 10 and ss.roi("Areola").contours == []
    assert ss.roi("BODY").interpreted_type == "EXTERNAL"
    with pytest.raises(
        GeometryMismatch, match="references 98 CT images, 97 of them are not in the CT series"
    ):
        masks_from_files(folder, folder / "rtss.dcm")
    ss, ct, masks = masks_from_files(folder, folder / "rtss.dcm", allow_partial=True)
    assert ct.volume.geometry.shape == (1, 512, 512)
    assert len(masks) == 10
    assert masks["BODY"].array.sum() > 10000  # the body outline crosses the one slice present
    assert not masks["Areola"].array.any()
    assert any("'Areola'" in w and "no contours" in w for w in ss.warnings)
