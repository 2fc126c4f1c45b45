"""End to end through a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import io
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pydicom
import pytest

from tests.service.conftest import AUTH, Case, FakeRunner, multipart

pytestmark = pytest.mark.integration


def test_real_server_recontours_a_case_and_serves_the_rtstruct(
    case: Case, live_server_factory
) -> None:
    server = live_server_factory()
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as http:
        assert http.get("/health/live").json() == {"status": "alive"}
        assert http.get("/health/ready").status_code == 200

        # planning as a zip, daily as several DICOM files; do not wait: 202 then poll
        files = multipart([case.planning_zip], case.files(case.daily))
        r = http.post("/v1/recontour", params={"wait": "false"}, files=files)
        assert r.status_code in (200, 202), r.text
        job_id = r.json()["id"]
        assert r.headers["location"] == f"/v1/jobs/{job_id}"
        assert r.headers["x-request-id"]
        deadline = time.monotonic() + 20
        while (job := http.get(f"/v1/jobs/{job_id}").json())["status"] not in (
            "succeeded",
            "failed",
        ):
            assert time.monotonic() < deadline, job
            time.sleep(0.05)
        assert job["status"] == "succeeded", job
        assert job["qa"]["runner"] == "fake"
        assert job["links"]["rtstruct"] == f"/v1/jobs/{job_id}/rtstruct"

        rt = http.get(job["links"]["rtstruct"])
        assert rt.status_code == 200
        assert rt.headers["content-type"] == "application/dicom"
        ds = pydicom.dcmread(io.BytesIO(rt.content))
        assert ds.Modality == "RTSTRUCT"
        assert [roi.ROIName for roi in ds.StructureSetROISequence] == ["Prostate"]

        dvf = http.get(f"/v1/jobs/{job_id}/dvf", params={"format": "mha"})
        assert dvf.status_code == 200 and dvf.content.startswith(b"ObjectType")
        reg = http.get(f"/v1/jobs/{job_id}/dvf", params={"format": "dicom"})
        assert reg.headers["content-type"] == "application/dicom"
        assert http.get(f"/v1/jobs/{job_id}/dvf", params={"format": "nrrd"}).status_code == 422
        assert http.get(f"/v1/jobs/{job_id}/qa").json()["runner"] == "fake"
        png = http.get(f"/v1/jobs/{job_id}/review.png")
        assert png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"

        # wait=true (default): the answer carries the finished job
        r2 = http.post("/v1/recontour", files=multipart([case.planning_zip], [case.daily_zip]))
        assert r2.status_code == 200 and r2.json()["status"] == "succeeded"

        metrics = http.get("/metrics").text
        assert (
            'jrs_http_requests_total{method="POST",route="/v1/recontour",status="200"}' in metrics
        )
        assert 'jrs_jobs{state="succeeded"} 2.0' in metrics
        assert (
            'jrs_execution_provider{device="auto",provider="FakeExecutionProvider"} 1.0' in metrics
        )
        assert "jrs_job_stage_duration_seconds_bucket" in metrics


def test_ten_parallel_requests_all_complete_or_get_503(case: Case, live_server_factory) -> None:
    runner = FakeRunner(delay=0.15)
    server = live_server_factory(runner, max_concurrent_jobs=1, queue_size=3, job_wait_timeout_s=30)
    planning = case.planning_zip.read_bytes()
    daily = case.daily_zip.read_bytes()

    def post(_: int) -> httpx.Response:
        files = multipart([("planning.zip", planning)], [("daily.zip", daily)])
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as http:
            return http.post("/v1/recontour", files=files)

    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(post, range(10)))
    statuses = Counter(r.status_code for r in answers)
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[200] + statuses[503] == 10
    assert statuses[200] >= 1
    for r in answers:
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) == 7
            assert r.json()["error"] == "service_busy"
        else:
            assert r.json()["status"] == "succeeded"
    # none lost: every accepted job is in the store, succeeded, and nothing else is
    accepted = {r.json()["id"] for r in answers if r.status_code == 200}
    with httpx.Client(base_url=server.url, headers=AUTH) as http:
        for job_id in accepted:
            assert http.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"
    stored = server.app.state.store.jobs()
    assert {j.id for j in stored} == accepted
    assert runner.calls == len(accepted)
