"""``jrs serve``: the REST service under uvicorn."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from jrs.cli.app import StderrHandler, app, handle_errors


@app.command()
@handle_errors
def serve(
    host: Annotated[str, typer.Option("--host", help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port.")] = 8000,
) -> None:
    """Run the REST service with uvicorn; settings from JRS_* variables and .env."""
    import uvicorn

    from jrs.service.app import create_app
    from jrs.service.settings import load_settings

    settings = load_settings()
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, StderrHandler)]:
        root.removeHandler(handler)  # the service logs JSON lines instead
    uvicorn.run(create_app(settings), host=host, port=port, log_config=None, access_log=False)
