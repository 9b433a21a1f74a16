"""A hung worker under ``embedfleet serve``: restarted after ``health_failures`` failed checks, with a growing
back-off, and ``failed`` after ``max_restarts`` restarts within ``restart_window``.

The worker hangs for real (SIGSTOP); later replacements are killed as soon as they appear, so the
restart budget runs out in seconds. Everything stopped is continued (or gone) when the test ends.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from tests.fleet.procs import assert_gone, one_worker_config
from tests.helpers import ServeProcess

pytestmark = pytest.mark.slow

HEALTH_FAILURES = 2
MAX_RESTARTS = 2
NOTE = re.compile(r"^\[embedfleet (\S+)\] (.*)$", re.DOTALL)  # a note may carry a log tail


def _config(tmp: Path, data_dir: Path) -> Path:
    return one_worker_config(tmp, data_dir, health_interval=0.2, health_failures=HEALTH_FAILURES,
                             max_restarts=MAX_RESTARTS, restart_window=600, stop_timeout=1)


@pytest.fixture
def fleet(tmp_path: Path, data_dir: Path) -> Iterator[ServeProcess]:
    proc = ServeProcess(["--config", str(_config(tmp_path, data_dir))], data_dir, tmp_path / "log")
    with proc:
        yield proc


def _notes(fleet: ServeProcess, name: str) -> list[tuple[datetime, str]]:
    """The supervisor's own lines in an instance's log: (time, message)."""
    lines = fleet.admin("GET", f"/instances/{name}/logs?tail=1000").json()["lines"]
    notes = []
    for line in lines:
        m = NOTE.match(line)
        if m:
            notes.append((datetime.fromisoformat(m.group(1).replace("Z", "+00:00")), m.group(2)))
    return notes


def test_a_hung_worker_is_restarted_with_growing_backoff_then_failed(fleet: ServeProcess) -> None:
    first = fleet.instance("embed")
    assert first["state"] == "running" and first["pid"]
    stopped: list[int] = []
    try:
        os.kill(first["pid"], signal.SIGSTOP)  # alive, port open, answers nothing: hung
        stopped.append(first["pid"])
        # Each check of a hung worker waits for the supervisor's 5 s health timeout.
        second = fleet.wait_instance("embed", lambda i: i["state"] == "running" and i["pid"] not in (None, *stopped),
                                     timeout=120)
        assert second["restarts"] == 1 and second["last_error"] is None
        assert fleet.metric("embedfleet_health_check_failures_total", instance="embed") >= HEALTH_FAILURES
        assert any(f"{HEALTH_FAILURES} health checks failed in a row" in n for _, n in _notes(fleet, "embed"))

        # Every replacement dies as soon as it appears: the restart budget runs out.
        seen = [first["pid"]]
        deadline = time.monotonic() + 120
        last = second
        while last["state"] != "failed" and len(seen) <= MAX_RESTARTS + 2:
            assert time.monotonic() < deadline, f"never failed: {last}\n{fleet.log()[-3000:]}"
            if last["pid"] is not None and last["pid"] not in seen:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(last["pid"], signal.SIGKILL)
                seen.append(last["pid"])
            time.sleep(0.05)
            last = fleet.instance("embed")
    finally:
        for pid in stopped:  # nothing stays stopped behind the test (the fleet has killed it by now)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    assert last["state"] == "failed" and last["pid"] is None, last
    assert last["restarts"] == MAX_RESTARTS, last
    assert len(seen) == MAX_RESTARTS + 1  # the hung one, then one per restart
    notes = _notes(fleet, "embed")
    assert any(f"gave up after {MAX_RESTARTS} restarts" in n for _, n in notes), notes

    # The back-off grows: each "restarting in X s" says so, and the next start really came X s later.
    waits = []
    for k, (at, note) in enumerate(notes):
        m = re.search(r"restarting in ([\d.]+)s$", note)
        if m:
            started = next(t for t, n in notes[k + 1:] if n.startswith("starting on port"))
            waits.append((float(m.group(1)), (started - at).total_seconds()))
    assert [said for said, _ in waits] == [1.0, 2.0], waits
    assert all(took >= said - 0.05 for said, took in waits), waits
    assert fleet.metric("embedfleet_instance_restarts_total", instance="embed") == MAX_RESTARTS
    assert_gone(seen)
