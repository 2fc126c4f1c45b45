"""Health probes (no API key needed): liveness and readiness."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from jrs.core.errors import ModelNotReady
from jrs.service.schemas import error_responses

router = APIRouter(prefix="/health", tags=["health"])


@router.get("/live", summary="Liveness probe")
def live() -> dict[str, str]:
    """The process answers."""
    return {"status": "alive"}


@router.get("/ready", summary="Readiness probe", responses=error_responses(503))
def ready(request: Request) -> dict[str, Any]:
    """200 when the model is loaded and jobs are accepted, else 503 with the reason.

    Raises:
        ModelNotReady: the model (or the job manager) is not ready.
    """
    state = request.app.state
    if getattr(state, "manager", None) is None:
        raise ModelNotReady("the service is starting")
    if not getattr(state, "ready", False):
        raise ModelNotReady(getattr(state, "ready_reason", "") or "the model is not loaded")
    return {"status": "ready", "execution_provider": state.execution_provider}
