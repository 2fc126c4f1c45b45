"""JSON logs with the request id of the current request.

One JSON object a line on stderr: ``ts``, ``level``, ``logger``, ``msg``, ``request_id`` and any
structured fields passed as ``extra={"fields": {...}}``. The service logs codes, counts, timings
and job ids only: never DICOM header values, patient names or IDs, uploaded file names, error
details that quote them, nor API keys.
"""

from __future__ import annotations

import contextvars
import datetime as _dt
import json
import logging
import re
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("jrs_request_id", default="-")
_HANDLER_NAME = "jrs-json"
_redactor: RedactUploadPaths | None = None


def current_request_id() -> str:
    """The id of the request being handled ("-" outside a request)."""
    return _request_id.get()


def set_request_id(value: str) -> contextvars.Token[str]:
    """Make `value` the current request id (returns the token to reset it)."""
    return _request_id.set(value)


def reset_request_id(token: contextvars.Token[str]) -> None:
    """Restore the request id that was current before `set_request_id`."""
    _request_id.reset(token)


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object."""

    def format(self, record: logging.LogRecord) -> str:
        """Format `record` as one line of JSON.

        Args:
            record: the log record.

        Returns:
            The JSON text.
        """
        entry: dict[str, Any] = {
            "ts": _dt.datetime.fromtimestamp(record.created, _dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or current_request_id(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info and record.exc_info[0] is not None:
            # the exception type and where it happened, not its message (it may quote data)
            entry["exc_type"] = record.exc_info[0].__name__
            tb = record.exc_info[2]
            frames = []
            while tb is not None:
                code = tb.tb_frame.f_code
                frames.append(f"{code.co_filename}:{tb.tb_lineno} in {code.co_name}")
                tb = tb.tb_next
            entry["traceback"] = frames[-8:]
        return json.dumps(entry, default=str)


class RedactUploadPaths(logging.Filter):
    """Remove upload paths (and what follows them) from every record, whatever its logger.

    The core (`jrs.io`) names the files it reads in its log messages; under the service those
    are uploaded files whose names may identify a patient. Any text from one of `prefixes` (the
    data folder) to the end of the string it is in becomes ``<upload>``.

    Args:
        prefixes: folder paths whose contents must not be named in logs.
    """

    def __init__(self, prefixes: Iterable[str | Path]) -> None:
        super().__init__()
        words = sorted({str(p) for p in prefixes if str(p) not in ("", ".")}, key=len, reverse=True)
        self._pattern = (
            re.compile("(?:" + "|".join(re.escape(w) for w in words) + ").*", re.DOTALL)
            if words
            else None
        )

    def clean(self, value: Any) -> Any:
        """`value` with upload paths removed (strings and paths; other values unchanged)."""
        if self._pattern is None:
            return value
        if isinstance(value, Path):
            value = str(value)
        if isinstance(value, str):
            return self._pattern.sub("<upload>", value)
        return value

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact the record in place; always keep it."""
        if self._pattern is None:
            return True
        record.msg = self.clean(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(self.clean(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: self.clean(v) for k, v in record.args.items()}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            record.fields = {k: self.clean(v) for k, v in fields.items()}
        return True


class _ErrorsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def _install_record_factory() -> None:
    """Stamp every record with the request id current when it is created."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "_jrs_request_id", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        record.request_id = current_request_id()
        if _redactor is not None:  # at creation, so that every handler gets the redacted record
            _redactor.filter(record)
        return record

    factory._jrs_request_id = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


def configure_logging(level: str = "INFO", redact: Iterable[str | Path] = ()) -> None:
    """Send the root logger's records to stderr as JSON (idempotent).

    Plain console handlers already on the root logger are replaced; other handlers (files,
    test capture) are kept.

    Args:
        level: logging level name.
        redact: folders (the data folder) whose file paths are removed from every record when
            it is created, so for every handler (see `RedactUploadPaths`).
    """
    _install_record_factory()
    root = logging.getLogger()
    for h in list(root.handlers):
        # plain-text console handlers (e.g. the CLI's basicConfig) would repeat every record
        if type(h) is logging.StreamHandler and getattr(h, "name", None) != _HANDLER_NAME:
            root.removeHandler(h)
    if not any(getattr(h, "name", None) == _HANDLER_NAME for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.name = _HANDLER_NAME
        handler.setFormatter(JsonFormatter())
        root.addHandler(handler)
    global _redactor
    _redactor = RedactUploadPaths(redact) if redact else None
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
    logging.getLogger("uvicorn.access").disabled = True
    # pydicom's own warnings may quote header values: only its errors are kept (a filter, since
    # pydicom sets its logger's level when it is imported)
    pydicom_logger = logging.getLogger("pydicom")
    if not any(isinstance(f, _ErrorsOnly) for f in pydicom_logger.filters):
        pydicom_logger.addFilter(_ErrorsOnly())
    # pydicom warnings quote invalid header values (possibly patient names): never let them out
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\..*)?$")
