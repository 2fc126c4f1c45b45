"""Reading DICOM data sets: one object file, header values as text, completeness checks.

The series reader (`jrs.io.ct`), the RTSTRUCT reader and the REG reader all read through here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pydicom
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from jrs.core.errors import InvalidInput, JrsError

T = TypeVar("T")


def read_object(path: Path, what: str) -> Dataset:
    """One DICOM object file (an RTSTRUCT, a REG), read whole and checked complete.

    A file without the 128-byte preamble and ``DICM`` is accepted when it parses and looks like
    DICOM (a SOP Class UID or a Modality).

    Args:
        path: the file.
        what: what the file should be, for the messages (e.g. "RTSTRUCT").

    Raises:
        InvalidInput: the file is missing, not DICOM, or corrupt/truncated (the message names it).
    """
    if not path.is_file():
        raise InvalidInput(f"{path}: {what} file not found")
    try:
        ds = pydicom.dcmread(path)
        check_complete(ds, path)
        return ds
    except JrsError:
        raise
    except InvalidDicomError:
        pass
    except Exception as exc:  # any parser failure means a corrupt file
        raise InvalidInput(
            f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc})"
        ) from exc
    try:  # no preamble/file meta: accept only if it parses and looks like DICOM
        ds = pydicom.dcmread(path, force=True)
        if "SOPClassUID" not in ds and "Modality" not in ds:
            raise InvalidInput(
                f"{path}: not a DICOM file (no DICOM header, no SOPClassUID); expected {what}"
            )
        check_complete(ds, path)
        return ds
    except JrsError:
        raise
    except Exception as exc:
        raise InvalidInput(
            f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc})"
        ) from exc


def check_complete(ds: Dataset, path: Path) -> None:
    """Refuse a truncated file: a top-level element holding fewer bytes than its length says.

    pydicom reads a truncated explicit-length element without complaint, so this is checked here.
    """
    for tag in list(ds.keys()):
        elem = ds.get_item(tag)
        if not isinstance(elem, RawDataElement) or elem.length == 0xFFFFFFFF:
            continue
        value = elem.value
        if isinstance(value, bytes | bytearray) and len(value) < elem.length:
            raise InvalidInput(
                f"{path}: corrupt or truncated file: element {elem.tag} "
                f"{keyword_for_tag(elem.tag)} declares {elem.length} bytes but only {len(value)} "
                "are present"
            )


def text(ds: Dataset, keyword: str) -> str:
    """A header value as text, tolerant of values invalid for their VR ("" when absent)."""
    try:
        if keyword not in ds:
            return ""
        value = ds[keyword].value
    except Exception:
        try:
            raw = ds.get_item(keyword)
            value = raw.value if raw is not None else None
        except Exception:
            return ""
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("latin-1", errors="replace").strip(" \x00")
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    try:
        return str(value).strip()
    except Exception:
        return ""


def parse_object(path: Path, what: str, parse: Callable[[Dataset, Path], T]) -> T:
    """`read_object`, then ``parse(ds, path)``; a parser failure is a corrupt file.

    Args:
        path: the file.
        what: what it should be, for the messages (e.g. "RTSTRUCT").
        parse: turns the data set into the object (raises `JrsError` for what it refuses).

    Raises:
        InvalidInput: the file is missing, not DICOM, corrupt, or cannot be parsed.
    """
    ds = read_object(path, what)
    try:
        return parse(ds, path)
    except JrsError:
        raise
    except Exception as exc:  # deferred parsing of a corrupt file fails here
        raise InvalidInput(
            f"{path}: corrupt {what}, cannot be parsed ({type(exc).__name__}: {exc})"
        ) from exc
