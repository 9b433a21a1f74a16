"""Schemathesis runs against a real worker and a real gateway, with TEI's OpenAPI document and our own.

Each run is seeded (hypothesis derandomised, no example database) and bounded by a fixed number of
examples per operation, positive and negative. It must find no 5xx and no answer that breaks the
document. Where we differ from TEI's document on purpose (README, "Errors"), the checks say so: a
request TEI refuses with 413 (too many inputs) is a 422 here, and the edge's own errors (404, 405, 413
``PayloadTooLarge``) carry error types TEI's enum lacks, so TEI's status codes are not checked, only
the bodies of the statuses it documents. Our own document is checked in full.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import GatewayProcess, WorkerProcess

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.core.failures import FailureGroup  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

TEI_DOCUMENT = Path(__file__).parent / "data" / "tei-openapi.json"


@schemathesis.serializer("application/vnd.apache.arrow.stream")
def _arrow_body(ctx: Any, value: Any) -> bytes:
    """The gateway's Arrow routes take raw bytes: the generated ones are sent as they are (they are no Arrow
    stream, so the gateway must refuse them with a 4xx, never fail)."""
    return value if isinstance(value, bytes) else str(value).encode()

EXAMPLES = 8
"""Examples per operation and generation mode: ~12 operations x 2 modes x 12 = ~300 requests a run."""


@pytest.fixture(scope="module")
def servers(start_worker: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    worker: WorkerProcess = start_worker()  # type: ignore[operator]
    log_dir = tmp_path_factory.mktemp("fuzz")
    gateway = GatewayProcess(["--upstream", worker.url, "--cache", "memory://"], log_dir, log_dir).start()
    yield {"worker": worker.url, "gateway": gateway.url}
    log = gateway.log()
    gateway.stop()
    assert "Traceback" not in log, log[-4000:]


def _fuzz(document: dict[str, Any], base_url: str, checks: list[Any]) -> list[str]:
    """Run every operation of ``document`` against ``base_url``; the failures, one line each."""
    schema = schemathesis.openapi.from_dict(document)
    failures: list[str] = []
    for result in schema.get_all_operations():
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            with contextlib.suppress(hypothesis.errors.Unsatisfiable):  # no negative case (GET /health)
                _run(result.ok(), mode, base_url, checks, failures)
    return failures


def _run(operation: Any, mode: Any, base_url: str, checks: list[Any], failures: list[str]) -> None:
    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck), phases=[hypothesis.Phase.generate])
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        try:
            case.call_and_validate(base_url=base_url, checks=checks, timeout=60)
        except FailureGroup as exc:
            failures.append(f"{operation.label} ({mode.value}): " + " | ".join(str(exc).splitlines()[:12]))

    run()


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("target", ["worker", "gateway"])
@pytest.mark.parametrize("document", ["tei", "ours"])
def test_fuzzing_finds_no_server_error_and_no_answer_off_the_document(servers: dict[str, str], target: str,
                                                                       document: str) -> None:
    import httpx

    base_url = servers[target]
    if document == "tei":
        doc = json.loads(TEI_DOCUMENT.read_text())
        checks = [not_a_server_error, response_schema_conformance, content_type_conformance]
    else:
        doc = httpx.get(f"{base_url}/openapi.json", timeout=30).json()
        checks = [not_a_server_error, response_schema_conformance, content_type_conformance, status_code_conformance]
    failures = _fuzz(doc, base_url, checks)
    assert not failures, "\n".join(failures)
