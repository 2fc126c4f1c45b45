"""FastAPI dependencies giving routes the objects the lifespan created."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from jrs.core.errors import ModelNotReady
from jrs.service.jobs import JobManager
from jrs.service.metrics import Metrics
from jrs.service.settings import Settings, get_settings


def get_manager(request: Request) -> JobManager:
    """The app's job manager.

    Raises:
        ModelNotReady: the app has not finished starting (no lifespan has run).
    """
    manager: JobManager | None = getattr(request.app.state, "manager", None)
    if manager is None:
        raise ModelNotReady("the service is starting; retry in a moment")
    return manager


def get_metrics(request: Request) -> Metrics:
    """The app's metrics."""
    metrics: Metrics = request.app.state.metrics
    return metrics


#: Route parameter types resolved by the dependencies above.
ManagerDep = Annotated[JobManager, Depends(get_manager)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
