"""Model inspection: task, pooling, dimension, limits and fingerprint come from the model's files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from embedfleet.engine.model import DenseLayer, ModelError, Pooling, Task, inspect
from tests.engine import st_models


def test_default_model_is_detected_from_its_metadata() -> None:
    info = inspect("default")
    assert info.model_id == "sentence-transformers/all-MiniLM-L6-v2"
    assert info.task is Task.EMBEDDING
    assert info.pooling is Pooling.MEAN
    assert info.dimension == 384
    assert info.max_input_length == 256  # sentence_bert_config.json, not the 512 positions
    assert len(info.sha) == 40
    assert inspect("default").sha == info.sha  # content fingerprint is stable


def test_tiny_models_tasks(tiny_models: dict[str, Path]) -> None:
    reranker = inspect(str(tiny_models["reranker"]))
    assert (reranker.task, reranker.dimension) == (Task.RERANKER, 1)
    classifier = inspect(str(tiny_models["classifier"]))
    assert classifier.task is Task.CLASSIFIER
    assert classifier.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    splade = inspect(str(tiny_models["splade"]))
    assert (splade.task, splade.pooling, splade.dimension) == (Task.SPARSE, Pooling.SPLADE, 30522)
    cls = inspect(str(tiny_models["cls"]))
    assert (cls.task, cls.pooling, cls.dimension, cls.max_input_length) == (Task.EMBEDDING, Pooling.CLS, 32, 128)


def test_pooling_override_and_missing_pooling(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    assert inspect(str(tiny_models["cls"]), pooling="mean").pooling is Pooling.MEAN
    bare = tmp_path / "bare"
    shutil.copytree(tiny_models["cls"], bare)
    shutil.rmtree(bare / "1_Pooling")
    (bare / "modules.json").unlink()
    with pytest.raises(ModelError, match="--pooling"):
        inspect(str(bare))
    assert inspect(str(bare), pooling="last_token").pooling is Pooling.LAST_TOKEN
    with pytest.raises(ModelError, match="does not apply"):
        inspect(str(tiny_models["reranker"]), pooling="mean")


def test_unsupported_pooling_is_a_clear_error(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "maxpool"
    shutil.copytree(tiny_models["cls"], folder)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(ModelError, match="not supported"):
        inspect(str(folder))


def test_fingerprint_changes_with_weights(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(tiny_models["cls"], folder)
    before = inspect(str(folder)).sha
    with open(folder / "model.safetensors", "ab") as fh:
        fh.write(b"\0")
    assert inspect(str(folder)).sha != before


def test_missing_models_fail_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        inspect(str(tmp_path / "nope"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="not in the local Hugging Face cache"):
        inspect("someone/not-cached-model-xyz")


@pytest.fixture(scope="module")
def st_saved(tmp_path_factory: pytest.TempPathFactory, default_path: Path) -> dict[str, Path]:
    """Mean pooling + Dense 32->16, and last-token pooling, as the installed sentence-transformers saves them."""
    root = tmp_path_factory.mktemp("st-saved")
    base = st_models.tiny_bert(root / "base", default_path)
    return {"dense": st_models.save_st(root / "dense", base, "mean", dense_out=16),
            "last_token": st_models.save_st(root / "last_token", base, "lasttoken")}


@pytest.mark.slow
def test_dense_module_and_last_token_pooling_are_read(st_saved: dict[str, Path], tmp_path: Path) -> None:
    dense = st_models.to_hub_format(Path(shutil.copytree(st_saved["dense"], tmp_path / "dense")).resolve())
    info = inspect(str(dense))
    assert (info.task, info.pooling, info.hidden_size, info.dimension) == (Task.EMBEDDING, Pooling.MEAN, 32, 16)
    assert info.dense == (DenseLayer(dense / "2_Dense", in_features=32, out_features=16, bias=True,
                                     activation="Tanh"),)
    last = st_models.to_hub_format(Path(shutil.copytree(st_saved["last_token"], tmp_path / "last")).resolve())
    info = inspect(str(last))
    assert (info.task, info.pooling, info.dimension, info.dense) == (Task.EMBEDDING, Pooling.LAST_TOKEN, 32, ())


@pytest.mark.slow
def test_pooling_as_sentence_transformers_6_saves_it_is_read(st_saved: dict[str, Path]) -> None:
    folder = st_saved["last_token"]
    if st_models.writes_hub_format(folder):
        pytest.skip("the installed sentence-transformers (< 6) writes the hub format, tested above")
    info = inspect(str(folder))
    assert (info.pooling, info.dimension) == (Pooling.LAST_TOKEN, 32)


@pytest.mark.slow
def test_dense_module_as_sentence_transformers_6_saves_it_is_read(st_saved: dict[str, Path], tmp_path: Path) -> None:
    folder = Path(shutil.copytree(st_saved["dense"], tmp_path / "dense"))
    if st_models.writes_hub_format(folder):
        pytest.skip("the installed sentence-transformers (< 6) writes the hub format, tested above")
    info = inspect(str(folder))  # modules.json and both configs as 6.x wrote them
    assert (info.dimension, len(info.dense)) == (16, 1)
