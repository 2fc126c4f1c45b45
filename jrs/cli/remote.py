"""Client of the jrs REST service: submit a case, wait for the job, download its artefacts.

The product's client of the routes of DESIGN.md ("REST"), used by ``jrs batch --server URL`` and
``jrs benchmark service``. It speaks the same protocol as the standalone example
``examples/client.py`` (httpx and the standard library only, to copy onto a TPS workstation):

* ``POST /v1/recontour`` with the multipart fields ``planning`` (planning CT series + RTSTRUCT) and
  ``daily`` (daily CT series), each sent as one zip built on the fly in a temporary file;
  ``503`` (queue full, model not ready) and ``507`` (storage full) are retried after their
  ``Retry-After`` until a deadline;
  a request that never reached the server (connection refused) is retried the same way, a POST
  that may have reached it is never re-sent (no duplicate jobs);
* ``GET /v1/jobs/{id}`` polled with exponential back-off (``Retry-After`` of a 202 or 503 answer
  taking precedence) until the job has succeeded or failed;
* the artefacts the job's ``links`` name written as ``rtstruct.dcm``, ``dvf.mha``,
  ``registration.dcm``, ``review.png`` and ``qa.json`` (last) into an output folder;
* the patient workflow: ``POST /v1/patients`` (the planning once; the server adapts a patient
  model where it can train), ``GET``/``DELETE /v1/patients/{id}`` and
  ``POST /v1/patients/{id}/fractions`` (only the daily CT; a job as above), which
  ``jrs batch --server URL --adapt`` uses (`patient_row_runner`): one patient per planning scan,
  kept in ``OUT/remote_patients.json`` so that a resumed batch reuses it.

Every failure is a `ServiceError` (a `JrsError`) whose message holds the server's own ``error``
code, ``detail`` and ``request_id``. Nothing in the core ``jrs`` package imports this module.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import logging
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx

from jrs.core.errors import InvalidInput, JrsError
from jrs.pipeline.batch import BatchRow

log = logging.getLogger(__name__)
# httpx logs every request at INFO: that would drown the batch progress bar and the messages
logging.getLogger("httpx").setLevel(logging.WARNING)

#: Environment variable read for the API key when none is given on the command line.
API_KEY_ENV = "JRS_API_KEY"
#: Artefact key of the job's ``links`` -> file name written (``qa`` last: its presence marks a
#: complete download for the resumable batch).
ARTEFACT_FILES: dict[str, str] = {
    "rtstruct": "rtstruct.dcm",
    "dvf": "dvf.mha",
    "registration": "registration.dcm",
    "review": "review.png",
    "qa": "qa.json",
}
REQUIRED_ARTEFACTS = ("rtstruct", "qa")
FINISHED = ("succeeded", "failed")
_RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
#: What a batch row runner returns: (status ``done``/``failed``, seconds, error code, message).
RowResult = tuple[str, float, str, str]


# ------------------------------------------------------------------------------ errors
class ServiceError(JrsError):
    """The service refused a request or could not be reached.

    Attributes:
        status: HTTP status of the answer (None when there was none).
        code: the server's ``error`` code (``invalid_input``, ``unauthorized``, ...).
        request_id: the server's request id (quote it when reporting a problem).
    """

    code = "service_error"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        if code:
            self.code = code
        self.request_id = request_id


class ServiceUnavailable(ServiceError):
    """No answer, or ``503`` past the deadline (queue full, model not ready)."""

    code = "service_unavailable"


class JobTimeout(ServiceError):
    """The job did not finish within the client's deadline (it may still be running)."""

    code = "timeout"


class JobFailed(ServiceError):
    """The job ran and failed; ``code`` and the message are the job's ``error``."""


def retry_after_s(response: httpx.Response) -> float | None:
    """The ``Retry-After`` of an answer in seconds (delta-seconds or HTTP date), or None."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_from(response: httpx.Response, what: str) -> ServiceError:
    """A `ServiceError` carrying the server's ``error``, ``detail`` and ``request_id``.

    Args:
        response: an error answer (any status).
        what: what was asked, e.g. ``POST /v1/recontour``.

    Returns:
        The error (`ServiceUnavailable` for 502, 503, 504 and 507).
    """
    code: str | None = None
    detail = ""
    request_id = response.headers.get("x-request-id")
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "detail" in body:
        code = str(body.get("error") or "") or None
        detail = str(body["detail"])
        request_id = str(body.get("request_id") or request_id or "") or None
    else:
        detail = response.text.strip()[:300] or response.reason_phrase
    message = f"{what}: HTTP {response.status_code}"
    message += f" {code}: {detail}" if code else f": {detail}"
    if request_id:
        message += f" (request id {request_id})"
    kind = ServiceUnavailable if response.status_code in (502, 503, 504, 507) else ServiceError
    return kind(message, status=response.status_code, code=code, request_id=request_id)


# ------------------------------------------------------------------------------ zips
def _is_rtstruct(path: Path) -> bool:
    import pydicom

    try:
        ds = pydicom.dcmread(
            path, stop_before_pixels=True, specific_tags=["SOPClassUID", "Modality"], force=True
        )
    except Exception:
        return False
    return str(ds.get("SOPClassUID", "")) == _RTSTRUCT_SOP_CLASS or ds.get("Modality") == (
        "RTSTRUCT"
    )


def write_zip(
    paths: Sequence[Path], dest: IO[bytes], *, skip: Callable[[Path], bool] | None = None
) -> int:
    """Zip files and folders (recursively) into `dest`; returns the number of files.

    Folders keep their name as the top folder of their entries; a file given twice (directly
    and inside a given folder) is stored once.

    Raises:
        InvalidInput: a path does not exist, or nothing to send.
    """
    seen: set[Path] = set()
    names: set[str] = set()
    count = 0
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for given in paths:
            root = Path(given)
            if root.is_dir():
                files = [
                    (p, f"{root.name}/{p.relative_to(root).as_posix()}") for p in root.rglob("*")
                ]
            elif root.is_file():
                files = [(root, root.name)]
            else:
                raise InvalidInput(f"{root}: no such file or folder")
            for path, arcname in sorted(files):
                real = path.resolve()
                if not path.is_file() or real in seen or (skip is not None and skip(path)):
                    continue
                seen.add(real)
                name, k = arcname, 1
                while name in names:
                    name, k = f"{k}_{arcname}", k + 1
                names.add(name)
                zf.write(path, name)
                count += 1
    if count == 0:
        raise InvalidInput(f"nothing to send: no files in {', '.join(map(str, paths))}")
    return count


def zip_inputs(
    paths: Sequence[Path], dest: Path, *, skip: Callable[[Path], bool] | None = None
) -> Path:
    """The zip to upload for one field: a single given ``.zip`` as it is, else `write_zip`.

    Raises:
        InvalidInput: a path does not exist, or nothing to send.
    """
    if len(paths) == 1 and Path(paths[0]).is_file() and Path(paths[0]).suffix.lower() == ".zip":
        return Path(paths[0])
    with Path(dest).open("wb") as fh:
        write_zip(paths, fh, skip=skip)
    return Path(dest)


# ------------------------------------------------------------------------------ client
@dataclass
class Backoff:
    """Polling and retry timing.

    Attributes:
        first_s: first pause between polls.
        factor: growth of the pause after each poll.
        max_s: longest pause (a ``Retry-After`` of the server is honoured beyond it).
        busy_timeout_s: how long a 503 (queue full, model not ready) or an unreachable server
            is retried before giving up.
    """

    first_s: float = 1.0
    factor: float = 1.5
    max_s: float = 10.0
    busy_timeout_s: float = 600.0


class ServiceClient:
    """A connection to the service (``with ServiceClient(url, key) as c: ...``).

    Args:
        base_url: e.g. ``http://jrs.hospital.local:8000``.
        api_key: the Bearer key (None: no ``Authorization`` header).
        request_timeout_s: read/write timeout of one HTTP request.
        backoff: polling and retry timing.
        transport: an httpx transport (tests).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        request_timeout_s: float = 300.0,
        backoff: Backoff | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self.backoff = backoff or Backoff()
        self.http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(request_timeout_s, connect=10.0),
            transport=transport,
        )

    def close(self) -> None:
        """Close the connection pool."""
        self.http.close()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- checks
    def check(self) -> dict[str, Any]:
        """Check that the service is ready and accepts the key (before a batch).

        Returns:
            The ``/health/ready`` answer.

        Raises:
            ServiceUnavailable: unreachable or not ready.
            ServiceError: the key is refused (401).
        """
        try:
            r = self.http.get("/health/ready")
            # a well-formed id that no job has: 404 with a valid key, 401 without
            probe = self.http.get("/v1/jobs/" + "0" * 32)
        except httpx.TransportError as exc:
            raise ServiceUnavailable(f"{self.base_url}: cannot connect ({exc})") from exc
        if r.status_code != 200:
            raise error_from(r, f"GET {self.base_url}/health/ready")
        ready: dict[str, Any] = r.json()
        if probe.status_code != 404:
            error = error_from(probe, "API key check (GET /v1/jobs/<id>)")
            if probe.status_code == 401:
                error.message += f"; pass the service's key with --api-key or {API_KEY_ENV}"
            raise error
        return ready

    # -- the three steps
    def submit(
        self,
        planning: Sequence[Path],
        daily: Sequence[Path],
        *,
        wait_s: float = 0.0,
        skip_planning: Callable[[Path], bool] | None = None,
    ) -> tuple[dict[str, Any], float | None]:
        """Upload a case and queue a job (``POST /v1/recontour``).

        Args:
            planning: planning CT folder(s)/files and the planning RTSTRUCT (zipped together),
                or one ready ``.zip``.
            daily: daily CT folder(s)/files, or one ready ``.zip``.
            wait_s: how long the server may hold the request for the result (0: answer 202
                at once); the answer is 200 when the job ended within it.
            skip_planning: files of the planning folders to leave out (e.g. other RTSTRUCTs).

        Returns:
            (the job, the ``Retry-After`` of a 202 answer or None).

        Raises:
            InvalidInput: a path does not exist.
            ServiceUnavailable: still 503 / unreachable after ``backoff.busy_timeout_s``.
            ServiceError: the request was refused (4xx: message of the server).
        """
        params = {"wait": "true", "timeout": f"{wait_s:g}"} if wait_s > 0 else {"wait": "false"}
        fields = {"planning": (planning, skip_planning), "daily": (daily, None)}
        r = self._post("/v1/recontour", fields, params, wait_s, (200, 202))
        job: dict[str, Any] = r.json()
        return job, retry_after_s(r) if r.status_code == 202 else None

    def _post(
        self,
        url: str,
        fields: dict[str, tuple[Sequence[Path], Callable[[Path], bool] | None]],
        params: dict[str, str],
        wait_s: float,
        accepted: Sequence[int],
    ) -> httpx.Response:
        """POST each field as one zip; retry 429/503/507 and refused connections (no duplicates).

        Returns:
            The accepted answer.

        Raises:
            InvalidInput: a path does not exist.
            ServiceUnavailable: still 503 / unreachable after ``backoff.busy_timeout_s``.
            ServiceError: the request was refused (4xx: message of the server).
        """
        timeout = httpx.Timeout(max(self.http.timeout.read or 0.0, wait_s + 60.0), connect=10.0)
        with tempfile.TemporaryDirectory(prefix="jrs-upload-") as tmp:
            zips = {
                field: zip_inputs(paths, Path(tmp) / f"{field}.zip", skip=skip)
                for field, (paths, skip) in fields.items()
            }
            deadline = time.monotonic() + self.backoff.busy_timeout_s
            pause = self.backoff.first_s
            while True:
                with contextlib.ExitStack() as stack:
                    files = [
                        (
                            field,
                            (path.name, stack.enter_context(path.open("rb")), "application/zip"),
                        )
                        for field, path in zips.items()
                    ]
                    try:
                        r = self.http.post(url, params=params, files=files, timeout=timeout)
                    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                        # nothing reached the server: safe to send again
                        error: ServiceError = ServiceUnavailable(
                            f"POST {self.base_url}{url}: cannot connect ({exc})"
                        )
                        delay = pause
                    except httpx.TransportError as exc:  # it may have been accepted: no resend
                        raise ServiceUnavailable(
                            f"POST {url}: {type(exc).__name__}: {exc}"
                        ) from exc
                    else:
                        if r.status_code in accepted:
                            return r
                        error = error_from(r, f"POST {url}")
                        if r.status_code not in (429, 503, 507):
                            raise error
                        delay = retry_after_s(r) or pause
                left = deadline - time.monotonic()
                if delay > left:
                    raise error
                log.info("%s; retrying in %.0f s", error.message, delay)
                time.sleep(delay)
                pause = min(pause * self.backoff.factor, self.backoff.max_s)

    # -- patients
    def create_patient(
        self, planning: Sequence[Path], *, skip_planning: Callable[[Path], bool] | None = None
    ) -> dict[str, Any]:
        """Upload a patient's planning CT + RTSTRUCT once (``POST /v1/patients``).

        Returns:
            The patient (``id``, ``adaptation``: queued, or unavailable with the reason).

        Raises:
            ServiceError: refused (e.g. no ROI maps to an organ) or unreachable.
        """
        r = self._post("/v1/patients", {"planning": (planning, skip_planning)}, {}, 0.0, (201,))
        patient: dict[str, Any] = r.json()
        return patient

    def patient(self, patient_id: str) -> dict[str, Any]:
        """The patient (``GET /v1/patients/{id}``).

        Raises:
            ServiceError: 404 for a deleted patient (or one past the retention), or refused.
        """
        try:
            r = self.http.get(f"/v1/patients/{patient_id}")
        except httpx.TransportError as exc:
            raise ServiceUnavailable(f"GET /v1/patients/{patient_id}: {exc}") from exc
        if r.status_code != 200:
            raise error_from(r, f"GET /v1/patients/{patient_id}")
        body: dict[str, Any] = r.json()
        return body

    def wait_adaptation(
        self, patient_id: str, timeout_s: float, poll_s: float = 10.0
    ) -> dict[str, Any]:
        """Poll a patient until its adaptation is over (succeeded, failed or unavailable).

        Raises:
            JobTimeout: still queued or running after `timeout_s`.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            body = self.patient(patient_id)
            status = body["adaptation"]["status"]
            if status in ("succeeded", "failed", "unavailable"):
                return body
            left = deadline - time.monotonic()
            if left <= 0:
                raise JobTimeout(
                    f"patient {patient_id}: adaptation still {status} after {timeout_s:.0f} s"
                )
            time.sleep(min(poll_s, left))

    def delete_patient(self, patient_id: str) -> None:
        """Delete a patient: planning, patient model, finished fractions.

        Raises:
            ServiceError: unknown patient (404) or refused.
        """
        try:
            r = self.http.delete(f"/v1/patients/{patient_id}")
        except httpx.TransportError as exc:
            raise ServiceUnavailable(f"DELETE /v1/patients/{patient_id}: {exc}") from exc
        if r.status_code != 204:
            raise error_from(r, f"DELETE /v1/patients/{patient_id}")

    def submit_fraction(
        self, patient_id: str, daily: Sequence[Path], *, wait_s: float = 0.0
    ) -> tuple[dict[str, Any], float | None]:
        """Send a daily CT of a patient (``POST /v1/patients/{id}/fractions``); as `submit`."""
        params = {"wait": "true", "timeout": f"{wait_s:g}"} if wait_s > 0 else {"wait": "false"}
        url = f"/v1/patients/{patient_id}/fractions"
        r = self._post(url, {"daily": (daily, None)}, params, wait_s, (200, 202))
        job: dict[str, Any] = r.json()
        return job, retry_after_s(r) if r.status_code == 202 else None

    def fraction(
        self,
        patient_id: str,
        daily: Sequence[Path],
        out_dir: Path,
        *,
        timeout_s: float = 1800.0,
        wait_s: float = 30.0,
    ) -> dict[str, Any]:
        """Submit a fraction, wait and download (as `recontour`); ``qa.model.kind`` says which.

        Raises:
            JobFailed, JobTimeout, ServiceError: as `recontour`.
        """
        job, hint = self.submit_fraction(patient_id, daily, wait_s=wait_s)
        return self._finish(job, hint, out_dir, timeout_s)

    def _finish(
        self, job: dict[str, Any], hint: float | None, out_dir: Path, timeout_s: float
    ) -> dict[str, Any]:
        job = self.wait(job, timeout_s, first_delay_s=hint)
        if job["status"] != "succeeded":
            err = job.get("error") or {}
            raise JobFailed(
                f"job {job['id']} failed: {err.get('code', 'internal_error')}: "
                f"{err.get('message', '')}",
                code=str(err.get("code") or "internal_error"),
            )
        self.download(job, out_dir)
        return job

    def job(self, job_id: str) -> dict[str, Any]:
        """The job (``GET /v1/jobs/{id}``).

        Raises:
            ServiceError: refused (e.g. 404 for an unknown id) or unreachable.
        """
        try:
            r = self.http.get(f"/v1/jobs/{job_id}")
        except httpx.TransportError as exc:
            raise ServiceUnavailable(f"GET /v1/jobs/{job_id}: {exc}") from exc
        if r.status_code != 200:
            raise error_from(r, f"GET /v1/jobs/{job_id}")
        body: dict[str, Any] = r.json()
        return body

    def wait(
        self, job: dict[str, Any], timeout_s: float, first_delay_s: float | None = None
    ) -> dict[str, Any]:
        """Poll a job until it has succeeded or failed.

        Pauses grow from ``backoff.first_s`` by ``backoff.factor`` up to ``backoff.max_s``;
        a ``Retry-After`` (of the 202 that queued the job, or of a 503 while polling) replaces
        the next pause. Answers 502/503/504 and lost connections are retried until the deadline.

        Args:
            job: the job as `submit` returned it.
            timeout_s: how long to wait from now.
            first_delay_s: the first pause (e.g. the 202's ``Retry-After``).

        Returns:
            The finished job (status ``succeeded`` or ``failed``).

        Raises:
            JobTimeout: not finished within `timeout_s`.
            ServiceError: polling was refused (401, 404).
        """
        deadline = time.monotonic() + timeout_s
        pause = self.backoff.first_s
        delay = first_delay_s if first_delay_s is not None else pause
        while job.get("status") not in FINISHED:
            left = deadline - time.monotonic()
            if left <= 0:
                raise JobTimeout(
                    f"job {job['id']} is still {job.get('status')} after {timeout_s:.0f} s; "
                    f"it may finish later: GET {self.base_url}/v1/jobs/{job['id']}"
                )
            time.sleep(min(delay, left))
            pause = min(pause * self.backoff.factor, self.backoff.max_s)
            delay = pause
            try:
                r = self.http.get(f"/v1/jobs/{job['id']}")
            except httpx.TransportError as exc:
                log.info("polling job %s: %s; retrying", job["id"], exc)
                continue
            if r.status_code in (502, 503, 504):
                delay = retry_after_s(r) or pause
                continue
            if r.status_code != 200:
                raise error_from(r, f"GET /v1/jobs/{job['id']}")
            job = r.json()
        return job

    def download(self, job: dict[str, Any], out_dir: Path) -> dict[str, Path]:
        """Write the artefacts a succeeded job links to into `out_dir` (``qa.json`` last).

        Returns:
            Artefact key -> file written.

        Raises:
            ServiceError: a download was refused, or the job lacks the RTSTRUCT or the QA.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        links = job.get("links") or {}
        missing = [k for k in REQUIRED_ARTEFACTS if not links.get(k)]
        if missing:
            raise ServiceError(f"job {job['id']} ({job.get('status')}) has no link to {missing}")
        written: dict[str, Path] = {}
        for key, name in ARTEFACT_FILES.items():
            url = links.get(key)
            if not url:
                continue
            target = out / name
            part = target.with_name(target.name + ".part")
            try:
                with self.http.stream("GET", url) as r:
                    if r.status_code != 200:
                        r.read()
                        raise error_from(r, f"GET {url}")
                    with part.open("wb") as fh:
                        for chunk in r.iter_bytes(1 << 20):
                            fh.write(chunk)
            except httpx.TransportError as exc:
                part.unlink(missing_ok=True)
                raise ServiceUnavailable(f"GET {url}: {exc}") from exc
            part.replace(target)
            written[key] = target
        return written

    def recontour(
        self,
        planning: Sequence[Path],
        daily: Sequence[Path],
        out_dir: Path,
        *,
        timeout_s: float = 1800.0,
        wait_s: float = 30.0,
        skip_planning: Callable[[Path], bool] | None = None,
    ) -> dict[str, Any]:
        """Submit, wait and download: the whole round trip of one case.

        Args:
            planning: planning CT folder(s)/files and RTSTRUCT.
            daily: daily CT folder(s)/files.
            out_dir: where the artefacts go.
            timeout_s: deadline for the job to finish, from the submission.
            wait_s: how long the POST may wait on the server for the result.
            skip_planning: planning files to leave out.

        Returns:
            The succeeded job (its ``qa`` holds the QA figures).

        Raises:
            JobFailed: the job failed (its error code and message).
            JobTimeout: it did not finish in time.
            ServiceError: a request was refused or the service unreachable.
        """
        job, hint = self.submit(planning, daily, wait_s=wait_s, skip_planning=skip_planning)
        return self._finish(job, hint, out_dir, timeout_s)


# ------------------------------------------------------------------------------ batch
def row_runner(
    client: ServiceClient, *, timeout_s: float = 1800.0
) -> Callable[[BatchRow, Path], RowResult]:
    """A ``run_batch(row_runner=...)`` that re-contours a manifest row through the service.

    The planning upload holds the planning CT folder without any RTSTRUCT found in it, plus the
    row's RTSTRUCT (a TPS export folder often holds several structure sets).
    """

    def run(row: BatchRow, out: Path) -> RowResult:
        t0 = time.perf_counter()
        rtstruct = row.planning_rtstruct.resolve()

        def skip(path: Path) -> bool:
            return path.resolve() != rtstruct and _is_rtstruct(path)

        try:
            if not row.planning_rtstruct.is_file():
                raise InvalidInput(f"{row.planning_rtstruct}: no such RTSTRUCT file")
            client.recontour(
                [row.planning_ct, row.planning_rtstruct],
                [row.daily_ct],
                out / row.id,
                timeout_s=timeout_s,
                skip_planning=skip,
            )
        except JrsError as exc:
            return "failed", time.perf_counter() - t0, exc.code, exc.message
        return "done", time.perf_counter() - t0, "", ""

    return run


@contextlib.contextmanager
def batch_runner(
    server: str, api_key: str | None, *, timeout_s: float = 1800.0
) -> Iterator[Callable[[BatchRow, Path], RowResult]]:
    """Open a client, check the service and the key, and yield the row runner of `row_runner`.

    Raises:
        ServiceError: the service is not ready or refuses the key (before any row is touched).
    """
    with ServiceClient(server, api_key) as client:
        client.check()
        yield row_runner(client, timeout_s=timeout_s)


# ------------------------------------------------------------------------------ patients batch
PATIENTS_FILE = "remote_patients.json"


def patient_row_runner(
    client: ServiceClient,
    out: Path,
    *,
    timeout_s: float = 1800.0,
    adapt_timeout_s: float = 3600.0,
) -> Callable[[BatchRow, Path], RowResult]:
    """A ``run_batch(row_runner=...)`` for ``jrs batch --server URL --adapt``: patients first.

    Each patient (the manifest's ``patient`` value, else the planning series) is uploaded once
    (``POST /v1/patients``); its id is kept in ``OUT/remote_patients.json`` and reused by a
    resumed batch while the service still has it. The first row of a patient waits for the
    adaptation to end (the other rows of that patient wait for the first), then every fraction is
    sent with its daily CT only, so all of them use the same model (``qa.model.kind``).
    """
    from jrs.pipeline.batch import row_group

    registry = Path(out) / PATIENTS_FILE
    lock = threading.Lock()
    group_locks: dict[str, threading.Lock] = {}
    ready: set[str] = set()

    def patient_for(row: BatchRow) -> str:
        key = row_group(row)
        with lock:
            group = group_locks.setdefault(key, threading.Lock())
        with group:
            with lock:
                known = json.loads(registry.read_text()) if registry.is_file() else {}
            pid = known.get(key)
            if pid is not None and key not in ready:
                try:
                    client.patient(pid)
                except ServiceError as exc:
                    if exc.status != 404:
                        raise
                    pid = None  # deleted or past the retention: upload again
            if pid is None:
                rtstruct = row.planning_rtstruct.resolve()

                def skip(path: Path) -> bool:
                    return path.resolve() != rtstruct and _is_rtstruct(path)

                pid = str(
                    client.create_patient(
                        [row.planning_ct, row.planning_rtstruct], skip_planning=skip
                    )["id"]
                )
                with lock:
                    known = json.loads(registry.read_text()) if registry.is_file() else {}
                    known[key] = pid
                    tmp = registry.with_suffix(".tmp")
                    tmp.write_text(json.dumps(known, indent=2))
                    tmp.replace(registry)
            if key not in ready:
                body = client.wait_adaptation(pid, adapt_timeout_s)
                log.info("patient %s: adaptation %s", key, body["adaptation"]["status"])
                ready.add(key)
        return str(pid)

    def run(row: BatchRow, out_dir: Path) -> RowResult:
        t0 = time.perf_counter()
        try:
            if not row.planning_rtstruct.is_file():
                raise InvalidInput(f"{row.planning_rtstruct}: no such RTSTRUCT file")
            pid = patient_for(row)
            client.fraction(pid, [row.daily_ct], out_dir / row.id, timeout_s=timeout_s)
        except JrsError as exc:
            return "failed", time.perf_counter() - t0, exc.code, exc.message
        return "done", time.perf_counter() - t0, "", ""

    return run


@contextlib.contextmanager
def patient_batch_runner(
    server: str, api_key: str | None, out: Path, *, timeout_s: float = 1800.0
) -> Iterator[Callable[[BatchRow, Path], RowResult]]:
    """`batch_runner` for ``--adapt``: check the service, yield `patient_row_runner`."""
    with ServiceClient(server, api_key) as client:
        client.check()
        Path(out).mkdir(parents=True, exist_ok=True)
        yield patient_row_runner(client, Path(out), timeout_s=timeout_s)
