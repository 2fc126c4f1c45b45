"""API fuzzing with schemathesis against the service's own OpenAPI document.

Every operation of ``/openapi.json`` is called with generated valid and invalid data (bounded:
`MAX_EXAMPLES` per operation and mode, no deadline), with a valid API key. The checks: no server
error, the status code is one the document declares, and the body and content type conform to it.
A second pass without a key must get 401 everywhere but ``/health/*``. The app runs in-process
(ASGI, lifespan started once) with a fake runner, so no network inference runs.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from jrs.service.app import create_app
from tests.reliability.cases import build_case
from tests.service.conftest import AUTH, FakeRunner, make_settings

#: Generated examples per operation and generation mode.
MAX_EXAMPLES = 25
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]


# The app is built at import (no lifespan yet, nothing written): schemathesis' lazy loader does
# not support pytest 9. Its lifespan starts at the first generated call and is stopped below.
_DATA = Path(tempfile.gettempdir()) / f"jrs-fuzz-{uuid.uuid4().hex}"
_APP = create_app(make_settings(_DATA, queue_size=64, job_wait_timeout_s=2.0), FakeRunner())
schema = schemathesis.openapi.from_dict(_APP.openapi())
schema.app = _APP
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])


EXISTING_JOB: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def _stop_the_app() -> Iterator[None]:
    # one succeeded job first (before schemathesis starts its own lifespan), for the job routes
    from fastapi.testclient import TestClient

    planning, daily = build_case().parts()
    files = [("planning", p) for p in planning] + [("daily", p) for p in daily]
    with TestClient(_APP) as client:
        job = client.post("/v1/recontour", headers=AUTH, files=files).json()
    assert job["status"] == "succeeded", job
    EXISTING_JOB.append(job["id"])
    yield
    from schemathesis.python import asgi

    asgi.shutdown_lifespans()
    shutil.rmtree(_DATA, ignore_errors=True)


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_api_fuzz_no_server_error_and_schema_conformance(case: schemathesis.Case) -> None:
    case.call_and_validate(headers=AUTH, checks=CHECKS)


@schema.include(path_regex="^/v1/jobs/").parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_api_fuzz_on_an_existing_job(case: schemathesis.Case) -> None:
    """The job routes again, with the id of a succeeded job (its artefacts exist)."""
    case.path_parameters = {**(case.path_parameters or {}), "job_id": EXISTING_JOB[0]}
    case.call_and_validate(headers=AUTH, checks=CHECKS)


@schema.parametrize()
@settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_api_fuzz_without_a_key_only_health_answers(case: schemathesis.Case) -> None:
    response = case.call()
    if case.method.upper() != case.operation.method.upper():  # an undocumented method
        assert response.status_code in (401, 405), (case.method, case.path)
    elif case.path.startswith("/health/"):
        assert response.status_code in (200, 503)
    else:
        assert response.status_code == 401, (case.method, case.path, response.status_code)
        assert response.headers["www-authenticate"] in ("Bearer", ["Bearer"])


def test_the_fuzzing_reached_the_app_and_no_answer_was_a_5xx() -> None:
    text = _APP.state.metrics.render().decode()
    counts = re.findall(r"^jrs_http_requests_total\{(.*)\} (\S+)$", text, re.MULTILINE)
    total = sum(float(n) for _, n in counts)
    statuses = {re.search(r'status="(\d+)"', labels).group(1) for labels, _ in counts}  # type: ignore[union-attr]
    assert total >= 150, total
    assert not [s for s in statuses if s.startswith("5") and s != "503"], statuses
    print(f"fuzzing: {total:.0f} requests, statuses {sorted(statuses)}")  # noqa: T201
