"""What a supervised worker gets: its settings as flags, and the fleet's environment without EMBEDFLEET_*."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from embedfleet.config import FleetSettings, WorkerSettings, flag_name
from embedfleet.fleet import supervisor as supervisor_module
from embedfleet.fleet.spec import WORKER_OPTIONS, InstanceRequest, InstanceSpec
from embedfleet.fleet.supervisor import (
    Instance,
    InstanceLog,
    Supervisor,
    SupervisorSettings,
    worker_command,
    worker_env,
)


def _parse_worker_flags(args: list[str]) -> WorkerSettings:
    """The settings ``embedfleet worker ARGS`` would run with, parsed by the real command."""
    from typer.main import get_command

    from embedfleet.cli import app

    command = get_command(app).commands["worker"]  # type: ignore[attr-defined]
    params = command.make_context("worker", args).params
    return WorkerSettings.load(params.pop("config"), **params)


def test_worker_env_drops_every_embedfleet_variable() -> None:
    fleet_env = {"EMBEDFLEET_WORKER_PORT": "1", "EMBEDFLEET_CONFIG": "/etc/x.toml", "embedfleet_fleet_model": "m",
                 "EMBEDFLEET_ADMIN_KEY": "k", "PATH": "/usr/bin", "HF_HOME": "/hf", "HF_HUB_OFFLINE": "1",
                 "CUDA_VISIBLE_DEVICES": "2,3", "XDG_CACHE_HOME": "/c"}
    env = worker_env(fleet_env, {"CUDA_VISIBLE_DEVICES": "3"})
    assert env == {"PATH": "/usr/bin", "HF_HOME": "/hf", "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": "/c",
                   "CUDA_VISIBLE_DEVICES": "3", "PYTHONUNBUFFERED": "1"}


class _NoPools:
    def ensure(self, name: str) -> object:
        return None

    async def join(self, name: str, url: str) -> None:
        return None

    async def leave(self, name: str, url: str, drain_timeout: float = 30.0) -> None:
        return None

    async def suspend(self, name: str, url: str, reason: str) -> None:
        return None

    async def forget(self, name: str) -> None:
        return None


def test_spawned_worker_sees_no_embedfleet_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Set for ``serve``, EMBEDFLEET_WORKER_PORT and friends must not reach its workers' environment."""
    monkeypatch.setenv("EMBEDFLEET_WORKER_PORT", "1")
    monkeypatch.setenv("EMBEDFLEET_FLEET_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("EMBEDFLEET_CONFIG", str(tmp_path / "embedfleet.toml"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dump = tmp_path / "env.json"
    script = "import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1], 'w'))"
    seen: list[list[str]] = []

    def command(*args: Any) -> list[str]:
        seen.append(worker_command(*args))
        return [sys.executable, "-c", script, str(dump)]

    monkeypatch.setattr(supervisor_module, "worker_command", command)

    async def spawn() -> None:
        fleet = FleetSettings(state_dir=tmp_path, port_range="20000-29999", data_dir=tmp_path / "data")
        supervisor = Supervisor(SupervisorSettings.of(fleet, gpus=[]), _NoPools())
        instance = Instance(InstanceSpec(name="w", model="default"), InstanceLog(tmp_path / "logs" / "w.log"))
        try:
            await supervisor._spawn(instance)
            assert instance.process is not None
            assert await instance.process.wait() == 0
            # The log pump ends at the child's EOF.
            await asyncio.gather(*(t for t in asyncio.all_tasks() if t is not asyncio.current_task()))
        finally:
            instance.log.close()
            await supervisor.close()

    asyncio.run(spawn())
    env = json.loads(dump.read_text())
    assert not [k for k in env if k.upper().startswith("EMBEDFLEET_")]
    assert env["HF_HUB_OFFLINE"] == "1" and env["CUDA_VISIBLE_DEVICES"] == "" and env["PATH"] == os.environ["PATH"]
    assert seen and "--port" in seen[0] and seen[0][seen[0].index("--port") + 1] != "1"


def test_worker_command_passes_every_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = InstanceRequest.model_validate({
        "name": "e", "model": "BAAI/bge-small-en-v1.5", "served_name": "small", "revision": "abc", "threads": 3,
        "backend": "onnx", "quantize": "int8", "pooling": "cls", "max_batch_tokens": 1024,
        "auto_truncate": False, "max_client_batch_size": 8}).specs(["cpu"])[0]
    cmd = worker_command(spec, "127.0.0.1", 8123, "cuda:0", tmp_path / "data", "debug", "json")
    assert cmd[:4] == [sys.executable, "-m", "embedfleet.cli", "worker"]
    assert cmd[4:6] == ["--config", os.devnull]  # no config file decides either
    # A [worker] table where the fleet runs must not change its workers.
    (tmp_path / "embedfleet.toml").write_text("[worker]\nmax_batch_requests = 7\npayload_limit = 5\n")
    monkeypatch.chdir(tmp_path)
    settings = _parse_worker_flags(cmd[4:])
    assert settings.model_dump() == {
        **WorkerSettings.load(os.devnull).model_dump(),
        "model": "BAAI/bge-small-en-v1.5", "served_model_name": "small", "revision": "abc", "threads": 3,
        "backend": "onnx", "quantize": "int8", "pooling": "cls", "max_batch_tokens": 1024, "auto_truncate": False,
        "max_client_batch_size": 8, "host": "127.0.0.1", "port": 8123, "device": "cuda:0",
        "data_dir": tmp_path / "data", "exit_on_load_failure": True, "log_level": "debug", "log_format": "json"}
    given = {a for a in cmd if a.startswith("--")}
    expected = {flag_name(n) for n, v in settings.model_dump().items() if v is not None and not isinstance(v, bool)}
    assert expected <= given and "--no-auto-truncate" in given and "--exit-on-load-failure" in given


def test_instance_options_are_the_worker_settings() -> None:
    schema = InstanceRequest.model_json_schema()
    for name in WORKER_OPTIONS:
        worker = WorkerSettings.model_fields[name]
        assert schema["properties"][name]["description"] == worker.description
        assert InstanceRequest.model_fields[name].default is None  # None: the worker's default
    assert "threads" in WORKER_OPTIONS and "host" not in WORKER_OPTIONS
    threads = schema["properties"]["threads"]["anyOf"][0]
    assert (threads["minimum"], threads["maximum"]) == (1, 1024)
    assert schema["additionalProperties"] is False
    for bad in ({"threads": 0}, {"backend": "tpu"}, {"auto_truncate": "maybe"}, {"bogus": 1}):
        with pytest.raises(ValueError):
            InstanceRequest.model_validate({"name": "x", "model": "default", **bad})
    assert InstanceRequest.model_validate({"name": "x", "model": "default", "dtype": None}).model_dump(
        exclude_none=True) == {"name": "x", "model": "default", "replicas": 1}
