"""Arrow IPC batches: the TEI manager's ``EmbedArrow`` / ``EmbedSparseArrow``, and their HTTP twins.

A request is an Arrow IPC stream with a utf8 (or large_utf8) column ``text``, in one or more record
batches of that one schema. The answer is an IPC stream of one record batch, in row order:
``embeddings`` as ``FixedSizeList<float32, dim>``, or ``sparse_embeddings`` as
``List<Struct<index: uint32, value: float32>>``; LZ4_FRAME-compressed when the request was compressed.
Every bad input is an ``INVALID_ARGUMENT`` (422 over HTTP) that says what is wrong and, where a row is at
fault, which: nulls are refused, never dropped (rows never shift).

Dense batches go through the gateway's embedding service (cache, single-flight, splitting over the
replicas) with their own row limit instead of ``max_client_batch_size``; sparse ones are cut into
calls of the replicas' batch size, sent in parallel.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import pyarrow as pa

from embedfleet.cache.memory import VECTOR
from embedfleet.engine import errors
from embedfleet.engine.errors import EngineError
from embedfleet.gateway.service import CachePolicy, EmbeddingService

MEDIA_TYPE = "application/vnd.apache.arrow.stream"
"""The HTTP content type of an Arrow IPC stream, in and out."""

TEXT = "text"
_RECORD_BATCH = 3  # flatbuffers MessageHeader.RecordBatch
_COMPRESSED = pa.ipc.IpcWriteOptions(compression="lz4")
_PLAIN = pa.ipc.IpcWriteOptions()
_SPARSE = pa.list_(pa.struct([("index", pa.uint32()), ("value", pa.float32())]))


@dataclass(frozen=True)
class TextBatch:
    """The texts of a request, in row order, and whether its record batches were compressed."""

    texts: list[str]
    compressed: bool


def _table_field(buf: memoryview, table: int, field: int) -> int | None:
    """The position of a flatbuffers table's field (None when absent): the table starts with a signed
    offset back to its vtable, whose entries after two 16-bit sizes are the fields' 16-bit offsets."""
    vtable = table - struct.unpack_from("<i", buf, table)[0]
    vtable_size = struct.unpack_from("<H", buf, vtable)[0]
    entry = 4 + 2 * field
    if entry + 2 > vtable_size:
        return None
    offset: int = struct.unpack_from("<H", buf, vtable + entry)[0]
    return table + offset if offset else None


def _is_compressed(metadata: memoryview) -> bool:
    """Whether a record batch message (its flatbuffers metadata, Arrow's Message.fbs) carries a
    ``BodyCompression``: Message field 2 (header) is a RecordBatch, whose field 3 is the compression."""
    root = struct.unpack_from("<I", metadata, 0)[0]
    kind = _table_field(metadata, root, 1)
    header = _table_field(metadata, root, 2)
    if kind is None or header is None or metadata[kind] != _RECORD_BATCH:
        return False
    batch = header + struct.unpack_from("<I", metadata, header)[0]
    return _table_field(metadata, batch, 3) is not None


def _invalid(detail: str) -> EngineError:
    return errors.validation(detail)


def read_texts(data: bytes, max_rows: int) -> TextBatch:
    """The ``text`` column of an Arrow IPC stream; Validation (or Empty) errors that say what is wrong."""
    if not data:
        raise errors.empty("the Arrow IPC stream is empty: send a stream with a utf8 column `text`")
    try:
        source = pa.BufferReader(pa.py_buffer(data))
        reader = pa.ipc.MessageReader.open_stream(source)
        first = reader.read_next_message()
        if first is None or first.type != "schema":
            raise _invalid("the Arrow IPC stream does not start with a schema message")
        schema = pa.ipc.read_schema(first)
        index = schema.get_field_index(TEXT)
        if index < 0:
            names = ", ".join(f"`{n}`" for n in schema.names) or "none"
            raise _invalid(f"the Arrow batch has no column `{TEXT}` (its columns: {names})")
        if schema.names.count(TEXT) > 1:
            raise _invalid(f"the Arrow batch has more than one column `{TEXT}`")
        kind = schema.field(index).type
        if kind not in (pa.string(), pa.large_string()):
            raise _invalid(f"column `{TEXT}` is {kind}, not utf8 or large_utf8")
        texts: list[str] = []
        compressed = False
        for message in reader:
            if message.type != "record batch":
                raise _invalid(f"unexpected {message.type} message after row {len(texts)}: one schema, then "
                               "record batches of it")
            compressed |= _is_compressed(memoryview(message.metadata))
            column = pa.ipc.read_record_batch(message, schema).column(index)
            if column.null_count:
                row = len(texts) + column.is_null().index(True).as_py()
                raise _invalid(f"row {row}: `{TEXT}` is null (nulls are refused, not dropped)")
            texts.extend(column.to_pylist())
            if len(texts) > max_rows:
                raise _invalid(f"the Arrow batch has more than {max_rows} rows (the gateway's arrow_max_rows)")
        if source.tell() < len(data):
            raise _invalid(f"{len(data) - source.tell()} bytes follow the end of the Arrow IPC stream (after row "
                           f"{len(texts)}): send one stream of one schema")
    except (pa.ArrowException, OSError, struct.error, IndexError) as exc:
        raise _invalid(f"the Arrow IPC stream cannot be read: {exc}") from None
    if not texts:
        raise errors.empty("the Arrow batch has no rows")
    return TextBatch(texts, compressed)


def _write(batch: pa.RecordBatch, compressed: bool) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema, options=_COMPRESSED if compressed else _PLAIN) as writer:
        writer.write_batch(batch)
    return bytes(sink.getvalue())


def write_dense(matrix: np.ndarray, compressed: bool) -> bytes:
    """One record batch: ``embeddings`` as FixedSizeList<float32, dim>."""
    dim = matrix.shape[1]
    values = pa.array(np.ascontiguousarray(matrix, dtype=np.float32).reshape(-1), type=pa.float32())
    column = pa.FixedSizeListArray.from_arrays(values, dim)
    return _write(pa.RecordBatch.from_arrays([column], names=["embeddings"]), compressed)


def write_sparse(rows: list[list[dict[str, Any]]], compressed: bool) -> bytes:
    """One record batch: ``sparse_embeddings`` as List<Struct<index: uint32, value: float32>>."""
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    offsets[1:] = np.cumsum([len(r) for r in rows])
    flat = [v for row in rows for v in row]
    indices = pa.array([v["index"] for v in flat], type=pa.uint32())
    values = pa.array([v["value"] for v in flat], type=pa.float32())
    items = pa.StructArray.from_arrays([indices, values], names=["index", "value"])
    column = pa.ListArray.from_arrays(pa.array(offsets), items, type=_SPARSE)
    return _write(pa.RecordBatch.from_arrays([column], names=["sparse_embeddings"]), compressed)


def _by_row(exc: EngineError) -> EngineError:
    """An error about one input, naming it as the Arrow row it is."""
    if exc.input is None:
        return exc
    return EngineError(exc.kind, f"{exc.detail} (row {exc.input})")


def _dimension(service: EmbeddingService) -> int:
    info = service.pool.info
    dim = info.raw.get("dimension") if info is not None else None
    if not isinstance(dim, int) or dim <= 0:
        raise errors.unhealthy(f"the dimension of model {service.pool.name!r} is not known yet (no /info)")
    return dim


async def embed_arrow(service: EmbeddingService, data: bytes, *, truncate: bool | None, normalize: bool,
                      noop: bool, max_rows: int, policy: CachePolicy) -> bytes:
    """An ``EmbedArrow`` request: dense vectors of every row, through the cache (zeros with ``noop``)."""
    batch = read_texts(data, max_rows)
    if noop:
        matrix = np.zeros((len(batch.texts), _dimension(service)), dtype=np.float32)
        return write_dense(matrix, batch.compressed)
    try:
        result = await service.embed(batch.texts, normalize=normalize, truncate=truncate, policy=policy,
                                     max_inputs=max_rows)
    except EngineError as exc:
        raise _by_row(exc) from None
    matrix = np.stack([cast(np.ndarray, row[VECTOR]) for row in result.rows])  # hits and answers have vectors
    return write_dense(matrix, batch.compressed)


async def embed_sparse_arrow(service: EmbeddingService, data: bytes, *, truncate: bool | None, noop: bool,
                             max_rows: int) -> bytes:
    """An ``EmbedSparseArrow`` request: the SPLADE vector of every row (empty ones with ``noop``)."""
    batch = read_texts(data, max_rows)
    if noop:
        return write_sparse([[] for _ in batch.texts], batch.compressed)
    body: dict[str, Any] = {} if truncate is None else {"truncate": truncate}
    try:
        rows = await service.forward_batched("/embed_sparse", body, batch.texts)
    except EngineError as exc:
        raise _by_row(exc) from None
    return write_sparse(rows, batch.compressed)
