"""Receiving, unpacking and validating the uploads of ``POST /v1/recontour``.

The multipart body is parsed as it arrives and each file part is written straight to disk (never
held in memory), counting bytes and files against the limits. Each uploaded file is a zip archive
(unpacked with guards against zip bombs and path traversal) or a DICOM file. The planning upload
must hold a CT series and the RTSTRUCT drawn on it; the daily upload a CT series. A header
pre-scan of every file comes first (deflated-DICOM bombs, image sizes against `MAX_MATRIX` and
``JRS_MAX_VOXELS``, plausible PixelSpacing), then both are read and validated with `jrs.io`
before a job is queued, so bad input is answered at once with a 4xx whose message names the file
(as uploaded) and the attribute. tests/reliability/corpus.py holds 288 such inputs.
"""

from __future__ import annotations

import logging
import math
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from jrs.core.errors import InvalidInput, JrsError, PayloadTooLarge
from jrs.io.ct import read_ct_series
from jrs.io.rtstruct import check_references, read_rtstruct
from jrs.service.jobs import PLANNING_RTSTRUCT
from jrs.service.settings import Settings
from jrs.service.unpack import _unique, looks_like_dicom, unpack
from jrs.service.upload_limits import (
    CHUNK_BYTES,
    RATIO_FLOOR_BYTES,
    ReceivedFile,
    UploadLimits,
    safe_name,
)

logger = logging.getLogger("jrs.service.uploads")

#: The multipart fields of a re-contouring request.
FIELDS = ("planning", "daily")
_TAGS = [
    "SOPClassUID",
    "Modality",
    "SeriesInstanceUID",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "PixelSpacing",
]
_RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
_DEFLATED = "1.2.840.10008.1.2.1.99"
#: Largest Rows or Columns of an image slice (CT matrices are 512, sometimes 1024).
MAX_MATRIX = 4096
#: Plausible pixel and slice spacing of a CT, mm (outside: a header error, not a scan).
PLAUSIBLE_SPACING_MM = (0.05, 20.0)


@dataclass
class ValidatedUpload:
    """What the validation found (counts only: nothing here identifies the patient).

    Attributes:
        planning_slices: slices of the planning CT.
        daily_slices: slices of the daily CT.
        rois: ROIs of the planning RTSTRUCT.
        files: files unpacked in all.
        warnings: non-fatal problems found (file names relative to the upload).
    """

    planning_slices: int
    daily_slices: int
    rois: int
    files: int
    warnings: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------ receiving
class _MultipartSink:
    """Callbacks of the multipart parser writing file parts to disk with limits."""

    def __init__(
        self, raw_dir: Path, limits: UploadLimits, fields: tuple[str, ...] = FIELDS
    ) -> None:
        self.raw_dir = raw_dir
        self.limits = limits
        self.fields = fields
        self.files: list[ReceivedFile] = []
        self.total = 0
        self._headers: dict[bytes, bytes] = {}
        self._name = b""
        self._value = b""
        self._current: ReceivedFile | None = None
        self._fh: IO[bytes] | None = None

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": self.on_part_begin,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
        }

    def on_part_begin(self) -> None:
        self._headers = {}

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._name.strip().lower()] = self._value
        self._name = b""
        self._value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name not in self.fields:
            raise InvalidInput(
                f"unknown form field {name[:64]!r}; expected {_expected(self.fields)}"
            )
        if b"filename" not in options:
            raise InvalidInput(
                f"form field {name!r} must be a file upload (multipart part with a filename), "
                "not a text value"
            )
        if len(self.files) + 1 > self.limits.max_files:
            raise PayloadTooLarge(
                f"too many files: more than {self.limits.max_files} uploaded; send the series "
                "as a zip or raise JRS_MAX_FILES"
            )
        client_name = options[b"filename"].decode("utf-8", "replace")
        index = len(self.files) + 1
        folder = self.raw_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        self._current = ReceivedFile(
            field=name,
            name=safe_name(client_name, default=f"file{index}"),
            path=folder / f"{index:05d}",
        )
        self._fh = self._current.path.open("wb")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        n = end - start
        self.total += n
        if self.total > self.limits.max_upload_bytes:
            raise PayloadTooLarge(
                f"upload too large: more than {self.limits.max_upload_bytes} bytes of files; the "
                "limit is JRS_MAX_UPLOAD_BYTES"
            )
        if self._fh is not None and self._current is not None:
            self._fh.write(data[start:end])
            self._current.size += n

    def on_part_end(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._current is not None:
            self.files.append(self._current)
            self._current = None

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


_FIELD_MEANING = {
    "planning": "zip or DICOM files of the planning CT series + RTSTRUCT",
    "daily": "zip or DICOM files of the daily CT series",
}


def _expected(fields: tuple[str, ...]) -> str:
    """``'planning' (...) and 'daily' (...)``: the file fields a route takes."""
    return " and ".join(f"the file field {f!r} ({_FIELD_MEANING.get(f, 'files')})" for f in fields)


async def receive_multipart(
    request: Request, raw_dir: Path, limits: UploadLimits, fields: tuple[str, ...] = FIELDS
) -> list[ReceivedFile]:
    """Stream a ``multipart/form-data`` body to disk, one file per part.

    Args:
        request: the request (its body is consumed).
        raw_dir: folder to write ``<field>/<n>`` files into.
        limits: the upload limits.
        fields: the file fields the route takes, each required (``planning`` and ``daily`` for
            ``/v1/recontour``; ``planning`` alone for ``/v1/patients``, ``daily`` alone for a
            patient's fractions).

    Returns:
        The received files, in order.

    Raises:
        PayloadTooLarge: the body, or the file count, exceeds a limit (checked while reading).
        InvalidInput: not multipart, malformed, unknown or missing fields, empty files.
    """
    content_type = request.headers.get("content-type", "")
    ctype, params = parse_options_header(content_type)
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise InvalidInput(
            f"expected a multipart/form-data body with {_expected(fields)}, got "
            f"Content-Type {content_type[:80]!r}"
        )
    declared = request.headers.get("content-length")
    # the body holds the files plus the part headers: allow a little for those
    limit = limits.max_upload_bytes + 64 * 1024
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(
            f"upload too large: Content-Length {declared} bytes exceeds the limit of "
            f"{limits.max_upload_bytes} bytes (JRS_MAX_UPLOAD_BYTES)"
        )
    raw_dir.mkdir(parents=True, exist_ok=True)
    sink = _MultipartSink(raw_dir, limits, fields)
    parser = MultipartParser(params[b"boundary"], sink.callbacks())  # type: ignore[arg-type]
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limits.max_upload_bytes + 64 * 1024:
                raise PayloadTooLarge(
                    f"upload too large: more than {limits.max_upload_bytes} bytes "
                    "(JRS_MAX_UPLOAD_BYTES)"
                )
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        raise InvalidInput(f"malformed multipart body ({type(exc).__name__})") from None
    finally:
        sink.close()
    for name in fields:
        if not any(f.field == name for f in sink.files):
            raise InvalidInput(f"missing file field {name!r}: send {_expected(fields)}")
    for f in sink.files:
        if f.size == 0:
            raise InvalidInput(f"{f.field}: uploaded file {f.name!r} is empty")
    return sink.files


# ------------------------------------------------------------------------------ validation
@dataclass
class _Header:
    """What the header pre-scan read from one uploaded file."""

    path: Path
    kind: str  # rtstruct, image, other, not_dicom or unreadable
    series: str = ""
    voxels: int = 0
    rows: int = 0
    columns: int = 0


def _group_length_end(path: Path) -> int | None:
    """Offset where the data set starts after the file meta group (None when unknown)."""
    with path.open("rb") as fh:
        head = fh.read(144)
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00":
        return None
    if head[136:138] != b"UL":
        return None
    return 144 + int.from_bytes(head[140:144], "little")


def _check_deflated(path: Path, name: str, limits: UploadLimits) -> None:
    """Refuse a deflated-transfer-syntax DICOM file that inflates beyond the zip limits.

    pydicom inflates such a file whole into memory before parsing it, so the inflated size is
    counted here first, in chunks, without keeping the data.

    Raises:
        PayloadTooLarge: inflated size over ``max_compression_ratio`` times the file (above
            `RATIO_FLOOR_BYTES`) or over ``max_extracted_bytes``.
        InvalidInput: a corrupt deflate stream.
    """
    start = _group_length_end(path)
    if start is None:
        return
    with path.open("rb") as fh:
        meta = fh.read(start)
        if _DEFLATED.encode() not in meta:
            return
        size = path.stat().st_size
        cap = min(
            limits.max_extracted_bytes,
            max(RATIO_FLOOR_BYTES, int(limits.max_compression_ratio * max(size, 1))),
        )
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        total = 0
        try:
            while chunk := fh.read(CHUNK_BYTES):
                while chunk:
                    total += len(inflater.decompress(chunk, CHUNK_BYTES))
                    chunk = inflater.unconsumed_tail
                    if total > cap:
                        raise PayloadTooLarge(
                            f"{name}: the deflated DICOM file expands to more than {cap} bytes "
                            f"from {size}; the limits are {limits.max_compression_ratio:g}x "
                            "(JRS_MAX_COMPRESSION_RATIO, deflate bomb protection) and "
                            f"{limits.max_extracted_bytes} bytes (JRS_MAX_EXTRACTED_BYTES)"
                        )
        except zlib.error as exc:
            raise InvalidInput(f"{name}: corrupt deflated DICOM data ({exc})") from None


def _number(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _read_header(path: Path, name: str) -> _Header:
    """Kind, series and size of one file from a header-only read (tolerant of bad values)."""
    import pydicom
    from pydicom.multival import MultiValue

    is_dicom = looks_like_dicom(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=_TAGS)
    except Exception:
        return _Header(path, "unreadable" if is_dicom else "not_dicom")
    sop = str(ds.get("SOPClassUID", "") or "")
    modality = str(ds.get("Modality", "") or "")
    if sop == _RTSTRUCT_SOP_CLASS or (not sop and modality == "RTSTRUCT"):
        return _Header(path, "rtstruct")
    if not sop and not modality:
        return _Header(path, "unreadable" if is_dicom else "not_dicom")
    if "Rows" not in ds or "Columns" not in ds:
        return _Header(path, "other")
    rows, columns = (_number(ds.get(k)) for k in ("Rows", "Columns"))
    frames = _number(ds.get("NumberOfFrames", 1)) or 1.0
    header = _Header(path, "image", series=str(ds.get("SeriesInstanceUID", "") or ""))
    if rows is None or columns is None:
        return header  # the reader names the bad value
    header.rows, header.columns = int(rows), int(columns)
    header.voxels = int(rows) * int(columns) * max(1, int(frames))
    if rows > MAX_MATRIX or columns > MAX_MATRIX:
        raise PayloadTooLarge(
            f"{name}: Rows x Columns = {int(rows)} x {int(columns)}; the largest accepted image "
            f"is {MAX_MATRIX} x {MAX_MATRIX}"
        )
    spacing = ds.get("PixelSpacing")
    items = list(spacing) if isinstance(spacing, MultiValue | list | tuple) else [spacing]
    values = [_number(v) for v in items]
    if len(values) == 2 and None not in values:
        low, high = PLAUSIBLE_SPACING_MM
        if any(not low <= v <= high for v in values if v is not None):
            raise InvalidInput(
                f"{name}: PixelSpacing {values} mm is outside the plausible range of a CT "
                f"({low:g} to {high:g} mm)"
            )
    return header


def _scan(folder: Path, input_dir: Path, role: str, limits: UploadLimits) -> list[_Header]:
    """Header pre-scan of one upload: deflate bombs, sizes and spacings, before any full read.

    Raises:
        PayloadTooLarge: a deflate bomb, an image over `MAX_MATRIX`, a series over
            ``max_voxels``.
        InvalidInput: an implausible PixelSpacing.
    """
    headers = []
    totals: dict[str, list[int]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = str(path.relative_to(input_dir))
        _check_deflated(path, name, limits)
        header = _read_header(path, name)
        headers.append(header)
        if header.kind == "image":
            total = totals.setdefault(header.series, [0, 0, 0, 0])
            total[0] += header.voxels
            total[1] += 1
            total[2] = max(total[2], header.rows)
            total[3] = max(total[3], header.columns)
    for series, (voxels, images, rows, columns) in totals.items():
        if voxels > limits.max_voxels:
            raise PayloadTooLarge(
                f"{role}: the image series {series or '(no SeriesInstanceUID)'} declares "
                f"{images} images of up to {rows} x {columns} pixels, {voxels} voxels; the limit "
                f"is {limits.max_voxels} (JRS_MAX_VOXELS)"
            )
    return headers


def _check_slice_spacing(dz: float, role: str) -> None:
    low, high = PLAUSIBLE_SPACING_MM
    if not low <= dz <= high:
        raise InvalidInput(
            f"{role}: slice spacing {dz:.4g} mm (from ImagePositionPatient) is outside the "
            f"plausible range of a CT ({low:g} to {high:g} mm)"
        )


def _relabel(exc: JrsError, root: Path, role: str) -> JrsError:
    """The same error with server paths replaced by upload-relative names and a role prefix."""
    message = exc.message.replace(str(root) + "/", "").replace(str(root), role)
    if not message.startswith(role):
        message = f"{role}: {message}"
    new = type(exc)(message)
    new.__cause__ = exc.__cause__
    return new


def _unexpected(exc: Exception, role: str) -> JrsError:
    """A 4xx for an exception the DICOM readers did not anticipate on this input.

    The readers raise `JrsError` for every problem they know; anything else raised while
    parsing untrusted files is still a problem of the files. It is logged (type and place, not
    its message) so that the reader can be taught the case.
    """
    logger.error(
        "unexpected error while reading an upload",
        exc_info=exc,
        extra={"fields": {"role": role}},
    )
    if isinstance(exc, MemoryError):
        return PayloadTooLarge(
            f"{role}: the DICOM files do not fit in memory when read; send a smaller series"
        )
    return InvalidInput(
        f"{role}: the DICOM files could not be read ({type(exc).__name__}: {str(exc)[:200]}); "
        "check that every file is a complete, valid DICOM object"
    )


@dataclass
class ValidatedPart:
    """What the validation of one upload found (nothing here is shown to a client but counts).

    Attributes:
        slices: CT slices.
        files: files of the upload.
        rois: ROIs of the RTSTRUCT (planning uploads).
        roi_names: their names (planning uploads; kept server-side for the organ mapping).
        series_instance_uid: the CT's SeriesInstanceUID (server-side only: it is hashed).
        warnings: non-fatal problems found (file names relative to the upload).
    """

    slices: int
    files: int
    rois: int = 0
    roi_names: list[str] = field(default_factory=list)
    series_instance_uid: str = ""
    warnings: list[str] = field(default_factory=list)


def validate_planning(input_dir: Path, limits: UploadLimits | None = None) -> ValidatedPart:
    """Validate ``input_dir/planning`` (CT series + its RTSTRUCT); renames the RTSTRUCT.

    A header pre-scan of every file (deflate bombs, image sizes against `MAX_MATRIX` and
    ``max_voxels``, plausible PixelSpacing), then the checks of `jrs.io`: exactly one
    RTSTRUCT, readable, with at least one ROI with contours, belonging to the planning CT (frame
    of reference and referenced images); the CT series readable, CT, valid (see
    `read_ct_series`) and of a plausible slice spacing. The RTSTRUCT is renamed
    ``planning/rtstruct.dcm``.

    Args:
        input_dir: folder with ``planning/``.
        limits: the upload limits (the defaults of `UploadLimits` when None).

    Returns:
        What was found.

    Raises:
        InvalidInput, GeometryMismatch, UnsupportedData, PayloadTooLarge: as `validate_inputs`.
    """
    limits = limits or UploadLimits.from_settings(Settings.model_construct())
    planning = input_dir / "planning"
    try:
        headers = _scan(planning, input_dir, "planning", limits)
        rtstructs = [h.path for h in headers if h.kind == "rtstruct"]
        if not rtstructs:
            unreadable = [h.path for h in headers if h.kind == "unreadable"]
            why = ""
            if unreadable:
                names = ", ".join(str(p.relative_to(input_dir)) for p in unreadable[:5])
                why = f" ({len(unreadable)} corrupt or truncated DICOM file(s): {names})"
            raise InvalidInput(
                f"no RTSTRUCT among the {len(headers)} planning files{why}; the planning upload "
                "must hold the planning CT series and its RT Structure Set (Modality RTSTRUCT)"
            )
        if len(rtstructs) > 1:
            names = ", ".join(str(p.relative_to(input_dir)) for p in rtstructs[:5])
            raise InvalidInput(
                f"{len(rtstructs)} RTSTRUCT files in the planning upload ({names}); send exactly "
                "one, the structure set of the planning CT"
            )
        structure_set = read_rtstruct(rtstructs[0])
        if not any(roi.contours for roi in structure_set.rois):
            raise InvalidInput(
                f"{rtstructs[0].relative_to(input_dir)}: the RTSTRUCT has no ROI with contours; "
                "the planning contours are needed to re-contour the daily CT"
            )
        planning_ct = read_ct_series(planning)
        _check_slice_spacing(float(planning_ct.volume.geometry.spacing[2]), "planning")
        check_references(
            structure_set,
            frame_of_reference_uid=planning_ct.frame_of_reference_uid,
            series_instance_uid=planning_ct.series_instance_uid,
            sop_instance_uids=planning_ct.sop_instance_uids,
        )
    except JrsError as exc:
        raise _relabel(exc, input_dir, "planning") from None
    except Exception as exc:
        raise _unexpected(exc, "planning") from None
    target = planning / PLANNING_RTSTRUCT
    if rtstructs[0] != target:
        if target.exists():
            target.rename(_unique(planning / f"renamed_{PLANNING_RTSTRUCT}"))
        rtstructs[0].rename(target)
    notes = [
        w.replace(str(input_dir) + "/", "")
        for w in [*structure_set.warnings, *planning_ct.warnings]
    ]
    return ValidatedPart(
        slices=len(planning_ct.sop_instance_uids),
        files=len(headers),
        rois=len(structure_set.rois),
        roi_names=[roi.name for roi in structure_set.rois],
        series_instance_uid=planning_ct.series_instance_uid
        or planning_ct.frame_of_reference_uid
        or "",
        warnings=notes,
    )


def validate_daily(input_dir: Path, limits: UploadLimits | None = None) -> ValidatedPart:
    """Validate ``input_dir/daily`` (a CT series): header pre-scan, then `read_ct_series`.

    Args:
        input_dir: folder with ``daily/``.
        limits: the upload limits (the defaults of `UploadLimits` when None).

    Returns:
        What was found.

    Raises:
        InvalidInput, UnsupportedData, PayloadTooLarge: as `validate_inputs`.
    """
    limits = limits or UploadLimits.from_settings(Settings.model_construct())
    daily = input_dir / "daily"
    try:
        daily_files = len(_scan(daily, input_dir, "daily", limits))
        daily_ct = read_ct_series(daily)
        _check_slice_spacing(float(daily_ct.volume.geometry.spacing[2]), "daily")
    except JrsError as exc:
        raise _relabel(exc, input_dir, "daily") from None
    except Exception as exc:
        raise _unexpected(exc, "daily") from None
    return ValidatedPart(
        slices=len(daily_ct.sop_instance_uids),
        files=daily_files,
        series_instance_uid=daily_ct.series_instance_uid,
        warnings=[w.replace(str(input_dir) + "/", "") for w in daily_ct.warnings],
    )


def validate_inputs(input_dir: Path, limits: UploadLimits | None = None) -> ValidatedUpload:
    """Validate a job's inputs with `jrs.io`; renames the planning RTSTRUCT to a fixed name.

    `validate_planning` (header pre-scan, then exactly one RTSTRUCT, readable, with contours,
    belonging to the planning CT; the CT series valid), then `validate_daily`.

    Args:
        input_dir: folder with ``planning/`` and ``daily/``.
        limits: the upload limits (the defaults of `UploadLimits` when None).

    Returns:
        Counts of what was found.

    Raises:
        InvalidInput: bad input (message names the upload-relative file and attribute).
        GeometryMismatch: the RTSTRUCT does not belong to the planning CT.
        UnsupportedData: MR or another modality instead of CT, gantry tilt, ...
        PayloadTooLarge: a series or a deflated file over the limits.
    """
    planning = validate_planning(input_dir, limits)
    daily = validate_daily(input_dir, limits)
    return ValidatedUpload(
        planning_slices=planning.slices,
        daily_slices=daily.slices,
        rois=planning.rois,
        files=planning.files + daily.files,
        warnings=[*planning.warnings, *daily.warnings],
    )


def unpack_and_validate(
    files: list[ReceivedFile], input_dir: Path, limits: UploadLimits
) -> ValidatedUpload:
    """`unpack` then `validate_inputs` (run in a worker thread by the route).

    Args:
        files: the received files.
        input_dir: the job's input folder.
        limits: the upload limits.

    Returns:
        What the validation found.
    """
    unpack(files, input_dir, limits)
    return validate_inputs(input_dir, limits)


__all__ = [
    "FIELDS",
    "ValidatedPart",
    "ValidatedUpload",
    "receive_multipart",
    "unpack_and_validate",
    "validate_daily",
    "validate_inputs",
    "validate_planning",
]
