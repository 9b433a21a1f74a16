"""API keys, TLS and mTLS on the gRPC port, from the same flags as HTTPS (a throwaway trustme CA)."""

from __future__ import annotations

import ssl
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.gateway.support import metric_value
from tests.grpc.conftest import GrpcGateway, wait_grpc
from tests.helpers import TlsFiles, WorkerProcess

pytestmark = pytest.mark.slow

KEY = "grpc-test-key"


def test_keys_and_mtls(embedders: list[WorkerProcess], grpc_stubs: SimpleNamespace, tmp_path: Path) -> None:
    tls = TlsFiles.make(tmp_path)
    ca, client, ca_file = tls.ca, tls.client_cert, tls.ca_file
    root = ca.cert_pem.bytes()
    with_cert = grpc.ssl_channel_credentials(root, client.private_key_pem.bytes(),
                                             b"".join(b.bytes() for b in client.cert_chain_pems))
    without_cert = grpc.ssl_channel_credentials(root)

    g = GrpcGateway(["--upstream", embedders[0].url, "--cache", "memory://", "--api-key", KEY, *tls.server_args],
                    tmp_path)
    g.url = g.url.replace("http://", "https://")
    context = ssl.create_default_context(cafile=str(ca_file))
    client.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "client.pem"))
    context.load_cert_chain(str(tmp_path / "client.pem"))
    g.verify = context  # for the HTTPS health polls
    with g:
        wait_grpc(g.target, credentials=with_cert)
        tei = grpc_stubs.tei
        channel = grpc.secure_channel(g.target, with_cert)
        embed = grpc_stubs.tei_grpc.EmbedStub(channel)
        bearer = [("authorization", f"Bearer {KEY}")]
        assert len(embed.Embed(tei.EmbedRequest(inputs="secure"), metadata=bearer).embeddings) == 32
        for metadata in ([], [("authorization", "Bearer wrong")], [("authorization", KEY)]):
            with pytest.raises(grpc.RpcError) as info:
                embed.Embed(tei.EmbedRequest(inputs="secure"), metadata=metadata)
            err: Any = info.value
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
        # Health is open, as HTTP's /health; reflection needs a key, as every other method.
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        mx = grpc_stubs.mx_grpc.TeiMultiplexerStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            mx.Info(grpc_stubs.mx.InfoRequest())
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        assert mx.Info(grpc_stubs.mx.InfoRequest(), metadata=bearer).max_client_batch_size == 2048
        # No client certificate, or no TLS at all: no call gets through.
        for other in (grpc.secure_channel(g.target, without_cert), grpc.insecure_channel(g.target)):
            with pytest.raises(grpc.RpcError) as info:
                grpc_stubs.tei_grpc.EmbedStub(other).Embed(tei.EmbedRequest(inputs="x"), metadata=bearer, timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
            other.close()
        channel.close()
        text = httpx.get(f"{g.url}/metrics", verify=context, timeout=30).text
        assert metric_value(text, "embedfleet_grpc_requests_total", method="/tei.v1.Embed/Embed",
                            code="UNAUTHENTICATED") == 3
