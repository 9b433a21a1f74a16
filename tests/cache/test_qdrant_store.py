"""Qdrant store, in qdrant-client's local mode: exact round trips, Dot collections per model, misses on tampering."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from qdrant_client import models

from embedfleet.cache import EmbedParams, ModelFingerprint, cache_key, codec, decode, encode
from embedfleet.cache.codec import HEADER_BYTES
from embedfleet.cache.keys import KEY_BYTES
from embedfleet.cache.qdrant_store import QdrantStore, client_args, collection_name, point_id

A = ModelFingerprint("model-a", "1", "embedding", "mean")
B = ModelFingerprint("model-b", "1", "embedding", "mean")
DIM = 16


def _entries(model: ModelFingerprint, n: int, dim: int = DIM, scale: float = 1.0, normalise: bool = False,
             expires_at: float = 0.0, tokens: int = 0) -> list[tuple[bytes, bytes]]:
    rng = np.random.default_rng(len(model.model_id) + n + dim)
    out = []
    for i in range(n):
        vector = scale * rng.standard_normal(dim).astype(np.float32)
        if normalise:
            vector = vector / np.linalg.norm(vector)
        out.append((cache_key(model, EmbedParams(), f"text {i} {dim}"), encode(vector.astype(np.float32), expires_at,
                                                                                  tokens)))
    return out


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "qdrant"


@pytest.fixture
def store(path: Path) -> Iterator[QdrantStore]:
    store = QdrantStore(f"qdrant+local://{path}")
    yield store
    asyncio.run(store.close())  # idempotent: tests may have closed it already


def test_get_set_delete_stats(store: QdrantStore) -> None:
    async def run() -> None:
        a, b = _entries(A, 5), _entries(B, 3, dim=8)
        assert await store.get_many([k for k, _ in a]) == [None] * 5  # no collection yet: misses
        await store.set_many(a + b)
        got = await store.get_many([k for k, _ in a] + [A.tag + b"\0" * 32, b"\0" * 40, b"short"])
        assert got[:5] == [v for _, v in a] and got[5:] == [None, None, None]
        stats = await store.stats()
        assert stats.entries == 8
        assert stats.per_model[A.tag.hex()] == (5, 5 * (KEY_BYTES + HEADER_BYTES + 4 * DIM))
        assert stats.per_model[B.tag.hex()] == (3, 3 * (KEY_BYTES + HEADER_BYTES + 4 * 8))
        assert stats.bytes == sum(size for _, size in stats.per_model.values())
        assert await store.delete(A.tag) == 5
        assert await store.delete(A.tag) == 0  # already gone
        assert await store.get_many([a[0][0], b[0][0]]) == [None, b[0][1]]
        assert await store.delete() == 3
        assert (await store.stats()).entries == 0
        await store.set_many(a[:1])  # collections come back on the next write
        assert await store.get_many([a[0][0]]) == [a[0][1]]

    asyncio.run(run())


def test_exact_bytes_round_trip_normalised_and_unnormalised(store: QdrantStore) -> None:
    async def run() -> None:
        unit = _entries(A, 20, dim=384, normalise=True, expires_at=time.time() + 3600)
        large = _entries(B, 20, dim=384, scale=37.5)
        special = [(cache_key(A, EmbedParams(), "special"),
                    encode(np.array([0.0, -0.0, 1e-38, 1e-45, 3.4e38, -3.4e38] * 64, dtype=np.float32)))]
        await store.set_many(unit + large + special)
        items = unit + large + special
        got = await store.get_many([k for k, _ in items])
        assert got == [v for _, v in items]  # byte for byte, header included
        for (_, value), blob in zip(items, got, strict=True):
            vector, expected = decode(blob), decode(value)
            assert vector is not None and expected is not None and np.array_equal(vector, expected)
        large_vector = decode(got[20])
        assert large_vector is not None and np.linalg.norm(large_vector) > 100  # stays unnormalised

    asyncio.run(run())


def test_one_dot_collection_per_model(store: QdrantStore) -> None:
    async def run() -> None:
        await store.set_many(_entries(A, 3) + _entries(B, 2, dim=8))

    asyncio.run(run())
    names = {c.name for c in store.client.get_collections().collections}
    assert names == {collection_name(A.tag), collection_name(B.tag)} == {f"embedfleet_{A.tag.hex()}",
                                                                       f"embedfleet_{B.tag.hex()}"}
    for model, dim in ((A, DIM), (B, 8)):
        vectors = store.client.get_collection(collection_name(model.tag)).config.params.vectors
        assert isinstance(vectors, models.VectorParams)
        assert vectors.size == dim and vectors.distance == models.Distance.DOT


def test_points_carry_the_key_and_header_fields(store: QdrantStore) -> None:
    (key, value), = _entries(A, 1, expires_at=1234567890.5, tokens=17)
    asyncio.run(store.set_many([(key, value)]))
    record, = store.client.retrieve(collection_name(A.tag), [point_id(key)], with_vectors=True)
    assert record.payload == {"key": key.hex(), "model_tag": A.tag.hex(), "expires_at": 1234567890.5,
                              "checksum": value[20:28].hex(), "dim": DIM, "tokens": 17}
    assert point_id(key) == str(uuid.UUID(bytes=key[8:24]))
    got, = asyncio.run(store.get_many([key]))
    assert got == value and _tokens(got) == 17


def test_points_of_version_1_values_read_back_as_written(store: QdrantStore) -> None:
    # A cache filled before values carried token counts must stay warm.
    vector = np.arange(1, DIM + 1, dtype=np.float32)
    floats = vector.tobytes()
    v1 = codec.HEADER_V1.pack(codec.MAGIC_V1, DIM, 0.0, codec._checksum(1, DIM, 0, 0.0, floats)) + floats
    assert codec.fields(v1) is not None and _tokens(v1) == 0
    (key, _), = _entries(A, 1)
    asyncio.run(store.set_many([(key, v1)]))
    record, = store.client.retrieve(collection_name(A.tag), [point_id(key)])
    assert record.payload is not None and "tokens" not in record.payload
    got, = asyncio.run(store.get_many([key]))
    assert got == v1 and decode(got) is not None and decode(got).tobytes() == floats  # type: ignore[union-attr]


def test_delete_all_leaves_foreign_collections_alone(store: QdrantStore) -> None:
    foreign = ["reference_stack", "embedfleet_notatag", f"embedfleet_{A.tag.hex()}_old"]
    for name in foreign:
        store.client.create_collection(name, models.VectorParams(size=4, distance=models.Distance.COSINE))
        store.client.upsert(name, [models.PointStruct(id=1, vector=[1.0, 2.0, 3.0, 4.0])])

    async def run() -> None:
        await store.set_many(_entries(A, 4) + _entries(B, 2))
        assert set((await store.stats()).per_model) == {A.tag.hex(), B.tag.hex()}  # only ours
        assert await store.delete() == 6

    asyncio.run(run())
    assert sorted(c.name for c in store.client.get_collections().collections) == sorted(foreign)
    assert all(store.client.count(name).count == 1 for name in foreign)


def test_tampered_points_read_as_misses(store: QdrantStore) -> None:
    entries = _entries(A, 5)
    asyncio.run(store.set_many(entries))
    name = collection_name(A.tag)
    records = {r.payload["key"]: r for r in store.client.retrieve(  # type: ignore[index]
        name, [point_id(k) for k, _ in entries], with_payload=True, with_vectors=True)}

    def rewrite(of: bytes, vector: list[float] | None = None, **changes: object) -> None:
        record = records[of.hex()]
        assert record.payload is not None and isinstance(record.vector, list)
        store.client.upsert(name, [models.PointStruct(id=point_id(of), vector=vector or record.vector,
                                                      payload={**record.payload, **changes})])

    (k0, _), (k1, _), (k2, _), (k3, _), (k4, v4) = entries
    rewrite(k0, checksum="00" * 8)  # wrong checksum
    doubled = [2 * float(x) for x in records[k1.hex()].vector or []]  # type: ignore[arg-type]
    rewrite(k1, vector=doubled)  # a changed vector
    rewrite(k2, key=k4.hex())  # a point claiming another key (an id collision): a miss for both keys' ids
    rewrite(k3, expires_at="never")  # malformed payload
    assert asyncio.run(store.get_many([k0, k1, k2, k3, k4])) == [None, None, None, None, v4]


def test_malformed_values_are_never_stored(store: QdrantStore) -> None:
    good = _entries(A, 2)
    bad_checksum = bytearray(good[1][1])
    bad_checksum[-1] ^= 1
    garbage = [
        (good[0][0], b"corrupt"),
        (good[1][0], bytes(bad_checksum)),
        (cache_key(A, EmbedParams(), "empty"), encode(np.zeros(0, dtype=np.float32))),
        (cache_key(A, EmbedParams(), "nan"), encode(np.array([1.0, np.nan] * 8, dtype=np.float32))),
        (cache_key(B, EmbedParams(), "inf"), encode(np.array([np.inf] * 16, dtype=np.float32))),
        (b"short key", good[0][1]),
    ]

    async def run() -> None:
        await store.set_many(garbage)
        assert store.skipped_writes == len(garbage)
        assert await store.get_many([k for k, _ in garbage]) == [None] * len(garbage)
        assert store.client.get_collections().collections == []  # nothing written, nothing created
        await store.set_many(good)
        await store.set_many([(good[0][0], b"corrupt")])  # does not replace a good entry with garbage
        assert await store.get_many([k for k, _ in good]) == [v for _, v in good]

    asyncio.run(run())


def test_shorter_vectors_round_trip_padded_longer_ones_are_skipped(store: QdrantStore) -> None:
    first, shorter, longer = _entries(A, 3, dim=DIM), _entries(A, 2, dim=DIM // 2), _entries(A, 2, dim=DIM * 2)

    async def run() -> None:
        await store.set_many(first)
        await store.set_many(shorter + longer)  # e.g. requests with `dimensions`, or another model's size
        assert store.skipped_writes == 2
        got = await store.get_many([k for k, _ in first + shorter + longer])
        assert got == [v for _, v in first + shorter] + [None, None]  # byte-exact, cut back to their length
        stored = store.client.retrieve(collection_name(A.tag), [point_id(shorter[0][0])], with_vectors=True)
        vector = stored[0].vector
        assert isinstance(vector, list) and len(vector) == DIM and vector[DIM // 2:] == [0.0] * (DIM // 2)

    asyncio.run(run())


def test_the_native_dimension_sizes_the_collection_even_if_a_shorter_value_comes_first(
        store: QdrantStore) -> None:
    shorter, native = _entries(A, 2, dim=DIM // 2), _entries(A, 3, dim=DIM)
    store.model_dimension(A.tag, DIM)  # what the gateway tells it from the upstream's /info

    async def run() -> None:
        await store.set_many(shorter)
        await store.set_many(native)
        assert store.skipped_writes == 0
        assert await store.get_many([k for k, _ in shorter + native]) == [v for _, v in shorter + native]

    asyncio.run(run())


def test_a_collection_deleted_behind_our_back_is_recreated(store: QdrantStore) -> None:
    a = _entries(A, 3)
    asyncio.run(store.set_many(a[:2]))
    store.client.delete_collection(collection_name(A.tag))  # as another gateway's delete would

    async def run() -> None:
        assert await store.get_many([k for k, _ in a]) == [None] * 3
        await store.set_many(a[2:])
        assert await store.get_many([k for k, _ in a]) == [None, None, a[2][1]]

    asyncio.run(run())


def test_entries_survive_close_and_reopen(path: Path) -> None:
    entries = _entries(A, 10, scale=37.5) + _entries(B, 5)

    async def write() -> None:
        store = QdrantStore(f"qdrant+local://{path}")
        await store.set_many(entries)
        await store.close()
        await store.close()  # idempotent

    async def read() -> None:
        store = QdrantStore(f"qdrant+local://{path}")
        assert await store.get_many([k for k, _ in entries]) == [v for _, v in entries]
        assert (await store.stats()).entries == 15
        await store.set_many(_entries(A, 11, scale=37.5)[10:])  # an existing collection takes writes
        assert (await store.stats()).per_model[A.tag.hex()][0] == 11
        await store.close()

    asyncio.run(write())
    asyncio.run(read())


def test_a_local_path_is_locked_to_one_client(path: Path) -> None:
    store = QdrantStore(f"qdrant+local://{path}")
    with pytest.raises(RuntimeError, match="already accessed"):
        QdrantStore(f"qdrant+local://{path}")
    asyncio.run(store.close())
    asyncio.run(QdrantStore(f"qdrant+local://{path}").close())  # free again once closed


def test_in_memory_local_store() -> None:
    async def run() -> None:
        store = QdrantStore("qdrant+local://:memory:")
        entries = _entries(A, 3)
        await store.set_many(entries)
        assert await store.get_many([k for k, _ in entries]) == [v for _, v in entries]
        await store.close()

    asyncio.run(run())


def test_urls() -> None:
    assert client_args("qdrant://db.internal:7000") == {
        "host": "db.internal", "port": 7000, "https": False, "api_key": None, "prefix": None, "timeout": None,
        "check_compatibility": False}
    args = client_args("qdrants://db.example.com/qdrant?api_key=secret", timeout=5)
    assert (args["host"], args["port"], args["https"], args["api_key"], args["prefix"], args["timeout"]) == (
        "db.example.com", 6333, True, "secret", "qdrant", 5)
    assert client_args("qdrants://h:1?api_key=from-url", api_key="given")["api_key"] == "given"
    local = {"path": "/var/cache/q", "force_disable_check_same_thread": True}
    assert client_args("qdrant+local:///var/cache/q") == local
    assert client_args("qdrant+local://:memory:")["location"] == ":memory:"
    for bad in ("qdrant+local://", "qdrant://", "redis://h:6379", "qdrant://h:notaport", "http://h:6333"):
        with pytest.raises(ValueError):
            client_args(bad)
    # A server store connects lazily: constructing and closing one needs no server.
    store = QdrantStore("qdrant://127.0.0.1:9", timeout=1)
    assert not store.local
    asyncio.run(store.close())


def _tokens(blob: bytes) -> int:
    fields = codec.fields(blob)
    assert fields is not None
    return fields.tokens
