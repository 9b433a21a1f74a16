"""Keys change with every output-changing input; values detect corruption and expiry."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from embedfleet.cache import EmbedParams, ModelFingerprint, cache_key, codec, decode, encode
from embedfleet.cache.keys import KEY_BYTES, MODEL_TAG_BYTES

MODEL = ModelFingerprint("sentence-transformers/all-MiniLM-L6-v2", "aad5016", "embedding", "mean")
PARAMS = EmbedParams()


def test_key_shape_and_stability() -> None:
    key = cache_key(MODEL, PARAMS, "hello")
    assert len(key) == KEY_BYTES
    assert key[:MODEL_TAG_BYTES] == MODEL.tag
    assert cache_key(MODEL, PARAMS, "hello") == key


@pytest.mark.parametrize("change", [
    {"model_id": "BAAI/bge-small-en-v1.5"}, {"revision": "other"}, {"revision": None}, {"task": "sparse"},
    {"pooling": "cls"},
])
def test_any_model_change_changes_the_key(change: dict[str, object]) -> None:
    other = dataclasses.replace(MODEL, **change)  # type: ignore[arg-type]
    assert cache_key(other, PARAMS, "hello") != cache_key(MODEL, PARAMS, "hello")


@pytest.mark.parametrize("change", [
    {"normalize": False}, {"truncate": True}, {"truncation_direction": "left"}, {"prompt_name": "query"},
    {"prompt_name": ""}, {"dimensions": 128},
])
def test_any_parameter_change_changes_the_key(change: dict[str, object]) -> None:
    other = dataclasses.replace(PARAMS, **change)  # type: ignore[arg-type]
    assert cache_key(MODEL, other, "hello") != cache_key(MODEL, PARAMS, "hello")


def test_texts_are_exact() -> None:
    keys = {cache_key(MODEL, PARAMS, t) for t in ["hello", "hello ", "Hello", "héllo", "he\u0301llo", ""]}
    assert len(keys) == 6
    # Field boundaries cannot be forged by moving text between fields.
    assert cache_key(MODEL, EmbedParams(prompt_name="a"), "b") != cache_key(MODEL, EmbedParams(prompt_name="ab"), "")


def test_codec_round_trips_exact_bytes() -> None:
    v = np.random.default_rng(0).standard_normal(384).astype(np.float32)
    back = decode(encode(v))
    assert back is not None and back.tobytes() == v.tobytes()
    unnormalised = v * 7.5
    assert decode(encode(unnormalised)).tobytes() == unnormalised.tobytes()  # type: ignore[union-attr]


def test_corrupt_torn_or_expired_values_are_misses() -> None:
    blob = bytearray(encode(np.arange(8, dtype=np.float32), expires_at=0))
    assert decode(bytes(blob)) is not None
    flipped = bytearray(blob)
    flipped[-1] ^= 0x01
    assert decode(bytes(flipped)) is None
    assert decode(bytes(blob[:-4])) is None  # torn
    assert decode(b"garbage") is None
    assert decode(None) is None
    assert decode(b"XXXX" + bytes(blob[4:])) is None
    expiring = encode(np.ones(4, dtype=np.float32), expires_at=1000.0)
    assert decode(expiring, now=999.0) is not None
    assert decode(expiring, now=1000.0) is None


def test_keys_of_stored_entries_never_change() -> None:
    # Persistent stores hold entries under these keys: a changed hash input is a cold cache for everyone.
    # (Schema 2 added the precision; the schema-1 key of these inputs was e4547a0b...235d01f.)
    key = cache_key(ModelFingerprint("a", "b", "embedding", "mean", "float32"), EmbedParams(prompt_name="q"), "héllo")
    assert key.hex() == "afce7f4f0c9cb7be40ff6516592c005255bfb0bee5a4cdbb326c46a0f026721bdda24a95a2f27cff"


def test_precisions_never_share_entries() -> None:
    keys = {cache_key(ModelFingerprint("a", "b", "embedding", "mean", precision), EmbedParams(), "text")
            for precision in (None, "float32", "float16", "bfloat16", "int8")}
    assert len(keys) == 5
    info = {"model_id": "a", "model_sha": "b", "model_type": {"embedding": {"pooling": "mean"}}, "model_dtype": "int8"}
    assert ModelFingerprint.from_info(info) == ModelFingerprint("a", "b", "embedding", "mean", "int8")


def test_values_keep_the_token_count() -> None:
    blob = encode(np.ones(4, dtype=np.float32), tokens=42)
    assert _tokens(blob) == 42 and decode(blob) is not None
    forged = bytearray(blob)
    forged[8] ^= 0x01  # the token count is under the checksum too
    assert decode(bytes(forged)) is None


def test_version_1_values_still_read() -> None:
    # Values written before token counts existed stay valid (a cache of millions of vectors stays warm).
    floats = np.arange(6, dtype=np.float32).tobytes()
    v1 = codec.HEADER_V1.pack(b"EFv1", 6, 0.0, codec._checksum(1, 6, 0, 0.0, floats)) + floats
    back = decode(v1)
    assert back is not None and back.tobytes() == floats and _tokens(v1) == 0
    assert decode(v1[:-1]) is None
    assert decode(v1[:-4] + b"\x00\x00\x80\x7f") is None  # a changed float fails the version 1 checksum


def _tokens(blob: bytes) -> int:
    fields = codec.fields(blob)
    assert fields is not None
    return fields.tokens
