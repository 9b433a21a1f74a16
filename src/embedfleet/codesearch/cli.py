"""What ``embedfleet codesearch index|search|status|ui`` do (their options are declared in
:mod:`embedfleet.cli`, from :class:`~embedfleet.config.CodesearchSettings`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.syntax import Syntax
from rich.table import Table

from embedfleet.codesearch.chunking import ChunkOptions
from embedfleet.codesearch.embedder import Embedder
from embedfleet.codesearch.errors import CodeSearchError
from embedfleet.codesearch.index import Indexer, IndexReport, clone, is_git_url, repo_name_of
from embedfleet.codesearch.index import Progress as IndexProgress
from embedfleet.codesearch.search import search
from embedfleet.codesearch.service import RERANKER_POOL, LocalService
from embedfleet.codesearch.store import CodeStore, Hit, RepoStatus
from embedfleet.config import CodesearchSettings

SNIPPET_LINES = 12


@contextlib.contextmanager
def embedding_service(settings: CodesearchSettings, console: Console, reranker: bool = False) -> Iterator[str]:
    """The gateway's URL: ``--url``, or a local ``embedfleet serve`` for the block's duration."""
    if settings.url:
        yield settings.url
        return
    if reranker and settings.reranker is None:
        raise CodeSearchError("--rerank without --url needs --reranker MODEL (a reranker the local service serves)")
    with console.status("starting the embedding service (embedfleet serve)..."), \
            LocalService(settings, with_reranker=reranker) as url:
        console.print(f"[dim]embedding service at {url}[/]")
        yield url


def embedder_for(settings: CodesearchSettings, url: str) -> Embedder:
    """An :class:`Embedder` for the settings' gateway."""
    reranker = settings.reranker if settings.url else RERANKER_POOL
    return Embedder(url, api_key=settings.api_key, model=settings.model if settings.url else None,
                    reranker=reranker, concurrency=settings.concurrency, batch_size=settings.batch_size)


def chunk_options(settings: CodesearchSettings) -> ChunkOptions:
    """The chunking settings."""
    return ChunkOptions(settings.max_lines, settings.window_lines, settings.overlap_lines)


class _Bar(IndexProgress):
    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task = progress.add_task("embedding", total=None)

    def planned(self, files: int, chunks: int) -> None:
        self.progress.update(self.task, total=chunks, description=f"embedding {files} changed file(s)")

    def advance(self, chunks: int) -> None:
        self.progress.advance(self.task, chunks)


def resolve_target(settings: CodesearchSettings, target: str, repo: str | None) -> tuple[Path, str]:
    """The folder to index (a URL is cloned under the data dir first) and the repository's name."""
    name = repo or repo_name_of(target if is_git_url(target) else str(Path(target).resolve()))
    if is_git_url(target):
        return clone(target, settings.data_dir / "repos" / name), name
    path = Path(target).expanduser()
    if not path.is_dir():
        raise CodeSearchError(f"{target} is not a folder (nor a git URL)")
    return path, name


def run_index(settings: CodesearchSettings, target: str, repo: str | None, console: Console) -> IndexReport:
    """``codesearch index``: index ``target`` (a folder, a local git repository or a git URL)."""
    root, name = resolve_target(settings, target, repo)

    async def go(url: str) -> IndexReport:
        store = CodeStore(settings.qdrant_url, settings.collection, settings.qdrant_api_key)
        try:
            async with embedder_for(settings, url) as embedder:
                columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
                with Progress(*columns, console=console, transient=True) as progress:
                    return await Indexer(store, embedder, chunk_options(settings)).index(root, name, _Bar(progress))
        finally:
            await store.close()

    with embedding_service(settings, console) as url:
        report = asyncio.run(go(url))
    console.print(f"[bold green]indexed[/] {report.repo} ({report.root}): {report.files} file(s), "
                  f"{len(report.changed)} changed, {len(report.deleted)} removed, {report.chunks} chunk(s) embedded "
                  f"in {report.seconds:.1f}s")
    return report


def run_search(settings: CodesearchSettings, query: str, *, limit: int, repo: str | None, language: str | None,
               rerank: bool, as_json: bool, out: Console, console: Console) -> list[Hit]:
    """``codesearch search``: print the best chunks for ``query``."""

    async def go(url: str) -> list[Hit]:
        store = CodeStore(settings.qdrant_url, settings.collection, settings.qdrant_api_key)
        try:
            async with embedder_for(settings, url) as embedder:
                return await search(store, embedder, query, limit, repo=repo, language=language, rerank=rerank)
        finally:
            await store.close()

    with embedding_service(settings, console, reranker=rerank) as url:
        hits = asyncio.run(go(url))
    if as_json:
        out.print_json(json.dumps([h.as_dict() for h in hits]))
    elif not hits:
        console.print("no results (is anything indexed? `embedfleet codesearch status`)")
    else:
        out.print(hits_table(hits, query))
    return hits


def snippet(hit: Hit, lines: int = SNIPPET_LINES) -> Syntax:
    """The start of a hit's code, highlighted, with its line numbers."""
    text = "\n".join(hit.text.splitlines()[:lines])
    lexer = Syntax.guess_lexer(hit.path, text)
    return Syntax(text, lexer, line_numbers=True, start_line=hit.start_line, word_wrap=False, theme="ansi_dark")


def hits_table(hits: list[Hit], query: str) -> Table:
    """Search results as a rich table."""
    table = Table(title=f"results for {query!r}", show_lines=True)
    table.add_column("#", justify="right")
    table.add_column("file:line", overflow="fold")
    table.add_column("symbol", overflow="fold")
    table.add_column("score", justify="right")
    table.add_column("code")
    for i, hit in enumerate(hits, 1):
        location = f"{hit.path}:{hit.start_line}-{hit.end_line}\n[dim]{hit.repo} · {hit.language}[/]"
        table.add_row(str(i), location, hit.symbol or "", f"{hit.score:.3f}", snippet(hit))
    return table


def run_status(settings: CodesearchSettings, out: Console) -> list[RepoStatus]:
    """``codesearch status``: the repositories in the index."""

    async def go() -> list[RepoStatus]:
        store = CodeStore(settings.qdrant_url, settings.collection, settings.qdrant_api_key)
        try:
            return await store.status()
        finally:
            await store.close()

    repos = asyncio.run(go())
    table = Table(title=f"code search index ({settings.qdrant_url}, collection {settings.collection})")
    for column in ("repository", "folder", "files", "chunks", "languages"):
        table.add_column(column)
    for r in repos:
        table.add_row(r.repo, r.root, str(r.files), str(r.chunks),
                      ", ".join(f"{lang} {n}" for lang, n in r.languages.items()))
    out.print(table)
    return repos


def run_ui(settings: CodesearchSettings, console: Console) -> None:
    """``codesearch ui``: serve the search page until interrupted."""
    import uvicorn

    from embedfleet.codesearch.ui import build_ui

    with embedding_service(settings, console, reranker=settings.reranker is not None) as url:
        app = build_ui(settings, url)
        console.print(f"[bold green]code search UI at http://{settings.host}:{settings.port}/[/]")
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
