"""CT Image Storage series: write a `CTSeries` to DICOM files and read (and validate) one back.

Writing produces one single-frame CT Image Storage file per slice (Explicit VR Little Endian) with
every mandatory module of the CT Image IOD. Reading accepts a folder (searched recursively) or a
list of files, skips what is not a CT image, checks that the slices form one regular, untilted
volume and returns Hounsfield units with LPS geometry.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from jrs.core.errors import InvalidInput, UnsupportedData
from jrs.core.geometry import Geometry, Volume
from jrs.io.dataset import text
from jrs.io.series import CT_IMAGE_STORAGE, CTSeries, PatientInfo

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------- reading
#: Modalities of DICOM objects that sit beside a CT series but are not slices of it: skipped.
NON_IMAGE_MODALITIES = frozenset(
    {"RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "REG", "SEG", "SR", "PR", "KO", "DOC", "PLAN"}
)
#: SOP classes that are images even when their pixel data are missing.
_IMAGE_SOP_CLASSES = frozenset(
    {
        CT_IMAGE_STORAGE,
        "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT
        "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT
        "1.2.840.10008.5.1.4.1.1.4",  # MR
        "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR
        "1.2.840.10008.5.1.4.1.1.128",  # PET
        "1.2.840.10008.5.1.4.1.1.130",  # Enhanced PET
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
    }
)
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
_REQUIRED = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")
#: Tolerance on direction cosines between slices and on their orthonormality.
_IOP_TOL = 1e-3
#: Tolerance on PixelSpacing between slices, mm.
_PIXEL_SPACING_TOL_MM = 1e-3
#: Largest GantryDetectorTilt (degrees) taken as untilted.
_TILT_TOL_DEG = 0.01


@dataclass
class _Slice:
    """One image file of the input and the header values read from it."""

    path: Path
    ds: Dataset
    position: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(3))
    distance: float = 0.0  # along the slice normal, mm


def _collect_paths(source: Path | str | Sequence[Path | str]) -> tuple[list[Path], str]:
    """Files to look at and words naming the input in messages."""
    if isinstance(source, str | Path):
        root = Path(source)
        if root.is_dir():
            return sorted(p for p in root.rglob("*") if p.is_file()), f"folder {root}"
        if root.is_file():
            return [root], f"file {root}"
        raise InvalidInput(f"CT input {root} does not exist; give a folder or a list of files")
    paths: list[Path] = []
    for item in source:
        p = Path(item)
        if p.is_dir():
            paths.extend(sorted(q for q in p.rglob("*") if q.is_file()))
        elif p.is_file():
            paths.append(p)
        else:
            raise InvalidInput(f"CT input file {p} does not exist")
    return paths, f"the {len(paths)} given files"


def _looks_like_raw_dataset(path: Path) -> bool:
    """Whether a file without the DICM preamble starts like a DICOM data set (group 0002/0008)."""
    try:
        with path.open("rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return len(head) == 4 and head[:2] in (b"\x02\x00", b"\x08\x00") and head[3:4] == b"\x00"


def _read_dataset(path: Path) -> Dataset | None:
    """Read a file's data set (pixel data deferred); None when it is not DICOM.

    Raises:
        InvalidInput: the file claims to be DICOM but cannot be parsed.
    """
    force = False
    try:
        with path.open("rb") as fh:
            fh.seek(128)
            force = fh.read(4) != b"DICM"
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot be read ({exc.strerror})") from exc
    if force and not _looks_like_raw_dataset(path):
        return None
    try:
        ds = pydicom.dcmread(path, defer_size="64 KB", force=force)
    except InvalidDicomError:
        return None
    except Exception as exc:  # pydicom raises many kinds on broken files
        if force:
            return None
        raise InvalidInput(
            f"{path}: corrupt or truncated DICOM file ({type(exc).__name__}: {str(exc)[:200]}); "
            "every file of the series must be a complete DICOM file"
        ) from exc
    if force:
        return ds if ("SOPClassUID" in ds or "Modality" in ds) else None
    _check_not_truncated(ds, path)
    # pydicom returns an empty data set when the file ends inside an undefined-length element;
    # every composite object but a DICOMDIR carries SOPClassUID
    is_dicomdir = _media_sop_class(ds) == MEDIA_STORAGE_DIRECTORY
    if len(ds) == 0 or ("SOPClassUID" not in ds and "Modality" not in ds and not is_dicomdir):
        raise InvalidInput(
            f"{path}: corrupt or truncated DICOM file: it has the DICOM header (DICM) but no "
            "SOPClassUID or Modality could be read; every file must be a complete DICOM object"
        )
    return ds


def _check_not_truncated(ds: Dataset, path: Path) -> None:
    """Raise `InvalidInput` when the file ends inside its last element.

    pydicom stops quietly at the end of a truncated file, leaving the last value short (or, when
    deferred, unread) or dropping a partly read element header, so the end of the last element
    is checked against the file size.
    """
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is not None and UID(str(syntax)).is_deflated:
        return  # offsets are in the inflated stream
    tags = list(ds.keys())
    if not tags:
        return
    raw = ds.get_item(tags[-1], keep_deferred=True)
    if not isinstance(raw, RawDataElement):
        return
    size = path.stat().st_size
    if raw.length == 0xFFFFFFFF:
        # an undefined-length last element (encapsulated pixel data, a sequence) must be closed
        # by the Sequence Delimitation Item at the very end of the file
        with path.open("rb") as fh:
            fh.seek(max(0, size - 8))
            tail = fh.read(8)
        if tail not in (b"\xfe\xff\xdd\xe0\x00\x00\x00\x00", b"\xff\xfe\xe0\xdd\x00\x00\x00\x00"):
            raise InvalidInput(
                f"{path}: truncated DICOM file: element {raw.tag} of undefined length is not "
                "closed by a Sequence Delimitation Item at the end of the file; send the complete "
                "file"
            )
        return
    end = raw.value_tell + raw.length
    if end > size or 0 < size - end < 8:
        raise InvalidInput(
            f"{path}: truncated DICOM file: it ends at byte {size}, inside element {raw.tag} "
            f"or the header of the next one; send the complete file"
        )


def _media_sop_class(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    value = meta.get("MediaStorageSOPClassUID") if meta is not None else None
    return str(value) if value else ""


def _object_kind(ds: Dataset) -> str:
    """Words naming what a skipped DICOM object is (its Modality, else its SOP class)."""
    modality = text(ds, "Modality")
    if modality:
        return modality
    sop_class = text(ds, "SOPClassUID") or _media_sop_class(ds)
    return UID(sop_class).name if sop_class else "unidentified DICOM"


def _is_image(ds: Dataset) -> bool:
    if str(ds.get("Modality", "")).strip().upper() in NON_IMAGE_MODALITIES:
        return False
    if str(ds.get("SOPClassUID", "")) in _IMAGE_SOP_CLASSES:
        return True
    return "PixelData" in ds or ("Rows" in ds and "Columns" in ds)


def _floats(sl: _Slice, keyword: str, count: int) -> npt.NDArray[np.float64]:
    """A required numeric attribute of `count` values, with a clear error when absent/invalid."""
    ds = sl.ds
    value = ds.get(keyword) if keyword in ds else None
    if value is None or value == "":
        raise InvalidInput(
            f"{sl.path}: missing required attribute {keyword}; every CT slice needs "
            f"{', '.join(_REQUIRED)} and PixelData"
        )
    values = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    try:
        arr = np.array([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(
            f"{sl.path}: {keyword} = {text(ds, keyword)!r} is not numeric; expected {count} "
            "decimal numbers"
        ) from exc
    if arr.shape != (count,) or not np.all(np.isfinite(arr)):
        raise InvalidInput(
            f"{sl.path}: {keyword} = {text(ds, keyword)!r} must be {count} finite numbers"
        )
    return arr


def _integer(sl: _Slice, keyword: str) -> int:
    value = _floats(sl, keyword, 1)[0]
    if value != int(value) or value < 1:
        raise InvalidInput(f"{sl.path}: {keyword} = {value} must be a positive integer")
    return int(value)


def _optional_float(ds: Dataset, keyword: str, default: float) -> float:
    try:
        value = ds.get(keyword)
        return default if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return default


def _series_summary(groups: dict[str, list[_Slice]]) -> str:
    parts = []
    for uid, slices in groups.items():
        modalities = sorted({text(s.ds, "Modality") or "?" for s in slices})
        description = text(slices[0].ds, "SeriesDescription")
        parts.append(
            f"{uid or '(empty SeriesInstanceUID)'!s}: {len(slices)} slices, modality "
            f"{'/'.join(modalities)}, description {description!r}"
        )
    return "; ".join(parts)


def _warn(warnings_out: list[str], message: str, logged: str) -> None:
    """Keep a warning for the user and log it without any path.

    Args:
        warnings_out: the series' warnings (shown to the user: they may name the files given).
        message: the warning as the user reads it.
        logged: the same warning without any folder or file name (names often carry patient
            names or IDs, and logs go where patient data must not).
    """
    logger.warning("%s", logged)
    warnings_out.append(message)


def _fmt(v: npt.ArrayLike) -> str:
    return "(" + ", ".join(f"{x:.3f}" for x in np.asarray(v, dtype=np.float64).reshape(-1)) + ")"


def _check_consistent(slices: list[_Slice]) -> tuple[npt.NDArray[np.float64], ...]:
    """Check IOP, Rows/Columns and PixelSpacing agree between slices; return those of slice 0."""
    first = slices[0]
    iop0 = _floats(first, "ImageOrientationPatient", 6)
    ps0 = _floats(first, "PixelSpacing", 2)
    size0 = (_integer(first, "Rows"), _integer(first, "Columns"))
    for sl in slices[1:]:
        iop = _floats(sl, "ImageOrientationPatient", 6)
        if np.max(np.abs(iop - iop0)) > _IOP_TOL:
            raise InvalidInput(
                f"ImageOrientationPatient differs between slices: {first.path} has "
                f"{iop0.round(5).tolist()}, {sl.path} has {iop.round(5).tolist()}; all slices of "
                "a series must share one orientation"
            )
        size = (_integer(sl, "Rows"), _integer(sl, "Columns"))
        if size != size0:
            raise InvalidInput(
                f"Rows/Columns differ between slices: {first.path} is {size0[0]}x{size0[1]}, "
                f"{sl.path} is {size[0]}x{size[1]}; all slices must have the same size"
            )
        ps = _floats(sl, "PixelSpacing", 2)
        if np.max(np.abs(ps - ps0)) > _PIXEL_SPACING_TOL_MM:
            raise InvalidInput(
                f"PixelSpacing differs between slices: {first.path} has {ps0.tolist()} mm, "
                f"{sl.path} has {ps.tolist()} mm; all slices must share one pixel spacing"
            )
    return iop0, ps0, np.array(size0, dtype=np.float64)


def _direction(iop: npt.NDArray[np.float64], path: Path) -> npt.NDArray[np.float64]:
    """Direction matrix [row_dir, col_dir, normal] (columns) from ImageOrientationPatient."""
    row, col = iop[:3], iop[3:]
    nr, nc = np.linalg.norm(row), np.linalg.norm(col)
    if abs(nr - 1) > 1e-2 or abs(nc - 1) > 1e-2 or abs(float(row @ col)) > 1e-2:
        raise InvalidInput(
            f"{path}: ImageOrientationPatient {iop.round(5).tolist()} is not two orthogonal unit "
            "vectors (row and column direction cosines)"
        )
    row = row / nr
    col = col - (col @ row) * row
    col = col / np.linalg.norm(col)
    return np.stack([row, col, np.cross(row, col)], axis=1)


def _check_tilt(slices: list[_Slice], normal: npt.NDArray[np.float64]) -> None:
    for sl in slices:
        tilt = _optional_float(sl.ds, "GantryDetectorTilt", 0.0)
        if abs(tilt) > _TILT_TOL_DEG:
            raise UnsupportedData(
                f"{sl.path}: GantryDetectorTilt is {tilt:g} degrees; only untilted axial CT "
                "series (tilt 0) are accepted"
            )
    first = slices[0]
    for sl in slices[1:]:
        offset = sl.position - first.position
        along = float(offset @ normal)
        across = float(np.linalg.norm(offset - along * normal))
        if abs(along) > 1e-3 and across > max(0.01, 1e-3 * abs(along)):
            angle = float(np.degrees(np.arctan2(across, abs(along))))
            raise UnsupportedData(
                f"slice positions are not along the slice normal: {sl.path} is offset "
                f"{across:.3f} mm sideways from {first.path} over {abs(along):.3f} mm, a gantry "
                f"tilt of about {angle:.2f} degrees; only untilted axial CT series are accepted"
            )


def _slice_spacing(slices: list[_Slice], label: str) -> float:
    """Uniform slice distance (mm) of slices sorted by distance; errors name gaps/duplicates."""
    d = np.array([s.distance for s in slices])
    diffs = np.diff(d)
    for a, b, gap in zip(slices[:-1], slices[1:], diffs, strict=True):
        if gap < 1e-3:
            raise InvalidInput(
                f"duplicate slice position {_fmt(b.position)} mm: {a.path} and {b.path} are at "
                "the same place; remove one of them"
            )
    # expected spacing: the most common gap (ties: the smallest)
    tol_of = np.maximum(0.01, 0.01 * diffs)
    close = np.abs(diffs[:, None] - diffs[None, :]) <= tol_of[:, None]
    counts = close.sum(axis=1)
    best = np.flatnonzero(counts == counts.max())
    ref = best[np.argmin(diffs[best])]
    expected = float(diffs[close[ref]].mean())
    tol = max(0.01, 0.01 * expected)
    for a, b, gap in zip(slices[:-1], slices[1:], diffs, strict=True):
        if abs(gap - expected) <= tol:
            continue
        m = round(gap / expected)
        where = (
            f"between slice positions {_fmt(a.position)} ({a.path}) and {_fmt(b.position)} "
            f"({b.path}) of {label}"
        )
        if m >= 2 and abs(gap - m * expected) <= tol * m:
            raise InvalidInput(
                f"{m - 1} slice(s) missing {where}: gap {gap:.3f} mm, expected slice spacing "
                f"{expected:.3f} mm; the series must be complete"
            )
        raise InvalidInput(
            f"non-uniform slice spacing {where}: gap {gap:.3f} mm, expected {expected:.3f} mm "
            f"(tolerance {tol:.3f} mm); only evenly spaced series are accepted"
        )
    return float((d[-1] - d[0]) / (len(d) - 1))


def _decode_hu(
    sl: _Slice, rows: int, columns: int, out: npt.NDArray[np.float32] | None = None
) -> npt.NDArray[np.float32]:
    """Decode one slice's pixels and rescale them to HU, shape (rows, columns), float32.

    Args:
        sl: the slice.
        rows: expected Rows.
        columns: expected Columns.
        out: (rows, columns) float32 array to write into (a new one when None).

    Returns:
        The HU values (``out`` when given).
    """
    ds = sl.ds
    if "PixelData" not in ds:
        raise InvalidInput(
            f"{sl.path}: missing required attribute PixelData (the file may be truncated); every "
            "CT slice needs pixel data"
        )
    frames = _optional_float(ds, "NumberOfFrames", 1.0)
    if frames != 1:
        raise UnsupportedData(
            f"{sl.path}: multi-frame image ({frames:g} frames); only single-frame CT Image "
            "Storage slices are accepted"
        )
    samples = _optional_float(ds, "SamplesPerPixel", 1.0)
    if samples != 1:
        raise UnsupportedData(
            f"{sl.path}: SamplesPerPixel is {samples:g}; only grayscale (1 sample) CT is accepted"
        )
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts is not None:
        ts = UID(str(ts))
        decoder_problem = ""
        if not ts.is_transfer_syntax:
            decoder_problem = "it is not a known transfer syntax"
        elif ts.is_compressed:
            try:
                decoder = get_decoder(ts)
            except NotImplementedError:
                decoder_problem = "pydicom has no decoder for it"
            else:
                if not decoder.is_available:
                    missing = "; ".join(decoder.missing_dependencies)
                    decoder_problem = f"no installed decoder handles it ({missing})"
        if decoder_problem:
            raise UnsupportedData(
                f"{sl.path}: pixel data use transfer syntax {ts.name} ({ts}) and "
                f"{decoder_problem}; send uncompressed, RLE, JPEG 2000 or deflated files"
            )
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        name = ts.name if ts is not None else "unknown transfer syntax"
        raise InvalidInput(
            f"{sl.path}: pixel data cannot be decoded ({name}; {type(exc).__name__}: "
            f"{str(exc)[:200]}); the file may be corrupt or truncated"
        ) from exc
    if pixels.shape != (rows, columns):
        raise InvalidInput(
            f"{sl.path}: decoded pixel array has shape {pixels.shape}, expected (Rows, Columns) = "
            f"({rows}, {columns})"
        )
    slope = _optional_float(ds, "RescaleSlope", 1.0)
    intercept = _optional_float(ds, "RescaleIntercept", 0.0)
    hu = np.empty((rows, columns), np.float32) if out is None else out
    np.copyto(hu, pixels, casting="unsafe")
    if slope != 1.0:
        hu *= np.float32(slope)
    if intercept != 0.0:
        hu += np.float32(intercept)
    return hu


def decode_workers(slices: int) -> int:
    """Threads that decode the slices of a series.

    ``$JRS_DECODE_THREADS`` when set, else one per CPU core (at most 8); never more than the
    slices.
    """
    env = os.environ.get("JRS_DECODE_THREADS", "").strip()
    wanted = int(env) if env.isdigit() and int(env) > 0 else min(8, os.cpu_count() or 1)
    return max(1, min(wanted, slices))


def _decode_all(
    slices: list[_Slice], rows: int, columns: int, out: npt.NDArray[np.float32]
) -> None:
    """Decode every slice into ``out[k]`` (k in slice order), in parallel threads.

    Reading the files and converting the pixels release the GIL (compressed syntaxes decode in C),
    so threads overlap them; the first error (in slice order) is raised, as a sequential loop
    would.
    """
    workers = decode_workers(len(slices))
    if workers == 1:
        for k, sl in enumerate(slices):
            _decode_hu(sl, rows, columns, out[k])
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="jrs-decode") as pool:
        futures = [
            pool.submit(_decode_hu, sl, rows, columns, out[k]) for k, sl in enumerate(slices)
        ]
        for future in futures:
            future.result()


def patient_info(ds: Dataset) -> PatientInfo:
    """Patient and study attributes of a CT slice as `PatientInfo` (invalid values kept as text)."""
    return PatientInfo(
        patient_name=text(ds, "PatientName"),
        patient_id=text(ds, "PatientID"),
        patient_birth_date=text(ds, "PatientBirthDate"),
        patient_sex=text(ds, "PatientSex"),
        study_date=text(ds, "StudyDate"),
        study_time=text(ds, "StudyTime"),
        study_id=text(ds, "StudyID"),
        accession_number=text(ds, "AccessionNumber"),
        referring_physician_name=text(ds, "ReferringPhysicianName"),
        study_description=text(ds, "StudyDescription"),
    )


def read_ct_series(
    source: Path | str | Sequence[Path | str],
    series_uid: str | None = None,
    *,
    allow_empty_uids: bool = True,
) -> CTSeries:
    """Read and validate a CT series from a folder or a list of files.

    Non-DICOM files and DICOM objects that are not images (RTSTRUCT, REG, RTPLAN, RTDOSE, ...) are
    skipped silently. The slices are sorted along the normal ``n = row_dir x col_dir`` of their
    ImageOrientationPatient; the volume's direction is ``[row_dir, col_dir, n]`` (columns,
    right-handed), its origin the ImagePositionPatient of the first sorted slice, its spacing
    ``(PixelSpacing[1], PixelSpacing[0], slice distance)`` in (x, y, z) order.

    Args:
        source: a folder (searched recursively), a single file, or a list of files/folders.
        series_uid: SeriesInstanceUID to read when the input holds several series ("" selects the
            files whose SeriesInstanceUID is empty).
        allow_empty_uids: accept empty or missing StudyInstanceUID/SeriesInstanceUID with a
            warning; when False they are an error.

    Returns:
        The series: ``volume.array`` in HU, float32, shape (nz, ny, nx), rescaled slice by slice;
        geometry in LPS mm with ``frame_of_reference_uid`` = FrameOfReferenceUID (None when
        absent); ``sop_instance_uids`` and ``files`` in k order; ``warnings`` listing non-fatal
        problems.

    Raises:
        InvalidInput: no usable slices, several series without `series_uid`, unknown
            `series_uid`, missing or inconsistent attributes, corrupt files, duplicate or missing
            slices, non-uniform spacing, a single slice.
        UnsupportedData: a modality other than CT, gantry tilt, multi-frame images, or a
            transfer syntax no installed decoder handles.
    """
    paths, label = _collect_paths(source)
    images: list[_Slice] = []
    skipped_non_dicom = 0
    skipped_objects: Counter[str] = Counter()
    with warnings.catch_warnings():
        # pydicom warns about invalid values and quotes them: that could leak patient data
        warnings.simplefilter("ignore", UserWarning)
        for path in paths:
            ds = _read_dataset(path)
            if ds is None:
                skipped_non_dicom += 1
            elif _is_image(ds):
                if "PixelData" not in ds and str(ds.get("SOPClassUID", "")) == CT_IMAGE_STORAGE:
                    raise InvalidInput(
                        f"{path}: missing required attribute PixelData (the file may be "
                        "truncated); every CT slice needs pixel data"
                    )
                images.append(_Slice(path=path, ds=ds))
            else:
                skipped_objects[_object_kind(ds)] += 1
        if not images:
            found = [f"{skipped_non_dicom} non-DICOM file(s)"] + [
                f"{n} {modality} object(s)" for modality, n in sorted(skipped_objects.items())
            ]
            raise InvalidInput(
                f"no DICOM image slices in {label}: found {', '.join(found)}; expected the files "
                "of one CT series (CT Image Storage)"
            )
        return _build_series(images, label, series_uid, allow_empty_uids)


def _build_series(
    images: list[_Slice], label: str, series_uid: str | None, allow_empty_uids: bool
) -> CTSeries:
    groups: dict[str, list[_Slice]] = {}
    for sl in images:
        groups.setdefault(text(sl.ds, "SeriesInstanceUID"), []).append(sl)
    if series_uid is None:
        if len(groups) > 1:
            raise InvalidInput(
                f"{label} holds {len(groups)} image series: {_series_summary(groups)}; pass "
                "series_uid to choose one"
            )
        chosen_uid = next(iter(groups))
    else:
        if series_uid not in groups:
            raise InvalidInput(
                f"series {series_uid!r} is not in {label}; available series: "
                f"{_series_summary(groups)}"
            )
        chosen_uid = series_uid
    slices = groups[chosen_uid]
    warnings_out: list[str] = []

    for sl in slices:
        modality = text(sl.ds, "Modality")
        if modality != "CT":
            raise UnsupportedData(
                f"{sl.path}: Modality is {modality or '(missing)'!r}; only CT image series are "
                "accepted"
            )
    localizers = [s for s in slices if "LOCALIZER" in text(s.ds, "ImageType").upper()]
    if localizers:
        _warn(
            warnings_out,
            f"skipped {len(localizers)} localizer (scout) image(s) of the series, e.g. "
            f"{localizers[0].path}",
            f"skipped {len(localizers)} localizer (scout) image(s) of the CT series",
        )
        slices = [s for s in slices if s not in localizers]
    if len(slices) < 2:
        where = slices[0].path if slices else label
        raise InvalidInput(
            f"the CT series in {label} has {len(slices)} slice ({where}); a volume needs at least "
            "2 slices"
        )

    iop, pixel_spacing, size = _check_consistent(slices)
    direction = _direction(iop, slices[0].path)
    normal = direction[:, 2]
    for sl in slices:
        sl.position = _floats(sl, "ImagePositionPatient", 3)
        sl.distance = float(sl.position @ normal)
    slices.sort(key=lambda s: s.distance)
    _check_tilt(slices, normal)
    dz = _slice_spacing(slices, label)

    first = slices[0].ds
    study_uid = text(first, "StudyInstanceUID")
    series_uid_read = text(first, "SeriesInstanceUID")
    for keyword, value in (("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid_read)):
        if not value:
            message = f"{keyword} is empty or missing in the CT files of {label}"
            if not allow_empty_uids:
                raise InvalidInput(f"{message}; every CT slice needs a {keyword}")
            _warn(
                warnings_out,
                f"{message}; it is kept empty",
                f"{keyword} is empty or missing in the CT files; it is kept empty",
            )
    frame_uid = text(first, "FrameOfReferenceUID")
    other_frames = {text(s.ds, "FrameOfReferenceUID") for s in slices} - {frame_uid}
    if other_frames:
        _warn(
            warnings_out,
            f"the CT slices of {label} carry {len(other_frames) + 1} different "
            f"FrameOfReferenceUIDs; the one of the first slice ({frame_uid or 'empty'}) is used",
            f"the CT slices carry {len(other_frames) + 1} different FrameOfReferenceUIDs; the "
            "one of the first slice is used",
        )
    if not frame_uid:
        _warn(
            warnings_out,
            f"FrameOfReferenceUID is missing in the CT files of {label}; contours and "
            "registrations cannot be tied to this CT's frame of reference",
            "FrameOfReferenceUID is missing in the CT files; contours and registrations cannot "
            "be tied to this CT's frame of reference",
        )

    rows, columns = int(size[0]), int(size[1])
    array = np.empty((len(slices), rows, columns), dtype=np.float32)
    _decode_all(slices, rows, columns, array)

    geometry = Geometry(
        shape=(len(slices), rows, columns),
        origin=slices[0].position,
        spacing=np.array([pixel_spacing[1], pixel_spacing[0], dz]),
        direction=direction,
        frame_of_reference_uid=frame_uid or None,
    )
    series = CTSeries(
        volume=Volume(array, geometry),
        study_instance_uid=study_uid,
        series_instance_uid=series_uid_read,
        sop_instance_uids=[text(s.ds, "SOPInstanceUID") for s in slices],
        sop_class_uid=text(first, "SOPClassUID") or CT_IMAGE_STORAGE,
        patient=patient_info(first),
        patient_position=text(first, "PatientPosition"),
        series_description=text(first, "SeriesDescription"),
        files=[str(s.path) for s in slices],
        warnings=warnings_out,
    )
    # no path in the log: folder names often carry patient names or IDs
    logger.info(
        "read CT series of %d slices (%d x %d), spacing %s mm",
        len(slices),
        rows,
        columns,
        _fmt(geometry.spacing),
    )
    return series
