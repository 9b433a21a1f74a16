"""What an instance is meant to be: its persisted definition, and the admin API's request to make some."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from embedfleet.config import WorkerSettings, optional_fields
from embedfleet.fleet.errors import FleetError
from embedfleet.fleet.registry import validate_model_id

# Names become file names (logs) and URL segments: letters, digits, '.', '_' and '-', no leading dot.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
Task = Literal["embedding", "reranker", "classifier", "sparse"]


def check_name(name: str) -> str:
    """The name, or ValueError saying what a valid one looks like."""
    if not NAME_RE.fullmatch(name) or ".." in name:
        raise ValueError(f"invalid instance name {name!r}: use 1-63 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit, without '..'")
    return name


FLEET_DECIDES = frozenset({"model", "served_model_name", "host", "port", "device", "data_dir",
                           "exit_on_load_failure", "log_level", "log_format"})
"""Worker settings the fleet sets itself (from the instance's own fields and its placement); every other
worker setting is an instance option."""
WORKER_OPTIONS = tuple(name for name in WorkerSettings.model_fields if name not in FLEET_DECIDES)
"""The worker settings an instance may set, each as ``WorkerSettings`` defines it."""

if TYPE_CHECKING:
    class WorkerOptions(BaseModel):
        """The fields are made at runtime: to a type checker, each is Any."""

        def __getattr__(self, name: str) -> Any: ...
else:
    # Derived from WorkerSettings (types, bounds, descriptions), so the two cannot drift.
    WorkerOptions = create_model(
        "WorkerOptions", __config__=ConfigDict(extra="forbid"), __module__=__name__,
        __doc__="Settings passed on to ``embedfleet worker`` (None: the worker's default).",
        **optional_fields(WorkerSettings, WORKER_OPTIONS))


class _Instance(WorkerOptions):
    """What an instance definition and a request for instances share."""

    name: str = Field(description="instance name: 1-63 letters, digits, '.', '_' or '-' (NAME-0, NAME-1... "
                                  "with replicas)")
    model: str | None = Field(default=None, min_length=1, max_length=500,
                              description=WorkerSettings.model_fields["model"].description)
    url: str | None = Field(default=None, description="an external TEI-compatible server to route to instead of "
                                                      "a model (health-checked, never spawned)")
    served_name: str | None = Field(default=None, min_length=1, max_length=200,
                                    description="model name clients use, the gateway pool (default: the model)")
    task: Task | None = Field(default=None, description="expected task; the instance fails if the model does another")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value)

    @field_validator("model")
    @classmethod
    def _model(cls, value: str | None) -> str | None:
        """``default``, an absolute folder path, or a Hugging Face id, as the model registry accepts them:
        never anything a worker's command line would read as an option."""
        if value is None or value == "default":
            return value
        if value.startswith("/"):
            if ".." in value.split("/") or any(c.isspace() or not c.isprintable() for c in value):
                raise ValueError(f"invalid model folder {value!r}")
            return value
        try:
            validate_model_id(value)
        except FleetError as exc:
            raise ValueError(exc.message) from None
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        """``http(s)://HOST[:PORT]``: the gateway calls TEI's routes at the root of the server."""
        if value is None:
            return value
        if not re.fullmatch(r"https?://[^\s/@]+/?", value):
            raise ValueError(f"url {value!r} must be http(s)://HOST[:PORT], without a path or credentials "
                             "(TEI's routes are served at the root)")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if (self.model is None) == (self.url is None):
            raise ValueError("give exactly one of `model` (a worker to run) or `url` (an external server)")
        return self


class InstanceSpec(_Instance):
    """One instance: a worker process the fleet runs, or an external TEI-compatible server (``url``)."""

    device: str = "cpu"
    port: int | None = Field(default=None, ge=1, le=65535, description="fixed port; default: one from the port range")

    @property
    def external(self) -> bool:
        """Registered by URL: health-checked and routed to, never spawned."""
        return self.url is not None

    @property
    def pool(self) -> str:
        """The gateway pool (the name clients use for the model)."""
        return self.served_name or self.model or self.name


class InstanceRequest(_Instance):
    """``POST /admin/instances``: one instance, or ``replicas`` of them named ``NAME-0``, ``NAME-1``..."""

    device: str | None = Field(default=None, description="cpu, cuda, cuda:N or N (default: the first GPU, else cpu)")
    gpu_id: int | None = Field(default=None, ge=0, description="GPU index, instead of device")
    replicas: int = Field(default=1, ge=1, le=64, description="workers to start")
    port: int | None = Field(default=None, ge=1, le=65535, description="fixed port (replicas take the next ones)")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
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
