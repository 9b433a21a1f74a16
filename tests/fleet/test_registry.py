"""The model registry: discovery, ids, downloads (offline), verification in a child process, persistence."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from huggingface_hub import constants

from embedfleet.fleet.errors import FleetError, FleetErrorCode
from embedfleet.fleet.registry import ModelRecord, ModelRegistry, ModelState

COMMIT = "0123456789abcdef0123456789abcdef01234567"
T = TypeVar("T")


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the Hub, even when run without HF_HUB_OFFLINE=1 in the environment."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]) -> Path:
    """A Hugging Face hub cache holding the tiny reranker as ``test-org/tiny-reranker`` (refs/main)."""
    root = tmp_path_factory.mktemp("hf-cache")
    repo = root / "models--test-org--tiny-reranker"
    shutil.copytree(tiny_models["reranker"], repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "blobs").mkdir()
    (root / "datasets--test-org--some-data" / "snapshots" / COMMIT).mkdir(parents=True)  # not a model
    return root


@pytest.fixture
def empty_cache(tmp_path: Path) -> Path:
    return tmp_path / "no-hf-cache"  # does not exist: fine


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


async def until(registry: ModelRegistry, model_id: str, done: Callable[[ModelRecord], bool],
                timeout: float = 120.0) -> ModelRecord:
    """Poll a record until ``done`` holds, with a deadline."""
    deadline = time.monotonic() + timeout
    while True:
        record = registry.get(model_id)
        if done(record):
            return record
        if time.monotonic() > deadline:
            raise AssertionError(f"{model_id} still {record.state} after {timeout}s")
        await asyncio.sleep(0.05)


def expect(code: FleetErrorCode, coro: Awaitable[Any]) -> FleetError:
    with pytest.raises(FleetError) as info:
        run(coro)
    assert info.value.code is code, info.value.message
    return info.value


class Changes:
    """An on_change callback that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self) -> None:
        self.calls += 1


# ----- discovery -----


def test_scan_finds_default_and_hf_cache(hf_cache: Path, default_path: Path) -> None:
    changes = Changes()
    registry = ModelRegistry(on_change=changes, hf_cache_dir=hf_cache)
    new = run(registry.scan())
    assert [r.id for r in new] == ["test-org/tiny-reranker"]
    assert changes.calls == 1
    default = registry.get("default")
    assert (default.source, default.state, default.path) == ("packaged", ModelState.DOWNLOADED, str(default_path))
    hub = registry.get("test-org/tiny-reranker")
    assert (hub.source, hub.state, hub.sha, hub.revision) == ("hf-cache", ModelState.DOWNLOADED, COMMIT, None)
    assert hub.path == str(hf_cache / "models--test-org--tiny-reranker" / "snapshots" / COMMIT)
    assert [r.id for r in registry.list()] == ["default", "test-org/tiny-reranker"]
    assert run(registry.scan()) == []  # nothing new the second time
    assert changes.calls == 1


def test_scan_missing_cache_is_fine(empty_cache: Path) -> None:
    registry = ModelRegistry(hf_cache_dir=empty_cache)
    assert run(registry.scan()) == []
    assert [r.id for r in registry.list()] == ["default"]


def test_scan_keeps_restored_state(hf_cache: Path) -> None:
    registry = ModelRegistry(hf_cache_dir=hf_cache)
    registry.restore([{"id": "test-org/tiny-reranker", "state": "verified", "source": "registered", "path": "/x",
                       "task": "reranker", "dimension": 1, "updated_at": "2025-01-01T00:00:00.000Z"}])
    run(registry.scan())
    record = registry.get("test-org/tiny-reranker")
    assert (record.state, record.source, record.task) == (ModelState.VERIFIED, "registered", "reranker")


# ----- ids -----


@pytest.mark.parametrize("bad", ["../etc", "a/b/c", "", "   ", "x" * 97, "org/" + "n" * 93, "/no/such/folder",
                                 "org/na..me", "-org/name", "org/name.", "org name", "org/na--me", "~/models/x",
                                 "./model", "org/nämé"])
def test_invalid_ids(bad: str, empty_cache: Path) -> None:
    registry = ModelRegistry(hf_cache_dir=empty_cache)
    error = expect(FleetErrorCode.VALIDATION_ERROR, registry.add(bad))
    assert repr(bad.strip()) in error.message
    assert [r.id for r in registry.list()] == ["default"]


def test_add_hub_ids(empty_cache: Path) -> None:
    changes = Changes()
    registry = ModelRegistry(on_change=changes, hf_cache_dir=empty_cache)
    record = run(registry.add("BAAI/bge-small-en-v1.5"))
    assert (record.state, record.source, record.path) == (ModelState.AVAILABLE, "registered", None)
    assert run(registry.add("bert-base-uncased", revision="v1.0")).revision == "v1.0"
    assert run(registry.add("o/" + "n" * 94)).id == "o/" + "n" * 94  # 96 characters
    assert changes.calls == 3
    expect(FleetErrorCode.MODEL_EXISTS, registry.add("BAAI/bge-small-en-v1.5"))
    expect(FleetErrorCode.MODEL_EXISTS, registry.add("default"))
    expect(FleetErrorCode.VALIDATION_ERROR, registry.add("org/name", revision=""))
    with pytest.raises(FleetError, match=r"known: default, BAAI/bge-small-en-v1\.5"):
        registry.get("org/unknown")


def test_get_unknown() -> None:
    registry = ModelRegistry()
    with pytest.raises(FleetError) as info:
        registry.get("org/unknown")
    assert info.value.code is FleetErrorCode.MODEL_NOT_FOUND
    assert "default" in info.value.message


def test_add_hub_id_in_cache_is_downloaded(hf_cache: Path) -> None:
    registry = ModelRegistry(hf_cache_dir=hf_cache)
    record = run(registry.add("test-org/tiny-reranker"))
    assert (record.state, record.source, record.sha) == (ModelState.DOWNLOADED, "registered", COMMIT)


def test_add_local_folder(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    registry = ModelRegistry(hf_cache_dir=tmp_path / "none")
    link = tmp_path / "link"
    link.symlink_to(tiny_models["reranker"])
    record = run(registry.add(str(link)))
    assert record.id == str(tiny_models["reranker"].resolve())  # resolved: one folder, one id
    assert (record.state, record.source, record.path) == (ModelState.DOWNLOADED, "local", record.id)
    expect(FleetErrorCode.MODEL_EXISTS, registry.add(str(tiny_models["reranker"])))
    expect(FleetErrorCode.VALIDATION_ERROR, registry.add(str(tiny_models["splade"]), revision="main"))
    file = tmp_path / "file"
    file.write_text("x")
    expect(FleetErrorCode.VALIDATION_ERROR, registry.add(str(file)))


def test_remove(tmp_path: Path, empty_cache: Path) -> None:
    registry = ModelRegistry(hf_cache_dir=empty_cache)
    run(registry.add("org/name"))
    assert run(registry.remove("org/name")).id == "org/name"
    expect(FleetErrorCode.MODEL_NOT_FOUND, registry.remove("org/name"))
    expect(FleetErrorCode.VALIDATION_ERROR, registry.remove("default"))


# ----- downloads -----


def test_download_offline_fails_clearly(empty_cache: Path) -> None:
    changes = Changes()
    registry = ModelRegistry(on_change=changes, hf_cache_dir=empty_cache)
    run(registry.add("test-org/not-cached"))
    error = expect(FleetErrorCode.DOWNLOAD_FAILED, registry.download("test-org/not-cached", wait=True))
    assert "cannot download test-org/not-cached: no connection to the Hugging Face Hub (HF_HUB_OFFLINE is set)" \
        in error.message
    record = registry.get("test-org/not-cached")
    assert record.state is ModelState.FAILED and record.error == error.message
    assert changes.calls == 3  # added, downloading, failed


def test_download_in_background(empty_cache: Path) -> None:
    registry = ModelRegistry(hf_cache_dir=empty_cache)

    async def main() -> ModelRecord:
        await registry.add("test-org/not-cached")
        started = await registry.download("test-org/not-cached", wait=False)
        assert started.state is ModelState.DOWNLOADING
        return await until(registry, "test-org/not-cached", lambda r: r.state is not ModelState.DOWNLOADING)

    record = run(main())
    assert record.state is ModelState.FAILED and "HF_HUB_OFFLINE is set" in (record.error or "")


def test_download_from_cache_works_offline(hf_cache: Path) -> None:
    registry = ModelRegistry(hf_cache_dir=hf_cache)
    run(registry.scan())
    record = run(registry.download("test-org/tiny-reranker", wait=True))
    assert (record.state, record.sha, record.error) == (ModelState.DOWNLOADED, COMMIT, None)


def test_download_local_and_packaged_are_no_ops(tiny_models: dict[str, Path]) -> None:
    registry = ModelRegistry()
    assert run(registry.download("default", wait=True)).state is ModelState.DOWNLOADED
    run(registry.add(str(tiny_models["splade"])))
    assert run(registry.download(str(tiny_models["splade"]), wait=False)).state is ModelState.DOWNLOADED
    expect(FleetErrorCode.MODEL_NOT_FOUND, registry.download("org/unknown", wait=True))


# ----- verification (child processes) -----


def test_verify_broken_folder_fails(tmp_path: Path) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    registry = ModelRegistry(hf_cache_dir=tmp_path / "none")
    run(registry.add(str(broken)))
    error = expect(FleetErrorCode.VERIFY_FAILED, registry.verify(str(broken), wait=True))
    assert "no config.json" in error.message and str(broken) in error.message
    record = registry.get(str(broken))
    assert record.state is ModelState.FAILED and record.error == error.message
    assert record.path == str(broken)  # still there to fix and verify again


def test_verify_needs_files(empty_cache: Path) -> None:
    registry = ModelRegistry(hf_cache_dir=empty_cache)
    run(registry.add("org/name"))
    error = expect(FleetErrorCode.VALIDATION_ERROR, registry.verify("org/name", wait=True))
    assert "download it first" in error.message


def test_busy(tmp_path: Path) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    registry = ModelRegistry(hf_cache_dir=tmp_path / "none")

    async def main() -> ModelRecord:
        await registry.add(str(broken))
        started = await registry.verify(str(broken), wait=False)
        assert started.state is ModelState.VERIFYING
        for again in (registry.verify(str(broken), wait=True), registry.download(str(broken), wait=True),
                      registry.remove(str(broken))):
            with pytest.raises(FleetError) as info:
                await again
            assert info.value.code is FleetErrorCode.MODEL_BUSY
        return await until(registry, str(broken), lambda r: r.state is not ModelState.VERIFYING)

    assert run(main()).state is ModelState.FAILED
    expect(FleetErrorCode.VERIFY_FAILED, registry.verify(str(broken), wait=True))  # idle again


class Spawned:
    """The verification children a registry starts: ``asyncio.create_subprocess_exec``, wrapped to keep each
    process it returns (the registry holds them privately)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.processes: list[asyncio.subprocess.Process] = []
        real = asyncio.create_subprocess_exec

        async def spawn(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
            process = await real(*args, **kwargs)
            self.processes.append(process)
            return process

        monkeypatch.setattr(asyncio, "create_subprocess_exec", spawn)

    async def loading(self, timeout: float = 120.0) -> int:
        """The pid of the (first) child once it is loading the model: torch's libraries are mapped into it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.processes:
                pid = self.processes[0].pid
                with contextlib.suppress(OSError):
                    if b"/torch/lib/" in Path(f"/proc/{pid}/maps").read_bytes():
                        return pid
            await asyncio.sleep(0.05)
        raise AssertionError(f"no verification child loading the model after {timeout}s: {self.processes}")


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch) -> Spawned:
    """Record the registry's child processes for this test."""
    return Spawned(monkeypatch)


def assert_gone(pid: int, timeout: float = 30.0) -> None:
    """The process no longer exists, not even as a zombie (it was reaped), within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} still exists {timeout}s later")
        time.sleep(0.05)


def test_verify_timeout_kills_child(tmp_path: Path, spawned: Spawned) -> None:
    registry = ModelRegistry(hf_cache_dir=tmp_path / "none", verify_timeout=0.2)
    error = expect(FleetErrorCode.VERIFY_FAILED, registry.verify("default", wait=True))
    assert "timed out after 0.2 s" in error.message
    [child] = spawned.processes
    # Killed (not left to finish its check) and reaped by the registry before verify() returned.
    assert child.returncode == -signal.SIGKILL
    assert_gone(child.pid)


@pytest.mark.parametrize("child", [False, True], ids=["before-the-child-runs", "while-the-child-loads"])
def test_close_interrupts_verification(tmp_path: Path, spawned: Spawned, child: bool) -> None:
    registry = ModelRegistry(hf_cache_dir=tmp_path / "none")

    async def main() -> None:
        assert (await registry.verify("default", wait=False)).state is ModelState.VERIFYING
        if child:
            await spawned.loading()
            assert registry.get("default").state is ModelState.VERIFYING  # still running when close() comes
        await asyncio.wait_for(registry.close(), 30)

    run(main())
    record = registry.get("default")
    assert record.state is ModelState.DOWNLOADED
    assert record.error == "interrupted: the verification did not finish"
    assert _verify_children() == []  # killed and reaped
    if child:
        [process] = spawned.processes
        assert process.returncode == -signal.SIGKILL  # killed, not waited for until it finished
        assert_gone(process.pid)
    else:
        assert spawned.processes == []  # close() came first: no child was ever handed to the registry


def _verify_children() -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (proc / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid() and b"embedfleet.fleet.verify" in cmdline:
            found.append(int(proc.name))
    return found


@pytest.mark.slow
def test_verify_default(tmp_path: Path) -> None:
    changes = Changes()
    registry = ModelRegistry(on_change=changes, hf_cache_dir=tmp_path / "none")
    record = run(registry.verify("default", wait=True))
    assert record.state is ModelState.VERIFIED and record.error is None
    assert (record.task, record.dimension, record.max_input_length, record.pooling) == ("embedding", 384, 256, "mean")
    assert record.sha and len(record.sha) == 40
    assert changes.calls == 2  # verifying, verified


@pytest.mark.slow
def test_verify_reranker_folder(tiny_models: dict[str, Path]) -> None:
    registry = ModelRegistry()
    run(registry.add(str(tiny_models["reranker"])))
    record = run(registry.verify(str(tiny_models["reranker"]), wait=True))
    assert (record.state, record.task, record.dimension, record.pooling) == (ModelState.VERIFIED, "reranker", 1, None)
    assert record.max_input_length == 128


@pytest.mark.slow
def test_verify_splade_folder_in_background(tiny_models: dict[str, Path]) -> None:
    registry = ModelRegistry()
    model = str(tiny_models["splade"])

    async def main() -> ModelRecord:
        await registry.add(model)
        assert (await registry.verify(model, wait=False)).state is ModelState.VERIFYING
        try:
            return await until(registry, model, lambda r: r.state is not ModelState.VERIFYING)
        finally:
            await registry.close()

    record = run(main())
    assert (record.state, record.task, record.pooling) == (ModelState.VERIFIED, "sparse", "splade"), record.error


@pytest.mark.slow
def test_verify_hub_model_from_cache(hf_cache: Path) -> None:
    registry = ModelRegistry(hf_cache_dir=hf_cache)
    run(registry.scan())
    record = run(registry.verify("test-org/tiny-reranker", wait=True))
    assert (record.state, record.task, record.sha) == (ModelState.VERIFIED, "reranker", COMMIT)
    assert record.path == str(hf_cache / "models--test-org--tiny-reranker" / "snapshots" / COMMIT)


# ----- persistence -----


def test_state_round_trip(hf_cache: Path, tiny_models: dict[str, Path]) -> None:
    registry = ModelRegistry(hf_cache_dir=hf_cache)
    run(registry.scan())
    run(registry.add("org/name", revision="v2"))
    run(registry.add(str(tiny_models["cls"])))
    state = registry.to_state()
    restored = ModelRegistry(hf_cache_dir=hf_cache)
    restored.restore(state)
    assert restored.list() == registry.list()
    assert restored.to_state() == state


def test_restore_settles_interrupted_jobs(default_path: Path) -> None:
    stamp = "2025-01-01T00:00:00.000Z"
    registry = ModelRegistry()
    registry.restore([
        {"id": "org/a", "state": "downloading", "source": "registered", "updated_at": stamp},
        {"id": "org/b", "state": "downloading", "source": "registered", "path": "/snap", "updated_at": stamp},
        {"id": "/models/c", "state": "verifying", "source": "local", "path": "/models/c", "updated_at": stamp},
        {"id": "default", "state": "verified", "source": "packaged", "path": "/old/venv", "dimension": 384,
         "updated_at": stamp},
        {"id": "org/broken", "state": "exploded", "source": "registered", "updated_at": stamp},
        {"state": "available"},
    ])
    states = {r.id: (r.state, r.error) for r in registry.list()}
    assert states == {
        "default": (ModelState.VERIFIED, None),
        "org/a": (ModelState.AVAILABLE, "interrupted: the download did not finish"),
        "org/b": (ModelState.DOWNLOADED, "interrupted: the download did not finish"),
        "/models/c": (ModelState.DOWNLOADED, "interrupted: the verification did not finish"),
    }
    default = registry.get("default")
    assert default.path == str(default_path) and default.dimension == 384  # path refreshed, facts kept
