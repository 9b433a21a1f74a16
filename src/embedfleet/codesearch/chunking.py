"""Cut a source file into chunks at function and class boundaries (tree-sitter), or into overlapping line
windows for languages without a grammar here (Markdown, text, config files).

A class (impl, trait, module, interface) with members gives one chunk for its header (up to its first member:
the signature, docstring and attributes) and one per member, named ``Class.member``; other definitions are
one chunk each, with the comments right above them. Lines outside any definition (imports, constants,
module docstrings) become chunks of their own. A chunk longer than ``max_lines`` is cut into windows.

A definition's chunk carries its context (:attr:`Chunk.context`), which its embedding and its lexical terms
include: for a member, its container's summary (the first lines of the container's header: its signature and
the start of its docstring or doc comment), since a method means what it does for its class; for a top-level
definition, the file's (the first paragraph of its docstring or leading comment), when it has one.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

from embedfleet.codesearch.files import SourceFile
from embedfleet.codesearch.lexical import words

DEFINITIONS: dict[str, dict[str, str]] = {
    "python": {"function_definition": "function", "class_definition": "class"},
    "javascript": {"function_declaration": "function", "generator_function_declaration": "function",
                   "class_declaration": "class", "method_definition": "method"},
    "go": {"function_declaration": "function", "method_declaration": "method", "type_declaration": "type"},
    "rust": {"function_item": "function", "function_signature_item": "function", "impl_item": "impl",
             "struct_item": "struct", "enum_item": "enum", "union_item": "union", "trait_item": "trait",
             "mod_item": "module", "macro_definition": "macro", "type_item": "type"},
    "java": {"class_declaration": "class", "interface_declaration": "interface", "enum_declaration": "enum",
             "record_declaration": "class", "method_declaration": "method", "constructor_declaration": "method"},
    "c": {"function_definition": "function", "struct_specifier": "struct"},
    "ruby": {"method": "method", "singleton_method": "method", "class": "class", "module": "module"},
    "php": {"function_definition": "function", "class_declaration": "class", "method_declaration": "method",
            "interface_declaration": "interface", "trait_declaration": "trait"},
    "kotlin": {"function_declaration": "function", "class_declaration": "class", "object_declaration": "class"},
    "scala": {"function_definition": "function", "class_definition": "class", "object_definition": "class",
              "trait_definition": "trait"},
    "lua": {"function_declaration": "function"},
    "bash": {"function_definition": "function"},
}
DEFINITIONS["typescript"] = {**DEFINITIONS["javascript"], "abstract_class_declaration": "class",
                             "interface_declaration": "interface", "type_alias_declaration": "type",
                             "enum_declaration": "enum", "function_signature": "function",
                             "internal_module": "module", "module": "module"}
DEFINITIONS["tsx"] = DEFINITIONS["typescript"]
DEFINITIONS["cpp"] = {**DEFINITIONS["c"], "class_specifier": "class", "namespace_definition": "module"}
"""The tree-sitter node types that are definitions, per language, and what kind of definition each is."""

CONTAINERS = frozenset({"class", "impl", "trait", "module", "interface"})
"""Definitions whose members become chunks of their own."""

WRAPPERS = frozenset({"decorated_definition", "export_statement", "template_declaration", "ambient_declaration"})
"""Nodes around a definition (decorators, ``export``): the chunk spans them, the name is the definition's."""

FUNCTION_VALUES = frozenset({"arrow_function", "function_expression", "function", "generator_function", "class"})
"""``const f = <one of these>`` defines ``f`` in JavaScript and TypeScript."""

CONTEXT_LINES = 3
CONTEXT_CHARS = 300
"""A container's summary: at most this many lines of its header (up to its first blank line), this long."""

COMMENT = re.compile(r"^\s*(#|//|/\*|\*|--|;;)")
ONLY_PUNCTUATION = re.compile(r"^[\s{}()\[\];,]*$")


@dataclass(frozen=True)
class ChunkOptions:
    """How big chunks get: definitions up to ``max_lines``; windows of ``window_lines`` overlapping by
    ``overlap_lines`` for longer ones and for files without a grammar."""

    max_lines: int = 80
    window_lines: int = 40
    overlap_lines: int = 10


@dataclass(frozen=True)
class Chunk:
    """A piece of a file: lines ``start_line``..``end_line`` (1-based, inclusive)."""

    path: str
    language: str
    start_line: int
    end_line: int
    symbol: str | None
    kind: str
    text: str
    context: str | None = None
    """The summary of the definition this chunk is a member of, or of its file (see the module's docstring)."""

    def embedding_text(self) -> str:
        """What is embedded: the file's path, the chunk's kind and symbol (also as words: ``Pool._eject``
        gives "pool eject"), its context, then its code."""
        header = f"{self.path}" + (f" {self.kind} {self.symbol}" if self.symbol else "")
        if self.symbol:
            header += f" ({' '.join(words(self.symbol))})"
        if self.context:
            header += f"\nin {self.context}"
        return f"{header}\n{self.text}"


@dataclass(frozen=True)
class _Span:
    start: int  # 0-based rows, inclusive
    end: int
    symbol: str | None
    kind: str


@functools.cache
def _parser(language: str) -> Any:
    """The tree-sitter parser of a language, or None when there is none (or the pack is not installed)."""
    if language not in DEFINITIONS:
        return None
    try:
        from tree_sitter_language_pack import get_parser
    except ImportError:  # pragma: no cover - the codesearch extra installs it
        return None
    try:
        return get_parser(language)  # type: ignore[arg-type]
    except Exception:
        return None


def has_grammar(language: str) -> bool:
    """Whether files of ``language`` are cut at definitions (else: line windows)."""
    return _parser(language) is not None


def chunk_file(source: SourceFile, options: ChunkOptions | None = None) -> list[Chunk]:
    """The chunks of a file, in line order."""
    options = options or ChunkOptions()
    lines = source.text.splitlines()
    parser = _parser(source.language)
    if parser is None:
        return _windows(source, lines, 0, len(lines) - 1, None, "text", options)
    tree = parser.parse(source.text.encode("utf-8"))
    spans = _attach_comments(_collect(tree.root_node, None, DEFINITIONS[source.language]), lines)
    chunks: list[Chunk] = []
    covered = [False] * len(lines)
    for span in spans:
        for row in range(span.start, min(span.end, len(lines) - 1) + 1):
            covered[row] = True
    gaps: list[_Span] = []
    row = 0
    while row < len(lines):
        if covered[row]:
            row += 1
            continue
        start = row
        while row < len(lines) and not covered[row]:
            row += 1
        gaps.append(_Span(start, row - 1, None, "module"))
    summaries = {span.symbol: _summary(lines, span) for span in spans if span.kind in CONTAINERS and span.symbol}
    module = _module_summary(lines)
    for span in sorted([*spans, *gaps], key=lambda s: (s.start, s.end)):
        scope = span.symbol.rsplit(".", 1)[0] if span.symbol and "." in span.symbol else None
        context = summaries.get(scope) if scope else (module if span.symbol else None)
        chunks += _windows(source, lines, span.start, span.end, span.symbol, span.kind, options, context)
    return chunks


def _module_summary(lines: list[str]) -> str | None:
    """The first paragraph of a file's docstring or leading comment (not its code)."""
    first = next((i for i, line in enumerate(lines) if line.strip() and not line.startswith("#!")), None)
    if first is None or not (COMMENT.match(lines[first]) or lines[first].lstrip()[:3] in ('"""', "'''")):
        return None
    return _summary(lines, _Span(first, len(lines) - 1, None, "module"))


def _summary(lines: list[str], span: _Span) -> str | None:
    """The first lines of a definition (up to a blank line), on one line."""
    kept: list[str] = []
    for line in lines[span.start:span.end + 1]:
        if not line.strip():
            if kept:
                break
            continue
        kept.append(line.strip())
        if len(kept) == CONTEXT_LINES:
            break
    return " ".join(kept)[:CONTEXT_CHARS] or None


def _windows(source: SourceFile, lines: list[str], start: int, end: int, symbol: str | None, kind: str,
             options: ChunkOptions, context: str | None = None) -> list[Chunk]:
    """Rows ``start``..``end`` as one chunk, or as overlapping windows when longer than allowed; blank
    edges trimmed, nothing for rows of only blanks and brackets."""
    end = min(end, len(lines) - 1)
    while start <= end and not lines[start].strip():
        start += 1
    while end >= start and not lines[end].strip():
        end -= 1
    if start > end or all(ONLY_PUNCTUATION.match(line) for line in lines[start:end + 1]):
        return []
    limit = options.max_lines if symbol is not None else options.window_lines
    if end - start + 1 <= limit:
        return [Chunk(source.path, source.language, start + 1, end + 1, symbol, kind,
                      "\n".join(lines[start:end + 1]), context)]
    step = max(1, options.window_lines - options.overlap_lines)
    chunks = []
    for first in range(start, end + 1, step):
        last = min(first + options.window_lines - 1, end)
        chunks += _windows(source, lines, first, last, symbol, kind, options, context)
        if last == end:
            break
    return chunks


def _name(node: Any) -> str | None:
    """A definition's name: its ``name`` field, or what stands for it (an impl's type, a Go type's spec,
    a C function's declarator)."""
    named = node.child_by_field_name("name")
    if named is None and node.type == "impl_item":
        named = node.child_by_field_name("type")
    if named is None and node.type == "type_declaration":
        spec = next((c for c in node.named_children if c.type == "type_spec"), None)
        named = spec.child_by_field_name("name") if spec is not None else None
    if named is None:
        declarator = node.child_by_field_name("declarator")
        while declarator is not None and declarator.child_by_field_name("declarator") is not None:
            declarator = declarator.child_by_field_name("declarator")
        named = declarator
    if named is None or named.text is None:
        return None
    text: str = named.text.decode("utf-8", errors="replace")
    return text if len(text) <= 200 and "\n" not in text else None


def _definition(node: Any, types: dict[str, str]) -> tuple[str, str | None, Any] | None:
    """(kind, name, the definition node) when ``node`` is a definition, possibly wrapped; else None."""
    if node.type in types:
        if node.type == "struct_specifier" and node.child_by_field_name("body") is None:
            return None  # a use of a struct type, not its definition
        return types[node.type], _name(node), node
    if node.type in WRAPPERS:
        for child in node.named_children:
            found = _definition(child, types)
            if found is not None:
                return found
    if node.type in ("lexical_declaration", "variable_declaration") and node.named_child_count == 1:
        declarator = node.named_children[0]
        value = declarator.child_by_field_name("value")
        if declarator.type == "variable_declarator" and value is not None and value.type in FUNCTION_VALUES:
            return ("class" if value.type == "class" else "function"), _name(declarator), value
    return None


def _collect(node: Any, scope: str | None, types: dict[str, str]) -> list[_Span]:
    """The definition spans below ``node`` (members of containers included, function bodies not)."""
    spans: list[_Span] = []
    for child in node.named_children:
        found = _definition(child, types)
        if found is None:
            if child.named_child_count:
                spans += _collect(child, scope, types)
            continue
        kind, name, inner = found
        symbol = f"{scope}.{name}" if scope and name else name or scope
        if kind == "function" and scope:
            kind = "method"
        start, end = child.start_point[0], child.end_point[0]
        if kind in CONTAINERS:
            members = _collect(inner, symbol, types)
            if members:
                spans.append(_Span(start, max(start, members[0].start - 1), symbol, kind))
                spans += members
                continue
        spans.append(_Span(start, end, symbol, kind))
    return spans


def _attach_comments(spans: list[_Span], lines: list[str]) -> list[_Span]:
    """Extend each span upwards over the comment lines right above it (doc comments), where free."""
    taken = {row for s in spans for row in range(s.start, s.end + 1)}
    result = []
    for span in spans:
        start = span.start
        while start > 0 and start - 1 not in taken and COMMENT.match(lines[start - 1]):
            start -= 1
            taken.add(start)
        result.append(_Span(start, span.end, span.symbol, span.kind))
    return result


def fixed_chunks(source: SourceFile, size: int = 1000, overlap: int = 0) -> list[Chunk]:
    """Whole files cut into fixed-size character chunks, as the code-search demo did (the benchmark's
    baseline)."""
    chunks = []
    text = source.text
    step = max(1, size - overlap)
    for offset in range(0, len(text), step):
        piece = text[offset:offset + size]
        first = text.count("\n", 0, offset) + 1
        chunks.append(Chunk(source.path, source.language, first, first + piece.count("\n"), None, "text", piece))
        if offset + size >= len(text):
            break
    return chunks
