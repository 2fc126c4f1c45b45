"""Job store, worker pool, queue limits, restart recovery, retention and shutdown."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from jrs.core.errors import InvalidInput, ServiceBusy
from jrs.service.app import create_app
from jrs.service.jobs import JobManager, JobStore, new_job_id
from tests.service.conftest import AUTH, Case, FakeRunner, make_settings, multipart


def _post(client: TestClient, case: Case, **params) -> object:
    return client.post(
        "/v1/recontour",
        headers=AUTH,
        params=params,
        files=multipart([case.planning_zip], [case.daily_zip]),
    )


def _inputs(jobs_dir: Path, job_id: str) -> None:
    for sub in ("planning", "daily"):
        (jobs_dir / job_id / "input" / sub).mkdir(parents=True)


def test_queue_full_answers_503_with_retry_after(tmp_path: Path, case: Case) -> None:
    runner = FakeRunner()
    runner.gate.clear()
    app = create_app(make_settings(tmp_path, max_concurrent_jobs=1, queue_size=1), runner)
    with TestClient(app) as client:
        first = _post(client, case, wait="false")
        assert first.status_code == 202 and first.json()["status"] in ("queued", "running")
        assert runner.started.wait(10)  # the worker holds the first job
        second = _post(client, case, wait="false")
        assert second.status_code == 202 and second.json()["status"] == "queued"
        third = _post(client, case, wait="false")
        assert third.status_code == 503
        assert third.headers["retry-after"] == "7"
        assert third.json()["error"] == "service_busy"
        # an artefact of an unfinished job: 409 naming the state
        r = client.get(f"/v1/jobs/{first.json()['id']}/rtstruct", headers=AUTH)
        assert r.status_code == 409 and "running" in r.json()["detail"]
        metrics = client.get("/metrics", headers=AUTH).text
        assert "jrs_queue_depth 1.0" in metrics and "jrs_jobs_running 1.0" in metrics
        runner.gate.set()
        for job in (first.json(), second.json()):
            done = app.state.manager.wait(job["id"], 10)
            assert done is not None and done.status == "succeeded"
        assert _post(client, case).json()["status"] == "succeeded"


def test_wait_timeout_answers_202_then_the_job_finishes(tmp_path: Path, case: Case) -> None:
    runner = FakeRunner(delay=0.6)
    app = create_app(make_settings(tmp_path), runner)
    with TestClient(app) as client:
        r = _post(client, case, timeout="0.05")
        assert r.status_code == 202 and r.headers["location"].endswith(r.json()["id"])
        assert r.headers["retry-after"] == "5"  # JRS_POLL_AFTER_S
        assert app.state.manager.wait(r.json()["id"], 10).status == "succeeded"
        assert client.get(r.headers["location"], headers=AUTH).json()["status"] == "succeeded"


def test_failing_runner_gives_a_failed_job_without_internals(tmp_path: Path, case: Case) -> None:
    runner = FakeRunner()
    app = create_app(make_settings(tmp_path), runner)
    with TestClient(app) as client:
        runner.fail = InvalidInput("daily CT does not overlap the planning CT")
        job = _post(client, case).json()
        assert job["status"] == "failed"
        assert job["error"] == {
            "code": "invalid_input",
            "message": "daily CT does not overlap the planning CT",
        }
        runner.fail = RuntimeError("secret internal detail /srv/x")
        job = _post(client, case).json()
        assert job["status"] == "failed" and job["error"]["code"] == "internal_error"
        assert "secret" not in str(job)
        r = client.get(f"/v1/jobs/{job['id']}/qa", headers=AUTH)
        assert r.status_code == 409 and "failed" in r.json()["detail"]
        # inputs of finished jobs are deleted (no patient data kept), the service still works
        assert not (app.state.settings.jobs_dir / job["id"] / "input").exists()
        runner.fail = None
        assert _post(client, case).json()["status"] == "succeeded"


def test_unknown_job_is_404(client: TestClient) -> None:
    for path in (
        "/v1/jobs/ffffffffffffffffffffffffffffffff",
        "/v1/jobs/..%2F..%2Fetc",
        "/v1/jobs/x/qa",
    ):
        r = client.get(path, headers=AUTH)
        assert r.status_code == 404, path
        assert r.json()["error"] == "not_found"


def test_store_is_wal_and_restart_recovers_every_job(tmp_path: Path) -> None:
    jobs_dir = tmp_path / "jobs"
    store = JobStore(tmp_path / "jobs.sqlite3")
    assert store.journal_mode == "wal"
    queued, running, tried, orphan, done = (new_job_id() for _ in range(5))
    for job_id in (queued, running, tried, orphan, done):
        store.create(job_id)
    for job_id in (queued, running, tried):
        _inputs(jobs_dir, job_id)
    store.mark_running(running)
    store.mark_running(tried)
    store.requeue(tried)
    store.mark_running(tried)  # second attempt interrupted too
    store.mark_running(orphan)
    store.mark_succeeded(done, {"ok": True}, {"qa": "qa.json"})
    store.close()  # the process "dies" here

    store = JobStore(tmp_path / "jobs.sqlite3")  # a new process opens the store
    runner = FakeRunner()
    runner.gate.clear()
    manager = JobManager(store, jobs_dir, runner, concurrency=1, queue_size=1, max_attempts=2)
    recovered = manager.start()
    assert sorted(recovered["requeued"]) == sorted([queued, running])
    assert sorted(recovered["failed"]) == sorted([tried, orphan])
    assert {j.id for j in store.jobs()} == {queued, running, tried, orphan, done}  # none vanish
    for job_id in (tried, orphan):
        job = store.get(job_id)
        assert job.status == "failed" and job.error_code == "interrupted"
        assert "submit the job again" in job.error_message
    # recovered jobs may exceed the queue size; new ones may not
    with pytest.raises(ServiceBusy):
        manager.submit(new_job_id())
    runner.gate.set()
    for job_id in (queued, running):
        assert manager.wait(job_id, 10).status == "failed"  # fake runner: empty inputs
        assert store.get(job_id).error_code == "invalid_input"
    manager.shutdown(5)
    store.close()


def test_shutdown_leaves_waiting_jobs_queued_and_marks_stuck_ones(tmp_path: Path) -> None:
    jobs_dir = tmp_path / "jobs"
    store = JobStore(tmp_path / "jobs.sqlite3")
    runner = FakeRunner()
    runner.gate.clear()
    manager = JobManager(store, jobs_dir, runner, concurrency=1, queue_size=5)
    manager.start()
    ids = [new_job_id() for _ in range(3)]
    for job_id in ids:
        _inputs(jobs_dir, job_id)
        manager.submit(job_id)
    assert runner.started.wait(10)
    stuck = manager.shutdown(grace_s=0.2)
    assert stuck == [ids[0]]
    assert store.get(ids[0]).status == "failed" and store.get(ids[0]).error_code == "interrupted"
    assert [store.get(j).status for j in ids[1:]] == ["queued", "queued"]
    with pytest.raises(ServiceBusy, match="shutting down"):
        manager.submit(new_job_id())
    runner.gate.set()
    # the next process runs the queued jobs
    manager2 = JobManager(store, jobs_dir, FakeRunner(), concurrency=1, queue_size=5)
    assert sorted(manager2.start()["requeued"]) == sorted(ids[1:])
    for job_id in ids[1:]:
        assert manager2.wait(job_id, 10).finished
    manager2.shutdown(5)
    store.close()


def test_graceful_shutdown_finishes_running_jobs(tmp_path: Path, case: Case) -> None:
    runner = FakeRunner(delay=0.5)
    app = create_app(make_settings(tmp_path, shutdown_grace_s=10), runner)
    with TestClient(app) as client:
        job_id = _post(client, case, wait="false").json()["id"]
        assert runner.started.wait(10)
    store = JobStore(app.state.settings.db_path)
    assert store.get(job_id).status == "succeeded"
    store.close()


def test_retention_cleanup_deletes_old_jobs(tmp_path: Path, case: Case) -> None:
    app = create_app(make_settings(tmp_path), FakeRunner())
    with TestClient(app) as client:
        old = _post(client, case).json()["id"]
        manager = app.state.manager
        assert manager.cleanup(retention_s=3600) == []
        time.sleep(0.05)
        assert manager.cleanup(retention_s=0.01) == [old]
        assert client.get(f"/v1/jobs/{old}", headers=AUTH).status_code == 404
        assert not (app.state.settings.jobs_dir / old).exists()
        orphan = app.state.settings.jobs_dir / new_job_id()
        (orphan / "upload").mkdir(parents=True)
        manager.cleanup(retention_s=3600)
        assert orphan.exists()  # may be an upload in progress
        manager.cleanup(retention_s=3600, orphan_age_s=-1)
        assert not orphan.exists()


def test_gpu_work_is_serialised_per_device(tmp_path: Path) -> None:
    active = {"now": 0, "max": 0}
    lock = threading.Lock()

    def gpu_runner(job_dir: Path, planning_dir: Path, daily_dir: Path) -> dict:
        with lock:
            active["now"] += 1
            active["max"] = max(active["max"], active["now"])
        time.sleep(0.05)
        with lock:
            active["now"] -= 1
        (job_dir / "rtstruct.dcm").write_bytes(b"x")
        return {}

    for device, expected in (("cuda:0", 1), ("cpu", 3)):
        store = JobStore(tmp_path / device / "jobs.sqlite3")
        manager = JobManager(
            store,
            tmp_path / device / "jobs",
            gpu_runner,
            concurrency=3,
            queue_size=10,
            device=device,
        )
        manager.start()
        ids = [new_job_id() for _ in range(6)]
        for job_id in ids:
            _inputs(tmp_path / device / "jobs", job_id)
            manager.submit(job_id)
        assert all(manager.wait(j, 10).status == "succeeded" for j in ids)
        manager.shutdown(5)
        store.close()
        assert active["max"] == expected if device != "cpu" else active["max"] > 1, (device, active)
        active["max"] = 0


def test_recovered_jobs_wait_when_the_model_is_not_ready(tmp_path: Path) -> None:
    jobs_dir = tmp_path / "jobs"
    store = JobStore(tmp_path / "jobs.sqlite3")
    job_id = new_job_id()
    store.create(job_id)
    _inputs(jobs_dir, job_id)
    store.mark_running(job_id)
    runner = FakeRunner()
    manager = JobManager(store, jobs_dir, runner, concurrency=1, queue_size=2)
    manager.start(run_recovered=False)
    assert store.get(job_id).status == "queued" and runner.calls == 0
    manager.shutdown(1)
    manager = JobManager(store, jobs_dir, runner, concurrency=1, queue_size=2)
    manager.start()
    assert manager.wait(job_id, 10).finished and runner.calls == 1
    manager.shutdown(1)
    store.close()


def test_model_dir_is_resolved_strictly(tmp_path: Path) -> None:
    """A version folder, a folder of versions or a root of <name>/<version>; nothing else."""
    from jrs.core.errors import ModelNotReady
    from jrs.inference.registry import resolve_model_dir

    assert resolve_model_dir(None) is None
    root = tmp_path / "models"
    for version in ("1", "2", "10"):
        (root / "crossstitch" / version).mkdir(parents=True)
    (root / "crossstitch" / "10" / "model.onnx").write_bytes(b"x")
    assert resolve_model_dir(root / "crossstitch" / "10") == root / "crossstitch" / "10"
    assert resolve_model_dir(root / "crossstitch") == root / "crossstitch" / "10"  # numeric
    assert resolve_model_dir(root) == root / "crossstitch" / "10"
    (root / "crossstitch" / "2" / "metadata.json").write_text("{}")
    assert resolve_model_dir(root / "crossstitch" / "2") == root / "crossstitch" / "2"
    with pytest.raises(ModelNotReady, match="does not exist"):
        resolve_model_dir(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotReady, match="holds no model"):
        resolve_model_dir(tmp_path / "empty")


def test_links_carry_the_proxy_root_path(tmp_path: Path, case: Case) -> None:
    """Behind a proxy serving the API under a prefix, Location and links include it."""
    app = create_app(make_settings(tmp_path), FakeRunner())
    with TestClient(app, root_path="/jrs") as client:
        r = _post(client, case)
        assert r.status_code == 200, r.text
        job = r.json()
        assert r.headers["location"] == f"/jrs/v1/jobs/{job['id']}"
        assert job["links"]["job"] == f"/jrs/v1/jobs/{job['id']}"
        assert job["links"]["rtstruct"].startswith("/jrs/v1/jobs/")
        again = client.get(f"/v1/jobs/{job['id']}", headers=AUTH).json()
        assert again["links"]["job"] == f"/jrs/v1/jobs/{job['id']}"
