"""The load generator's URL handling and request building (no server; the answers' parsing is exercised
against real servers in test_bench.py)."""

from __future__ import annotations

import pytest

from embedfleet.bench.loadgen import Endpoint, _dechunk, build_requests


def test_endpoints_and_requests() -> None:
    assert Endpoint.parse("https://gw.example/models/minilm/") == Endpoint("https", "gw.example", 443,
                                                                           "/models/minilm")
    assert str(Endpoint.parse("http://127.0.0.1:8080")) == "http://127.0.0.1:8080"
    for bad in ("127.0.0.1:8080", "ftp://h", "http://h/?q=1", "http://"):
        with pytest.raises(ValueError):
            Endpoint.parse(bad)
    grpcs = Endpoint.parse("grpcs://gw.example:50051", ("grpc", "grpcs"))
    assert (grpcs.authority, grpcs.secure, str(grpcs)) == ("gw.example:50051", True, "grpcs://gw.example:50051")
    for bad in ("grpc://h", "grpc://h:1/path", "http://h:1"):  # no port, a path, a scheme not allowed
        with pytest.raises(ValueError):
            Endpoint.parse(bad, ("grpc", "grpcs"))
    with pytest.raises(ValueError):
        Endpoint.parse("grpc://h:1")  # only http(s) unless asked
    (raw,) = build_requests("http://h:81/v1", "/embeddings", [b'{"input":"x"}'], {"authorization": "Bearer k"})
    assert raw == (b"POST /v1/embeddings HTTP/1.1\r\nhost: h:81\r\nauthorization: Bearer k\r\n"
                   b"content-type: application/json\r\ncontent-length: 13\r\n\r\n{\"input\":\"x\"}")


def test_chunked_bodies_only_when_whole() -> None:
    whole = bytearray(b"3\r\n[[0\r\n4;ext=1\r\n.0]]\r\n0\r\ntrailer: x\r\n\r\nNEXT")
    assert _dechunk(whole) == (b"[[0.0]]", len(whole) - 4)
    for cut in range(len(whole) - 4):
        assert _dechunk(whole[:cut]) is None
