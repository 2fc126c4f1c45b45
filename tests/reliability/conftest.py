"""Fixtures of the reliability tests, and a scan of every log record they cause."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from tests.reliability.cases import SECRETS, TinyCase, build_case
from tests.reliability.server import API_KEY as PROCESS_KEY
from tests.service.conftest import API_KEY, PATIENT_ID, PATIENT_NAME

#: Text that no log record of the service may hold: the synthetic patients and the API keys.
FORBIDDEN = (*SECRETS, PATIENT_NAME, PATIENT_ID, "Secretname", API_KEY, PROCESS_KEY)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = json.dumps(getattr(record, "fields", {}), default=str)
            self.lines.append(f"{record.name} {record.getMessage()} {fields}")
        except Exception:  # a record that cannot be rendered is not ours to judge here
            self.lines.append(f"{record.name} {record.msg!r}")


@pytest.fixture(scope="session", autouse=True)
def scan_every_log_record() -> Iterator[list[str]]:
    """Collect every log record of the in-process tests; none may name a patient or a key.

    The service processes started by the tests write their own logs, scanned by those tests.
    """
    handler = _Collect()
    root = logging.getLogger()
    root.addHandler(handler)
    yield handler.lines
    root.removeHandler(handler)
    text = "\n".join(handler.lines)
    leaked = [word for word in FORBIDDEN if word in text]
    assert not leaked, f"log records named {leaked}"


@pytest.fixture(scope="session")
def tiny_case() -> TinyCase:
    """The tiny valid case (8 slices of 32 x 32) as bytes."""
    return build_case()
