"""The error hierarchy of the product.

Every error carries the HTTP status the service answers with, so that the service maps them in a
single handler. Messages name the offending file or attribute and say what would be accepted.
"""

from __future__ import annotations


class JrsError(Exception):
    """Base class of every error the product raises on purpose.

    Attributes:
        http_status: HTTP status code the REST service answers with.
        code: short machine-readable error code (snake case).
    """

    http_status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidInput(JrsError):
    """The input is malformed or violates a rule (corrupt file, missing attribute, bad value)."""

    http_status = 422
    code = "invalid_input"


class GeometryMismatch(InvalidInput):
    """Two inputs do not share the geometry they must share (frame of reference, grid, images)."""

    code = "geometry_mismatch"


class UnsupportedData(JrsError):
    """The input is valid DICOM but of a kind the product does not handle (e.g. MR, gantry tilt)."""

    http_status = 415
    code = "unsupported_data"


class ModelNotReady(JrsError):
    """The model is missing, corrupt or still loading."""

    http_status = 503
    code = "model_not_ready"


class NotFound(JrsError):
    """A requested resource (job, artefact, file) does not exist."""

    http_status = 404
    code = "not_found"


class PayloadTooLarge(InvalidInput):
    """An upload exceeds a configured limit (size, file count, compression ratio)."""

    http_status = 413
    code = "payload_too_large"


class StorageFull(JrsError):
    """The artefact storage has no room left."""

    http_status = 507
    code = "storage_full"


class ServiceBusy(JrsError):
    """The job queue is full; retry later."""

    http_status = 503
    code = "service_busy"
