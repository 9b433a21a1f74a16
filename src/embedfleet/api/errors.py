"""Every error a client can see, mapped to an HTTP status and rendered in its route's shape, once.

Three families of errors reach the edge:

- :class:`~embedfleet.engine.errors.EngineError`: the engine's (and the gateway core's) kinds,
  text-embeddings-inference's ``Empty``, ``Validation``, ``Tokenizer``, ``Backend``, ``Overloaded``,
  ``Unhealthy``;
- :class:`EdgeError`: what only HTTP knows: ``NotFound``, ``MethodNotAllowed``, ``PayloadTooLarge``,
  ``Unauthorized``, ``Forbidden``;
- :class:`~embedfleet.fleet.errors.FleetError`: the admin API's codes.

Bodies follow the route: TEI's ``{"error", "error_type"}``; on the OpenAI routes (``/v1/*``,
``/embeddings``) ``{"message", "code", "error_type"}`` as TEI's OpenAI routes write it; under
``/admin/`` ``{"error", "code", "timestamp"}`` with the admin API's codes.
"""

from __future__ import annotations

from enum import Enum, StrEnum
from typing import Any

import orjson

from embedfleet.engine.errors import EngineError, ErrorKind
from embedfleet.fleet.errors import FleetError, FleetErrorCode, timestamp


class EdgeKind(StrEnum):
    """Errors of the HTTP edge itself, before any model is involved."""

    NOT_FOUND = "NotFound"
    METHOD_NOT_ALLOWED = "MethodNotAllowed"
    PAYLOAD_TOO_LARGE = "PayloadTooLarge"
    UNAUTHORIZED = "Unauthorized"
    FORBIDDEN = "Forbidden"


class EdgeError(Exception):
    """An error of the HTTP edge: no such route or model, wrong method, body too large, no valid key."""

    def __init__(self, kind: EdgeKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


STATUS: dict[ErrorKind | EdgeKind | FleetErrorCode, int] = {
    ErrorKind.EMPTY: 400,
    ErrorKind.VALIDATION: 422,
    ErrorKind.TOKENIZER: 422,
    ErrorKind.BACKEND: 424,
    ErrorKind.OVERLOADED: 429,
    ErrorKind.UNHEALTHY: 503,
    EdgeKind.NOT_FOUND: 404,
    EdgeKind.METHOD_NOT_ALLOWED: 405,
    EdgeKind.PAYLOAD_TOO_LARGE: 413,
    EdgeKind.UNAUTHORIZED: 401,
    EdgeKind.FORBIDDEN: 403,
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
    FleetErrorCode.MODEL_BUSY: 409,
    FleetErrorCode.DOWNLOAD_FAILED: 502,
    FleetErrorCode.VERIFY_FAILED: 422,
    FleetErrorCode.UNAUTHORIZED: 401,
    FleetErrorCode.FORBIDDEN: 403,
    FleetErrorCode.NOT_FOUND: 404,
    FleetErrorCode.METHOD_NOT_ALLOWED: 405,
    FleetErrorCode.PAYLOAD_TOO_LARGE: 413,
    FleetErrorCode.UNAVAILABLE: 503,
    FleetErrorCode.STATE_NOT_SAVED: 507,
    FleetErrorCode.INTERNAL_ERROR: 500,
}
"""The one map from an error to its HTTP status."""

GRPC_CODE: dict[ErrorKind | EdgeKind, str] = {
    ErrorKind.EMPTY: "INVALID_ARGUMENT",
    ErrorKind.VALIDATION: "INVALID_ARGUMENT",
    ErrorKind.TOKENIZER: "FAILED_PRECONDITION",
    ErrorKind.BACKEND: "FAILED_PRECONDITION",
    ErrorKind.OVERLOADED: "RESOURCE_EXHAUSTED",
    ErrorKind.UNHEALTHY: "UNAVAILABLE",
    EdgeKind.NOT_FOUND: "NOT_FOUND",
    EdgeKind.METHOD_NOT_ALLOWED: "UNIMPLEMENTED",
    EdgeKind.PAYLOAD_TOO_LARGE: "RESOURCE_EXHAUSTED",
    EdgeKind.UNAUTHORIZED: "UNAUTHENTICATED",
    EdgeKind.FORBIDDEN: "PERMISSION_DENIED",
}
"""The one map from an engine or edge error to its gRPC status code (a ``grpc.StatusCode`` name), as TEI's
gRPC server maps its kinds; the gRPC edge (``embedfleet.grpc``) reads it through :func:`grpc_code_of`."""

ADMIN_CODE: dict[ErrorKind | EdgeKind, FleetErrorCode] = {
    ErrorKind.EMPTY: FleetErrorCode.VALIDATION_ERROR,
    ErrorKind.VALIDATION: FleetErrorCode.VALIDATION_ERROR,
    ErrorKind.TOKENIZER: FleetErrorCode.VALIDATION_ERROR,
    ErrorKind.BACKEND: FleetErrorCode.INTERNAL_ERROR,
    ErrorKind.OVERLOADED: FleetErrorCode.UNAVAILABLE,
    ErrorKind.UNHEALTHY: FleetErrorCode.UNAVAILABLE,
    EdgeKind.NOT_FOUND: FleetErrorCode.NOT_FOUND,
    EdgeKind.METHOD_NOT_ALLOWED: FleetErrorCode.METHOD_NOT_ALLOWED,
    EdgeKind.PAYLOAD_TOO_LARGE: FleetErrorCode.PAYLOAD_TOO_LARGE,
    EdgeKind.UNAUTHORIZED: FleetErrorCode.UNAUTHORIZED,
    EdgeKind.FORBIDDEN: FleetErrorCode.FORBIDDEN,
}
"""How an engine or edge error reads under /admin/, which speaks in admin codes only."""

ClientError = EngineError | EdgeError | FleetError
"""Anything :func:`render` turns into a response."""


class Shape(Enum):
    """The error body a route family writes."""

    TEI = "tei"
    OPENAI = "openai"
    ADMIN = "admin"


def shape_of(path: str) -> Shape:
    """The body shape of the route at ``path``."""
    if path.startswith("/v1/") or path == "/embeddings":
        return Shape.OPENAI
    if path.startswith("/admin/") or path == "/admin":
        return Shape.ADMIN
    return Shape.TEI


def status_of(exc: ClientError, shape: Shape = Shape.TEI) -> int:
    """The HTTP status of an error (under /admin/, the status of the admin code it is written with)."""
    if isinstance(exc, FleetError):
        return STATUS[exc.code]
    return STATUS[ADMIN_CODE[exc.kind]] if shape is Shape.ADMIN else STATUS[exc.kind]


def grpc_code_of(exc: EngineError | EdgeError) -> str:
    """The gRPC status code (its ``grpc.StatusCode`` name) of an engine or edge error."""
    return GRPC_CODE[exc.kind]


def body_of(exc: ClientError, shape: Shape) -> dict[str, Any]:
    """The JSON body of an error in a route family's shape."""
    if isinstance(exc, FleetError):
        return {"error": exc.message, "code": exc.code.value, "timestamp": timestamp()}
    if shape is Shape.ADMIN:
        return {"error": exc.message, "code": ADMIN_CODE[exc.kind].value, "timestamp": timestamp()}
    if shape is Shape.OPENAI:
        # The engine names the batch `inputs`, TEI's field; OpenAI's request calls it `input`.
        message = exc.message.replace("`inputs`", "`input`")
        return {"message": message, "code": STATUS[exc.kind], "error_type": exc.kind.value}
    return {"error": exc.message, "error_type": exc.kind.value}


def render(exc: ClientError, path: str) -> tuple[int, bytes]:
    """The status and JSON body of an error raised by the route at ``path``."""
    shape = shape_of(path)
    return status_of(exc, shape), orjson.dumps(body_of(exc, shape))


def from_status(status: int, message: str) -> EdgeError | EngineError:
    """An error that only a status describes (starlette's own 404/405/413, an upstream's plain-text 4xx)."""
    edge = {404: EdgeKind.NOT_FOUND, 405: EdgeKind.METHOD_NOT_ALLOWED, 413: EdgeKind.PAYLOAD_TOO_LARGE,
            401: EdgeKind.UNAUTHORIZED, 403: EdgeKind.FORBIDDEN}.get(status)
    if edge is not None:
        return EdgeError(edge, message)
    kind = {400: ErrorKind.VALIDATION, 422: ErrorKind.VALIDATION, 429: ErrorKind.OVERLOADED,
            503: ErrorKind.UNHEALTHY}.get(status, ErrorKind.BACKEND)
    return EngineError(kind, message)


def from_type(error_type: str, message: str, status: int) -> EdgeError | EngineError:
    """An error read from another server's body (``error_type`` as TEI and embedfleet write it)."""
    try:
        return EngineError(ErrorKind(error_type), message)
    except ValueError:
        pass
    try:
        return EdgeError(EdgeKind(error_type), message)
    except ValueError:
        return from_status(status, message)


def not_found(message: str) -> EdgeError:
    """404: no such route or model."""
    return EdgeError(EdgeKind.NOT_FOUND, message)


def payload_too_large(limit: int) -> EdgeError:
    """413: the request body is over the size limit."""
    return EdgeError(EdgeKind.PAYLOAD_TOO_LARGE, f"request body is larger than the limit of {limit} bytes")


def unauthorized(message: str = "missing or invalid API key (Authorization: Bearer KEY)") -> EdgeError:
    """401: no valid key."""
    return EdgeError(EdgeKind.UNAUTHORIZED, message)


def forbidden(message: str) -> EdgeError:
    """403: authenticated, or not, but this route is off."""
    return EdgeError(EdgeKind.FORBIDDEN, message)
