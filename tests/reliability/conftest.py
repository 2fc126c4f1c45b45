"""Fixtures of the reliability tests."""

from __future__ import annotations

import pytest

from tests.reliability.cases import TinyCase, build_case


@pytest.fixture(scope="session")
def tiny_case() -> TinyCase:
    """The tiny valid case (8 slices of 32 x 32) as bytes."""
    return build_case()
