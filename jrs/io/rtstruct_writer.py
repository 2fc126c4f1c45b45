"""Writing an RTSTRUCT for a CT series: one ROI per mask, planar contours per slice.

ROI names are checked, colours come from the caller or the default palette, interpreted types
from the names (``ORGAN``, ``PTV``, ``EXTERNAL``, ...); the structure set references the CT's
study, series and every image.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence

import jrs
from jrs.core.errors import GeometryMismatch, InvalidInput
from jrs.core.geometry import Geometry, Volume
from jrs.core.labels import DEFAULT_COLORS, SynonymTable
from jrs.io.contours import mask_to_contours
from jrs.io.derived import start_derived_dataset
from jrs.io.rtstruct import CONTOUR_DATA_TAG
from jrs.io.series import (
    RT_STRUCTURE_SET_STORAGE,
    CTSeries,
    new_uid,
)

logger = logging.getLogger(__name__)


#: Manufacturer written into General Equipment.
#: ReferencedSOPClassUID of the RT Referenced Study Sequence (Detached Study Management, the
#: value every TPS writes and expects).
STUDY_REFERENCE_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"


#: Colours for ROIs that are not one of the four organs, used in order.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 255, 0),
    (0, 0, 255),
    (255, 0, 255),
    (0, 255, 255),
    (255, 128, 0),
    (128, 0, 255),
    (0, 128, 0),
    (255, 192, 203),
    (128, 128, 0),
    (0, 128, 128),
)


_EXTERNAL_NAMES = {"body", "external", "outline", "skin", "patient", "body_contour"}


def interpreted_type_for(name: str) -> str:
    """Default RTROIInterpretedType for a ROI name.

    EXTERNAL for body/external names, GTV/CTV/PTV for names starting with those letters, ORGAN
    otherwise.
    """
    norm = re.sub(r"[\s_\-]+", "_", name.strip().lower())
    if norm in _EXTERNAL_NAMES or norm.startswith(("body", "external")):
        return "EXTERNAL"
    for prefix in ("GTV", "CTV", "PTV"):
        if norm.upper().startswith(prefix):
            return prefix
    return "ORGAN"


def format_contour_data(points: npt.ArrayLike) -> list[str]:
    """Format LPS coordinates as DICOM DS strings of at most 16 characters (7 significant digits).

    Args:
        points: (N, 3) coordinates in mm.

    Returns:
        3N strings x1, y1, z1, x2, ...
    """
    flat = np.asarray(points, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(flat)):
        raise InvalidInput("contour coordinates must be finite numbers (mm)")
    out = [f"{v:.7g}" for v in flat.tolist()]
    return ["0" if t == "-0" else t for t in out]


def _default_color(name: str, table: SynonymTable, used_palette: list[int]) -> tuple[int, int, int]:
    organ = table.organ_of(name)
    if organ is not None and organ in DEFAULT_COLORS:
        return DEFAULT_COLORS[organ]
    colour = PALETTE[len(used_palette) % len(PALETTE)]
    used_palette.append(1)
    return colour


def _nonzero(arr: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
    """``arr != 0`` as a boolean mask, compared inside the non-zero bounding box only.

    A 0/1 ``uint8`` mask is viewed as boolean without a copy. Otherwise a whole-CT mask is mostly
    zeros: for unsigned integer masks the bounding box comes from cheap reductions (max), and only
    the box is compared (50 ms -> a few ms for a 512 x 512 x 137 mask).

    Args:
        arr: (nz, ny, nx) mask, non-zero inside.

    Returns:
        (nz, ny, nx) boolean mask.
    """
    if arr.dtype == np.bool_:
        return arr
    if arr.dtype == np.uint8 and arr.size and int(arr.max()) <= 1:
        return arr.view(np.bool_)  # 0/1 bytes are already a boolean mask: no copy
    if arr.dtype.kind != "u" or arr.ndim != 3 or arr.size == 0:
        return np.asarray(arr != 0)
    per_slice = arr.reshape(arr.shape[0], -1).max(axis=1)
    zs = np.flatnonzero(per_slice)
    out = np.zeros(arr.shape, dtype=bool)
    if zs.size == 0:
        return out
    k0, k1 = int(zs[0]), int(zs[-1]) + 1
    slab = arr[k0:k1]
    ys = np.flatnonzero(slab.max(axis=(0, 2)))
    xs = np.flatnonzero(slab.max(axis=(0, 1)))
    box = (slice(k0, k1), slice(int(ys[0]), int(ys[-1]) + 1), slice(int(xs[0]), int(xs[-1]) + 1))
    out[box] = arr[box] != 0
    return out


def write_rtstruct(
    masks: Mapping[str, npt.ArrayLike | Volume],
    ct: CTSeries,
    path: str | Path,
    *,
    colors: Mapping[str, tuple[int, int, int]] | None = None,
    interpreted_types: Mapping[str, str] | None = None,
    structure_set_label: str = "JRS",
    series_description: str = "jrs auto-contours",
    algorithm_name: str = "jrs",
    algorithm_version: str = jrs.__version__,
    series_instance_uid: str | None = None,
) -> Dataset:
    """Write binary masks on a CT grid as an RTSTRUCT file.

    Every mandatory module of the RT Structure Set IOD is written: Patient, General Study (same
    StudyInstanceUID and patient/study attributes as the CT), RT Series (new series), General
    Equipment, Frame of Reference, Structure Set (references every CT slice), ROI Contour (one
    CLOSED_PLANAR contour per outer boundary and per hole, each referencing its CT slice), RT ROI
    Observations and SOP Common. The file is Explicit VR Little Endian with file meta; every DS
    value fits in 16 characters.

    Args:
        masks: ROI name -> (nz, ny, nx) mask on the CT grid (non-zero inside), or a `Volume` on
            the CT grid. Empty masks give a ROI without contours.
        ct: the CT series the masks lie on.
        path: the file to write (parent folders are created).
        colors: ROI name -> (R, G, B) 0..255; defaults to the organ colours of
            `jrs.core.labels.DEFAULT_COLORS` (via the synonym table), else a fixed palette.
        interpreted_types: ROI name -> RTROIInterpretedType; defaults to `interpreted_type_for`.
        structure_set_label: StructureSetLabel (at most 16 characters).
        series_description: SeriesDescription.
        algorithm_name: ROIGenerationDescription names it (with the version).
        algorithm_version: version of the algorithm.
        series_instance_uid: SeriesInstanceUID of the RTSTRUCT (new when None).

    Returns:
        The written dataset.

    Raises:
        GeometryMismatch: a mask is not on the CT grid.
        InvalidInput: no masks, an empty or too long ROI name, a bad colour or label.
    """
    if not masks:
        raise InvalidInput("write_rtstruct needs at least one mask (ROI name -> mask)")
    if not structure_set_label or len(structure_set_label) > 16:
        raise InvalidInput(
            f"structure_set_label must be 1 to 16 characters, got {structure_set_label!r}"
        )
    geometry = ct.volume.geometry
    arrays = _checked_masks(masks, geometry)

    warnings: list[str] = []
    frame_uid = ct.frame_of_reference_uid
    if not frame_uid:
        frame_uid = new_uid()
        warnings.append("the CT has no FrameOfReferenceUID; a new one was written")
    ds, date, time = start_derived_dataset(
        RT_STRUCTURE_SET_STORAGE,
        ct,
        modality="RTSTRUCT",
        series_description=series_description,
        manufacturer_model_name="jrs RTSTRUCT writer",
        implementation_version_name="JRS_RTSS_1",
        frame_of_reference_uid=frame_uid,
        series_instance_uid=series_instance_uid,
        warnings=warnings,
    )
    ds.OperatorsName = ""
    study_uid = str(ds.StudyInstanceUID)
    # Structure Set
    ds.StructureSetLabel = structure_set_label
    ds.StructureSetName = structure_set_label
    ds.StructureSetDate = date
    ds.StructureSetTime = time

    ct_class = ct.sop_class_uid

    def image_ref(k: int) -> Dataset:
        item = Dataset()
        item.ReferencedSOPClassUID = ct_class
        item.ReferencedSOPInstanceUID = ct.sop_instance_uids[k]
        return item

    ds.ReferencedFrameOfReferenceSequence = DicomSequence(
        [_referenced_frame(ct, frame_uid, study_uid, image_ref, warnings)]
    )

    table = SynonymTable()
    palette_used: list[int] = []
    roi_items, contour_items, obs_items = [], [], []
    description = f"{algorithm_name} {algorithm_version}"[:64]
    for number, (name, arr) in enumerate(arrays.items(), start=1):
        roi_item = Dataset()
        roi_item.ROINumber = number
        roi_item.ReferencedFrameOfReferenceUID = frame_uid
        roi_item.ROIName = name
        roi_item.ROIGenerationAlgorithm = "AUTOMATIC"
        roi_item.ROIGenerationDescription = description
        roi_items.append(roi_item)

        colour = (colors or {}).get(name) or _default_color(name, table, palette_used)
        if len(colour) != 3 or not all(0 <= int(c) <= 255 for c in colour):
            raise InvalidInput(f"colour of ROI {name!r} must be 3 integers 0..255, got {colour}")
        rc, n_contours = _roi_contour(number, arr, geometry, colour, image_ref)
        contour_items.append(rc)

        kind = (interpreted_types or {}).get(name) or interpreted_type_for(name)
        obs = Dataset()
        obs.ObservationNumber = number
        obs.ReferencedROINumber = number
        obs.ROIObservationLabel = name[:16]
        obs.RTROIInterpretedType = kind
        obs.ROIInterpreter = ""
        obs_items.append(obs)
        logger.debug("ROI %r: %d contours", name, n_contours)

    ds.StructureSetROISequence = DicomSequence(roi_items)
    ds.ROIContourSequence = DicomSequence(contour_items)
    ds.RTROIObservationsSequence = DicomSequence(obs_items)

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    for w in warnings:
        logger.warning("RTSTRUCT written: %s", w)
    logger.info("wrote RTSTRUCT with %d ROIs", len(arrays))
    return ds


def _checked_masks(
    masks: Mapping[str, npt.ArrayLike | Volume], geometry: Geometry
) -> dict[str, npt.NDArray[np.bool_]]:
    """The masks as boolean arrays on the CT grid, their names checked.

    Raises:
        InvalidInput: a ROI name that is empty, longer than 64 characters or has a backslash.
        GeometryMismatch: a mask not on the CT's grid.
    """
    arrays: dict[str, npt.NDArray[np.bool_]] = {}
    for name, mask in masks.items():
        if not name or not name.strip() or len(name) > 64 or "\\" in name:
            raise InvalidInput(
                f"ROI name {name!r} is not valid: 1 to 64 characters without backslash"
            )
        if isinstance(mask, Volume):
            mask.geometry.require_same_grid(geometry, f"mask {name!r} and the CT")
            arr = np.asarray(mask.array)
        else:
            arr = np.asarray(mask)
        if arr.shape != geometry.shape:
            raise GeometryMismatch(
                f"mask {name!r} has shape {arr.shape}, the CT grid is {geometry.shape} (nz, ny, nx)"
            )
        arrays[name] = _nonzero(arr)
    return arrays


def _referenced_frame(
    ct: CTSeries,
    frame_uid: str,
    study_uid: str,
    image_ref: Callable[[int], Dataset],
    warnings: list[str],
) -> Dataset:
    """The Referenced Frame of Reference item: the frame, and the CT's study, series and images."""
    fref = Dataset()
    fref.FrameOfReferenceUID = frame_uid
    if ct.series_instance_uid:
        series_item = Dataset()
        series_item.SeriesInstanceUID = ct.series_instance_uid
        series_item.ContourImageSequence = DicomSequence(
            [image_ref(k) for k in range(ct.volume.geometry.shape[0])]
        )
        study_item = Dataset()
        study_item.ReferencedSOPClassUID = STUDY_REFERENCE_SOP_CLASS
        study_item.ReferencedSOPInstanceUID = study_uid
        study_item.RTReferencedSeriesSequence = DicomSequence([series_item])
        fref.RTReferencedStudySequence = DicomSequence([study_item])
    else:
        warnings.append("the CT has no SeriesInstanceUID; the RTSTRUCT does not list the CT images")
    return fref


def _roi_contour(
    number: int,
    arr: npt.NDArray[np.bool_],
    geometry: Geometry,
    colour: Sequence[int],
    image_ref: Callable[[int], Dataset],
) -> tuple[Dataset, int]:
    """The ROI Contour item of one mask (planar contours per slice) and its contour count."""
    rc = Dataset()
    rc.ROIDisplayColor = [int(c) for c in colour]
    contours = mask_to_contours(arr, geometry)
    items = []
    for n, contour in enumerate(contours, start=1):
        c = Dataset()
        c.ContourNumber = n
        c.ContourImageSequence = DicomSequence([image_ref(contour.slice_index)])
        c.ContourGeometricType = "CLOSED_PLANAR"
        c.NumberOfContourPoints = len(contour.points)
        # the strings are already valid DS: skip pydicom's per-value conversion (seconds for a
        # large structure set); they are written as they are
        c.add(
            DataElement(
                CONTOUR_DATA_TAG,
                "DS",
                MultiValue(str, format_contour_data(contour.points)),
                already_converted=True,
            )
        )
        items.append(c)
    if items:
        rc.ContourSequence = DicomSequence(items)
    rc.ReferencedROINumber = number
    return rc, len(contours)
