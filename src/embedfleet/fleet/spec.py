"""What an instance is meant to be: its persisted definition, and the admin API's request to make some."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Names become file names (logs) and URL segments: letters, digits, '.', '_' and '-', no leading dot.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
Task = Literal["embedding", "reranker", "classifier", "sparse"]


def check_name(name: str) -> str:
    """The name, or ValueError saying what a valid one looks like."""
    if not NAME_RE.fullmatch(name) or ".." in name:
        raise ValueError(f"invalid instance name {name!r}: use 1-63 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit, without '..'")
    return name


class WorkerOptions(BaseModel):
    """Settings passed on to ``embedfleet worker`` (None: the worker's default)."""

    model_config = ConfigDict(extra="forbid")

    revision: str | None = Field(default=None, max_length=200)
    pooling: Literal["mean", "cls", "last_token", "splade"] | None = None
    backend: Literal["auto", "onnx", "torch"] | None = None
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    threads: int | None = Field(default=None, ge=1, le=1024)
    quantize: Literal["int8"] | None = None
    max_batch_tokens: int | None = Field(default=None, ge=1)
    max_batch_requests: int | None = Field(default=None, ge=1)
    max_client_batch_size: int | None = Field(default=None, ge=1)
    max_concurrent_requests: int | None = Field(default=None, ge=1)
    auto_truncate: bool | None = None


class InstanceSpec(WorkerOptions):
    """One instance: a worker process the fleet runs, or an external TEI-compatible server (``url``)."""

    name: str
    model: str | None = Field(default=None, min_length=1, max_length=500,
                              description="local folder, Hugging Face id or `default`")
    url: str | None = Field(default=None, description="an external server to route to (not spawned)")
    served_name: str | None = Field(default=None, min_length=1, max_length=200,
                                    description="pool (model name clients use); default: the model")
    task: Task | None = Field(default=None, description="expected task; the instance fails if the model does another")
    device: str = "cpu"
    port: int | None = Field(default=None, ge=1, le=65535, description="fixed port; default: one from the port range")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", value):
            raise ValueError(f"url {value!r} is not an http(s) URL")
        return value.rstrip("/") if value else value

    @model_validator(mode="after")
    def _one_source(self) -> InstanceSpec:
        if (self.model is None) == (self.url is None):
            raise ValueError("give exactly one of `model` (a worker to run) or `url` (an external server)")
        return self

    @property
    def external(self) -> bool:
        """Registered by URL: health-checked and routed to, never spawned."""
        return self.url is not None

    @property
    def pool(self) -> str:
        """The gateway pool (the name clients use for the model)."""
        return self.served_name or self.model or self.name


class InstanceRequest(WorkerOptions):
    """``POST /admin/instances``: one instance, or ``replicas`` of them named ``NAME-0``, ``NAME-1``..."""

    name: str
    model: str | None = Field(default=None, min_length=1, max_length=500)
    url: str | None = None
    served_name: str | None = Field(default=None, min_length=1, max_length=200)
    task: Task | None = None
    device: str | None = Field(default=None, description="cpu, cuda, cuda:N or N (default: cpu, or GPU gpu_id)")
    gpu_id: int | None = Field(default=None, ge=0)
    replicas: int = Field(default=1, ge=1, le=64)
    port: int | None = Field(default=None, ge=1, le=65535, description="fixed port (replicas take the next ones)")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value)

    @model_validator(mode="after")
    def _consistent(self) -> InstanceRequest:
        if self.device is not None and self.gpu_id is not None:
            raise ValueError("give `device` or `gpu_id`, not both")
        if self.url is not None and self.replicas != 1:
            raise ValueError("an external instance (`url`) has no replicas")
        if self.port is not None and self.port + self.replicas - 1 > 65535:
            raise ValueError("ports of the replicas run past 65535")
        return self

    def specs(self, devices: list[str]) -> list[InstanceSpec]:
        """The instances this request makes, given each replica's (normalised) device."""
        names = [self.name] if self.replicas == 1 else [f"{self.name}-{i}" for i in range(self.replicas)]
        options = self.model_dump(include=set(InstanceSpec.model_fields) - {"name", "device", "port"})
        return [InstanceSpec(**options, name=check_name(n), device=devices[i],
                             port=None if self.port is None else self.port + i) for i, n in enumerate(names)]
