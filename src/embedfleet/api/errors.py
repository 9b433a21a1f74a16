"""The one error type of embedfleet, with a stable machine code mapped to an HTTP status.

Every failure a client can see is an :class:`EmbedfleetError`. Its ``error_type`` is one of
text-embeddings-inference's codes, so TEI clients keep working, and it renders in TEI's body
shape (``{"error", "error_type"}``) or, on the OpenAI routes, OpenAI's
(``{"message", "code", "error_type"}``).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import orjson


class ErrorType(StrEnum):
    """Machine-readable error codes, as text-embeddings-inference names them."""

    EMPTY = "Empty"
    VALIDATION = "Validation"
    TOKENIZER = "Tokenizer"
    BACKEND = "Backend"
    OVERLOADED = "Overloaded"
    UNHEALTHY = "Unhealthy"
    UNAUTHORIZED = "Unauthorized"  # embedfleet's own: TEI answers 401 with an empty body


_STATUS: dict[ErrorType, int] = {
    ErrorType.EMPTY: 400,
    ErrorType.VALIDATION: 422,
    ErrorType.TOKENIZER: 422,
    ErrorType.BACKEND: 424,
    ErrorType.OVERLOADED: 429,
    ErrorType.UNHEALTHY: 503,
    ErrorType.UNAUTHORIZED: 401,
}


class EmbedfleetError(Exception):
    """An error to report to the client: a message, a code and the HTTP status it maps to."""

    def __init__(self, error_type: ErrorType, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.status = status if status is not None else _STATUS[error_type]

    def tei_body(self) -> dict[str, Any]:
        """The body text-embeddings-inference writes for this error."""
        return {"error": self.message, "error_type": self.error_type.value}

    def openai_body(self) -> dict[str, Any]:
        """The body of the OpenAI-compatible routes for this error."""
        return {"message": self.message, "code": self.status, "error_type": self.error_type.value}

    def render(self, openai: bool = False) -> bytes:
        """The JSON body, in the shape of the route family that failed."""
        return orjson.dumps(self.openai_body() if openai else self.tei_body())

    def __repr__(self) -> str:
        return f"EmbedfleetError({self.error_type.value}, {self.status}, {self.message!r})"


def empty(message: str = "`inputs` cannot be empty") -> EmbedfleetError:
    """400 Empty."""
    return EmbedfleetError(ErrorType.EMPTY, message)


def validation(message: str) -> EmbedfleetError:
    """422 Validation."""
    return EmbedfleetError(ErrorType.VALIDATION, message)


def tokenizer(message: str) -> EmbedfleetError:
    """422 Tokenizer."""
    return EmbedfleetError(ErrorType.TOKENIZER, message)


def backend(message: str) -> EmbedfleetError:
    """424 Backend: inference failed, or the model cannot serve this task."""
    return EmbedfleetError(ErrorType.BACKEND, message)


def overloaded(message: str = "Model is overloaded") -> EmbedfleetError:
    """429 Overloaded."""
    return EmbedfleetError(ErrorType.OVERLOADED, message)


def unhealthy(message: str = "Model is not healthy") -> EmbedfleetError:
    """503 Unhealthy."""
    return EmbedfleetError(ErrorType.UNHEALTHY, message)


def payload_too_large(limit: int) -> EmbedfleetError:
    """413: the request body is over the size limit."""
    return EmbedfleetError(
        ErrorType.VALIDATION, f"request body is larger than the limit of {limit} bytes", status=413
    )


def unauthorized(message: str = "missing or invalid API key (Authorization: Bearer KEY)") -> EmbedfleetError:
    """401: no valid API key."""
    return EmbedfleetError(ErrorType.UNAUTHORIZED, message)


def forbidden(message: str) -> EmbedfleetError:
    """403: authenticated, but not allowed (admin routes)."""
    return EmbedfleetError(ErrorType.UNAUTHORIZED, message, status=403)
