"""The FastAPI app factory of the re-contouring service.

``create_app(settings=None, runner=None)`` builds an app; nothing heavy happens at import. The
lifespan opens the job store, loads the model (the runner's ``load``), recovers jobs left by a
previous process, starts the worker pool and the retention cleanup, and on shutdown lets running
jobs finish (or marks them failed) before closing the store.

Run it with ``jrs serve --host H --port P`` or
``uvicorn --factory service.app:create_app``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI
from starlette.concurrency import run_in_threadpool

import jrs
from jrs.core.errors import JrsError
from jrs.service.auth import KeyChecker, require_api_key
from jrs.service.errors import install_error_handlers
from jrs.service.jobs import JobManager, JobStore, PipelineRunner
from jrs.service.logging_config import configure_logging
from jrs.service.metrics import Metrics
from jrs.service.middleware import RequestContextMiddleware
from jrs.service.patients import PatientAwareRunner, attach_patients
from jrs.service.routers import health, jobs, metrics, patients, recontour
from jrs.service.settings import Settings, load_settings

logger = logging.getLogger("jrs.service.app")

RunnerCallable = Callable[[Path, Path, Path], dict[str, Any]]

DESCRIPTION = """
Re-contouring of the prostate on the daily CT for online adaptive radiotherapy.

`POST /v1/recontour` with the planning CT series + RTSTRUCT (`planning`) and the daily CT series
(`daily`), each a zip or several DICOM files. The answer carries the job's id, status, QA and
links to the RTSTRUCT for the TPS, the DVF (MetaImage or DICOM REG), the QA JSON and a review PNG.

`POST /v1/patients` stores a patient's planning CT + RTSTRUCT once (and adapts a patient model in
the background where the server can train); `POST /v1/patients/{id}/fractions` then takes only the
daily CT and answers as `/v1/recontour`.

Every route but `/health/*` needs `Authorization: Bearer <key>`.
"""


def _load_runner(app: FastAPI, runner: Any) -> None:
    """Call the runner's ``load`` and record readiness on ``app.state``."""
    state = app.state
    try:
        load = getattr(runner, "load", None)
        if callable(load):
            load()
        state.ready = bool(getattr(runner, "ready", True))
        state.ready_reason = str(getattr(runner, "reason", "") or "")
    except JrsError as exc:
        state.ready = False
        state.ready_reason = exc.message
    except Exception as exc:
        state.ready = False
        state.ready_reason = "the model could not be loaded; see the service log"
        logger.error("model loading failed", exc_info=exc)
    state.execution_provider = str(getattr(runner, "execution_provider", "unknown"))


def create_app(settings: Settings | None = None, runner: RunnerCallable | None = None) -> FastAPI:
    """Build the service app.

    Args:
        settings: the configuration (read from the environment when None).
        runner: what re-contours a job, ``runner(job_dir, planning_dir, daily_dir) -> qa``
            (the `PipelineRunner` on ``jrs.pipeline.run`` when None).

    Returns:
        The FastAPI app (its lifespan starts the store and the workers).

    Raises:
        ConfigurationError: settings from the environment are missing or invalid (no API key).
    """
    settings = settings if settings is not None else load_settings()
    job_runner: RunnerCallable = (
        runner
        if runner is not None
        else PipelineRunner(
            settings.model_dir,
            settings.device,
            margin_mm=settings.margin_mm,
            dvf_spacing_mm=settings.dvf_spacing_mm,
            engine=settings.engine,
            precision=settings.precision,
            synonyms=settings.synonym_table,
            path_choice=settings.path_choices,
        )
    )
    job_runner = PatientAwareRunner(job_runner, settings)  # patient fractions: patient model
    app_metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(
            settings.log_level, redact=[settings.data_dir, settings.data_dir.resolve()]
        )
        if not settings.api_keys:
            logger.warning("JRS_INSECURE_DEV is set: no API key is required (development only)")
        settings.jobs_dir.mkdir(parents=True, exist_ok=True)
        store = JobStore(settings.db_path)
        await run_in_threadpool(_load_runner, app, job_runner)
        manager = JobManager(
            store,
            settings.jobs_dir,
            job_runner,
            concurrency=settings.max_concurrent_jobs,
            queue_size=settings.queue_size,
            device=settings.device,
            keep_inputs=settings.keep_inputs,
            max_attempts=settings.max_attempts if settings.requeue_on_restart else 0,
            on_stage=lambda stage, s: app_metrics.stage.labels(stage=stage).observe(s),
            on_outcome=lambda outcome: app_metrics.jobs.labels(outcome=outcome).inc(),
        )
        app_metrics.ready.set(1 if app.state.ready else 0)
        app_metrics.set_provider(app.state.execution_provider, settings.device)
        app_metrics.watch_job_states(store.counts)
        retention_s = settings.retention_days * 86400
        await run_in_threadpool(manager.cleanup, retention_s)
        await run_in_threadpool(manager.start, bool(app.state.ready))
        patient_service = await run_in_threadpool(
            attach_patients, app, settings, manager, job_runner
        )
        app.state.store = store
        app.state.validation_slots = asyncio.Semaphore(settings.max_concurrent_validations)
        app.state.manager = manager
        if not app.state.ready:
            logger.error(
                "model not ready: /health/ready answers 503 and no job is accepted",
                extra={"fields": {"reason": app.state.ready_reason, "device": settings.device}},
            )
        else:
            logger.info(
                "model ready",
                extra={
                    "fields": {
                        "execution_provider": app.state.execution_provider,
                        **dict(getattr(job_runner, "engine_info", {}) or {}),
                    }
                },
            )

        async def cleanup_loop() -> None:
            while True:
                await asyncio.sleep(settings.cleanup_interval_s)
                try:
                    await run_in_threadpool(manager.cleanup, retention_s)
                except Exception as exc:  # keep the loop alive
                    logger.error("retention cleanup failed", exc_info=exc)

        cleaner = asyncio.create_task(cleanup_loop())
        logger.info(
            "service started",
            extra={
                "fields": {
                    "ready": app.state.ready,
                    "workers": settings.max_concurrent_jobs,
                    "queue_size": settings.queue_size,
                }
            },
        )
        try:
            yield
        finally:
            cleaner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await cleaner
            app.state.ready = False
            await asyncio.gather(
                run_in_threadpool(manager.shutdown, settings.shutdown_grace_s),
                run_in_threadpool(patient_service.stop),
            )
            app.state.patients = None
            app.state.manager = None
            store.close()
            logger.info("service stopped")

    public_docs = settings.public_docs
    app = FastAPI(
        title="jrs re-contouring service",
        version=jrs.__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_url="/openapi.json" if public_docs else None,
        docs_url="/docs" if public_docs else None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = app_metrics
    app.state.key_checker = KeyChecker(settings.api_keys)
    app.state.ready = False
    app.state.ready_reason = "the service is starting"
    app.state.execution_provider = "none"
    app.state.manager = None
    install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware, metrics=app_metrics)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(recontour.router)
    app.include_router(jobs.router)
    app.include_router(patients.router)
    if not public_docs:

        @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(require_api_key)])
        def openapi_document() -> dict[str, Any]:
            return app.openapi()

    return app
