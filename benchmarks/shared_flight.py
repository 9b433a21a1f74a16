"""Cross-gateway single-flight: upstream inputs per unique text when 8 clients send identical new batches
through 2 gateways sharing one Redis, with leases (the default) and without (``--no-cache-leases``).

Real processes on 127.0.0.1: one ``embedfleet worker`` (default model), a ``redis-server``, and two
gateways with 1-byte memory tiers (so that only Redis and its leases can share work). Each round sends
one batch of ``--texts`` new texts from ``--clients`` clients at once, alternating gateways; the figure is
the sum of ``embedfleet_upstream_inputs_total`` over both gateways divided by the unique texts (target:
<= 1.1x with leases). Counts, not timings, but run it under the bench lock like every benchmark:

    flock /tmp/embedfleet-bench.lock python benchmarks/shared_flight.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.cache.redis_server import RedisServer  # noqa: E402 - after the path set-up
from tests.helpers import GatewayProcess, WorkerProcess  # noqa: E402

TARGET = 1.1


async def round_(gateways: list[GatewayProcess], texts: list[str], clients: int) -> None:
    async with httpx.AsyncClient(timeout=120) as client:
        async def one(i: int) -> None:
            r = await client.post(f"{gateways[i % len(gateways)].url}/embed", json={"inputs": texts})
            r.raise_for_status()

        await asyncio.gather(*(one(i) for i in range(clients)))


def measure(worker: WorkerProcess, leases: bool, args: argparse.Namespace, logs: Path) -> dict[str, float]:
    with RedisServer() as redis:
        flag = "--cache-leases" if leases else "--no-cache-leases"
        gateways = [GatewayProcess(["--upstream", worker.url, "--cache", redis.url, "--memory-cache-bytes", "1", flag],
                                   logs / f"{flag}-{i}", logs / f"{flag}-{i}") for i in range(2)]
        try:
            for g in gateways:
                g.start()
            for r in range(args.rounds):
                asyncio.run(round_(gateways, [f"{flag} round {r} text {i}" for i in range(args.texts)], args.clients))
            upstream = sum(g.metric("embedfleet_upstream_inputs_total") for g in gateways)
            joined = sum(g.metric("embedfleet_cache_shared_flights_total", result="joined") for g in gateways)
        finally:
            for g in gateways:
                g.stop()
    unique = args.rounds * args.texts
    return {"unique_texts": unique, "upstream_inputs": upstream, "ratio": round(upstream / unique, 3),
            "joined_from_other_gateway": joined}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--texts", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "shared_flight.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="embedfleet-shared-flight-") as tmp:
        logs = Path(tmp)
        with WorkerProcess(["--model", "default", "--max-client-batch-size", "64"], logs / "data", logs / "worker") \
                as worker:
            results = {"leases": measure(worker, True, args, logs), "no_leases": measure(worker, False, args, logs)}
    print(f"{'gateways x clients':<20} {'unique':>7} {'upstream':>9} {'ratio':>7}")
    for name, row in results.items():
        print(f"{name:<20} {row['unique_texts']:>7} {row['upstream_inputs']:>9.0f} {row['ratio']:>6.2f}x")
    ratio = results["leases"]["ratio"]
    print(f"with leases: {ratio:.2f}x the unique texts (target <= {TARGET}x): {'PASS' if ratio <= TARGET else 'FAIL'}")
    document = {"benchmark": "shared_flight", "gateways": 2, **vars(args), "out": str(args.out), **results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(document))


if __name__ == "__main__":
    main()
