"""``--dtype auto`` and ``--backend auto``: what is chosen on which machine, the accuracy gate, and the fp32
race between OpenVINO and onnxruntime (measured once, then remembered)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from embedfleet.engine.backends import choice, create_backend
from embedfleet.engine.backends.base import Output
from embedfleet.engine.model import ModelError, inspect


def pick(device: str = "cpu", backend: str = "auto", dtype: str = "auto", quantize: str | None = None,
         bf16: bool = True, openvino: bool = True) -> tuple[str, str, bool]:
    c = choice.choose(device, backend, dtype, quantize, bf16=bf16, openvino=openvino)
    assert c.reason
    return c.backend, c.dtype, c.gated


def test_auto_per_machine() -> None:
    assert pick("cuda") == ("torch", "float16", False)  # as TEI
    assert pick("cuda:1", dtype="float32") == ("torch", "float32", False)
    assert pick(bf16=True) == ("openvino", "bfloat16", True)  # AMX / AVX512-BF16: gated
    assert pick(bf16=False) == (choice.FASTEST, "float32", False)  # raced against onnxruntime
    assert pick(bf16=True, openvino=False) == ("onnx", "float32", False)
    assert pick(bf16=False, openvino=False) == ("onnx", "float32", False)


def test_named_choices_are_kept() -> None:
    assert pick(dtype="float32") == (choice.FASTEST, "float32", False)  # exact fp32, on the faster runtime
    assert pick(dtype="bfloat16") == ("openvino", "bfloat16", False)  # asked for: not gated
    assert pick(dtype="bfloat16", openvino=False) == ("torch", "bfloat16", False)
    assert pick(backend="onnx") == ("onnx", "float32", False)
    assert pick(backend="torch") == ("torch", "float32", False)
    assert pick(backend="openvino", bf16=False) == ("openvino", "float32", False)
    assert pick(backend="openvino", dtype="float32") == ("openvino", "float32", False)
    assert pick(quantize="int8") == ("onnx", "int8", False)
    assert pick("cuda", backend="onnx") == ("onnx", "float32", False)


@pytest.mark.parametrize("kwargs,message", [
    ({"dtype": "float16"}, "float16 is only supported on CUDA"),
    ({"backend": "onnx", "dtype": "bfloat16"}, "the onnx backend runs float32"),
    ({"device": "cuda", "backend": "openvino"}, "openvino backend runs on the CPU"),
    ({"backend": "openvino", "openvino": False}, "needs the openvino package"),
    ({"backend": "torch", "quantize": "int8"}, "needs the onnx backend"),
    ({"dtype": "bfloat16", "quantize": "int8"}, "quantizes the float32 graph"),
])
def test_impossible_choices_fail_clearly(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ModelError, match=message):
        pick(**kwargs)  # type: ignore[arg-type]


def test_native_bf16_reads_cpu_flags() -> None:
    assert choice.native_bf16(frozenset({"avx512f", "amx_bf16"}))
    assert choice.native_bf16(frozenset({"avx512_bf16"}))
    assert not choice.native_bf16(frozenset({"avx2", "avx512f", "avx512_vnni"}))



@pytest.mark.slow
@pytest.mark.skipif(not choice.native_bf16(), reason="this CPU has no native bf16")
def test_auto_runs_bf16_on_openvino_within_the_gate(data_dir: Path) -> None:
    info = inspect("default")
    # fp32 compiled first, into the same data dir: OpenVINO's model cache once returned NaNs for the bf16 model
    # compiled next (one cache folder for both precisions).
    reference = create_backend(info, "openvino", "cpu", data_dir, dtype="float32")
    backend = create_backend(info, "auto", "cpu", data_dir)
    assert (backend.name, backend.dtype) == ("openvino", "bfloat16")
    assert "accuracy gate: min cosine" in backend.selection
    assert choice.min_cosine(backend, reference, choice.probe_batches(info)) >= choice.GATE_MIN_COSINE


@pytest.mark.slow
@pytest.mark.skipif(not choice.native_bf16(), reason="this CPU has no native bf16")
def test_a_precision_below_the_gate_falls_back_to_float32(data_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(choice, "GATE_MIN_COSINE", 1.5)  # no cosine reaches it: bf16 must fail the gate
    with caplog.at_level(logging.WARNING):
        backend = create_backend(inspect("default"), "auto", "cpu", data_dir)
    assert backend.dtype == "float32"
    assert "failed the accuracy gate" in backend.selection
    assert "using float32" in caplog.text


@pytest.mark.slow
def test_the_fp32_race_is_measured_once_then_remembered(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    info = inspect(str(tiny_models["cls"]))
    first = create_backend(info, "auto", "cpu", tmp_path, dtype="float32")
    assert first.name in ("onnx", "openvino") and first.dtype == "float32"
    records = list((tmp_path / "choices").glob("*.json"))
    assert len(records) == 1
    record = json.loads(records[0].read_text())
    assert record["backend"] == first.name and set(record["rates"]) == {"onnx", "openvino"}
    assert "measured earlier" not in first.selection

    other = "onnx" if first.name == "openvino" else "openvino"
    records[0].write_text(json.dumps({**record, "backend": other}))  # the remembered answer is used as is
    second = create_backend(info, "auto", "cpu", tmp_path, dtype="float32")
    assert second.name == other and "measured earlier" in second.selection

    records[0].write_text("{not json")  # a damaged record is measured again, not an error
    third = create_backend(info, "auto", "cpu", tmp_path, dtype="float32")
    assert third.name in ("onnx", "openvino") and "measured earlier" not in third.selection
    batch = choice.probe_batches(info)[0]
    a, b = second.forward(batch, Output.POOLED), third.forward(batch, Output.POOLED)
    assert np.abs(a - b).max() < 1e-4  # either runtime, the same fp32 vectors
