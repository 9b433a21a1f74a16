"""``dns+http://NAME:PORT`` upstreams: one replica per address NAME resolves to, followed as it changes.

Real resolution: the test adds lines for a name of its own to /etc/hosts (127.0.0.2-4 are loopback) and
removes them at the end, even when it fails; it is skipped where /etc/hosts cannot be written (not root).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from embedfleet.gateway.server import parse_upstreams
from tests.gateway.support import wait_for
from tests.helpers import GatewayProcess, WorkerProcess, free_port

HOSTS = Path("/etc/hosts")


class HostsFile:
    """Lines of /etc/hosts for one name, added and removed in place (the file may be a bind mount)."""

    def __init__(self) -> None:
        self.name = f"embedfleet-dns-test-{uuid.uuid4().hex[:8]}"

    def set(self, addresses: list[str]) -> None:
        """Make ``name`` resolve to exactly ``addresses``."""
        kept = [line for line in HOSTS.read_text().splitlines() if not line.rstrip().endswith(f" {self.name}")]
        HOSTS.write_text("\n".join([*kept, *(f"{a} {self.name}" for a in addresses)]) + "\n")


@pytest.fixture
def hosts() -> Iterator[HostsFile]:
    if not os.access(HOSTS, os.W_OK):
        pytest.skip("needs a writable /etc/hosts (run as root) to make a name resolve to several addresses")
    entries = HostsFile()
    try:
        yield entries
    finally:
        entries.set([])


class AddressedWorker(WorkerProcess):
    """A worker listening on another loopback address."""

    def __init__(self, address: str, port: int, model: Path, data_dir: Path, log_dir: Path) -> None:
        super().__init__(["--host", address, "--model", str(model), "--threads", "1"], data_dir,
                         log_dir / address, port=port)
        self.url = f"http://{address}:{port}"


def test_dns_upstream_urls_are_parsed_and_checked() -> None:
    assert parse_upstreams(["m=dns+http://workers:8081", "http://a:1"]) == {
        "m": ["dns+http://workers:8081"], "default": ["http://a:1"]}
    for bad in ("dns+https://workers:8081", "dns+http://workers:8081/path", "dns+http://u:p@workers:1",
                "dns+http://:8081", "dns+http://workers:99999"):
        with pytest.raises(ValueError, match="dns"):
            parse_upstreams([bad])


@pytest.mark.slow
def test_pool_follows_the_addresses_of_a_name(hosts: HostsFile, tiny_models: dict[str, Path], data_dir: Path,
                                              tmp_path: Path) -> None:
    port = free_port()
    workers = {a: AddressedWorker(a, port, tiny_models["cls"], data_dir, tmp_path)
               for a in ("127.0.0.2", "127.0.0.3")}
    gateway = GatewayProcess(["--upstream", f"dns+http://{hosts.name}:{port}", "--upstream-dns-interval", "0.2",
                              "--cache", "memory://"], data_dir, tmp_path / "gateway")
    try:
        for w in workers.values():
            w.start(wait=False)
        for w in workers.values():
            w.wait_healthy()
        hosts.set(["127.0.0.2"])
        gateway.start()

        def members() -> dict[str, bool]:
            info = gateway.get("/info").json()
            return {u["url"]: u["healthy"] for u in info["upstreams"]}

        def expect(addresses: list[str]) -> None:
            wanted = {f"http://{a}:{port}": True for a in addresses}
            wait_for(lambda: members() == wanted, f"pool members {sorted(wanted)}", timeout=30)

        expect(["127.0.0.2"])
        r = gateway.post("/embed", {"inputs": ["dns text"]})
        assert r.status_code == 200, r.text
        hosts.set(["127.0.0.2", "127.0.0.3"])  # a replica appears
        expect(["127.0.0.2", "127.0.0.3"])
        hosts.set(["127.0.0.3"])  # one disappears: drained and dropped
        expect(["127.0.0.3"])
        before = workers["127.0.0.2"].metric("te_request_count_total")
        for i in range(4):
            r = gateway.post("/embed", {"inputs": [f"dns text after {i}"]})
            assert r.status_code == 200, r.text
        assert workers["127.0.0.2"].metric("te_request_count_total") == before  # no call to a dropped replica
        assert workers["127.0.0.3"].metric("te_request_count_total") >= 4
        hosts.set([])  # a failed look-up keeps the replicas it had
        wait_for(lambda: "cannot resolve" in gateway.log(), "a failed look-up logged")
        r = gateway.post("/embed", {"inputs": ["dns text, name gone"]})
        assert r.status_code == 200, r.text
        assert members() == {f"http://127.0.0.3:{port}": True}
    finally:
        gateway.stop()
        for w in workers.values():
            w.stop()
