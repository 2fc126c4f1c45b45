"""Unpacking an upload safely, within one budget for the whole request.

Zip archives are checked entry by entry (names, sizes, compression ratio, entry count), plain
files are kept; nothing is written outside the job's input folder.
"""

from __future__ import annotations

import logging
import re
import shutil
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from jrs.core.errors import InvalidInput, JrsError, PayloadTooLarge, UnsupportedData
from jrs.service.upload_limits import (
    CHUNK_BYTES,
    RATIO_FLOOR_BYTES,
    ReceivedFile,
    UploadLimits,
    safe_name,
)

log = logging.getLogger(__name__)


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
class UnpackBudget:
    """Files and bytes unpacked so far in one request, against its limits."""

    limits: UploadLimits
    files: int = 0
    extracted: int = 0

    def add_file(self, label: str) -> None:
        """Count one more file; refuse the request past ``limits.max_files``."""
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


def extract_zip(path: Path, dest: Path, label: str, budget: UnpackBudget) -> int:
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
                    while chunk := src.read(CHUNK_BYTES):
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
    budget = UnpackBudget(limits)
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
