"""The fleet's errors: one enum of stable machine codes for the admin API.

The fleet knows no HTTP: ``embedfleet.api.errors`` maps each code to a status and renders the admin
body ``{"error": message, "code": CODE, "timestamp": RFC 3339}``, the shape instance managers use,
so scripts can branch on ``code`` and never parse messages.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum


def timestamp() -> str:
    """Now, as RFC 3339 UTC with milliseconds."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class FleetErrorCode(StrEnum):
    """Machine-readable codes of the admin API."""

    INSTANCE_NOT_FOUND = "INSTANCE_NOT_FOUND"
    INSTANCE_EXISTS = "INSTANCE_EXISTS"
    PORT_CONFLICT = "PORT_CONFLICT"
    ALREADY_RUNNING = "ALREADY_RUNNING"
    NOT_RUNNING = "NOT_RUNNING"
    MAX_INSTANCES_REACHED = "MAX_INSTANCES_REACHED"
    INVALID_DEVICE = "INVALID_DEVICE"
    VALIDATION_ERROR = "VALIDATION_ERROR"
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
    MODEL_EXISTS = "MODEL_EXISTS"
    MODEL_BUSY = "MODEL_BUSY"
    """A download or verification of this model is already under way."""
    DOWNLOAD_FAILED = "DOWNLOAD_FAILED"
    """The hub could not be reached or refused the download."""
    VERIFY_FAILED = "VERIFY_FAILED"
    """The model did not load or embed."""
    UNAUTHORIZED = "UNAUTHORIZED"
    FORBIDDEN = "FORBIDDEN"
    NOT_FOUND = "NOT_FOUND"
    METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"
    PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
    UNAVAILABLE = "UNAVAILABLE"
    STATE_NOT_SAVED = "STATE_NOT_SAVED"
    """The fleet's state file could not be written (a full disk, a read-only folder): nothing changed."""
    INTERNAL_ERROR = "INTERNAL_ERROR"


class FleetError(Exception):
    """An admin API error: a code and a message for people."""

    def __init__(self, code: FleetErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
