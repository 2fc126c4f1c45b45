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
import re
import shutil
import stat
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from jrs.core.errors import InvalidInput, JrsError, PayloadTooLarge, UnsupportedData
from jrs.io.ct import read_ct_series
from jrs.io.rtstruct import check_references, read_rtstruct
from jrs.service.jobs import PLANNING_RTSTRUCT
from jrs.service.settings import Settings

logger = logging.getLogger("jrs.service.uploads")

#: The multipart fields of a re-contouring request.
FIELDS = ("planning", "daily")
#: Ratios are only enforced above this many uncompressed bytes (a small archive is no bomb).
RATIO_FLOOR_BYTES = 8 * 1024 * 1024
_CHUNK = 1024 * 1024
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._+\- ]")
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


@dataclass(frozen=True)
class UploadLimits:
    """Limits of one request's uploads.

    Attributes:
        max_upload_bytes: largest request body.
        max_files: most files (uploaded plus unpacked from zips).
        max_zip_entries: most entries of one zip.
        max_compression_ratio: largest uncompressed/compressed ratio (entry or archive).
        max_extracted_bytes: largest total uncompressed size of the request's zips.
        max_voxels: largest CT series (slices x rows x columns, from the headers).
    """

    max_upload_bytes: int
    max_files: int
    max_zip_entries: int
    max_compression_ratio: float
    max_extracted_bytes: int
    max_voxels: int = 2**29

    @classmethod
    def from_settings(cls, settings: Settings) -> UploadLimits:
        """The limits configured in `settings`."""
        return cls(
            max_upload_bytes=settings.max_upload_bytes,
            max_files=settings.max_files,
            max_zip_entries=settings.max_zip_entries,
            max_compression_ratio=settings.max_compression_ratio,
            max_extracted_bytes=settings.max_extracted_bytes,
            max_voxels=settings.max_voxels,
        )


@dataclass
class ReceivedFile:
    """One file part of the request, written to disk.

    Attributes:
        field: ``planning`` or ``daily``.
        name: the client's file name, made safe (no folders, no odd characters).
        path: where it was written.
        size: bytes.
    """

    field: str
    name: str
    path: Path
    size: int = 0


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


def safe_name(name: str, default: str = "file") -> str:
    """A file-system-safe base name (no folders, characters outside [A-Za-z0-9._+- ] -> '_').

    Args:
        name: a client-supplied name.
        default: used when nothing is left.

    Returns:
        The safe name (at most 120 characters, never ``.`` or ``..``).
    """
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = _SAFE_NAME.sub("_", base).strip()[:120]
    return cleaned if cleaned not in ("", ".", "..") else default


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


# ------------------------------------------------------------------------------ unpacking
def _is_zip(path: Path) -> bool:
    with path.open("rb") as fh:
        head = fh.read(4)
    return head in (b"PK\x03\x04", b"PK\x05\x06")


def looks_like_dicom(path: Path) -> bool:
    """Whether a file is DICOM: ``DICM`` after the 128-byte preamble, or a raw data set start.

    Args:
        path: the file.

    Returns:
        True for a (possibly corrupt) DICOM file.
    """
    with path.open("rb") as fh:
        head = fh.read(132)
    if len(head) == 132 and head[128:132] == b"DICM":
        return True
    return len(head) >= 4 and head[:2] in (b"\x02\x00", b"\x08\x00") and head[3:4] == b"\x00"


def _unique(path: Path) -> Path:
    if not path.exists():
        return path
    k = 2
    while True:
        candidate = path.with_name(f"{path.stem}_{k}{path.suffix}")
        if not candidate.exists():
            return candidate
        k += 1


@dataclass
class _Budget:
    limits: UploadLimits
    files: int = 0
    extracted: int = 0

    def add_file(self, label: str) -> None:
        self.files += 1
        if self.files > self.limits.max_files:
            raise PayloadTooLarge(
                f"{label}: too many files: more than {self.limits.max_files} in the request "
                "(uploaded plus unpacked from zips); the limit is JRS_MAX_FILES"
            )


def _check_entry_name(info: zipfile.ZipInfo, label: str) -> list[str]:
    """The safe path components of a zip entry; raises for unsafe entries."""
    name = info.filename
    shown = repr(name[:200])
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        raise InvalidInput(
            f"{label}: zip entry {shown} has an absolute path; entries must be relative paths "
            "inside the archive"
        )
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidInput(
            f"{label}: zip entry {shown} contains '..' and would be written outside the "
            "archive's folder (path traversal); refused"
        )
    if "\x00" in name:
        raise InvalidInput(f"{label}: zip entry {shown} has a NUL character in its name")
    mode = (info.external_attr >> 16) & 0o170000
    if mode == stat.S_IFLNK:
        raise InvalidInput(
            f"{label}: zip entry {shown} is a symbolic link; links are refused, archive the "
            "files themselves"
        )
    if info.flag_bits & 0x1:
        raise InvalidInput(f"{label}: zip entry {shown} is encrypted; upload an unencrypted zip")
    return [safe_name(p, default="_") for p in parts]


def _ratio_error(label: str, what: str, size: int, compressed: int, limit: float) -> JrsError:
    return PayloadTooLarge(
        f"{label}: {what} expands {size / max(compressed, 1):.0f}x ({size} bytes from "
        f"{compressed}); the limit is {limit:g}x (JRS_MAX_COMPRESSION_RATIO, zip bomb protection)"
    )


def extract_zip(path: Path, dest: Path, label: str, budget: _Budget) -> int:
    """Unpack a zip safely into `dest`.

    Refuses (before writing anything) archives with too many entries, absolute or ``..`` entry
    names, symbolic links, encrypted entries, declared sizes over the limits or a declared
    compression ratio over the limit; then counts the bytes actually inflated against the same
    limits while extracting (a header may lie).

    Args:
        path: the zip file.
        dest: folder to unpack into (entry folders are kept, names made safe).
        label: words naming the archive in messages (e.g. ``planning: 'case.zip'``).
        budget: file and byte counters of the request.

    Returns:
        Number of files unpacked.

    Raises:
        InvalidInput: corrupt archive, unsafe entry (the message names the entry).
        PayloadTooLarge: entry count, size or compression ratio over a limit.
        UnsupportedData: a compression method Python cannot inflate.
    """
    limits = budget.limits
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise InvalidInput(f"{label}: corrupt zip archive ({exc})") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.max_zip_entries:
            raise PayloadTooLarge(
                f"{label}: the zip has {len(infos)} entries; the limit is "
                f"{limits.max_zip_entries} (JRS_MAX_ZIP_ENTRIES)"
            )
        plan: list[tuple[zipfile.ZipInfo, list[str]]] = []
        declared = compressed = 0
        for info in infos:
            parts = _check_entry_name(info, label)
            if info.is_dir() or not parts:
                continue
            declared += info.file_size
            compressed += info.compress_size
            if (
                info.file_size > RATIO_FLOOR_BYTES
                and info.file_size > limits.max_compression_ratio * max(info.compress_size, 1)
            ):
                raise _ratio_error(
                    label,
                    f"zip entry {info.filename[:200]!r}",
                    info.file_size,
                    info.compress_size,
                    limits.max_compression_ratio,
                )
            plan.append((info, parts))
        if budget.extracted + declared > limits.max_extracted_bytes:
            raise PayloadTooLarge(
                f"{label}: the zip declares {declared} uncompressed bytes; the request may unpack "
                f"at most {limits.max_extracted_bytes} (JRS_MAX_EXTRACTED_BYTES)"
            )
        if declared > RATIO_FLOOR_BYTES and declared > limits.max_compression_ratio * max(
            compressed, 1
        ):
            raise _ratio_error(
                label, "the archive", declared, compressed, limits.max_compression_ratio
            )
        count = 0
        for info, parts in plan:
            budget.add_file(label)
            target = _unique(dest.joinpath(*parts))
            target.parent.mkdir(parents=True, exist_ok=True)
            written = 0
            try:
                with zf.open(info) as src, target.open("wb") as out:
                    while chunk := src.read(_CHUNK):
                        written += len(chunk)
                        budget.extracted += len(chunk)
                        if written > info.file_size:
                            raise InvalidInput(
                                f"{label}: zip entry {info.filename[:200]!r} inflates to more "
                                f"than the {info.file_size} bytes it declares; refused"
                            )
                        if budget.extracted > limits.max_extracted_bytes:
                            raise PayloadTooLarge(
                                f"{label}: more than {limits.max_extracted_bytes} bytes unpacked "
                                "(JRS_MAX_EXTRACTED_BYTES)"
                            )
                        if written > RATIO_FLOOR_BYTES and written > (
                            limits.max_compression_ratio * max(info.compress_size, 1)
                        ):
                            raise _ratio_error(
                                label,
                                f"zip entry {info.filename[:200]!r}",
                                written,
                                info.compress_size,
                                limits.max_compression_ratio,
                            )
                        out.write(chunk)
            except JrsError:
                raise
            except NotImplementedError as exc:
                raise UnsupportedData(
                    f"{label}: zip entry {info.filename[:200]!r} uses a compression method that "
                    f"cannot be read ({exc}); use deflate or store"
                ) from None
            except OSError as exc:
                if exc.errno is not None:  # the file system failed (full disk), not the archive
                    raise
                raise InvalidInput(
                    f"{label}: corrupt zip entry {info.filename[:200]!r} ({exc})"
                ) from None
            except (zipfile.BadZipFile, EOFError, ValueError, zlib.error) as exc:
                raise InvalidInput(
                    f"{label}: corrupt zip entry {info.filename[:200]!r} ({exc})"
                ) from None
            count += 1
        return count


def unpack(files: list[ReceivedFile], input_dir: Path, limits: UploadLimits) -> int:
    """Move the uploaded DICOM files and unpack the zips into ``input_dir/<field>/``.

    Args:
        files: the received files.
        input_dir: the job's input folder.
        limits: the upload limits.

    Returns:
        Number of files in ``input_dir``.

    Raises:
        InvalidInput: a file that is neither a zip nor DICOM (named), an unsafe zip.
        PayloadTooLarge: a limit exceeded.
    """
    budget = _Budget(limits)
    total = 0
    for f in files:
        folder = input_dir / f.field
        folder.mkdir(parents=True, exist_ok=True)
        label = f"{f.field}: {f.name!r}"
        if _is_zip(f.path):
            stem = safe_name(f.name.removesuffix(".zip").removesuffix(".ZIP"), "archive")
            total += extract_zip(f.path, _unique(folder / stem), label, budget)
            f.path.unlink(missing_ok=True)
        elif looks_like_dicom(f.path):
            budget.add_file(label)
            shutil.move(str(f.path), str(_unique(folder / f.name)))
            total += 1
        else:
            raise InvalidInput(
                f"{label} is neither a zip archive nor a DICOM file (no 'DICM' marker at byte "
                "128); upload a zip of the series or its DICOM files"
            )
    return total


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
            while chunk := fh.read(_CHUNK):
                while chunk:
                    total += len(inflater.decompress(chunk, _CHUNK))
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
    "ReceivedFile",
    "UploadLimits",
    "ValidatedPart",
    "ValidatedUpload",
    "extract_zip",
    "looks_like_dicom",
    "receive_multipart",
    "safe_name",
    "unpack",
    "unpack_and_validate",
    "validate_daily",
    "validate_inputs",
    "validate_planning",
]
