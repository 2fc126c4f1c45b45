"""Fault injection: killed workers, restarts with queued jobs, full disks, bad models, no CUDA.

The process faults run the real service in its own uvicorn process (`tests.reliability.server`)
and kill or stop it; the storage and model faults run the app in-process (TestClient) with the
fault injected where the operating system would raise it.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import shutil
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from jrs.service.app import create_app
from jrs.service.jobs import JobStore
from tests.reliability.cases import TinyCase, zip_bytes
from tests.reliability.conftest import FORBIDDEN
from tests.reliability.server import AUTH, ServerProcess, signal, start_server
from tests.service.conftest import AUTH as TEST_AUTH
from tests.service.conftest import FakeRunner, make_settings

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLED_MODEL = REPO_ROOT / "models" / "crossstitch" / "1"


def _cpu_engine_provider() -> str:
    """What JRS_ENGINE=auto runs on the CPU: OpenVINO where installed, else ONNX Runtime."""
    from jrs.inference import openvino_available

    return "OpenVINO:CPU" if openvino_available() else "CPUExecutionProvider"


# ------------------------------------------------------------------------------ helpers
def _files(case: TinyCase, crash: bool = False) -> list[tuple[str, tuple[str, bytes, str]]]:
    planning = {f"ct/{n}": d for n, d in case.planning_ct.items()}
    planning["RS.dcm"] = case.rtstruct
    if crash:
        planning["CRASH"] = b"the stub runner kills its process on this job"
    return [
        ("planning", ("planning.zip", zip_bytes(planning), "application/zip")),
        ("daily", ("daily.zip", case.daily_zip(), "application/zip")),
    ]


def _submit(server: ServerProcess, case: TinyCase, crash: bool = False) -> str:
    r = httpx.post(
        f"{server.url}/v1/recontour",
        params={"wait": "false"},
        files=_files(case, crash),
        headers=AUTH,
        timeout=60,
    )
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def _status(url: str, job_id: str) -> dict[str, Any]:
    r = httpx.get(f"{url}/v1/jobs/{job_id}", headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text
    return dict(r.json())


def _wait_status(url: str, job_id: str, states: set[str], timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = _status(url, job_id)
        if job["status"] in states:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def _attempts(data_dir: Path) -> dict[str, int]:
    with sqlite3.connect(data_dir / "jobs.sqlite3") as db:
        return dict(db.execute("SELECT id, attempts FROM jobs").fetchall())


def _log_entries(server: ServerProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in server.log_text().splitlines() if line.startswith("{")]


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        if server.alive():
            server.kill()
    for server in started[:1]:  # one log file per test, shared by its processes
        text = server.log_text()
        leaked = [word for word in FORBIDDEN if word in text]
        assert not leaked, f"the service log named {leaked}"


# ------------------------------------------------------------------------------ processes
@pytest.mark.integration
def test_process_killed_mid_job_the_job_is_retried_once_and_others_complete(
    tmp_path: Path, tiny_case: TinyCase, processes: list[ServerProcess]
) -> None:
    hold = tmp_path / "hold"
    hold.touch()
    data, log = tmp_path / "data", tmp_path / "service.log"
    env = {"JRS_STUB_HOLD_FILE": str(hold), "JRS_MAX_CONCURRENT_JOBS": "1"}
    first = start_server(data, log, env=env)
    processes.append(first)
    ids = [_submit(first, tiny_case) for _ in range(3)]
    _wait_status(first.url, ids[0], {"running"})
    assert [_status(first.url, j)["status"] for j in ids[1:]] == ["queued", "queued"]
    assert first.kill() == -signal.SIGKILL  # no shutdown: the job is left "running"

    hold.unlink()
    second = start_server(data, log, env=env)
    processes.append(second)
    for job_id in ids:
        assert _wait_status(second.url, job_id, {"succeeded", "failed"})["status"] == "succeeded"
    assert _attempts(data) == {ids[0]: 2, ids[1]: 1, ids[2]: 1}  # the killed one: retried once
    recovered = [
        e for e in _log_entries(second) if e["msg"] == "recovered jobs of a previous process"
    ]
    assert recovered[-1]["requeued"] == 3 and recovered[-1]["failed"] == 0
    second.stop()


@pytest.mark.integration
def test_a_job_that_kills_its_process_twice_ends_failed_and_the_others_complete(
    tmp_path: Path, tiny_case: TinyCase, processes: list[ServerProcess]
) -> None:
    data, log = tmp_path / "data", tmp_path / "service.log"
    env = {"JRS_STUB_CRASH": "1", "JRS_MAX_CONCURRENT_JOBS": "1", "JRS_MAX_ATTEMPTS": "2"}
    hold = tmp_path / "hold"
    hold.touch()  # hold the first process until both jobs are queued
    server = start_server(data, log, env={**env, "JRS_STUB_HOLD_FILE": str(hold)})
    processes.append(server)
    poison = _submit(server, tiny_case, crash=True)
    good = _submit(server, tiny_case)
    hold.unlink()  # the poison job starts and kills the process (exit 137, as OOM-killed)
    assert server.proc.wait(30) == 137
    # the restart re-queues it once (attempt 2): it kills this process too, at once
    server = start_server(data, log, env=env, wait=False)
    processes.append(server)
    assert server.proc.wait(60) == 137
    server = start_server(data, log, env=env)  # attempt 3 would exceed JRS_MAX_ATTEMPTS
    processes.append(server)
    poisoned = _wait_status(server.url, poison, {"succeeded", "failed"})
    assert poisoned["status"] == "failed"
    assert poisoned["error"]["code"] == "interrupted"
    assert "2 attempts" in poisoned["error"]["message"]
    assert "submit the job again" in poisoned["error"]["message"]
    assert _wait_status(server.url, good, {"succeeded", "failed"})["status"] == "succeeded"
    assert _attempts(data)[poison] == 2
    server.stop()


@pytest.mark.integration
def test_restart_with_queued_jobs_none_vanish(
    tmp_path: Path, tiny_case: TinyCase, processes: list[ServerProcess]
) -> None:
    hold = tmp_path / "hold"
    hold.touch()
    data, log = tmp_path / "data", tmp_path / "service.log"
    env = {
        "JRS_STUB_HOLD_FILE": str(hold),
        "JRS_MAX_CONCURRENT_JOBS": "1",
        "JRS_SHUTDOWN_GRACE_S": "0.5",
    }
    first = start_server(data, log, env=env)
    processes.append(first)
    ids = [_submit(first, tiny_case) for _ in range(4)]
    _wait_status(first.url, ids[0], {"running"})
    assert first.stop(signal.SIGTERM) in (0, -signal.SIGTERM)  # graceful: drains, marks
    shutdown = [e for e in _log_entries(first) if e["msg"] == "shutdown"]
    assert shutdown and shutdown[-1]["left_queued"] == 3 and shutdown[-1]["marked_failed"] == 1

    hold.unlink()
    second = start_server(data, log, env=env)
    processes.append(second)
    stuck = _wait_status(second.url, ids[0], {"succeeded", "failed"})
    assert stuck["status"] == "failed" and stuck["error"]["code"] == "interrupted"
    assert "shut down" in stuck["error"]["message"]
    for job_id in ids[1:]:  # the queued ones resume in the new process
        assert _wait_status(second.url, job_id, {"succeeded", "failed"})["status"] == "succeeded"
    store = JobStore(data / "jobs.sqlite3")
    assert {j.id for j in store.jobs()} == set(ids)  # none vanished
    store.close()
    second.stop()


def test_a_runner_that_stops_its_worker_thread_fails_only_that_job(
    tmp_path: Path, tiny_case: TinyCase
) -> None:
    """SystemExit (or KeyboardInterrupt) raised in a worker: the job fails, the worker lives."""
    runner = FakeRunner()
    app = create_app(make_settings(tmp_path, max_concurrent_jobs=1), runner)
    with TestClient(app) as client:
        runner.fail = SystemExit(3)  # type: ignore[assignment]
        r = client.post("/v1/recontour", headers=TEST_AUTH, files=_files(tiny_case))
        job = r.json()
        assert job["status"] == "failed" and job["error"]["code"] == "interrupted", job
        assert "SystemExit" in job["error"]["message"]
        runner.fail = None
        r = client.post("/v1/recontour", headers=TEST_AUTH, files=_files(tiny_case))
        assert r.json()["status"] == "succeeded"  # the same single worker took the next job


# ------------------------------------------------------------------------------ storage
def test_disk_below_the_free_space_floor_answers_507(
    tmp_path: Path, tiny_case: TinyCase, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(make_settings(tmp_path, min_free_bytes=100 * 2**20), FakeRunner())
    real = shutil.disk_usage
    free = {"bytes": 10 * 2**20}

    def disk_usage(path: Any) -> Any:
        usage = real(path)
        return type(usage)(usage.total, usage.total - free["bytes"], free["bytes"])

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    with TestClient(app) as client:
        r = client.post("/v1/recontour", headers=TEST_AUTH, files=_files(tiny_case))
        assert r.status_code == 507, r.text
        body = r.json()
        assert body["error"] == "storage_full"
        assert "10 MiB free" in body["detail"] and "JRS_MIN_FREE_BYTES" in body["detail"]
        assert not any(app.state.settings.jobs_dir.iterdir())
        assert client.get("/health/ready").status_code == 200  # reads and polls still work
        metrics = client.get("/metrics", headers=TEST_AUTH).text
        gauge = re.search(r"^jrs_storage_free_bytes (\S+)$", metrics, re.MULTILINE)
        assert gauge and float(gauge.group(1)) == 10 * 2**20
        assert 'jrs_job_outcomes_total{outcome="rejected"} 1.0' in metrics
        free["bytes"] = 10 * 2**30
        r = client.post("/v1/recontour", headers=TEST_AUTH, files=_files(tiny_case))
        assert r.status_code == 200 and r.json()["status"] == "succeeded"


def _no_space(*args: Any, **kwargs: Any) -> Any:
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["receiving", "unpacking"])
def test_disk_full_during_an_upload_answers_507_and_keeps_nothing(
    tmp_path: Path, tiny_case: TinyCase, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    import zipfile

    from jrs.service import uploads

    app = create_app(make_settings(tmp_path), FakeRunner())
    with TestClient(app) as client:
        if where == "receiving":
            monkeypatch.setattr(uploads._MultipartSink, "on_part_data", _no_space)
        else:
            monkeypatch.setattr(zipfile.ZipExtFile, "read", _no_space)
        r = client.post("/v1/recontour", headers=TEST_AUTH, files=_files(tiny_case))
        assert r.status_code == 507, r.text
        assert r.json()["error"] == "storage_full"
        assert "no space left" in r.json()["detail"]
        assert not any(app.state.settings.jobs_dir.iterdir())
        assert app.state.store.jobs() == []
        monkeypatch.undo()
        r = client.post("/v1/recontour", headers=TEST_AUTH, files=_files(tiny_case))
        assert r.status_code == 200 and r.json()["status"] == "succeeded"


def test_disk_full_while_writing_artefacts_fails_the_job_with_storage_full(
    tmp_path: Path, tiny_case: TinyCase
) -> None:
    runner = FakeRunner()
    app = create_app(make_settings(tmp_path), runner)
    with TestClient(app) as client:
        runner.fail = OSError(errno.ENOSPC, "No space left on device")  # type: ignore[assignment]
        job = client.post("/v1/recontour", headers=TEST_AUTH, files=_files(tiny_case)).json()
        assert job["status"] == "failed"
        assert job["error"]["code"] == "storage_full"
        assert "no space left" in job["error"]["message"]
        runner.fail = OSError(errno.EIO, "Input/output error")  # type: ignore[assignment]
        job = client.post("/v1/recontour", headers=TEST_AUTH, files=_files(tiny_case)).json()
        assert job["error"]["code"] == "internal_error"  # another I/O fault is not "full"
        runner.fail = None
        job = client.post("/v1/recontour", headers=TEST_AUTH, files=_files(tiny_case)).json()
        assert job["status"] == "succeeded"


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        ("database or disk is full", 507, "storage_full"),
        ("database is locked", 503, "service_busy"),
    ],
)
def test_job_store_failures_answer_507_or_503(
    tmp_path: Path,
    tiny_case: TinyCase,
    monkeypatch: pytest.MonkeyPatch,
    error: str,
    status: int,
    code: str,
) -> None:
    app = create_app(make_settings(tmp_path), FakeRunner())
    with TestClient(app) as client:

        def create(*args: Any, **kwargs: Any) -> Any:
            raise sqlite3.OperationalError(error)

        monkeypatch.setattr(JobStore, "create", create)
        r = client.post("/v1/recontour", headers=TEST_AUTH, files=_files(tiny_case))
        assert r.status_code == status and r.json()["error"] == code, r.text
        if status == 503:
            assert r.headers["retry-after"] == "7"
        assert not any(app.state.settings.jobs_dir.iterdir())


# ------------------------------------------------------------------------------ the model
def _model_copy(tmp_path: Path) -> Path:
    return Path(shutil.copytree(BUNDLED_MODEL, tmp_path / "models" / "crossstitch" / "1"))


def _break_model(tmp_path: Path, how: str) -> Path:
    if how == "folder-missing":
        return tmp_path / "nowhere"
    if how == "empty-folder":
        (tmp_path / "empty").mkdir()
        return tmp_path / "empty"
    folder = _model_copy(tmp_path)
    onnx, meta = folder / "model.onnx", folder / "metadata.json"
    if how == "onnx-missing":
        onnx.unlink()
    elif how == "onnx-truncated":
        onnx.write_bytes(onnx.read_bytes()[: onnx.stat().st_size // 2])
    elif how == "metadata-not-json":
        meta.write_text("{not json", encoding="utf-8")
    elif how == "onnx-garbage-matching-digest":
        import hashlib

        garbage = b"\x08\x07garbage that is no ONNX graph" * 100
        onnx.write_bytes(garbage)
        data = json.loads(meta.read_text(encoding="utf-8"))
        data["sha256"] = hashlib.sha256(garbage).hexdigest()
        meta.write_text(json.dumps(data), encoding="utf-8")
    return folder


BROKEN_MODELS = {
    "folder-missing": "does not exist",
    "empty-folder": "holds no model",
    "onnx-missing": "model file not found",
    "onnx-truncated": "sha256 does not match",
    "metadata-not-json": "unreadable model metadata",
    # the engine (OpenVINO or ONNX Runtime, whichever JRS_ENGINE=auto takes on the CPU) says so
    "onnx-garbage-matching-digest": "cannot load the model",
}


@pytest.mark.parametrize("how", list(BROKEN_MODELS))
def test_missing_or_corrupt_model_at_start_live_but_not_ready_with_a_clear_log(
    tmp_path: Path, tiny_case: TinyCase, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    model_dir = _break_model(tmp_path, how)
    app = create_app(make_settings(tmp_path, model_dir=model_dir, device="cpu"))
    caplog.set_level(logging.INFO)
    with TestClient(app) as client:
        assert client.get("/health/live").status_code == 200
        r = client.get("/health/ready")
        assert r.status_code == 503 and r.json()["error"] == "model_not_ready"
        assert BROKEN_MODELS[how] in r.json()["detail"], r.json()
        assert r.headers["retry-after"]
        r = client.post("/v1/recontour", headers=TEST_AUTH, files=_files(tiny_case))
        assert r.status_code == 503 and r.json()["error"] == "model_not_ready"
        assert "jrs_model_ready 0.0" in client.get("/metrics", headers=TEST_AUTH).text
    records = [r for r in caplog.records if r.getMessage().startswith("model not ready")]
    assert records and records[0].levelno == logging.ERROR
    assert BROKEN_MODELS[how] in records[0].fields["reason"]  # type: ignore[attr-defined]


def test_a_good_model_copy_is_ready(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path, model_dir=_model_copy(tmp_path), device="cpu"))
    with TestClient(app) as client:
        r = client.get("/health/ready")
        assert r.status_code == 200 and r.json()["execution_provider"] == _cpu_engine_provider()


def _has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(_has_cuda(), reason="a CUDA provider is installed")
@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider':UserWarning")
@pytest.mark.parametrize("cuda_listed", [False, True])
def test_cuda_unavailable_falls_back_to_the_cpu_with_a_warning(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    cuda_listed: bool,
) -> None:
    """device=auto: no CUDA provider, or one listed that fails to start (no driver, no GPU)."""
    import jrs.inference

    if cuda_listed:
        monkeypatch.setattr(
            jrs.inference,
            "available_providers",
            lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
        )
    caplog.set_level(logging.INFO)
    app = create_app(make_settings(tmp_path, model_dir=BUNDLED_MODEL, device="auto"))
    with TestClient(app) as client:
        r = client.get("/health/ready")
        assert r.status_code == 200, r.text
        # the CPU engine JRS_ENGINE=auto picks (OpenVINO where installed; it was ONNX Runtime's
        # CPUExecutionProvider before there were several engines)
        provider = _cpu_engine_provider()
        assert r.json()["execution_provider"] == provider
        metrics = client.get("/metrics", headers=TEST_AUTH).text
        assert f'jrs_execution_provider{{device="auto",provider="{provider}"}} 1.0' in metrics
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name == "jrs.inference"
    ]
    assert any("CUDAExecutionProvider" in w and "CPU" in w for w in warnings), warnings


@pytest.mark.skipif(_has_cuda(), reason="a CUDA provider is installed")
def test_cuda_asked_for_explicitly_is_not_ready_rather_than_slow(tmp_path: Path) -> None:
    """device=cuda names a GPU deployment: without CUDA the service says so instead of falling
    back to a CPU run tens of times slower (device=auto is the one that falls back)."""
    app = create_app(make_settings(tmp_path, model_dir=BUNDLED_MODEL, device="cuda"))
    with TestClient(app) as client:
        assert client.get("/health/live").status_code == 200
        r = client.get("/health/ready")
        assert r.status_code == 503
        assert "CUDAExecutionProvider" in r.json()["detail"]
        assert "--device auto or cpu" in r.json()["detail"]
