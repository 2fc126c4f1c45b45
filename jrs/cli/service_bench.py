"""``jrs benchmark service``: throughput and latency of the REST service on a phantom case.

One synthetic patient (planning CT + RTSTRUCT, one daily CT) is generated and zipped once; then
``jobs`` re-contouring requests are sent by ``concurrency`` client threads through the product
client (`jrs.cli.remote`): upload, ``POST /v1/recontour?wait=true`` (the server answers the moment
the job ends), polling past the server's wait, and the download of the RTSTRUCT. Latency is the
client's time from the start of the upload to the RTSTRUCT on disk; throughput is the number of
succeeded jobs per minute of wall time from the first upload to the last answer. The server's own
queue wait and run time of each job (from the job's timestamps) are reported next to it.

Without ``--server`` a local ``jrs serve`` is started in a subprocess on a free port of 127.0.0.1
(its own data folder and random API key, ``JRS_MAX_CONCURRENT_JOBS`` = ``workers``) and stopped
at the end; with ``--server URL`` an existing service is measured (``--api-key`` or
``JRS_API_KEY``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from jrs.core.errors import JrsError

log = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def local_server(
    folder: Path,
    *,
    workers: int = 1,
    queue_size: int = 8,
    device: str = "auto",
    model: Path | None = None,
    startup_timeout_s: float = 300.0,
) -> Iterator[tuple[str, str]]:
    """Run ``jrs serve`` in a subprocess (data and log under `folder`); yields (URL, API key).

    The process runs in `folder` (so no ``.env`` of the caller's folder is read), with a random
    key, and is stopped with SIGTERM (graceful) at exit.

    Raises:
        ServiceUnavailable: the service did not become ready (the message ends with its log).
    """
    import httpx

    from jrs.cli.remote import ServiceUnavailable

    folder.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(24)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("JRS_")}
    env.update(
        JRS_API_KEYS=key,
        JRS_DATA_DIR=str(folder / "data"),
        JRS_MAX_CONCURRENT_JOBS=str(workers),
        JRS_QUEUE_SIZE=str(queue_size),
        JRS_DEVICE=device,
        JRS_LOG_LEVEL="WARNING",
    )
    if model is not None:
        env["JRS_MODEL_DIR"] = str(Path(model).resolve())
    url = f"http://127.0.0.1:{port}"
    log_path = folder / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jrs.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=folder,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health/ready", timeout=5).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise ServiceUnavailable(f"the local jrs serve did not become ready:\n{tail}")
            time.sleep(0.5)
        yield url, key
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    t0 = dt.datetime.fromisoformat(start.replace("Z", "+00:00"))
    t1 = dt.datetime.fromisoformat(end.replace("Z", "+00:00"))
    return round((t1 - t0).total_seconds(), 2)


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    a = np.asarray(values, dtype=float)
    return {
        "p50": round(float(np.percentile(a, 50)), 2),
        "p95": round(float(np.percentile(a, 95)), 2),
        "mean": round(float(a.mean()), 2),
        "min": round(float(a.min()), 2),
        "max": round(float(a.max()), 2),
    }


def write_case(
    folder: Path, seed: int, matrix: int, slice_mm: float | None
) -> tuple[Path, Path, list[int]]:
    """Generate a phantom patient and its first fraction; zip the two uploads.

    Returns:
        (planning zip, daily zip, the daily CT grid (z, y, x)).
    """
    from jrs.cli.remote import write_zip
    from jrs.synth import generate_fraction, generate_patient, write_fraction, write_patient

    patient = generate_patient(seed, matrix=matrix, slice_thickness=slice_mm)
    fraction = generate_fraction(patient, 1)
    write_patient(patient, folder / "case")
    write_fraction(fraction, folder / "case" / "fraction_1")
    planning_zip, daily_zip = folder / "planning.zip", folder / "daily.zip"
    with planning_zip.open("wb") as fh:
        write_zip([folder / "case" / "planning"], fh)
    with daily_zip.open("wb") as fh:
        write_zip([folder / "case" / "fraction_1" / "ct"], fh)
    return planning_zip, daily_zip, [int(n) for n in fraction.ct.geometry.shape]


def run_jobs(
    url: str,
    api_key: str | None,
    planning_zip: Path,
    daily_zip: Path,
    *,
    jobs: int,
    concurrency: int,
    timeout_s: float = 3600.0,
) -> dict[str, Any]:
    """Send `jobs` requests with `concurrency` threads; latency and throughput figures."""
    from jrs.cli.remote import ServiceClient

    with ServiceClient(url, api_key, request_timeout_s=900.0) as client:
        ready = client.check()

        def one(i: int) -> dict[str, Any]:
            t0 = time.perf_counter()
            try:
                job, hint = client.submit([planning_zip], [daily_zip], wait_s=600.0)
                job = client.wait(job, timeout_s, first_delay_s=hint)
                if job["status"] != "succeeded":
                    err = job.get("error") or {}
                    return {"ok": False, "error": f"{err.get('code')}: {err.get('message')}"}
                r = client.http.get(job["links"]["rtstruct"])
                if r.status_code != 200:
                    return {"ok": False, "error": f"RTSTRUCT download: HTTP {r.status_code}"}
            except JrsError as exc:
                log.warning("job %d failed: %s", i + 1, exc.message)
                return {"ok": False, "error": exc.message}
            figures = {
                "ok": True,
                "latency_s": round(time.perf_counter() - t0, 2),
                "queue_s": _seconds_between(job.get("created_at"), job.get("started_at")),
                "run_s": _seconds_between(job.get("started_at"), job.get("finished_at")),
                "rtstruct_kb": round(len(r.content) / 1024, 1),
            }
            log.info("job %d/%d: latency %.1f s", i + 1, jobs, figures["latency_s"])
            return figures

        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            results = list(pool.map(one, range(jobs)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    return {
        "jobs": jobs,
        "concurrency": concurrency,
        "succeeded": len(ok),
        "errors": [r["error"] for r in results if not r["ok"]],
        "wall_s": round(wall, 1),
        "jobs_per_minute": round(60.0 * len(ok) / wall, 3) if wall > 0 else None,
        "latency_s": _stats([r["latency_s"] for r in ok]),
        "server_queue_wait_s": _stats([r["queue_s"] for r in ok if r["queue_s"] is not None]),
        "server_run_s": _stats([r["run_s"] for r in ok if r["run_s"] is not None]),
        "per_job": [{k: v for k, v in r.items() if k != "ok"} for r in ok],
        "execution_provider": ready.get("execution_provider"),
    }


def bench_service(
    *,
    jobs: int = 10,
    concurrency: int = 2,
    server: str | None = None,
    api_key: str | None = None,
    seed: int = 500,
    matrix: int = 512,
    slice_mm: float | None = None,
    workers: int = 1,
    device: str = "auto",
    model: Path | None = None,
) -> dict[str, Any]:
    """The whole benchmark (see the module docstring); returns the figures as a dictionary.

    Raises:
        ServiceError: the service is unreachable, not ready, or refuses the key.
    """
    with tempfile.TemporaryDirectory(prefix="jrs-bench-service-") as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        planning_zip, daily_zip, grid = write_case(folder, seed, matrix, slice_mm)
        head: dict[str, Any] = {
            "benchmark": "service",
            "phantom": {"seed": seed, "matrix": matrix, "slice_mm": slice_mm},
            "daily_grid_zyx": grid,
            "upload_mb": {
                "planning": round(planning_zip.stat().st_size / 2**20, 1),
                "daily": round(daily_zip.stat().st_size / 2**20, 1),
            },
            "phantom_s": round(time.perf_counter() - t0, 1),
        }
        if server is not None:
            head["server"] = server
            figures = run_jobs(
                server, api_key, planning_zip, daily_zip, jobs=jobs, concurrency=concurrency
            )
        else:
            head["server"] = f"local jrs serve, JRS_MAX_CONCURRENT_JOBS={workers}, device {device}"
            queue = max(8, jobs)
            with local_server(
                folder / "server", workers=workers, queue_size=queue, device=device, model=model
            ) as (url, key):
                figures = run_jobs(
                    url, key, planning_zip, daily_zip, jobs=jobs, concurrency=concurrency
                )
    return {**head, **figures}
