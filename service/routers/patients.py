"""Patients: the planning scan once (``POST /v1/patients``), then only daily CTs per fraction.

``POST /v1/patients`` validates and stores the planning CT + RTSTRUCT and queues the adaptation of
a patient model where the server can train (`jrs.service.patients`); ``GET`` shows the adaptation's
status and figures; ``POST /v1/patients/{id}/fractions`` takes a daily CT and answers like
``/v1/recontour`` (a job; the patient model once ready, the generic model before, ``qa.json``
says which); ``DELETE`` removes the patient's planning, model and finished fraction jobs.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import json
import logging
import shutil
import time
from typing import Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from jrs.core.errors import (
    InvalidInput,
    JrsError,
    ModelNotReady,
    NotFound,
    ServiceBusy,
    StorageFull,
)
from jrs.core.labels import LABELS, SynonymTable
from jrs.service.auth import require_api_key
from jrs.service.deps import ManagerDep, MetricsDep, SettingsDep
from jrs.service.jobs import NO_SPACE, JobManager, free_bytes, new_job_id
from jrs.service.logging_config import current_request_id
from jrs.service.patient_store import (
    PATIENT_MARKER,
    PLANNING_DIR,
    Patient,
    new_patient_id,
    series_sha256,
)
from jrs.service.patients import PatientService
from jrs.service.schemas import JOB_EXAMPLE, QUEUED_EXAMPLE, JobOut, error_responses
from jrs.service.settings import MIB, Settings
from jrs.service.unpack import unpack
from jrs.service.upload_limits import UploadLimits
from jrs.service.uploads import receive_multipart, validate_daily, validate_planning

logger = logging.getLogger("jrs.service.patients")

router = APIRouter(
    prefix="/v1/patients", tags=["patients"], dependencies=[Depends(require_api_key)]
)

_PATIENT_ID_LENGTH = 32
_EXAMPLE_ID = "9c1e8d7a4b6c3f2b9e0f1a2b3c4d5e6f"

_FILES = {"type": "array", "items": {"type": "string", "format": "binary"}}


def _body(field: str, description: str, example: str) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": [field],
                        "properties": {field: {**_FILES, "description": description}},
                    },
                    "encoding": {field: {"contentType": "application/zip, application/dicom"}},
                }
            },
        },
        "x-codeSamples": [{"lang": "curl", "source": example}],
    }


PLANNING_BODY = _body(
    "planning",
    "A zip, or several DICOM files: the planning CT series and its RTSTRUCT.",
    "curl -H 'Authorization: Bearer $KEY' -F planning=@planning.zip "
    "http://localhost:8000/v1/patients",
)
DAILY_BODY = _body(
    "daily",
    "A zip, or several DICOM files: the daily CT series of one fraction.",
    "curl -H 'Authorization: Bearer $KEY' -F daily=@daily.zip "
    f"'http://localhost:8000/v1/patients/{_EXAMPLE_ID}/fractions?wait=true'",
)


# ------------------------------------------------------------------------------ schemas
PATIENT_EXAMPLE: dict[str, Any] = {
    "id": _EXAMPLE_ID,
    "created_at": "2025-01-01T08:00:00Z",
    "last_used_at": "2025-01-02T08:00:00Z",
    "expires_at": "2025-02-01T08:00:00Z",
    "planning": {
        "slices": 163,
        "rois": 11,
        "organs": ["bladder", "rectum", "prostate"],
        "series_sha256": "4f1c...e9",
        "warnings": [],
    },
    "adaptation": {
        "status": "succeeded",
        "model": "patient",
        "reason": None,
        "attempts": 1,
        "queued_at": "2025-01-01T08:00:01Z",
        "started_at": "2025-01-01T08:00:01Z",
        "finished_at": "2025-01-01T08:14:40Z",
        "progress": None,
        "result": {
            "kept": True,
            "reason": "mean DSC 0.8657 -> 0.8790, no organ worse (...)",
            "steps": 310,
            "seconds": 872.4,
            "dsc": {"prostate": {"base": 0.87, "adapted": 0.89}},
        },
    },
    "fractions": [
        {
            "id": "3f2b9c1e8d7a4b6c9e0f1a2b3c4d5e6f",
            "status": "succeeded",
            "job": "/v1/jobs/3f2b9c1e8d7a4b6c9e0f1a2b3c4d5e6f",
        }
    ],
    "links": {
        "patient": f"/v1/patients/{_EXAMPLE_ID}",
        "fractions": f"/v1/patients/{_EXAMPLE_ID}/fractions",
    },
}


class PlanningOut(BaseModel):
    """What was stored of the planning scan (counts and organ keys: no patient data)."""

    slices: int
    rois: int
    organs: list[str] = Field(description="Organs the ROI names map to (synonym table).")
    series_sha256: str = Field(description="SHA-256 of the planning SeriesInstanceUID.")
    warnings: list[str] = Field(default_factory=list)


class AdaptationOut(BaseModel):
    """The patient model's adaptation."""

    status: str = Field(
        description="unavailable (the server cannot train; `reason` says why), queued, running, "
        "succeeded (`result.kept`: the adapted model beat the generic one on held-back synthetic "
        "fractions and is used) or failed (`reason`)."
    )
    model: str = Field(description="The model the next fraction uses: patient or generic.")
    reason: str | None = None
    attempts: int = 0
    queued_at: _dt.datetime | None = None
    started_at: _dt.datetime | None = None
    finished_at: _dt.datetime | None = None
    progress: dict[str, Any] | None = Field(
        default=None, description="While running: phase, step, spent_s, budget_s."
    )
    result: dict[str, Any] | None = Field(
        default=None,
        description="kept, reason, steps, seconds, per-organ DSC of the base and adapted models "
        "on the held-back synthetic fractions.",
    )


class FractionOut(BaseModel):
    """A fraction job of the patient."""

    id: str
    status: str
    job: str = Field(description="GET this for the job, its QA and artefact links.")


class PatientLinks(BaseModel):
    """Where the patient and its fractions are."""

    patient: str
    fractions: str


class PatientOut(BaseModel):
    """A patient: the stored planning scan and its adaptation."""

    id: str = Field(description="Patient id (32 hex digits; random, not from the DICOM).")
    created_at: _dt.datetime
    last_used_at: _dt.datetime
    expires_at: _dt.datetime = Field(
        description="Deleted then unless a fraction arrives before (JRS_PATIENT_RETENTION_DAYS)."
    )
    planning: PlanningOut
    adaptation: AdaptationOut
    fractions: list[FractionOut] = Field(default_factory=list)
    links: PatientLinks

    model_config = ConfigDict(json_schema_extra={"examples": [PATIENT_EXAMPLE]})


PATIENT_CREATED_EXAMPLE: dict[str, Any] = {
    **PATIENT_EXAMPLE,
    "adaptation": {
        **PATIENT_EXAMPLE["adaptation"],
        "status": "queued",
        "model": "generic",
        "started_at": None,
        "finished_at": None,
        "result": None,
    },
    "fractions": [],
}
FRACTION_EXAMPLE: dict[str, Any] = {
    **JOB_EXAMPLE,
    "qa": {
        **JOB_EXAMPLE["qa"],
        "model": {"name": "crossstitch-patient", "version": 1, "kind": "patient"},
        "patient": {
            "id": _EXAMPLE_ID,
            "model": "patient",
            "adaptation_status": "succeeded",
            "generic_because": None,
        },
    },
}


# ------------------------------------------------------------------------------ helpers
def _ts(value: float | None) -> _dt.datetime | None:
    return None if value is None else _dt.datetime.fromtimestamp(value, _dt.UTC)


def get_patients(request: Request) -> PatientService:
    """The app's patient service.

    Raises:
        ModelNotReady: the app has not finished starting.
    """
    service: PatientService | None = getattr(request.app.state, "patients", None)
    if service is None:
        raise ModelNotReady("the service is starting; retry in a moment")
    return service


def load_patient(patient_id: str, patients: PatientService) -> Patient:
    """The stored patient.

    Raises:
        NotFound: no patient with this id.
    """
    ok = len(patient_id) == _PATIENT_ID_LENGTH and all(c in "0123456789abcdef" for c in patient_id)
    patient = patients.store.get(patient_id) if ok else None
    if patient is None:
        raise NotFound(
            f"no patient {patient_id[:40]!r}; patient ids are 32 hex digits as POST /v1/patients "
            "returned (patients unused for JRS_PATIENT_RETENTION_DAYS are deleted)"
        )
    return patient


def patient_view(
    patient: Patient, patients: PatientService, manager: JobManager, root_path: str = ""
) -> PatientOut:
    """The API view of a stored patient."""
    base = f"{root_path.rstrip('/')}/v1/patients/{patient.id}"
    retention_s = patients.settings.patient_retention_days * 86400
    fractions = []
    for job_id in patients.store.fractions(patient.id):
        job = manager.store.get(job_id)
        if job is not None:
            fractions.append(
                FractionOut(
                    id=job_id, status=job.status, job=f"{root_path.rstrip('/')}/v1/jobs/{job_id}"
                )
            )
    planning = patient.planning
    return PatientOut(
        id=patient.id,
        created_at=_ts(patient.created_at) or _dt.datetime.now(_dt.UTC),
        last_used_at=_ts(patient.last_used_at) or _dt.datetime.now(_dt.UTC),
        expires_at=_ts(patient.last_used_at + retention_s) or _dt.datetime.now(_dt.UTC),
        planning=PlanningOut(
            slices=int(planning.get("slices", 0)),
            rois=int(planning.get("rois", 0)),
            organs=list(planning.get("organs", [])),
            series_sha256=str(planning.get("series_sha256", "")),
            warnings=list(planning.get("warnings", [])),
        ),
        adaptation=AdaptationOut(
            status=patient.adapt_status,
            model="patient" if patients.model_dir(patient) is not None else "generic",
            reason=patient.adapt_reason,
            attempts=patient.adapt_attempts,
            queued_at=_ts(patient.adapt_queued_at),
            started_at=_ts(patient.adapt_started_at),
            finished_at=_ts(patient.adapt_finished_at),
            progress=patients.progress(patient),
            result=patient.adapt_result,
        ),
        fractions=fractions,
        links=PatientLinks(patient=base, fractions=f"{base}/fractions"),
    )


async def _admit(request: Request, settings: Settings, manager: JobManager, metrics: Any) -> None:
    """The checks of every upload: model ready, storage free, queue room."""
    state = request.app.state
    if not getattr(state, "ready", False):
        raise ModelNotReady(getattr(state, "ready_reason", "") or "the model is not loaded")
    free = await run_in_threadpool(free_bytes, settings.data_dir)
    if free is not None and free < settings.min_free_bytes:
        metrics.jobs.labels(outcome="rejected").inc()
        raise StorageFull(
            f"the artefact storage has {free // MIB} MiB free, less than JRS_MIN_FREE_BYTES "
            f"({settings.min_free_bytes // MIB} MiB); no upload is accepted until space is freed"
        )
    if not manager.has_room():
        metrics.jobs.labels(outcome="busy").inc()
        raise ServiceBusy(
            f"the job queue is full ({manager.queue_depth} waiting); retry after "
            f"{settings.retry_after_s} s"
        )


def _organs(roi_names: list[str], synonyms: Any = None) -> list[str]:
    """Organ keys the ROI names map to (the pipeline's synonym table: the site's, or built-in)."""
    mapping = (synonyms or SynonymTable()).resolve(roi_names)
    return [LABELS[k] for k in sorted(mapping.used)]


def _store_planning(
    files: list[Any], folder: Any, limits: UploadLimits, synonyms: Any = None
) -> tuple[dict[str, Any], int]:
    """Unpack and validate a planning upload into ``folder/input``; the planning record."""
    unpack(files, folder / "input", limits)
    part = validate_planning(folder / "input", limits)
    organs = _organs(part.roi_names, synonyms)
    if not organs:
        raise InvalidInput(
            f"planning: none of the {part.rois} ROI names of the RTSTRUCT maps to an organ "
            "(prostate, seminal vesicles, rectum, bladder); the patient model and the network "
            "need them (see `jrs rois --rtstruct FILE` for the synonym table)"
        )
    (folder / "input" / PLANNING_DIR).rename(folder / PLANNING_DIR)
    shutil.rmtree(folder / "input", ignore_errors=True)
    record = {
        "slices": part.slices,
        "rois": part.rois,
        "organs": organs,
        "series_sha256": series_sha256(part.series_instance_uid),
        "warnings": part.warnings,
    }
    return record, part.files


async def _wait_for(manager: JobManager, job_id: str, timeout: float) -> None:
    """Wait (without holding a thread) until the job ends or `timeout` seconds pass."""
    event = manager.done_event(job_id)
    if event is None:
        return
    deadline = time.monotonic() + timeout
    pause = 0.01
    while not event.is_set() and time.monotonic() < deadline:
        await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(pause * 1.5, 0.25)


# ------------------------------------------------------------------------------ routes
@router.post(
    "",
    summary="Upload a patient's planning scan",
    status_code=201,
    response_model=PatientOut,
    openapi_extra=PLANNING_BODY,
    responses={
        201: {
            "description": "Stored; the adaptation is queued (or unavailable: `reason`).",
            "content": {"application/json": {"example": PATIENT_CREATED_EXAMPLE}},
        },
        **error_responses(401, 413, 415, 422, 503, 507),
    },
)
async def create_patient(
    request: Request, settings: SettingsDep, manager: ManagerDep, metrics: MetricsDep
) -> JSONResponse:
    """Store the planning CT + RTSTRUCT once and queue the adaptation of a patient model.

    The upload is validated as the planning of ``/v1/recontour`` (one RTSTRUCT that belongs to the
    CT series) and its ROI names mapped to organs (at least one needed). Answers 201 with the
    patient and a ``Location``; then send each daily CT to ``POST /v1/patients/{id}/fractions``.
    """
    patients = get_patients(request)
    await _admit(request, settings, manager, metrics)
    limits = UploadLimits.from_settings(settings)
    patient_id = new_patient_id()
    folder = patients.folder(patient_id)
    try:
        files = await receive_multipart(request, folder / "upload", limits, fields=("planning",))
        async with request.app.state.validation_slots:
            record, count = await run_in_threadpool(
                _store_planning, files, folder, limits, settings.synonym_table
            )
        shutil.rmtree(folder / "upload", ignore_errors=True)
        status, reason = patients.initial_status()
        now = time.time()
        patient = Patient(
            id=patient_id,
            created_at=now,
            last_used_at=now,
            planning=record,
            adapt_status=status,
            adapt_reason=reason,
            adapt_queued_at=now if status == "queued" else None,
            request_id=current_request_id(),
        )
        patients.store.create(patient)
    except OSError as exc:
        shutil.rmtree(folder, ignore_errors=True)
        if exc.errno in NO_SPACE:
            raise StorageFull("no space left in the storage for this upload; retry later") from None
        raise
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    logger.info(
        "patient stored",
        extra={
            "fields": {
                "patient_id": patient_id,
                "planning_slices": record["slices"],
                "files": count,
                "adaptation": status,
            }
        },
    )
    root = str(request.scope.get("root_path", "")).rstrip("/")
    body = patient_view(patient, patients, manager, root).model_dump(mode="json")
    return JSONResponse(
        body, status_code=201, headers={"Location": f"{root}/v1/patients/{patient_id}"}
    )


@router.get(
    "/{patient_id}",
    summary="Patient status",
    response_model=PatientOut,
    responses=error_responses(401, 404),
)
def get_patient(patient_id: str, request: Request, manager: ManagerDep) -> PatientOut:
    """The stored planning, the adaptation (status, progress, figures) and the fractions."""
    patients = get_patients(request)
    return patient_view(
        load_patient(patient_id, patients), patients, manager, request.scope.get("root_path", "")
    )


@router.delete(
    "/{patient_id}",
    summary="Delete a patient",
    status_code=204,
    response_class=Response,
    responses=error_responses(401, 404),
)
def delete_patient(patient_id: str, request: Request, manager: ManagerDep) -> Response:
    """Delete the planning, the patient model, a running adaptation and finished fractions.

    Fractions still queued or running finish; their jobs are then deleted by the job retention.
    """
    patients = get_patients(request)
    load_patient(patient_id, patients)
    patients.delete(patient_id)
    return Response(status_code=204)


@router.post(
    "/{patient_id}/fractions",
    summary="Re-contour a daily CT of the patient",
    status_code=200,
    response_model=JobOut,
    openapi_extra=DAILY_BODY,
    responses={
        200: {
            "description": "The job ended within the wait; `qa.model.kind` says which model.",
            "content": {"application/json": {"example": FRACTION_EXAMPLE}},
        },
        202: {
            "model": JobOut,
            "description": "Accepted; still queued or running. Poll the Location.",
            "content": {"application/json": {"example": QUEUED_EXAMPLE}},
        },
        **error_responses(401, 404, 413, 415, 422, 503, 507),
    },
)
async def post_fraction(
    patient_id: str,
    request: Request,
    settings: SettingsDep,
    manager: ManagerDep,
    metrics: MetricsDep,
    wait: bool = Query(True, description="Wait for the result (up to timeout) or answer 202."),
    timeout: float | None = Query(
        None, ge=0, description="Seconds to wait (default JRS_JOB_WAIT_TIMEOUT_S)."
    ),
) -> JSONResponse:
    """Re-contour a daily CT against the patient's stored planning (answers as /v1/recontour).

    The patient model is used once its adaptation succeeded and kept it, the generic model
    before (or when adaptation is unavailable); the job's ``qa.model.kind`` and ``qa.patient``
    say which and why.
    """
    patients = get_patients(request)
    load_patient(patient_id, patients)
    await _admit(request, settings, manager, metrics)
    limits = UploadLimits.from_settings(settings)
    job_id = new_job_id()
    job_dir = manager.job_dir(job_id)
    inputs = job_dir / "input"
    try:
        t0 = time.monotonic()
        files = await receive_multipart(request, job_dir / "upload", limits, fields=("daily",))
        metrics.stage.labels(stage="upload").observe(time.monotonic() - t0)

        def prepare() -> Any:
            unpack(files, inputs, limits)
            part = validate_daily(inputs, limits)
            patients.link_planning(patient_id, inputs / PLANNING_DIR)
            (inputs / PATIENT_MARKER).write_text(json.dumps({"patient_id": patient_id}))
            return part

        async with request.app.state.validation_slots:
            t1 = time.monotonic()
            part = await run_in_threadpool(prepare)
        metrics.stage.labels(stage="validate").observe(time.monotonic() - t1)
        shutil.rmtree(job_dir / "upload", ignore_errors=True)
        job = manager.submit(job_id, current_request_id())
        patients.store.add_fraction(patient_id, job_id)
    except OSError as exc:
        shutil.rmtree(job_dir, ignore_errors=True)
        if exc.errno in NO_SPACE:
            metrics.jobs.labels(outcome="rejected").inc()
            raise StorageFull("no space left in the storage for this upload; retry later") from None
        raise
    except BaseException as exc:
        shutil.rmtree(job_dir, ignore_errors=True)
        if isinstance(exc, JrsError):
            metrics.jobs.labels(
                outcome="busy" if isinstance(exc, ServiceBusy) else "rejected"
            ).inc()
        raise
    logger.info(
        "fraction accepted",
        extra={"fields": {"job_id": job_id, "patient_id": patient_id, "daily_slices": part.slices}},
    )
    if wait:
        limit = settings.job_wait_timeout_s if timeout is None else timeout
        await _wait_for(manager, job_id, min(limit, settings.max_wait_timeout_s))
        job = manager.store.get(job_id) or job
    root = str(request.scope.get("root_path", "")).rstrip("/")
    body = JobOut.from_job(job, root).model_dump(mode="json")
    headers = {"Location": f"{root}/v1/jobs/{job_id}"}
    if not job.finished:
        headers["Retry-After"] = str(settings.poll_after_s)
    return JSONResponse(body, status_code=200 if job.finished else 202, headers=headers)
