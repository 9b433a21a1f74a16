"""Settings precedence: flags > environment > config file > defaults."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from embedfleet.config import (
    ConfigError,
    FleetSettings,
    GatewaySettings,
    WorkerSettings,
    normalize_device,
    without_none,
)


def test_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "embedfleet.toml"
    cfg.write_text('[worker]\nport = 9001\nmax-batch-tokens = 4096\nmodel = "from-file"\nauto_truncate = false\n')
    monkeypatch.setenv("EMBEDFLEET_WORKER_PORT", "9002")
    monkeypatch.setenv("EMBEDFLEET_WORKER_MODEL", "from-env")
    s = WorkerSettings.load(cfg, model="from-flag", port=None)
    assert s.model == "from-flag"  # flag beats env and file
    assert s.port == 9002  # env beats file
    assert s.max_batch_tokens == 4096  # file beats default
    assert s.auto_truncate is False
    assert s.max_client_batch_size == 32  # default


def test_each_command_reads_its_own_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDFLEET_GATEWAY_HEALTH_INTERVAL", "7")
    monkeypatch.setenv("EMBEDFLEET_FLEET_HEALTH_INTERVAL", "9")
    monkeypatch.setenv("EMBEDFLEET_PORT", "9999")  # the old shared prefix: no command's
    monkeypatch.setenv("EMBEDFLEET_ADMIN_KEY", "client-key")  # the CLI clients' variable, not the gateway's
    gateway, fleet = GatewaySettings.load(os.devnull), FleetSettings.load(os.devnull)
    assert (gateway.health_interval, fleet.health_interval) == (7.0, 9.0)
    assert gateway.port == 8080 and gateway.admin_key is None
    assert WorkerSettings.load(os.devnull).port == 8081
    assert WorkerSettings.env_name("data_dir") == "EMBEDFLEET_WORKER_DATA_DIR"


def test_config_file_from_the_environment_and_devnull_is_empty(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "other.toml"
    cfg.write_text("[gateway]\nport = 9100\n[fleet]\nport_range = \"9000-9010\"\n")
    monkeypatch.setenv("EMBEDFLEET_CONFIG", str(cfg))
    assert GatewaySettings.load().port == 9100
    assert FleetSettings.load().ports == (9000, 9010)
    assert GatewaySettings.load(os.devnull).port == 8080  # --config beats EMBEDFLEET_CONFIG


def test_auto_truncate_is_on_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert WorkerSettings.load(os.devnull).auto_truncate is True
    monkeypatch.setenv("EMBEDFLEET_WORKER_AUTO_TRUNCATE", "false")
    assert WorkerSettings.load(os.devnull).auto_truncate is False


def test_fleet_settings_derived_from_the_worker_keep_its_types_and_bounds() -> None:
    for name in ("threads", "backend", "data_dir"):
        fleet, worker = FleetSettings.model_fields[name], WorkerSettings.model_fields[name]
        assert without_none(fleet.annotation) == without_none(worker.annotation), name
        assert fleet.metadata == worker.metadata, name
    assert FleetSettings().data_dir == WorkerSettings().data_dir
    with pytest.raises(ValueError, match="threads"):
        FleetSettings(threads=0)
    with pytest.raises(ValueError, match="backend"):
        FleetSettings(backend="tpu")  # type: ignore[arg-type]


def test_fleet_devices_repeated_or_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    assert FleetSettings(devices=["0,1", "2"]).devices == ["0", "1", "2"]
    monkeypatch.setenv("EMBEDFLEET_FLEET_DEVICES", "0, 1")
    assert FleetSettings.load(os.devnull).devices == ["0", "1"]


@pytest.mark.parametrize(("value", "options", "expected"), [
    ("cpu", {}, "cpu"), (" CUDA:1 ", {}, "cuda:1"), ("cuda", {}, "cuda"), ("auto", {"auto": True}, "auto"),
    ("3", {"index": True}, "cuda:3"), ("cuda:03", {}, "cuda:3"),
])
def test_normalize_device(value: str, options: dict[str, bool], expected: str) -> None:
    assert normalize_device(value, **options) == expected


@pytest.mark.parametrize(("value", "options"), [
    ("auto", {}), ("3", {}), ("tpu", {"auto": True, "index": True}), ("cuda:x", {}), ("cuda:-1", {"index": True}),
    ("", {"index": True}), ("cuda:\u00b2", {}),
])
def test_normalize_device_refuses(value: str, options: dict[str, bool]) -> None:
    with pytest.raises(ValueError, match="is not"):
        normalize_device(value, **options)


def test_invalid_settings_fail_clearly(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[worker]\nnot_a_setting = 1\n")
    with pytest.raises(ConfigError, match="not_a_setting"):
        WorkerSettings.load(cfg)
    with pytest.raises(ConfigError, match="does not exist"):
        WorkerSettings.load(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="cannot read"):
        WorkerSettings.load(tmp_path)  # a folder
    with pytest.raises(ValueError, match="device"):
        WorkerSettings.load(os.devnull, device="tpu")
    with pytest.raises(ValueError, match="onnx"):
        WorkerSettings.load(os.devnull, backend="torch", quantize="int8")


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


def test_the_gateway_body_limit_fits_a_full_batch_and_no_more_than_a_few_of_them() -> None:
    settings = GatewaySettings.load(os.devnull)
    longest_id = len("30521, ")  # a BERT vocabulary's largest id, with its separator
    full_batch = settings.max_client_batch_size * 512 * longest_id
    assert full_batch <= settings.payload_limit <= 2 * full_batch


@pytest.mark.parametrize(("cpu_max", "expected"), [("max 100000\n", 4), ("200000 100000\n", 2), ("150000 100000\n", 2),
                                                   ("50000 100000\n", 1), (None, 4), ("garbage\n", 4)])
def test_usable_cpus_follows_affinity_and_the_cgroup_quota(monkeypatch: pytest.MonkeyPatch, cpu_max: str | None,
                                                           expected: int) -> None:
    import os

    from embedfleet import config

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    real_read = Path.read_text

    def read_text(self: Path, *args: object, **kwargs: object) -> str:
        if str(self) == "/sys/fs/cgroup/cpu.max":
            if cpu_max is None:
                raise FileNotFoundError(self)
            return cpu_max
        return real_read(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "read_text", read_text)
    assert config.usable_cpus() == expected
