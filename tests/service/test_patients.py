"""Patients: upload once, adapt in the background, fractions with the patient or generic model.

The adaptation command is replaced by a small script (`FAKE_ADAPT`) that behaves like
``jrs adapt`` towards the service: progress file, SIGTERM -> checkpoint and exit 75, a rerun
continues, a model folder with ``adaptation.kept`` at the end. The real ``jrs adapt`` through a
real server is in ``test_patients_real.py`` (slow).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from jrs.service import patients as patients_module
from jrs.service.adaptation_worker import AdaptationWorker
from jrs.service.app import create_app
from jrs.service.patient_store import MAX_ADAPT_ATTEMPTS, Patient, PatientStore
from jrs.service.patients import PatientService
from tests.service.conftest import AUTH, Case, FakeRunner, free_port, make_settings

FAKE_ADAPT = r"""
import json, signal, sys, time
from pathlib import Path

folder, mode, seconds = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
work = folder / "adapt"
work.mkdir(parents=True, exist_ok=True)
with (work / "attempts.txt").open("a") as fh:
    fh.write("x")
if mode == "fail":
    print("INFO training.adapt: reading the planning scan")
    print("error (invalid_input): planning: the planning label map is empty")
    sys.exit(2)
state = work / "state.json"
done = json.loads(state.read_text())["done"] if state.is_file() else 0.0
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
t0 = time.monotonic()
while done + time.monotonic() - t0 < seconds:
    spent = done + time.monotonic() - t0
    if stop:
        state.write_text(json.dumps({"done": spent}))
        print("interrupted: stop requested; run the same command to continue")
        sys.exit(75)
    progress = {"phase": "training", "step": int(10 * spent), "spent_s": spent,
                "budget_s": seconds}
    (work / "progress.json").write_text(json.dumps(progress))
    time.sleep(0.05)
model = folder / "model"
model.mkdir(parents=True, exist_ok=True)
(model / "model.onnx").write_bytes(b"not a real graph")
kept = mode == "keep"
adapted = 0.9 if kept else 0.7
meta = {"name": "crossstitch-patient" if kept else "crossstitch", "version": 1,
        "sha256": "0" * 64,
        "adaptation": {"kept": kept, "steps": 12, "seconds": seconds,
                       "reason": "mean DSC 0.80 -> 0.90" if kept else
                       "the adapted model is worse than the base on prostate; the base stays",
                       "validation": {"base": {"dsc": {"prostate": 0.8}, "mean_dsc": 0.8},
                                      "adapted": {"dsc": {"prostate": adapted},
                                                  "mean_dsc": adapted}}}}
(model / "metadata.json").write_text(json.dumps(meta))
"""


class PatientFakeRunner(FakeRunner):
    """The fake runner, also able to 'run' with a patient model folder."""

    def __init__(self) -> None:
        super().__init__()
        self.models: list[Path] = []

    def __call__(self, job_dir: Path, planning_dir: Path, daily_dir: Path) -> dict[str, Any]:
        qa = super().__call__(job_dir, planning_dir, daily_dir)
        # the pipeline's shape of the structures (the example client prints them)
        structure = {"name": "Prostate", "source": "registration", "planning_cc": 1.0}
        return {**qa, "structures": [{**structure, "daily_cc": 1.0, "flags": []}]}

    def run_with_model(
        self, job_dir: Path, planning_dir: Path, daily_dir: Path, model_dir: Path
    ) -> dict[str, Any]:
        self.models.append(model_dir)
        qa = self(job_dir, planning_dir, daily_dir)
        return {
            **qa,
            "model": {"name": json.loads((model_dir / "metadata.json").read_text())["name"]},
        }


@pytest.fixture
def fake_adapt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Replace ``jrs adapt`` by `FAKE_ADAPT`; ``control["mode"]``/``["seconds"]`` set its run."""
    script = tmp_path / "fake_adapt.py"
    script.write_text(FAKE_ADAPT)
    control: dict[str, Any] = {"mode": "keep", "seconds": 0.5}

    def command(_settings: Any, folder: Path) -> list[str]:
        return [sys.executable, str(script), str(folder), control["mode"], str(control["seconds"])]

    monkeypatch.setattr(patients_module, "adapt_command", command)
    monkeypatch.setattr(patients_module, "adaptation_availability", lambda _s: (True, ""))
    return control


class Server:
    """A real uvicorn server in a thread that a test can stop and start again."""

    def __init__(self, settings: Any, runner: FakeRunner) -> None:
        self.app = create_app(settings, runner)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_config=None, lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        assert not self.thread.is_alive()


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for s in started:
        if s.thread.is_alive():
            s.stop()


def _wait_patient(
    http: httpx.Client, pid: str, statuses: tuple[str, ...], timeout: float = 30
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body = http.get(f"/v1/patients/{pid}").json()
        if body["adaptation"]["status"] in statuses:
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.05)


def _wait_progress(http: httpx.Client, pid: str, spent_s: float) -> dict[str, Any]:
    """Wait until the running adaptation reports progress past ``spent_s`` seconds."""
    deadline = time.monotonic() + 30
    while True:
        progress = http.get(f"/v1/patients/{pid}").json()["adaptation"]["progress"]
        if progress is not None and progress["spent_s"] >= spent_s:
            return dict(progress)
        assert time.monotonic() < deadline, progress
        time.sleep(0.05)


def _files(field: str, archive: Path) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(field, (archive.name, archive.read_bytes(), "application/zip"))]


def _fraction(http: httpx.Client, pid: str, case: Case) -> dict[str, Any]:
    r = http.post(f"/v1/patients/{pid}/fractions", files=_files("daily", case.daily_zip))
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["status"] == "succeeded", job
    return job


def _upload(http: httpx.Client, case: Case) -> httpx.Response:
    return http.post("/v1/patients", files=_files("planning", case.planning_zip))


def test_patient_flow_generic_then_patient_model_then_delete(
    tmp_path: Path, case: Case, fake_adapt: dict[str, Any], servers: list[Server]
) -> None:
    fake_adapt["seconds"] = 2.0
    runner = PatientFakeRunner()
    settings = make_settings(tmp_path, adaptation="local")
    servers.append(server := Server(settings, runner))
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as http:
        r = _upload(http, case)
        assert r.status_code == 201, r.text
        patient = r.json()
        pid = patient["id"]
        assert r.headers["location"] == f"/v1/patients/{pid}"
        assert patient["planning"]["organs"] == ["prostate"]
        assert (
            patient["planning"]["slices"] == 20 and len(patient["planning"]["series_sha256"]) == 64
        )
        assert patient["adaptation"]["status"] in ("queued", "running")
        assert patient["adaptation"]["model"] == "generic"

        # before the model is ready: the generic model, and the QA says why
        first = _fraction(http, pid, case)
        assert first["qa"]["model"]["kind"] == "generic"
        assert first["qa"]["patient"]["model"] == "generic"
        assert "not ready" in first["qa"]["patient"]["generic_because"]
        progress = _wait_progress(http, pid, 0.0)
        assert progress["phase"] == "training" and progress["budget_s"] == 2.0

        done = _wait_patient(http, pid, ("succeeded", "failed"))
        assert done["adaptation"]["status"] == "succeeded", done
        assert done["adaptation"]["model"] == "patient"
        assert done["adaptation"]["result"]["kept"] is True
        assert done["adaptation"]["result"]["dsc"]["prostate"] == {"base": 0.8, "adapted": 0.9}

        second = _fraction(http, pid, case)
        assert second["qa"]["model"] == {"name": "crossstitch-patient", "kind": "patient"}
        assert second["qa"]["patient"]["adaptation_status"] == "succeeded"
        assert runner.models == [server.app.state.patients.folder(pid) / "model"]
        qa = http.get(f"/v1/jobs/{second['id']}/qa").json()
        assert qa["model"]["kind"] == "patient"  # the stored qa.json says it too

        listed = http.get(f"/v1/patients/{pid}").json()["fractions"]
        assert [f["id"] for f in listed] == [first["id"], second["id"]]
        assert all(f["status"] == "succeeded" for f in listed)

        assert http.delete(f"/v1/patients/{pid}").status_code == 204
        assert http.get(f"/v1/patients/{pid}").status_code == 404
        assert http.get(f"/v1/jobs/{second['id']}").status_code == 404
        assert not server.app.state.patients.folder(pid).exists()
        r = http.post(f"/v1/patients/{pid}/fractions", files=_files("daily", case.daily_zip))
        assert r.status_code == 404


def test_base_kept_or_failed_adaptation_means_the_generic_model(
    tmp_path: Path, case: Case, fake_adapt: dict[str, Any], servers: list[Server]
) -> None:
    runner = PatientFakeRunner()
    servers.append(server := Server(make_settings(tmp_path, adaptation="local"), runner))
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as http:
        fake_adapt["mode"] = "base"
        base = _wait_patient(http, _upload(http, case).json()["id"], ("succeeded", "failed"))
        assert base["adaptation"]["status"] == "succeeded"
        assert base["adaptation"]["result"]["kept"] is False
        assert base["adaptation"]["model"] == "generic"
        job = _fraction(http, base["id"], case)
        assert job["qa"]["model"]["kind"] == "generic"
        assert "worse than the base" in job["qa"]["patient"]["generic_because"]

        fake_adapt["mode"] = "fail"
        failed = _wait_patient(http, _upload(http, case).json()["id"], ("succeeded", "failed"))
        assert failed["adaptation"]["status"] == "failed"
        assert "planning label map is empty" in failed["adaptation"]["reason"]
        assert "generic model" in failed["adaptation"]["reason"]
        job = _fraction(http, failed["id"], case)
        assert job["qa"]["patient"]["adaptation_status"] == "failed"
        assert runner.models == []


def test_restart_during_adaptation_resumes_and_fractions_use_the_generic_model_meanwhile(
    tmp_path: Path, case: Case, fake_adapt: dict[str, Any], servers: list[Server]
) -> None:
    fake_adapt["seconds"] = 3.0
    settings = make_settings(tmp_path, adaptation="local", shutdown_grace_s=10.0)
    servers.append(first := Server(settings, PatientFakeRunner()))
    with httpx.Client(base_url=first.url, headers=AUTH, timeout=60) as http:
        pid = _upload(http, case).json()["id"]
        _wait_progress(http, pid, 0.8)
    first.stop()  # graceful: the adaptation checkpoints (exit 75) and is queued again
    store = PatientStore(settings.data_dir / "patients.sqlite3")
    row = store.get(pid)
    store.close()
    assert row is not None and row.adapt_status == "queued", row
    assert "interrupted" in (row.adapt_reason or "")
    work = settings.data_dir / "patients" / pid / "adapt"
    saved = json.loads((work / "state.json").read_text())["done"]
    assert saved >= 0.8

    runner = PatientFakeRunner()
    servers.append(second := Server(settings, runner))
    with httpx.Client(base_url=second.url, headers=AUTH, timeout=60) as http:
        job = _fraction(http, pid, case)  # the planning is still there; generic meanwhile
        assert job["qa"]["model"]["kind"] == "generic"
        done = _wait_patient(http, pid, ("succeeded", "failed"))
        assert done["adaptation"]["status"] == "succeeded", done
        assert done["adaptation"]["attempts"] == 2
        assert (work / "attempts.txt").read_text() == "xx"  # resumed, not started over
        assert _fraction(http, pid, case)["qa"]["model"]["kind"] == "patient"


def test_an_adaptation_interrupted_too_often_fails_with_the_reason(tmp_path: Path) -> None:
    store = PatientStore(tmp_path / "p.sqlite3")
    now = time.time()
    for pid, attempts in (("a" * 32, 1), ("b" * 32, MAX_ADAPT_ATTEMPTS)):
        store.create(Patient(pid, now, now, adapt_status="running", adapt_attempts=attempts))
    worker = AdaptationWorker(store, tmp_path, lambda folder: ["true"])
    assert worker.recover() == {"requeued": ["a" * 32], "failed": ["b" * 32]}
    failed = store.get("b" * 32)
    assert failed is not None and failed.adapt_status == "failed"
    assert f"interrupted {MAX_ADAPT_ATTEMPTS} times" in (failed.adapt_reason or "")
    assert "generic model" in (failed.adapt_reason or "")
    claimed = store.claim_next()
    assert claimed is not None and claimed.id == "a" * 32 and claimed.adapt_attempts == 2
    assert store.claim_next() is None
    store.close()


def test_adaptation_unavailable_is_said_and_fractions_still_work(
    tmp_path: Path, case: Case
) -> None:
    app = create_app(make_settings(tmp_path, adaptation="off"), FakeRunner())
    with TestClient(app) as client:
        r = client.post("/v1/patients", headers=AUTH, files=_files("planning", case.planning_zip))
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["adaptation"]["status"] == "unavailable"
        assert "switched off" in body["adaptation"]["reason"]
        r = client.post(
            f"/v1/patients/{body['id']}/fractions",
            headers=AUTH,
            files=_files("daily", case.daily_zip),
        )
        assert r.status_code == 200 and r.json()["qa"]["patient"]["model"] == "generic"


def test_routes_need_the_key_and_respect_the_upload_limits(tmp_path: Path, case: Case) -> None:
    settings = make_settings(tmp_path, adaptation="off", max_upload_bytes=20_000)
    app = create_app(settings, FakeRunner())
    planning = _files("planning", case.planning_zip)
    with TestClient(app) as client:
        pid = "0" * 32
        for method, url in (
            ("POST", "/v1/patients"),
            ("GET", f"/v1/patients/{pid}"),
            ("DELETE", f"/v1/patients/{pid}"),
            ("POST", f"/v1/patients/{pid}/fractions"),
        ):
            r = client.request(method, url)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", url
        assert client.get(f"/v1/patients/{pid}", headers=AUTH).status_code == 404
        assert client.get("/v1/patients/../jobs", headers=AUTH).status_code == 404
        assert client.delete("/v1/patients/xyz", headers=AUTH).status_code == 404
        r = client.post("/v1/patients", headers=AUTH, files=planning)
        assert r.status_code == 413 and r.json()["error"] == "payload_too_large"
        tiny = [("daily", ("d.zip", b"PK", "application/zip"))]
        r = client.post("/v1/patients", headers=AUTH, files=tiny)
        assert r.status_code == 422 and "unknown form field 'daily'" in r.json()["detail"]
        assert not any((settings.data_dir / "patients").iterdir())  # nothing left behind


def test_a_planning_without_any_organ_is_refused(tmp_path: Path, case: Case) -> None:
    from jrs.io.ct import read_ct_series
    from jrs.io.rtstruct_writer import write_rtstruct
    from tests.service.conftest import prostate_mask, zip_folder

    folder = tmp_path / "noorgan"
    (folder / "ct").mkdir(parents=True)
    for p in (case.planning / "ct").iterdir():
        (folder / "ct" / p.name).write_bytes(p.read_bytes())
    write_rtstruct(
        {"Body": prostate_mask()}, read_ct_series(folder / "ct"), folder / "rtstruct.dcm"
    )
    archive = zip_folder(folder, tmp_path / "noorgan.zip")
    app = create_app(make_settings(tmp_path, adaptation="off"), FakeRunner())
    with TestClient(app) as client:
        r = client.post("/v1/patients", headers=AUTH, files=_files("planning", archive))
        assert r.status_code == 422 and "maps to an organ" in r.json()["detail"]


def test_retention_deletes_unused_patients_with_their_fractions(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, adaptation="off", patient_retention_days=1.0)
    deleted_jobs: list[list[str]] = []
    service = PatientService(settings, delete_jobs=deleted_jobs.append)
    now = time.time()
    for pid, last in (("a" * 32, now - 3 * 86400), ("b" * 32, now - 3600)):
        service.store.create(Patient(pid, last, last, adapt_status="unavailable"))
        (service.folder(pid) / "planning").mkdir(parents=True)
    service.store.add_fraction("a" * 32, "f" * 32)
    service.store.update("a" * 32, last_used_at=now - 3 * 86400)
    assert service.cleanup(now) == ["a" * 32]
    assert service.store.get("a" * 32) is None and not service.folder("a" * 32).exists()
    assert deleted_jobs == [["f" * 32]]
    assert service.store.get("b" * 32) is not None and service.folder("b" * 32).exists()
    service.store.close()


def test_openapi_documents_the_patient_routes_with_examples(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path, adaptation="off"), FakeRunner())
    with TestClient(app) as client:
        doc = client.get("/openapi.json").json()
    paths = doc["paths"]
    assert set(paths["/v1/patients"]) == {"post"}
    assert set(paths["/v1/patients/{patient_id}"]) == {"get", "delete"}
    post = paths["/v1/patients"]["post"]
    assert post["requestBody"]["content"]["multipart/form-data"]["schema"]["required"] == [
        "planning"
    ]
    assert post["responses"]["201"]["content"]["application/json"]["example"]["adaptation"]
    fractions = paths["/v1/patients/{patient_id}/fractions"]["post"]
    assert fractions["requestBody"]["content"]["multipart/form-data"]["schema"]["required"] == [
        "daily"
    ]
    example = fractions["responses"]["200"]["content"]["application/json"]["example"]
    assert example["qa"]["model"]["kind"] == "patient"
    for op in (post, fractions, paths["/v1/patients/{patient_id}"]["get"]):
        assert "401" in op["responses"]
    assert doc["components"]["schemas"]["PatientOut"]["examples"]


def test_example_client_runs_the_patient_workflow(
    tmp_path: Path, case: Case, fake_adapt: dict[str, Any], servers: list[Server]
) -> None:
    from tests.service.test_client import load_example_client

    client = load_example_client()
    servers.append(
        server := Server(make_settings(tmp_path, adaptation="local"), PatientFakeRunner())
    )
    key = ["--url", server.url, "--api-key", AUTH["Authorization"].split()[1]]
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as http:
        patient = client.create_patient(http, [case.planning])
        pid = patient["id"]
        done = client.wait_for_adaptation(http, pid, 30, poll_s=0.1)
        assert done["adaptation"]["status"] == "succeeded"
        job, hint = client.submit_fraction(http, pid, [case.daily], wait_s=20)
        job = client.wait_for_job(http, job, 30, first_delay_s=hint)
        files = client.download(http, job, tmp_path / "fx1")
        assert json.loads(files["qa"].read_text())["model"]["kind"] == "patient"
    assert client.main([*key, "--patient", pid, "--status"]) == 0
    out = tmp_path / "fx2"
    assert client.main([*key, "--patient", pid, "--daily", str(case.daily), "--out", str(out)]) == 0
    assert (out / "rtstruct.dcm").is_file()
    assert client.main([*key, "--patient", pid, "--delete"]) == 0
    assert client.main([*key, "--patient", pid, "--delete"]) == client.EXIT_REFUSED  # 404
    assert client.main([*key, "--new-patient"]) == client.EXIT_REFUSED  # no --planning
    new = client.main([*key, "--new-patient", "--planning", str(case.planning)])
    assert new == 0


def test_batch_through_the_service_uploads_each_patient_once(
    tmp_path: Path, case: Case, fake_adapt: dict[str, Any], servers: list[Server]
) -> None:
    import csv

    from jrs.cli.remote import PATIENTS_FILE, ServiceClient, patient_row_runner
    from jrs.pipeline.batch import run_batch

    runner = PatientFakeRunner()
    servers.append(server := Server(make_settings(tmp_path, adaptation="local"), runner))
    planning = case.planning
    manifest = tmp_path / "m.csv"

    def write(ids: list[str]) -> None:
        with manifest.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["id", "planning_ct", "planning_rtstruct", "daily_ct"])
            for i in ids:
                w.writerow([i, planning / "ct", planning / "rtstruct.dcm", case.daily / "ct"])

    out = tmp_path / "out"
    write(["f1", "f2"])
    with ServiceClient(server.url, AUTH["Authorization"].split()[1]) as svc:
        summary = run_batch(manifest, out, row_runner=patient_row_runner(svc, out), workers=2)
        assert sorted(summary.done) == ["f1", "f2"], summary.failed
        registry = json.loads((out / PATIENTS_FILE).read_text())
        assert len(registry) == 1 and next(iter(registry)).startswith("planning_")
        for row in ("f1", "f2"):  # the first row waited for the adaptation: both patient model
            qa = json.loads((out / row / "qa.json").read_text())
            assert qa["model"]["kind"] == "patient"
        write(["f1", "f2", "f3"])  # resumed with a new fraction: the same patient
        again = run_batch(manifest, out, row_runner=patient_row_runner(svc, out))
        assert again.done == ["f3"]
        assert json.loads((out / PATIENTS_FILE).read_text()) == registry
    assert len(server.app.state.patients.store.patients()) == 1
    assert len(runner.models) == 3


def test_external_worker_runs_the_queue_of_the_shared_store(
    tmp_path: Path, fake_adapt: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``JRS_ADAPTATION=external``: the service queues, ``python -m jrs.service.patients`` adapts."""
    settings = make_settings(tmp_path, adaptation="external")
    service = PatientService(settings)
    status, note = service.initial_status()
    assert status == "queued" and "adaptation worker" in (note or "")
    assert service.worker is None  # nothing adapts in the service process
    now = time.time()
    service.store.create(Patient("c" * 32, now, now, adapt_status="queued", adapt_queued_at=now))
    (service.folder("c" * 32) / "planning").mkdir(parents=True)
    service.store.close()
    monkeypatch.setenv("JRS_DATA_DIR", str(settings.data_dir))
    assert patients_module.main(["--once"]) == 0
    store = PatientStore(settings.data_dir / "patients.sqlite3")
    done = store.get("c" * 32)
    store.close()
    assert done is not None and done.adapt_status == "succeeded" and done.uses_patient_model


def test_availability_says_why_the_server_cannot_adapt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    from jrs.service.patients import adaptation_availability

    settings = make_settings(tmp_path)  # auto, the bundled model
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a)
    )
    ok, why = adaptation_availability(settings)
    assert not ok and "cannot train (torch not installed)" in why
    monkeypatch.setattr(importlib.util, "find_spec", real)
    empty = tmp_path / "m" / "crossstitch" / "1"
    empty.mkdir(parents=True)
    (empty / "metadata.json").write_text("{}")
    (empty / "model.onnx").write_bytes(b"x")
    ok, why = adaptation_availability(make_settings(tmp_path, model_dir=empty))
    assert not ok and "no torch weights" in why
    # weights given to `jrs adapt` directly (JRS_ADAPT_ARGS) make it available; a missing file not
    weights = tmp_path / "base.pt"
    weights.write_bytes(b"torch weights")
    given = make_settings(tmp_path, model_dir=empty, adapt_args=f"--base-weights {weights}")
    assert adaptation_availability(given) == (True, "")
    missing = make_settings(tmp_path, model_dir=empty, adapt_args="--base-weights=/no/such.pt")
    assert not adaptation_availability(missing)[0]
    assert adaptation_availability(make_settings(tmp_path, adaptation="external")) == (True, "")


def test_an_adaptation_that_cannot_start_fails_with_the_reason(tmp_path: Path) -> None:
    store = PatientStore(tmp_path / "p.sqlite3")
    now = time.time()
    store.create(Patient("d" * 32, now, now, adapt_status="queued", adapt_queued_at=now))
    worker = AdaptationWorker(store, tmp_path, lambda folder: [str(tmp_path / "no-such-program")])
    assert worker.run_once() and not worker.run_once()
    row = store.get("d" * 32)
    assert row is not None and row.adapt_status == "failed"
    assert "could not start" in (row.adapt_reason or "")
    store.close()
