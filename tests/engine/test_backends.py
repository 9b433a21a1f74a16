"""Backends agree with sentence-transformers and with each other; ONNX exports are cached."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from embedfleet.engine.backends import create_backend
from embedfleet.engine.backends.base import Output, PaddedBatch
from embedfleet.engine.backends.onnx_backend import export, int8_weight_type, prepare
from embedfleet.engine.model import ModelError, ModelInfo, inspect
from embedfleet.engine.tokenization import Tokenization

TEXTS = [
    "The cat sits on the mat.",
    "A quick brown fox jumps over the lazy dog near the river bank in the morning light.",
    "Embedding servers batch requests by token budget.",
    "x",
    " ".join(["long input"] * 60),
]

pytestmark = pytest.mark.slow


def _embed(backend: object, info: ModelInfo, texts: list[str], output: Output = Output.POOLED) -> np.ndarray:
    tok = Tokenization(info.path, info.max_input_length)
    batch = PaddedBatch.from_encoded(tok.encode(texts, truncate=True))
    return backend.forward(batch, output)  # type: ignore[attr-defined,no-any-return]


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(inspect("default").path), device="cpu")
    return np.asarray(st.encode(TEXTS, batch_size=8, normalize_embeddings=True))


@pytest.mark.parametrize("name", ["onnx", "torch", "openvino"])
def test_backend_matches_sentence_transformers(name: str, reference: np.ndarray, data_dir: Path) -> None:
    info = inspect("default")
    backend = create_backend(info, name, "cpu", data_dir, dtype="float32")
    assert backend.dtype == "float32"
    cos = (_unit(_embed(backend, info, TEXTS)) * reference).sum(axis=1)
    assert cos.min() >= 0.9999, cos


def test_torch_bf16_on_cpu_stays_close(data_dir: Path, reference: np.ndarray) -> None:
    info = inspect("default")
    backend = create_backend(info, "torch", "cpu", data_dir, dtype="bfloat16")
    assert backend.dtype == "bfloat16"
    cos = (_unit(_embed(backend, info, TEXTS)) * reference).sum(axis=1)
    assert cos.min() >= 0.999, cos


def test_int8_quantization_stays_close(data_dir: Path, reference: np.ndarray) -> None:
    info = inspect("default")
    backend = create_backend(info, "onnx", "cpu", data_dir, quantize="int8")
    assert backend.dtype == "int8"
    # s8 weights where the CPU has VNNI/AMX (fast, no saturation), u8 elsewhere; cached apart.
    assert backend.path.name.endswith(f"-int8{int8_weight_type()}.onnx")  # type: ignore[attr-defined]
    cos = (_unit(_embed(backend, info, TEXTS)) * reference).sum(axis=1)
    # Typical texts stay near 0.995; a one-token input is the worst case (~0.985).
    assert cos.mean() >= 0.99, cos
    assert cos.min() >= 0.98, cos


def test_onnx_export_is_cached(data_dir: Path) -> None:
    info = inspect("default")
    first = prepare(info, data_dir)
    mtime = os.stat(first).st_mtime_ns
    assert prepare(info, data_dir) == first
    assert os.stat(first).st_mtime_ns == mtime
    assert first.name.startswith(info.sha)


def test_token_embeddings_match_torch(data_dir: Path) -> None:
    info = inspect("default")
    onnx_tokens = _embed(create_backend(info, "onnx", "cpu", data_dir), info, TEXTS[:2], Output.TOKENS)
    torch_tokens = _embed(create_backend(info, "torch", "cpu", data_dir), info, TEXTS[:2], Output.TOKENS)
    openvino = create_backend(info, "openvino", "cpu", data_dir, dtype="float32")
    openvino_tokens = _embed(openvino, info, TEXTS[:2], Output.TOKENS)
    assert onnx_tokens.shape == torch_tokens.shape == openvino_tokens.shape
    assert np.abs(onnx_tokens - torch_tokens).max() < 1e-3
    assert np.abs(openvino_tokens - torch_tokens).max() < 1e-3


def test_shipped_onnx_is_reused(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "shipped"
    shutil.copytree(tiny_models["cls"], folder)
    (folder / "onnx").mkdir()
    # A hub-style graph: token states only (last_hidden_state), pooling left to the server.
    info = inspect(str(folder))
    import transformers

    bert = transformers.BertModel.from_pretrained(str(folder), attn_implementation="eager").eval()

    class HubGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,  # type: ignore[no-any-return]
                             token_type_ids=token_type_ids).last_hidden_state

    ids = torch.ones(1, 4, dtype=torch.long)
    with torch.no_grad():
        torch.onnx.export(HubGraph(), (ids, torch.ones_like(ids), torch.zeros_like(ids)),
                          str(folder / "onnx" / "model.onnx"),
                          input_names=["input_ids", "attention_mask", "token_type_ids"],
                          output_names=["last_hidden_state"],
                          dynamic_axes={n: {0: "b", 1: "s"} for n in ["input_ids", "attention_mask", "token_type_ids",
                                                                       "last_hidden_state"]},
                          opset_version=17, dynamo=False)
    info = inspect(str(folder))
    assert info.shipped_onnx is not None
    shipped = create_backend(info, "onnx", "cpu", tmp_path / "cache")
    assert shipped.source == "shipped"  # type: ignore[attr-defined]
    assert not (tmp_path / "cache" / "onnx").exists()  # nothing was exported
    reference = create_backend(info, "torch", "cpu", tmp_path / "cache")
    a, b = _embed(shipped, info, TEXTS[:3]), _embed(reference, info, TEXTS[:3])
    assert np.abs(a - b).max() < 1e-4  # CLS pooling in numpy == CLS pooling in torch


@pytest.mark.parametrize("kind,output", [("reranker", Output.LOGITS), ("classifier", Output.LOGITS),
                                         ("splade", Output.SPARSE)])
def test_task_heads_agree_across_backends(kind: str, output: Output, tiny_models: dict[str, Path],
                                          tmp_path: Path) -> None:
    info = inspect(str(tiny_models[kind]))
    onnx = create_backend(info, "onnx", "cpu", tmp_path)
    openvino = create_backend(info, "openvino", "cpu", tmp_path, dtype="float32")
    tch = create_backend(info, "torch", "cpu", tmp_path)
    tok = Tokenization(info.path, info.max_input_length)
    batch = PaddedBatch.from_encoded(tok.encode(["query one", "a somewhat longer second query"], truncate=True,
                                                pairs=["doc a", "doc b is longer than doc a"]))
    a, b, c = onnx.forward(batch, output), tch.forward(batch, output), openvino.forward(batch, output)
    assert a.shape == b.shape == c.shape == (2, info.dimension)
    assert np.abs(a - b).max() < 1e-4
    assert np.abs(c - b).max() < 1e-4


def test_export_writes_the_task_outputs(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    import onnx

    info = inspect(str(tiny_models["splade"]))
    export(info, tmp_path / "splade.onnx")
    graph = onnx.load(str(tmp_path / "splade.onnx")).graph
    assert [o.name for o in graph.output] == ["sparse"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here, so asking for it is no error")
def test_cuda_without_cuda_fails_clearly(data_dir: Path) -> None:
    with pytest.raises(ModelError, match="CUDA is not available"):
        create_backend(inspect("default"), "torch", "cuda", data_dir)


def test_int8_quantization_is_for_the_onnx_backend_only(data_dir: Path) -> None:
    with pytest.raises(ModelError, match="needs the onnx backend"):
        create_backend(inspect("default"), "torch", "cpu", data_dir, quantize="int8")


def test_float16_on_cpu_fails_clearly(data_dir: Path) -> None:
    # Asked for on the CPU explicitly, so it holds (and runs) on CUDA machines too.
    with pytest.raises(ModelError, match="float16 is only supported on CUDA"):
        create_backend(inspect("default"), "torch", "cpu", data_dir, dtype="float16")
