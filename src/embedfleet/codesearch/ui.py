"""``embedfleet codesearch ui``: one small page served by FastAPI: the index's status, a query box with
repository, language and rerank choices, and results with highlighted code and file:line links.

Nothing from an indexed file reaches the page as markup: results travel as JSON, code as pygments tokens
that the page's script puts into elements with ``textContent``; the file view (``/view``) is rendered by
pygments, which escapes every character that could start markup. A Content-Security-Policy allows only the
page's own script and style, so an injected inline script or event handler would not run either.
"""

from __future__ import annotations

import asyncio
import html
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Query
from fastapi.responses import HTMLResponse, Response
from pygments import highlight, lex
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_for_filename
from pygments.lexers.special import TextLexer
from pygments.token import STANDARD_TYPES, _TokenType
from pygments.util import ClassNotFound
from starlette.requests import Request

from embedfleet.api.edge import install_error_handlers, json_response
from embedfleet.api.errors import not_found
from embedfleet.codesearch.cli import embedder_for
from embedfleet.codesearch.embedder import Embedder
from embedfleet.codesearch.errors import CodeSearchError
from embedfleet.codesearch.search import search
from embedfleet.codesearch.store import CodeStore, Hit
from embedfleet.config import CodesearchSettings
from embedfleet.engine.errors import EngineError, ErrorKind

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = {"content-security-policy": CSP, "x-content-type-options": "nosniff",
                    "referrer-policy": "no-referrer"}
MAX_VIEW_BYTES = 1_000_000
STYLE = "default"


def _asset(name: str) -> str:
    return resources.files("embedfleet.codesearch").joinpath("static", name).read_text(encoding="utf-8")


def _lexer(path: str, text: str) -> Any:
    try:
        return get_lexer_for_filename(path, text)
    except ClassNotFound:
        return TextLexer()


def _css_class(token: _TokenType) -> str:
    while token not in STANDARD_TYPES:
        token = token.parent
    return str(STANDARD_TYPES[token])


def tokens(hit: Hit) -> list[tuple[str, str]]:
    """A hit's code as (pygments CSS class, text) pairs, neighbours of one class merged."""
    pairs: list[tuple[str, str]] = []
    for token, value in lex(hit.text, _lexer(hit.path, hit.text)):
        cls = _css_class(token)
        if pairs and pairs[-1][0] == cls:
            pairs[-1] = (cls, pairs[-1][1] + value)
        else:
            pairs.append((cls, value))
    return pairs


def _render_file(root: Path, path: str, line: int) -> str | None:
    """The file ``path`` under ``root``, highlighted with line anchors and ``line`` marked; None when it is
    outside ``root``, gone, or too large."""
    file = (root / path).resolve()
    if not file.is_relative_to(root.resolve()) or not file.is_file() or file.stat().st_size > MAX_VIEW_BYTES:
        return None
    text = file.read_text(encoding="utf-8", errors="replace")
    formatter = HtmlFormatter(style=STYLE, linenos="inline", lineanchors="L", anchorlinenos=True,
                              hl_lines=[line], cssclass="code")
    rendered: str = highlight(text, _lexer(path, text), formatter)
    return rendered


def build_ui(settings: CodesearchSettings, url: str) -> FastAPI:
    """The UI's app, embedding queries through the gateway at ``url``."""
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state["store"] = CodeStore(settings.qdrant_url, settings.collection, settings.qdrant_api_key)
        async with embedder_for(settings, url) as embedder:
            state["embedder"] = embedder
            try:
                yield
            finally:
                await state["store"].close()

    app = FastAPI(title="embedfleet code search", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    install_error_handlers(app)
    page, script = _asset("index.html"), _asset("app.js")
    style = _asset("style.css") + HtmlFormatter(style=STYLE).get_style_defs(".code")

    @app.middleware("http")
    async def headers(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/static/app.js")
    async def app_js() -> Response:
        return Response(script, media_type="text/javascript")

    @app.get("/static/style.css")
    async def app_css() -> Response:
        return Response(style, media_type="text/css")

    @app.get("/api/status")
    async def status() -> Response:
        store: CodeStore = state["store"]
        repos = await store.status()
        return json_response({"collection": settings.collection, "qdrant": settings.qdrant_url,
                              "rerank": bool(settings.reranker), "repos": [r.__dict__ for r in repos]})

    @app.get("/api/search")
    async def api_search(q: Annotated[str, Query(max_length=2000)],
                         repo: Annotated[str | None, Query(max_length=200)] = None,
                         language: Annotated[str | None, Query(max_length=50)] = None,
                         limit: Annotated[int, Query(ge=1, le=100)] = 10, rerank: bool = False) -> Response:
        if not q.strip():
            raise EngineError(ErrorKind.VALIDATION, "the query is empty")
        embedder: Embedder = state["embedder"]
        try:
            hits = await search(state["store"], embedder, q, limit, repo=repo or None, language=language or None,
                                rerank=rerank)
        except CodeSearchError as exc:
            raise EngineError(ErrorKind.BACKEND, str(exc)) from None
        return json_response({"query": q, "hits": [{**h.as_dict(), "tokens": tokens(h)} for h in hits]})

    @app.get("/view", response_class=HTMLResponse)
    async def view(repo: Annotated[str, Query(max_length=200)], path: Annotated[str, Query(max_length=4096)],
                   line: Annotated[int, Query(ge=1)] = 1) -> HTMLResponse:
        root = await state["store"].root_of(repo, path)
        if root is None:
            raise not_found(f"{repo}:{path} is not in the index")
        body = await asyncio.to_thread(_render_file, Path(root), path, line)
        if body is None:
            raise not_found(f"{repo}:{path} cannot be shown")
        title = html.escape(f"{repo}: {path}")
        return HTMLResponse(f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
                            f'<link rel="stylesheet" href="/static/style.css"></head><body class="view">'
                            f'<h1>{title}</h1>{body}</body></html>')

    return app
