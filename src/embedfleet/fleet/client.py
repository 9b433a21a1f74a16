"""A small client of the admin API, for the CLI's ``status``, ``instances`` and ``models`` commands."""

from __future__ import annotations

from typing import Any

import httpx
from rich.table import Table


class AdminError(Exception):
    """The service answered with an error, or could not be reached."""


class AdminClient:
    """Calls ``/admin`` on a running ``embedfleet serve``."""

    def __init__(self, url: str, admin_key: str | None = None, timeout: float = 30.0) -> None:
        headers = {"authorization": f"Bearer {admin_key}"} if admin_key else {}
        self.url = url.rstrip("/")
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def call(self, method: str, route: str, timeout: float | None = None, **kwargs: Any) -> Any:
        """One request; the parsed body, or AdminError with the service's message and code."""
        try:
            r = self.client.request(method, f"/admin{route}", timeout=timeout or self.client.timeout, **kwargs)
        except httpx.HTTPError as exc:
            raise AdminError(f"cannot reach {self.url}: {exc} (is `embedfleet serve` running?)") from None
        try:
            body = r.json()
        except ValueError:
            body = {"error": r.text or r.reason_phrase}
        if r.status_code >= 400:
            if isinstance(body, dict):
                message = body.get("error") or body.get("message") or str(body)
                code = body.get("code") or body.get("error_type") or r.status_code
            else:
                message, code = str(body), r.status_code
            raise AdminError(f"{message} ({code})")
        return body

    def close(self) -> None:
        """Close the connection."""
        self.client.close()


def instances_table(instances: list[dict[str, Any]], title: str | None = None) -> Table:
    """Instance, model, task, device, port, pid, state, restarts (from the admin API's descriptions)."""
    table = Table(title=title, title_justify="left")
    for column in ("instance", "model", "task", "device", "port", "pid", "state", "restarts"):
        table.add_column(column, justify="right" if column in ("port", "pid", "restarts") else "left")
    for i in instances:
        color = {"running": "green", "failed": "red", "stopped": "dim"}.get(i["state"], "yellow")
        table.add_row(i["name"], i.get("model") or i.get("url") or "", str(i.get("task") or "-"),
                      "external" if i.get("external") else str(i.get("device")), str(i.get("port") or "-"),
                      str(i.get("pid") or "-"), f"[{color}]{i['state']}[/]", str(i.get("restarts", 0)))
    return table


def models_table(models: list[dict[str, Any]]) -> Table:
    """Model, state, source, task, dimension, max length."""
    table = Table(title_justify="left")
    for column in ("model", "revision", "state", "source", "task", "dim", "max length"):
        table.add_column(column, justify="right" if column in ("dim", "max length") else "left")
    for m in models:
        table.add_row(m["id"], m.get("revision") or "-", m["state"], m.get("source") or "-", m.get("task") or "-",
                      str(m.get("dimension") or "-"), str(m.get("max_input_length") or "-"))
    return table
