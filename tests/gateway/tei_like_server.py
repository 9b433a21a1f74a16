"""A tiny stand-in for Hugging Face text-embeddings-inference (TEI), for the gateway's tests.

It speaks TEI's JSON only, as a TEI server does: ``GET /info`` with TEI's fields (valid against TEI's
``Info`` schema), ``GET /health``, and ``POST /embed`` answering a JSON list of vectors, one per input,
each a fixed function of its text (:func:`vector`). No binary format (an ``Accept`` header asking for
embedfleet's is ignored, as TEI ignores it), no per-input token counts. Errors are TEI's: a batch over
``max_client_batch_size`` or an input over ``MAX_INPUT_CHARS`` characters without ``truncate`` is a 413
``{"error", "error_type": "Validation"}``.

It runs in a thread of the test process (``with TeiLikeServer() as tei: ... tei.url``) on a free loopback
port, and records what it was sent (:attr:`TeiLikeServer.batches`, :attr:`TeiLikeServer.accepts`).
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

import numpy as np

DIMENSION = 16
MAX_INPUT_CHARS = 200
"""Inputs longer than this are "too many tokens" (a TEI server counts tokens; characters do here)."""


def vector(text: str) -> np.ndarray:
    """The unit float32 vector this server answers for ``text`` (the same on every call)."""
    seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    v = np.random.default_rng(seed).standard_normal(DIMENSION).astype(np.float32)
    return (v / np.linalg.norm(v)).astype(np.float32)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up mid-answer (a gateway stopping) is no error of the server's; others are."""
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class TeiLikeServer:
    """The stand-in server, in a thread; always stopped by ``with``."""

    def __init__(self, max_client_batch_size: int = 4) -> None:
        self.max_client_batch_size = max_client_batch_size
        self.batches: list[list[str]] = []
        """The inputs of every /embed call answered 200, in arrival order."""
        self.accepts: list[str] = []
        """The ``Accept`` header of every /embed call ("" where absent)."""
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="tei-like-server", daemon=True)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def info(self) -> dict[str, Any]:
        """``GET /info``, with the fields TEI 1.x answers."""
        return {
            "model_id": "tei-like/tiny-embedder", "model_sha": "0123456789abcdef0123456789abcdef01234567",
            "model_dtype": "float32", "model_type": {"embedding": {"pooling": "mean"}},
            "max_concurrent_requests": 512, "max_input_length": 64, "max_batch_tokens": 16384,
            "max_batch_requests": None, "max_client_batch_size": self.max_client_batch_size, "auto_truncate": False,
            "tokenization_workers": 1, "version": "1.5.0", "sha": None, "docker_label": None,
            "served_model_name": "tei-like/tiny-embedder",
        }

    def embed(self, body: dict[str, Any]) -> tuple[int, Any]:
        """``POST /embed``: the status and the JSON body."""
        inputs = body.get("inputs")
        texts = [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            return 422, {"error": "Json deserialize error: inputs", "error_type": "Validation"}
        if not texts:
            return 400, {"error": "`inputs` cannot be empty", "error_type": "Empty"}
        if len(texts) > self.max_client_batch_size:
            return 413, {"error": f"batch size {len(texts)} > maximum allowed batch size "
                                  f"{self.max_client_batch_size}", "error_type": "Validation"}
        for text in texts:
            if len(text) > MAX_INPUT_CHARS and not body.get("truncate"):
                return 413, {"error": f"Input validation error: `inputs` must have less than 64 tokens. "
                                      f"Given: {len(text)}", "error_type": "Validation"}
        with self._lock:
            self.batches.append(list(texts))
        return 200, [vector(t).tolist() for t in texts]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the gateway's client expects

            def _answer(self, status: int, body: Any | None) -> None:
                data = b"" if body is None else json.dumps(body).encode()
                self.send_response(status)
                if body is not None:
                    self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/info":
                    self._answer(200, server.info())
                elif self.path == "/health":
                    self._answer(200, None)
                else:
                    self._answer(404, {"error": "not found", "error_type": "NotFound"})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"null")
                if self.path != "/embed" or not isinstance(body, dict):
                    self._answer(404, {"error": "not found", "error_type": "NotFound"})
                    return
                with server._lock:
                    server.accepts.append(self.headers.get("accept", ""))
                self._answer(*server.embed(body))

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: the tests read what the server recorded instead."""

        return Handler

    def __enter__(self) -> TeiLikeServer:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
