"""The SQLite set-up the service's stores share: WAL mode, one connection, immediate transactions.

`SqliteStore` opens the database file (its folder is created), applies a schema, and gives its
subclasses (`jrs.service.jobs.JobStore`, `jrs.service.patient_store.PatientStore`) a locked
connection and `_tx`, an immediate transaction that rolls back on any exception. WAL mode lets
the service and an adaptation worker process share one file.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class SqliteStore:
    """One SQLite database file in WAL mode, safe to share between threads.

    Args:
        path: the database file (its folder is created).
        schema: SQL script run at start (``CREATE TABLE IF NOT EXISTS ...``).
    """

    def __init__(self, path: Path, schema: str) -> None:
        """Open (or create) the database and apply ``schema``."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(
            str(self.path), check_same_thread=False, isolation_level=None, timeout=30
        )
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(schema)

    @property
    def journal_mode(self) -> str:
        """The SQLite journal mode (``wal``)."""
        with self._lock:
            return str(self._conn.execute("PRAGMA journal_mode").fetchone()[0])

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._conn.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """An immediate transaction under the store's lock; rolled back on any exception."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
