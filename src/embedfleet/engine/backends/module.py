"""The torch module that serves a model: transformer plus the task's head and pooling.

The same module runs in the torch backend and is what the onnx backend exports, so both compute
exactly the same function.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from embedfleet.engine.model import DenseLayer, ModelError, ModelInfo, Pooling, Task

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "Identity": nn.Identity,
    "Tanh": nn.Tanh,
    "ReLU": nn.ReLU,
    "GELU": nn.GELU,
    "Sigmoid": nn.Sigmoid,
}


def _load_dense(layer: DenseLayer) -> nn.Module:
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias)
    weights = layer.path / "model.safetensors"
    state: dict[str, Any]
    if weights.is_file():
        from safetensors.torch import load_file

        state = load_file(str(weights))
    else:
        state = torch.load(layer.path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    linear.load_state_dict({k.removeprefix("linear."): v for k, v in state.items()})
    return nn.Sequential(linear, _ACTIVATIONS[layer.activation]())


def load_transformer(info: ModelInfo, attn_implementation: str, dtype: torch.dtype) -> nn.Module:
    """Load the Hugging Face model with the head the task needs."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    cls: Any
    if info.task is Task.EMBEDDING:
        cls = transformers.AutoModel
    elif info.task is Task.SPARSE:
        cls = transformers.AutoModelForMaskedLM
    else:
        cls = transformers.AutoModelForSequenceClassification
    try:
        model = cls.from_pretrained(str(info.path), attn_implementation=attn_implementation, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load {info.model_id}: {exc}") from exc
    model.eval()
    return model  # type: ignore[no-any-return]


class ServingModule(nn.Module):
    """Transformer + head. Returns (token states, pooled) for embedders, else one tensor."""

    def __init__(self, info: ModelInfo, transformer: nn.Module) -> None:
        super().__init__()
        self.task = info.task
        self.pooling = info.pooling
        self.transformer = transformer
        self.use_token_types = info.uses_token_type_ids
        self.dense = nn.Sequential(*[_load_dense(d) for d in info.dense])

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> Any:
        kwargs: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.use_token_types and token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        out = self.transformer(**kwargs)
        if self.task in (Task.RERANKER, Task.CLASSIFIER):
            return out.logits
        if self.task is Task.SPARSE:
            # SPLADE: max over tokens of log(1 + relu(logits)), padding masked out.
            weights = torch.log1p(torch.relu(out.logits)) * attention_mask.unsqueeze(-1).to(out.logits.dtype)
            return weights.max(dim=1).values
        hidden = out.last_hidden_state
        pooled = self._pool(hidden, attention_mask)
        pooled = self.dense(pooled.to(next(self.dense.parameters()).dtype)) if len(self.dense) else pooled
        return hidden, pooled

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling is Pooling.CLS:
            return hidden[:, 0]
        if self.pooling is Pooling.LAST_TOKEN:
            last = mask.sum(dim=1) - 1
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        if self.pooling is Pooling.MEAN:
            m = mask.unsqueeze(-1).to(hidden.dtype)
            # Sum in float32: fp16 sums over long inputs lose precision.
            summed = (hidden.float() * m.float()).sum(dim=1)
            return (summed / m.float().sum(dim=1).clamp(min=1e-9)).to(hidden.dtype)
        raise ModelError(f"pooling {self.pooling} is not valid for an embedding model")
