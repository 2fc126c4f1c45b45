"""ASGI middleware: request ids, access logs, request metrics and the 500 answer.

Every response carries ``X-Request-ID`` (the client's when it sent a sane one, else a new one).
An exception no handler turned into an answer is logged (type and place, not its message) and
answered with a 500 JSON body that reveals no internals.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jrs.service.logging_config import reset_request_id, set_request_id
from jrs.service.metrics import Metrics

logger = logging.getLogger("service.access")
_SANE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return str(path) if path else "unmatched"


class RequestContextMiddleware:
    """Request id, access log, metrics and last-resort error answer for HTTP requests.

    Args:
        app: the wrapped ASGI app.
        metrics: where request counts and latencies go.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI call."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = ""
        for name, value in scope.get("headers", []):
            if name == b"x-request-id":
                incoming = value.decode("latin-1")
                break
        request_id = incoming if _SANE_ID.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        token = set_request_id(request_id)
        started = time.perf_counter()
        status: dict[str, Any] = {"code": 500, "sent": False}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                status["sent"] = True
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            logger.error("unhandled exception", exc_info=exc)
            if not status["sent"]:
                body = json.dumps(
                    {
                        "error": "internal_error",
                        "detail": "internal server error; quote the request id when reporting it",
                        "request_id": request_id,
                    }
                ).encode()
                await send_with_id(
                    {
                        "type": "http.response.start",
                        "status": 500,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
        finally:
            elapsed = time.perf_counter() - started
            route = _route_template(scope)
            method = scope.get("method", "")
            self.metrics.requests.labels(route=route, method=method, status=status["code"]).inc()
            self.metrics.latency.labels(route=route, method=method).observe(elapsed)
            logger.info(
                "request",
                extra={
                    "fields": {
                        "method": method,
                        "route": route,
                        "status": status["code"],
                        "duration_ms": round(elapsed * 1000, 1),
                    }
                },
            )
            reset_request_id(token)
