"""A tiny valid re-contouring case, in memory, for the reliability corpus, fuzzing and load runs.

`build_case()` writes a planning CT (8 slices of 32 x 32, 4 x 4 x 3 mm) with an RTSTRUCT holding a
``Prostate`` ROI, and a daily CT of the same patient, with ``jrs.io`` (pydicom), and returns
the files as bytes. The patient name and ID are distinctive (`PATIENT_NAME`, `PATIENT_ID`) so
that a log scan can prove they never reach the service logs.
"""

from __future__ import annotations

import io
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jrs.core.geometry import Geometry, Volume
from jrs.io.ct_writer import write_ct_series
from jrs.io.rtstruct_writer import write_rtstruct
from jrs.io.series import CTSeries, PatientInfo

#: Identifiers of the synthetic patient: they must never appear in a service log.
PATIENT_NAME = "Corpusname^Secretia"
PATIENT_ID = "CORPUS-PID-90210"
PATIENT_BIRTH_DATE = "19450508"
#: Fragments of the identifiers searched for in logs (the name may be rendered without '^').
SECRETS = (PATIENT_NAME, PATIENT_ID, "Corpusname", "Secretia", PATIENT_BIRTH_DATE)
SHAPE = (8, 32, 32)
SPACING = (4.0, 4.0, 3.0)  # x, y, z mm
ORIGIN = (-62.0, -62.0, -10.5)

#: One multipart file part: (file name, content, content type).
Part = tuple[str, bytes, str]


@dataclass(frozen=True)
class TinyCase:
    """A valid case as bytes.

    Attributes:
        planning_ct: file name -> bytes of the planning CT slices, in slice order.
        rtstruct: bytes of the planning RTSTRUCT (a ``Prostate`` ROI on slices 2..5).
        daily_ct: file name -> bytes of the daily CT slices, in slice order.
        other_rtstruct: an RTSTRUCT drawn on another CT (another frame of reference).
    """

    planning_ct: dict[str, bytes]
    rtstruct: bytes
    daily_ct: dict[str, bytes]
    other_rtstruct: bytes

    @property
    def planning_files(self) -> dict[str, bytes]:
        """Planning CT slices and the RTSTRUCT, file name -> bytes."""
        return {**self.planning_ct, "RS.dcm": self.rtstruct}

    def planning_zip(self) -> bytes:
        """The planning upload as one zip (``ct/CT.000k.dcm`` + ``RS.dcm``)."""
        entries = {f"ct/{n}": b for n, b in self.planning_ct.items()}
        entries["RS.dcm"] = self.rtstruct
        return zip_bytes(entries)

    def daily_zip(self) -> bytes:
        """The daily upload as one zip (``ct/CT.000k.dcm``)."""
        return zip_bytes({f"ct/{n}": b for n, b in self.daily_ct.items()})

    def parts(self) -> tuple[list[Part], list[Part]]:
        """The valid request: planning and daily as one zip each."""
        return (
            [("planning.zip", self.planning_zip(), "application/zip")],
            [("daily.zip", self.daily_zip(), "application/zip")],
        )


def zip_bytes(entries: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A zip archive of `entries` (name -> bytes), in memory."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _hu(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    nz, ny, nx = SHAPE
    _, y, x = np.mgrid[0:nz, 0:ny, 0:nx]
    hu = np.full(SHAPE, -1000.0, np.float32)
    hu[((x - 16) / 14.0) ** 2 + ((y - 16) / 11.0) ** 2 <= 1] = 20.0
    hu += rng.normal(0, 5, SHAPE).astype(np.float32)
    return hu


def prostate_mask() -> np.ndarray:
    """(nz, ny, nx) mask of the ``Prostate`` ROI: a small ball on slices 2..5."""
    nz, ny, nx = SHAPE
    z, y, x = np.mgrid[0:nz, 0:ny, 0:nx]
    return ((((x - 16) / 3.0) ** 2 + ((y - 17) / 3.0) ** 2 + ((z - 3.5) / 2.0) ** 2) <= 1).astype(
        np.uint8
    )


def make_series(seed: int, patient: PatientInfo | None = None) -> CTSeries:
    """A tiny CT series (`SHAPE`, `SPACING`) with a fresh identity."""
    geometry = Geometry(SHAPE, origin=ORIGIN, spacing=SPACING)
    return CTSeries.from_volume(
        Volume(_hu(seed), geometry),
        patient=patient
        or PatientInfo(
            patient_name=PATIENT_NAME, patient_id=PATIENT_ID, patient_birth_date=PATIENT_BIRTH_DATE
        ),
        series_description="corpus",
    )


def _read_folder(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def build_case(seed: int = 1) -> TinyCase:
    """Write a tiny valid case with `jrs.io` and return it as bytes (about 0.2 s)."""
    with tempfile.TemporaryDirectory(prefix="jrs-tiny-") as tmp:
        root = Path(tmp)
        planning = make_series(seed)
        write_ct_series(planning, root / "planning")
        write_rtstruct({"Prostate": prostate_mask()}, planning, root / "rs.dcm")
        daily = make_series(seed + 1, patient=planning.patient)
        write_ct_series(daily, root / "daily")
        other = make_series(seed + 2)
        write_rtstruct({"Prostate": prostate_mask()}, other, root / "other_rs.dcm")
        return TinyCase(
            planning_ct=_read_folder(root / "planning"),
            rtstruct=(root / "rs.dcm").read_bytes(),
            daily_ct=_read_folder(root / "daily"),
            other_rtstruct=(root / "other_rs.dcm").read_bytes(),
        )
