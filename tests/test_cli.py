"""The command line: options derived from the settings classes, readable help at 80 columns."""

from __future__ import annotations

import os
import re
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from embedfleet import cli
from embedfleet.cli import SERVE_GATEWAY_OPTIONS, app, settings_command
from embedfleet.config import BenchSettings, FleetSettings, GatewaySettings, Settings, WorkerSettings, flag_name

runner = CliRunner()


def _help(*command: str) -> str:
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    return result.output


def _flags(cls: type[Settings], names: list[str] | tuple[str, ...] | None = None) -> list[str]:
    flags = []
    for name in names or [n for n in cls.model_fields if n not in cls.file_only]:
        flag = flag_name(cls.flags.get(name, name))
        flags += [flag, f"--no-{flag[2:]}"] if cls.model_fields[name].annotation is bool else [flag]
    return flags


@pytest.mark.parametrize(("command", "parts"), [
    ("worker", [(WorkerSettings, None)]),
    ("gateway", [(GatewaySettings, None)]),
    ("serve", [(FleetSettings, None), (GatewaySettings, SERVE_GATEWAY_OPTIONS)]),
    ("bench", [(BenchSettings, None)]),
])
def test_help_at_80_columns_shows_every_option_whole(command: str, parts: list[Any]) -> None:
    text = _help(command)
    assert max(len(line) for line in text.splitlines()) <= 80
    words = set(text.replace("/", " ").split())
    for cls, names in parts:
        for flag in _flags(cls, names):
            assert flag in words, f"{flag} is not in `embedfleet {command} --help`"
        for name in names or [n for n in cls.model_fields if n not in cls.file_only]:
            assert re.search(rf"{cls.env_name(name)}(?![A-Z_])", text), f"{name}'s variable is not shown"
    assert "--config" in words and "EMBEDFLEET_CONFIG" in text


def test_worker_help_shows_brackets_defaults_and_env_vars() -> None:
    text = " ".join(_help("worker").split())  # unwrapped
    assert "its [worker] table" in text
    assert "[env var: EMBEDFLEET_WORKER_PORT; default: 8081]" in text
    assert "default: --auto-truncate]" in text and "default: --no-exit-on-load-failure]" in text
    assert WorkerSettings.model_fields["max_batch_tokens"].description in text
    assert "<auto|onnx|openvino|torch>" in text
    serve = " ".join(_help("serve").split())
    assert "[[fleet.instances]]" in serve and "--instances" not in serve and "EMBEDFLEET_GATEWAY_PORT" in serve


def test_settings_command_precedence_flags_environment_file(tmp_path: Any) -> None:
    seen: list[tuple[FleetSettings, GatewaySettings]] = []
    test_app = typer.Typer()

    @test_app.command()
    @settings_command(FleetSettings, (GatewaySettings, SERVE_GATEWAY_OPTIONS))
    def serve(fleet: FleetSettings, gateway: GatewaySettings) -> None:
        seen.append((fleet, gateway))

    config = tmp_path / "embedfleet.toml"
    config.write_text('[fleet]\nhealth_interval = 4.0\nmax_restarts = 9\n[gateway]\nhost = "10.0.0.1"\nport = 1\n')
    result = runner.invoke(test_app, ["--port", "9000", "--devices", "0,1", "--devices", "2", "--api-key", "a",
                                      "--api-key", "b", "--health-interval", "3", "--config", str(config)],
                           env={"EMBEDFLEET_GATEWAY_HOST": "0.0.0.0", "EMBEDFLEET_FLEET_MAX_RESTARTS": "2"})
    assert result.exit_code == 0, result.output
    fleet, gateway = seen[0]
    assert (gateway.port, gateway.host, gateway.api_key) == (9000, "0.0.0.0", ["a", "b"])
    assert (fleet.devices, fleet.health_interval, fleet.max_restarts) == (["0", "1", "2"], 3.0, 2)
    bad = runner.invoke(test_app, ["--port", "70000", "--config", os.devnull])
    assert bad.exit_code == 2 and "65535" in bad.output and len(seen) == 1


def test_instances_add_sends_the_options_given(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []

    def admin(url: str, key: str | None, method: str, route: str, timeout: float | None = None,
              **kwargs: Any) -> Any:
        calls.append({"url": url, "key": key, "route": route, **kwargs})
        return {"instances": []}

    monkeypatch.setattr(cli, "_admin", admin)
    result = runner.invoke(app, ["instances", "add", "emb", "--model", "default", "--threads", "2", "--replicas", "2",
                                 "--no-auto-truncate", "--backend", "onnx", "--no-wait"],
                           env={"EMBEDFLEET_URL": "http://h:1", "EMBEDFLEET_ADMIN_KEY": "k"})
    assert result.exit_code == 0, result.output
    assert calls == [{"url": "http://h:1", "key": "k", "route": "/instances?wait=false",
                      "json": {"name": "emb", "model": "default", "threads": 2, "replicas": 2,
                               "auto_truncate": False, "backend": "onnx"}}]
    external = runner.invoke(app, ["instances", "add", "tei", "--external-url", "http://tei:80"])
    assert external.exit_code == 0, external.output
    assert calls[1]["json"] == {"name": "tei", "url": "http://tei:80"} and calls[1]["url"] == cli.DEFAULT_URL
