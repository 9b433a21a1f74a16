"""Incremental indexing: a file is (re)embedded only when its content hash differs from the index's, and
files gone from the tree are removed. Files are embedded and written in groups, so an interrupted run
keeps what it finished (and the next run skips it)."""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from embedfleet.codesearch.chunking import Chunk, ChunkOptions, chunk_file
from embedfleet.codesearch.embedder import Embedder
from embedfleet.codesearch.errors import CodeSearchError
from embedfleet.codesearch.files import SourceFile, walk
from embedfleet.codesearch.store import CodeStore

GROUP_CHUNKS = 512
"""Chunks embedded before the files they came from are written to the index."""

_URL = re.compile(r"^(?:[a-z][a-z0-9+.-]*://|[\w.-]+@[\w.-]+:)", re.IGNORECASE)


@dataclass
class IndexReport:
    """What an indexing run did."""

    repo: str
    root: str
    files: int = 0
    changed: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    chunks: int = 0
    seconds: float = 0.0


class Progress:
    """What the indexer tells about its progress (the CLI draws a bar with it)."""

    def planned(self, files: int, chunks: int) -> None:
        """``files`` changed files to embed, ``chunks`` chunks in all."""

    def advance(self, chunks: int) -> None:
        """``chunks`` more chunks embedded."""


def is_git_url(target: str) -> bool:
    """Whether ``target`` is a URL (``https://...``, ``git@host:path``) rather than a local folder."""
    return bool(_URL.match(target)) and not Path(target).exists()


def repo_name_of(target: str) -> str:
    """The default repository name: the folder's (or URL's) last part, without ``.git``."""
    name = target.rstrip("/").replace(":", "/").rsplit("/", 1)[-1]
    return name.removesuffix(".git") or "repo"


def clone(url: str, dest: Path, runner: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run) -> Path:
    """Clone ``url`` into ``dest`` (a shallow clone), or update it when already cloned; CodeSearchError with
    git's own message when git fails (no network, no such repository)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    cmd = (["git", "-C", str(dest), "pull", "--ff-only", "--depth", "1"] if (dest / ".git").exists()
           else ["git", "clone", "--depth", "1", "--", url, str(dest)])
    try:
        done = runner(cmd, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CodeSearchError(f"{' '.join(cmd[:2])} failed: {exc}") from None
    if done.returncode != 0:
        raise CodeSearchError(f"git could not fetch {url}:\n{done.stderr.strip()}")
    return dest


class Indexer:
    """Index folders into a :class:`CodeStore` with an :class:`Embedder`."""

    def __init__(self, store: CodeStore, embedder: Embedder, options: ChunkOptions | None = None) -> None:
        self.store = store
        self.embedder = embedder
        self.options = options or ChunkOptions()

    async def index(self, root: Path, repo: str, progress: Progress | None = None) -> IndexReport:
        """Bring the index of ``repo`` up to date with the files under ``root``."""
        started = time.perf_counter()
        progress = progress or Progress()
        root = root.resolve()
        if not root.is_dir():
            raise CodeSearchError(f"{root} is not a folder")
        report = IndexReport(repo, str(root))
        await self.embedder.dimension()  # fail early (an unreachable gateway, a bad key) even with nothing to do
        known = await self.store.manifest(repo)
        # Walking, reading and hashing the files is blocking work: off the event loop.
        current = await asyncio.to_thread(lambda: {source.path: source for source in walk(root)})
        report.files = len(current)
        changed = [s for path, s in current.items() if known.get(path) != s.digest]
        report.deleted = sorted(set(known) - set(current))
        for path in report.deleted:
            await self.store.delete(repo, path)
        chunked = await asyncio.to_thread(lambda: [(s, chunk_file(s, self.options)) for s in changed])
        progress.planned(len(chunked), sum(len(c) for _, c in chunked))
        group: list[tuple[SourceFile, list[Chunk]]] = []
        for item in chunked:
            group.append(item)
            if sum(len(c) for _, c in group) >= GROUP_CHUNKS:
                await self._write(repo, str(root), group, progress)
                group = []
        await self._write(repo, str(root), group, progress)  # the last, partial group too
        report.changed = sorted(s.path for s, c in chunked if c or s.path in known)
        report.chunks = sum(len(c) for _, c in chunked)
        report.seconds = time.perf_counter() - started
        return report

    async def _write(self, repo: str, root: str, group: list[tuple[SourceFile, list[Chunk]]],
                     progress: Progress) -> None:
        texts = [c.embedding_text() for _, chunks in group for c in chunks]
        vectors = await self.embedder.embed(texts, progress.advance) if texts else []
        offset = 0
        for source, chunks in group:
            await self.store.replace_file(repo, root, source.path, source.digest, chunks,
                                          vectors[offset:offset + len(chunks)])
            offset += len(chunks)
