"""Settings: each command's settings are defined once, here.

One class per command (:class:`WorkerSettings`, :class:`GatewaySettings`, :class:`FleetSettings`),
in the manner of text-embeddings-inference's ``Args``: each field holds the setting's type, default,
validation and description, and everything else derives from it: the command's flags
(``--field-name``, see ``embedfleet.cli``), its environment variable (``EMBEDFLEET_<COMMAND>_FIELD_NAME``)
and its key in the config file. Precedence: flags > environment > config file > defaults. The config
file is TOML (``--config`` or ``EMBEDFLEET_CONFIG``, else ``./embedfleet.toml`` if present), with one
table per command: ``[worker]``, ``[gateway]``, ``[fleet]``, ``[bench]``, ``[codesearch]`` (``embedfleet serve``
reads ``[fleet]`` and ``[gateway]``).
"""

from __future__ import annotations

import os
import re
import tomllib
import types
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self, Union, get_args, get_origin

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

DEFAULT_CONFIG_FILE = "embedfleet.toml"
ENV_PREFIX = "EMBEDFLEET_"
"""Every embedfleet environment variable starts with this."""
CONFIG_ENV = "EMBEDFLEET_CONFIG"
"""The config file, when ``--config`` is not given."""

Pooling = Literal["mean", "cls", "last_token", "splade"]
Backend = Literal["auto", "onnx", "openvino", "torch"]
DType = Literal["auto", "float32", "float16", "bfloat16"]
Quantize = Literal["int8"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]


class ConfigError(Exception):
    """The configuration file or a setting is invalid."""


HEALTH_CHECK_TIMEOUT_S = 5.0
"""How long a /health check of a worker may take (the gateway's and the fleet's): a worker answers it from its
event loop even when busy, so a slower answer means a hung process."""

_DEVICE = re.compile(r"(?:cuda:)?([0-9]+)")


def normalize_device(value: str, *, auto: bool = False, index: bool = False) -> str:
    """The canonical form of a device string: ``cpu``, ``cuda`` or ``cuda:N`` (case and spaces ignored).

    ``auto`` also accepts ``auto``; ``index`` also accepts a bare GPU index ``N`` (as ``cuda:N``).
    ValueError for anything else. Whether the device exists is for the caller to check.
    """
    text = value.strip().lower()
    if text in ("cpu", "cuda") or (auto and text == "auto"):
        return text
    match = _DEVICE.fullmatch(text)
    if match and (index or text.startswith("cuda:")):
        return f"cuda:{int(match[1])}"
    accepted = ["auto"] * auto + ["cpu", "cuda", "cuda:N"] + ["a GPU index"] * index
    raise ValueError(f"device {value!r} is not {', '.join(accepted[:-1])} or {accepted[-1]}")


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (where the OS has one), capped by a cgroup v2 CPU
    quota (``docker --cpus``, Kubernetes limits), rounded up; at least 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def default_data_dir() -> Path:
    """Where derived files (exported ONNX graphs) live by default."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "embedfleet"


def default_cache_url() -> str:
    """The embedded LMDB store under the user's data dir (it is data, not a throwaway cache)."""
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return f"lmdb://{base / 'embedfleet' / 'cache'}"


def default_state_dir() -> Path:
    """Where the fleet keeps its desired state and instance logs."""
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "embedfleet" / "fleet"


def default_codesearch_dir() -> Path:
    """Where code search keeps its local index, clones and cache."""
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "embedfleet" / "codesearch"


def load_config_table(path: str | Path | None, table: str) -> dict[str, Any]:
    """One table of the TOML config file; {} when there is no file (``os.devnull`` is an empty one)."""
    explicit = path or os.environ.get(CONFIG_ENV)
    file = Path(explicit) if explicit else Path(DEFAULT_CONFIG_FILE)
    if not file.exists():
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


def flag_name(field: str) -> str:
    """The command-line flag of a setting: ``max_batch_tokens`` -> ``--max-batch-tokens``."""
    return "--" + field.replace("_", "-")


def without_none(annotation: Any) -> Any:
    """``X | None`` -> ``X`` (``X`` itself when it does not admit None)."""
    if get_origin(annotation) in (Union, types.UnionType):
        rest = tuple(a for a in get_args(annotation) if a is not type(None))
        if len(rest) < len(get_args(annotation)):
            return rest[0] if len(rest) == 1 else Union[rest]  # noqa: UP007 - a runtime tuple of types
    return annotation


def derived_field(model: type[BaseModel], name: str, **overrides: Any) -> Any:
    """``model``'s field ``name`` (default, bounds, description) for another class to declare, with
    ``overrides`` (e.g. ``default=None``). The declaring class writes the annotation."""
    return FieldInfo.merge_field_infos(model.model_fields[name], **overrides)


def optional_fields(model: type[BaseModel], names: Iterable[str]) -> dict[str, Any]:
    """``model``'s fields ``names`` as ``pydantic.create_model`` definitions, each optional with default
    None (None: ``model``'s default), with the same type, bounds and description."""
    fields: dict[str, Any] = {}
    for name in names:
        info = model.model_fields[name]
        value_type = without_none(info.annotation)
        if info.metadata:
            value_type = Annotated[(value_type, *info.metadata)]
        fields[name] = (value_type | None, Field(None, description=info.description))
    return fields


class Settings(BaseSettings):
    """One command's settings: flags (init values) > environment (``env_prefix``) > config table ``table``
    > defaults."""

    model_config = SettingsConfigDict(extra="forbid", validate_default=True)
    table: ClassVar[str]
    """The command's table in the config file."""
    file_only: ClassVar[frozenset[str]] = frozenset()
    """Settings that are no flag (tables): the config file or the environment give them."""
    file_values: ClassVar[dict[str, Any]] = {}
    flags: ClassVar[dict[str, str]] = {}
    """Settings whose flag is not named after the field (a field cannot be called ``json``, say)."""

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
    def env_name(cls, field: str) -> str:
        """The environment variable of a setting."""
        return f"{cls.model_config.get('env_prefix', '')}{field}".upper()

    @classmethod
    def load(cls, config_file: str | Path | None = None, table: str | None = None, **flags: Any) -> Self:
        """Build settings from flags (None means "not given"), the environment and the config file's
        table (default: the command's own)."""
        table = table or cls.table
        values = load_config_table(config_file, table)
        unknown = sorted(set(values) - set(cls.model_fields))
        if unknown:
            raise ConfigError(f"unknown setting(s) in [{table}]: {', '.join(unknown)}")
        sub = type(cls.__name__, (cls,), {"file_values": values})
        settings: Self = sub(**{k: v for k, v in flags.items() if v is not None})
        return settings


def settings_flags(values: Mapping[str, Any]) -> list[str]:
    """Flags for setting values: ``--name value``, ``--name``/``--no-name`` for booleans, lists repeated;
    None is left out (the command's default)."""
    flags: list[str] = []
    for name, value in values.items():
        flag = flag_name(name)
        if isinstance(value, bool):
            flags.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, list | tuple):
            for item in value:
                flags += [flag, str(item)]
        elif value is not None:
            flags += [flag, str(value)]
    return flags


class WorkerSettings(Settings):
    """Settings of one inference replica (``embedfleet worker``)."""

    model_config = SettingsConfigDict(env_prefix="EMBEDFLEET_WORKER_")
    table: ClassVar[str] = "worker"

    model: str = Field("default", description="local folder, Hugging Face id, or `default` (all-MiniLM-L6-v2, "
                                              "bundled)")
    revision: str | None = Field(None, max_length=200, description="Hugging Face revision (branch, tag or commit)")
    served_model_name: str | None = Field(None, description="name reported in /info and /v1/embeddings "
                                                            "(default: the model id)")
    pooling: Pooling | None = Field(None, description="pooling instead of the model's own")
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8081, ge=0, le=65535, description="port to listen on")
    device: str = Field("auto", description="auto (CUDA when torch sees a GPU, else cpu), cpu, cuda or cuda:N")
    backend: Backend = Field("auto", description="inference runtime; auto: torch on CUDA; on CPU openvino, or for "
                                                 "float32 the faster of openvino and onnx here (measured once)")
    dtype: DType = Field("auto", description="compute type; auto: float16 on CUDA, bfloat16 on CPUs with native "
                                             "bf16 (AMX, AVX512-BF16) if it passes an accuracy gate, else float32")
    threads: int | None = Field(None, ge=1, le=1024, description="intra-op threads of the backend "
                                                                 "(default: all cores)")
    streams: int | None = Field(None, ge=1, le=1024, description="batches run at once on the openvino backend, "
                                                                 "sharing the threads (default: one per thread; "
                                                                 "1: lowest latency for a lone request)")
    quantize: Quantize | None = Field(None, description="dynamic quantization of the onnx backend")
    max_batch_tokens: int | None = Field(
        None, ge=1, description="padded tokens per batch (default: 512 for onnx on CPU, where bigger batches run "
                                "slower; 16384 otherwise; never below the model's max input length)"
    )
    max_batch_requests: int | None = Field(
        None, ge=1, description="inputs per batch (default: 32 on CPU, where bigger batches run slower; 256 on CUDA)"
    )
    max_client_batch_size: int = Field(32, ge=1, description="inputs a request may carry")
    max_concurrent_requests: int = Field(512, ge=1, description="requests in flight; more get 429 at once")
    auto_truncate: bool = Field(True, description="truncate inputs longer than the model's maximum (a request's "
                                                  "`truncate` still wins); off: refuse them with 422")
    tokenization_workers: int = Field(default_factory=lambda: min(4, usable_cpus()), ge=1,
                                      description="tokenizer threads (default: the cores, at most 4)")
    payload_limit: int = Field(2_000_000, ge=1, description="largest request body in bytes")
    data_dir: Path = Field(default_factory=default_data_dir, description="where exported ONNX graphs are cached")
    exit_on_load_failure: bool = Field(False, description="exit (code 3) when the model fails to load, instead of "
                                                          "serving 503; what a supervisor wants")
    log_level: LogLevel = Field("info", description="log level")
    log_format: LogFormat = Field("text", description="text, or one JSON object a line")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return normalize_device(value, auto=True)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.quantize and self.backend not in ("auto", "onnx"):
            raise ValueError("--quantize int8 needs the onnx backend")
        return self


class GatewaySettings(Settings):
    """Settings of the gateway (``embedfleet gateway``)."""

    model_config = SettingsConfigDict(env_prefix="EMBEDFLEET_GATEWAY_")
    table: ClassVar[str] = "gateway"

    upstream: list[str] = Field(default_factory=list, description="worker or TEI URL, repeated (NAME=URL forms "
                                "one pool per model); dns+http://NAME:PORT: every address NAME resolves to, "
                                "followed as it changes")
    upstream_dns_interval: float = Field(5.0, gt=0, description="seconds between look-ups of dns+http:// "
                                                                "upstreams")
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8080, ge=0, le=65535, description="port to listen on")
    cache: str = Field(default_factory=default_cache_url, description="cache store: lmdb://PATH, "
                       "redis://HOST:PORT/DB, qdrant://HOST:PORT, qdrant+local://PATH, memory:// or none")
    memory_cache_bytes: int = Field(256 * 1024 * 1024, ge=1, description="bound of the in-process LRU tier")
    cache_ttl: float | None = Field(None, gt=0, description="seconds an entry lives (default: forever)")
    max_client_batch_size: int = Field(2048, ge=1, description="inputs per request; split across upstreams")
    payload_limit: int = Field(8_000_000, ge=1, description="largest request body in bytes (fits a full batch: "
                                                            "2,048 inputs of 512 tokens, as text or token ids)")
    upstream_timeout: float = Field(60.0, gt=0, description="seconds an upstream call may take, plus one for "
                                                            "every 250 estimated tokens it carries")
    max_concurrent_requests: int = Field(1024, ge=1, description="POSTs under way before the gateway answers "
                                                                 "429 Overloaded")
    health_interval: float = Field(1.0, gt=0, description="seconds between active /health checks")
    store_timeout: float = Field(0.25, gt=0, description="cache store reads slower than this count as misses")
    cache_leases: bool = Field(True, description="single-flight across gateways sharing a Redis cache: a text "
                                                 "another gateway is computing is awaited, not computed again")
    cache_lease_ttl: float = Field(2.0, ge=0.1, le=60.0, description="seconds a lease on a text being computed "
                                   "lives unless renewed (renewed every third of it): how long a gateway that "
                                   "died holding one delays the others")
    api_key: list[str] = Field(default_factory=list, description="key accepted as Authorization: Bearer KEY, "
                                                                 "repeated (none: no authentication)")
    api_key_file: Path | None = Field(None, description="file with one API key per line")
    admin_key: str | None = Field(None, description="key for admin routes; unset: they are off")
    cors_origin: list[str] = Field(default_factory=list, description="origin browsers may call from, repeated "
                                                                     "(default: none)")
    grpc_port: int | None = Field(None, ge=0, le=65535, description="port of the gRPC server (TEI's tei.v1, the TEI "
                                  "manager's tei_multiplexer.v1, health, reflection) on --host; unset or 0: off")
    grpc_max_message_bytes: int = Field(256 * 1024 * 1024, ge=4096, description="largest gRPC message, in and out "
                                        "(an Arrow answer of N rows takes N x dimension x 4 bytes)")
    arrow_max_rows: int = Field(100_000, ge=1, description="rows an Arrow batch (EmbedArrow, POST /embed_arrow) may "
                                "carry")
    tls_cert: Path | None = Field(None, description="PEM certificate (chain): serve HTTPS")
    tls_key: Path | None = Field(None, description="PEM private key of --tls-cert")
    tls_client_ca: Path | None = Field(None, description="PEM CA bundle: require client certificates it signed (mTLS)")
    log_level: LogLevel = Field("info", description="log level")
    log_format: LogFormat = Field("text", description="text, or one JSON object a line")

    @model_validator(mode="after")
    def _tls(self) -> Self:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca (mTLS) needs --tls-cert and --tls-key")
        for path in (self.tls_cert, self.tls_key, self.tls_client_ca):
            if path is not None and not path.is_file():
                raise ValueError(f"TLS file {path} does not exist")
        return self


class FleetSettings(Settings):
    """Settings of ``embedfleet serve`` (its ``[fleet]`` table; the gateway's come from ``[gateway]``).

    ``instances`` (``[[fleet.instances]]`` tables, each like a ``POST /admin/instances`` body, plus
    ``devices = ["0", "1"]`` to spread replicas) declares what to run; without it, ``model`` is served
    with ``replicas`` workers on ``devices`` (default: one per visible GPU, else one single-thread
    worker per CPU core).
    """

    model_config = SettingsConfigDict(env_prefix="EMBEDFLEET_FLEET_")
    table: ClassVar[str] = "fleet"
    file_only: ClassVar[frozenset[str]] = frozenset({"instances"})

    model: str = Field("default", description="model served when no [[fleet.instances]] are declared")
    replicas: int | None = Field(None, ge=1, le=64, description="workers of --model (default: one per GPU, "
                                                                "else one per CPU core)")
    devices: list[str] | None = Field(
        None, description="devices of --model's workers, repeated or comma-separated: cpu, or GPU indices "
                          "(default: every visible GPU, else cpu)")
    threads: int | None = derived_field(WorkerSettings, "threads", description="threads of each of --model's "
                                        "workers (default: 1 with one worker per core)")
    backend: Backend | None = derived_field(WorkerSettings, "backend", default=None)
    data_dir: Path = derived_field(WorkerSettings, "data_dir")
    instances: list[dict[str, Any]] = Field(default_factory=list, description="[[fleet.instances]] tables")
    state_dir: Path = Field(default_factory=default_state_dir, description="desired state and instance logs")
    port_range: str = Field("8081-8180", pattern=r"^\d{1,5}-\d{1,5}$", description="ports of spawned workers")
    health_interval: float = Field(2.0, gt=0, description="seconds between health checks of an instance")
    health_failures: int = Field(3, ge=1, description="failed checks in a row before a restart")
    health_timeout: float = Field(HEALTH_CHECK_TIMEOUT_S, gt=0, description="seconds a health check may take; "
                                  "a failed check takes the instance out of its pool at once (calls under way "
                                  "are retried on other replicas) until a check passes")
    max_restarts: int = Field(5, ge=0, description="restarts within --restart-window before `failed`")
    restart_window: float = Field(600.0, gt=0, description="seconds in which --max-restarts are counted")
    start_timeout: float = Field(600.0, gt=0, description="seconds a worker may take to become healthy")
    stop_timeout: float = Field(15.0, gt=0, description="seconds between SIGTERM and SIGKILL")
    max_instances: int = Field(64, ge=1, description="instances the fleet runs at most")
    external_hosts: list[str] | None = Field(
        None, description="hosts (HOST or HOST:PORT) that external instances (`url`) may point at, repeated; "
                          "unset: any. An external instance joins its pool and sees the texts sent to it")
    allow_open_admin: bool = Field(
        False, description="serve /admin without any key on an address other than loopback (anyone who can "
                           "reach the port could then start processes and read texts); refused otherwise")
    log_level: LogLevel = Field("info", description="log level (of the workers too)")
    log_format: LogFormat = Field("text", description="text, or one JSON object a line")

    @field_validator("devices", mode="before")
    @classmethod
    def _devices(cls, value: Any) -> Any:
        if isinstance(value, str | int):  # "0,1" from the environment
            value = [value]
        if isinstance(value, list):  # ["0,1"] from a flag
            return [d.strip() for item in value for d in str(item).split(",") if d.strip()]
        return value

    @property
    def ports(self) -> tuple[int, int]:
        """The port range as (low, high)."""
        low, _, high = self.port_range.partition("-")
        return int(low), int(high)

    @model_validator(mode="after")
    def _range(self) -> Self:
        low, high = self.ports
        if not 1 <= low <= high <= 65535:
            raise ValueError(f"port_range {self.port_range!r} must be LOW-HIGH within 1-65535")
        return self


def _bench_modes() -> dict[str, str]:
    from embedfleet.bench.modes import MODES

    return {name: mode.summary for name, mode in MODES.items()}


class BenchSettings(Settings):
    """Settings of the load tool (``embedfleet bench URL``); the URL is its argument."""

    model_config = SettingsConfigDict(env_prefix="EMBEDFLEET_BENCH_")
    table: ClassVar[str] = "bench"
    flags: ClassVar[dict[str, str]] = {"json_file": "json"}

    mode: str = Field("http", description="protocol: " + "; ".join(f"{k}: {v}" for k, v in _bench_modes().items()))
    encoding: Literal["float", "base64"] = Field("float", description="encoding_format of --mode openai")
    model: str | None = Field(None, description="model to ask for (OpenAI's `model`; X-Model in --mode http and "
                                                "arrow over HTTP; x-model metadata in --mode grpc; the Target's "
                                                "model_id in --mode arrow over gRPC)")
    target: str | None = Field(None, description="gRPC only: the tei_multiplexer.v1 Target to send, name=INSTANCE, "
                                                 "model=MODEL_ID or index=N (--mode grpc then calls the "
                                                 "multiplexer's Embed)")
    arrow_compression: Literal["none", "lz4", "zstd"] = Field("none", description="compression of --mode arrow's "
                                                              "IPC batches")
    api_key: str | None = Field(None, description="sent as Authorization: Bearer KEY (gRPC: as metadata)")
    cacert: Path | None = Field(None, description="PEM CA bundle to verify an https:// or grpcs:// target with")
    cert: Path | None = Field(None, description="PEM client certificate (mTLS; may hold the key too)")
    key: Path | None = Field(None, description="PEM private key of --cert")
    insecure: bool = Field(False, description="do not verify the target's TLS certificate (https:// only)")
    concurrency: int = Field(8, ge=1, le=10_000, description="clients (keep-alive connections); with --rate, "
                                                           "the most requests in flight")
    batch_size: int = Field(1, ge=1, le=100_000, description="texts per request")
    num_texts: int | None = Field(None, ge=1, description="texts to send (default: 10,000, or as many as "
                                                          "--duration allows)")
    duration: float | None = Field(None, gt=0, description="seconds to run (with --num-texts: whichever ends "
                                                           "first)")
    rate: float | None = Field(None, gt=0, description="requests/s on a fixed schedule (open loop; latency counts "
                                                       "from the scheduled time); default: closed loop")
    warmup: float = Field(1.0, ge=0, description="seconds of untimed load first (same shape and texts)")
    texts: Path | None = Field(None, description="texts from a file: .jsonl, .csv, .parquet, else one per line")
    column: str | None = Field(None, description="field or column of --texts that holds the text (default: text)")
    text_tokens: int = Field(16, ge=4, le=100_000, description="tokens of each generated text (without --texts)")
    hit_ratio: float | None = Field(None, ge=0, le=1, description="share of texts repeated from a hot set sent "
                                    "before the run (cache hits), the rest new (default: the texts in order)")
    hot_texts: int = Field(256, ge=1, description="texts in the hot set of --hit-ratio (at least --batch-size)")
    timeout: float = Field(60.0, gt=0, description="seconds a request may take before it counts as failed")
    json_file: Path | None = Field(None, description="write the results as JSON to this file")
    plot: Path | None = Field(None, description="write a PNG: latency histogram and throughput over time "
                                                "(matplotlib: embedfleet[bench])")
    compare: str | None = Field(None, description="a second URL: the same load on both, in alternating rounds, "
                                                  "with the ratios")
    rounds: int = Field(3, ge=1, le=1000, description="rounds of each target with --compare")
    progress: bool = Field(True, description="live progress bar")

    @field_validator("mode")
    @classmethod
    def _mode(cls, value: str) -> str:
        modes = _bench_modes()
        if value not in modes:
            raise ValueError(f"unknown mode {value!r}: one of {', '.join(modes)}")
        return value

    @field_validator("target")
    @classmethod
    def _target(cls, value: str | None) -> str | None:
        if value is not None:
            from embedfleet.bench.modes import parse_target

            parse_target(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.key is not None and self.cert is None:
            raise ValueError("--key needs --cert")
        if self.target is not None and self.mode not in ("grpc", "arrow"):
            raise ValueError("--target is for --mode grpc and --mode arrow")
        if self.target is not None and self.model is not None:
            raise ValueError("--target and --model: give one (--target model=ID names a model)")
        for path in (self.cacert, self.cert, self.key, self.texts):
            if path is not None and not path.is_file():
                raise ValueError(f"file {path} does not exist")
        return self


class CodesearchSettings(Settings):
    """Settings of ``embedfleet codesearch`` (its ``[codesearch]`` table)."""

    model_config = SettingsConfigDict(env_prefix="EMBEDFLEET_CODESEARCH_")
    table: ClassVar[str] = "codesearch"

    data_dir: Path = Field(default_factory=default_codesearch_dir,
                           description="the local index, cloned repositories and the local service's cache")
    qdrant: str | None = Field(None, description="the index's Qdrant: qdrant://HOST:PORT (qdrants:// for HTTPS) for "
                                                 "a server (default: qdrant+local://DATA_DIR/qdrant, embedded)")
    qdrant_api_key: str | None = Field(None, description="the Qdrant server's API key")
    collection: str = Field("codesearch", pattern=r"^[A-Za-z0-9_-]{1,64}$", description="the index's collection")
    url: str | None = Field(None, description="an embedfleet gateway to embed with (default: start `embedfleet "
                                              "serve` on a free loopback port for the command's duration)")
    api_key: str | None = Field(None, description="the gateway's API key")
    model: str | None = Field(None, description="the embedding model: its pool at --url (X-Model), or what the "
                                                "local service serves (default: the default model)")
    reranker: str | None = Field(None, description="the reranker for --rerank: its pool at --url, or a model "
                                                   "(folder or hub id) the local service serves too")
    replicas: int | None = Field(None, ge=1, le=64, description="embedding workers of the local service "
                                                                "(default: one per CPU core)")
    concurrency: int = Field(4, ge=1, le=64, description="embedding requests in flight while indexing")
    batch_size: int = Field(32, ge=1, le=512, description="texts per embedding request")
    max_lines: int = Field(80, ge=5, le=10000, description="lines of a definition kept in one chunk")
    window_lines: int = Field(40, ge=5, le=10000, description="lines of a window (longer definitions, other files)")
    overlap_lines: int = Field(10, ge=0, le=5000, description="lines shared by consecutive windows")
    host: str = Field("127.0.0.1", description="address of `codesearch ui`")
    port: int = Field(8765, ge=1, le=65535, description="port of `codesearch ui`")

    @model_validator(mode="after")
    def _windows(self) -> Self:
        if self.overlap_lines >= self.window_lines:
            raise ValueError("overlap_lines must be smaller than window_lines")
        return self

    @property
    def qdrant_url(self) -> str:
        """The index's Qdrant URL."""
        return self.qdrant or f"qdrant+local://{self.data_dir / 'qdrant'}"
