"""The results of ``embedfleet bench``: the final table, the JSON document and the plot."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from embedfleet.bench.stats import PERCENTILES, RunStats

TEI_KEYS = ("mode", "num_texts", "batch_size", "num_requests", "total_duration_secs", "throughput_per_sec",
            "successful", "failed")
"""The keys of the TEI manager's bench client's JSON summary (texts are counted, as it does)."""


def _num(value: float, digits: int = 1) -> str:
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


def _rows(stats: RunStats) -> list[tuple[str, str]]:
    rows = [
        ("requests", f"{stats.successful:,} ok, {stats.failed:,} failed"),
        ("requests/s", _num(stats.requests_per_s())),
        ("embeddings/s", _num(stats.embeddings_per_s())),
        *((f"p{p} ms", _num(stats.latency_ms(p), 2)) for p in PERCENTILES),
        ("max ms", _num(stats.latency_ms(100), 2)),
        ("duration s", _num(stats.duration_s, 2)),
    ]
    ratio = stats.hit_ratio()
    rows.append(("cache hit ratio (X-Cache)", "n/a (the answers did not say)" if ratio is None else
                 f"{ratio:.3f}  ({stats.cache_hits:,} hits, {stats.cache_misses:,} misses)"))
    busy = stats.client_busy()
    if busy is not None:
        rows.append(("client busy (one core)", f"{busy:.0%}" + ("  [red]the client was the limit[/]"
                                                                  if busy >= 0.9 else "")))
    for key, count in stats.errors.most_common():
        rows.append((f"error {key}", f"{count:,}"))
    return rows


def results_table(name: str, stats: RunStats, title: str) -> Table:
    """One target's results."""
    table = Table(title=title, title_justify="left")
    table.add_column("")
    table.add_column(name, justify="right")
    for label, value in _rows(stats):
        table.add_row(label, value)
    return table


def compare_table(names: Sequence[str], runs: Sequence[RunStats], title: str) -> Table:
    """Two targets side by side, with the second's figures over the first's."""
    a, b = runs
    table = Table(title=title, title_justify="left")
    table.add_column("")
    for name in names:
        table.add_column(name, justify="right")
    table.add_column("B / A", justify="right")

    def ratio(x: float, y: float) -> str:
        return f"{y / x:.2f}x" if x and not (math.isnan(x) or math.isnan(y)) else "-"

    rows_a, rows_b = dict(_rows(a)), dict(_rows(b))
    ratios = {"requests/s": ratio(a.requests_per_s(), b.requests_per_s()),
              "embeddings/s": ratio(a.embeddings_per_s(), b.embeddings_per_s()),
              **{f"p{p} ms": ratio(a.latency_ms(p), b.latency_ms(p)) for p in PERCENTILES},
              "max ms": ratio(a.latency_ms(100), b.latency_ms(100))}
    for label in dict.fromkeys([*rows_a, *rows_b]):
        table.add_row(label, rows_a.get(label, "-"), rows_b.get(label, "-"), ratios.get(label, ""))
    return table


def ratios(a: RunStats, b: RunStats) -> dict[str, float | None]:
    """B over A for throughput and latency (None where either side has no figure)."""
    def over(x: float, y: float) -> float | None:
        return None if not x or math.isnan(x) or math.isnan(y) else round(y / x, 4)

    return {"requests_per_sec": over(a.requests_per_s(), b.requests_per_s()),
            "embeddings_per_sec": over(a.embeddings_per_s(), b.embeddings_per_s()),
            **{f"p{p}_ms": over(a.latency_ms(p), b.latency_ms(p)) for p in PERCENTILES}}


def document(mode: str, batch_size: int, stats: RunStats, **ours: Any) -> dict[str, Any]:
    """The JSON summary of one target: the TEI manager's bench-client keys first, then ours."""
    return {
        "mode": mode,
        "num_texts": stats.successful_texts + stats.failed_texts,
        "batch_size": batch_size,
        "num_requests": stats.successful + stats.failed,
        "total_duration_secs": round(stats.duration_s, 4),
        "throughput_per_sec": round(stats.embeddings_per_s(), 2),
        "successful": stats.successful_texts,
        "failed": stats.failed_texts,
        **ours,
        **stats.summary(),
    }


def plot(path: Path, runs: Mapping[str, RunStats]) -> None:
    """A PNG: each target's latency histogram and its throughput over time (needs ``embedfleet[bench]``)."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'embedfleet[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (hist, over_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, stats in runs.items():
        if stats.latencies_s:
            ms = np.asarray(stats.latencies_s) * 1000
            hist.hist(ms, bins=60, alpha=0.6, label=f"{name} (p50 {np.percentile(ms, 50):.2f} ms)")
        starts, rates = stats.timeline()
        over_time.plot(starts, rates, label=name, drawstyle="steps-post")
    hist.set(title="latency", xlabel="ms", ylabel="requests")
    over_time.set(title="throughput over time", xlabel="seconds", ylabel="embeddings/s")
    for ax in (hist, over_time):
        if ax.has_data():
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
