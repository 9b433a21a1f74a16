"""The engine's error type: what went wrong, in terms that know nothing of HTTP or gRPC.

Each edge maps an :class:`ErrorKind` to its own status once (``embedfleet.api.errors`` for HTTP);
the kinds are text-embeddings-inference's, so TEI clients branching on ``error_type`` keep working.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum


class ErrorKind(StrEnum):
    """Why a request failed, as text-embeddings-inference names it."""

    EMPTY = "Empty"
    """No input, or an empty one."""
    VALIDATION = "Validation"
    """An input or parameter the model cannot take (too long, too many, bad dimensions or prompt)."""
    TOKENIZER = "Tokenizer"
    """The tokenizer rejected the input."""
    BACKEND = "Backend"
    """Inference failed, or the model does not do what was asked of it."""
    OVERLOADED = "Overloaded"
    """Too many requests in flight."""
    UNHEALTHY = "Unhealthy"
    """The model is loading, failed to load, or no replica can run it."""


class EngineError(Exception):
    """A request the engine (or the gateway's core) could not serve.

    ``input`` is the position of the input at fault in the batch the engine was given, where one is: an
    edge that cut a client's batch into several (the gateway does) maps it back to the client's
    position with :meth:`at`.
    """

    def __init__(self, kind: ErrorKind, detail: str, input: int | None = None) -> None:
        self.kind = kind
        self.detail = detail
        self.input = input
        super().__init__(self.message)

    @property
    def message(self) -> str:
        """The text for people: the detail, and the input at fault where known."""
        return self.detail if self.input is None else f"{self.detail} (input {self.input})"

    def at(self, input: int | None) -> EngineError:
        """The same error about another position (None: no position)."""
        return EngineError(self.kind, self.detail, input)

    def remapped(self, positions: Sequence[int]) -> EngineError:
        """The error as the caller sees it: ``positions[i]`` is the caller's position of the input the callee
        called ``i``. An error about no input stays as it is; one about an input the callee never had (an
        insane upstream) loses its position."""
        if self.input is None:
            return self
        return self.at(positions[self.input] if 0 <= self.input < len(positions) else None)

    def __repr__(self) -> str:
        return f"EngineError({self.kind.value}, {self.message!r})"


def empty(detail: str = "`inputs` cannot be empty", input: int | None = None) -> EngineError:
    """Empty: no input, or an empty one."""
    return EngineError(ErrorKind.EMPTY, detail, input)


def validation(detail: str, input: int | None = None) -> EngineError:
    """Validation: an input or parameter the model cannot take."""
    return EngineError(ErrorKind.VALIDATION, detail, input)


def tokenizer(detail: str, input: int | None = None) -> EngineError:
    """Tokenizer: the tokenizer rejected an input."""
    return EngineError(ErrorKind.TOKENIZER, detail, input)


def backend(detail: str) -> EngineError:
    """Backend: inference failed, or the model cannot serve this task."""
    return EngineError(ErrorKind.BACKEND, detail)


def overloaded(detail: str = "Model is overloaded") -> EngineError:
    """Overloaded: too many requests in flight."""
    return EngineError(ErrorKind.OVERLOADED, detail)


def unhealthy(detail: str = "Model is not healthy") -> EngineError:
    """Unhealthy: the model cannot run now."""
    return EngineError(ErrorKind.UNHEALTHY, detail)


def check_batch_size(n: int, limit: int, field: str = "inputs") -> None:
    """Empty and over-large batches are refused before any work (the worker's and the gateway's rule)."""
    if n == 0:
        raise empty(f"`{field}` cannot be empty")
    if n > limit:
        raise validation(f"batch size {n} > maximum allowed batch size {limit}")


def check_token_ids(n: int, limit: int) -> None:
    """A request's token-id inputs carry at most ``limit`` ids in all (the gateway's rule: its batch size
    times the model's maximum input length), so a body of ids cannot make it forward more than it serves."""
    if n > limit:
        raise validation(f"{n} token ids in the request > maximum allowed {limit} "
                         "(max_client_batch_size x the model's max_input_length)")
