"""Security review items that are code: authentication, keys and patients out of logs, limits.

The other items are covered where they live: every route answering 401 without a key is
``tests/service/test_auth.py``; the non-root container user is ``tests/deploy/test_docker.py``
(``USER 10001``) and ``tests/deploy/test_helm.py`` (``runAsNonRoot``); TLS at the ingress is
``helm/README.md``. docs/reliability.md lists them.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from jrs.service.app import create_app
from jrs.service.logging_config import JsonFormatter, RedactUploadPaths
from jrs.service.settings import Settings
from tests.reliability import corpus
from tests.reliability.cases import SECRETS, TinyCase
from tests.service.conftest import API_KEY, AUTH, FakeRunner, make_settings

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_every_operation_but_health_declares_the_bearer_key(tmp_path: Path) -> None:
    document = create_app(make_settings(tmp_path), FakeRunner()).openapi()
    assert document["components"]["securitySchemes"]["ApiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": document["components"]["securitySchemes"]["ApiKey"]["description"],
    }
    operations = 0
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            declared = {name for req in operation.get("security", []) for name in req}
            if path.startswith("/health/"):
                assert not declared, (method, path)
            else:
                assert declared == {"ApiKey"}, (method, path)
                assert "401" in operation["responses"], (method, path)
                operations += 1
    assert operations >= 7


def test_keys_never_reach_the_logs(
    tmp_path: Path, tiny_case: TinyCase, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-key-that-must-not-be-logged-8c1d"
    app = create_app(make_settings(tmp_path), FakeRunner())
    with TestClient(app) as client:
        planning, daily = tiny_case.parts()
        files = [("planning", p) for p in planning] + [("daily", p) for p in daily]
        assert client.post("/v1/recontour", headers=AUTH, files=files).status_code == 200
        for headers in (
            {"Authorization": f"Bearer {wrong}"},
            {"Authorization": wrong},
            {"Authorization": f"Basic {wrong}"},
            {"X-Api-Key": wrong},
        ):
            assert client.get("/metrics", headers=headers).status_code == 401
        assert client.get("/metrics", headers=AUTH).status_code == 200
    text = "\n".join(JsonFormatter().format(r) for r in caplog.records) + caplog.text
    assert API_KEY not in text and wrong not in text
    assert "rejected an unknown API key" in text  # the event is logged, never the key
    assert API_KEY not in repr(app.state.settings) and API_KEY not in str(app.state.settings)


def test_settings_never_print_keys() -> None:
    settings = Settings(_env_file=None, api_keys=["s3cr3t-k3y"])  # type: ignore[call-arg]
    assert "s3cr3t-k3y" not in repr(settings)
    assert "s3cr3t-k3y" not in str(settings)
    assert "s3cr3t-k3y" not in repr(settings.model_dump(exclude={"api_keys"}))


def test_upload_paths_are_redacted_from_any_logger(tmp_path: Path) -> None:
    data = tmp_path / "data"
    redact = RedactUploadPaths([data])
    record = logging.LogRecord(
        "jrs.io.ct",
        logging.WARNING,
        __file__,
        1,
        "skipped 1 localizer image(s), e.g. %s",
        (data / "jobs" / "abc" / "input" / "daily" / "Secretname Patient CT1.dcm",),
        None,
    )
    redact.filter(record)
    assert record.getMessage() == "skipped 1 localizer image(s), e.g. <upload>"
    record = logging.LogRecord(
        "x", logging.INFO, __file__, 1, f"{data}/jobs/x/input/a b.dcm: ROI 'Prostate'", (), None
    )
    redact.filter(record)
    assert record.getMessage() == "<upload>"


#: Every upload limit (a ``JRS_*`` setting) and a corpus case that exceeds it.
LIMIT_CASES = {
    "JRS_MAX_UPLOAD_BYTES": "limits/upload-over-size",
    "JRS_MAX_FILES": "limits/too-many-parts",
    "JRS_MAX_ZIP_ENTRIES": "zip_bomb/too-many-entries",
    "JRS_MAX_COMPRESSION_RATIO": "zip_bomb/planning-entry-20MiB-zeros",
    "JRS_MAX_EXTRACTED_BYTES": "zip_bomb/extracted-total-over-limit",
    "JRS_MAX_VOXELS": "huge_dimensions/daily-rows4096-columns4096",
}


def test_every_upload_limit_has_a_corpus_case_naming_it() -> None:
    fields = {f"JRS_{name.upper()}" for name in Settings.model_fields}
    assert set(LIMIT_CASES) <= fields
    ids = {c.id: c for c in corpus.generate()}
    for setting, case_id in LIMIT_CASES.items():
        case = ids[case_id]
        assert case.status == (413,), case_id
        assert any(setting in pattern for pattern in case.expect), (setting, case.expect)


def test_the_reliability_modules_hold_no_real_patient_data() -> None:
    """The corpus is generated: no DICOM, zip or image file is committed under tests/reliability."""
    folder = REPO_ROOT / "tests" / "reliability"
    binaries = [p for p in folder.rglob("*") if p.suffix in (".dcm", ".zip", ".png", ".mha")]
    assert not binaries
    for secret in SECRETS:
        assert re.fullmatch(r"[A-Za-z0-9^\-]+", secret)  # synthetic, distinctive markers
