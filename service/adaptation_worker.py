"""The adaptation worker: runs ``jrs adapt`` for queued patients, one at a time, in a subprocess.

It claims a queued patient, runs the command it is given (interruptible: SIGTERM lets ``jrs
adapt`` checkpoint), records the result or the error, and retries an interrupted adaptation up to
`MAX_ADAPT_ATTEMPTS` times.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jrs.service.patient_store import (
    ADAPT_LOG,
    EXIT_INTERRUPTED,
    MAX_ADAPT_ATTEMPTS,
    MODEL_DIR,
    STOP_GRACE_S,
    Patient,
    PatientStore,
)

logger = logging.getLogger("jrs.service.patients")


def _result_of(model_dir: Path) -> dict[str, Any]:
    """The ``adapt_result`` of a finished adaptation (from the model's metadata)."""
    meta = json.loads((model_dir / "metadata.json").read_text())
    ada = meta.get("adaptation") or {}
    val = ada.get("validation") or {}
    base = val.get("base") or {}
    adapted = val.get("adapted") or {}
    organs = list((base.get("dsc") or {}).keys())
    return {
        "kept": bool(ada.get("kept")),
        "reason": ada.get("reason"),
        "steps": ada.get("steps"),
        "seconds": ada.get("seconds"),
        "steps_per_s": ada.get("steps_per_s"),
        "model": {
            "name": meta.get("name"),
            "version": meta.get("version"),
            "sha256": meta.get("sha256"),
        },
        "base_model": ada.get("base"),
        "validation_fractions": ada.get("validation_fractions"),
        "dsc": {
            o: {
                "base": (base.get("dsc") or {}).get(o),
                "adapted": (adapted.get("dsc") or {}).get(o),
            }
            for o in organs
        },
        "mean_dsc": {"base": base.get("mean_dsc"), "adapted": adapted.get("mean_dsc")},
    }


def _last_error(log_path: Path) -> str:
    """The ``error (...)`` line ``jrs adapt`` printed last, else the last line of its log."""
    try:
        lines = log_path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    for line in reversed(lines[-200:]):
        if line.startswith("error (") or "Error" in line.split(":")[0]:
            return line.strip()[:400]
    return lines[-1].strip()[:400] if lines else ""


class AdaptationWorker:
    """Runs the queued adaptations of a store, one ``jrs adapt`` subprocess at a time.

    Args:
        store: the patient store.
        patients_dir: folder of the patient folders.
        command: ``command(patient_dir) -> argv`` of the adaptation.
        poll_s: seconds between two looks at the queue.
        stop_grace_s: seconds a stopped ``jrs adapt`` gets to checkpoint before it is killed.
        max_attempts: starts after which an unfinished adaptation fails.
    """

    def __init__(
        self,
        store: PatientStore,
        patients_dir: Path,
        command: Callable[[Path], list[str]],
        *,
        poll_s: float = 1.0,
        stop_grace_s: float = STOP_GRACE_S,
        max_attempts: int = MAX_ADAPT_ATTEMPTS,
    ) -> None:
        self.store = store
        self.patients_dir = Path(patients_dir)
        self.command = command
        self.poll_s = poll_s
        self.stop_grace_s = stop_grace_s
        self.max_attempts = max_attempts
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._current: str | None = None
        self._lock = threading.Lock()

    @property
    def current(self) -> str | None:
        """The patient being adapted now."""
        with self._lock:
            return self._current

    def recover(self) -> dict[str, list[str]]:
        """Queue again (or fail) adaptations a previous process left running.

        Returns:
            ``{"requeued": [...], "failed": [...]}``.
        """
        out: dict[str, list[str]] = {"requeued": [], "failed": []}
        for p in self.store.patients("running"):
            if p.adapt_attempts >= self.max_attempts:
                self.store.update(
                    p.id,
                    adapt_status="failed",
                    adapt_finished_at=time.time(),
                    adapt_pid=None,
                    adapt_reason=(
                        f"the adaptation was interrupted {p.adapt_attempts} times (service "
                        "restarts); fractions use the generic model; upload the patient again "
                        "to retry"
                    ),
                )
                out["failed"].append(p.id)
            else:
                self.store.update(
                    p.id,
                    adapt_status="queued",
                    adapt_pid=None,
                    adapt_reason="interrupted by a service restart; continues from its last "
                    "checkpoint",
                )
                out["requeued"].append(p.id)
        if out["requeued"] or out["failed"]:
            logger.warning(
                "recovered adaptations of a previous process",
                extra={"fields": {k: len(v) for k, v in out.items()}},
            )
        return out

    def start(self) -> None:
        """Recover, then run the queue in a daemon thread."""
        self.recover()
        self._stop.clear()
        self._thread = threading.Thread(target=self.run_forever, name="jrs-adapt", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop: a running ``jrs adapt`` checkpoints (SIGTERM) and its patient is queued again."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s if timeout_s is not None else self.stop_grace_s + 10)
            self._thread = None

    def run_forever(self) -> None:
        """Claim and run queued adaptations until `stop`."""
        while not self._stop.is_set():
            try:
                ran = self.run_once()
            except Exception as exc:  # keep the worker alive (the store may be busy)
                logger.error("adaptation worker error", exc_info=exc)
                ran = False
            if not ran:
                self._stop.wait(self.poll_s)

    def run_once(self) -> bool:
        """Run the oldest queued adaptation, if any; whether one was run."""
        patient = self.store.claim_next()
        if patient is None:
            return False
        with self._lock:
            self._current = patient.id
        try:
            self._run(patient)
        finally:
            with self._lock:
                self._current = None
        return True

    def _run(self, patient: Patient) -> None:
        folder = self.patients_dir / patient.id
        argv = self.command(folder)
        logger.info(
            "adaptation started",
            extra={"fields": {"patient_id": patient.id, "attempt": patient.adapt_attempts}},
        )
        t0 = time.monotonic()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with (folder / ADAPT_LOG).open("ab") as log_fh:
                proc = subprocess.Popen(
                    argv,
                    stdout=log_fh,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
        except OSError as exc:  # the command cannot start: say so, never leave it "running"
            self.store.update(
                patient.id,
                adapt_status="failed",
                adapt_finished_at=time.time(),
                adapt_reason=f"the adaptation could not start ({type(exc).__name__}); fractions "
                "use the generic model",
            )
            logger.error("adaptation could not start", exc_info=exc)
            return
        self.store.update(patient.id, adapt_pid=proc.pid)
        cancelled = False
        stopped = False
        last_check = 0.0
        while True:
            try:
                rc = proc.wait(timeout=0.25)
                break
            except subprocess.TimeoutExpired:
                pass
            if not stopped and self._stop.is_set():
                stopped = True
                self._terminate(proc)
            if time.monotonic() - last_check > 2.0:
                last_check = time.monotonic()
                if not cancelled and self.store.get(patient.id) is None:  # deleted
                    cancelled = True
                    self._terminate(proc)
        seconds = time.monotonic() - t0
        if cancelled or self.store.get(patient.id) is None:
            shutil.rmtree(folder, ignore_errors=True)
            logger.info("adaptation cancelled", extra={"fields": {"patient_id": patient.id}})
            return
        attempts = patient.adapt_attempts
        if rc == 0 and (folder / MODEL_DIR / "metadata.json").is_file():
            result = _result_of(folder / MODEL_DIR)
            self.store.update(
                patient.id,
                adapt_status="succeeded",
                adapt_finished_at=time.time(),
                adapt_pid=None,
                adapt_result=result,
                adapt_reason=None if result["kept"] else result["reason"],
            )
            logger.info(
                "adaptation succeeded",
                extra={
                    "fields": {
                        "patient_id": patient.id,
                        "kept": result["kept"],
                        "seconds": round(seconds, 1),
                    }
                },
            )
        elif (stopped or rc == EXIT_INTERRUPTED) and attempts < self.max_attempts:
            self.store.update(
                patient.id,
                adapt_status="queued",
                adapt_pid=None,
                adapt_reason="interrupted (service stop); continues from its last checkpoint",
            )
            logger.info("adaptation interrupted", extra={"fields": {"patient_id": patient.id}})
        else:
            why = _last_error(folder / ADAPT_LOG) or f"jrs adapt exited with code {rc}"
            if stopped or rc == EXIT_INTERRUPTED:
                why = f"interrupted {attempts} times; fractions use the generic model"
            self.store.update(
                patient.id,
                adapt_status="failed",
                adapt_finished_at=time.time(),
                adapt_pid=None,
                adapt_reason=f"{why} (fractions use the generic model)"[:600],
            )
            logger.warning(
                "adaptation failed",
                extra={"fields": {"patient_id": patient.id, "exit_code": rc}},
            )

    def _terminate(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGTERM (``jrs adapt`` checkpoints and exits), then SIGKILL after the grace."""
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=self.stop_grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
