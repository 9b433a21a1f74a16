"""Response bodies of the gateway's embedding routes, joined from each cache entry's rendered bytes."""

from __future__ import annotations

import orjson

from embedfleet.gateway.service import EmbedResult


def cache_headers(result: EmbedResult) -> dict[str, str]:
    """What the cache did: ``X-Cache: hit|miss|partial`` and the unique inputs it answered or not."""
    return {"x-cache": result.cache_status, "x-cache-hits": str(result.hits), "x-cache-misses": str(result.misses)}


def render_embed(result: EmbedResult) -> bytes:
    """The /embed body: the vectors as a JSON array of arrays, byte for byte what ``orjson.dumps`` writes
    for the float32 matrix, joined from each entry's (cached) JSON with one copy."""
    rows = result.json_rows()
    parts = [b"["]
    for row in rows:
        parts += (row, b",")
    if rows:
        parts.pop()
    parts.append(b"]")
    return b"".join(parts)


def render_openai(result: EmbedResult, model: str, base64: bool) -> bytes:
    """The /v1/embeddings body, byte for byte what ``orjson.dumps`` writes for the response object.

    ``usage`` counts every input's tokens, hits included (each cache entry keeps its input's count), so
    the body is the same whether the cache answered or a worker did.
    """
    parts = [b'{"object":"list","data":[']
    for i, row in enumerate(result.b64_rows() if base64 else result.json_rows()):
        parts += (b'{"object":"embedding","index":%d,"embedding":' % i, row, b"},")
    if len(parts) > 1:
        parts[-1] = b"}"  # the last object's closing brace, without the comma
    usage = b'"usage":{"prompt_tokens":%d,"total_tokens":%d}}' % (result.tokens, result.tokens)
    parts += (b'],"model":', orjson.dumps(model), b",", usage)
    return b"".join(parts)
