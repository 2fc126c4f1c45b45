"""In-memory description of a CT series: its voxels, geometry and the DICOM identity around them.

`CTSeries` is what the CT reader returns and what the RTSTRUCT/REG writers need: the volume plus
the UIDs of the study, series, frame of reference and of each slice, and the patient/study
attributes to copy into derived objects.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field

import numpy as np
from pydicom.uid import generate_uid

from jrs.core.errors import InvalidInput
from jrs.core.geometry import Volume

#: Our UID root (pydicom's generate_uid prefix is used when None).
UID_PREFIX: str | None = None

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
DEFORMABLE_REGISTRATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.3"


def new_uid() -> str:
    """A fresh, globally unique DICOM UID."""
    return str(generate_uid(prefix=UID_PREFIX))


@dataclass
class PatientInfo:
    """Patient and study attributes copied into every object derived from a series.

    Values are kept as DICOM strings; they are never logged.

    Attributes:
        patient_name: PatientName (PN).
        patient_id: PatientID (LO).
        patient_birth_date: PatientBirthDate (DA) or "".
        patient_sex: PatientSex ("M", "F", "O" or "").
        study_date: StudyDate (DA) or "".
        study_time: StudyTime (TM) or "".
        study_id: StudyID (SH).
        accession_number: AccessionNumber (SH).
        referring_physician_name: ReferringPhysicianName (PN).
        study_description: StudyDescription (LO).
    """

    patient_name: str = "Anonymous^Phantom"
    patient_id: str = "PHANTOM"
    patient_birth_date: str = ""
    patient_sex: str = "M"
    study_date: str = field(default_factory=lambda: _dt.date.today().strftime("%Y%m%d"))
    study_time: str = field(default_factory=lambda: _dt.datetime.now().strftime("%H%M%S"))
    study_id: str = "1"
    accession_number: str = ""
    referring_physician_name: str = ""
    study_description: str = ""


@dataclass
class CTSeries:
    """A CT series read from (or written to) DICOM.

    Attributes:
        volume: Hounsfield units, float32, (nz, ny, nx), with LPS geometry whose
            ``frame_of_reference_uid`` is the series' FrameOfReferenceUID. Slice k of the array is
            the image whose SOP Instance UID is ``sop_instance_uids[k]``.
        study_instance_uid: StudyInstanceUID ("" when the files carry none).
        series_instance_uid: SeriesInstanceUID ("" when the files carry none).
        sop_instance_uids: one per slice, in array (k) order.
        sop_class_uid: SOPClassUID of the slices (CT Image Storage).
        patient: patient/study attributes to copy into derived objects.
        patient_position: DICOM PatientPosition (HFS, HFP, FFS, FFP, ...).
        series_description: SeriesDescription.
        files: source file per slice (empty for a series built in memory).
        warnings: non-fatal problems found while reading (shown to the user, never patient data).
    """

    volume: Volume
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uids: list[str]
    sop_class_uid: str = CT_IMAGE_STORAGE
    patient: PatientInfo = field(default_factory=PatientInfo)
    patient_position: str = "HFS"
    series_description: str = ""
    files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        nz = self.volume.geometry.shape[0]
        if len(self.sop_instance_uids) != nz:
            raise InvalidInput(
                f"CT series has {nz} slices but {len(self.sop_instance_uids)} SOP Instance UIDs"
            )

    @property
    def frame_of_reference_uid(self) -> str:
        """FrameOfReferenceUID of the series ("" when unknown)."""
        return self.volume.geometry.frame_of_reference_uid or ""

    @classmethod
    def from_volume(
        cls,
        volume: Volume,
        *,
        patient: PatientInfo | None = None,
        patient_position: str = "HFS",
        study_instance_uid: str | None = None,
        series_description: str = "",
    ) -> CTSeries:
        """Give an in-memory HU volume a fresh DICOM identity (new series, slice and frame UIDs).

        Args:
            volume: HU volume (nz, ny, nx); its frame of reference UID is kept when set.
            patient: patient/study attributes (defaults to an anonymous phantom).
            patient_position: DICOM PatientPosition.
            study_instance_uid: join an existing study; a new one otherwise.
            series_description: SeriesDescription.

        Returns:
            The series (no files written).
        """
        frame = volume.geometry.frame_of_reference_uid or new_uid()
        vol = Volume(np.asarray(volume.array, dtype=np.float32), volume.geometry.with_frame(frame))
        return cls(
            volume=vol,
            study_instance_uid=study_instance_uid or new_uid(),
            series_instance_uid=new_uid(),
            sop_instance_uids=[new_uid() for _ in range(vol.geometry.shape[0])],
            patient=patient or PatientInfo(),
            patient_position=patient_position,
            series_description=series_description,
        )
