"""``embedfleet deploy KIND``: plan, render, write, and say what was written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from embedfleet.config import FleetSettings, GatewaySettings
from embedfleet.deploy import compose, k8s, nginx
from embedfleet.deploy.files import write
from embedfleet.deploy.plan import DeployError, make_plan

DEFAULT_GATEWAYS = ("gateway-1", "gateway-2")
"""nginx's gateways when none are given: placeholders to replace with the gateways' hosts."""


def run_deploy(kind: str, fleet: FleetSettings, gateway: GatewaySettings, config: Path | None, out: Path,
               gpus: int, cpus: int | None, console: Console, **options: Any) -> list[Path]:
    """Write the files of ``kind`` (compose, nginx or k8s) into ``out``; print and return their paths."""
    plan = make_plan(fleet, gateway, config, gpus, cpus, workers=kind != "nginx")
    secret: frozenset[str] = frozenset()
    if kind == "compose":
        rendered = compose.render(plan, out)
        secret = frozenset({compose.SECRETS_FILE})
    elif kind == "nginx":
        gateways = list(options.get("gateways") or DEFAULT_GATEWAYS)
        rendered = nginx.render(plan, gateways, str(options.get("listen", "80")))
    elif kind == "k8s":
        rendered = k8s.render(plan)
    else:
        raise DeployError(f"unknown deployment kind {kind!r}")
    written = write(out, rendered, secret)
    for path in written:
        console.print(f"wrote {escape(str(path))}")
    if kind != "nginx":
        devices = sorted({w.gpu for w in plan.workers if w.gpu is not None})
        where = f"GPU(s) {', '.join(devices)}" if devices else "the CPU"
        console.print(escape(f"{len(plan.workers)} worker(s) on {where}, pools: {', '.join(plan.pools)}; "
                             "[fleet] replicas (or --replicas) sets how many"))
    if kind == "k8s" and not plan.secrets:
        console.print(f"keys: kubectl create secret generic {k8s.SECRET} "
                      f"--from-literal={GatewaySettings.env_name('api_key')}='[\"KEY\"]'")
    elif kind == "k8s":
        names = " ".join(f"--from-literal={k}=..." for k in plan.secrets)
        console.print(f"keys: the config has some; create the Secret: kubectl create secret generic {k8s.SECRET} "
                      f"{escape(names)}")
    for note in plan.notes:
        console.print(f"note: {escape(note)}")
    return written
