"""The backend interface: one small trait, one class per inference runtime."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from embedfleet.engine.model import ModelInfo, Pooling, Task
from embedfleet.engine.tokenization import Encoded


class Output(StrEnum):
    """What a forward pass must return."""

    POOLED = "pooled"  # [B, D] sentence embeddings, before normalisation
    TOKENS = "tokens"  # [B, T, H] last hidden states
    SPARSE = "sparse"  # [B, V] SPLADE weights
    LOGITS = "logits"  # [B, L] classification / rerank logits


_TASK_OUTPUT = {
    Task.EMBEDDING: Output.POOLED,
    Task.SPARSE: Output.SPARSE,
    Task.RERANKER: Output.LOGITS,
    Task.CLASSIFIER: Output.LOGITS,
}


@dataclass(frozen=True, slots=True)
class PaddedBatch:
    """A right-padded batch of token ids."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray
    lengths: np.ndarray

    @classmethod
    def from_encoded(cls, items: Sequence[Encoded]) -> PaddedBatch:
        """Pad to the longest item."""
        lengths = np.fromiter((e.length for e in items), dtype=np.int64, count=len(items))
        width = int(lengths.max()) if len(items) else 0
        ids = np.zeros((len(items), width), dtype=np.int64)
        types = np.zeros_like(ids)
        for row, e in enumerate(items):
            ids[row, : e.length] = e.ids
            types[row, : e.length] = e.type_ids
        mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
        return cls(ids, mask, types, lengths)

    @property
    def padded_tokens(self) -> int:
        """Tokens the backend processes, padding included."""
        return int(self.input_ids.size)


class Backend(ABC):
    """Runs a model's forward pass on a padded batch, from at most :attr:`streams` threads at once."""

    name: str
    device: str
    dtype: str
    info: ModelInfo
    selection: str = ""  # what chose this backend and dtype, in words (set by create_backend)
    streams: int = 1
    """Forward passes that may run at once, each from its own thread (1: one at a time)."""

    @abstractmethod
    def forward(self, batch: PaddedBatch, output: Output) -> np.ndarray:
        """Run the model; returns float32 numpy in the shape ``output`` names."""

    def warmup(self) -> None:
        """Run one tiny batch so the first request does not pay for lazy initialisation."""
        item = Encoded(ids=np.array([1, 2], dtype=np.int64), type_ids=np.zeros(2, dtype=np.int64), characters=0)
        self.forward(PaddedBatch.from_encoded([item]), self.default_output())

    def default_output(self) -> Output:
        """The output this model's task produces."""
        return _TASK_OUTPUT[self.info.task]

    @property
    def preferred_batch_tokens(self) -> int | None:
        """Padded tokens per batch at which this backend runs fastest, where that is far below the
        usual 16384 (the worker's default budget then); None: no preference, bigger batches do not hurt."""
        return None


def pool_numpy(tokens: np.ndarray, mask: np.ndarray, pooling: Pooling) -> np.ndarray:
    """Pool [B, T, H] token states into [B, H] (for graphs that only output token states)."""
    if pooling is Pooling.CLS:
        return np.ascontiguousarray(tokens[:, 0])
    if pooling is Pooling.LAST_TOKEN:
        last = mask.sum(axis=1) - 1
        return np.ascontiguousarray(tokens[np.arange(tokens.shape[0]), last])
    if pooling is Pooling.MEAN:
        m = mask[..., None].astype(tokens.dtype)
        summed: np.ndarray = (tokens * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)
        return summed
    raise ValueError(f"pooling {pooling} cannot run on token states")
