"""The admin REST API under /admin: instances and models, changed live.

Every route needs the admin key when the service has keys (an API key or an admin key); a service
without any key (the local default) leaves them open. Errors are ``{"error", "code", "timestamp"}``
(see :mod:`embedfleet.fleet.errors`).
"""

from __future__ import annotations

import contextlib
from typing import Any

import orjson
from fastapi import APIRouter, FastAPI, Query, Request, Response
from pydantic import BaseModel, Field, ValidationError

from embedfleet.api.errors import EmbedfleetError
from embedfleet.fleet.devices import DeviceError
from embedfleet.fleet.errors import FleetError, FleetErrorCode
from embedfleet.fleet.plan import request_devices
from embedfleet.fleet.registry import ModelRegistry
from embedfleet.fleet.spec import InstanceRequest
from embedfleet.fleet.supervisor import Supervisor
from embedfleet.gateway.auth import KeyCheck


class ModelRequest(BaseModel):
    """``POST /admin/models``."""

    model: str = Field(min_length=1, max_length=500)
    revision: str | None = Field(default=None, max_length=200)


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def _explain(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors():
        where = ".".join(str(p) for p in e["loc"])
        parts.append(f"{where}: {e['msg']}" if where else str(e["msg"]))
    return "; ".join(parts)


async def _body(request: Request, model: type[BaseModel]) -> Any:
    try:
        data = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise FleetError(FleetErrorCode.VALIDATION_ERROR, f"the body is not valid JSON: {exc}") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise FleetError(FleetErrorCode.VALIDATION_ERROR, _explain(exc)) from None


def install_admin(app: FastAPI, supervisor: Supervisor, registry: ModelRegistry, keys: KeyCheck) -> None:
    """Add the /admin routes and their error rendering to the gateway app."""

    async def fleet_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, FleetError)
        return Response(exc.render(), status_code=exc.status, media_type="application/json")

    app.add_exception_handler(FleetError, fleet_error)
    open_admin = not keys.api_keys and keys.admin_key is None

    def authorize(request: Request) -> None:
        if open_admin:
            return
        try:
            keys.check(request.url.path, request.headers.get("authorization"), admin=True)
        except EmbedfleetError as exc:
            code = FleetErrorCode.FORBIDDEN if exc.status == 403 else FleetErrorCode.UNAUTHORIZED
            raise FleetError(code, exc.message) from None

    router = APIRouter(prefix="/admin", tags=["admin"])

    @router.get("/instances")
    async def list_instances(request: Request) -> Response:
        """Every instance with its state."""
        authorize(request)
        return _json({"instances": [i.describe() for i in supervisor.instances.values()]})

    @router.post("/instances", status_code=201, openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": InstanceRequest.model_json_schema()}}}})
    async def create_instance(request: Request, wait: bool = False,
                              timeout: float = Query(600.0, gt=0, le=3600)) -> Response:
        """Add instances (``replicas`` of them) and start them; ``url`` registers an external server.
        ``?wait=true`` answers once they are running (or failed)."""
        authorize(request)
        body: InstanceRequest = await _body(request, InstanceRequest)
        try:
            devices = request_devices(body, supervisor.settings.gpus)
        except DeviceError as exc:
            raise FleetError(FleetErrorCode.INVALID_DEVICE, str(exc)) from None
        try:
            specs = body.specs(devices)
        except ValueError as exc:  # a replica's derived name is too long
            raise FleetError(FleetErrorCode.VALIDATION_ERROR, str(exc)) from None
        added = await supervisor.add(specs)
        if body.model is not None and not any(m.id == body.model for m in registry.list()):
            with contextlib.suppress(FleetError):  # listing it is a convenience; the instance is what counts
                await registry.add(body.model, body.revision)
        if wait:
            await supervisor.wait_settled([i.name for i in added], timeout)
        return _json({"instances": [i.describe() for i in added]}, status=201)

    @router.get("/instances/{name}")
    async def get_instance(name: str, request: Request) -> Response:
        """One instance."""
        authorize(request)
        return _json(supervisor.get(name).describe())

    @router.delete("/instances/{name}")
    async def delete_instance(name: str, request: Request) -> Response:
        """Stop the instance and forget it."""
        authorize(request)
        await supervisor.remove(name)
        return _json({"deleted": name})

    async def launched(name: str, wait: bool, timeout: float) -> Response:
        if wait:
            await supervisor.wait_settled([name], timeout)
        return _json(supervisor.get(name).describe())

    @router.post("/instances/{name}/start")
    async def start_instance(name: str, request: Request, wait: bool = False,
                             timeout: float = Query(600.0, gt=0, le=3600)) -> Response:
        """Start a stopped or failed instance."""
        authorize(request)
        await supervisor.start(name)
        return await launched(name, wait, timeout)

    @router.post("/instances/{name}/stop")
    async def stop_instance(name: str, request: Request) -> Response:
        """Stop an instance (drained first); it stays stopped until started."""
        authorize(request)
        return _json((await supervisor.stop(name)).describe())

    @router.post("/instances/{name}/restart")
    async def restart_instance(name: str, request: Request, wait: bool = False,
                               timeout: float = Query(600.0, gt=0, le=3600)) -> Response:
        """Stop and start again, with a fresh restart budget."""
        authorize(request)
        await supervisor.restart(name)
        return await launched(name, wait, timeout)

    @router.get("/instances/{name}/logs")
    async def instance_logs(name: str, request: Request, tail: int = Query(100, ge=0, le=1000)) -> Response:
        """The last lines of the instance's log (the whole log is in its file)."""
        authorize(request)
        instance = supervisor.get(name)
        return _json({"name": name, "file": str(instance.log.path), "lines": instance.log.last(tail)})

    @router.get("/models")
    async def list_models(request: Request) -> Response:
        """Known models: the packaged default, the Hugging Face cache, and those registered."""
        authorize(request)
        return _json({"models": [m.model_dump() for m in registry.list()]})

    @router.post("/models", status_code=201, openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": ModelRequest.model_json_schema()}}}})
    async def add_model(request: Request) -> Response:
        """Register a model (a Hugging Face id or a local folder)."""
        authorize(request)
        body: ModelRequest = await _body(request, ModelRequest)
        return _json((await registry.add(body.model, body.revision)).model_dump(), status=201)

    @router.post("/models/{model_id:path}/download")
    async def download_model(model_id: str, request: Request, wait: bool = False) -> Response:
        """Download into the Hugging Face cache (202 while it runs; ``?wait=true`` for the outcome)."""
        authorize(request)
        record = await registry.download(model_id, wait=wait)
        return _json(record.model_dump(), status=200 if wait else 202)

    @router.post("/models/{model_id:path}/verify")
    async def verify_model(model_id: str, request: Request, wait: bool = False) -> Response:
        """Load the model in a separate process, embed one text, unload; records what it found."""
        authorize(request)
        record = await registry.verify(model_id, wait=wait)
        return _json(record.model_dump(), status=200 if wait else 202)

    @router.get("/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> Response:
        """One model (ids with '/' URL-encoded or not)."""
        authorize(request)
        return _json(registry.get(model_id).model_dump())

    app.include_router(router)
