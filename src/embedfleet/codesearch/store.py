"""Chunks in Qdrant: one point per chunk with two vectors, its embedding (``dense``) and its lexical terms
(sparse, ``lexical``, BM25-weighted with Qdrant's IDF modifier: :mod:`embedfleet.codesearch.lexical`), and in
the payload its repository, file, line span, language, symbol, code and the hash of the file it came from
(what incremental indexing compares).

Search is hybrid: the nearest chunks by embedding and the best by lexical score, each list
:data:`PREFETCH_FACTOR` times as long as asked, fused by reciprocal rank (Qdrant's Query API; the same calls
in local mode and on a server). ``hybrid=False`` searches by embedding alone.

The Qdrant URL is the cache's (:func:`embedfleet.cache.qdrant_store.client_args`): ``qdrant://HOST:PORT`` for a
server, ``qdrant+local://PATH`` for qdrant-client's embedded local mode (one process at a time may open a
path). Calls run on one worker thread (local mode is not thread-safe), so the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from qdrant_client import QdrantClient, models

from embedfleet.cache.qdrant_store import client_args
from embedfleet.codesearch import lexical
from embedfleet.codesearch.chunking import Chunk
from embedfleet.codesearch.errors import CodeSearchError

T = TypeVar("T")
_NAMESPACE = uuid.UUID("6f1c2b4e-3a8d-4c55-9e0f-2d7b1a9c8e41")
INDEXED_FIELDS = ("repo", "path", "language")
"""Payload fields with an index on a server (filters and deletions use them)."""
DENSE = "dense"
LEXICAL = "lexical"
"""The names of a point's two vectors: the embedding and the lexical terms."""
PREFETCH_FACTOR = 4
PREFETCH_MIN = 40
"""Hybrid search fuses each kind's best ``max(PREFETCH_MIN, PREFETCH_FACTOR * limit)`` chunks."""


@dataclass(frozen=True)
class Hit:
    """A search result."""

    repo: str
    path: str
    root: str
    language: str
    symbol: str | None
    kind: str
    start_line: int
    end_line: int
    text: str
    score: float

    def as_dict(self) -> dict[str, Any]:
        """The hit as JSON-ready data."""
        return dict(self.__dict__)


@dataclass(frozen=True)
class RepoStatus:
    """What the index holds of one repository."""

    repo: str
    root: str
    files: int
    chunks: int
    languages: dict[str, int]


def point_id(repo: str, path: str, index: int) -> str:
    """The id of a file's ``index``-th chunk."""
    return str(uuid.uuid5(_NAMESPACE, f"{repo}\0{path}\0{index}"))


def _sparse(chunk: Chunk) -> models.SparseVector:
    """A chunk's lexical vector: its context and its code, with its path and symbol as names."""
    indices, values = lexical.document_vector(f"{chunk.context or ''}\n{chunk.text}",
                                              (chunk.path, chunk.symbol or ""))
    return models.SparseVector(indices=indices, values=values)


def _filter(repo: str | None = None, path: str | None = None, language: str | None = None) -> models.Filter | None:
    must: list[models.Condition] = [models.FieldCondition(key=key, match=models.MatchValue(value=value))
                                    for key, value in (("repo", repo), ("path", path), ("language", language))
                                    if value is not None]
    return models.Filter(must=must) if must else None


class CodeStore:
    """The code-search collection; every method is a coroutine run on the store's thread."""

    def __init__(self, url: str, collection: str = "codesearch", api_key: str | None = None) -> None:
        try:
            args = client_args(url, api_key=api_key)
        except ValueError as exc:
            raise CodeSearchError(str(exc)) from None
        self.local = "path" in args or "location" in args
        try:
            self.client = QdrantClient(**args)
        except RuntimeError as exc:  # local mode: the path is open in another process
            raise CodeSearchError(f"cannot open the index at {url}: {exc}") from None
        self.collection = collection
        self._schema_ok = False
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="codesearch-qdrant")

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _exists(self) -> bool:
        return bool(self.client.collection_exists(self.collection))

    def _check_schema(self, dim: int | None = None) -> None:
        """CodeSearchError when the collection is not one this version reads: built before hybrid search (no
        named dense and lexical vectors), or for another embedding size than ``dim``. A good answer is
        remembered (the check is a round trip on a server)."""
        if self._schema_ok and dim is None:
            return
        params = self.client.get_collection(self.collection).config.params
        dense = params.vectors.get(DENSE) if isinstance(params.vectors, dict) else None
        if dense is None or LEXICAL not in (params.sparse_vectors or {}):
            raise CodeSearchError(
                f"the index {self.collection!r} was built by an older embedfleet, without the lexical vectors that "
                f"search now uses: rebuild it (delete the collection, for the local index its folder "
                f"DATA_DIR/qdrant, then run `embedfleet codesearch index` again; unchanged chunks come from the "
                f"embedding cache), or index into a new --collection")
        if dim is not None and dense.size != dim:
            raise CodeSearchError(f"the index {self.collection!r} holds {dense.size}-dimensional vectors, the model "
                                  f"gives {dim}: use another --collection (or the model it was built with)")
        self._schema_ok = True

    def _ensure(self, dim: int) -> None:
        if self._exists():
            self._check_schema(dim)
            return
        self.client.create_collection(
            self.collection, vectors_config={DENSE: models.VectorParams(size=dim, distance=models.Distance.COSINE)},
            sparse_vectors_config={LEXICAL: models.SparseVectorParams(modifier=models.Modifier.IDF)})
        self._schema_ok = True
        if not self.local:
            for field in INDEXED_FIELDS:
                self.client.create_payload_index(self.collection, field, models.PayloadSchemaType.KEYWORD)

    def _manifest(self, repo: str) -> dict[str, str]:
        if not self._exists():
            return {}
        self._check_schema()  # before the indexer changes anything
        files: dict[str, str] = {}
        offset: Any = None
        while True:
            records, offset = self.client.scroll(self.collection, scroll_filter=_filter(repo=repo), limit=1024,
                                                 offset=offset, with_payload=["path", "file_hash"])
            for r in records:
                payload = r.payload or {}
                files[str(payload["path"])] = str(payload["file_hash"])
            if offset is None:
                return files

    async def manifest(self, repo: str) -> dict[str, str]:
        """Path -> content hash of each file of ``repo`` the index holds."""
        return await self._run(self._manifest, repo)

    def _replace(self, repo: str, root: str, path: str, digest: str, chunks: Sequence[Chunk],
                 vectors: Sequence[Sequence[float]]) -> None:
        if vectors:
            self._ensure(len(vectors[0]))
        if self._exists():
            self.client.delete(self.collection, points_selector=models.FilterSelector(
                filter=_filter(repo=repo, path=path) or models.Filter()))
        points = [models.PointStruct(id=point_id(repo, path, i), vector={DENSE: list(vector), LEXICAL: _sparse(c)},
                                     payload={
            "repo": repo, "root": root, "path": c.path, "language": c.language, "symbol": c.symbol, "kind": c.kind,
            "start_line": c.start_line, "end_line": c.end_line, "text": c.text, "file_hash": digest,
        }) for i, (c, vector) in enumerate(zip(chunks, vectors, strict=True))]
        for first in range(0, len(points), 256):
            self.client.upsert(self.collection, points=points[first:first + 256])

    async def replace_file(self, repo: str, root: str, path: str, digest: str, chunks: Sequence[Chunk],
                           vectors: Sequence[Sequence[float]]) -> None:
        """Store a file's chunks in place of what the index held for it."""
        await self._run(self._replace, repo, root, path, digest, chunks, vectors)

    def _delete(self, repo: str, path: str | None) -> None:
        if self._exists():
            self.client.delete(self.collection, points_selector=models.FilterSelector(
                filter=_filter(repo=repo, path=path) or models.Filter()))

    async def delete(self, repo: str, path: str | None = None) -> None:
        """Remove a file of ``repo`` (every file when ``path`` is None)."""
        await self._run(self._delete, repo, path)

    def _search(self, vector: list[float], text: str | None, limit: int, repo: str | None,
                language: str | None) -> list[Hit]:
        if not self._exists():
            return []
        self._check_schema()
        where = _filter(repo=repo, language=language)
        indices, values = lexical.query_vector(text) if text is not None else ([], [])
        if indices:
            depth = max(PREFETCH_MIN, PREFETCH_FACTOR * limit)
            found = self.client.query_points(
                self.collection, limit=limit, with_payload=True, query=models.FusionQuery(fusion=models.Fusion.RRF),
                prefetch=[models.Prefetch(query=vector, using=DENSE, limit=depth, filter=where),
                          models.Prefetch(query=models.SparseVector(indices=indices, values=values), using=LEXICAL,
                                          limit=depth, filter=where)])
        else:
            found = self.client.query_points(self.collection, query=vector, using=DENSE, limit=limit,
                                             query_filter=where, with_payload=True)
        hits = []
        for point in found.points:
            p = point.payload or {}
            hits.append(Hit(repo=str(p["repo"]), path=str(p["path"]), root=str(p.get("root", "")),
                            language=str(p["language"]), symbol=p.get("symbol"), kind=str(p.get("kind", "")),
                            start_line=int(p["start_line"]), end_line=int(p["end_line"]), text=str(p["text"]),
                            score=float(point.score)))
        return hits

    async def search(self, vector: list[float], limit: int, repo: str | None = None, language: str | None = None,
                     text: str | None = None) -> list[Hit]:
        """The best ``limit`` chunks, optionally of one repository and language: with the query's ``text``,
        the chunks nearest to ``vector`` and those best by the text's terms, fused by reciprocal rank (their
        ``score``); without it (or when the text has no terms), the nearest to ``vector`` (cosine)."""
        return await self._run(self._search, vector, text, limit, repo, language)

    def _root_of(self, repo: str, path: str) -> str | None:
        if not self._exists():
            return None
        records, _ = self.client.scroll(self.collection, scroll_filter=_filter(repo=repo, path=path), limit=1,
                                        with_payload=["root"])
        return str((records[0].payload or {}).get("root", "")) or None if records else None

    async def root_of(self, repo: str, path: str) -> str | None:
        """The folder ``repo`` was indexed from, when the index holds ``path`` of it (else None)."""
        return await self._run(self._root_of, repo, path)

    def _status(self) -> list[RepoStatus]:
        if not self._exists():
            return []
        files: dict[str, set[str]] = defaultdict(set)
        chunks: Counter[str] = Counter()
        languages: dict[str, Counter[str]] = defaultdict(Counter)
        roots: dict[str, str] = {}
        offset: Any = None
        while True:
            records, offset = self.client.scroll(self.collection, limit=2048, offset=offset,
                                                 with_payload=["repo", "path", "language", "root"])
            for r in records:
                p = r.payload or {}
                repo = str(p["repo"])
                chunks[repo] += 1
                if p["path"] not in files[repo]:
                    files[repo].add(str(p["path"]))
                    languages[repo][str(p["language"])] += 1
                roots[repo] = str(p.get("root", ""))
            if offset is None:
                break
        return [RepoStatus(repo, roots[repo], len(files[repo]), chunks[repo], dict(languages[repo].most_common()))
                for repo in sorted(chunks)]

    async def status(self) -> list[RepoStatus]:
        """Per repository: files, chunks and files per language."""
        return await self._run(self._status)

    async def close(self) -> None:
        """Close the client (releases local mode's lock)."""
        await self._run(self.client.close)
        self._executor.shutdown(wait=True)
