"""The patient workflow end to end: real uvicorn, real pipeline, real ``jrs adapt`` subprocess.

A tiny exported model (``weights.pt`` included) serves and is adapted with a tiny budget on a
small phantom; the server is restarted while the adaptation runs, which continues from its work
folder; fractions get contours from the generic model meanwhile and from the patient model once
it is ready (when the held-back fractions kept it); the patient is deleted at the end.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from jrs.service.jobs import PipelineRunner
from tests.adapt_fixtures import phantom_planning, tiny_base
from tests.service.conftest import AUTH, make_settings, zip_folder
from tests.service.test_patients import Server

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for s in started:
        if s.thread.is_alive():
            s.stop()


def _files(field: str, archive: Path) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(field, (archive.name, archive.read_bytes(), "application/zip"))]


def _patient(http: httpx.Client, pid: str) -> dict[str, Any]:
    r = http.get(f"/v1/patients/{pid}")
    assert r.status_code == 200, r.text
    return dict(r.json())


def _wait(http: httpx.Client, pid: str, done: Any, timeout: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not done(body := _patient(http, pid)):
        assert time.monotonic() < deadline, body
        time.sleep(0.5)
    return body


def _fraction(http: httpx.Client, pid: str, archive: Path) -> dict[str, Any]:
    r = http.post(
        f"/v1/patients/{pid}/fractions", params={"timeout": 600}, files=_files("daily", archive)
    )
    assert r.status_code == 200, r.text
    job = dict(r.json())
    assert job["status"] == "succeeded", job
    return job


def test_upload_adapt_restart_recontour_two_fractions_and_delete(
    tmp_path: Path, servers: list[Server]
) -> None:
    model = tiny_base(tmp_path / "models")
    case = phantom_planning(tmp_path / "data", seed=11, fractions=2)
    planning = zip_folder(case / "planning", tmp_path / "planning.zip")
    daily = [zip_folder(case / f"fraction_{k}" / "ct", tmp_path / f"daily{k}.zip") for k in (1, 2)]
    settings = make_settings(
        tmp_path / "srv",
        model_dir=model,
        device="cpu",
        adaptation="local",
        adapt_minutes=3.0,
        adapt_args="--fractions 1 --val-fractions 1 --min-steps 2 --max-steps 3 --threads 2",
        job_wait_timeout_s=600.0,
        max_wait_timeout_s=600.0,
        max_upload_bytes=200 * 1024 * 1024,
        shutdown_grace_s=60.0,
    )

    def serve() -> Server:
        runner = PipelineRunner(settings.model_dir, settings.device, engine=settings.engine)
        servers.append(server := Server(settings, runner))
        return server

    first = serve()
    with httpx.Client(base_url=first.url, headers=AUTH, timeout=700) as http:
        r = http.post("/v1/patients", files=_files("planning", planning))
        assert r.status_code == 201, r.text
        pid = r.json()["id"]
        assert r.json()["adaptation"]["status"] in ("queued", "running")
        # the adaptation makes progress (its work folder holds state), then the server restarts
        _wait(http, pid, lambda b: (b["adaptation"]["progress"] or {}).get("phase") is not None)
    first.stop()
    folder = settings.data_dir / "patients" / pid
    log = (folder / "adapt.log").read_text()
    assert "interrupted: " in log  # stopped while it ran: it checkpointed and exited 75

    second = serve()
    with httpx.Client(base_url=second.url, headers=AUTH, timeout=700) as http:
        job1 = _fraction(http, pid, daily[0])
        qa1 = job1["qa"]
        assert qa1["patient"]["id"] == pid and qa1["model"]["kind"] in ("generic", "patient")
        if qa1["model"]["kind"] == "generic":
            assert qa1["patient"]["generic_because"]
        done = _wait(http, pid, lambda b: b["adaptation"]["status"] in ("succeeded", "failed"))
        ada = done["adaptation"]
        assert ada["status"] == "succeeded", ada
        assert ada["attempts"] == 2
        assert "continuing an interrupted adaptation" in (folder / "adapt.log").read_text()
        result = ada["result"]
        assert result["steps"] == 3 and set(result["dsc"]) >= {"prostate", "rectum", "bladder"}
        meta = json.loads((folder / "model" / "metadata.json").read_text())
        assert meta["adaptation"]["planning_series_sha256"] == done["planning"]["series_sha256"]
        assert ada["model"] == ("patient" if result["kept"] else "generic")

        job2 = _fraction(http, pid, daily[1])
        qa2 = job2["qa"]
        assert qa2["model"]["kind"] == ada["model"]
        if result["kept"]:
            assert qa2["model"]["name"] == "crossstitch-patient"
            assert qa2["model"]["sha256"] == meta["sha256"]
        else:
            assert qa2["model"]["name"] == "crossstitch"
            assert qa2["patient"]["generic_because"] == result["reason"]
        rt = http.get(f"/v1/jobs/{job2['id']}/rtstruct")
        assert rt.status_code == 200 and rt.headers["content-type"] == "application/dicom"
        listed = [f["id"] for f in _patient(http, pid)["fractions"]]
        assert listed == [job1["id"], job2["id"]]

        assert http.delete(f"/v1/patients/{pid}").status_code == 204
        assert http.get(f"/v1/patients/{pid}").status_code == 404
        assert http.get(f"/v1/jobs/{job1['id']}").status_code == 404
        assert not folder.exists()
