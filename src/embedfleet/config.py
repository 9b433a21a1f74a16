"""Settings, in one place.

Precedence: command-line flags > environment (``EMBEDFLEET_*``) > config file > defaults. The
config file is TOML (``--config`` or ``EMBEDFLEET_CONFIG``, else ``./embedfleet.toml`` if present),
with one table per command: ``[worker]``, and later ``[gateway]`` and ``[fleet]``.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, InitSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

DEFAULT_CONFIG_FILE = "embedfleet.toml"


class ConfigError(Exception):
    """The configuration file or a setting is invalid."""


def default_data_dir() -> Path:
    """Where derived files (exported ONNX graphs, later the cache) live by default."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "embedfleet"


def default_cache_url() -> str:
    """The embedded LMDB store under the user's data dir (it is data, not a throwaway cache)."""
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return f"lmdb://{base / 'embedfleet' / 'cache'}"


def load_config_table(path: str | Path | None, table: str) -> dict[str, Any]:
    """One table of the TOML config file; {} when there is no file."""
    explicit = path or os.environ.get("EMBEDFLEET_CONFIG")
    file = Path(explicit) if explicit else Path(DEFAULT_CONFIG_FILE)
    if not file.is_file():
        if explicit:
            raise ConfigError(f"config file {file} does not exist")
        return {}
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {file}: {exc}") from exc
    section = data.get(table, {})
    if not isinstance(section, dict):
        raise ConfigError(f"[{table}] in {file} must be a table")
    return {k.replace("-", "_"): v for k, v in section.items()}


class _Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EMBEDFLEET_", extra="forbid", validate_default=True)
    file_values: ClassVar[dict[str, Any]] = {}

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        file_source = InitSettingsSource(settings_cls, init_kwargs=dict(cls.file_values))
        return init_settings, env_settings, file_source

    @classmethod
    def load(cls, config_file: str | Path | None = None, table: str = "", **flags: Any) -> Any:
        """Build settings from flags (None means "not given"), the environment and the config file."""
        values = load_config_table(config_file, table) if table else {}
        known = set(cls.model_fields)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown setting(s) in [{table}]: {', '.join(unknown)}")
        sub = type(cls.__name__, (cls,), {"file_values": values})
        return sub(**{k: v for k, v in flags.items() if v is not None})


class WorkerSettings(_Settings):
    """Settings of one inference replica (``embedfleet worker``)."""

    model: str = Field("default", description="local folder, Hugging Face id, or `default`")
    revision: str | None = Field(None, description="Hugging Face revision (branch, tag or commit)")
    served_model_name: str | None = Field(None, description="name reported in /info and /v1/embeddings")
    pooling: Literal["mean", "cls", "last_token", "splade"] | None = None
    host: str = "127.0.0.1"
    port: int = Field(8081, ge=0, le=65535)
    device: str = "auto"
    backend: Literal["auto", "onnx", "torch"] = "auto"
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    threads: int | None = Field(None, ge=1, description="intra-op threads of the backend (default: all cores)")
    quantize: Literal["int8"] | None = None
    max_batch_tokens: int | None = Field(
        None, ge=1, description="padded tokens per batch (default: 512 for onnx on CPU, where bigger batches run "
                                "slower; 16384 otherwise; never below the model's max input length)"
    )
    max_batch_requests: int | None = Field(
        None, ge=1, description="inputs per batch (default: 32 on CPU, where bigger batches run slower; 256 on CUDA)"
    )
    max_client_batch_size: int = Field(32, ge=1)
    max_concurrent_requests: int = Field(512, ge=1)
    auto_truncate: bool = False
    tokenization_workers: int = Field(default_factory=lambda: min(4, os.cpu_count() or 1), ge=1)
    payload_limit: int = Field(2_000_000, ge=1, description="largest request body in bytes")
    data_dir: Path = Field(default_factory=default_data_dir)
    exit_on_load_failure: bool = Field(False, description="exit (code 3) when the model fails to load, instead of "
                                                          "serving 503; what a supervisor wants")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError("device must be auto, cpu, cuda or cuda:N")

    @model_validator(mode="after")
    def _consistent(self) -> WorkerSettings:
        if self.quantize and self.backend == "torch":
            raise ValueError("--quantize int8 needs the onnx backend")
        return self


class GatewaySettings(_Settings):
    """Settings of the gateway (``embedfleet gateway``)."""

    upstream: list[str] = Field(default_factory=list, description="worker or TEI URL, repeated (NAME=URL allowed)")
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    cache: str = Field(default_factory=default_cache_url,
                       description="lmdb://PATH, redis://HOST:PORT/DB, qdrant://HOST:PORT, memory://, none")
    memory_cache_bytes: int = Field(256 * 1024 * 1024, ge=1, description="bound of the in-process LRU tier")
    cache_ttl: float | None = Field(None, gt=0, description="seconds an entry lives (default: forever)")
    max_client_batch_size: int = Field(2048, ge=1, description="inputs per request; split across upstreams")
    payload_limit: int = Field(32_000_000, ge=1, description="largest request body in bytes")
    upstream_timeout: float = Field(60.0, gt=0)
    health_interval: float = Field(1.0, gt=0, description="seconds between active /health checks")
    store_timeout: float = Field(0.25, gt=0, description="cache store reads slower than this count as misses")
    api_key: list[str] = Field(default_factory=list, description="keys accepted as Authorization: Bearer KEY")
    api_key_file: Path | None = Field(None, description="file with one API key per line")
    admin_key: str | None = Field(None, description="key for admin routes (DELETE /cache); unset: they are off")
    cors_origin: list[str] = Field(default_factory=list, description="origins browsers may call from (default: none)")
    tls_cert: Path | None = Field(None, description="PEM certificate (chain): serve HTTPS")
    tls_key: Path | None = Field(None, description="PEM private key of --tls-cert")
    tls_client_ca: Path | None = Field(None, description="PEM CA bundle: require client certificates it signed (mTLS)")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"

    @model_validator(mode="after")
    def _tls(self) -> GatewaySettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca (mTLS) needs --tls-cert and --tls-key")
        for path in (self.tls_cert, self.tls_key, self.tls_client_ca):
            if path is not None and not path.is_file():
                raise ValueError(f"TLS file {path} does not exist")
        return self



def default_state_dir() -> Path:
    """Where the fleet keeps its desired state and instance logs."""
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "embedfleet" / "fleet"


class FleetSettings(_Settings):
    """Settings of ``embedfleet serve`` (its ``[fleet]`` table; the gateway's come from ``[gateway]``).

    ``instances`` (``[[fleet.instances]]`` tables, each like a ``POST /admin/instances`` body, plus
    ``devices = ["0", "1"]`` to spread replicas) declares what to run; without it, ``model`` is served
    with ``replicas`` workers on ``devices`` (default: one per visible GPU, else one single-thread
    worker per CPU core).
    """

    model: str = Field("default", description="model served when no [[fleet.instances]] are declared")
    replicas: int | None = Field(None, ge=1, le=64, description="workers of --model (default: one per GPU or core)")
    devices: list[str] | None = Field(None, description="devices of --model's workers: cpu, or GPU indices")
    threads: int | None = Field(None, ge=1, description="threads per CPU worker (default 1 when one per core)")
    backend: Literal["auto", "onnx", "torch"] | None = None
    instances: list[dict[str, Any]] = Field(default_factory=list)
    state_dir: Path = Field(default_factory=default_state_dir, description="desired state and instance logs")
    port_range: str = Field("8081-8180", pattern=r"^\d{1,5}-\d{1,5}$", description="ports of spawned workers")
    health_interval: float = Field(2.0, gt=0, description="seconds between health checks of an instance")
    health_failures: int = Field(3, ge=1, description="failed checks in a row before a restart")
    max_restarts: int = Field(5, ge=0, description="restarts within --restart-window before `failed`")
    restart_window: float = Field(600.0, gt=0)
    start_timeout: float = Field(600.0, gt=0, description="seconds a worker may take to become healthy")
    stop_timeout: float = Field(15.0, gt=0, description="seconds between SIGTERM and SIGKILL")
    max_instances: int = Field(64, ge=1)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"

    @field_validator("devices", mode="before")
    @classmethod
    def _devices(cls, value: Any) -> Any:
        if isinstance(value, str):  # "0,1" from a flag or the environment
            return [d.strip() for d in value.split(",") if d.strip()]
        if isinstance(value, list):
            return [str(d) for d in value]
        return value

    @property
    def ports(self) -> tuple[int, int]:
        """The port range as (low, high)."""
        low, _, high = self.port_range.partition("-")
        return int(low), int(high)

    @model_validator(mode="after")
    def _range(self) -> FleetSettings:
        low, high = self.ports
        if not 1 <= low <= high <= 65535:
            raise ValueError(f"port_range {self.port_range!r} must be LOW-HIGH within 1-65535")
        return self
