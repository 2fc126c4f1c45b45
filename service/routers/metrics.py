"""Prometheus metrics (API key required)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from jrs.service.auth import require_api_key
from jrs.service.deps import MetricsDep
from jrs.service.jobs import free_bytes
from jrs.service.metrics import CONTENT_TYPE
from jrs.service.schemas import error_responses

router = APIRouter(tags=["operations"], dependencies=[Depends(require_api_key)])


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE: {}}}, **error_responses(401)},
)
def metrics(request: Request, m: MetricsDep) -> Response:
    """Requests, latencies, job stages, queue depth, jobs by state, provider, free storage."""
    manager = getattr(request.app.state, "manager", None)
    if manager is not None:
        m.queue_depth.set(manager.queue_depth)
        m.running.set(manager.running)
    free = free_bytes(request.app.state.settings.data_dir)
    if free is not None:
        m.storage_free.set(free)
    return Response(m.render(), media_type=CONTENT_TYPE)
