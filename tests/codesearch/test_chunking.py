"""Chunking at definitions with tree-sitter, per language, and line windows for the rest."""

from __future__ import annotations

import hashlib

from embedfleet.codesearch.chunking import Chunk, ChunkOptions, chunk_file, fixed_chunks, has_grammar
from embedfleet.codesearch.files import SourceFile, language_of
from tests.codesearch import samples


def _chunks(path: str, text: str, options: ChunkOptions | None = None) -> list[Chunk]:
    source = SourceFile(path, language_of(path), text, hashlib.sha256(text.encode()).hexdigest())
    return chunk_file(source, options)


def _by_symbol(chunks: list[Chunk]) -> dict[str | None, Chunk]:
    return {c.symbol: c for c in chunks}


def test_python_functions_classes_and_methods() -> None:
    chunks = _chunks("billing/payments.py", samples.PYTHON)
    symbols = _by_symbol(chunks)
    assert [c.symbol for c in chunks] == [None, "round_cents", "Invoice", "Invoice.total", "Invoice.tax"]
    assert symbols["round_cents"].kind == "function" and symbols["Invoice.total"].kind == "method"
    # The comment above a function and a decorator belong to its chunk; the class header stops before its members.
    assert symbols["round_cents"].text.startswith("# Rounds half up") and symbols["round_cents"].start_line == 8
    assert symbols["Invoice"].text.startswith("@dataclass") and 'currency = "EUR"' in symbols["Invoice"].text
    assert "def total" not in symbols["Invoice"].text
    assert symbols["Invoice.tax"].text.lstrip().startswith("@property")
    module = symbols[None]
    assert (module.start_line, module.end_line, module.kind) == (1, 5, "module") and "RATE = 0.2" in module.text
    lines = samples.PYTHON.splitlines()
    for c in chunks:  # the line span is where the text is
        assert c.text == "\n".join(lines[c.start_line - 1:c.end_line])


def test_javascript_and_typescript() -> None:
    js = _by_symbol(_chunks("web/config.js", samples.JAVASCRIPT))
    assert {"parseConfig", "retryWithBackoff", "Cache", "Cache.constructor", "Cache.get"} <= set(js)
    assert js["parseConfig"].text.startswith("export function") and js["Cache.get"].kind == "method"
    assert js["retryWithBackoff"].kind == "function"
    ts = _by_symbol(_chunks("web/users.ts", samples.TYPESCRIPT))
    assert {"User", "Id", "UserService", "UserService.findByName", "greet"} <= set(ts)
    assert ts["User"].kind == "interface" and ts["Id"].kind == "type"
    assert "private users" in ts["UserService"].text and "find(" in ts["UserService.findByName"].text
    assert _by_symbol(_chunks("web/App.tsx", "export function App() {\n  return <div>hi</div>;\n}\n"))["App"]


def test_go() -> None:
    chunks = _by_symbol(_chunks("server/server.go", samples.GO))
    assert {"Server", "Handle", "NewServer"} <= set(chunks)
    assert chunks["Handle"].kind == "method" and chunks["Handle"].text.startswith("// Handle registers")
    assert chunks["Server"].kind == "type" and "mux *http.ServeMux" in chunks["Server"].text
    assert 'import "net/http"' in chunks[None].text


def test_rust() -> None:
    chunks = _by_symbol(_chunks("counter/src/lib.rs", samples.RUST))
    assert {"Counter", "Counter.new", "Counter.add", "tokenize"} <= set(chunks)
    assert chunks["Counter"].kind in ("struct", "impl") and chunks["Counter.add"].kind == "method"
    assert "entry(word" in chunks["Counter.add"].text and chunks["tokenize"].kind == "function"
    assert next(c for c in _chunks("counter/src/lib.rs", samples.RUST) if c.symbol == "Counter").text.startswith(
        "/// A word counter.")


def test_markdown_falls_back_to_overlapping_windows() -> None:
    assert not has_grammar("markdown") and has_grammar("python")
    chunks = _chunks("docs/guide.md", samples.MARKDOWN, ChunkOptions(window_lines=40, overlap_lines=10))
    assert [(c.start_line, c.end_line) for c in chunks] == [(1, 40), (31, 70), (61, 100)]
    assert all(c.symbol is None and c.kind == "text" and c.language == "markdown" for c in chunks)
    assert chunks[1].text.splitlines()[0] == "Line 31 of the guide."


def test_a_long_function_is_cut_into_windows_with_its_name() -> None:
    body = "\n".join(f"    total += {i}" for i in range(150))
    chunks = _chunks("big.py", f"def big():\n    total = 0\n{body}\n    return total\n",
                     ChunkOptions(max_lines=80, window_lines=40, overlap_lines=10))
    assert len(chunks) == 5 and {c.symbol for c in chunks} == {"big"}
    assert chunks[0].start_line == 1 and chunks[-1].end_line == 153 and chunks[1].start_line == 31


def test_blank_and_unparsable_files() -> None:
    assert _chunks("empty.py", "\n\n   \n") == []
    broken = _chunks("broken.py", "def ok():\n    return 1\n\ndef broken(:\n    pass\n")
    assert "ok" in {c.symbol for c in broken} and sum(c.text.count("\n") + 1 for c in broken) >= 4
    text = "x = 1\n" * 5
    assert [c.text for c in fixed_chunks(SourceFile("a.py", "python", text, "h"), size=12)] == [
        "x = 1\nx = 1\n", "x = 1\nx = 1\n", "x = 1\n"]


def test_definitions_carry_their_containers_summary_into_what_is_embedded() -> None:
    python = _by_symbol(_chunks("billing/payments.py", samples.PYTHON))
    assert python["Invoice.total"].context == '@dataclass class Invoice: """An invoice with lines."""'
    assert python["Invoice.tax"].context == python["Invoice.total"].context
    # Top-level definitions: the module's docstring; code outside definitions: nothing.
    assert python["round_cents"].context == python["Invoice"].context == '"""Payment helpers."""'
    assert python[None].context is None
    embedded = python["Invoice.total"].embedding_text().splitlines()
    assert embedded[:2] == ["billing/payments.py method Invoice.total (invoice total)",
                            'in @dataclass class Invoice: """An invoice with lines."""']
    assert embedded[2:] == python["Invoice.total"].text.splitlines()
    rust = _by_symbol(_chunks("counter/src/lib.rs", samples.RUST))
    assert rust["Counter.add"].context == "impl Counter {"
    typescript = _by_symbol(_chunks("web/users.ts", samples.TYPESCRIPT))
    assert typescript["UserService.findByName"].context == "export class UserService { private users: User[] = [];"
    go = _by_symbol(_chunks("server/server.go", samples.GO))
    assert go["Handle"].context is None  # a Go method is not nested in its type; the file starts with code
    commented = _by_symbol(_chunks("lib.go", "// Package lib adds.\n// More.\n\npackage lib\n\nfunc Add() {}\n"))
    assert commented["Add"].context == "// Package lib adds. // More."
