"""The service's engine: JRS_ENGINE / JRS_PRECISION / JRS_DVF_SPACING_MM, compiled once at start.

Real pipeline and bundled model: the runner loads (compiles) the model in the app's lifespan and
keeps that one backend for every job; qa.json names the engine, device and precision.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from jrs.inference import openvino_available
from jrs.service.app import create_app
from jrs.service.errors import ConfigurationError
from jrs.service.jobs import PipelineRunner
from jrs.service.settings import load_settings
from tests.service.conftest import API_KEY, make_settings


def test_engine_precision_and_dvf_spacing_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env here
    monkeypatch.setenv("JRS_API_KEYS", "k")
    for var in ("JRS_ENGINE", "JRS_PRECISION", "JRS_DVF_SPACING_MM"):
        monkeypatch.delenv(var, raising=False)
    defaults = load_settings()
    assert (defaults.engine, defaults.precision, defaults.dvf_spacing_mm) == ("auto", "auto", 3.0)
    monkeypatch.setenv("JRS_ENGINE", "OpenVINO")
    monkeypatch.setenv("JRS_PRECISION", "fp32")
    monkeypatch.setenv("JRS_DVF_SPACING_MM", "0")
    s = load_settings()
    assert (s.engine, s.precision, s.dvf_spacing_mm) == ("openvino", "fp32", 0.0)
    monkeypatch.setenv("JRS_ENGINE", "tensorflow")
    with pytest.raises(ConfigurationError, match="JRS_ENGINE"):
        load_settings()
    monkeypatch.setenv("JRS_ENGINE", "auto")
    monkeypatch.setenv("JRS_PRECISION", "int8")
    with pytest.raises(ConfigurationError, match="JRS_PRECISION"):
        load_settings()


def test_runner_passes_engine_and_full_grid_request_to_the_pipeline() -> None:
    runner = PipelineRunner(None, "cpu", engine="onnxruntime", precision="fp32", dvf_spacing_mm=0)
    assert runner.dvf_spacing_mm is None  # 0: the daily CT grid
    runner.load()
    assert runner.ready, runner.reason
    assert runner.execution_provider == "CPUExecutionProvider"
    assert runner.engine_info["engine"] == "onnxruntime"
    assert runner._options.engine == "onnxruntime" and runner._options.precision == "fp32"
    assert runner._options.dvf_spacing_mm is None


@pytest.mark.skipif(not openvino_available(), reason="OpenVINO is not installed")
def test_app_compiles_the_model_once_and_reports_the_engine(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path, device="cpu", engine="openvino"))
    with TestClient(app) as client:
        r = client.get("/health/ready")
        assert r.status_code == 200, r.text
        assert r.json()["execution_provider"] == "OpenVINO:CPU"
        metrics = client.get("/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
        assert 'provider="OpenVINO:CPU"' in metrics
        runner = app.state.manager.runner
        assert runner.engine_info["engine"] == "openvino"
        assert runner.engine_info["precision"] in ("bf16", "fp32")
