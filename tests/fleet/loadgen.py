"""Client load for the fleet tests: every request's outcome is counted, so no failure can go unseen.

A request either gets a valid answer, an HTTP error (counted by status), a transport error (counted by
exception type) or another exception (an unreadable body, say): :class:`Outcomes` keeps the totals, and
:meth:`Outcomes.assert_all_ok` checks that every request sent is accounted for and none failed.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import httpx

MAX_SAMPLES = 5


class Outcomes:
    """Thread-safe totals of what the requests got."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sent = 0
        self.ok = 0
        self.http_errors: Counter[int] = Counter()
        self.transport_errors: Counter[str] = Counter()
        self.other_errors: Counter[str] = Counter()
        self.samples: list[str] = []  # the first few failures, for the assertion message

    def post(self, client: httpx.Client, route: str, body: Any, vectors: int) -> httpx.Response | None:
        """POST ``body`` and count the outcome; OK means 200 with ``vectors`` embeddings. The response, if any."""
        with self._lock:
            self.sent += 1
        try:
            r = client.post(route, json=body)
            valid = r.status_code == 200 and len(r.json()) == vectors
        except httpx.TransportError as exc:
            self._failed(self.transport_errors, type(exc).__name__, repr(exc))
            return None
        except Exception as exc:  # e.g. a 200 whose body is not JSON: a failure too, never a dead thread
            self._failed(self.other_errors, type(exc).__name__, repr(exc))
            return None
        if valid:
            with self._lock:
                self.ok += 1
        else:
            self._failed(self.http_errors, r.status_code, f"{r.status_code} {r.text[:200]}")
        return r

    def _failed(self, counter: Counter[Any], key: Any, detail: str) -> None:
        with self._lock:
            counter[key] += 1
            if len(self.samples) < MAX_SAMPLES:
                self.samples.append(detail)

    @property
    def failed(self) -> int:
        """Requests that did not get a valid answer."""
        return sum(self.http_errors.values()) + sum(self.transport_errors.values()) + sum(self.other_errors.values())

    @property
    def answered(self) -> int:
        """Requests whose outcome is known (valid or not)."""
        return self.ok + self.failed

    def summary(self) -> str:
        """The totals, for assertion messages."""
        return (f"sent={self.sent} ok={self.ok} http={dict(self.http_errors)} "
                f"transport={dict(self.transport_errors)} other={dict(self.other_errors)} samples={self.samples}")

    def assert_all_ok(self, at_least: int = 1) -> None:
        """Every request sent has an outcome, all of them valid, and at least ``at_least`` of them."""
        assert self.answered == self.sent, f"requests without an outcome: {self.summary()}"
        assert self.failed == 0, f"failed requests: {self.summary()}"
        assert self.ok >= at_least, f"fewer than {at_least} requests answered: {self.summary()}"


class Load:
    """Four client threads posting 3 new texts per request to /embed until stopped."""

    def __init__(self, url: str, tag: str, threads: int = 4) -> None:
        self.url, self.tag = url, tag
        self.outcomes = Outcomes()
        self._done = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(threads)]

    def _run(self, k: int) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as client:
            i = 0
            while not self._done.is_set():
                self.outcomes.post(client, "/embed", {"inputs": [f"{self.tag} {k} {i} {j}" for j in range(3)]}, 3)
                i += 1

    def wait_for(self, more: int, timeout: float = 60) -> None:
        """Until ``more`` further requests have an outcome (with a deadline)."""
        target, deadline = self.outcomes.answered + more, time.monotonic() + timeout
        while self.outcomes.answered < target and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.outcomes.answered >= target, f"load stalled: {self.outcomes.summary()}"

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self._done.set()
        for t in self._threads:
            t.join(timeout=120)
        if exc_type is None:  # never mask the test's own failure
            assert not any(t.is_alive() for t in self._threads), f"a client thread hangs: {self.outcomes.summary()}"
