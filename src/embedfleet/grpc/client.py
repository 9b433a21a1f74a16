"""Client-side helpers for the gateway's gRPC services: method paths, pre-serialised requests and readers
of the answers (the gRPC benchmark uses them; so can load generators). Calls made with these paths and no
serializers send and receive bytes, so a load generator spends nothing on protobuf objects per call."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from embedfleet.grpc.proto import tei_multiplexer_pb2 as mx
from embedfleet.grpc.proto import tei_pb2 as pb

EMBED = "/tei.v1.Embed/Embed"
EMBED_STREAM = "/tei.v1.Embed/EmbedStream"
EMBED_ARROW = "/tei_multiplexer.v1.TeiMultiplexer/EmbedArrow"
EMBED_SPARSE_ARROW = "/tei_multiplexer.v1.TeiMultiplexer/EmbedSparseArrow"


def channel_options(max_message_bytes: int = 256 * 1024 * 1024) -> list[tuple[str, int]]:
    """Channel options for large (Arrow) messages both ways."""
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)]


def embed_request(text: str, normalize: bool = True) -> bytes:
    """A serialised ``tei.v1.EmbedRequest``."""
    return pb.EmbedRequest(inputs=text, normalize=normalize).SerializeToString()


def embed_vector(answer: bytes) -> np.ndarray:
    """The vector of a serialised ``tei.v1.EmbedResponse``."""
    return np.asarray(pb.EmbedResponse.FromString(answer).embeddings, dtype=np.float32)


def arrow_batch(texts: Sequence[str], compression: str | None = None) -> bytes:
    """An Arrow IPC stream with the ``text`` column (``compression``: None, "lz4" or "zstd")."""
    table = pa.table({"text": pa.array(list(texts), type=pa.string())})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression=compression)) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue())


def embed_arrow_request(texts: Sequence[str], *, model: str | None = None, normalize: bool = True,
                        noop: bool = False, compression: str | None = None) -> bytes:
    """A serialised ``tei_multiplexer.v1.EmbedArrowRequest`` (``model``: a pool name or model id)."""
    target = mx.Target(model_id=model) if model else None
    return mx.EmbedArrowRequest(target=target, arrow_ipc=arrow_batch(texts, compression), normalize=normalize,
                                noop=noop).SerializeToString()


def arrow_embeddings(answer: bytes) -> np.ndarray:
    """The ``[rows, dim]`` float32 matrix of a serialised ``EmbedArrowResponse``."""
    table = pa.ipc.open_stream(mx.EmbedArrowResponse.FromString(answer).arrow_ipc).read_all()
    column = table.column("embeddings").combine_chunks()
    return np.asarray(column.flatten(), dtype=np.float32).reshape(len(column), column.type.list_size)
