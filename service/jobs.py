"""Jobs: the SQLite job store, the runner interface and the worker pool.

A job is one re-contouring request. Its folder ``<data_dir>/jobs/<id>/`` holds ``input/planning``
and ``input/daily`` (the validated uploads, deleted when the job ends unless ``keep_inputs``) and
the artefacts the runner writes: ``rtstruct.dcm``, ``dvf.mha``, ``registration.dcm``, ``qa.json``
and ``review.png``. The store (SQLite, WAL) is the truth about every job: a job accepted with 200
or 202 has a row before the answer is sent, and a row never vanishes except by retention cleanup.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import queue
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from jrs.core.errors import InvalidInput, JrsError, ModelNotReady, ServiceBusy, StorageFull
from jrs.inference.registry import resolve_model_dir
from jrs.service.db import SqliteStore

logger = logging.getLogger("jrs.service.jobs")

JobStatus = Literal["queued", "running", "succeeded", "failed"]
STATUSES: tuple[JobStatus, ...] = ("queued", "running", "succeeded", "failed")

#: Artefact key -> file name in the job folder (what a runner writes).
ARTEFACTS: dict[str, str] = {
    "rtstruct": "rtstruct.dcm",
    "dvf": "dvf.mha",
    "registration": "registration.dcm",
    "qa": "qa.json",
    "review": "review.png",
}
#: Name of the planning RTSTRUCT inside a job's planning folder (set by the upload validation).
PLANNING_RTSTRUCT = "rtstruct.dcm"
#: Job folders without a row older than this (seconds) are removed by the cleanup.
ORPHAN_AGE_S = 6 * 3600.0
#: Artefacts a job must produce to succeed.
REQUIRED_ARTEFACTS = ("rtstruct", "qa")
#: errno values meaning the storage is full (disk or quota).
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def free_bytes(folder: Path) -> int | None:
    """Free bytes of the file system holding `folder` (None when it cannot be read)."""
    try:
        return int(shutil.disk_usage(folder).free)
    except OSError:
        return None


@runtime_checkable
class Runner(Protocol):
    """What re-contours one job: ``runner(job_dir, planning_dir, daily_dir) -> qa``.

    It writes the files of `ARTEFACTS` into `job_dir` and returns the QA dictionary (also written
    as ``qa.json``). Optional attributes, read with defaults: ``ready`` (bool, default True),
    ``device`` (str: GPU work is serialised per device), ``execution_provider`` (str) and a
    ``load()`` method the app calls in its lifespan (it may raise `ModelNotReady`).
    """

    def __call__(self, job_dir: Path, planning_dir: Path, daily_dir: Path) -> dict[str, Any]:
        """Re-contour one job (see the class docstring)."""
        ...


class PipelineRunner:
    """The default runner: ``jrs.pipeline.run.recontour`` with a network backend loaded once.

    `load` (called in the app's lifespan) imports ``jrs.pipeline.run`` and loads the backend with
    ``load_backend``; any failure (pipeline or inference module missing, no model) leaves
    ``ready`` False with the reason, so ``/health/ready`` answers 503 and no job is accepted.

    Args:
        model_dir: a model version folder (with ``model.onnx``), or None / the root of
            ``<name>/<version>`` folders to let the pipeline pick the newest bundled model.
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        margin_mm: margin of the network box around the pre-aligned organs, mm.
        dvf_spacing_mm: spacing of the written DVF grid, mm (None or 0: the daily CT grid).
        engine: network engine (``auto``, ``onnxruntime``, ``openvino``).
        precision: network precision (``auto``, ``fp32``, ``bf16``, ``fp16``).
        synonyms: the site's ROI-name synonym table (`jrs.core.labels.SynonymTable`,
            ``JRS_SYNONYMS``);
            None: the built-in table.
        path_choice: the site's output path per organ (``JRS_PATH_CHOICE``); organs not named
            keep the model's validated choice.
    """

    def __init__(
        self,
        model_dir: Path | None,
        device: str = "auto",
        *,
        margin_mm: float = 30.0,
        dvf_spacing_mm: float | None = 3.0,
        engine: str = "auto",
        precision: str = "auto",
        synonyms: Any = None,
        path_choice: dict[str, str] | None = None,
    ) -> None:
        self.model_dir = model_dir
        self.synonyms = synonyms
        self.path_choice = dict(path_choice or {})
        self.device = device
        self.margin_mm = margin_mm
        self.dvf_spacing_mm = dvf_spacing_mm or None
        self.engine = engine
        self.precision = precision
        self.engine_info: dict[str, Any] = {}
        self.ready = False
        self.reason = "the model has not been loaded yet"
        self.execution_provider = "none"
        self._pipeline: Any = None
        self._options: Any = None
        self._backend: Any = None

    def load(self) -> None:
        """Import the pipeline and load the model.

        Raises:
            ModelNotReady: the pipeline is not available or the model cannot be loaded.
        """
        import importlib

        try:
            pipeline = importlib.import_module("jrs.pipeline.run")
            needed = ("recontour", "load_backend", "RecontourOptions")
            missing = [name for name in needed if not hasattr(pipeline, name)]
            if missing:
                raise ModelNotReady(f"jrs.pipeline.run lacks {', '.join(missing)}")
            version_dir = resolve_model_dir(self.model_dir)
            options = pipeline.RecontourOptions(
                model_dir=version_dir,
                device=self.device,
                margin_mm=self.margin_mm,
                dvf_spacing_mm=self.dvf_spacing_mm,
            )
            # set apart: a pipeline without engines (older, or a test double) still loads
            for name in ("engine", "precision", "synonyms", "path_choice"):
                if hasattr(options, name):
                    setattr(options, name, getattr(self, name))
            backend = pipeline.load_backend(options)
        except ModelNotReady as exc:
            self.reason = exc.message
            raise
        except ImportError as exc:
            self.reason = (
                f"the re-contouring pipeline cannot be imported ({exc}); the service accepts "
                "no jobs until it is installed"
            )
            raise ModelNotReady(self.reason) from exc
        except JrsError as exc:
            self.reason = f"the model cannot be loaded: {exc.message}"
            raise ModelNotReady(self.reason) from exc
        self._pipeline, self._options, self._backend = pipeline, options, backend
        providers = getattr(backend, "execution_provider", None) or getattr(
            backend, "providers", None
        )
        if isinstance(providers, list | tuple):
            providers = providers[0] if providers else None
        self.execution_provider = str(providers or "unknown")
        engine = getattr(backend, "engine", None)
        info = getattr(engine, "info", None)
        self.engine_info = dict(info()) if callable(info) else {}
        self.ready = True
        self.reason = ""

    def __call__(self, job_dir: Path, planning_dir: Path, daily_dir: Path) -> dict[str, Any]:
        """Run the pipeline on one job (see `Runner`).

        Raises:
            ModelNotReady: when `load` has not succeeded.
        """
        if not self.ready or self._pipeline is None:
            raise ModelNotReady(self.reason)
        result = self._pipeline.recontour(
            planning_dir,
            planning_dir / PLANNING_RTSTRUCT,
            daily_dir,
            job_dir,
            self._options,
            backend=self._backend,
        )
        qa = getattr(result, "qa_data", None)
        return dict(qa) if isinstance(qa, dict) else {}


# ------------------------------------------------------------------------------ store
@dataclass
class Job:
    """One row of the job store.

    Attributes:
        id: job id (32 hex digits).
        status: queued, running, succeeded or failed.
        created_at: UNIX time the job was accepted.
        started_at: UNIX time a worker started it (None before).
        finished_at: UNIX time it ended (None before).
        error_code: `JrsError` code of a failed job.
        error_message: message of a failed job.
        artefacts: artefact key -> file name in the job folder.
        qa: the QA dictionary of a succeeded job.
        attempts: how many times a worker started it.
        request_id: id of the request that created it.
    """

    id: str
    status: JobStatus
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    error_code: str | None = None
    error_message: str | None = None
    artefacts: dict[str, str] = field(default_factory=dict)
    qa: dict[str, Any] | None = None
    attempts: int = 0
    request_id: str | None = None

    @property
    def finished(self) -> bool:
        """Whether the job has ended (succeeded or failed)."""
        return self.status in ("succeeded", "failed")


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed')),
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    error_code TEXT,
    error_message TEXT,
    artefacts TEXT NOT NULL DEFAULT '{}',
    qa TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    request_id TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished_at);
"""


class JobStore(SqliteStore):
    """SQLite job store in WAL mode, safe to share between threads.

    Args:
        path: the database file (its folder is created).
    """

    def __init__(self, path: Path) -> None:
        """Open (or create) the database file."""
        super().__init__(path, _SCHEMA)

    @staticmethod
    def _job(row: sqlite3.Row) -> Job:
        return Job(
            id=row["id"],
            status=row["status"],
            created_at=row["created_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            error_code=row["error_code"],
            error_message=row["error_message"],
            artefacts=json.loads(row["artefacts"] or "{}"),
            qa=json.loads(row["qa"]) if row["qa"] else None,
            attempts=row["attempts"],
            request_id=row["request_id"],
        )

    def create(self, job_id: str, request_id: str | None = None) -> Job:
        """Insert a queued job.

        Args:
            job_id: the new job's id.
            request_id: the request that created it.

        Returns:
            The job.
        """
        now = time.time()
        with self._tx() as c:
            c.execute(
                "INSERT INTO jobs (id, status, created_at, request_id) VALUES (?, 'queued', ?, ?)",
                (job_id, now, request_id),
            )
        return Job(id=job_id, status="queued", created_at=now, request_id=request_id)

    def get(self, job_id: str) -> Job | None:
        """The job with this id, or None."""
        with self._lock:
            row = self._conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._job(row) if row is not None else None

    def jobs(self, status: JobStatus | None = None) -> list[Job]:
        """Jobs (all or of one status), oldest first."""
        with self._lock:
            if status is None:
                rows = self._conn.execute("SELECT * FROM jobs ORDER BY created_at").fetchall()
            else:
                rows = self._conn.execute(
                    "SELECT * FROM jobs WHERE status = ? ORDER BY created_at", (status,)
                ).fetchall()
        return [self._job(r) for r in rows]

    def counts(self) -> dict[str, int]:
        """Number of jobs per status."""
        with self._lock:
            rows = self._conn.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status")
            return {r[0]: int(r[1]) for r in rows.fetchall()}

    def mark_running(self, job_id: str) -> None:
        """Record that a worker started the job."""
        with self._tx() as c:
            c.execute(
                "UPDATE jobs SET status = 'running', started_at = ?, attempts = attempts + 1 "
                "WHERE id = ?",
                (time.time(), job_id),
            )

    def mark_succeeded(self, job_id: str, qa: dict[str, Any], artefacts: dict[str, str]) -> None:
        """Record a job's success with its QA and artefacts."""
        with self._tx() as c:
            c.execute(
                "UPDATE jobs SET status = 'succeeded', finished_at = ?, qa = ?, artefacts = ?, "
                "error_code = NULL, error_message = NULL WHERE id = ?",
                (time.time(), json.dumps(qa, default=str), json.dumps(artefacts), job_id),
            )

    def mark_failed(self, job_id: str, code: str, message: str) -> None:
        """Record a job's failure with an error code and message."""
        with self._tx() as c:
            c.execute(
                "UPDATE jobs SET status = 'failed', finished_at = ?, error_code = ?, "
                "error_message = ? WHERE id = ?",
                (time.time(), code, message, job_id),
            )

    def requeue(self, job_id: str) -> None:
        """Put a job back to queued (after an interrupted run)."""
        with self._tx() as c:
            c.execute(
                "UPDATE jobs SET status = 'queued', started_at = NULL WHERE id = ?", (job_id,)
            )

    def finished_before(self, cutoff: float) -> list[str]:
        """Ids of jobs that ended before `cutoff` (UNIX time)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT id FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ?", (cutoff,)
            ).fetchall()
        return [r[0] for r in rows]

    def delete(self, job_ids: list[str]) -> None:
        """Delete job rows."""
        with self._tx() as c:
            c.executemany("DELETE FROM jobs WHERE id = ?", [(j,) for j in job_ids])


def new_job_id() -> str:
    """A fresh job id (32 lowercase hex digits)."""
    return uuid.uuid4().hex


# ------------------------------------------------------------------------------ workers
class JobManager:
    """Worker pool running jobs from a bounded queue, with their state in a `JobStore`.

    Args:
        store: the job store.
        jobs_dir: folder of the job folders.
        runner: what re-contours a job.
        concurrency: worker threads.
        queue_size: jobs that may wait; `submit` refuses more with `ServiceBusy`.
        device: the configured device; GPU devices get a lock so their work is serialised.
        keep_inputs: keep ``input/`` of finished jobs.
        max_attempts: interrupted runs after which a job is failed instead of re-queued.
        on_stage: callback(stage, seconds) for the stage histograms.
        on_outcome: callback(outcome) when a job ends.
    """

    def __init__(
        self,
        store: JobStore,
        jobs_dir: Path,
        runner: Callable[[Path, Path, Path], dict[str, Any]],
        *,
        concurrency: int = 1,
        queue_size: int = 8,
        device: str = "cpu",
        keep_inputs: bool = False,
        max_attempts: int = 2,
        on_stage: Callable[[str, float], None] | None = None,
        on_outcome: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.jobs_dir = Path(jobs_dir)
        self.runner = runner
        self.concurrency = concurrency
        self.queue_size = queue_size
        self.device = str(getattr(runner, "device", device) or device)
        self.keep_inputs = keep_inputs
        self.max_attempts = max_attempts
        self._on_stage = on_stage or (lambda stage, seconds: None)
        self._on_outcome = on_outcome or (lambda outcome: None)
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._running: set[str] = set()
        self._done: dict[str, threading.Event] = {}
        self._device_locks: dict[str, threading.Lock] = {}
        self._threads: list[threading.Thread] = []
        self._accepting = False
        self._stopping = threading.Event()

    # -- state
    @property
    def queue_depth(self) -> int:
        """Jobs waiting for a worker."""
        with self._lock:
            return self._waiting

    @property
    def running(self) -> int:
        """Jobs being run."""
        with self._lock:
            return len(self._running)

    def has_room(self) -> bool:
        """Whether `submit` would accept a job now (a hint: `submit` decides)."""
        with self._lock:
            return self._accepting and self._waiting < self.queue_size

    def job_dir(self, job_id: str) -> Path:
        """The folder of a job."""
        return self.jobs_dir / job_id

    def device_lock(self, device: str) -> threading.Lock | nullcontext[None]:
        """The lock serialising work on `device` (no lock for the CPU).

        Args:
            device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.

        Returns:
            A context manager.
        """
        if device == "cpu":
            return nullcontext()
        with self._lock:
            return self._device_locks.setdefault(device, threading.Lock())

    # -- lifecycle
    def start(self, run_recovered: bool = True) -> dict[str, list[str]]:
        """Recover jobs left by a previous process, then start the workers.

        Jobs left ``queued`` are queued again. Jobs left ``running`` are queued again when they
        have been tried fewer than ``max_attempts`` times and their inputs still exist, otherwise
        marked failed with the reason. No job is dropped.

        Args:
            run_recovered: queue the recovered jobs in this process; when False (the model is
                not ready) they are only set back to ``queued`` in the store for a later start.

        Returns:
            ``{"requeued": [...], "failed": [...]}``: the ids recovered.
        """
        requeued: list[str] = []
        failed: list[str] = []
        for job in self.store.jobs("running") + self.store.jobs("queued"):
            inputs = self.job_dir(job.id) / "input"
            if not (inputs / "planning").is_dir() or not (inputs / "daily").is_dir():
                self.store.mark_failed(
                    job.id,
                    "interrupted",
                    "the service restarted and the job's inputs are no longer available; "
                    "submit the job again",
                )
                failed.append(job.id)
            elif job.status == "running" and job.attempts >= self.max_attempts:
                self.store.mark_failed(
                    job.id,
                    "interrupted",
                    f"the service stopped while the job was running ({job.attempts} attempts); "
                    "submit the job again",
                )
                failed.append(job.id)
            else:
                if job.status == "running":
                    self.store.requeue(job.id)
                requeued.append(job.id)
        for job_id in failed:
            self._cleanup_inputs(job_id)
        with self._lock:
            self._accepting = True
            for job_id in requeued if run_recovered else []:
                self._done[job_id] = threading.Event()
                self._waiting += 1
                self._queue.put(job_id)
        if requeued or failed:
            logger.warning(
                "recovered jobs of a previous process",
                extra={"fields": {"requeued": len(requeued), "failed": len(failed)}},
            )
        self._stopping.clear()
        for k in range(self.concurrency):
            t = threading.Thread(target=self._work, name=f"jrs-worker-{k}", daemon=True)
            t.start()
            self._threads.append(t)
        return {"requeued": requeued, "failed": failed}

    def shutdown(self, grace_s: float = 30.0) -> list[str]:
        """Stop accepting jobs, let running jobs finish for up to `grace_s`, stop the workers.

        Jobs still waiting stay ``queued`` in the store (the next start runs them). Jobs still
        running after the grace period are marked failed with the reason.

        Args:
            grace_s: seconds to wait for running jobs.

        Returns:
            Ids of the running jobs marked failed.
        """
        with self._lock:
            self._accepting = False
        self._stopping.set()
        # drain the waiting jobs (they stay queued in the store) and wake the workers
        drained = 0
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                drained += 1
        with self._lock:
            self._waiting = 0
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + grace_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            stuck = sorted(self._running)
        for job_id in stuck:
            self.store.mark_failed(
                job_id,
                "interrupted",
                f"the service shut down and the job did not finish within {grace_s:g} s; "
                "submit the job again",
            )
            self._finish(job_id, "failed")
        self._threads = [t for t in self._threads if t.is_alive()]
        if drained or stuck:
            logger.warning(
                "shutdown",
                extra={"fields": {"left_queued": drained, "marked_failed": len(stuck)}},
            )
        return stuck

    # -- submitting and waiting
    def submit(self, job_id: str, request_id: str | None = None) -> Job:
        """Create a queued job whose inputs are already in ``job_dir(job_id)/input``.

        Args:
            job_id: the job's id.
            request_id: the request creating it.

        Returns:
            The queued job.

        Raises:
            ServiceBusy: the queue is full, the service is shutting down or the store is locked.
            StorageFull: the job store cannot grow (disk full).
        """
        with self._lock:
            if not self._accepting:
                raise ServiceBusy("the service is shutting down; retry on another instance")
            if self._waiting >= self.queue_size:
                raise ServiceBusy(
                    f"the job queue is full ({self._waiting} jobs waiting, {len(self._running)} "
                    "running); retry later"
                )
            try:
                job = self.store.create(job_id, request_id)
            except sqlite3.OperationalError as exc:
                if "full" in str(exc).lower():
                    logger.error("the job store is full", extra={"fields": {"job_id": job_id}})
                    raise StorageFull(
                        "no space left for the job store; no job is accepted until space is freed"
                    ) from None
                logger.error("the job store failed", exc_info=exc)
                raise ServiceBusy("the job store is unavailable; retry later") from None
            self._done[job_id] = threading.Event()
            self._waiting += 1
            self._queue.put(job_id)
        return job

    def done_event(self, job_id: str) -> threading.Event | None:
        """The event set when the job ends (None for a job not run by this process)."""
        with self._lock:
            return self._done.get(job_id)

    def wait(self, job_id: str, timeout: float) -> Job | None:
        """Block until the job ends or `timeout` passes; the job's current state.

        Args:
            job_id: the job.
            timeout: seconds.

        Returns:
            The job as stored (None when unknown).
        """
        event = self.done_event(job_id)
        if event is not None:
            event.wait(timeout)
        return self.store.get(job_id)

    # -- running
    def _work(self) -> None:
        while True:
            job_id = self._queue.get()
            if job_id is None:
                return
            with self._lock:
                self._waiting = max(0, self._waiting - 1)
                if self._stopping.is_set():
                    continue  # stays queued in the store for the next start
                self._running.add(job_id)
            try:
                self._run(job_id)
            except BaseException as exc:  # the store failed, or the runner stopped its thread
                # (SystemExit, KeyboardInterrupt): mark the job and keep the worker alive
                logger.error("worker error", exc_info=exc, extra={"fields": {"job_id": job_id}})
                if isinstance(exc, Exception):
                    code, message = "internal_error", "internal error; see the service log"
                else:
                    code = "interrupted"
                    message = (
                        f"the worker running the job was stopped ({type(exc).__name__}); submit "
                        "the job again"
                    )
                with contextlib.suppress(Exception):
                    self.store.mark_failed(job_id, code, message)
                self._finish(job_id, "failed")
            finally:
                with self._lock:
                    self._running.discard(job_id)

    def _run(self, job_id: str) -> None:
        job = self.store.get(job_id)
        if job is None or job.status not in ("queued", "running"):
            self._finish(job_id, None)
            return
        self._on_stage("queue_wait", max(0.0, time.time() - job.created_at))
        self.store.mark_running(job_id)
        job_dir = self.job_dir(job_id)
        inputs = job_dir / "input"
        started = time.monotonic()
        try:
            with self.device_lock(self.device):
                qa = self.runner(job_dir, inputs / "planning", inputs / "daily")
            artefacts = self._collect_artefacts(job_dir, qa)
        except JrsError as exc:
            self._on_stage("run", time.monotonic() - started)
            self.store.mark_failed(job_id, exc.code, exc.message)
            logger.warning("job failed", extra={"fields": {"job_id": job_id, "error": exc.code}})
            self._finish(job_id, "failed")
            return
        except Exception as exc:
            self._on_stage("run", time.monotonic() - started)
            if isinstance(exc, OSError) and exc.errno in NO_SPACE:
                self.store.mark_failed(
                    job_id,
                    StorageFull.code,
                    "no space left in the artefact storage while writing the results; free "
                    "space and submit the job again",
                )
                logger.error("job failed: storage full", extra={"fields": {"job_id": job_id}})
            else:
                self.store.mark_failed(
                    job_id,
                    "internal_error",
                    "internal error while re-contouring; see the service log",
                )
                logger.error("job crashed", exc_info=exc, extra={"fields": {"job_id": job_id}})
            self._finish(job_id, "failed")
            return
        self._on_stage("run", time.monotonic() - started)
        self.store.mark_succeeded(job_id, qa, artefacts)
        logger.info("job succeeded", extra={"fields": {"job_id": job_id}})
        self._finish(job_id, "succeeded")

    def _collect_artefacts(self, job_dir: Path, qa: Any) -> dict[str, str]:
        if not isinstance(qa, dict):
            raise InvalidInput(f"the runner returned {type(qa).__name__} instead of a QA dict")
        qa_path = job_dir / ARTEFACTS["qa"]
        if not qa_path.is_file():
            qa_path.write_text(json.dumps(qa, indent=2, default=str), encoding="utf-8")
        found = {k: name for k, name in ARTEFACTS.items() if (job_dir / name).is_file()}
        missing = [ARTEFACTS[k] for k in REQUIRED_ARTEFACTS if k not in found]
        if missing:
            raise JrsError(f"the re-contouring produced no {', '.join(missing)}")
        return found

    def _cleanup_inputs(self, job_id: str) -> None:
        if not self.keep_inputs:
            shutil.rmtree(self.job_dir(job_id) / "input", ignore_errors=True)

    def _finish(self, job_id: str, outcome: str | None) -> None:
        self._cleanup_inputs(job_id)
        if outcome is not None:
            self._on_outcome(outcome)
        with self._lock:
            event = self._done.pop(job_id, None)
        if event is not None:
            event.set()

    # -- retention
    def cleanup(self, retention_s: float, orphan_age_s: float = ORPHAN_AGE_S) -> list[str]:
        """Delete jobs (rows and folders) that ended more than `retention_s` ago.

        Also removes folders without a job row older than `orphan_age_s` (uploads of a process
        that died before queuing them).

        Args:
            retention_s: seconds.
            orphan_age_s: seconds.

        Returns:
            The deleted job ids.
        """
        now = time.time()
        ids = self.store.finished_before(now - retention_s)
        for job_id in ids:
            shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
        if ids:
            self.store.delete(ids)
        orphans = 0
        if self.jobs_dir.is_dir():
            for folder in self.jobs_dir.iterdir():
                try:
                    old = folder.stat().st_mtime < now - orphan_age_s
                except OSError:
                    continue
                if old and folder.is_dir() and self.store.get(folder.name) is None:
                    shutil.rmtree(folder, ignore_errors=True)
                    orphans += 1
        if ids or orphans:
            logger.info(
                "retention cleanup", extra={"fields": {"deleted": len(ids), "orphans": orphans}}
            )
        return ids


__all__ = [
    "ARTEFACTS",
    "NO_SPACE",
    "STATUSES",
    "Job",
    "JobManager",
    "JobStatus",
    "JobStore",
    "ModelNotReady",
    "PipelineRunner",
    "Runner",
    "ServiceBusy",
    "free_bytes",
    "new_job_id",
]
