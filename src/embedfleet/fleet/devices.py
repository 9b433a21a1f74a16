"""Which devices this machine has, and what each worker process sees of them.

A worker on ``cuda:N`` is started with ``CUDA_VISIBLE_DEVICES`` set to the N-th GPU *visible to the
fleet* (so a fleet itself started with ``CUDA_VISIBLE_DEVICES=2,3`` puts ``cuda:0`` on physical GPU 2),
and told to use ``cuda:0``: the process sees one GPU and cannot allocate on another by mistake.
A CPU worker gets ``CUDA_VISIBLE_DEVICES=""`` so it never initialises CUDA.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from embedfleet.config import normalize_device

log = logging.getLogger("embedfleet.fleet")


class DeviceError(ValueError):
    """A device string that names no device of this machine."""


def visible_gpus(env: Mapping[str, str] | None = None) -> list[str]:
    """The GPUs this process may use, as the ids a child's ``CUDA_VISIBLE_DEVICES`` takes.

    ``CUDA_VISIBLE_DEVICES`` wins when set (an empty value means none); otherwise ``nvidia-smi`` is
    asked, and without it, torch. No GPU (or no driver) gives ``[]``.
    """
    env = os.environ if env is None else env
    listed = env.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        ids = [d.strip() for d in listed.split(",") if d.strip()]
        # CUDA stops at the first invalid entry ("-1" is the usual way to hide every GPU).
        return ids[: next((i for i, d in enumerate(ids) if d.startswith("-")), len(ids))]
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=15, check=True).stdout
            return [line.strip() for line in out.splitlines() if line.strip()]
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("nvidia-smi failed (%s); asking torch", exc)
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no torch, or a broken driver: both mean "no GPU"
        return []


@dataclass(frozen=True)
class Placement:
    """Where one worker runs: its ``--device`` flag and the environment it gets."""

    device: str
    env: dict[str, str]


def parse_device(device: str, gpus: list[str]) -> str:
    """Normalise ``cpu``, ``cuda``, ``cuda:N`` or ``N`` against the visible GPUs; DeviceError otherwise."""
    try:
        value = normalize_device(device, index=True)
    except ValueError as exc:
        raise DeviceError(str(exc)) from None
    if value == "cpu":
        return value
    index = int(value.partition(":")[2] or 0)
    if index >= len(gpus):
        seen = f"GPUs 0-{len(gpus) - 1}" if gpus else "no GPU"
        raise DeviceError(f"device {device!r} does not exist: this machine has {seen}")
    return f"cuda:{index}"


def placement(device: str, gpus: list[str]) -> Placement:
    """The worker flag and environment for a (normalised) device."""
    if device == "cpu":
        return Placement("cpu", {"CUDA_VISIBLE_DEVICES": ""})
    index = int(device.removeprefix("cuda:"))
    return Placement("cuda:0", {"CUDA_VISIBLE_DEVICES": gpus[index]})


def spread(replicas: int, devices: list[str]) -> list[str]:
    """Devices for ``replicas`` workers, round-robin over ``devices`` (two on one GPU share it)."""
    if not devices:
        raise DeviceError("no device to place workers on")
    return [devices[i % len(devices)] for i in range(replicas)]
