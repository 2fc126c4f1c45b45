"""The patient store: one row per patient (planning, adaptation status, model); SQLite, WAL.

Shared by the service and an adaptation worker process; the patient folder's layout (planning,
model, adaptation work and log) is named here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from jrs.service.db import SqliteStore

logger = logging.getLogger("jrs.service.patients")


AdaptStatus = Literal["unavailable", "queued", "running", "succeeded", "failed"]


ADAPT_STATUSES: tuple[AdaptStatus, ...] = (
    "unavailable",
    "queued",
    "running",
    "succeeded",
    "failed",
)


#: Marker in a fraction job's input folder: ``{"patient_id": ...}``.
PATIENT_MARKER = "patient.json"


#: Inside a patient folder.
PLANNING_DIR = "planning"


MODEL_DIR = "model"


WORK_DIR = "adapt"


ADAPT_LOG = "adapt.log"


#: An adaptation started this many times without finishing fails.
MAX_ADAPT_ATTEMPTS = 4


#: Exit code of ``jrs adapt`` when it stopped on request (it continues when run again).
EXIT_INTERRUPTED = 75


#: Seconds ``jrs adapt`` gets to checkpoint after SIGTERM before it is killed.
STOP_GRACE_S = 60.0


#: Patient folders without a row older than this (s) are removed by the cleanup.
ORPHAN_AGE_S = 6 * 3600.0


def new_patient_id() -> str:
    """A fresh patient id (32 lowercase hex digits; random, not derived from patient data)."""
    return uuid.uuid4().hex


def series_sha256(uid: str) -> str:
    """Hex SHA-256 of the planning SeriesInstanceUID (what is kept instead of the UID)."""
    return hashlib.sha256(uid.encode()).hexdigest()


# ------------------------------------------------------------------------------ store
@dataclass
class Patient:
    """One row of the patient store.

    Attributes:
        id: patient id (32 hex digits).
        created_at: UNIX time of the upload.
        last_used_at: UNIX time of the upload or of the last fraction (retention counts from it).
        planning: what the validation found: ``slices``, ``rois``, ``organs`` (organ keys the
            ROI names map to), ``series_sha256``, ``warnings``.
        adapt_status: see `ADAPT_STATUSES`.
        adapt_reason: why it is unavailable or failed, or a note (``interrupted; resumes``).
        adapt_attempts: how many times an adaptation process was started.
        adapt_queued_at: UNIX time it was queued.
        adapt_started_at: UNIX time the last attempt started.
        adapt_finished_at: UNIX time it ended.
        adapt_pid: process id of the running ``jrs adapt``.
        adapt_result: of a succeeded adaptation: ``kept``, ``reason``, ``steps``, ``seconds``,
            figures (from the model's ``metadata.json``).
        request_id: the request that created it.
    """

    id: str
    created_at: float
    last_used_at: float
    planning: dict[str, Any] = field(default_factory=dict)
    adapt_status: AdaptStatus = "queued"
    adapt_reason: str | None = None
    adapt_attempts: int = 0
    adapt_queued_at: float | None = None
    adapt_started_at: float | None = None
    adapt_finished_at: float | None = None
    adapt_pid: int | None = None
    adapt_result: dict[str, Any] | None = None
    request_id: str | None = None

    @property
    def uses_patient_model(self) -> bool:
        """Whether fractions now use the patient model (adapted and kept)."""
        return self.adapt_status == "succeeded" and bool((self.adapt_result or {}).get("kept"))


_SCHEMA = """
CREATE TABLE IF NOT EXISTS patients (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    last_used_at REAL NOT NULL,
    planning TEXT NOT NULL DEFAULT '{}',
    adapt_status TEXT NOT NULL CHECK (adapt_status IN
        ('unavailable', 'queued', 'running', 'succeeded', 'failed')),
    adapt_reason TEXT,
    adapt_attempts INTEGER NOT NULL DEFAULT 0,
    adapt_queued_at REAL,
    adapt_started_at REAL,
    adapt_finished_at REAL,
    adapt_pid INTEGER,
    adapt_result TEXT,
    request_id TEXT
);
CREATE INDEX IF NOT EXISTS patients_status ON patients (adapt_status);
CREATE TABLE IF NOT EXISTS patient_fractions (
    patient_id TEXT NOT NULL,
    job_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (patient_id, job_id)
);
"""


_JSON_FIELDS = ("planning", "adapt_result")


class PatientStore(SqliteStore):
    """SQLite patient store in WAL mode, shared by the service and an adaptation worker process.

    Args:
        path: the database file (its folder is created).
    """

    def __init__(self, path: Path) -> None:
        """Open (or create) the database file."""
        super().__init__(path, _SCHEMA)

    @staticmethod
    def _patient(row: sqlite3.Row) -> Patient:
        values = dict(row)
        for name in _JSON_FIELDS:
            values[name] = json.loads(values[name]) if values[name] else None
        values["planning"] = values["planning"] or {}
        return Patient(**values)

    def create(self, patient: Patient) -> None:
        """Insert a patient row."""
        values = dict(patient.__dict__)
        for name in _JSON_FIELDS:
            values[name] = json.dumps(values[name]) if values[name] is not None else None
        columns = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        with self._tx() as c:
            c.execute(f"INSERT INTO patients ({columns}) VALUES ({marks})", tuple(values.values()))

    def get(self, patient_id: str) -> Patient | None:
        """The patient with this id, or None."""
        with self._lock:
            row = self._conn.execute(
                "SELECT * FROM patients WHERE id = ?", (patient_id,)
            ).fetchone()
        return self._patient(row) if row is not None else None

    def patients(self, status: AdaptStatus | None = None) -> list[Patient]:
        """Patients (all or of one adaptation status), oldest first."""
        query = "SELECT * FROM patients"
        args: tuple[Any, ...] = ()
        if status is not None:
            query += " WHERE adapt_status = ?"
            args = (status,)
        with self._lock:
            rows = self._conn.execute(query + " ORDER BY created_at", args).fetchall()
        return [self._patient(r) for r in rows]

    def update(self, patient_id: str, **values: Any) -> None:
        """Set columns of a patient row (JSON columns given as Python values)."""
        if not values:
            return
        for name in _JSON_FIELDS:
            if name in values and values[name] is not None:
                values[name] = json.dumps(values[name])
        sets = ", ".join(f"{k} = ?" for k in values)
        with self._tx() as c:
            c.execute(f"UPDATE patients SET {sets} WHERE id = ?", (*values.values(), patient_id))

    def claim_next(self) -> Patient | None:
        """Mark the oldest queued adaptation running (one attempt more) and return it."""
        with self._tx() as c:
            row = c.execute(
                "SELECT id FROM patients WHERE adapt_status = 'queued' "
                "ORDER BY adapt_queued_at, created_at LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            c.execute(
                "UPDATE patients SET adapt_status = 'running', adapt_started_at = ?, "
                "adapt_attempts = adapt_attempts + 1, adapt_pid = NULL WHERE id = ?",
                (time.time(), row[0]),
            )
        return self.get(row[0])

    def add_fraction(self, patient_id: str, job_id: str) -> None:
        """Record a fraction job of a patient (and count it as use for the retention)."""
        now = time.time()
        with self._tx() as c:
            c.execute(
                "INSERT OR IGNORE INTO patient_fractions (patient_id, job_id, created_at) "
                "VALUES (?, ?, ?)",
                (patient_id, job_id, now),
            )
            c.execute("UPDATE patients SET last_used_at = ? WHERE id = ?", (now, patient_id))

    def fractions(self, patient_id: str) -> list[str]:
        """Job ids of a patient's fractions, oldest first."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT job_id FROM patient_fractions WHERE patient_id = ? ORDER BY created_at",
                (patient_id,),
            ).fetchall()
        return [r[0] for r in rows]

    def delete(self, patient_id: str) -> bool:
        """Delete a patient row and its fraction records; whether it existed."""
        with self._tx() as c:
            cur = c.execute("DELETE FROM patients WHERE id = ?", (patient_id,))
            c.execute("DELETE FROM patient_fractions WHERE patient_id = ?", (patient_id,))
        return cur.rowcount > 0

    def unused_since(self, cutoff: float) -> list[str]:
        """Ids of patients last used before `cutoff` (UNIX time)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT id FROM patients WHERE last_used_at < ?", (cutoff,)
            ).fetchall()
        return [r[0] for r in rows]
