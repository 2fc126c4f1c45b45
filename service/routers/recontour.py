"""``POST /v1/recontour``: upload a planning CT + RTSTRUCT and a daily CT, get a job."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from jrs.core.errors import JrsError, ModelNotReady, ServiceBusy, StorageFull
from jrs.service.auth import require_api_key
from jrs.service.deps import ManagerDep, MetricsDep, SettingsDep
from jrs.service.jobs import NO_SPACE, JobManager, free_bytes, new_job_id
from jrs.service.logging_config import current_request_id
from jrs.service.schemas import JOB_EXAMPLE, QUEUED_EXAMPLE, JobOut, error_responses
from jrs.service.settings import MIB
from jrs.service.upload_limits import UploadLimits
from jrs.service.uploads import receive_multipart, unpack_and_validate

logger = logging.getLogger("service.recontour")

router = APIRouter(prefix="/v1", tags=["recontour"], dependencies=[Depends(require_api_key)])

_FILES_SCHEMA = {
    "type": "array",
    "items": {"type": "string", "format": "binary"},
}
REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["planning", "daily"],
                    "properties": {
                        "planning": {
                            **_FILES_SCHEMA,
                            "description": "A zip, or several DICOM files: the planning CT "
                            "series and its RTSTRUCT.",
                        },
                        "daily": {
                            **_FILES_SCHEMA,
                            "description": "A zip, or several DICOM files: the daily CT series.",
                        },
                    },
                },
                "encoding": {
                    "planning": {"contentType": "application/zip, application/dicom"},
                    "daily": {"contentType": "application/zip, application/dicom"},
                },
            }
        },
    },
    "x-codeSamples": [
        {
            "lang": "curl",
            "source": "curl -H 'Authorization: Bearer $KEY' -F planning=@planning.zip "
            "-F daily=@daily.zip 'http://localhost:8000/v1/recontour?wait=true'",
        }
    ],
}


async def _wait_for(manager: JobManager, job_id: str, timeout: float) -> None:
    """Wait (without holding a thread) until the job ends or `timeout` seconds pass."""
    event = manager.done_event(job_id)
    if event is None:
        return
    deadline = time.monotonic() + timeout
    pause = 0.01
    while not event.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            return
        await asyncio.sleep(min(pause, left))
        pause = min(pause * 1.5, 0.25)


@router.post(
    "/recontour",
    summary="Re-contour a daily CT",
    status_code=200,
    response_model=JobOut,
    openapi_extra=REQUEST_BODY,
    responses={
        200: {
            "description": "The job ended within the wait (succeeded or failed).",
            "content": {"application/json": {"example": JOB_EXAMPLE}},
        },
        202: {
            "model": JobOut,
            "description": "Accepted; still queued or running. Poll the Location.",
            "content": {"application/json": {"example": QUEUED_EXAMPLE}},
        },
        **error_responses(401, 413, 415, 422, 503, 507),
    },
)
async def recontour(
    request: Request,
    settings: SettingsDep,
    manager: ManagerDep,
    metrics: MetricsDep,
    wait: bool = Query(True, description="Wait for the result (up to timeout) or answer 202."),
    timeout: float | None = Query(
        None, ge=0, description="Seconds to wait (default JRS_JOB_WAIT_TIMEOUT_S)."
    ),
) -> JSONResponse:
    """Validate the uploads, queue a job and (by default) wait for its result.

    The planning upload must hold the planning CT series and the RTSTRUCT drawn on it; the daily
    upload the daily CT series; each a zip or several DICOM files. Bad input is refused at once
    (4xx naming the file). Answers 200 with the job when it ended within the wait, else 202 with
    the job and a ``Location`` to poll; 503 with ``Retry-After`` when the queue is full.
    """
    state = request.app.state
    if not getattr(state, "ready", False):
        raise ModelNotReady(getattr(state, "ready_reason", "") or "the model is not loaded")
    free = await run_in_threadpool(free_bytes, settings.data_dir)
    if free is not None and free < settings.min_free_bytes:
        metrics.jobs.labels(outcome="rejected").inc()
        raise StorageFull(
            f"the artefact storage has {free // MIB} MiB free, less than JRS_MIN_FREE_BYTES "
            f"({settings.min_free_bytes // MIB} MiB); no upload is accepted until space is freed "
            "(finished jobs are deleted after JRS_RETENTION_DAYS)"
        )
    if not manager.has_room():
        metrics.jobs.labels(outcome="busy").inc()
        raise ServiceBusy(
            f"the job queue is full ({manager.queue_depth} waiting); retry after "
            f"{settings.retry_after_s} s"
        )
    limits = UploadLimits.from_settings(settings)
    job_id = new_job_id()
    job_dir = manager.job_dir(job_id)
    try:
        t0 = time.monotonic()
        files = await receive_multipart(request, job_dir / "upload", limits)
        t1 = time.monotonic()
        metrics.stage.labels(stage="upload").observe(t1 - t0)
        async with request.app.state.validation_slots:
            t1 = time.monotonic()
            summary = await run_in_threadpool(unpack_and_validate, files, job_dir / "input", limits)
        metrics.stage.labels(stage="validate").observe(time.monotonic() - t1)
        shutil.rmtree(job_dir / "upload", ignore_errors=True)
        job = manager.submit(job_id, current_request_id())
    except OSError as exc:
        shutil.rmtree(job_dir, ignore_errors=True)
        if exc.errno in NO_SPACE:
            metrics.jobs.labels(outcome="rejected").inc()
            logger.error(
                "no space left in the artefact storage", extra={"fields": {"stage": "upload"}}
            )
            raise StorageFull(
                "no space left in the artefact storage for this upload; retry later"
            ) from None
        raise
    except BaseException as exc:
        shutil.rmtree(job_dir, ignore_errors=True)
        outcome = "busy" if isinstance(exc, ServiceBusy) else "rejected"
        if isinstance(exc, JrsError):
            metrics.jobs.labels(outcome=outcome).inc()
        raise
    logger.info(
        "job accepted",
        extra={
            "fields": {
                "job_id": job_id,
                "planning_slices": summary.planning_slices,
                "daily_slices": summary.daily_slices,
                "files": summary.files,
            }
        },
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
