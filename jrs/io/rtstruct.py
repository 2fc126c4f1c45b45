"""RT Structure Set (RTSTRUCT): read one, rasterise its ROIs on a CT grid, write one from masks.

Reading accepts what real clinical files do (empty top-level ReferencedFrameOfReferenceSequence,
contours without ContourImageSequence, header values invalid for their VR, ROIs without contours,
several contours on one slice, POINT/OPEN_PLANAR contours) and rejects clearly what cannot be used
(not an RTSTRUCT, corrupt file, malformed ContourData). Rasterising checks that the structure set
belongs to the CT (frame of reference, referenced images) before any voxel is filled;
`masks_from_files` does so from the CT headers before any pixel is read. Writing
produces every mandatory module of the RT Structure Set IOD, one CLOSED_PLANAR contour per outer
boundary or hole, each referencing its CT slice.

Patient names and IDs are never logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

from jrs.core.errors import GeometryMismatch, InvalidInput
from jrs.core.geometry import Geometry, Volume
from jrs.io.contours import RasterReport, contours_to_mask
from jrs.io.ct import patient_info, read_ct_series
from jrs.io.dataset import parse_object, text
from jrs.io.series import (
    CT_IMAGE_STORAGE,
    RT_STRUCTURE_SET_STORAGE,
    CTSeries,
)

logger = logging.getLogger(__name__)


CONTOUR_DATA_TAG = 0x30060050
_KNOWN_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.481.2": "RT Dose Storage",
    "1.2.840.10008.5.1.4.1.1.481.5": "RT Plan Storage",
    "1.2.840.10008.5.1.4.1.1.66.3": "Deformable Spatial Registration Storage",
    RT_STRUCTURE_SET_STORAGE: "RT Structure Set Storage",
}


# ------------------------------------------------------------------------------ data model
@dataclass(eq=False)
class Roi:
    """One region of interest of a structure set.

    Attributes:
        number: ROINumber.
        name: ROIName.
        color: ROIDisplayColor (R, G, B) 0..255, or None when absent.
        interpreted_type: RTROIInterpretedType ("" when absent).
        generation_algorithm: ROIGenerationAlgorithm ("" when absent).
        contours: CLOSED_PLANAR polygons, each (N, 3) LPS points in mm, N >= 3.
        contour_image_uids: per contour, the referenced SOP Instance UIDs (may be empty).
        referenced_frame_of_reference_uid: ReferencedFrameOfReferenceUID ("" when absent).
    """

    number: int
    name: str
    color: tuple[int, int, int] | None = None
    interpreted_type: str = ""
    generation_algorithm: str = ""
    contours: list[npt.NDArray[np.float64]] = field(default_factory=list)
    contour_image_uids: list[list[str]] = field(default_factory=list)
    referenced_frame_of_reference_uid: str = ""


@dataclass(eq=False)
class StructureSet:
    """The content of an RTSTRUCT file that matters for rasterising it.

    Attributes:
        rois: ROIs in StructureSetROISequence order.
        frame_of_reference_uids: non-empty frame of reference UIDs found (top level and per ROI),
            without duplicates, in order of appearance.
        referenced_series_uids: SeriesInstanceUIDs of the RT Referenced Series Sequence.
        referenced_sop_instance_uids: every image the file references (top-level
            ContourImageSequence and per-contour ContourImageSequence).
        study_instance_uid: StudyInstanceUID of the RTSTRUCT ("" when absent).
        path: the file read (None for a structure set built in memory).
        label: StructureSetLabel.
        series_instance_uid: SeriesInstanceUID of the RTSTRUCT.
        sop_instance_uid: SOPInstanceUID of the RTSTRUCT.
        warnings: non-fatal problems found while reading or rasterising (no patient data).
    """

    rois: list[Roi]
    frame_of_reference_uids: list[str] = field(default_factory=list)
    referenced_series_uids: list[str] = field(default_factory=list)
    referenced_sop_instance_uids: set[str] = field(default_factory=set)
    study_instance_uid: str = ""
    path: Path | None = None
    label: str = ""
    series_instance_uid: str = ""
    sop_instance_uid: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def roi_names(self) -> list[str]:
        """ROI names in file order."""
        return [r.name for r in self.rois]

    def roi(self, name: str) -> Roi:
        """The ROI called `name`.

        Raises:
            InvalidInput: when no ROI has that name (the message lists the available names).
        """
        for r in self.rois:
            if r.name == name:
                return r
        raise InvalidInput(
            f"{self._where()}no ROI named {name!r}; available ROIs: {self.roi_names}"
        )

    def _where(self) -> str:
        return f"{self.path}: " if self.path is not None else ""

    def _warn(self, message: str) -> None:
        if message in self.warnings:  # said once (e.g. at reading) is enough
            return
        self.warnings.append(message)
        # no path in the log: folder names often carry patient names or IDs (the message kept
        # in ``warnings`` and errors raised to the user name the file they gave)
        logger.warning("RTSTRUCT: %s", message)


# ------------------------------------------------------------------------------ reading
def _contour_points(item: Dataset) -> npt.NDArray[np.float64]:
    """ContourData of one contour item as a flat float array (raw text parsed in bulk).

    Raises:
        ValueError: when a value is not a number.
    """
    elem = item.get_item(CONTOUR_DATA_TAG)
    if elem is None:
        return np.zeros(0)
    value = elem.value
    if isinstance(elem, RawDataElement) and isinstance(value, bytes | bytearray):
        text = value.decode("ascii", errors="replace").strip(" \x00")
        if not text:
            return np.zeros(0)
        return np.array([v.strip() for v in text.split("\\")], dtype=np.float64)
    if value is None or value == "":
        return np.zeros(0)
    if isinstance(value, str | float | int):
        value = [value]
    return np.array([float(v) for v in value], dtype=np.float64)


def _color(item: Dataset) -> tuple[int, int, int] | None:
    try:
        value = item.get("ROIDisplayColor")
        if value is None or len(value) != 3:
            return None
        r, g, b = (int(float(v)) for v in value)
        return (r, g, b)
    except Exception:  # a bad colour is not worth refusing the file
        return None


def read_rtstruct(path: str | Path) -> StructureSet:
    """Read an RTSTRUCT file.

    Args:
        path: the RTSTRUCT file.

    Returns:
        The structure set (ROIs with their CLOSED_PLANAR contours in LPS mm, references, warnings).

    Raises:
        InvalidInput: the file is missing, unreadable or corrupt; it is not an RT Structure Set
            (the message names the Modality and SOPClassUID found); it has no
            StructureSetROISequence; a ContourData holds a non-numeric value or a number of values
            that is not a multiple of 3.
    """
    return parse_object(Path(path), "RTSTRUCT", _parse)


def _parse(ds: Dataset, path: Path) -> StructureSet:
    sop_class = text(ds, "SOPClassUID")
    modality = text(ds, "Modality")
    if sop_class != RT_STRUCTURE_SET_STORAGE and not (not sop_class and modality == "RTSTRUCT"):
        name = _KNOWN_SOP_CLASSES.get(sop_class, "unknown SOP class")
        raise InvalidInput(
            f"{path}: not an RT Structure Set: Modality is {modality or '(none)'!r} and "
            f"SOPClassUID is {sop_class or '(none)'} ({name}); expected Modality 'RTSTRUCT' and "
            f"SOPClassUID {RT_STRUCTURE_SET_STORAGE} (RT Structure Set Storage)"
        )
    if "StructureSetROISequence" not in ds:
        raise InvalidInput(
            f"{path}: RTSTRUCT has no StructureSetROISequence (3006,0020); it defines no ROI"
        )
    ss = StructureSet(
        rois=[],
        study_instance_uid=text(ds, "StudyInstanceUID"),
        path=path,
        label=text(ds, "StructureSetLabel"),
        series_instance_uid=text(ds, "SeriesInstanceUID"),
        sop_instance_uid=text(ds, "SOPInstanceUID"),
    )
    frames: list[str] = []

    def add_frame(uid: str) -> None:
        if uid and uid not in frames:
            frames.append(uid)

    # top-level references (may be empty in clinical files)
    for fref in ds.get("ReferencedFrameOfReferenceSequence", None) or []:
        add_frame(text(fref, "FrameOfReferenceUID"))
        for study in fref.get("RTReferencedStudySequence", None) or []:
            for series in study.get("RTReferencedSeriesSequence", None) or []:
                uid = text(series, "SeriesInstanceUID")
                if uid and uid not in ss.referenced_series_uids:
                    ss.referenced_series_uids.append(uid)
                for img in series.get("ContourImageSequence", None) or []:
                    sop = text(img, "ReferencedSOPInstanceUID")
                    if sop:
                        ss.referenced_sop_instance_uids.add(sop)
    if not frames:
        ss._warn(
            "top-level ReferencedFrameOfReferenceSequence is empty; the link to the CT is taken "
            "from the ROIs' ReferencedFrameOfReferenceUID and the contours' ContourImageSequence"
        )

    # ROI definitions
    for item in ds.StructureSetROISequence:
        try:
            number = int(item.get("ROINumber"))
        except (TypeError, ValueError):
            raise InvalidInput(
                f"{path}: a StructureSetROISequence item has no valid ROINumber "
                f"(ROIName {text(item, 'ROIName')!r})"
            ) from None
        roi = Roi(
            number=number,
            name=text(item, "ROIName") or f"ROI_{number}",
            generation_algorithm=text(item, "ROIGenerationAlgorithm"),
            referenced_frame_of_reference_uid=text(item, "ReferencedFrameOfReferenceUID"),
        )
        add_frame(roi.referenced_frame_of_reference_uid)
        ss.rois.append(roi)
    by_number = {r.number: r for r in ss.rois}

    for obs in ds.get("RTROIObservationsSequence", None) or []:
        try:
            ref = int(obs.get("ReferencedROINumber"))
        except (TypeError, ValueError):
            continue
        if ref in by_number:
            by_number[ref].interpreted_type = text(obs, "RTROIInterpretedType")

    for rc in ds.get("ROIContourSequence", None) or []:
        try:
            ref = int(rc.get("ReferencedROINumber"))
        except (TypeError, ValueError):
            ss._warn("a ROIContourSequence item has no valid ReferencedROINumber; skipped")
            continue
        target = by_number.get(ref)
        if target is None:
            ss._warn(
                f"ROIContourSequence references ROI number {ref}, which is not defined; skipped"
            )
            continue
        target.color = _color(rc)
        _parse_contours(rc, target, ss, path)

    for roi in ss.rois:
        if not roi.contours:
            ss._warn(_no_contours(roi))
    ss.frame_of_reference_uids = frames
    return ss


def _no_contours(roi: Roi) -> str:
    return f"ROI {roi.name!r} (number {roi.number}) has no contours; its mask is empty"


def _parse_contours(rc: Dataset, roi: Roi, ss: StructureSet, path: Path) -> None:
    skipped: dict[str, int] = {}
    short = 0
    for n, item in enumerate(rc.get("ContourSequence", None) or []):
        gtype = text(item, "ContourGeometricType").upper()
        try:
            flat = _contour_points(item)
        except ValueError as exc:
            raise InvalidInput(
                f"{path}: ROI {roi.name!r} contour #{n + 1}: ContourData holds a non-numeric "
                f"value ({exc}); expected decimal numbers x\\y\\z in mm"
            ) from None
        if flat.size % 3 != 0:
            raise InvalidInput(
                f"{path}: ROI {roi.name!r} contour #{n + 1}: ContourData has {flat.size} values, "
                "not a multiple of 3 (x, y, z triplets)"
            )
        if not np.all(np.isfinite(flat)):
            raise InvalidInput(
                f"{path}: ROI {roi.name!r} contour #{n + 1}: ContourData holds NaN or infinite "
                "values"
            )
        if gtype != "CLOSED_PLANAR":
            key = gtype or "(no ContourGeometricType)"
            skipped[key] = skipped.get(key, 0) + 1
            continue
        pts = flat.reshape(-1, 3)
        if len(np.unique(pts, axis=0)) < 3:
            short += 1
            continue
        uids = [
            text(img, "ReferencedSOPInstanceUID")
            for img in item.get("ContourImageSequence", None) or []
        ]
        uids = [u for u in uids if u]
        ss.referenced_sop_instance_uids.update(uids)
        roi.contours.append(pts)
        roi.contour_image_uids.append(uids)
    for gtype, count in skipped.items():
        ss._warn(
            f"ROI {roi.name!r}: {count} {gtype} contour(s) skipped; only CLOSED_PLANAR contours "
            "are rasterised"
        )
    if short:
        ss._warn(f"ROI {roi.name!r}: {short} contour(s) with fewer than 3 distinct points skipped")


# ------------------------------------------------------------------------------ rasterising
def _slices(n: int) -> str:
    return f"{n} slice" if n == 1 else f"{n} slices"


def check_references(
    ss: StructureSet,
    *,
    frame_of_reference_uid: str,
    series_instance_uid: str,
    sop_instance_uids: Sequence[str],
    allow_partial: bool = False,
) -> None:
    """Check that a structure set belongs to a CT series, from the CT's identity alone.

    Needs no pixel data: call it with the UIDs from the CT headers before reading a volume.

    Args:
        ss: the structure set.
        frame_of_reference_uid: FrameOfReferenceUID of the CT ("" when unknown: not checked).
        series_instance_uid: SeriesInstanceUID of the CT (for messages).
        sop_instance_uids: SOP Instance UIDs of the CT slices.
        allow_partial: accept a structure set that references images missing from the CT (a
            warning is recorded); without it that is an error.

    Raises:
        GeometryMismatch: a frame of reference UID of the structure set differs from the CT's (the
            message names both); none of the referenced images is in the CT (names the
            referenced series and the CT series); some referenced images are missing and
            `allow_partial` is False (names how many of how many).
    """
    where = ss._where()
    if frame_of_reference_uid:
        other = [u for u in ss.frame_of_reference_uids if u != frame_of_reference_uid]
        if other:
            raise GeometryMismatch(
                f"{where}RTSTRUCT frame of reference {', '.join(other)} differs from the CT's "
                f"frame of reference {frame_of_reference_uid}: the structure set was not drawn "
                "on this CT (or on a CT registered to it)"
            )
    else:
        ss._warn("the CT has no FrameOfReferenceUID; the frame of reference was not checked")
    refs = ss.referenced_sop_instance_uids
    if not refs:
        return
    present = refs & set(sop_instance_uids)
    missing = len(refs) - len(present)
    series_words = (
        f"series {', '.join(ss.referenced_series_uids)}"
        if ss.referenced_series_uids
        else "an unnamed series"
    )
    ct_words = f"the CT series {series_instance_uid or '(no SeriesInstanceUID)'}"
    if not present:
        raise GeometryMismatch(
            f"{where}RTSTRUCT references {len(refs)} images of {series_words}, none of which is "
            f"in {ct_words} ({_slices(len(sop_instance_uids))}): the structure set belongs to "
            "another series"
        )
    if missing:
        verb = "is" if missing == 1 else "are"
        message = (
            f"RTSTRUCT references {len(refs)} CT images, {missing} of them {verb} not in "
            f"{ct_words} ({_slices(len(sop_instance_uids))})"
        )
        if not allow_partial:
            raise GeometryMismatch(
                f"{where}{message}; pass allow_partial=True / --allow-partial to rasterise the "
                "contours that fall on the images present"
            )
        ss._warn(f"{message}; rasterising only the contours on the images present")


def rtstruct_to_masks(
    ss: StructureSet,
    ct: CTSeries,
    *,
    allow_partial: bool = False,
    roi_names: Sequence[str] | None = None,
) -> dict[str, Volume]:
    """Rasterise ROIs of a structure set on the grid of its CT (voxel centre inside the polygon).

    Contours are placed by geometry (each in the slice plane it lies in); several contours on one
    slice combine by XOR. Warnings are logged and appended to ``ss.warnings``.

    Args:
        ss: the structure set (`read_rtstruct`).
        ct: the CT series it was drawn on.
        allow_partial: rasterise what falls on the CT even when the structure set references
            images missing from it; contours off the grid are then skipped with a warning.
        roi_names: the ROIs to rasterise (all by default), by exact ROIName.

    Returns:
        ROI name -> uint8 0/1 `Volume` of shape (nz, ny, nx) on the CT grid (its geometry carries
        the CT's frame of reference UID). A ROI without contours gives an empty mask (and a
        warning). Duplicate ROI names get `` #<ROINumber>`` appended.

    Raises:
        GeometryMismatch: see `check_references`; also a contour that lies off every slice plane
            or outside the CT when `allow_partial` is False.
        InvalidInput: an unknown name in `roi_names` (the message lists the available names).
    """
    geometry = ct.volume.geometry
    check_references(
        ss,
        frame_of_reference_uid=ct.frame_of_reference_uid,
        series_instance_uid=ct.series_instance_uid,
        sop_instance_uids=ct.sop_instance_uids,
        allow_partial=allow_partial,
    )
    rois = ss.rois if roi_names is None else [ss.roi(n) for n in roi_names]
    slice_of = {uid: k for k, uid in enumerate(ct.sop_instance_uids)}
    seen: set[str] = set()
    out: dict[str, Volume] = {}
    for roi in rois:
        name = roi.name if roi.name not in seen else f"{roi.name} #{roi.number}"
        seen.add(roi.name)
        if not roi.contours:
            ss._warn(_no_contours(roi))
            out[name] = Volume(np.zeros(geometry.shape, np.uint8), geometry)
            continue
        report = RasterReport()
        mask = contours_to_mask(
            roi.contours,
            geometry,
            strict=not allow_partial,
            report=report,
            label=f"{ss._where()}ROI {roi.name!r} contour",
        )
        if not report.ok:
            ss._warn(
                f"ROI {roi.name!r}: {len(report.messages)} of {len(roi.contours)} contours do "
                "not fall on the CT grid and were skipped"
            )
        _check_slice_links(roi, ss, geometry, slice_of)
        out[name] = Volume(mask.view(np.uint8), geometry)  # bool -> 0/1 bytes, no copy
    return out


def _check_slice_links(
    roi: Roi, ss: StructureSet, geometry: Geometry, slice_of: Mapping[str, int]
) -> None:
    """Warn when a contour's referenced image is not the slice its geometry puts it on."""
    wrong = 0
    for pts, uids in zip(roi.contours, roi.contour_image_uids, strict=True):
        ks = {slice_of[u] for u in uids if u in slice_of}
        if not ks:
            continue
        k = round(float(np.mean(geometry.physical_to_index(pts)[:, 2])))
        if k not in ks:
            wrong += 1
    if wrong:
        ss._warn(
            f"ROI {roi.name!r}: {wrong} contour(s) reference a CT image other than the slice they "
            "lie on; placed by geometry"
        )


# ------------------------------------------------------------------------------ writing


# ------------------------------------------------------------------------------ files on disk
@dataclass
class _CTHeader:
    path: Path
    sop_instance_uid: str
    frame_of_reference_uid: str


def _scan_ct_headers(source: Path | str | Sequence[Path | str]) -> dict[str, list[_CTHeader]]:
    """SeriesInstanceUID -> headers of the CT image files under `source` (no pixel data read)."""
    items = [source] if isinstance(source, str | Path) else list(source)
    files: list[Path] = []
    for item in items:
        p = Path(item)
        files.extend(sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p])
    groups: dict[str, list[_CTHeader]] = {}
    tags = ["SOPClassUID", "Modality", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"]
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=tags)
        except Exception:  # not DICOM or unreadable: the CT reader reports what matters
            continue
        if text(ds, "Modality") != "CT" and text(ds, "SOPClassUID") != CT_IMAGE_STORAGE:
            continue
        groups.setdefault(text(ds, "SeriesInstanceUID"), []).append(
            _CTHeader(f, text(ds, "SOPInstanceUID"), text(ds, "FrameOfReferenceUID"))
        )
    return groups


def _single_slice_series(path: Path) -> CTSeries:
    """A one-slice CT series (slice thickness as z spacing) for partial rasterising."""
    ds = pydicom.dcmread(path)
    try:
        iop = np.array([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
        ipp = np.array([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
        row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
        thickness = float(ds.get("SliceThickness") or 0.0) or 1.0
        hu = ds.pixel_array.astype(np.float32) * np.float32(float(ds.get("RescaleSlope", 1)))
        hu += np.float32(float(ds.get("RescaleIntercept", 0)))
    except Exception as exc:
        raise InvalidInput(
            f"{path}: cannot read the CT slice geometry/pixels ({type(exc).__name__}: {exc})"
        ) from exc
    row_dir, col_dir = iop[:3], iop[3:]
    direction = np.column_stack([row_dir, col_dir, np.cross(row_dir, col_dir)])
    geometry = Geometry(
        shape=(1, *hu.shape),
        origin=ipp,
        spacing=np.array([col_spacing, row_spacing, thickness]),
        direction=direction,
        frame_of_reference_uid=text(ds, "FrameOfReferenceUID") or None,
    )
    return CTSeries(
        volume=Volume(hu[None], geometry),
        study_instance_uid=text(ds, "StudyInstanceUID"),
        series_instance_uid=text(ds, "SeriesInstanceUID"),
        sop_instance_uids=[text(ds, "SOPInstanceUID")],
        sop_class_uid=text(ds, "SOPClassUID") or CT_IMAGE_STORAGE,
        patient=patient_info(ds),
        patient_position=text(ds, "PatientPosition"),
        files=[str(path)],
        warnings=[f"single-slice CT: slice thickness {thickness:g} mm used as the slice spacing"],
    )


def masks_from_files(
    ct_source: Path | str | Sequence[Path | str],
    rtstruct_path: Path | str,
    *,
    allow_partial: bool = False,
    roi_names: Sequence[str] | None = None,
    on_ct: Callable[[CTSeries], object] | None = None,
) -> tuple[StructureSet, CTSeries, dict[str, Volume]]:
    """Read an RTSTRUCT and its CT from disk and rasterise the ROIs (``jrs rtstruct-to-masks``).

    The structure set is checked against the CT headers BEFORE any pixel is read, so a user who
    points at the wrong folder, or at a folder holding only some of the referenced images, gets
    the message about the frame of reference or the missing images (e.g. "references 98 CT
    images, 97 of them are not in the CT series ...") rather than one about the CT itself. When
    the folder holds several series, the one the RTSTRUCT references is read. With
    `allow_partial`, a folder holding a single referenced slice is accepted (its slice thickness
    serves as the slice spacing); the CT reader needs at least 2 slices otherwise.

    Args:
        ct_source: CT folder (searched recursively) or files.
        rtstruct_path: the RTSTRUCT file.
        allow_partial: see `rtstruct_to_masks`.
        roi_names: the ROIs to rasterise (all by default).
        on_ct: called with the CT series as soon as it is read, before the ROIs are rasterised
            (e.g. to start a registration in the background).

    Returns:
        (structure set, CT series, ROI name -> uint8 mask `Volume` on the CT grid).

    Raises:
        InvalidInput: unreadable RTSTRUCT or CT (see `read_rtstruct`, `read_ct_series`).
        GeometryMismatch: the RTSTRUCT does not belong to the CT (see `check_references`).
    """
    ss = read_rtstruct(rtstruct_path)
    groups = _scan_ct_headers(ct_source)
    chosen: str | None = None
    if groups:
        wanted = [u for u in ss.referenced_series_uids if u in groups]
        if wanted:
            chosen = wanted[0]
        elif len(groups) == 1:
            chosen = next(iter(groups))
        else:
            overlap = {
                uid: len(ss.referenced_sop_instance_uids & {h.sop_instance_uid for h in hs})
                for uid, hs in groups.items()
            }
            best = max(overlap, key=lambda u: overlap[u])
            chosen = best if overlap[best] else None
    if chosen is not None:
        headers = groups[chosen]
        frames = {h.frame_of_reference_uid for h in headers if h.frame_of_reference_uid}
        check_references(
            ss,
            frame_of_reference_uid=next(iter(frames)) if len(frames) == 1 else "",
            series_instance_uid=chosen,
            sop_instance_uids=[h.sop_instance_uid for h in headers],
            allow_partial=allow_partial,
        )
        if len(headers) == 1 and allow_partial:
            ct = _single_slice_series(headers[0].path)
            ss.warnings.extend(ct.warnings)
            if on_ct is not None:
                on_ct(ct)
            return (
                ss,
                ct,
                rtstruct_to_masks(ss, ct, allow_partial=allow_partial, roi_names=roi_names),
            )
    ct = read_ct_series(ct_source, series_uid=chosen)
    if on_ct is not None:
        on_ct(ct)
    return ss, ct, rtstruct_to_masks(ss, ct, allow_partial=allow_partial, roi_names=roi_names)
