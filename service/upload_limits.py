"""What an upload may be: its limits, a received file, safe file names."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from jrs.service.settings import Settings

log = logging.getLogger(__name__)


#: Ratios are only enforced above this many uncompressed bytes (a small archive is no bomb).
RATIO_FLOOR_BYTES = 8 * 1024 * 1024


CHUNK_BYTES = 1024 * 1024


_SAFE_NAME = re.compile(r"[^A-Za-z0-9._+\- ]")


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
