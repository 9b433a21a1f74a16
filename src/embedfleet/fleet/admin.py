"""The admin REST API under /admin: instances and models, changed live.

The routes need the admin key (declared once, as :data:`ADMIN_RULES`, and checked by the edge) when
the service has any key; a service without keys (the local default) leaves them open. Every error,
FastAPI's own 404 and 422 included, is ``{"error", "code", "timestamp"}`` (see
:mod:`embedfleet.fleet.errors`). Handlers are plain functions of a request and the
:class:`AdminState` (a FastAPI dependency).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from pydantic import BaseModel, Field

from embedfleet.api.auth import Access, Auth, Rule
from embedfleet.api.edge import json_response, parse_body
from embedfleet.fleet.devices import DeviceError
from embedfleet.fleet.errors import FleetError, FleetErrorCode
from embedfleet.fleet.plan import request_devices
from embedfleet.fleet.registry import ModelRegistry
from embedfleet.fleet.spec import InstanceRequest
from embedfleet.fleet.supervisor import Supervisor

ADMIN_RULES = (Rule("/admin/", Access.ADMIN),)
"""Every admin route needs the admin key."""


class ModelRequest(BaseModel):
    """``POST /admin/models``."""

    model: str = Field(min_length=1, max_length=500)
    revision: str | None = Field(default=None, max_length=200)


@dataclass
class AdminState:
    """What the admin routes drive."""

    supervisor: Supervisor
    registry: ModelRegistry


async def admin_state(request: Request) -> AdminState:
    """The admin state of the app serving the request (a dependency; async, so it runs on the event loop)."""
    state: AdminState = request.app.state.admin
    return state


State = Annotated[AdminState, Depends(admin_state)]
Timeout = Annotated[float, Query(gt=0, le=3600)]


async def _settled(state: AdminState, name: str, wait: bool, timeout: float) -> Response:
    """An instance after a start or restart, once it runs (or failed) when ``wait``."""
    if wait:
        await state.supervisor.wait_settled([name], timeout)
    return json_response(state.supervisor.get(name).describe())


router = APIRouter(prefix="/admin", tags=["admin"])


@router.get("/instances")
async def list_instances(state: State) -> Response:
    """Every instance with its state."""
    return json_response({"instances": [i.describe() for i in state.supervisor.instances.values()]})


@router.post("/instances", status_code=201, openapi_extra={"requestBody": {"required": True, "content": {
    "application/json": {"schema": InstanceRequest.model_json_schema()}}}})
async def create_instance(request: Request, state: State, wait: bool = False, timeout: Timeout = 600.0) -> Response:
    """Add instances (``replicas`` of them) and start them; ``url`` registers an external server.
    ``?wait=true`` answers once they are running (or failed)."""
    body: InstanceRequest = await parse_body(request, InstanceRequest)
    supervisor = state.supervisor
    try:
        devices = request_devices(body, supervisor.settings.gpus)
    except DeviceError as exc:
        raise FleetError(FleetErrorCode.INVALID_DEVICE, str(exc)) from None
    try:
        specs = body.specs(devices)
    except ValueError as exc:  # a replica's derived name is too long
        raise FleetError(FleetErrorCode.VALIDATION_ERROR, str(exc)) from None
    added = await supervisor.add(specs)
    if body.model is not None and not any(m.id == body.model for m in state.registry.list()):
        with contextlib.suppress(FleetError):  # listing it is a convenience; the instance is what counts
            await state.registry.add(body.model, body.revision)
    if wait:
        await supervisor.wait_settled([i.name for i in added], timeout)
    return json_response({"instances": [i.describe() for i in added]}, status=201)


@router.get("/instances/{name}")
async def get_instance(name: str, state: State) -> Response:
    """One instance."""
    return json_response(state.supervisor.get(name).describe())


@router.delete("/instances/{name}")
async def delete_instance(name: str, state: State) -> Response:
    """Stop the instance and forget it."""
    await state.supervisor.remove(name)
    return json_response({"deleted": name})


@router.post("/instances/{name}/start")
async def start_instance(name: str, state: State, wait: bool = False, timeout: Timeout = 600.0) -> Response:
    """Start a stopped or failed instance."""
    await state.supervisor.start(name)
    return await _settled(state, name, wait, timeout)


@router.post("/instances/{name}/stop")
async def stop_instance(name: str, state: State) -> Response:
    """Stop an instance (drained first); it stays stopped until started."""
    return json_response((await state.supervisor.stop(name)).describe())


@router.post("/instances/{name}/restart")
async def restart_instance(name: str, state: State, wait: bool = False, timeout: Timeout = 600.0) -> Response:
    """Stop and start again, with a fresh restart budget."""
    await state.supervisor.restart(name)
    return await _settled(state, name, wait, timeout)


@router.get("/instances/{name}/logs")
async def instance_logs(name: str, state: State, tail: Annotated[int, Query(ge=0, le=1000)] = 100) -> Response:
    """The last lines of the instance's log (the whole log is in its file)."""
    instance = state.supervisor.get(name)
    return json_response({"name": name, "file": str(instance.log.path), "lines": instance.log.last(tail)})


@router.get("/models")
async def list_models(state: State) -> Response:
    """Known models: the packaged default, the Hugging Face cache, and those registered."""
    return json_response({"models": [m.model_dump() for m in state.registry.list()]})


@router.post("/models", status_code=201, openapi_extra={"requestBody": {"required": True, "content": {
    "application/json": {"schema": ModelRequest.model_json_schema()}}}})
async def add_model(request: Request, state: State) -> Response:
    """Register a model (a Hugging Face id or a local folder)."""
    body: ModelRequest = await parse_body(request, ModelRequest)
    return json_response((await state.registry.add(body.model, body.revision)).model_dump(), status=201)


@router.post("/models/{model_id:path}/download")
async def download_model(model_id: str, state: State, wait: bool = False) -> Response:
    """Download into the Hugging Face cache (202 while it runs; ``?wait=true`` for the outcome)."""
    record = await state.registry.download(model_id, wait=wait)
    return json_response(record.model_dump(), status=200 if wait else 202)


@router.post("/models/{model_id:path}/verify")
async def verify_model(model_id: str, state: State, wait: bool = False) -> Response:
    """Load the model in a separate process, embed one text, unload; records what it found."""
    record = await state.registry.verify(model_id, wait=wait)
    return json_response(record.model_dump(), status=200 if wait else 202)


@router.get("/models/{model_id:path}")
async def get_model(model_id: str, state: State) -> Response:
    """One model (ids with '/' URL-encoded or not)."""
    return json_response(state.registry.get(model_id).model_dump())


def install_admin(app: FastAPI, supervisor: Supervisor, registry: ModelRegistry, auth: Auth) -> None:
    """Add the /admin routes to the gateway app, and their access rule to its keys."""
    app.state.admin = AdminState(supervisor, registry)
    auth.declare(*ADMIN_RULES)
    app.include_router(router)
