"""HTTPS and mutual TLS on the gateway, with a throwaway test CA."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import pytest

from tests.helpers import GatewayProcess, TlsFiles, WorkerProcess

pytestmark = pytest.mark.slow


def test_https_and_mtls(start_worker: object, tmp_path: Path) -> None:
    worker: WorkerProcess = start_worker()  # type: ignore[operator]
    tls = TlsFiles.make(tmp_path)
    ca_file, client_pem = tls.ca_file, tls.client
    g = GatewayProcess(["--upstream", worker.url, "--cache", "memory://", *tls.server_args], tmp_path, tmp_path)
    g.url = g.url.replace("http://", "https://")
    with_client_cert = ssl.create_default_context(cafile=str(ca_file))
    with_client_cert.load_cert_chain(str(client_pem))
    g.verify = with_client_cert
    g.start()
    try:
        r = httpx.post(f"{g.url}/embed", json={"inputs": "over TLS"}, verify=with_client_cert, timeout=30)
        assert r.status_code == 200 and len(r.json()[0]) == 384
        without = ssl.create_default_context(cafile=str(ca_file))
        with pytest.raises(httpx.TransportError):  # no client certificate: the handshake fails
            httpx.post(f"{g.url}/embed", json={"inputs": "x"}, verify=without, timeout=10)
        with pytest.raises(httpx.TransportError):  # plain HTTP is not served
            httpx.post(f"{g.url.replace('https://', 'http://')}/embed", json={"inputs": "x"}, timeout=10)
    finally:
        g.stop()


def test_tls_settings_are_checked(tmp_path: Path) -> None:
    from embedfleet.config import GatewaySettings

    with pytest.raises(ValueError, match="go together"):
        GatewaySettings.load(None, table="gateway", tls_cert=tmp_path / "c.pem")
    with pytest.raises(ValueError, match="does not exist"):
        GatewaySettings.load(None, table="gateway", tls_cert=tmp_path / "c.pem", tls_key=tmp_path / "k.pem")
