"""PyTorch backend: fp32 on CPU; fp16 or bf16 with SDPA attention on CUDA (the default there)."""

from __future__ import annotations

import logging

import numpy as np
import torch

from embedfleet.engine.backends.base import Backend, Output, PaddedBatch
from embedfleet.engine.backends.module import ServingModule, load_transformer
from embedfleet.engine.model import ModelError, ModelInfo

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def default_dtype(device: str) -> str:
    """fp16 on CUDA, fp32 on CPU."""
    return "float16" if device.startswith("cuda") else "float32"


class TorchBackend(Backend):
    """Runs the serving module eagerly with torch."""

    name = "torch"

    def __init__(self, info: ModelInfo, device: str = "cpu", dtype: str | None = None,
                 threads: int | None = None) -> None:
        self.device = device
        self.dtype = dtype or default_dtype(device)
        if self.dtype not in DTYPES:
            raise ModelError(f"dtype {self.dtype!r} is not supported by the torch backend ({', '.join(DTYPES)})")
        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ModelError(f"device {device!r} asked for, but CUDA is not available")
        elif self.dtype == "float16":
            raise ModelError("float16 is only supported on CUDA; use float32 or bfloat16 on CPU")
        if threads:
            torch.set_num_threads(threads)
        self.info = info
        transformer = load_transformer(info, "sdpa", DTYPES[self.dtype])
        self.module = ServingModule(info, transformer).to(device=device, dtype=DTYPES[self.dtype]).eval()
        self._torch_device = torch.device(device)

    @torch.inference_mode()
    def forward(self, batch: PaddedBatch, output: Output) -> np.ndarray:
        """One forward pass; results come back as float32 numpy on the CPU."""
        dev = self._torch_device
        ids = torch.from_numpy(batch.input_ids).to(dev, non_blocking=True)
        mask = torch.from_numpy(batch.attention_mask).to(dev, non_blocking=True)
        types = torch.from_numpy(batch.token_type_ids).to(dev, non_blocking=True)
        result = self.module(ids, mask, types)
        if output is Output.TOKENS:
            tensor = result[0]
        elif output is Output.POOLED:
            tensor = result[1]
        else:
            tensor = result
        array: np.ndarray = tensor.float().cpu().numpy()
        return array
