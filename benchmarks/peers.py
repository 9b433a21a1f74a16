"""The worker benchmark's peers: infinity-emb in a virtualenv of its own, and sentence-transformers in a
child process.

infinity-emb 0.0.78 needs transformers < 5 and this project runs transformers 5, so the benchmark builds
infinity a separate virtualenv, once, outside the repository (``~/.cache/embedfleet-bench/infinity-0.0.78``,
or under ``$EMBEDFLEET_BENCH_CACHE``). The build pins torch to the release the project runs (2.13.0, CPU),
on the pip command line and in a constraints file, and checks with ``pip install --dry-run --report``
first that pip would install exactly that torch and no other; it holds ``/tmp/pip.lock`` while pip runs
(one pip at a time on a shared machine). Whatever goes wrong is returned as a reason to skip the infinity
rows, never raised. Nothing downloads a model: infinity serves the default model's local folder, with
``HF_HUB_OFFLINE=1``.

``python benchmarks/peers.py`` builds (or checks) the virtualenv and prints where it is or why not.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx

INFINITY_VERSION = "0.0.78"
TORCH_PIN = "torch==2.13.0"  # the project's torch; pip takes the CPU build on this machine's disk
TRANSFORMERS_PIN = "transformers<5"
PIP_LOCK = Path("/tmp/pip.lock")
BUILD_TIMEOUT_S = 1800.0
READY_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 30.0
COMPLETE_MARK = ".embedfleet-bench-complete"  # written last: a half-built venv is rebuilt


def cache_root() -> Path:
    """Where the benchmark keeps what it builds outside the repository."""
    configured = os.environ.get("EMBEDFLEET_BENCH_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "embedfleet-bench"


def infinity_venv() -> Path:
    """The infinity-emb virtualenv's folder."""
    return cache_root() / f"infinity-{INFINITY_VERSION}"


@contextlib.contextmanager
def _pip_lock() -> Iterator[None]:
    with open(PIP_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _run(cmd: Sequence[str], log: IO[str] | None = None) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(list(cmd), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         timeout=BUILD_TIMEOUT_S, check=False)
    if log is not None:
        log.write(f"$ {' '.join(cmd)}\n{out.stdout[-3000:]}{out.stderr[-3000:]}\n")
    return out


def _base_python() -> str:
    """The interpreter this process's virtualenv was made from (a venv of a venv is made from it anyway)."""
    return getattr(sys, "_base_executable", None) or sys.executable


def _installed_versions(python: Path) -> dict[str, str] | str:
    """torch, transformers and infinity_emb versions in ``python``'s environment, or why not."""
    probe = ("import importlib.metadata as m, json; "
             "print(json.dumps({p: m.version(p) for p in ('torch', 'transformers', 'infinity_emb')}))")
    out = _run([str(python), "-c", probe])
    if out.returncode != 0:
        return f"the infinity venv does not import: {out.stderr.strip()[-500:]}"
    versions: dict[str, str] = json.loads(out.stdout)
    return versions


def _versions_ok(versions: dict[str, str]) -> str | None:
    """Why these versions are not the ones wanted; None when they are."""
    if versions["torch"].split("+")[0] != TORCH_PIN.split("==")[1]:
        return f"torch {versions['torch']} in the infinity venv, not {TORCH_PIN}"
    if int(versions["transformers"].split(".")[0]) >= 5:
        return f"transformers {versions['transformers']} in the infinity venv, want {TRANSFORMERS_PIN}"
    if versions["infinity_emb"] != INFINITY_VERSION:
        return f"infinity_emb {versions['infinity_emb']} in the infinity venv, want {INFINITY_VERSION}"
    return None


def ensure_infinity_venv(say: Any = print) -> Path | str:
    """The ``infinity_emb`` command of a ready virtualenv (building it on first use), or why there is none.

    ``say`` gets one line per step (the build takes minutes the first time)."""
    venv = infinity_venv()
    python, command = venv / "bin" / "python", venv / "bin" / "infinity_emb"
    if (venv / COMPLETE_MARK).exists() and command.exists():
        versions = _installed_versions(python)
        if isinstance(versions, str):
            return versions
        return _versions_ok(versions) or command
    say(f"building the infinity-emb {INFINITY_VERSION} virtualenv in {venv} (once; a few minutes)")
    build_log = venv.parent / f"infinity-{INFINITY_VERSION}-build.log"
    try:
        venv.parent.mkdir(parents=True, exist_ok=True)
        with open(build_log, "w") as log, _pip_lock():
            if _run([_base_python(), "-m", "venv", "--clear", str(venv)], log).returncode != 0:
                return f"could not create the infinity venv (see {build_log})"
            constraints = venv / "constraints.txt"
            constraints.write_text(f"{TORCH_PIN}\n{TRANSFORMERS_PIN}\n")
            wanted = [f"infinity-emb[server,torch]=={INFINITY_VERSION}", TORCH_PIN, TRANSFORMERS_PIN]
            pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-c", str(constraints)]
            with tempfile.NamedTemporaryFile(suffix=".json") as report:
                dry = _run([*pip, "--dry-run", "--quiet", "--report", report.name, *wanted], log)
                if dry.returncode != 0:
                    return f"pip cannot resolve infinity-emb {INFINITY_VERSION} here (see {build_log})"
                plan = {item["metadata"]["name"].lower(): item["metadata"]["version"]
                        for item in json.loads(Path(report.name).read_text())["install"]}
            torch = plan.get("torch")
            if torch is None or torch.split("+")[0] != TORCH_PIN.split("==")[1] or \
                    (torch.count("+") and not torch.endswith("+cpu")):
                return f"pip would install torch {torch} in the infinity venv, not {TORCH_PIN} (CPU); not built"
            say(f"  pip plan: torch {torch}, transformers {plan.get('transformers')}, "
                f"infinity_emb {plan.get('infinity-emb') or plan.get('infinity_emb')}; installing")
            if _run([*pip, *wanted], log).returncode != 0:
                return f"pip install of infinity-emb {INFINITY_VERSION} failed (see {build_log})"
        versions = _installed_versions(python)
        if isinstance(versions, str):
            return versions
        if (why := _versions_ok(versions)) is not None:
            return why
    except (OSError, subprocess.TimeoutExpired, ValueError, KeyError) as exc:
        return f"building the infinity venv failed: {type(exc).__name__}: {exc}"
    (venv / COMPLETE_MARK).write_text(json.dumps(versions) + "\n")
    say(f"  built: {versions}")
    return command


def proc_peak_rss_mb(pid: int) -> float | None:
    """A process's RSS high-water mark (``VmHWM``) in MiB; None where /proc cannot tell."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


@dataclass
class InfinityServer:
    """A running ``infinity_emb v2`` (see :func:`infinity_server`)."""

    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log_tail(self, chars: int = 4000) -> str:
        """The end of what the server printed."""
        return self.log_path.read_text(errors="replace")[-chars:]

    def peak_rss_mb(self) -> float | None:
        """The server process's RSS high-water mark in MiB."""
        return proc_peak_rss_mb(self.proc.pid)


@contextlib.contextmanager
def infinity_server(command: Path, model_path: Path, dtype: str, port: int, log_path: Path
                    ) -> Iterator[InfinityServer]:
    """``infinity_emb v2`` serving the local model folder in ``dtype`` (float32 or bfloat16) with the torch
    engine on the CPU, on 127.0.0.1:``port``; yielded once /health answers 200 (RuntimeError with the log's
    tail if it exits or the deadline passes first); SIGTERM on the way out, SIGKILL if it does not stop."""
    cmd = [str(command), "v2", "--model-id", str(model_path), "--served-model-name", "default",
           "--engine", "torch", "--device", "cpu", "--dtype", dtype, "--batch-size", "32",
           "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1",
           "INFINITY_ANONYMOUS_USAGE_STATS": "0"}
    env.pop("PYTHONPATH", None)  # the project's sources are not for infinity's interpreter
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    server = InfinityServer(proc, f"http://127.0.0.1:{port}", log_path)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        with httpx.Client(base_url=server.url, timeout=5.0) as http:
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"infinity_emb --dtype {dtype} did not get ready:\n{server.log_tail()}")
                with contextlib.suppress(httpx.TransportError):
                    if http.get("/health").status_code == 200:
                        break
                time.sleep(0.25)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def st_child(model_path: str, dtype: str, texts_by_set: dict[str, list[str]], batch: int,
             warmup: bool = True) -> dict[str, Any]:
    """Run in a child process: sentence-transformers ``encode`` in ``dtype`` (float32 or bfloat16) over
    each text set, one warm-up then one timed pass; the rates, unit vectors (float32) and this process's
    peak RSS in MiB."""
    import numpy as np
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # no "Loading weights" bar
    model = SentenceTransformer(model_path, device="cpu")
    if dtype == "bfloat16":
        model.to(torch.bfloat16)
    rates: dict[str, float] = {}
    vectors: dict[str, Any] = {}
    for name, texts in texts_by_set.items():
        def encode(texts: list[str] = texts) -> Any:
            return model.encode(texts, batch_size=batch, normalize_embeddings=True, convert_to_numpy=True,
                                show_progress_bar=False)
        if warmup:
            encode()
        started = time.perf_counter()
        out = encode()
        rates[name] = len(texts) / (time.perf_counter() - started)
        vectors[name] = np.asarray(out, dtype=np.float32)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"rates": rates, "vectors": vectors, "peak_rss_mb": peak / 1024,
            "versions": {"torch": torch.__version__}}


if __name__ == "__main__":
    result = ensure_infinity_venv()
    print(result if isinstance(result, str) else f"ready: {result}")
    sys.exit(0 if isinstance(result, Path) else 1)
