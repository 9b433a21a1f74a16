"""Settings precedence: flags > environment > config file > defaults."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from embedfleet.config import ConfigError, WorkerSettings


def test_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "embedfleet.toml"
    cfg.write_text('[worker]\nport = 9001\nmax-batch-tokens = 4096\nmodel = "from-file"\nauto_truncate = true\n')
    monkeypatch.setenv("EMBEDFLEET_PORT", "9002")
    monkeypatch.setenv("EMBEDFLEET_MODEL", "from-env")
    s = WorkerSettings.load(cfg, table="worker", model="from-flag", port=None)
    assert s.model == "from-flag"  # flag beats env and file
    assert s.port == 9002  # env beats file
    assert s.max_batch_tokens == 4096  # file beats default
    assert s.auto_truncate is True
    assert s.max_client_batch_size == 32  # default


def test_invalid_settings_fail_clearly(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[worker]\nnot_a_setting = 1\n")
    with pytest.raises(ConfigError, match="not_a_setting"):
        WorkerSettings.load(cfg, table="worker")
    with pytest.raises(ConfigError, match="does not exist"):
        WorkerSettings.load(tmp_path / "missing.toml", table="worker")
    with pytest.raises(ValueError, match="device"):
        WorkerSettings.load(None, table="worker", device="tpu")
    with pytest.raises(ValueError, match="onnx"):
        WorkerSettings.load(None, table="worker", backend="torch", quantize="int8")


def test_cli_rejects_bad_flags_before_loading() -> None:
    out = subprocess.run([sys.executable, "-m", "embedfleet.cli", "worker", "--device", "tpu"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "device" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_worker_reports_a_model_that_fails_to_load(tmp_path: Path) -> None:
    from tests.helpers import WorkerProcess

    w = WorkerProcess(["--model", str(tmp_path / "no-such-model")], tmp_path, tmp_path)
    w.start(wait=False)
    try:
        import time

        import httpx

        deadline = time.monotonic() + 60
        body = None
        while time.monotonic() < deadline:
            try:
                r = httpx.get(f"{w.url}/health", timeout=2)
            except httpx.TransportError:
                time.sleep(0.1)
                continue
            if "failed to load" in r.text:
                body = r.json()
                break
            time.sleep(0.1)
        assert body is not None and body["error_type"] == "Unhealthy"
        assert httpx.post(f"{w.url}/embed", json={"inputs": "a"}, timeout=5).status_code == 503
    finally:
        w.stop()
