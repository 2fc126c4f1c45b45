"""The ``jrs`` Typer application, its logging set-up and its error handling.

Errors of the `JrsError` hierarchy are printed as one clear line on stderr with a non-zero exit
code (2 for bad input, 1 otherwise).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import typer

app = typer.Typer(
    name="jrs",
    help="Joint registration and segmentation for online adaptive radiotherapy of the prostate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("jrs")


class StderrHandler(logging.StreamHandler):
    """A stream handler that always writes to the current ``sys.stderr``.

    Test runners swap ``sys.stderr`` between invocations; a handler bound to the first one
    would write to a closed stream afterwards.
    """

    @property
    def stream(self) -> object:
        """The current ``sys.stderr``."""
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


def setup_logging(verbose: bool = False) -> None:
    """Log to the current stderr (INFO, or DEBUG when ``verbose``); warnings too."""
    root = logging.getLogger()
    if not any(isinstance(h, StderrHandler) for h in root.handlers):
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.captureWarnings(True)


def handle_errors(func: F) -> F:
    """Turn `JrsError`s into a one-line message and exit code (2 input, 1 other)."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from jrs.core.errors import InvalidInput, JrsError, UnsupportedData

        setup_logging()
        try:
            return func(*args, **kwargs)
        except JrsError as exc:
            typer.secho(f"error ({exc.code}): {exc.message}", err=True, fg=typer.colors.RED)
            code = 2 if isinstance(exc, InvalidInput | UnsupportedData) else 1
            raise typer.Exit(code=code) from exc

    return wrapper  # type: ignore[return-value]
