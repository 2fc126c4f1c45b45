"""Fixtures of the service tests: a small synthetic case, a fake runner, apps and a real server."""

from __future__ import annotations

import io
import shutil
import socket
import struct
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from fastapi import FastAPI
from fastapi.testclient import TestClient

from jrs.core.errors import InvalidInput
from jrs.core.geometry import Geometry, Volume
from jrs.io.ct_writer import write_ct_series
from jrs.io.rtstruct_writer import write_rtstruct
from jrs.io.series import CTSeries, PatientInfo
from jrs.service.app import create_app
from jrs.service.settings import Settings

API_KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
#: Patient identifiers of the synthetic case: they must never appear in the logs.
PATIENT_NAME = "Secretname^Patientus"
PATIENT_ID = "PID-SECRET-4711"
SHAPE = (20, 64, 64)


def _png(width: int = 4, height: int = 4) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    raw = b"".join(b"\x00" + b"\x80" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


PNG = _png()


def make_ct(seed: int, patient: PatientInfo | None = None) -> CTSeries:
    """A small synthetic pelvis-like CT (64x64x20, 3 mm voxels) with its own frame of reference."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = SHAPE
    z, y, x = np.mgrid[0:nz, 0:ny, 0:nx]
    hu = np.full(SHAPE, -1000.0, np.float32)
    body = ((x - 32) / 28.0) ** 2 + ((y - 32) / 22.0) ** 2 <= 1
    hu[body] = 20.0
    hu[((x - 32 - seed % 3) ** 2 + (y - 34) ** 2 + (z - 10) ** 2) <= 36] = 45.0
    hu += rng.normal(0, 5, SHAPE).astype(np.float32)
    geometry = Geometry(SHAPE, origin=(-96.0, -96.0, -30.0), spacing=(3.0, 3.0, 3.0))
    return CTSeries.from_volume(
        Volume(hu, geometry),
        patient=patient or PatientInfo(patient_name=PATIENT_NAME, patient_id=PATIENT_ID),
    )


def prostate_mask() -> np.ndarray:
    nz, ny, nx = SHAPE
    z, y, x = np.mgrid[0:nz, 0:ny, 0:nx]
    return (((x - 32) ** 2 + (y - 34) ** 2 + (z - 10) ** 2) <= 36).astype(np.uint8)


def zip_folder(folder: Path, out: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, prefix + str(p.relative_to(folder)))
    return out


@dataclass
class Case:
    """Files of a synthetic case on disk."""

    root: Path
    planning: Path  # folder: ct/ + rtstruct.dcm
    daily: Path  # folder: ct/
    planning_zip: Path
    daily_zip: Path
    mr_daily: Path  # the daily CT re-labelled as MR
    foreign_rtstruct: Path  # RTSTRUCT drawn on another frame of reference

    def files(self, folder: Path) -> list[Path]:
        return sorted(p for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="session")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    root = tmp_path_factory.mktemp("case")
    planning_ct = make_ct(1)
    write_ct_series(planning_ct, root / "planning" / "ct")
    write_rtstruct({"Prostate": prostate_mask()}, planning_ct, root / "planning" / "rtstruct.dcm")
    daily_ct = make_ct(2, patient=planning_ct.patient)
    write_ct_series(daily_ct, root / "daily" / "ct")
    other_ct = make_ct(3)
    write_rtstruct({"Prostate": prostate_mask()}, other_ct, root / "foreign" / "rtstruct.dcm")
    mr = root / "mr"
    mr.mkdir()
    for p in sorted((root / "daily" / "ct").iterdir()):
        ds = pydicom.dcmread(p)
        ds.Modality = "MR"
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.save_as(mr / p.name)
    return Case(
        root=root,
        planning=root / "planning",
        daily=root / "daily",
        planning_zip=zip_folder(root / "planning", root / "planning.zip"),
        daily_zip=zip_folder(root / "daily", root / "daily.zip"),
        mr_daily=mr,
        foreign_rtstruct=root / "foreign" / "rtstruct.dcm",
    )


def multipart(
    planning: list[Path] | list[tuple[str, bytes]], daily: list[Path] | list[tuple[str, bytes]]
) -> list[tuple[str, tuple[str, bytes, str]]]:
    """httpx ``files=`` for the two fields (paths or (name, bytes))."""
    out: list[tuple[str, tuple[str, bytes, str]]] = []
    for field, items in (("planning", planning), ("daily", daily)):
        for item in items:
            name, data = (item.name, item.read_bytes()) if isinstance(item, Path) else item
            ctype = "application/zip" if name.endswith(".zip") else "application/dicom"
            out.append((field, (name, data, ctype)))
    return out


class FakeRunner:
    """Stand-in for the pipeline: writes small real artefacts.

    The RTSTRUCT is the planning RTSTRUCT copied (a stand-in), the DVF a zero field on a tiny
    grid, the review image a 4x4 PNG. `gate` blocks runs until set; `fail` makes runs raise.
    """

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.fail: Exception | None = None
        self.calls = 0
        self.device = "cpu"
        self.execution_provider = "FakeExecutionProvider"
        self._lock = threading.Lock()

    def __call__(self, job_dir: Path, planning_dir: Path, daily_dir: Path) -> dict[str, Any]:
        with self._lock:
            self.calls += 1
        self.started.set()
        if not self.gate.wait(30):
            raise RuntimeError("gate never opened")
        if self.delay:
            time.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        if not (planning_dir / "rtstruct.dcm").is_file() or not any(daily_dir.rglob("*")):
            raise InvalidInput("fake runner: inputs missing")
        shutil.copyfile(planning_dir / "rtstruct.dcm", job_dir / "rtstruct.dcm")
        shutil.copyfile(planning_dir / "rtstruct.dcm", job_dir / "registration.dcm")
        field = sitk.Image([4, 4, 4], sitk.sitkVectorFloat32, 3)
        sitk.WriteImage(field, str(job_dir / "dvf.mha"))
        (job_dir / "review.png").write_bytes(PNG)
        return {"structures": {"Prostate": {"flag": "ok"}}, "runner": "fake"}


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "api_keys": [API_KEY],
        "data_dir": tmp_path / "data",
        "max_upload_bytes": 3 * 1024 * 1024,
        "max_concurrent_jobs": 1,
        "queue_size": 4,
        "job_wait_timeout_s": 20.0,
        "shutdown_grace_s": 5.0,
        "retry_after_s": 7,
        "log_level": "INFO",
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture
def runner() -> FakeRunner:
    return FakeRunner()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
def app(settings: Settings, runner: FakeRunner) -> FastAPI:
    return create_app(settings, runner)


@pytest.fixture
def client(app: FastAPI, runner: FakeRunner) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c
    runner.gate.set()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LiveServer:
    url: str
    app: FastAPI
    runner: FakeRunner
    settings: Settings


@pytest.fixture
def live_server_factory(tmp_path: Path) -> Iterator[Callable[..., LiveServer]]:
    """Start real uvicorn servers on 127.0.0.1 (free port) in threads; stopped at teardown."""
    import uvicorn

    started: list[tuple[uvicorn.Server, threading.Thread, FakeRunner]] = []

    def start(runner: FakeRunner | None = None, **overrides: Any) -> LiveServer:
        runner = runner or FakeRunner()
        settings = make_settings(tmp_path / f"server{len(started)}", **overrides)
        app = create_app(settings, runner)
        port = free_port()
        config = uvicorn.Config(
            app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="on"
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        started.append((server, thread, runner))
        return LiveServer(f"http://127.0.0.1:{port}", app, runner, settings)

    yield start
    for server, thread, runner in started:
        runner.gate.set()
        server.should_exit = True
        thread.join(20)


def read_zip_bytes(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()
