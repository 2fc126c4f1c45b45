"""App wiring: readiness, request ids, error answers, logs without patient data, layering, CLI."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from jrs.service.app import create_app
from jrs.service.logging_config import JsonFormatter
from tests.service.conftest import (
    AUTH,
    PATIENT_ID,
    PATIENT_NAME,
    Case,
    FakeRunner,
    make_settings,
    multipart,
)


def test_default_runner_is_not_ready_without_pipeline_or_model(
    tmp_path: Path, case: Case, monkeypatch: pytest.MonkeyPatch
) -> None:
    # default PipelineRunner, no model anywhere
    monkeypatch.setenv("JRS_MODEL_DIR", str(tmp_path / "no-models"))
    app = create_app(make_settings(tmp_path, model_dir=tmp_path / "no-models"))
    with TestClient(app) as client:
        assert client.get("/health/live").status_code == 200
        r = client.get("/health/ready")
        assert r.status_code == 503 and r.json()["error"] == "model_not_ready"
        assert r.json()["detail"] and r.headers["retry-after"]
        r = client.post(
            "/v1/recontour", headers=AUTH, files=multipart([case.planning_zip], [case.daily_zip])
        )
        assert r.status_code == 503 and r.json()["error"] == "model_not_ready"
        assert "jrs_model_ready 0.0" in client.get("/metrics", headers=AUTH).text


def test_request_id_is_echoed_or_generated(client: TestClient) -> None:
    r = client.get("/health/live", headers={"X-Request-ID": "tps-42.a"})
    assert r.headers["x-request-id"] == "tps-42.a"
    r = client.get("/health/live", headers={"X-Request-ID": "bad id\nwith newline"})
    generated = r.headers["x-request-id"]
    assert len(generated) == 32 and "bad" not in generated
    r = client.get("/v1/jobs/x", headers={"X-Request-ID": "abc-1"})
    assert r.status_code == 401 and r.json()["request_id"] == "abc-1"


def test_unhandled_exception_is_a_500_without_internals(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path), FakeRunner())

    @app.get("/v1/boom")
    def boom() -> None:
        raise RuntimeError("secret detail /srv/data/patient")

    with TestClient(app) as client:
        r = client.get("/v1/boom", headers={**AUTH, "X-Request-ID": "boom-1"})
        assert r.status_code == 500
        assert r.json() == {
            "error": "internal_error",
            "detail": "internal server error; quote the request id when reporting it",
            "request_id": "boom-1",
        }
        assert client.get("/health/live").status_code == 200
        r = client.get("/nowhere", headers=AUTH)
        assert r.status_code == 404 and r.json()["error"] == "not_found"


def test_logs_are_json_and_hold_no_patient_data(
    client: TestClient, case: Case, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    r = client.post(
        "/v1/recontour",
        headers={**AUTH, "X-Request-ID": "log-test-1"},
        files=multipart([case.planning_zip], [case.daily_zip]),
    )
    assert r.status_code == 200
    # a refused upload whose message names files
    client.post(
        "/v1/recontour",
        headers=AUTH,
        files=multipart(case.files(case.planning / "ct"), [case.daily_zip]),
    )
    formatter = JsonFormatter()
    lines = [json.loads(formatter.format(rec)) for rec in caplog.records]
    assert any(e["request_id"] == "log-test-1" and e.get("route") == "/v1/recontour" for e in lines)
    assert any(e.get("error") == "invalid_input" and e.get("status") == 422 for e in lines)
    everything = "\n".join(json.dumps(e) for e in lines) + caplog.text
    for secret in (
        PATIENT_NAME,
        PATIENT_ID,
        "Secretname",
        "test-key",
        "CT.0001.dcm",
        "no RTSTRUCT",
    ):
        assert secret not in everything, secret
    root = logging.getLogger()
    assert any(isinstance(h.formatter, JsonFormatter) for h in root.handlers)


def test_importing_the_service_does_not_load_torch() -> None:
    code = (
        "import sys, importlib, pkgutil, service\n"
        "for m in pkgutil.walk_packages(service.__path__, 'service.'):\n"
        "    importlib.import_module(m.name)\n"
        "import jrs.service.app\n"
        "bad = [m for m in ('torch', 'training', 'model_export') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_openapi_has_examples(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    post = doc["paths"]["/v1/recontour"]["post"]
    body = post["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["required"] == ["planning", "daily"]
    assert {"200", "202", "401", "413", "415", "422", "503"} <= set(post["responses"])
    assert (
        post["responses"]["200"]["content"]["application/json"]["example"]["status"] == "succeeded"
    )
    assert (
        "application/dicom"
        in doc["paths"]["/v1/jobs/{job_id}/rtstruct"]["get"]["responses"]["200"]["content"]
    )


def test_pipeline_runner_adapts_the_pipeline_api(
    tmp_path: Path, case: Case, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default runner loads the backend once and calls ``recontour`` with it."""
    import types
    from dataclasses import dataclass

    from jrs.service.jobs import PipelineRunner

    calls: dict = {}

    @dataclass
    class Options:
        model_dir: Path | None = None
        device: str = "auto"
        margin_mm: float = 30.0
        dvf_spacing_mm: float | None = None

    class Backend:
        providers = ("CPUExecutionProvider",)

    def recontour(planning_ct, planning_rtstruct, daily_ct, out, options, *, backend):
        calls.update(planning_rtstruct=planning_rtstruct, backend=backend, options=options)
        return types.SimpleNamespace(qa_data={"ok": True})

    fake = types.ModuleType("jrs.pipeline.run")
    fake.RecontourOptions = Options
    fake.load_backend = lambda options: Backend()
    fake.recontour = recontour
    monkeypatch.setitem(sys.modules, "jrs.pipeline.run", fake)
    runner = PipelineRunner(None, device="cpu", margin_mm=12.0, dvf_spacing_mm=2.5)
    runner.load()
    assert runner.ready and runner.execution_provider == "CPUExecutionProvider"
    qa = runner(tmp_path / "job", tmp_path / "in" / "planning", tmp_path / "in" / "daily")
    assert qa == {"ok": True}
    assert calls["planning_rtstruct"] == tmp_path / "in" / "planning" / "rtstruct.dcm"
    assert isinstance(calls["backend"], Backend) and calls["options"].device == "cpu"
    assert calls["options"].margin_mm == 12.0 and calls["options"].dvf_spacing_mm == 2.5
