"""The cache stays model-aware over time: a replica restarted at the same address with another model is
noticed (its /info is read again whenever it comes back), a pool whose every replica now serves the new
model adopts it (the old model's entries stop hitting), and a replica that disagrees with the rest of its
pool is kept out. Precisions are models of their own."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from embedfleet.gateway.upstream import Pool, UpstreamInfo
from tests.helpers import GatewayProcess, WorkerProcess

pytestmark = pytest.mark.slow


def _wait(predicate: object, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.1)


def test_a_replica_restarted_with_another_model_never_serves_the_old_entries(
        data_dir: Path, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    first = WorkerProcess(["--model", "default"], data_dir, tmp_path / "first").start()
    gateway = GatewayProcess(["--upstream", first.url, "--cache", "memory://"], tmp_path, tmp_path / "gw").start()
    second: WorkerProcess | None = None
    try:
        text = {"inputs": "a text cached under the first model"}
        assert gateway.post("/embed", text).headers["x-cache"] == "miss"
        cached = gateway.post("/embed", text)
        assert cached.headers["x-cache"] == "hit" and len(cached.json()[0]) == 384
        first.stop()
        second = WorkerProcess(["--model", str(tiny_models["cls"])], data_dir, tmp_path / "second",
                               port=first.port).start()
        _wait(lambda: gateway.get("/info").status_code == 200
              and gateway.get("/info").json()["model_id"] != "sentence-transformers/all-MiniLM-L6-v2",
              "the gateway adopts the new model")
        fresh = gateway.post("/embed", text)
        assert fresh.status_code == 200 and fresh.headers["x-cache"] == "miss", fresh.headers
        assert len(fresh.json()[0]) == 32  # the new model's vector, not the cached one
        direct = second.post("/embed", text).json()
        assert np.allclose(fresh.json(), direct, atol=1e-6)
        assert gateway.post("/embed", text).headers["x-cache"] == "hit"  # cached under the new model now
    finally:
        gateway.stop()
        for proc in (first, second):
            if proc is not None:
                proc.stop()


def test_a_replica_that_disagrees_with_its_pool_is_kept_out(data_dir: Path, tiny_models: dict[str, Path],
                                                           tmp_path: Path) -> None:
    good = WorkerProcess(["--model", "default"], data_dir, tmp_path / "good").start()
    odd = WorkerProcess(["--model", "default"], data_dir, tmp_path / "odd").start()
    gateway = GatewayProcess(["--upstream", good.url, "--upstream", odd.url, "--cache", "memory://"], tmp_path,
                             tmp_path / "gw").start()
    swapped: WorkerProcess | None = None
    try:
        odd.stop()
        swapped = WorkerProcess(["--model", str(tiny_models["cls"])], data_dir, tmp_path / "swapped",
                                port=odd.port).start()

        def kept_out() -> bool:
            ups = {u["url"]: u for u in gateway.get("/info").json()["upstreams"]}
            return ups[odd.url]["kept_out"] is not None and ups[good.url]["healthy"]

        _wait(kept_out, "the swapped replica is kept out")
        assert gateway.metric("embedfleet_upstream_mismatches_total") >= 1
        assert gateway.get("/info").json()["model_id"] == "sentence-transformers/all-MiniLM-L6-v2"
        for i in range(20):  # every answer is the pool's model's
            r = gateway.post("/embed", {"inputs": [f"kept out {i} {j}" for j in range(8)]})
            assert r.status_code == 200 and {len(v) for v in r.json()} == {384}
        assert swapped.metric("te_request_count_total") == 0
    finally:
        gateway.stop()
        for proc in (good, odd, swapped):
            if proc is not None:
                proc.stop()


def _info(model_dtype: str) -> UpstreamInfo:
    return UpstreamInfo.parse({"model_id": "m", "model_sha": "s", "task": "embedding", "pooling": "mean",
                               "model_dtype": model_dtype})


def test_one_pool_holds_one_precision() -> None:
    pool = Pool("m", ["http://127.0.0.1:1", "http://127.0.0.1:2"], health_interval=None)
    full, quantized = pool.upstreams
    full.alive, full.info = True, _info("float32")
    pool.settle()
    quantized.alive, quantized.info = True, _info("int8")
    pool.settle()
    assert full.healthy and not quantized.healthy and quantized.mismatch and "int8" in quantized.mismatch
    assert pool.mismatches == 1
    full.alive = False  # the float32 replica goes: the int8 one is all that is left, and the pool adopts it
    pool.settle()
    assert quantized.healthy and pool.fingerprint is not None and pool.fingerprint.precision == "int8"
