"""Batch re-contouring of many fractions from a CSV manifest.

The manifest has one row per fraction with the columns ``planning_ct``, ``planning_rtstruct`` and
``daily_ct`` (paths; relative ones are relative to the manifest's folder) and an optional ``id``
(the output sub-folder; default ``row_<n>``). Every row is re-contoured into ``OUT/<id>/``; the
status of every row is kept in ``OUT/batch_status.csv`` (id, status, seconds, error code and
message), rewritten after each row, so a batch stopped for any reason resumes where it was: rows
already ``done`` (with their ``qa.json`` present) are skipped. One failing row is recorded and
never stops the others.

Patient-specific adaptation (``jrs batch --adapt``, an ``adapter`` given to `run_batch`): the rows
are grouped by patient, by the optional ``patient`` column (rows of one patient must share one
planning scan) or else by the planning series (SeriesInstanceUID of the planning CT). Each group's
model is adapted once into ``OUT/patient_models/<group>/`` (``planning_<hash>`` or
``patient_<hash>``: hashes, never a patient identifier; an adaptation stopped half-way continues
from its work folder) and re-contours all of that group's fractions; ``OUT/adapt_status.csv`` keeps
one line per group. A group whose adaptation fails is re-contoured with the generic model; the
``model`` column of the status file says which model each row used. Shards then take whole groups
(round robin over the groups in manifest order), so no patient is adapted twice.

A manifest can be split into shards run by separate processes or machines on a shared output
folder (e.g. the pods of a Kubernetes Indexed Job): shard ``i`` of ``n`` takes the rows ``i``,
``i + n``, ``i + 2n``, ... (round robin, so patients listed together are spread over the shards)
and keeps its status in its own ``OUT/batch_status.shard-<i>-of-<n>.csv``, so no two shards ever
write the same file. Rows any status file of ``OUT`` records as done are skipped, so a batch can
be resumed with another shard count.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from jrs.core.errors import InvalidInput, JrsError
from jrs.inference.backend import NetworkBackend
from jrs.pipeline.methods import load_backend
from jrs.pipeline.options import RecontourOptions
from jrs.pipeline.run import recontour

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("planning_ct", "planning_rtstruct", "daily_ct")
STATUS_FILE = "batch_status.csv"
STATUS_COLUMNS = ("id", "status", "seconds", "error_code", "error", "model")
STATUS_GLOB = "batch_status*.csv"
#: Optional manifest column naming the patient a row belongs to (for adaptation).
PATIENT_COLUMN = "patient"
#: Folder of the patient models inside the output folder.
PATIENT_MODELS = "patient_models"
ADAPT_STATUS_FILE = "adapt_status.csv"
ADAPT_STATUS_COLUMNS = ("group", "status", "kept", "seconds", "rows", "error_code", "error")

#: ``adapter(planning_ct, planning_rtstruct, model_dir) -> {"kept": bool, "reason": str}``:
#: writes a patient model folder (``jrs adapt``); raises `JrsError` when it cannot.
Adapter = Callable[[Path, Path, Path], Mapping[str, Any]]


@dataclass(frozen=True)
class BatchRow:
    """One fraction to re-contour.

    Attributes:
        id: output sub-folder name (unique in the manifest).
        planning_ct: planning CT folder.
        planning_rtstruct: planning RTSTRUCT file.
        daily_ct: daily CT folder.
        patient: the manifest's ``patient`` value ("" when the column is absent or empty).
    """

    id: str
    planning_ct: Path
    planning_rtstruct: Path
    daily_ct: Path
    patient: str = ""


@dataclass
class BatchSummary:
    """Outcome of a batch.

    Attributes:
        done: ids re-contoured in this run.
        skipped: ids already done by an earlier run.
        failed: id -> error message.
        seconds: wall time of this run.
        adapted: group -> ``kept`` / ``base`` / ``failed`` (adaptation runs only).
    """

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    adapted: dict[str, str] = field(default_factory=dict)


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
                    f"{list(REQUIRED_COLUMNS)} and may have 'id' and '{PATIENT_COLUMN}'"
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
        ct, rtstruct, daily = (base / Path(r[c]) for c in REQUIRED_COLUMNS)
        rows.append(BatchRow(row_id, ct, rtstruct, daily, r.get(PATIENT_COLUMN, "")))
    return rows


def _hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def planning_series_key(planning_ct: Path) -> str:
    """``planning_<first 10 hex of sha1(SeriesInstanceUID)>`` of a planning CT folder.

    The UID is read from the header of the first DICOM file found (the name `jrs phantom
    --from-planning` gives the same scan); a folder without a readable UID is keyed by its
    resolved path instead.
    """
    import pydicom

    folder = Path(planning_ct)
    files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else [folder]
    for path in files[:50]:
        try:
            ds = pydicom.dcmread(
                path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"], force=True
            )
        except Exception:  # not DICOM (a readme, a thumbnail): try the next file
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if uid:
            return f"planning_{_hash(uid)}"
    return f"planning_{_hash(str(folder.resolve()))}"


def row_group(row: BatchRow, cache: dict[Path, str] | None = None) -> str:
    """The patient group of a row.

    Args:
        row: the row.
        cache: planning folder -> key (each planning header is then read once).

    Returns:
        ``patient_<hash of its patient value>``, else its planning's `planning_series_key`.
    """
    if row.patient:
        return f"patient_{_hash(row.patient)}"
    folder = row.planning_ct.resolve()
    if cache is None:
        return planning_series_key(folder)
    if folder not in cache:
        cache[folder] = planning_series_key(folder)
    return cache[folder]


def group_rows(rows: list[BatchRow]) -> dict[str, list[BatchRow]]:
    """Rows per patient group, in manifest order (see the module docstring).

    Rows with a ``patient`` value are grouped by it (``patient_<hash of the value>``); the others
    by their planning series (`planning_series_key`).

    Raises:
        InvalidInput: two rows of one patient name different planning scans.
    """
    groups: dict[str, list[BatchRow]] = {}
    keys: dict[Path, str] = {}
    for row in rows:
        groups.setdefault(row_group(row, keys), []).append(row)
    for key, members in groups.items():
        plans = {(r.planning_ct.resolve(), r.planning_rtstruct.resolve()) for r in members}
        if key.startswith("patient_") and len(plans) > 1:
            ids = ", ".join(r.id for r in members[:6])
            raise InvalidInput(
                f"rows {ids} share a patient value but name {len(plans)} different planning "
                "scans (planning_ct, planning_rtstruct); a patient model is adapted to one "
                "planning scan: give each planning scan its own patient value"
            )
    return groups


def select_shard_groups(
    groups: Mapping[str, list[BatchRow]], shard_index: int = 0, shard_count: int = 1
) -> dict[str, list[BatchRow]]:
    """The groups of one shard: group ``k`` (manifest order) goes to shard ``k % shard_count``."""
    select_shard([], shard_index, shard_count)  # the checks of the indices
    return {g: r for k, (g, r) in enumerate(groups.items()) if k % shard_count == shard_index}


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


def _read_status(path: Path, key: str = "id") -> dict[str, dict[str, str]]:
    if not path.is_file():
        return {}
    with path.open(newline="") as fh:
        return {r[key]: r for r in csv.DictReader(fh)}


def _write_status(
    path: Path, status: dict[str, dict[str, str]], columns: tuple[str, ...] = STATUS_COLUMNS
) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in status.values():
            writer.writerow({k: row.get(k, "") for k in columns})
    tmp.replace(path)


_WORKER_BACKEND: NetworkBackend | None = None
#: The model folder `_WORKER_BACKEND` was loaded from (patient models replace it in turn).
_WORKER_MODEL: Path | None = None


def _init_worker(options: RecontourOptions) -> None:
    global _WORKER_BACKEND, _WORKER_MODEL
    logging.basicConfig(level=logging.WARNING)
    _WORKER_BACKEND = load_backend(options) if options.method == "network" else None
    _WORKER_MODEL = options.model_dir


def _backend_for(options: RecontourOptions) -> NetworkBackend | None:
    """The worker's backend, loaded again when a row asks for another model folder.

    The iterative method uses it as its second opinion (``method_consensus``); it needs none, so
    a model that does not load leaves it without one (None) instead of failing the row.
    """
    global _WORKER_BACKEND, _WORKER_MODEL
    if options.method != "network" and not options.method_consensus:
        return None
    if _WORKER_BACKEND is None or options.model_dir != _WORKER_MODEL:
        try:
            _WORKER_BACKEND = load_backend(options)
        except JrsError:
            if options.method == "network":
                raise
            return None
        _WORKER_MODEL = options.model_dir
    return _WORKER_BACKEND


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
            backend=_backend_for(options),
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
    adapter: Adapter | None = None,
    on_adapt: Callable[[str, str], object] | None = None,
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
            pipeline, e.g. through the REST service (``jrs batch --server``, `jrs.cli.remote`),
            and returns (``done``/``failed``, seconds, error code, message); `options` and
            `backend` are then unused and `workers` threads call it.
        adapter: adapt a model per patient group first (``jrs batch --adapt``; module
            docstring) and re-contour each group's rows with it; groups, not rows, are then
            sharded. Not combined with `row_runner`.
        on_adapt: called with (group, ``kept``/``base``/``failed``) after each adaptation.

    Returns:
        What was done, skipped and failed (rows of this shard only).

    Raises:
        InvalidInput: a bad manifest or shard index/count.
    """
    opts = options or RecontourOptions()
    groups: dict[str, list[BatchRow]] = {}
    if adapter is not None:
        if row_runner is not None:
            raise InvalidInput(
                "per-patient adaptation runs in this process; with a service, upload each "
                "patient once (POST /v1/patients) and send its fractions instead"
            )
        groups = select_shard_groups(group_rows(read_manifest(manifest)), shard_index, shard_count)
        rows = [row for members in groups.values() for row in members]
    else:
        rows = select_shard(read_manifest(manifest), shard_index, shard_count)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    status_path = out_dir / status_file_name(shard_index, shard_count)
    status = _read_status(status_path)
    summary = BatchSummary()
    t0 = time.perf_counter()
    todo = _rows_to_do(rows, status, status_path, out_dir, retry_failed, summary)
    _write_status(status_path, status)

    # per-patient models first (only for groups with rows left to do)
    row_options: dict[str, RecontourOptions] = {}
    used_model: dict[str, str] = {}
    if adapter is not None:
        pending = {row.id for row in todo}
        wanted = {g: m for g, m in groups.items() if any(r.id in pending for r in m)}
        models = _adapt_groups(
            adapter, wanted, out_dir, shard_index, shard_count, retry_failed, summary, on_adapt
        )
        for group, members in wanted.items():
            model_dir = models.get(group)
            for row in members:
                if model_dir is not None:
                    row_options[row.id] = replace(opts, model_dir=model_dir)
                used_model[row.id] = "patient" if model_dir is not None else "generic"

    def record(row_id: str, result: tuple[str, float, str, str]) -> None:
        state, seconds, code, message = result
        status[row_id] = {
            "id": row_id,
            "status": state,
            "seconds": f"{seconds:.2f}",
            "error_code": code,
            "error": message,
            "model": used_model.get(row_id, ""),
        }
        _write_status(status_path, status)
        if state == "done":
            summary.done.append(row_id)
        else:
            summary.failed[row_id] = message
            log.warning("row %s failed: %s", row_id, message)
        if on_progress is not None:
            on_progress(row_id, state)

    global _WORKER_BACKEND, _WORKER_MODEL
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
                _WORKER_BACKEND, _WORKER_MODEL = backend, opts.model_dir
            elif adapter is not None:  # loaded per model folder as the rows need them
                _WORKER_BACKEND, _WORKER_MODEL = None, None
            else:
                _init_worker(opts)
        for row in todo:
            record(row.id, _run_row(row, out_dir, row_options.get(row.id, opts)))
    else:
        lazy = replace(opts, method="iterative") if adapter is not None else opts
        with ProcessPoolExecutor(
            max_workers=workers, initializer=_init_worker, initargs=(lazy,)
        ) as pool:
            futures: dict[Future[tuple[str, float, str, str]], str] = {
                pool.submit(_run_row, row, out_dir, row_options.get(row.id, opts)): row.id
                for row in todo
            }
            for fut in _completed(futures):
                row_id = futures[fut]
                try:
                    record(row_id, fut.result())
                except Exception as exc:  # a worker process died (e.g. killed, out of memory)
                    record(row_id, ("failed", 0.0, "worker_died", f"{type(exc).__name__}: {exc}"))
    summary.seconds = time.perf_counter() - t0
    return summary


def _rows_to_do(
    rows: list[BatchRow],
    status: dict[str, dict[str, str]],
    status_path: Path,
    out_dir: Path,
    retry_failed: bool,
    summary: BatchSummary,
) -> list[BatchRow]:
    """The rows still to run; ``status`` marks them pending and ``summary`` lists the skipped.

    A row is done when its status says so (in this shard's file, or in another shard count's
    from an earlier run) and its ``qa.json`` exists; a failed row runs again only on request.
    """
    done_elsewhere = {
        row_id
        for other in sorted(out_dir.glob(STATUS_GLOB))
        if other != status_path
        for row_id, record in _read_status(other).items()
        if record.get("status") == "done"
    }
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
    return todo


def adapt_status_file_name(shard_index: int = 0, shard_count: int = 1) -> str:
    """Name of the adaptation status file of a shard (``adapt_status.csv`` for one shard)."""
    if shard_count == 1:
        return ADAPT_STATUS_FILE
    return f"adapt_status.shard-{shard_index:05d}-of-{shard_count:05d}.csv"


def _adapt_groups(
    adapter: Adapter,
    groups: Mapping[str, list[BatchRow]],
    out_dir: Path,
    shard_index: int,
    shard_count: int,
    retry_failed: bool,
    summary: BatchSummary,
    on_adapt: Callable[[str, str], object] | None,
) -> dict[str, Path | None]:
    """Adapt (or find adapted) the model of each group; group -> patient model folder or None.

    None means the generic model: the adaptation failed, or kept the base model (the folder then
    holds a copy of the base: the generic model gives the same contours without a second load).
    """
    path = out_dir / adapt_status_file_name(shard_index, shard_count)
    status = _read_status(path, key="group")
    models: dict[str, Path | None] = {}
    for group, members in groups.items():
        model_dir = out_dir / PATIENT_MODELS / group
        prev = status.get(group, {})
        outcome = ""
        if prev.get("status") == "done" and (model_dir / "metadata.json").is_file():
            outcome = "kept" if prev.get("kept") == "yes" else "base"
        elif prev.get("status") == "failed" and not retry_failed:
            outcome = "failed"
        if outcome:
            models[group] = model_dir if outcome == "kept" else None
            summary.adapted[group] = outcome
            continue
        first = members[0]
        status[group] = {"group": group, "status": "running", "rows": str(len(members))}
        _write_status(path, status, ADAPT_STATUS_COLUMNS)
        t0 = time.perf_counter()
        record = {"group": group, "rows": str(len(members))}
        try:
            info = adapter(first.planning_ct, first.planning_rtstruct, model_dir)
        except JrsError as exc:
            record.update(status="failed", error_code=exc.code, error=exc.message)
        except Exception as exc:  # one patient's adaptation must never stop the batch
            log.exception("adaptation of %s failed unexpectedly", group)
            record.update(status="failed", error_code="internal_error", error=repr(exc))
        else:
            kept = bool(info.get("kept"))
            record.update(status="done", kept="yes" if kept else "no")
        record["seconds"] = f"{time.perf_counter() - t0:.1f}"
        status[group] = record
        _write_status(path, status, ADAPT_STATUS_COLUMNS)
        outcome = (
            "failed"
            if record["status"] == "failed"
            else ("kept" if record["kept"] == "yes" else "base")
        )
        if outcome == "failed":
            log.warning(
                "adaptation of %s failed: %s; its rows use the generic model",
                group,
                record.get("error"),
            )
        models[group] = model_dir if outcome == "kept" else None
        summary.adapted[group] = outcome
        if on_adapt is not None:
            on_adapt(group, outcome)
    return models


def _completed(
    futures: dict[Future[tuple[str, float, str, str]], str],
) -> Iterator[Future[tuple[str, float, str, str]]]:
    yield from as_completed(futures)
