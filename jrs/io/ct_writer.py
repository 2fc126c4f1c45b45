"""Writing a CT series: one CT Image Storage file per slice, HU stored as int16 with a rescale.

Decimal strings are formatted once (`format_ds`), text that needs it is written as UTF-8, and the
geometry (LPS, mm) goes into the position, orientation and spacing attributes.
"""

from __future__ import annotations

import datetime as _dt
import logging
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

from jrs.core.errors import InvalidInput
from jrs.core.geometry import Volume
from jrs.io.series import CT_IMAGE_STORAGE, CTSeries, new_uid

logger = logging.getLogger(__name__)

_INT16_MIN = -32768
_INT16_MAX = 32767


#: Manufacturer written into General Equipment.
MANUFACTURER = "jrs"


#: Model name written into General Equipment.
MANUFACTURER_MODEL_NAME = "jrs CT writer"


# ---------------------------------------------------------------------------------- formatting
def format_ds(value: float) -> str:
    """Format a number as a DICOM Decimal String of at most 16 characters.

    The most significant digits that fit are kept (``.15g`` down to ``.1g``); values within 1e-12
    of zero are written as ``"0"`` so that direction cosines carry no ``e-17`` noise.

    Args:
        value: a finite number.

    Returns:
        The DS text (at most 16 characters).

    Raises:
        InvalidInput: when the value is not finite or cannot be written in 16 characters.
    """
    v = float(value)
    if not np.isfinite(v):
        raise InvalidInput(f"cannot write {value!r} as a DICOM DS value: it must be finite")
    if abs(v) < 1e-12:
        return "0"
    for digits in range(15, 0, -1):
        text = f"{v:.{digits}g}"
        if len(text) <= 16:
            return text
    raise InvalidInput(f"cannot write {value!r} as a DICOM DS value of at most 16 characters")


def ds_list(values: npt.ArrayLike) -> list[str]:
    """`format_ds` of each value (a DICOM DS multi-value)."""
    return [format_ds(v) for v in np.asarray(values, dtype=np.float64).reshape(-1)]


def hu_to_stored(hu: npt.ArrayLike) -> npt.NDArray[np.int16]:
    """Convert Hounsfield units to the stored int16 pixel values written (slope 1, intercept 0).

    Rounding rule: to the nearest integer, halves to even (``numpy.rint``); then clipped to the
    int16 range [-32768, 32767]. NaN becomes -1024 (air).

    Args:
        hu: HU values, any shape.

    Returns:
        int16 array of the same shape.
    """
    arr = np.asarray(hu, dtype=np.float32)
    arr = np.nan_to_num(arr, nan=-1024.0, posinf=_INT16_MAX, neginf=_INT16_MIN)
    return np.clip(np.rint(arr), _INT16_MIN, _INT16_MAX).astype(np.int16)


def _needs_utf8(*texts: str) -> bool:
    return any(not t.isascii() for t in texts)


# ---------------------------------------------------------------------------------- writing
def write_ct_series(
    series: CTSeries, out_dir: Path | str, *, file_prefix: str = "CT"
) -> list[Path]:
    """Write a CT series as one CT Image Storage file per slice.

    Files are named ``<file_prefix>.0001.dcm``, ... in slice (k) order, encoded Explicit VR
    Little Endian with a file meta header. Pixels are int16 with RescaleSlope 1 and
    RescaleIntercept 0 (see `hu_to_stored` for the rounding and clipping rule). Slice k is placed
    at ``origin + direction[:, 2] * spacing_z * k`` with ImageOrientationPatient taken from
    direction columns 0 (row direction, along i/x) and 1 (column direction, along j/y), so any
    direction, oblique included, is written faithfully. ``series.files`` is set to the written
    paths.

    Args:
        series: the series; ``series.volume.array`` holds HU, shape (nz, ny, nx).
        out_dir: folder to write into (created when missing; files of the same name are replaced).
        file_prefix: start of each file name.

    Returns:
        The written paths, one per slice, in k order.

    Raises:
        InvalidInput: when the volume is not scalar or a geometry value cannot be encoded.
    """
    volume = series.volume
    if volume.is_vector:
        raise InvalidInput(
            f"a CT series needs a scalar (nz, ny, nx) volume, got shape {volume.array.shape}"
        )
    geometry = volume.geometry
    nz, ny, nx = geometry.shape
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    stored = hu_to_stored(volume.array)
    direction = geometry.direction
    row_dir, col_dir, slice_dir = direction[:, 0], direction[:, 1], direction[:, 2]
    normal = np.cross(row_dir, col_dir)
    iop = ds_list(np.concatenate([row_dir, col_dir]))
    pixel_spacing = ds_list([geometry.spacing[1], geometry.spacing[0]])
    slice_thickness = format_ds(geometry.spacing[2])
    positions = geometry.origin[None, :] + np.arange(nz)[:, None] * (
        slice_dir * geometry.spacing[2]
    )

    patient = series.patient
    now = _dt.datetime.now()
    content_date, content_time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    utf8 = _needs_utf8(
        patient.patient_name,
        patient.patient_id,
        patient.referring_physician_name,
        patient.study_description,
        series.series_description,
    )
    width = max(4, len(str(nz)))
    frame_uid = series.frame_of_reference_uid
    if not frame_uid:
        frame_uid = new_uid()
        series.volume = Volume(volume.array, geometry.with_frame(frame_uid))

    paths: list[Path] = []
    for k in range(nz):
        sop_uid = series.sop_instance_uids[k]
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = UID(series.sop_class_uid or CT_IMAGE_STORAGE)
        meta.MediaStorageSOPInstanceUID = UID(sop_uid)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "JRS_CT_1"

        ds = Dataset()
        ds.file_meta = meta
        # SOP Common
        if utf8:
            ds.SpecificCharacterSet = "ISO_IR 192"
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = sop_uid
        ds.InstanceCreationDate = content_date
        ds.InstanceCreationTime = content_time
        # General Study
        ds.StudyDate = patient.study_date
        ds.StudyTime = patient.study_time
        ds.AccessionNumber = patient.accession_number
        ds.ReferringPhysicianName = patient.referring_physician_name
        ds.StudyDescription = patient.study_description
        ds.StudyInstanceUID = series.study_instance_uid
        ds.StudyID = patient.study_id
        # General Series
        ds.Modality = "CT"
        ds.SeriesDescription = series.series_description
        ds.SeriesInstanceUID = series.series_instance_uid
        ds.SeriesNumber = 1
        ds.PatientPosition = series.patient_position
        ds.Laterality = ""  # Type 2C: unknown / not a paired structure
        # Patient
        ds.PatientName = patient.patient_name
        ds.PatientID = patient.patient_id
        ds.PatientBirthDate = patient.patient_birth_date
        ds.PatientSex = patient.patient_sex
        # General Equipment
        ds.Manufacturer = MANUFACTURER
        ds.ManufacturerModelName = MANUFACTURER_MODEL_NAME
        ds.SoftwareVersions = "1"
        # Frame of Reference
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        # General Image / General Acquisition / CT Image
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = k + 1
        ds.AcquisitionNumber = 1
        ds.ContentDate = content_date
        ds.ContentTime = content_time
        ds.KVP = "120"
        # Image Plane
        ds.PixelSpacing = pixel_spacing
        ds.ImageOrientationPatient = iop
        ds.ImagePositionPatient = ds_list(positions[k])
        ds.SliceThickness = slice_thickness
        ds.SliceLocation = format_ds(float(positions[k] @ normal))
        # Image Pixel
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ny
        ds.Columns = nx
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.PixelData = stored[k].astype("<i2", copy=False).tobytes()
        ds["PixelData"].VR = "OW"

        path = out / f"{file_prefix}.{k + 1:0{width}d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)

    series.files = [str(p) for p in paths]
    # no path in the log: folder names often carry patient names or IDs
    logger.info("wrote CT series of %d slices (%d x %d)", nz, ny, nx)
    return paths
