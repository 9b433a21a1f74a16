"""onnxruntime backend, the default on CPU.

The serving module (transformer + pooling + head) is exported once with ``torch.onnx.export``,
passed through onnxruntime's transformer optimizer (fused attention, LayerNorm and GELU) when it
knows the architecture, checked against the unoptimised graph, optionally quantized to int8, and
cached on disk under a key of model fingerprint + export settings. A model's own ONNX files, where
its repository has them, are not used: they lack the pooling head and the optimizer's checks.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from embedfleet.engine.backends.base import Backend, Output, PaddedBatch, pool_numpy
from embedfleet.engine.model import ModelError, ModelInfo, Task

log = logging.getLogger(__name__)

OPSET = 17
# onnxruntime's optimizer knows BERT-style encoders; these model types export to that pattern.
_OPTIMIZER_TYPES = {"bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "camembert": "bert",
                    "electra": "bert", "distilbert": "bert"}


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Serialise exports across processes (a fleet starts many workers of one model at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _atomic_target(final: Path) -> Path:
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=final.stem + ".", suffix=".tmp.onnx")
    os.close(fd)
    return Path(tmp)


@functools.cache
def exporter_fingerprint() -> str:
    """What the exported, optimized and quantized graphs depend on besides the model: the versions of
    torch, onnx and onnxruntime and the source of the export code. Cached graphs are keyed by it, so an
    upgrade of any of them (or a change to this module) rebuilds them; no version number to bump."""
    import onnx
    import onnxruntime
    import torch

    from embedfleet.engine.backends import module

    h = hashlib.blake2b(digest_size=8)
    for part in (torch.__version__, onnx.__version__, onnxruntime.__version__, str(OPSET)):
        h.update(part.encode() + b"\0")
    for source in (Path(__file__), Path(module.__file__)):
        h.update(source.read_bytes())
    return h.hexdigest()


def export(info: ModelInfo, target: Path) -> None:
    """Export the serving module to ONNX (fp32, dynamic batch and sequence axes)."""
    import torch

    from embedfleet.engine.backends.module import ServingModule, load_transformer

    transformer = load_transformer(info, "eager", torch.float32)
    module = ServingModule(info, transformer).eval()
    ids = torch.ones(2, 8, dtype=torch.long)
    mask = torch.ones_like(ids)
    types = torch.zeros_like(ids)
    inputs = ["input_ids", "attention_mask", "token_type_ids"]
    axes: dict[str, dict[int, str]] = {n: {0: "batch", 1: "sequence"} for n in inputs}
    if info.task is Task.EMBEDDING:
        outputs = ["token_embeddings", "sentence_embedding"]
        axes["token_embeddings"] = {0: "batch", 1: "sequence"}
        axes["sentence_embedding"] = {0: "batch"}
    else:
        outputs = [info.task.value]
        axes[info.task.value] = {0: "batch"}
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (ids, mask, types), str(target), input_names=inputs, output_names=outputs,
            dynamic_axes=axes, opset_version=OPSET, dynamo=False, do_constant_folding=True,
        )


def _session(path: Path, threads: int | None, providers: list[str]) -> object:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    # Idle intra-op threads would otherwise spin, starving the event loop and the tokenizer threads.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=providers)


def _probe_batch(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 2000, size=(3, 24), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, 12:] = 0
    mask[2, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


OPTIMIZED_MIN_COSINE = 0.9999
"""How closely the optimizer's fused graph must agree with the plain one to be used."""


def _min_cosine(a: Path, b: Path) -> float:
    """Smallest cosine between the two graphs' main outputs on a probe batch."""
    feed = _probe_batch()
    sa, sb = _session(a, None, ["CPUExecutionProvider"]), _session(b, None, ["CPUExecutionProvider"])
    out_a = sa.run(None, feed)[-1].reshape(3, -1)  # type: ignore[attr-defined]
    out_b = sb.run(None, feed)[-1].reshape(3, -1)  # type: ignore[attr-defined]
    cos = (out_a * out_b).sum(1) / (np.linalg.norm(out_a, axis=1) * np.linalg.norm(out_b, axis=1) + 1e-12)
    return float(cos.min())


def _optimize(info: ModelInfo, source: Path, target: Path) -> bool:
    kind = _OPTIMIZER_TYPES.get(info.model_type)
    if kind is None or not info.num_heads or not info.hidden_size:
        return False
    from onnxruntime.transformers.optimizer import optimize_model

    try:
        optimized = optimize_model(str(source), model_type=kind, num_heads=info.num_heads,
                                   hidden_size=info.hidden_size, opt_level=0)
        optimized.save_model_to_file(str(target))
    except Exception as exc:  # the optimizer raises many types; any failure means "use the plain graph"
        log.warning("onnxruntime optimizer failed for %s (%s); using the plain graph", info.model_id, exc)
        return False
    cos = _min_cosine(source, target)
    if cos < OPTIMIZED_MIN_COSINE:
        log.warning("optimized graph disagrees with the plain one (cos %.6f); using the plain graph", cos)
        target.unlink(missing_ok=True)
        return False
    return True


def int8_weight_type() -> str:
    """``s8`` where the CPU multiplies int8 with VNNI or AMX, ``u8`` elsewhere.

    Without VNNI, x86 int8 kernels multiply u8 activations by s8 weights with an instruction that
    saturates (vpmaddubsw), which costs real accuracy; u8 weights avoid it. With VNNI or AMX-INT8
    there is no saturation, and s8 weights take the faster AMX path at the same accuracy.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return "u8"
    return "s8" if {"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags) else "u8"


def _quantize(source: Path, target: Path, weights: str) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Dynamic quantization, per-channel weights, MatMul only (quantizing every op loses accuracy).
    quantize_dynamic(str(source), str(target), per_channel=True, op_types_to_quantize=["MatMul"],
                     weight_type=QuantType.QInt8 if weights == "s8" else QuantType.QUInt8,
                     # Fused contrib ops (Attention, SkipLayerNorm) defeat ONNX shape inference.
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def prepare(info: ModelInfo, cache_dir: Path, quantize: str | None = None, optimize: bool = True) -> Path:
    """The .onnx file to run: from the cache, or exported (and optimized, quantized) now."""
    tag = f"{info.sha}-{info.task.value}-{info.pooling or 'head'}-d{len(info.dense)}-x{exporter_fingerprint()}"
    folder = cache_dir / "onnx"
    folder.mkdir(parents=True, exist_ok=True)
    plain = folder / f"{tag}.onnx"
    optimized = folder / f"{tag}-opt.onnx"
    with file_lock(folder / f"{tag}.lock"):
        if not plain.exists():
            log.info("exporting %s to ONNX (once; cached in %s)", info.model_id, folder)
            tmp = _atomic_target(plain)
            try:
                export(info, tmp)
                os.replace(tmp, plain)
            finally:
                tmp.unlink(missing_ok=True)
        base = plain
        if optimize:
            marker = folder / f"{tag}-opt.unsupported"
            if optimized.exists():
                base = optimized
            elif not marker.exists():
                tmp = _atomic_target(optimized)
                try:
                    if _optimize(info, plain, tmp):
                        os.replace(tmp, optimized)
                        base = optimized
                    else:
                        marker.touch()
                finally:
                    tmp.unlink(missing_ok=True)
        if quantize is None:
            return base
        if quantize != "int8":
            raise ModelError(f"quantize {quantize!r} is not supported (only int8)")
        weights = int8_weight_type()
        quantized = base.with_name(f"{base.stem}-int8{weights}.onnx")
        if not quantized.exists():
            tmp = _atomic_target(quantized)
            try:
                _quantize(base, tmp, weights)
                os.replace(tmp, quantized)
            finally:
                tmp.unlink(missing_ok=True)
        return quantized


CPU_BATCH_TOKENS = 512
"""onnxruntime on CPU runs batches of about 512 padded tokens fastest (likely because a layer's
activations then stay in a core's L2 cache); the README's worker section has the measurements. torch
(bf16 on AMX) prefers large batches, so this is the onnx backend's preference only."""


class OnnxBackend(Backend):
    """Runs the exported graph with onnxruntime."""

    name = "onnx"

    def __init__(self, info: ModelInfo, cache_dir: Path, device: str = "cpu", threads: int | None = None,
                 quantize: str | None = None, dtype: str | None = None, optimize: bool = True) -> None:
        import onnxruntime as ort

        if dtype not in (None, "float32"):
            raise ModelError("the onnx backend runs float32 (use --quantize int8, or --backend torch for fp16)")
        self.info = info
        self.device = device
        self.dtype = "int8" if quantize else "float32"
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ModelError(
                    "onnxruntime has no CUDA provider here: install onnxruntime-gpu or use --backend torch"
                )
            index = device.partition(":")[2] or "0"
            providers: list[object] = [("CUDAExecutionProvider", {"device_id": int(index)}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        self.pool_in_numpy = False
        if info.shipped_onnx is not None and info.task is Task.EMBEDDING and not info.dense and quantize is None:
            self.source = "shipped"
            path = info.shipped_onnx
            self.pool_in_numpy = True
        else:
            self.source = "exported"
            path = prepare(info, cache_dir, quantize)
        self.path = path
        self.session = _session(path, threads, providers)  # type: ignore[arg-type]
        self._inputs = {i.name for i in self.session.get_inputs()}  # type: ignore[attr-defined]
        self._outputs = [o.name for o in self.session.get_outputs()]  # type: ignore[attr-defined]
        log.info("onnx graph %s (%s)", path, self.source)

    @property
    def preferred_batch_tokens(self) -> int | None:
        """512 padded tokens on CPU (:data:`CPU_BATCH_TOKENS`); no preference on CUDA."""
        return None if self.device.startswith("cuda") else CPU_BATCH_TOKENS

    def forward(self, batch: PaddedBatch, output: Output) -> np.ndarray:
        """One forward pass."""
        feed = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        if "token_type_ids" in self._inputs:
            feed["token_type_ids"] = batch.token_type_ids
        run = self.session.run  # type: ignore[attr-defined]
        if self.pool_in_numpy:
            tokens = run([self._outputs[0]], feed)[0]
            if output is Output.TOKENS:
                return np.asarray(tokens, dtype=np.float32)
            assert self.info.pooling is not None
            return pool_numpy(tokens, batch.attention_mask, self.info.pooling).astype(np.float32, copy=False)
        if output is Output.TOKENS:
            name = "token_embeddings"
        elif output is Output.POOLED:
            name = "sentence_embedding"
        else:
            name = self._outputs[-1]
        result: np.ndarray = run([name], feed)[0]
        return result.astype(np.float32, copy=False)
