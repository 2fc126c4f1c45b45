"""The common head of every DICOM object the product derives from a CT series.

RTSTRUCT and Deformable Spatial Registration objects written for a CT share their file meta, SOP
Common, Patient, General Study, General Series, General Equipment and Frame of Reference
attributes: patient and study copied from the CT (invalid date/time/sex values written empty,
with a warning), a new series, this software as the equipment.
"""

from __future__ import annotations

import datetime as _dt
import re

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

import jrs
from jrs.io.series import CTSeries, new_uid

MANUFACTURER = "jrs"
_DA = re.compile(r"^\d{8}$")
_TM = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")


def clean_value(
    value: str, pattern: re.Pattern[str], what: str, source: str, warnings: list[str]
) -> str:
    """`value` when it matches the VR `pattern`, else "" with a warning naming the attribute."""
    v = (value or "").strip()
    if v and not pattern.match(v):
        warnings.append(f"{what} of the {source} is not a valid DICOM value; written empty")
        return ""
    return v


def start_derived_dataset(
    sop_class_uid: str,
    ct: CTSeries,
    *,
    modality: str,
    series_description: str,
    manufacturer_model_name: str,
    implementation_version_name: str,
    frame_of_reference_uid: str,
    series_instance_uid: str | None,
    warnings: list[str],
    source: str = "CT",
) -> tuple[Dataset, str, str]:
    """A new dataset with the modules every object derived from `ct` shares.

    Args:
        sop_class_uid: SOP Class UID of the new object.
        ct: the CT series the object belongs to (patient, study).
        modality: Modality of the new series (RTSTRUCT, REG).
        series_description: SeriesDescription.
        manufacturer_model_name: ManufacturerModelName.
        implementation_version_name: file meta ImplementationVersionName (<= 16 characters).
        frame_of_reference_uid: FrameOfReferenceUID of the new object.
        series_instance_uid: the new series' UID (a fresh one when None).
        warnings: list the problems found in the CT's values are appended to.
        source: how warnings name the CT ("CT", "daily CT").

    Returns:
        (dataset, creation date DA, creation time TM).
    """
    now = _dt.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    study_uid = ct.study_instance_uid
    if not study_uid:
        study_uid = new_uid()
        warnings.append(f"the {source} has no StudyInstanceUID; the {modality} starts a new study")
    sop_uid = new_uid()
    patient = ct.patient

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = implementation_version_name

    ds = Dataset()
    ds.file_meta = meta
    # SOP Common
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_uid
    # General Study
    ds.StudyDate = clean_value(patient.study_date, _DA, "StudyDate", source, warnings)
    ds.StudyTime = clean_value(patient.study_time, _TM, "StudyTime", source, warnings)
    ds.AccessionNumber = patient.accession_number
    ds.Modality = modality
    ds.Manufacturer = MANUFACTURER
    ds.ReferringPhysicianName = patient.referring_physician_name
    ds.StudyDescription = patient.study_description
    ds.SeriesDescription = series_description
    ds.ManufacturerModelName = manufacturer_model_name
    # Patient
    ds.PatientName = patient.patient_name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = clean_value(
        patient.patient_birth_date, _DA, "PatientBirthDate", source, warnings
    )
    sex = (patient.patient_sex or "").strip().upper()
    if sex not in ("", "M", "F", "O"):
        warnings.append(f"PatientSex of the {source} is not M, F or O; written empty")
        sex = ""
    ds.PatientSex = sex
    ds.SoftwareVersions = str(jrs.__version__)
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_instance_uid or new_uid()
    ds.StudyID = patient.study_id
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    # Frame of Reference
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SeriesDate = date
    ds.SeriesTime = time
    return ds, date, time
