"""The web UI in Debian's headless chromium (driven by Playwright's Python package, never a browser of its
own): index a small repository holding markup in its code, search, check the results and that nothing from
the file ran or became markup, follow a file:line link, take a screenshot."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from embedfleet.codesearch.embedder import Embedder
from embedfleet.codesearch.index import Indexer
from embedfleet.codesearch.store import CodeStore
from tests.codesearch import samples
from tests.helpers import GatewayProcess, free_port

pytestmark = pytest.mark.slow

EVIL = '''# <script>window.__pwned = "comment"</script>
def render_banner(title):
    """Render the welcome banner. <img src=x onerror="window.__pwned = 'docstring'">"""
    return '<script>window.__pwned = "string"</script><b>' + title + "</b>"
'''


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "the UI test needs Debian's chromium: `make test` installs it (apt-get install chromium)"
    return path


@pytest.fixture(scope="module")
def ui(gateway: GatewayProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`embedfleet codesearch ui` over an index of the sample repository plus a file full of markup."""
    tmp = tmp_path_factory.mktemp("codesearch-ui")
    root = samples.write_repo(tmp / "demo")
    (root / "web" / "banner.py").write_text(EVIL)
    data = tmp / "data"

    async def index() -> None:
        store = CodeStore(f"qdrant+local://{data / 'qdrant'}")
        async with Embedder(gateway.url, model="minilm") as embedder:
            await Indexer(store, embedder).index(root, "demo")
        await store.close()

    asyncio.run(index())
    port = free_port()
    log = tmp / "ui.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "embedfleet.cli", "codesearch", "ui", "--url", gateway.url,
                                 "--model", "minilm", "--reranker", "ranker", "--data-dir", str(data),
                                 "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                if httpx.get(f"{url}/api/status", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_search_page_in_headless_chromium(ui: str, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    dialogs: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(ui)
            # Locators, not wait_for_function: the page's CSP forbids the eval that one needs.
            page.locator("#status", has_text="7 files").wait_for()
            assert "demo: 7 files" in page.inner_text("#status")
            assert page.locator("#language option").all_inner_texts()[:3] == ["all languages", "go", "javascript"]
            assert page.is_visible("#rerank")  # a reranker is configured

            page.fill("#q", "render the welcome banner")
            page.click("button[type=submit]")
            page.wait_for_selector("#results li")
            first = page.locator("#results li").first
            assert first.locator(".location").inner_text() == "web/banner.py:1"
            assert first.locator(".symbol").inner_text() == "render_banner"
            code = first.locator("pre.code code").inner_text()
            assert '<script>window.__pwned = "comment"</script>' in code and "onerror=" in code
            assert first.locator("pre.code code span").count() > 5  # highlighted tokens
            injected = page.evaluate("""() => ({
                pwned: window.__pwned === undefined ? null : String(window.__pwned),
                scripts: document.querySelectorAll('#results script').length,
                images: document.querySelectorAll('img').length,
                bold: document.querySelectorAll('#results b').length})""")
            assert injected == {"pwned": None, "scripts": 0, "images": 0, "bold": 0}

            page.select_option("#language", "go")
            page.click("button[type=submit]")
            page.locator("#message", has_text=re.compile(r"^\d+ results$")).wait_for()
            assert set(page.locator("#results .meta").all_inner_texts()) == {"demo · go"}

            png = page.screenshot(path=str(tmp_path / "ui.png"), full_page=True)
            assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000

            page.select_option("#language", "")
            page.fill("#q", "render the welcome banner")
            page.click("button[type=submit]")
            page.wait_for_selector("#results li")
            page.locator("#results li .location").first.click()
            page.wait_for_load_state()
            assert page.url.startswith(f"{ui}/view?") and page.url.endswith("#L-1")
            assert "demo: web/banner.py" in page.title()
            assert "onerror=" in page.inner_text("body") and page.evaluate("window.__pwned === undefined")
            assert page.evaluate("document.querySelectorAll('img, body script').length") == 0
            assert page.locator("a[href='#L-3']").count() == 1  # line anchors
        finally:
            browser.close()
    assert dialogs == []


def test_ui_api_errors_and_headers(ui: str) -> None:
    page = httpx.get(ui)
    assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    empty = httpx.get(f"{ui}/api/search", params={"q": "  "})
    assert empty.status_code == 422 and "empty" in empty.json()["error"]
    assert httpx.get(f"{ui}/api/search").status_code == 422
    assert httpx.get(f"{ui}/api/search", params={"q": "x", "limit": 0}).status_code == 422
    outside = httpx.get(f"{ui}/view", params={"repo": "demo", "path": "../../etc/passwd"})
    assert outside.status_code == 404 and set(outside.json()) == {"error", "error_type"}
    assert httpx.get(f"{ui}/view", params={"repo": "nope", "path": "web/banner.py"}).status_code == 404
    ranked = httpx.get(f"{ui}/api/search", params={"q": "banner", "rerank": "true", "limit": 2}, timeout=60)
    assert ranked.status_code == 200 and len(ranked.json()["hits"]) == 2
