"""Every metric and label the Grafana dashboard queries exists on a real ``embedfleet serve``.

The PromQL of each panel is read with a small, well-defined extraction rather than a full parser:
metric names are the identifiers that start with ``embedfleet_`` or ``te_`` (our two prefixes); labels are
the names inside ``by``/``without``/``on``/``ignoring``/``group_left``/``group_right`` lists, in ``{...}``
matchers and in ``{{...}}`` legends. A metric name must be a sample name of the gateway's or a worker's
/metrics; a label must be on a sample of one of its expression's metrics, or be ``le`` of a histogram
bucket, or a label Prometheus adds to every target (``instance``, ``job``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from embedfleet.deploy.files import dashboard
from tests.helpers import ServeProcess, free_port

pytestmark = pytest.mark.slow

METRIC = re.compile(r"\b((?:embedfleet|te)_[A-Za-z0-9_:]+)")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
MATCHERS = re.compile(r"(?<!\{)\{([^{}]*)\}(?!\})")
LEGEND = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
TARGET_LABELS = {"instance", "job"}
"""Labels Prometheus adds to every scraped series."""


def labels_of(expr: str, legend: str) -> set[str]:
    """The label names an expression (and its legend) use."""
    names: set[str] = set()
    for group in GROUPING.findall(expr):
        names |= {n.strip() for n in group.split(",") if n.strip()}
    for matcher in MATCHERS.findall(expr):
        names |= {m.group(1) for m in re.finditer(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", matcher)}
    return names | set(LEGEND.findall(legend))


def test_extraction_reads_promql() -> None:
    expr = ('sum by (route, status) (rate(embedfleet_x_count{route="/embed", model=~"a.*"}[5m])) '
            '/ ignoring (result) group_left sum(te_y)')
    assert METRIC.findall(expr) == ["embedfleet_x_count", "te_y"]
    assert labels_of(expr, "{{route}} {{ model }}") == {"route", "status", "model", "result"}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Iterator[ServeProcess]:
    tmp = tmp_path_factory.mktemp("dashboard")
    low = 21000 + free_port() % 20000
    config = tmp / "embedfleet.toml"
    config.write_text(f"""
[fleet]
state_dir = "{tmp / 'state'}"
port_range = "{low}-{low + 20}"

[[fleet.instances]]
name = "embed"
model = "default"
threads = 1

[gateway]
cache = "lmdb://{tmp / 'cache'}"
""")
    with ServeProcess(["--config", str(config)], data_dir, tmp / "log",
                      env={"EMBEDFLEET_FLEET_DATA_DIR": str(data_dir)}) as proc:
        yield proc


def samples(exposition: str) -> dict[str, set[str]]:
    """Sample names with the label names they carry."""
    found: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            found.setdefault(sample.name, set()).update(sample.labels)
    return found


def test_every_dashboard_query_names_metrics_and_labels_that_exist(fleet: ServeProcess) -> None:
    for _ in range(2):  # a miss, then a hit
        r = fleet.post("/embed", {"inputs": ["what the dashboard shows"]})
        assert r.status_code == 200, r.text
    (worker,) = fleet.admin("GET", "/instances").json()["instances"]
    exposed = samples(fleet.get("/metrics").text)
    for name, labels in samples(httpx.get(f"http://127.0.0.1:{worker['port']}/metrics", timeout=30).text).items():
        exposed.setdefault(name, set()).update(labels)

    targets: list[dict[str, Any]] = [t for p in dashboard()["panels"] for t in p["targets"]]
    assert len(targets) >= 15
    problems = []
    for target in targets:
        expr, legend = target["expr"], target.get("legendFormat", "")
        names = METRIC.findall(expr)
        if not names:
            problems.append(f"no metric in {expr!r}")
        missing = [n for n in names if n not in exposed]
        problems += [f"metric {n} (in {expr!r}) is not exposed" for n in missing]
        known = set().union(*(exposed.get(n, set()) for n in names)) | TARGET_LABELS
        if any(n.endswith("_bucket") for n in names):
            known.add("le")
        problems += [f"label {label!r} (in {expr!r}) is on none of {names}"
                     for label in sorted(labels_of(expr, legend) - known)]
    assert problems == []
    # What the panels group by is there with real values, not only as names.
    assert "/embed" in fleet.get("/metrics").text
    assert {"result"} <= exposed["embedfleet_cache_lookups_total"]
    assert {"model", "upstream"} <= exposed["embedfleet_upstream_healthy"]
    assert {"state"} <= exposed["embedfleet_instances"]
