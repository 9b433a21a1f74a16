"""Tiny sentence-transformers models for tests: random BERT weights, the default model's tokenizer, and the
modules the README promises beyond plain pooling (a ``Dense`` projection, last-token pooling).

:func:`save_st` writes a folder the way the installed sentence-transformers saves one; :func:`to_hub_format`
rewrites its metadata the way sentence-transformers 2.x to 5.x wrote it, the format of nearly every model
on the Hugging Face hub (6.x names its modules and pooling modes differently).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

HIDDEN = 32
MAX_LENGTH = 128
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
HUB_POOLING_KEYS = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token",
                    "lasttoken": "pooling_mode_lasttoken"}
"""sentence-transformers' pooling mode names, and the flag each has in a hub-format ``1_Pooling/config.json``."""


def tiny_bert(folder: Path, default_path: Path) -> Path:
    """A random 2-layer BERT (hidden size :data:`HIDDEN`) with the default model's tokenizer, saved like a hub model."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=MAX_LENGTH)
    transformers.BertModel(cfg).eval().save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(default_path / name, folder / name)
    return folder


def _st_modules() -> Any:
    """The module classes of the installed sentence-transformers (6.x moved them; 5.x has them in ``models``)."""
    try:
        from sentence_transformers.sentence_transformer import modules
    except ImportError:
        from sentence_transformers import models as modules
    return modules


def save_st(folder: Path, base: Path, pooling: str, dense_out: int | None = None) -> Path:
    """``SentenceTransformer(modules=[Transformer, Pooling(pooling), Dense?]).save(folder)`` over the BERT in ``base``.

    The Dense module (``HIDDEN -> dense_out``, with bias and sentence-transformers' default Tanh) gets random
    weights from a fixed seed.
    """
    import torch
    from sentence_transformers import SentenceTransformer

    m = _st_modules()
    modules = [m.Transformer(str(base)), m.Pooling(HIDDEN, pooling)]
    if dense_out is not None:
        torch.manual_seed(1)
        modules.append(m.Dense(HIDDEN, dense_out))
    SentenceTransformer(modules=modules, device="cpu").save(str(folder))
    return folder


def pooling_mode(folder: Path) -> str:
    """The pooling mode a folder saved by :func:`save_st` declares, in either metadata format."""
    cfg = json.loads((folder / "1_Pooling" / "config.json").read_text())
    if isinstance(cfg.get("pooling_mode"), str):  # sentence-transformers 6.x
        return str(cfg["pooling_mode"])
    return next(mode for mode, key in HUB_POOLING_KEYS.items() if cfg.get(key))


def writes_hub_format(folder: Path) -> bool:
    """Whether a folder's metadata already is in the hub format (modules typed ``sentence_transformers.models.*``,
    one ``pooling_mode_*`` flag per mode): what sentence-transformers before 6.0 wrote."""
    modules = json.loads((folder / "modules.json").read_text())
    cfg = json.loads((folder / "1_Pooling" / "config.json").read_text())
    return (all(m["type"].startswith("sentence_transformers.models.") for m in modules)
            and "pooling_mode" not in cfg)


def to_hub_format(folder: Path, module_types: bool = True) -> Path:
    """Rewrite a folder's sentence-transformers metadata in the hub format, in place; weights stay as they are.
    With ``module_types=False`` the pooling and length configs are rewritten and ``modules.json`` is left alone."""
    mode = pooling_mode(folder)
    if module_types:
        modules = json.loads((folder / "modules.json").read_text())
        for module in modules:
            module["type"] = "sentence_transformers.models." + module["type"].rsplit(".", 1)[-1]
        (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    pooling = {"word_embedding_dimension": HIDDEN, **{key: key == HUB_POOLING_KEYS[mode]
                                                      for key in HUB_POOLING_KEYS.values()}}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": MAX_LENGTH,
                                                                  "do_lower_case": False}))
    return folder
