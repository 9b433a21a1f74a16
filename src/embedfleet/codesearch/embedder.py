"""An embedfleet gateway (or worker) over HTTP: embeddings for many texts with ``concurrency`` requests in
flight, and reranking through a reranker pool (TEI's ``/rerank``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import httpx

from embedfleet.codesearch.errors import CodeSearchError


class Embedder:
    """Use as ``async with Embedder(url) as e: await e.embed(texts)``."""

    def __init__(self, url: str, *, api_key: str | None = None, model: str | None = None,
                 reranker: str | None = None, concurrency: int = 4, batch_size: int = 32,
                 timeout: float = 300.0) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.reranker = reranker
        self.concurrency = concurrency
        self.batch_size = batch_size
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout,
                                         limits=httpx.Limits(max_connections=concurrency + 2))

    async def __aenter__(self) -> Embedder:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._client.aclose()

    async def _post(self, route: str, body: dict[str, Any], model: str | None) -> Any:
        headers = {"x-model": model} if model else {}
        try:
            response = await self._client.post(route, json=body, headers=headers)
        except httpx.HTTPError as exc:
            raise CodeSearchError(f"{self.url}{route}: {type(exc).__name__}: {exc}") from None
        if response.status_code != 200:
            try:
                message = response.json().get("error", response.text)
            except ValueError:
                message = response.text
            raise CodeSearchError(f"{self.url}{route} answered {response.status_code}: {message}")
        return response.json()

    async def embed(self, texts: Sequence[str], progress: Callable[[int], None] | None = None) -> list[list[float]]:
        """One normalised vector per text (cut to the model's length), in order; ``progress`` gets the count
        of each batch done. Batches of ``batch_size`` go out ``concurrency`` at a time."""
        gate = asyncio.Semaphore(self.concurrency)

        async def batch(first: int) -> list[list[float]]:
            part = list(texts[first:first + self.batch_size])
            async with gate:
                vectors: list[list[float]] = await self._post(
                    "/embed", {"inputs": part, "truncate": True, "normalize": True}, self.model)
            if len(vectors) != len(part):
                raise CodeSearchError(f"{self.url}/embed gave {len(vectors)} vectors for {len(part)} texts")
            if progress is not None:
                progress(len(part))
            return vectors

        results = await asyncio.gather(*(batch(i) for i in range(0, len(texts), self.batch_size)))
        return [vector for part in results for vector in part]

    async def rerank(self, query: str, texts: Sequence[str]) -> list[float]:
        """The reranker's score of each text against ``query``, in the texts' order (batches of
        ``batch_size``, ``concurrency`` at a time: servers cap a request's texts)."""
        gate = asyncio.Semaphore(self.concurrency)
        scores = [0.0] * len(texts)

        async def batch(first: int) -> None:
            part = list(texts[first:first + self.batch_size])
            async with gate:
                ranked = await self._post("/rerank", {"query": query, "texts": part, "truncate": True},
                                          self.reranker)
            for item in ranked:
                scores[first + int(item["index"])] = float(item["score"])

        await asyncio.gather(*(batch(i) for i in range(0, len(texts), self.batch_size)))
        return scores

    async def dimension(self) -> int:
        """The embedding size, from one embedding."""
        return len((await self.embed(["dimension probe"]))[0])
