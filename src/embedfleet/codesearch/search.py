"""Answer a query: embed it, take the best chunks by hybrid search (nearest by embedding and best by lexical
terms, fused; of a repository and language, when asked), and with a reranker re-order a wider set of
candidates by the reranker's score."""

from __future__ import annotations

import dataclasses

from embedfleet.codesearch.embedder import Embedder
from embedfleet.codesearch.errors import CodeSearchError
from embedfleet.codesearch.store import CodeStore, Hit

RERANK_CANDIDATES = 4
"""With a reranker, this many times ``limit`` candidates are scored."""


async def search(store: CodeStore, embedder: Embedder, query: str, limit: int = 10, *, repo: str | None = None,
                 language: str | None = None, rerank: bool = False, hybrid: bool = True) -> list[Hit]:
    """The best ``limit`` chunks for ``query``; with ``rerank``, ordered by the reranker's score (which
    their ``score`` then is); ``hybrid=False`` searches by embedding alone."""
    query = query.strip()
    if not query:
        raise CodeSearchError("the query is empty")
    if not 1 <= limit <= 1000:
        raise CodeSearchError("the number of results must be between 1 and 1000")
    vector = (await embedder.embed([query]))[0]
    hits = await store.search(vector, limit * RERANK_CANDIDATES if rerank else limit, repo=repo, language=language,
                              text=query if hybrid else None)
    if not rerank or not hits:
        return hits
    scores = await embedder.rerank(query, [f"{h.path} {h.symbol or ''}\n{h.text}" for h in hits])
    ranked = sorted(zip(scores, hits, strict=True), key=lambda pair: pair[0], reverse=True)[:limit]
    return [dataclasses.replace(hit, score=score) for score, hit in ranked]
