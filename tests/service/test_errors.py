"""The one place where the core's errors meet HTTP: `jrs.service.errors.HTTP_STATUS`."""

import inspect

import pytest

pytest.importorskip("fastapi")

from jrs.core import errors as core_errors
from jrs.service.errors import HTTP_STATUS, http_status


def test_the_core_errors_carry_no_http_status() -> None:
    for _, cls in inspect.getmembers(core_errors, inspect.isclass):
        if issubclass(cls, core_errors.JrsError):
            assert not hasattr(cls, "http_status"), cls.__name__
            assert cls in HTTP_STATUS, f"{cls.__name__} has no HTTP status in the service's table"


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (core_errors.InvalidInput("bad"), 422),
        (core_errors.GeometryMismatch("grid"), 422),
        (core_errors.PayloadTooLarge("big"), 413),
        (core_errors.UnsupportedData("MR"), 415),
        (core_errors.ModelNotReady("loading"), 503),
        (core_errors.NotFound("job"), 404),
        (core_errors.StorageFull("disk"), 507),
        (core_errors.JrsError("other"), 500),
    ],
)
def test_each_error_maps_to_its_status(error: core_errors.JrsError, status: int) -> None:
    assert http_status(error) == status


def test_an_unlisted_subclass_takes_its_nearest_base_status() -> None:
    class ExportFailed(core_errors.InvalidInput):
        code = "export_failed"

    class Odd(core_errors.JrsError):
        pass

    assert http_status(ExportFailed("x")) == 422
    assert http_status(Odd("y")) == 500
