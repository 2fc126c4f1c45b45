"""The site's output path per organ (``JRS_PATH_CHOICE``), as ``jrs recontour --path-choice``."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient

from jrs.service.app import create_app
from jrs.service.errors import ConfigurationError
from jrs.service.settings import load_settings
from tests.service.conftest import AUTH, Case, FakeRunner, make_settings, multipart


@pytest.mark.parametrize("value", ["prostate:fusion", "prostate=both", "liver=fusion"])
def test_an_invalid_path_choice_stops_the_start_up_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("JRS_API_KEYS", "k")
    monkeypatch.setenv("JRS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("JRS_PATH_CHOICE", f"bladder=segmentation,{value}")
    with pytest.raises(ConfigurationError) as err:
        load_settings()
    message = str(err.value)
    assert "JRS_PATH_CHOICE" in message and value in message and "ORGAN=PATH" in message


def test_the_setting_parses_like_the_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JRS_API_KEYS", "k")
    monkeypatch.setenv("JRS_PATH_CHOICE", "all=registration, prostate=fusion")
    assert load_settings().path_choices == {
        "bladder": "registration",
        "rectum": "registration",
        "seminal_vesicles": "registration",
        "prostate": "fusion",
    }
    monkeypatch.delenv("JRS_PATH_CHOICE")
    assert load_settings().path_choices == {}  # the model's validated choice everywhere


def test_recontour_jobs_use_it(tmp_path: Path, case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    import jrs.pipeline.run

    seen: list[Any] = []

    def recontour(
        planning_ct: Path,
        planning_rtstruct: Path,
        daily_ct: Path,
        out: Path,
        options: Any,
        **_: Any,
    ) -> Any:
        seen.append(dict(options.path_choice))
        return SimpleNamespace(qa_data=FakeRunner()(Path(out), Path(planning_ct), Path(daily_ct)))

    monkeypatch.setattr(
        jrs.pipeline.run, "load_backend", lambda _opts: SimpleNamespace(metadata={})
    )
    monkeypatch.setattr(jrs.pipeline.run, "recontour", recontour)
    settings = make_settings(tmp_path, adaptation="off", path_choice="prostate=fusion")
    with TestClient(create_app(settings)) as client:
        assert client.get("/health/ready").status_code == 200
        r = client.post(
            "/v1/recontour", headers=AUTH, files=multipart([case.planning_zip], [case.daily_zip])
        )
        assert r.status_code == 200, r.text
    assert seen == [{"prostate": "fusion"}]


def test_patient_models_use_it_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fraction re-contoured with the patient's own model keeps the site's path choice."""
    import jrs.pipeline.run
    from jrs.service.patients import PatientAwareRunner

    seen: list[Any] = []
    monkeypatch.setattr(
        jrs.pipeline.run, "load_backend", lambda _opts: SimpleNamespace(metadata={})
    )
    monkeypatch.setattr(
        jrs.pipeline.run,
        "recontour",
        lambda *args, **kw: seen.append(dict(args[4].path_choice)) or SimpleNamespace(qa_data={}),
    )
    settings = make_settings(tmp_path, adaptation="off", path_choice="all=fusion")

    def generic(job: Path, planning: Path, daily: Path) -> dict[str, Any]:
        return {}

    runner = PatientAwareRunner(generic, settings)
    runner.run_with_model(tmp_path / "job", tmp_path / "p", tmp_path / "d", tmp_path / "model")
    assert seen == [dict.fromkeys(("bladder", "rectum", "seminal_vesicles", "prostate"), "fusion")]
