"""Jobs and their artefacts: status, RTSTRUCT, DVF (MHA or DICOM REG), QA, review PNG."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse

from jrs.core.errors import NotFound
from jrs.service.auth import require_api_key
from jrs.service.deps import ManagerDep
from jrs.service.errors import JobNotFinished
from jrs.service.jobs import ARTEFACTS, Job, JobManager
from jrs.service.schemas import JobOut, error_responses

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(require_api_key)])

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")


def load_job(job_id: str, manager: JobManager) -> Job:
    """The stored job.

    Raises:
        NotFound: no job with this id.
    """
    job = manager.store.get(job_id) if _JOB_ID.match(job_id) else None
    if job is None:
        raise NotFound(f"no job {job_id[:40]!r}; job ids are 32 hex digits as POST returned")
    return job


def artefact_path(job: Job, key: str, manager: JobManager) -> Path:
    """The file of an artefact of a succeeded job.

    Raises:
        JobNotFinished: the job is queued, running or failed.
        NotFound: the job produced no such artefact.
    """
    if job.status != "succeeded":
        extra = f": {job.error_code}: {job.error_message}" if job.status == "failed" else ""
        raise JobNotFinished(
            f"job {job.id} is {job.status}{extra}; artefacts exist once it has succeeded "
            f"(poll GET /v1/jobs/{job.id})"
        )
    name = job.artefacts.get(key)
    path = manager.job_dir(job.id) / (name or ARTEFACTS[key])
    if name is None or not path.is_file():
        raise NotFound(f"job {job.id} has no {ARTEFACTS[key]}")
    return path


@router.get("/{job_id}", summary="Job status", responses=error_responses(401, 404))
def get_job(job_id: str, manager: ManagerDep, request: Request) -> JobOut:
    """Status, QA and artefact links of a job."""
    return JobOut.from_job(load_job(job_id, manager), request.scope.get("root_path", ""))


@router.get(
    "/{job_id}/rtstruct",
    summary="Re-contoured RTSTRUCT",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/dicom": {}}, "description": "RTSTRUCT on the daily CT."},
        **error_responses(401, 404, 409),
    },
)
def get_rtstruct(job_id: str, manager: ManagerDep) -> FileResponse:
    """The contours on the daily CT as a DICOM RT Structure Set (to import into the TPS)."""
    job = load_job(job_id, manager)
    return FileResponse(
        artefact_path(job, "rtstruct", manager),
        media_type="application/dicom",
        filename=f"rtstruct_{job.id}.dcm",
    )


@router.get(
    "/{job_id}/dvf",
    summary="Deformation vector field",
    response_class=FileResponse,
    responses={
        200: {
            "content": {"application/octet-stream": {}, "application/dicom": {}},
            "description": "MetaImage (format=mha) or DICOM Deformable Registration (dicom).",
        },
        **error_responses(401, 404, 409, 422),
    },
)
def get_dvf(
    job_id: str,
    manager: ManagerDep,
    format: Literal["mha", "dicom"] = Query(
        "mha", description="mha: MetaImage of the (x, y, z) LPS displacement in mm; dicom: REG."
    ),
) -> FileResponse:
    """The DVF on the daily grid (pull: daily point p maps to p + u(p) in the planning scan)."""
    job = load_job(job_id, manager)
    if format == "dicom":
        path = artefact_path(job, "registration", manager)
        return FileResponse(path, media_type="application/dicom", filename=f"reg_{job.id}.dcm")
    path = artefact_path(job, "dvf", manager)
    return FileResponse(path, media_type="application/octet-stream", filename=f"dvf_{job.id}.mha")


@router.get("/{job_id}/qa", summary="QA figures", responses=error_responses(401, 404, 409))
def get_qa(job_id: str, manager: ManagerDep) -> dict[str, Any]:
    """The QA JSON of a succeeded job (per-structure figures and flags)."""
    job = load_job(job_id, manager)
    path = artefact_path(job, "qa", manager)
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


@router.get(
    "/{job_id}/review.png",
    summary="Review image",
    response_class=FileResponse,
    responses={200: {"content": {"image/png": {}}}, **error_responses(401, 404, 409)},
)
def get_review(job_id: str, manager: ManagerDep) -> FileResponse:
    """PNG overlay of the new contours on the daily CT."""
    job = load_job(job_id, manager)
    return FileResponse(artefact_path(job, "review", manager), media_type="image/png")
