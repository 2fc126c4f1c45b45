"""Response models of the REST API (with the examples shown in the OpenAPI document)."""

from __future__ import annotations

import datetime as _dt
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from jrs.service.jobs import Job, JobStatus

_EXAMPLE_ID = "3f2b9c1e8d7a4b6c9e0f1a2b3c4d5e6f"

JOB_EXAMPLE: dict[str, Any] = {
    "id": _EXAMPLE_ID,
    "status": "succeeded",
    "created_at": "2025-01-01T08:00:00Z",
    "started_at": "2025-01-01T08:00:01Z",
    "finished_at": "2025-01-01T08:00:21Z",
    "error": None,
    "qa": {"structures": {"prostate": {"flag": "ok", "volume_change_pct": 3.1}}},
    "links": {
        "job": f"/v1/jobs/{_EXAMPLE_ID}",
        "rtstruct": f"/v1/jobs/{_EXAMPLE_ID}/rtstruct",
        "dvf": f"/v1/jobs/{_EXAMPLE_ID}/dvf?format=mha",
        "registration": f"/v1/jobs/{_EXAMPLE_ID}/dvf?format=dicom",
        "qa": f"/v1/jobs/{_EXAMPLE_ID}/qa",
        "review": f"/v1/jobs/{_EXAMPLE_ID}/review.png",
    },
}

QUEUED_EXAMPLE: dict[str, Any] = {
    **JOB_EXAMPLE,
    "status": "queued",
    "started_at": None,
    "finished_at": None,
    "qa": None,
    "links": {"job": f"/v1/jobs/{_EXAMPLE_ID}"},
}


class ErrorOut(BaseModel):
    """The body of every error answer."""

    error: str = Field(description="Machine-readable code, e.g. invalid_input, service_busy.")
    detail: str = Field(description="What is wrong and what would be accepted.")
    request_id: str = Field(description="Id of the request (also in X-Request-ID).")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": "unsupported_data",
                    "detail": "daily: folder daily holds Modality 'MR'; expected CT",
                    "request_id": "7c0e5d0c2a8b4d64a0f0a5b1e2c3d4e5",
                }
            ]
        }
    )


class JobErrorOut(BaseModel):
    """Why a job failed."""

    code: str
    message: str


class JobLinks(BaseModel):
    """Where the job and its artefacts are (artefact links only once the job succeeded)."""

    job: str
    rtstruct: str | None = None
    dvf: str | None = None
    registration: str | None = None
    qa: str | None = None
    review: str | None = None


class JobOut(BaseModel):
    """A re-contouring job."""

    id: str = Field(description="Job id (32 hex digits).")
    status: JobStatus
    created_at: _dt.datetime
    started_at: _dt.datetime | None = None
    finished_at: _dt.datetime | None = None
    error: JobErrorOut | None = None
    qa: dict[str, Any] | None = Field(default=None, description="QA figures per structure.")
    links: JobLinks

    model_config = ConfigDict(json_schema_extra={"examples": [JOB_EXAMPLE]})

    @classmethod
    def from_job(cls, job: Job, root_path: str = "") -> JobOut:
        """The API view of a stored job.

        Args:
            job: the stored job.
            root_path: the ASGI ``root_path`` (a proxy's path prefix) put before the links.
        """

        def ts(value: float | None) -> _dt.datetime | None:
            return None if value is None else _dt.datetime.fromtimestamp(value, _dt.UTC)

        base = f"{root_path.rstrip('/')}/v1/jobs/{job.id}"
        links = JobLinks(job=base)
        if job.status == "succeeded":
            have = job.artefacts
            links.rtstruct = f"{base}/rtstruct" if "rtstruct" in have else None
            links.dvf = f"{base}/dvf?format=mha" if "dvf" in have else None
            links.registration = f"{base}/dvf?format=dicom" if "registration" in have else None
            links.qa = f"{base}/qa" if "qa" in have else None
            links.review = f"{base}/review.png" if "review" in have else None
        return cls(
            id=job.id,
            status=job.status,
            created_at=ts(job.created_at) or _dt.datetime.now(_dt.UTC),
            started_at=ts(job.started_at),
            finished_at=ts(job.finished_at),
            error=(
                JobErrorOut(
                    code=job.error_code or "internal_error", message=job.error_message or ""
                )
                if job.status == "failed"
                else None
            ),
            qa=job.qa,
            links=links,
        )


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for error statuses, all with the `ErrorOut` body."""
    words = {
        401: "Missing or invalid API key (WWW-Authenticate: Bearer).",
        404: "No such job or artefact.",
        409: "The job has not succeeded (yet).",
        413: "Upload over a limit (size, files, zip entries, compression ratio).",
        415: "Valid DICOM of an unsupported kind (e.g. MR instead of CT).",
        422: "Invalid input; the message names the file and attribute.",
        503: "Queue full or model not ready; retry after Retry-After seconds.",
        507: "The artefact storage is full (below JRS_MIN_FREE_BYTES or out of space).",
    }
    return {s: {"model": ErrorOut, "description": words.get(s, "Error.")} for s in statuses}
