"""Errors of the service layer and the one place that maps every error to a JSON answer.

Every error answer has the body ``{"error": <code>, "detail": <message>, "request_id": <id>}``
and the HTTP status that `HTTP_STATUS` gives the `JrsError` subclass raised (the core's errors
carry no HTTP knowledge; this table is the one place they meet HTTP). Unhandled exceptions never
reach the client with their internals: `RequestContextMiddleware` (see
`jrs.service.logging_config`) turns them into a 500 with ``error: internal_error``.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jrs.core.errors import (
    GeometryMismatch,
    InvalidInput,
    JrsError,
    ModelNotReady,
    NotFound,
    PayloadTooLarge,
    ServiceBusy,
    StorageFull,
    UnsupportedData,
)
from jrs.service.logging_config import current_request_id

logger = logging.getLogger("jrs.service.errors")


class ConfigurationError(JrsError):
    """The service settings are incomplete or contradictory (e.g. no API key configured)."""

    code = "configuration_error"


class Unauthorized(JrsError):
    """A request without a valid ``Authorization: Bearer <key>`` header."""

    code = "unauthorized"


class JobNotFinished(JrsError):
    """An artefact of a job was requested before the job succeeded."""

    code = "job_not_finished"


#: HTTP status per error class; a subclass not listed takes its nearest listed base's status.
HTTP_STATUS: dict[type[JrsError], int] = {
    JrsError: 500,
    InvalidInput: 422,
    GeometryMismatch: 422,
    PayloadTooLarge: 413,
    UnsupportedData: 415,
    ModelNotReady: 503,
    ServiceBusy: 503,
    NotFound: 404,
    StorageFull: 507,
    ConfigurationError: 500,
    Unauthorized: 401,
    JobNotFinished: 409,
}


def http_status(exc: JrsError) -> int:
    """The HTTP status of an error: its class's entry in `HTTP_STATUS`, else its nearest base's.

    Args:
        exc: the error.

    Returns:
        The status code (500 for an error class without a listed base).
    """
    for cls in type(exc).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 500


def error_body(code: str, detail: str, request_id: str | None = None) -> dict[str, str]:
    """The JSON body of every error answer.

    Args:
        code: machine-readable error code.
        detail: human-readable message.
        request_id: the request's id (the current one when None).

    Returns:
        ``{"error": code, "detail": detail, "request_id": id}``.
    """
    return {"error": code, "detail": detail, "request_id": request_id or current_request_id()}


def _retry_after(request: Request) -> str:
    settings = getattr(request.app.state, "settings", None)
    return str(getattr(settings, "retry_after_s", 10))


async def handle_jrs_error(request: Request, exc: Exception) -> JSONResponse:
    """Map any `JrsError` to its HTTP status and the JSON error body.

    Adds ``WWW-Authenticate: Bearer`` to 401 answers and ``Retry-After`` to 503 answers
    (`ServiceBusy`, `ModelNotReady`). The message is not logged: it may name uploaded files.

    Args:
        request: the request.
        exc: the error (a `JrsError`).

    Returns:
        The JSON error response.
    """
    if not isinstance(exc, JrsError):  # pragma: no cover - registered for JrsError only
        raise exc
    headers: dict[str, str] = {}
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    if isinstance(exc, ServiceBusy | ModelNotReady):
        headers["Retry-After"] = _retry_after(request)
    status = http_status(exc)
    logger.info("request refused", extra={"fields": {"error": exc.code, "status": status}})
    return JSONResponse(error_body(exc.code, exc.message), status_code=status, headers=headers)


async def handle_validation_error(request: Request, exc: Exception) -> JSONResponse:
    """Answer FastAPI's request validation errors (bad query/path values) in the common shape.

    Args:
        request: the request.
        exc: the `RequestValidationError`.

    Returns:
        A 422 JSON error response naming the offending parameters.
    """
    if not isinstance(exc, RequestValidationError):  # pragma: no cover
        raise exc
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg', 'invalid value')}")
    return JSONResponse(error_body("invalid_input", "; ".join(parts)), status_code=422)


async def handle_http_exception(request: Request, exc: Exception) -> JSONResponse:
    """Answer Starlette's HTTP exceptions (unknown route 404, wrong method 405) in the common shape.

    Args:
        request: the request.
        exc: the `HTTPException`.

    Returns:
        The JSON error response with the exception's status and headers.
    """
    if not isinstance(exc, StarletteHTTPException):  # pragma: no cover
        raise exc
    codes = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}
    return JSONResponse(
        error_body(codes.get(exc.status_code, "http_error"), str(exc.detail)),
        status_code=exc.status_code,
        headers=dict(exc.headers or {}),
    )


def install_error_handlers(app: FastAPI) -> None:
    """Register the error handlers on an app (the single place errors are mapped).

    Args:
        app: the FastAPI app.
    """
    app.add_exception_handler(JrsError, handle_jrs_error)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, handle_http_exception)
