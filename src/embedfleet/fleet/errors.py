"""The fleet's admin API errors: one enum of stable machine codes, each mapped to an HTTP status.

Admin routes answer ``{"error": message, "code": CODE, "timestamp": RFC 3339}``, the shape
instance managers use, so scripts can branch on ``code`` and never parse messages.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import orjson


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
    DOWNLOAD_FAILED = "DOWNLOAD_FAILED"
    VERIFY_FAILED = "VERIFY_FAILED"
    UNAUTHORIZED = "UNAUTHORIZED"
    FORBIDDEN = "FORBIDDEN"
    NOT_FOUND = "NOT_FOUND"
    INTERNAL_ERROR = "INTERNAL_ERROR"


STATUS: dict[FleetErrorCode, int] = {
    FleetErrorCode.INSTANCE_NOT_FOUND: 404,
    FleetErrorCode.INSTANCE_EXISTS: 409,
    FleetErrorCode.PORT_CONFLICT: 409,
    FleetErrorCode.ALREADY_RUNNING: 409,
    FleetErrorCode.NOT_RUNNING: 409,
    FleetErrorCode.MAX_INSTANCES_REACHED: 422,
    FleetErrorCode.INVALID_DEVICE: 422,
    FleetErrorCode.VALIDATION_ERROR: 422,
    FleetErrorCode.MODEL_NOT_FOUND: 404,
    FleetErrorCode.MODEL_EXISTS: 409,
    FleetErrorCode.MODEL_BUSY: 409,  # a download or verification of this model is already under way
    FleetErrorCode.DOWNLOAD_FAILED: 502,  # the hub could not be reached or refused the download
    FleetErrorCode.VERIFY_FAILED: 422,  # the model did not load or embed
    FleetErrorCode.UNAUTHORIZED: 401,
    FleetErrorCode.FORBIDDEN: 403,
    FleetErrorCode.NOT_FOUND: 404,
    FleetErrorCode.INTERNAL_ERROR: 500,
}


def timestamp() -> str:
    """Now, as RFC 3339 UTC with milliseconds."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class FleetError(Exception):
    """An admin API error: a code (which fixes the status) and a message for people."""

    def __init__(self, code: FleetErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def status(self) -> int:
        """The HTTP status of this code."""
        return STATUS[self.code]

    def body(self) -> dict[str, Any]:
        """``{"error", "code", "timestamp"}``."""
        return {"error": self.message, "code": self.code.value, "timestamp": timestamp()}

    def render(self) -> bytes:
        """The JSON body."""
        return orjson.dumps(self.body())
