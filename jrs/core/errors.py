"""The error hierarchy of the product.

Errors know nothing of HTTP or DICOM: the service maps them to HTTP statuses in one place
(`jrs.service.errors.HTTP_STATUS`), the command to exit codes. Messages name the offending file or
attribute and say what would be accepted; ``code`` is a short machine-readable name.
"""

from __future__ import annotations


class JrsError(Exception):
    """Base class of every error the product raises on purpose.

    Attributes:
        code: short machine-readable error code (snake case).
    """

    code: str = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidInput(JrsError):
    """The input is malformed or violates a rule (corrupt file, missing attribute, bad value)."""

    code = "invalid_input"


class GeometryMismatch(InvalidInput):
    """Two inputs do not share the geometry they must share (frame of reference, grid, images)."""

    code = "geometry_mismatch"


class UnsupportedData(JrsError):
    """The input is valid DICOM but of a kind the product does not handle (e.g. MR, gantry tilt)."""

    code = "unsupported_data"


class ModelNotReady(JrsError):
    """The model is missing, corrupt or still loading."""

    code = "model_not_ready"


class NotFound(JrsError):
    """A requested resource (job, artefact, file) does not exist."""

    code = "not_found"


class PayloadTooLarge(InvalidInput):
    """An upload exceeds a configured limit (size, file count, compression ratio)."""

    code = "payload_too_large"


class StorageFull(JrsError):
    """The artefact storage has no room left."""

    code = "storage_full"


class ServiceBusy(JrsError):
    """The job queue is full; retry later."""

    code = "service_busy"
