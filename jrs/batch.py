"""Batch re-contouring of many fractions from a CSV manifest.

The manifest has one row per fraction with the columns ``planning_ct``, ``planning_rtstruct`` and
``daily_ct`` (paths; relative ones are relative to the manifest's folder) and an optional ``id``
(the output sub-folder; default ``row_<n>``). Every row is re-contoured into ``OUT/<id>/``; the
status of every row is kept in ``OUT/batch_status.csv`` (id, status, seconds, error code and
message), rewritten after each row, so a batch stopped for any reason resumes where it was: rows
already ``done`` (with their ``qa.json`` present) are skipped. One failing row is recorded and
never stops the others.

A manifest can be split into shards run by separate processes or machines on a shared output
folder (e.g. the pods of a Kubernetes Indexed Job): shard ``i`` of ``n`` takes the rows ``i``,
``i + n``, ``i + 2n``, ... (round robin, so patients listed together are spread over the shards)
and keeps its status in its own ``OUT/batch_status.shard-<i>-of-<n>.csv``, so no two shards ever
write the same file. Rows any status file of ``OUT`` records as done are skipped, so a batch can
be resumed with another shard count.
"""

from __future__ import annotations

import csv
import logging
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from jrs.errors import InvalidInput, JrsError
from jrs.pipeline import NetworkBackend, RecontourOptions, load_backend, recontour

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("planning_ct", "planning_rtstruct", "daily_ct")
STATUS_FILE = "batch_status.csv"
STATUS_COLUMNS = ("id", "status", "seconds", "error_code", "error")
STATUS_GLOB = "batch_status*.csv"


@dataclass(frozen=True)
class BatchRow:
    """One fraction to re-contour.

    Attributes:
        id: output sub-folder name (unique in the manifest).
        planning_ct: planning CT folder.
        planning_rtstruct: planning RTSTRUCT file.
        daily_ct: daily CT folder.
    """

    id: str
    planning_ct: Path
    planning_rtstruct: Path
    daily_ct: Path


@dataclass
class BatchSummary:
    """Outcome of a batch.

    Attributes:
        done: ids re-contoured in this run.
        skipped: ids already done by an earlier run.
        failed: id -> error message.
        seconds: wall time of this run.
    """

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def read_manifest(path: Path | str) -> list[BatchRow]:
    """Read and check a batch manifest.

    Raises:
        InvalidInput: unreadable file, missing columns, empty manifest, duplicate or unsafe ids
            (each message names the file and the row).
    """
    manifest = Path(path)
    try:
        with manifest.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            missing = [c for c in REQUIRED_COLUMNS if c not in columns]
            if missing:
                raise InvalidInput(
                    f"{manifest}: missing column(s) {missing}; a manifest needs "
                    f"{list(REQUIRED_COLUMNS)} and may have 'id'"
                )
            raw_rows = [
                {(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InvalidInput(f"{manifest}: cannot read the manifest ({exc})") from exc
    if not raw_rows:
        raise InvalidInput(f"{manifest}: the manifest has no rows")
    base = manifest.resolve().parent
    rows: list[BatchRow] = []
    seen: set[str] = set()
    for n, r in enumerate(raw_rows, start=1):
        row_id = r.get("id") or f"row_{n:04d}"
        if not re.fullmatch(r"[A-Za-z0-9._-]+", row_id) or row_id in (".", ".."):
            raise InvalidInput(
                f"{manifest}: row {n}: id {row_id!r} is not a safe folder name "
                "(letters, digits, '.', '_' and '-' only)"
            )
        if row_id in seen:
            raise InvalidInput(f"{manifest}: row {n}: id {row_id!r} appears twice")
        seen.add(row_id)
        empty = [c for c in REQUIRED_COLUMNS if not r.get(c)]
        if empty:
            raise InvalidInput(f"{manifest}: row {n} ({row_id}): empty {empty}")
        rows.append(BatchRow(row_id, *(base / Path(r[c]) for c in REQUIRED_COLUMNS)))
    return rows


def select_shard(
    rows: list[BatchRow], shard_index: int = 0, shard_count: int = 1
) -> list[BatchRow]:
    """The rows of one shard: ``rows[shard_index::shard_count]`` (round robin, manifest order).

    Args:
        rows: all rows of the manifest.
        shard_index: this shard, ``0 <= shard_index < shard_count``.
        shard_count: the number of shards.

    Returns:
        The rows of the shard (empty when there are fewer rows than shards).

    Raises:
        InvalidInput: a shard count below 1 or an index outside ``[0, shard_count)``.
    """
    if shard_count < 1:
        raise InvalidInput(f"shard count must be at least 1, got {shard_count}")
    if not 0 <= shard_index < shard_count:
        raise InvalidInput(
            f"shard index {shard_index} is outside 0..{shard_count - 1} (shard count {shard_count})"
        )
    return rows[shard_index::shard_count]


def status_file_name(shard_index: int = 0, shard_count: int = 1) -> str:
    """Name of the status file of a shard (``batch_status.csv`` when there is one shard)."""
    if shard_count == 1:
        return STATUS_FILE
    return f"batch_status.shard-{shard_index:05d}-of-{shard_count:05d}.csv"


def _read_status(path: Path) -> dict[str, dict[str, str]]:
    if not path.is_file():
        return {}
    with path.open(newline="") as fh:
        return {r["id"]: r for r in csv.DictReader(fh)}


def _write_status(path: Path, status: dict[str, dict[str, str]]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=STATUS_COLUMNS)
        writer.writeheader()
        for row in status.values():
            writer.writerow({k: row.get(k, "") for k in STATUS_COLUMNS})
    tmp.replace(path)


_WORKER_BACKEND: NetworkBackend | None = None


def _init_worker(options: RecontourOptions) -> None:
    global _WORKER_BACKEND
    logging.basicConfig(level=logging.WARNING)
    _WORKER_BACKEND = load_backend(options) if options.method == "network" else None


def _run_row(row: BatchRow, out: Path, options: RecontourOptions) -> tuple[str, float, str, str]:
    """Re-contour one row; never raises (returns status, seconds, error code, message)."""
    t0 = time.perf_counter()
    try:
        recontour(
            row.planning_ct,
            row.planning_rtstruct,
            row.daily_ct,
            out / row.id,
            options,
            backend=_WORKER_BACKEND,
        )
        return "done", time.perf_counter() - t0, "", ""
    except JrsError as exc:
        return "failed", time.perf_counter() - t0, exc.code, exc.message
    except Exception as exc:  # one bad row must never stop the batch
        log.exception("row %s failed unexpectedly", row.id)
        return "failed", time.perf_counter() - t0, "internal_error", f"{type(exc).__name__}: {exc}"


def run_batch(
    manifest: Path | str,
    out: Path | str,
    options: RecontourOptions | None = None,
    *,
    workers: int = 1,
    retry_failed: bool = False,
    on_progress: Callable[[str, str], object] | None = None,
    backend: NetworkBackend | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    row_runner: Callable[[BatchRow, Path], tuple[str, float, str, str]] | None = None,
) -> BatchSummary:
    """Re-contour every row of a manifest (resumable, failures recorded and skipped).

    Args:
        manifest: the CSV manifest.
        out: output folder (``OUT/<id>/`` per row, ``OUT/batch_status.csv``).
        options: re-contouring options (model, device, method, ...).
        workers: parallel worker processes (each loads the model once); 1 runs in this process.
        retry_failed: also run rows an earlier run recorded as failed.
        on_progress: called with (row id, status) after each row (progress bars).
        backend: an already loaded network for in-process runs (``workers=1``).
        shard_index: run only this shard of the manifest (see `select_shard`).
        shard_count: the number of shards the manifest is split into (1: the whole manifest).
        row_runner: re-contours one row into ``OUT/<id>/`` in another way than the in-process
            pipeline, e.g. through the REST service (``jrs batch --server``, `jrs_cli.remote`),
            and returns (``done``/``failed``, seconds, error code, message); `options` and
            `backend` are then unused and `workers` threads call it.

    Returns:
        What was done, skipped and failed (rows of this shard only).

    Raises:
        InvalidInput: a bad manifest or shard index/count.
    """
    opts = options or RecontourOptions()
    rows = select_shard(read_manifest(manifest), shard_index, shard_count)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    status_path = out_dir / status_file_name(shard_index, shard_count)
    status = _read_status(status_path)
    done_elsewhere = {
        row_id
        for other in sorted(out_dir.glob(STATUS_GLOB))
        if other != status_path
        for row_id, record in _read_status(other).items()
        if record.get("status") == "done"
    }
    summary = BatchSummary()
    t0 = time.perf_counter()

    todo: list[BatchRow] = []
    for row in rows:
        prev = status.get(row.id, {}).get("status")
        if prev != "done" and row.id in done_elsewhere:
            prev = "done"  # by an earlier run with another shard count
            status[row.id] = {"id": row.id, "status": "done"}
        if prev == "done" and (out_dir / row.id / "qa.json").is_file():
            summary.skipped.append(row.id)
            continue
        if prev == "failed" and not retry_failed:
            summary.skipped.append(row.id)
            continue
        todo.append(row)
        status[row.id] = {"id": row.id, "status": "pending"}
    _write_status(status_path, status)

    def record(row_id: str, result: tuple[str, float, str, str]) -> None:
        state, seconds, code, message = result
        status[row_id] = {
            "id": row_id,
            "status": state,
            "seconds": f"{seconds:.2f}",
            "error_code": code,
            "error": message,
        }
        _write_status(status_path, status)
        if state == "done":
            summary.done.append(row_id)
        else:
            summary.failed[row_id] = message
            log.warning("row %s failed: %s", row_id, message)
        if on_progress is not None:
            on_progress(row_id, state)

    global _WORKER_BACKEND
    if row_runner is not None:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as threads:
            jobs = {threads.submit(row_runner, row, out_dir): row.id for row in todo}
            for job in as_completed(jobs):
                try:
                    record(jobs[job], job.result())
                except Exception as exc:  # one bad row must never stop the batch
                    record(jobs[job], ("failed", 0.0, "internal_error", f"{exc!r}"))
    elif workers <= 1:
        if todo:
            if backend is not None:
                _WORKER_BACKEND = backend
            else:
                _init_worker(opts)
        for row in todo:
            record(row.id, _run_row(row, out_dir, opts))
    else:
        with ProcessPoolExecutor(
            max_workers=workers, initializer=_init_worker, initargs=(opts,)
        ) as pool:
            futures: dict[Future[tuple[str, float, str, str]], str] = {
                pool.submit(_run_row, row, out_dir, opts): row.id for row in todo
            }
            for fut in _completed(futures):
                row_id = futures[fut]
                try:
                    record(row_id, fut.result())
                except Exception as exc:  # a worker process died (e.g. killed, out of memory)
                    record(row_id, ("failed", 0.0, "worker_died", f"{type(exc).__name__}: {exc}"))
    summary.seconds = time.perf_counter() - t0
    return summary


def _completed(
    futures: dict[Future[tuple[str, float, str, str]], str],
) -> Iterator[Future[tuple[str, float, str, str]]]:
    yield from as_completed(futures)
