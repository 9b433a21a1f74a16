"""The one map from error kinds to gRPC status codes."""

from __future__ import annotations

import grpc

from embedfleet.api.errors import GRPC_CODE, EdgeError, EdgeKind, grpc_code_of
from embedfleet.engine import errors
from embedfleet.engine.errors import ErrorKind


def test_every_kind_has_a_grpc_code_as_tei_maps_them() -> None:
    assert set(GRPC_CODE) == set(ErrorKind) | set(EdgeKind)
    assert all(code in grpc.StatusCode.__members__ for code in GRPC_CODE.values())
    assert grpc_code_of(errors.empty()) == grpc_code_of(errors.validation("x")) == "INVALID_ARGUMENT"
    assert grpc_code_of(errors.tokenizer("x")) == grpc_code_of(errors.backend("x")) == "FAILED_PRECONDITION"
    assert grpc_code_of(errors.overloaded()) == "RESOURCE_EXHAUSTED"
    assert grpc_code_of(errors.unhealthy()) == "UNAVAILABLE"
    assert grpc_code_of(EdgeError(EdgeKind.UNAUTHORIZED, "x")) == "UNAUTHENTICATED"
    assert grpc_code_of(EdgeError(EdgeKind.NOT_FOUND, "x")) == "NOT_FOUND"
