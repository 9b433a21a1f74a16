"""The reference caching proxy of the gateway benchmark: an embedding cache the way the common user stack builds it.

One uvicorn process running a FastAPI app; ``POST /embed`` takes TEI's ``{"inputs": ..., "truncate": ...}``
body (a pydantic model) and answers through a pydantic ``List[List[float]]`` response model. Each text's
point id is a UUID made of the first 16 bytes of its SHA-256; the vectors live in qdrant-client's
in-memory local mode (``QdrantClient(":memory:")``), in one Cosine collection. A request retrieves all its
ids in one ``retrieve(ids, with_vectors=True)``; the misses are sent to the worker in batches of 32, one
after another, and then upserted (with the text as payload). ``GET /health`` answers 200 once the
collection exists.

Written plainly on purpose, as a user would: an ``async def`` endpoint that calls the synchronous
client inline (local mode is in-process, CPU-bound work, and not thread-safe), ``httpx.AsyncClient``
for the worker, no request deduplication, no single-flight. It is the yardstick
``benchmarks/gateway.py`` measures the gateway against, not a component of embedfleet.

    python benchmarks/reference_proxy.py --port 8090 --upstream http://127.0.0.1:8081
"""

from __future__ import annotations

import argparse
import hashlib
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel
from qdrant_client import QdrantClient, models

COLLECTION = "embeddings"
UPSTREAM_BATCH = 32


class EmbedRequest(BaseModel):
    """TEI's /embed body (the fields this proxy uses)."""

    inputs: str | list[str]
    truncate: bool | None = None
    normalize: bool = True


def point_id(text: str) -> str:
    """The text's point id: a UUID of the first 16 bytes of its SHA-256."""
    return str(uuid.UUID(bytes=hashlib.sha256(text.encode("utf-8")).digest()[:16]))


def create_app(upstream: str) -> FastAPI:
    """The proxy in front of one worker."""
    state: dict[str, object] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with httpx.AsyncClient(base_url=upstream, timeout=60.0) as http:
            info = (await http.get("/info")).json()
            qdrant = QdrantClient(":memory:")
            qdrant.create_collection(COLLECTION, vectors_config=models.VectorParams(
                size=int(info["dimension"]), distance=models.Distance.COSINE))
            state.update(http=http, qdrant=qdrant)
            try:
                yield
            finally:
                qdrant.close()

    app = FastAPI(title="reference embedding cache", lifespan=lifespan)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/embed", response_model=list[list[float]])  # typing.List[List[float]] in older code: the same model
    async def embed(req: EmbedRequest) -> list[list[float]]:
        http: httpx.AsyncClient = state["http"]  # type: ignore[assignment]
        qdrant: QdrantClient = state["qdrant"]  # type: ignore[assignment]
        texts = [req.inputs] if isinstance(req.inputs, str) else req.inputs
        if not texts:
            raise HTTPException(400, "empty inputs")
        ids = [point_id(t) for t in texts]
        found = {str(p.id): p.vector for p in qdrant.retrieve(COLLECTION, ids=ids, with_vectors=True)}
        missing = [i for i, pid in enumerate(ids) if pid not in found]
        new_points = []
        for start in range(0, len(missing), UPSTREAM_BATCH):
            chunk = missing[start:start + UPSTREAM_BATCH]
            body: dict[str, Any] = {"inputs": [texts[i] for i in chunk], "normalize": req.normalize}
            if req.truncate is not None:
                body["truncate"] = req.truncate
            r = await http.post("/embed", json=body)
            if r.status_code != 200:
                raise HTTPException(r.status_code, r.text)
            for i, vector in zip(chunk, r.json(), strict=True):
                found[ids[i]] = vector
                new_points.append(models.PointStruct(id=ids[i], vector=vector, payload={"text": texts[i]}))
        if new_points:
            qdrant.upsert(COLLECTION, points=new_points)
        return [found[pid] for pid in ids]  # type: ignore[misc]

    return app


def main(argv: Sequence[str] | None = None) -> None:
    """Serve on 127.0.0.1 until SIGTERM or Ctrl-C."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="the worker's URL")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    uvicorn.run(create_app(args.upstream), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
