"""The lexical terms of hybrid search: identifier splitting, stop words, stems, BM25 weights."""

from __future__ import annotations

import zlib

from embedfleet.codesearch import lexical
from embedfleet.codesearch.lexical import document_vector, query_vector, term_id, terms, words


def test_identifiers_are_split_and_compounds_kept_whole() -> None:
    assert terms("LmdbStore._resize") == ["lmdb", "store", "lmdbstore", "resiz"]
    assert terms("CUDA_VISIBLE_DEVICES") == ["cuda", "visibl", "devic", "cuda_visible_devices"]
    assert terms("HTTPServer getAppDir") == ["http", "server", "httpserver", "get", "app", "dir", "getappdir"]
    assert terms("acquire_lock") == ["acquir", "lock", "acquire_lock"]
    assert words("Pool._eject HTTPServer") == ["pool", "eject", "http", "server"]


def test_stop_words_short_words_and_stems() -> None:
    assert terms("the state of a file, as it is") == ["state", "file"]
    assert terms("x = y + 1") == []  # one-character words say nothing
    # Inflections meet: a query's words match the code's identifiers.
    assert terms("batches tokenizing resizes") == terms("batch tokenize resize")
    assert set(terms("write entries in batches")) < set(terms("def write_entries(batch):"))


def test_query_vector_counts_each_term_once() -> None:
    indices, values = query_vector("grow the map, grow it again when full")
    assert indices == sorted({term_id(t) for t in ("grow", "map", "full")}) and values == [1.0] * 3
    assert query_vector("the and of") == ([], [])


def test_document_vector_is_bm25_with_names_weighted() -> None:
    indices, values = document_vector("retry retry retry the request")
    weight = dict(zip(indices, values, strict=True))
    assert indices == sorted(indices) and len(indices) == 2
    # Saturation: three occurrences weigh more than one, far less than three times as much.
    assert weight[term_id("request")] < weight[term_id("retri")] < 3 * weight[term_id("request")]
    assert all(0 < v < lexical.K1 + 1 for v in values)
    # A term of the symbol or the path counts more than the same term in the body.
    named = dict(zip(*document_vector("return pool", ["gateway/pool.py"]), strict=True))
    assert named[term_id("pool")] > named[term_id("return")]
    assert term_id("gateway") in named and term_id("py") in named
    # Length normalisation: the same term frequency weighs less in a longer chunk.
    short = dict(zip(*document_vector("cache"), strict=True))[term_id("cach")]
    long_ = dict(zip(*document_vector("cache " + " ".join(f"word{i}" for i in range(300))), strict=True))
    assert long_[term_id("cach")] < short


def test_term_ids_are_stable() -> None:
    """Ids are stored in the index: they must not change between processes (no salted ``hash``)."""
    assert term_id("pool") == zlib.crc32(b"pool") and 0 <= term_id("pool") < 2**32
