"""The client host of the namespace cluster: one-shot requests, and a bounded load loop that load-balances
over the gateways. Run inside the client's namespace (``ip netns exec``); standard library only, so it
starts fast. Prints JSON.

    client.py get URL [--timeout S]
    client.py post URL JSON
    client.py load --gateway URL --gateway URL [--concurrency 4] [--batch 4] [--prefix P] [--duration 60]

``load`` runs ``concurrency`` threads, each sending one request at a time: a batch of ``batch`` new texts
(``--repeat`` instead cycles over that many batches, so they become hits), to the gateways in turn. A
request that fails (connection refused or dropped, timeout, 5xx) marks its gateway down for a moment and
is sent once more to the other gateway, as a load balancer with passive health checks would
(``proxy_next_upstream``). One JSON line per request as it completes, then a summary line; SIGTERM stops
it after the requests under way.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import signal
import sys
import threading
import time
from typing import Any
from urllib.parse import urlsplit

DOWN_S = 2.0
"""How long a gateway that failed a request is skipped (unless every gateway is)."""


def request(method: str, url: str, body: Any = None, timeout: float = 60.0) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection: status, headers (lower-case names), body."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        headers = {} if body is None else {"content-type": "application/json"}
        conn.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), body=data, headers=headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def classify(exc: BaseException) -> str:
    """``refused`` (never reached the gateway) or ``dropped`` (was under way on it), or the status."""
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    return f"dropped: {type(exc).__name__}"


class Balancer:
    """Round robin over the gateways, skipping one for :data:`DOWN_S` after it failed a request."""

    def __init__(self, gateways: list[str]) -> None:
        self.gateways = gateways
        self.down_until = [0.0] * len(gateways)
        self.turn = itertools.count()
        self.lock = threading.Lock()

    def pick(self) -> int:
        with self.lock:
            start = next(self.turn)
            now = time.monotonic()
            for k in range(len(self.gateways)):
                i = (start + k) % len(self.gateways)
                if self.down_until[i] <= now:
                    return i
            return start % len(self.gateways)

    def failed(self, i: int) -> None:
        with self.lock:
            self.down_until[i] = time.monotonic() + DOWN_S


def embed_once(url: str, texts: list[str]) -> tuple[str | None, str]:
    """POST /embed: (None, X-Cache) when answered, else (the failure, "")."""
    try:
        status, headers, body = request("POST", f"{url}/embed", {"inputs": texts})
    except (OSError, http.client.HTTPException) as exc:
        return classify(exc), ""
    if status != 200:
        return f"status {status}", ""
    vectors = json.loads(body)
    if len(vectors) != len(texts):
        return "wrong answer", ""
    return None, headers.get("x-cache", "")


def load(args: argparse.Namespace) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    balancer = Balancer(args.gateway)
    numbers = itertools.count()
    out_lock = threading.Lock()
    totals = {"requests": 0, "ok": 0, "failed": 0, "retried": 0, "dropped": 0, "refused": 0, "hits": 0,
              "max_seconds": 0.0}
    deadline = time.monotonic() + args.duration

    def emit(record: dict[str, Any]) -> None:
        with out_lock:
            sys.stdout.write(json.dumps(record) + "\n")
            sys.stdout.flush()
            totals["requests"] += 1
            totals["ok" if record["ok"] else "failed"] += 1
            totals["retried"] += record["retried"]
            totals["max_seconds"] = max(totals["max_seconds"], record["seconds"])
            totals["hits"] += record["cache"] == "hit"
            first = record["first_error"] or ""
            totals["dropped"] += first.startswith("dropped")
            totals["refused"] += first == "refused"

    def run() -> None:
        while not stop.is_set() and time.monotonic() < deadline:
            n = next(numbers)
            if args.requests and n >= args.requests:
                return
            batch = n % args.repeat if args.repeat else n
            texts = [f"{args.prefix} request {batch} text {j}" for j in range(args.batch)]
            started = time.monotonic()
            first = balancer.pick()
            error, cache = embed_once(args.gateway[first], texts)
            record: dict[str, Any] = {"n": n, "first": first, "first_error": error, "retried": False}
            served = first
            if error is not None:
                balancer.failed(first)
                served = (first + 1) % len(args.gateway)
                record["retried"] = True
                error, cache = embed_once(args.gateway[served], texts)
            record.update(ok=error is None, error=error, served=served, cache=cache,
                          seconds=round(time.monotonic() - started, 4), at=round(time.time(), 4))
            emit(record)

    threads = [threading.Thread(target=run) for _ in range(args.concurrency)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    totals["seconds"] = round(time.monotonic() - started, 3)
    sys.stdout.write(json.dumps({"summary": totals}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    get = sub.add_parser("get")
    get.add_argument("url")
    get.add_argument("--timeout", type=float, default=30.0)
    post = sub.add_parser("post")
    post.add_argument("url")
    post.add_argument("body")
    post.add_argument("--timeout", type=float, default=60.0)
    run = sub.add_parser("load")
    run.add_argument("--gateway", action="append", required=True)
    run.add_argument("--concurrency", type=int, default=4)
    run.add_argument("--batch", type=int, default=4)
    run.add_argument("--repeat", type=int, default=0, help="cycle over this many batches (0: always new texts)")
    run.add_argument("--requests", type=int, default=0, help="stop after this many (0: no limit)")
    run.add_argument("--prefix", default="load")
    run.add_argument("--duration", type=float, default=60.0)
    args = parser.parse_args()
    if args.command == "load":
        load(args)
        return
    try:
        status, headers, body = request(args.command.upper(), args.url,
                                        json.loads(args.body) if args.command == "post" else None, args.timeout)
    except (OSError, http.client.HTTPException) as exc:
        status, headers, body = 0, {}, str(exc).encode()
    print(json.dumps({"status": status, "headers": headers, "body": body.decode(errors="replace")}))


if __name__ == "__main__":
    main()
