"""Patients: the planning scan uploaded once, a patient model adapted in the background.

``POST /v1/patients`` stores a validated planning CT + RTSTRUCT under
``<data_dir>/patients/<id>/planning/`` and a row in ``<data_dir>/patients.sqlite3``; each
``POST /v1/patients/{id}/fractions`` is an ordinary job (``jrs.service.jobs``) whose planning input
is hard-linked from there and whose ``input/patient.json`` names the patient, so that the
:class:`PatientAwareRunner` re-contours it with the patient model once it is ready, and with the
generic model before that (``qa.json``: ``model.kind`` and ``patient``).

Adaptation (``jrs adapt``, :mod:`jrs.training.adapt`) needs torch, which the service never imports:
it runs in a subprocess (``python -m jrs.cli adapt ...``) started by an :class:`AdaptationWorker`,
one patient at a time (the fine-tuning takes every core). Its state is the patient row:
``unavailable`` (the server cannot train: the reason says why), ``queued``, ``running``,
``succeeded`` (``result.kept`` says whether the adapted model beat the generic one on held-back
synthetic fractions; only then is it used) or ``failed`` (with the reason). The worker runs in
the service process (``JRS_ADAPTATION=auto|local``) or in a separate process on the same data
folder (``JRS_ADAPTATION=external``: ``python -m jrs.service.patients``, e.g. the adaptation image
variant beside a service image without torch). A restart loses nothing: a graceful stop sends
SIGTERM (``jrs adapt`` checkpoints and exits) and queues the patient again; at the next start the
same command continues from the work folder (``<id>/adapt/``); an adaptation interrupted
`MAX_ADAPT_ATTEMPTS` times fails with the reason. Fractions never wait for it.

Patients unused for ``JRS_PATIENT_RETENTION_DAYS`` are deleted with their planning, model and
finished fraction jobs, as ``DELETE /v1/patients/{id}`` does at once. Nothing identifying the
patient is logged: ids are random, the planning series is recorded as a SHA-256.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jrs.core.errors import JrsError, ModelNotReady, NotFound
from jrs.inference.registry import resolve_model_dir
from jrs.service.adaptation_worker import AdaptationWorker
from jrs.service.jobs import PLANNING_RTSTRUCT
from jrs.service.patient_store import (
    MODEL_DIR,
    ORPHAN_AGE_S,
    PATIENT_MARKER,
    PLANNING_DIR,
    WORK_DIR,
    AdaptStatus,
    Patient,
    PatientStore,
)
from jrs.service.settings import Settings, load_settings

logger = logging.getLogger("jrs.service.patients")


__all__ = [
    "PatientAwareRunner",
    "PatientService",
    "adapt_command",
    "adaptation_availability",
    "attach_patients",
    "delete_finished_jobs",
]


# ------------------------------------------------------------------------------ availability
def _has_weights(model_dir: Path) -> bool:
    """Whether a model folder has torch weights (``weights.pt``, or a repository checkpoint)."""
    if (model_dir / "weights.pt").is_file():
        return True
    try:
        meta = json.loads((model_dir / "metadata.json").read_text())
    except (OSError, ValueError):
        return False
    if isinstance(meta.get("weights"), dict) or meta.get("checkpoint"):
        return True
    repo = model_dir.resolve().parent.parent / "checkpoints"
    return repo.is_dir() and any(repo.glob("*.pt"))


def _given_base_weights(settings: Settings) -> Path | None:
    """The ``--base-weights FILE`` given in ``JRS_ADAPT_ARGS`` when that file exists, else None."""
    args = shlex.split(settings.adapt_args)
    for k, arg in enumerate(args):
        value = None
        if arg == "--base-weights" and k + 1 < len(args):
            value = args[k + 1]
        elif arg.startswith("--base-weights="):
            value = arg.split("=", 1)[1]
        if value and Path(value).is_file():
            return Path(value)
    return None


def base_model_dir(settings: Settings) -> Path | None:
    """The model adaptation starts from: ``JRS_ADAPT_BASE_DIR``, else the served model."""
    chosen = settings.adapt_base_dir or settings.model_dir
    try:
        folder = resolve_model_dir(chosen)
        if folder is None:
            from jrs.inference.registry import default_model_dir

            folder = default_model_dir()
    except JrsError:
        return None
    return folder


def adaptation_availability(settings: Settings) -> tuple[bool, str]:
    """Whether this server can adapt models, and the reason when it cannot.

    ``external`` is always available (a worker process does the work); ``off`` never; ``auto``
    and ``local`` need torch and the ``training`` package importable (checked without importing
    them) and a base model with torch weights.
    """
    mode = settings.adaptation
    if mode == "off":
        return False, "patient-specific adaptation is switched off on this server (JRS_ADAPTATION)"
    if mode == "external":
        return True, ""
    missing = [m for m in ("torch", "training") if importlib.util.find_spec(m) is None]
    if missing:
        return False, (
            f"this server cannot train ({' and '.join(missing)} not installed): fractions use the "
            "generic model; run the adaptation image variant or an adaptation worker "
            "(docs/adaptation.md)"
        )
    folder = base_model_dir(settings)
    if _given_base_weights(settings) is None and (folder is None or not _has_weights(folder)):
        return False, (
            "the served model has no torch weights (weights.pt) to fine-tune: fractions use the "
            "generic model; export it with `jrs export`, set JRS_ADAPT_BASE_DIR, or give "
            "--base-weights FILE in JRS_ADAPT_ARGS"
        )
    return True, ""


# ------------------------------------------------------------------------------ the worker
def adapt_command(settings: Settings, patient_dir: Path) -> list[str]:
    """The ``jrs adapt`` command line of one patient folder (run with this interpreter)."""
    device = settings.device if settings.device in ("auto", "cpu", "cuda") else "cuda"
    argv = [
        sys.executable,
        "-m",
        "jrs.cli",
        "adapt",
        "--planning-ct",
        str(patient_dir / PLANNING_DIR),
        "--planning-rtstruct",
        str(patient_dir / PLANNING_DIR / PLANNING_RTSTRUCT),
        "--out",
        str(patient_dir / MODEL_DIR),
        "--work",
        str(patient_dir / WORK_DIR),
        "--minutes",
        f"{settings.adapt_minutes:g}",
        "--device",
        device,
        "--engine",
        settings.engine,
        "--overwrite",
    ]
    if settings.synonyms is not None:  # the site's ROI names, as every job uses them
        argv += ["--synonyms", str(settings.synonyms)]
    base = settings.adapt_base_dir or settings.model_dir
    with contextlib.suppress(JrsError):
        folder = resolve_model_dir(base)
        if folder is not None:
            argv += ["--base", str(folder)]
    return argv + shlex.split(settings.adapt_args)


# ------------------------------------------------------------------------------ the service side
class PatientService:
    """The patients of a service: store, folders, the in-process worker and the retention.

    Args:
        settings: the service settings.
        command: ``command(patient_dir) -> argv`` of an adaptation (default `adapt_command`).
        delete_jobs: deletes finished job ids, rows and folders (the app passes the job
            manager's); used for the fractions of deleted patients.
    """

    def __init__(
        self,
        settings: Settings,
        command: Callable[[Path], list[str]] | None = None,
        delete_jobs: Callable[[list[str]], object] | None = None,
    ) -> None:
        self.settings = settings
        self.delete_jobs: Callable[[list[str]], object] = delete_jobs or (lambda ids: None)
        self.patients_dir = settings.data_dir / "patients"
        self.patients_dir.mkdir(parents=True, exist_ok=True)
        self.store = PatientStore(settings.data_dir / "patients.sqlite3")
        self.available, self.unavailable_reason = adaptation_availability(settings)
        self.worker: AdaptationWorker | None = None
        if settings.adaptation in ("auto", "local") and self.available:
            self.worker = AdaptationWorker(
                self.store,
                self.patients_dir,
                command or (lambda folder: adapt_command(settings, folder)),
                stop_grace_s=max(10.0, settings.shutdown_grace_s),
            )
        elif settings.adaptation == "local":
            logger.error(
                "JRS_ADAPTATION=local but adaptation is unavailable",
                extra={"fields": {"reason": self.unavailable_reason}},
            )
        self._stop = threading.Event()
        self._cleaner: threading.Thread | None = None

    # -- lifecycle
    def start(self) -> None:
        """Start the worker (when this process adapts) and the retention cleanup."""
        self.cleanup()
        if self.worker is not None:
            self.worker.start()
        self._stop.clear()
        self._cleaner = threading.Thread(
            target=self._cleanup_loop, name="jrs-patients", daemon=True
        )
        self._cleaner.start()

    def stop(self) -> None:
        """Stop the worker (a running adaptation checkpoints) and the cleanup; close the store."""
        self._stop.set()
        if self.worker is not None:
            self.worker.stop()
        if self._cleaner is not None:
            self._cleaner.join(5)
        self.store.close()

    def _cleanup_loop(self) -> None:
        while not self._stop.wait(self.settings.cleanup_interval_s):
            try:
                self.cleanup()
            except Exception as exc:  # keep the loop alive
                logger.error("patient retention cleanup failed", exc_info=exc)

    # -- patients
    def folder(self, patient_id: str) -> Path:
        """The folder of a patient."""
        return self.patients_dir / patient_id

    def initial_status(self) -> tuple[AdaptStatus, str | None]:
        """Adaptation status and note of a new patient on this server."""
        if not self.available:
            return "unavailable", self.unavailable_reason
        if self.settings.adaptation == "external":
            return "queued", "waiting for an adaptation worker (JRS_ADAPTATION=external)"
        return "queued", None

    def progress(self, patient: Patient) -> dict[str, Any] | None:
        """``progress.json`` of a running adaptation (phase, step, spent_s, budget_s)."""
        if patient.adapt_status not in ("running", "queued"):
            return None
        try:
            data = json.loads((self.folder(patient.id) / WORK_DIR / "progress.json").read_text())
        except (OSError, ValueError):
            return None
        keep = ("phase", "step", "spent_s", "budget_s")
        return {k: data.get(k) for k in keep} if isinstance(data, dict) else None

    def model_dir(self, patient: Patient) -> Path | None:
        """The patient model folder when fractions should use it."""
        folder = self.folder(patient.id) / MODEL_DIR
        if patient.uses_patient_model and (folder / "model.onnx").is_file():
            return folder
        return None

    def link_planning(self, patient_id: str, dest: Path) -> None:
        """Hard-link (else copy) the stored planning files into a fraction job's input folder.

        Raises:
            NotFound: the patient's planning is gone (deleted meanwhile).
        """
        src = self.folder(patient_id) / PLANNING_DIR
        if not src.is_dir():
            raise NotFound(f"patient {patient_id} has no stored planning (deleted?)")
        for path in sorted(src.rglob("*")):
            target = dest / path.relative_to(src)
            if path.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target)
            except OSError:
                shutil.copy2(path, target)

    def delete(self, patient_id: str) -> bool:
        """Delete a patient: row, folder (planning, model, work), finished fraction jobs.

        A running adaptation is stopped by its worker (it sees the row gone). Fraction jobs still
        queued or running finish and are then removed by the job retention.

        Args:
            patient_id: the patient.

        Returns:
            Whether the patient existed.
        """
        jobs = self.store.fractions(patient_id)
        existed = self.store.delete(patient_id)
        shutil.rmtree(self.folder(patient_id), ignore_errors=True)
        if jobs:
            self.delete_jobs(jobs)
        if existed:
            logger.info("patient deleted", extra={"fields": {"patient_id": patient_id}})
        return existed

    def cleanup(self, now: float | None = None) -> list[str]:
        """Delete patients unused for ``JRS_PATIENT_RETENTION_DAYS`` and orphan folders.

        Returns:
            The deleted patient ids.
        """
        now = time.time() if now is None else now
        cutoff = now - self.settings.patient_retention_days * 86400
        deleted = []
        for pid in self.store.unused_since(cutoff):
            patient = self.store.get(pid)
            if patient is None or patient.adapt_status == "running":
                continue
            if self.delete(pid):
                deleted.append(pid)
        for folder in self.patients_dir.iterdir() if self.patients_dir.is_dir() else []:
            try:
                old = folder.stat().st_mtime < now - ORPHAN_AGE_S
            except OSError:
                continue
            if old and folder.is_dir() and self.store.get(folder.name) is None:
                shutil.rmtree(folder, ignore_errors=True)
        if deleted:
            logger.info("patient retention cleanup", extra={"fields": {"deleted": len(deleted)}})
        return deleted


def delete_finished_jobs(manager: Any, job_ids: list[str]) -> list[str]:
    """Delete the finished jobs among ``job_ids`` (rows and folders) of a ``JobManager``.

    Returns:
        The ids deleted (jobs still queued or running are left to the job retention).
    """
    gone = []
    for job_id in job_ids:
        job = manager.store.get(job_id)
        if job is not None and job.finished:
            shutil.rmtree(manager.job_dir(job_id), ignore_errors=True)
            gone.append(job_id)
    if gone:
        manager.store.delete(gone)
    return gone


def attach_patients(app: Any, settings: Settings, manager: Any, runner: Any) -> PatientService:
    """Start the patients of an app (its lifespan calls this once the job manager runs).

    Sets ``app.state.patients``, gives a `PatientAwareRunner` its store, starts the in-process
    adaptation worker (when this server adapts) and the retention cleanup.

    Returns:
        The patient service (``stop`` it on shutdown).
    """
    patients = PatientService(settings, delete_jobs=lambda ids: delete_finished_jobs(manager, ids))
    if isinstance(runner, PatientAwareRunner):
        runner.patients = patients
    patients.start()
    app.state.patients = patients
    if not patients.available:
        logger.warning(
            "patient-specific adaptation unavailable",
            extra={"fields": {"reason": patients.unavailable_reason}},
        )
    return patients


# ------------------------------------------------------------------------------ fractions
class PatientAwareRunner:
    """The job runner of the app: patient fractions get the patient model once it is ready.

    Jobs without `PATIENT_MARKER` (``/v1/recontour``) go to the wrapped runner unchanged. A
    fraction job uses the patient model when the patient's adaptation succeeded and kept the
    adapted model, else the wrapped (generic) runner; ``qa.json`` then says which:
    ``model.kind`` (``patient`` / ``generic``) and ``patient`` (id, model, adaptation status and
    why the generic model was used).

    Attributes read by the app and the job manager (``ready``, ``reason``, ``device``,
    ``execution_provider``, ``engine_info``, ``load``) are those of the wrapped runner.

    Args:
        inner: the generic runner (``PipelineRunner`` or a test double).
        settings: the service settings (engine, device, margins of the pipeline options).
    """

    def __init__(
        self, inner: Callable[[Path, Path, Path], dict[str, Any]], settings: Settings
    ) -> None:
        self.inner = inner
        self.settings = settings
        self.patients: PatientService | None = None
        self._backends: OrderedDict[Path, Any] = OrderedDict()
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        # only reached for attributes this wrapper lacks: those of the wrapped runner
        if name in ("inner", "settings", "patients", "_backends", "_lock"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __call__(self, job_dir: Path, planning_dir: Path, daily_dir: Path) -> dict[str, Any]:
        """Re-contour one job (see the class docstring)."""
        marker = planning_dir.parent / PATIENT_MARKER
        if not marker.is_file():
            return self.inner(job_dir, planning_dir, daily_dir)
        patient_id = str(json.loads(marker.read_text()).get("patient_id", ""))
        patient = self.patients.store.get(patient_id) if self.patients is not None else None
        model_dir = (
            self.patients.model_dir(patient) if patient is not None and self.patients else None
        )
        kind = "generic"
        note: str | None = None
        if model_dir is not None:
            try:
                qa = self.run_with_model(job_dir, planning_dir, daily_dir, model_dir)
                kind = "patient"
            except ModelNotReady as exc:
                logger.error(
                    "patient model unusable; generic model used",
                    extra={"fields": {"patient_id": patient_id, "error": exc.code}},
                )
                note = f"the patient model could not be loaded ({exc.message[:200]})"
                qa = self.inner(job_dir, planning_dir, daily_dir)
        else:
            qa = self.inner(job_dir, planning_dir, daily_dir)
            note = _why_generic(patient)
        qa = dict(qa)
        qa["model"] = {**dict(qa.get("model") or {}), "kind": kind}
        qa["patient"] = {
            "id": patient_id,
            "model": kind,
            "adaptation_status": patient.adapt_status if patient is not None else "deleted",
            "generic_because": note,
        }
        (job_dir / "qa.json").write_text(json.dumps(qa, indent=2, default=str), encoding="utf-8")
        return qa

    def run_with_model(
        self, job_dir: Path, planning_dir: Path, daily_dir: Path, model_dir: Path
    ) -> dict[str, Any]:
        """Re-contour with another model folder (the wrapped runner's own, when it has one).

        Raises:
            ModelNotReady: the model cannot be loaded.
        """
        own = getattr(self.inner, "run_with_model", None)
        if callable(own):
            result: dict[str, Any] = own(job_dir, planning_dir, daily_dir, model_dir)
            return result
        import importlib

        pipeline = importlib.import_module("jrs.pipeline.run")
        options = pipeline.RecontourOptions(
            model_dir=model_dir,
            device=self.settings.device,
            margin_mm=self.settings.margin_mm,
            dvf_spacing_mm=self.settings.dvf_spacing_mm or None,
        )
        for name in ("engine", "precision"):
            if hasattr(options, name):
                setattr(options, name, getattr(self.settings, name))
        if hasattr(options, "synonyms"):  # the site's ROI names (JRS_SYNONYMS)
            options.synonyms = self.settings.synonym_table
        if hasattr(options, "path_choice"):  # the site's output paths (JRS_PATH_CHOICE)
            options.path_choice = self.settings.path_choices
        with self._lock:
            backend = self._backends.pop(model_dir, None)
            if backend is None:
                try:
                    backend = pipeline.load_backend(options)
                except JrsError as exc:
                    raise ModelNotReady(exc.message) from exc
            self._backends[model_dir] = backend
            while len(self._backends) > 2:  # a few compiled patient models at most
                self._backends.popitem(last=False)
        result = pipeline.recontour(
            planning_dir,
            planning_dir / PLANNING_RTSTRUCT,
            daily_dir,
            job_dir,
            options,
            backend=backend,
        )
        qa = getattr(result, "qa_data", None)
        return dict(qa) if isinstance(qa, dict) else {}


def _why_generic(patient: Patient | None) -> str:
    if patient is None:
        return "the patient was deleted"
    status = patient.adapt_status
    if status == "succeeded":
        return (patient.adapt_result or {}).get("reason") or "the adapted model was not better"
    if status in ("queued", "running"):
        return f"the patient model is not ready yet (adaptation {status})"
    return patient.adapt_reason or f"adaptation {status}"


# ------------------------------------------------------------------------------ external worker
def main(argv: list[str] | None = None) -> int:
    """``python -m jrs.service.patients``: the adaptation worker of ``JRS_ADAPTATION=external``.

    Reads the service settings from the environment (``JRS_DATA_DIR`` must be the service's data
    folder), recovers adaptations a previous worker left running, then runs queued adaptations
    until SIGTERM (which checkpoints the running one: it continues at the next start). Run one
    worker per data folder.
    """
    parser = argparse.ArgumentParser(
        description=main.__doc__.splitlines()[0] if main.__doc__ else None
    )
    parser.add_argument("--once", action="store_true", help="run the queued adaptations, then exit")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = load_settings(insecure_dev=True)
    missing = [m for m in ("torch", "training") if importlib.util.find_spec(m) is None]
    if missing:
        logger.error("the adaptation worker needs %s (pip install 'jrs[train]')", missing)
        return 2
    patients_dir = settings.data_dir / "patients"
    patients_dir.mkdir(parents=True, exist_ok=True)
    store = PatientStore(settings.data_dir / "patients.sqlite3")
    worker = AdaptationWorker(store, patients_dir, lambda folder: adapt_command(settings, folder))
    worker.recover()
    if args.once:
        while worker.run_once():
            pass
        store.close()
        return 0
    done = threading.Event()

    def on_signal(_signum: int, _frame: object) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    worker.start()
    done.wait()
    worker.stop()
    store.close()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
