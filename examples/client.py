#!/usr/bin/env python3
# ruff: noqa: T201  (a command-line script: it prints its results)
r"""Re-contour a daily CT through the jrs REST service: a standalone example client.

It needs Python >= 3.8 and ``httpx`` only (``pip install httpx``), not the jrs project, so it can
be copied next to a treatment-planning-system script (see ``docs/tps-guide.md``). The product's
own client, with the same protocol, is ``jrs/cli/remote.py`` (``jrs batch --server URL``).

What it does:

1. zips the planning export (planning CT series + its RTSTRUCT) and the daily CT export
   (folders are zipped with their content; a ``.zip`` is sent as it is) and sends them to
   ``POST /v1/recontour`` as the multipart fields ``planning`` and ``daily`` with
   ``Authorization: Bearer <key>``; a ``503`` answer (queue full, model not ready) is retried
   after its ``Retry-After`` until ``--busy-timeout``;
2. polls ``GET /v1/jobs/{id}`` with back-off (1 s, x1.5, at most 10 s; a ``Retry-After`` of the
   server wins) until the job has succeeded or failed, or ``--timeout`` passes;
3. downloads ``rtstruct.dcm`` (import it into the TPS), ``dvf.mha``, ``registration.dcm``
   (DICOM REG), ``review.png`` and ``qa.json`` into ``--out`` and prints the QA flags.

Command line::

    export JRS_API_KEY=...            # or --api-key KEY
    python client.py --url http://jrs.hospital.local:8000 --out export/result \
        --planning export/planning --daily export/daily

A patient's planning can be uploaded once (``POST /v1/patients``; the server adapts a patient
model in the background where it can train), then only each daily CT is sent::

    python client.py --url URL --new-patient --planning export/planning   # prints the id
    python client.py --url URL --patient ID --daily export/daily_fx3 --out export/fx3
    python client.py --url URL --patient ID --status     # adaptation status and figures
    python client.py --url URL --patient ID --delete     # planning, model and fractions go

``qa.json`` of a fraction says which model contoured it (``model.kind``: ``patient`` or
``generic``, and ``patient.generic_because``).

Exit codes (the message on stderr carries the server's error code, detail and request id):

    0  the job succeeded, the files are in --out
    1  the job ran and failed (e.g. the registration failed); nothing to import
    2  the request was refused: bad or incomplete DICOM (4xx), or a local path is missing
    3  the API key is missing or refused (401/403)
    4  the service is unreachable or busy past --busy-timeout (503), or answered 5xx
    5  the job did not finish within --timeout (it may still finish: the job id is printed)

As a module::

    import httpx, client
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as http:
        job, hint = client.submit(http, [planning_dir], [daily_dir])
        job = client.wait_for_job(http, job, timeout_s=1800, first_delay_s=hint)
        files = client.download(http, job, out_dir)

or ``client.recontour(url, key, [planning_dir], [daily_dir], out_dir)`` for all three steps, and
``create_patient``, ``get_patient``, ``wait_for_adaptation``, ``submit_fraction``,
``delete_patient`` for the patient workflow.
"""

from __future__ import annotations

import argparse
import contextlib
import email.utils
import json
import os
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

#: Job link key -> file written (``qa.json`` last).
ARTEFACT_FILES = {
    "rtstruct": "rtstruct.dcm",
    "dvf": "dvf.mha",
    "registration": "registration.dcm",
    "review": "review.png",
    "qa": "qa.json",
}
EXIT_OK, EXIT_JOB_FAILED, EXIT_REFUSED, EXIT_AUTH, EXIT_UNAVAILABLE, EXIT_TIMEOUT = range(6)


class ClientError(Exception):
    """A failed step, with the exit code of the command line and the server's answer.

    Attributes:
        exit_code: see the module docstring.
        status: HTTP status (None without an answer).
        code: the server's ``error`` code, or the job's error code.
        request_id: the server's request id (quote it when reporting a problem).
    """

    def __init__(
        self,
        message: str,
        exit_code: int,
        status: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.status = status
        self.code = code
        self.request_id = request_id


def retry_after(response: httpx.Response) -> float | None:
    """Seconds of the answer's ``Retry-After`` (delta-seconds or HTTP date), or None."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def error_from(response: httpx.Response, what: str) -> ClientError:
    """The `ClientError` of an error answer: the server's ``{"error", "detail", "request_id"}``."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "detail" in body:
        code = body.get("error")
        text = f"{response.status_code} {code}: {body['detail']}"
        request_id = body.get("request_id")
    else:
        code, request_id = None, response.headers.get("x-request-id")
        text = f"{response.status_code}: {response.text.strip()[:300]}"
    message = f"{what}: HTTP {text}"
    if request_id:
        message += f" (request id {request_id})"
    status = response.status_code
    if status in (401, 403):
        exit_code = EXIT_AUTH
    elif status >= 500:
        exit_code = EXIT_UNAVAILABLE
    else:
        exit_code = EXIT_REFUSED
    return ClientError(message, exit_code, status, code, request_id)


def zip_inputs(paths: Sequence[Path], dest: Path) -> Path:
    """One zip of files and folders (recursively): a single ``.zip`` path is returned as is.

    Raises:
        ClientError: a path does not exist or nothing is there (exit code 2).
    """
    paths = [Path(p) for p in paths]
    if len(paths) == 1 and paths[0].is_file() and paths[0].suffix.lower() == ".zip":
        return paths[0]
    count = 0
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for root in paths:
            if root.is_dir():
                for p in sorted(root.rglob("*")):
                    if p.is_file():
                        zf.write(p, f"{root.name}/{p.relative_to(root).as_posix()}")
                        count += 1
            elif root.is_file():
                zf.write(root, root.name)
                count += 1
            else:
                raise ClientError(f"{root}: no such file or folder", EXIT_REFUSED)
    if not count:
        raise ClientError(f"no files in {', '.join(map(str, paths))}", EXIT_REFUSED)
    return dest


def submit(
    http: httpx.Client,
    planning: Sequence[Path],
    daily: Sequence[Path],
    *,
    wait_s: float = 30.0,
    busy_timeout_s: float = 600.0,
) -> tuple[dict[str, Any], float | None]:
    """Send a case to ``POST /v1/recontour``; retry 503 after its ``Retry-After``.

    Args:
        http: a client with ``base_url`` and the ``Authorization`` header.
        planning: planning CT folder and RTSTRUCT (or a folder with both, or a zip).
        daily: daily CT folder (or files, or a zip).
        wait_s: the server may hold the request this long for the result (0: 202 at once).
        busy_timeout_s: how long 503 answers and refused connections are retried.

    Returns:
        (the job as the server answered, the ``Retry-After`` of a 202 answer or None).

    Raises:
        ClientError: refused, unreachable, or still busy after `busy_timeout_s`.
    """
    params = {"wait": "true", "timeout": str(wait_s)} if wait_s > 0 else {"wait": "false"}
    fields = {"planning": planning, "daily": daily}
    r = post_files(http, "/v1/recontour", fields, params, wait_s, busy_timeout_s, (200, 202))
    return r.json(), retry_after(r) if r.status_code == 202 else None


def post_files(
    http: httpx.Client,
    url: str,
    fields: dict[str, Sequence[Path]],
    params: dict[str, str],
    wait_s: float,
    busy_timeout_s: float,
    accepted: Sequence[int],
) -> httpx.Response:
    """POST each field's paths as one zip; retry 503/507 after ``Retry-After`` (the protocol).

    Returns:
        The accepted answer (status in `accepted`).

    Raises:
        ClientError: refused, unreachable, or still busy after `busy_timeout_s`.
    """
    timeout = httpx.Timeout(wait_s + 300.0, connect=10.0)
    with tempfile.TemporaryDirectory(prefix="jrs-client-") as tmp:
        zips = {f: zip_inputs(paths, Path(tmp) / f"{f}.zip") for f, paths in fields.items()}
        deadline = time.monotonic() + busy_timeout_s
        pause = 2.0
        while True:
            with contextlib.ExitStack() as stack:
                files = [
                    (field, (path.name, stack.enter_context(path.open("rb")), "application/zip"))
                    for field, path in zips.items()
                ]
                try:
                    r = http.post(url, params=params, files=files, timeout=timeout)
                except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                    # the request never reached the server: safe to send again
                    error = ClientError(
                        f"cannot connect to {http.base_url} ({exc})", EXIT_UNAVAILABLE
                    )
                    delay = pause
                except httpx.TransportError as exc:  # it may have been accepted: do not resend
                    raise ClientError(
                        f"POST {url}: {type(exc).__name__}: {exc}", EXIT_UNAVAILABLE
                    ) from exc
                else:
                    if r.status_code in accepted:
                        return r
                    error = error_from(r, f"POST {url}")
                    if r.status_code not in (503, 507):
                        raise error
                    delay = retry_after(r) or pause
            if time.monotonic() + delay > deadline:
                raise error
            print(f"{error}; retrying in {delay:.0f} s", file=sys.stderr)
            time.sleep(delay)
            pause = min(pause * 1.5, 30.0)


# ------------------------------------------------------------------ patients
def create_patient(
    http: httpx.Client, planning: Sequence[Path], *, busy_timeout_s: float = 600.0
) -> dict[str, Any]:
    """Upload a patient's planning CT + RTSTRUCT once (``POST /v1/patients``).

    Returns:
        The patient (``id``; ``adaptation.status``: queued, or unavailable with the reason).

    Raises:
        ClientError: refused (e.g. no ROI maps to an organ), unreachable or busy.
    """
    r = post_files(http, "/v1/patients", {"planning": planning}, {}, 0.0, busy_timeout_s, (201,))
    patient: dict[str, Any] = r.json()
    return patient


def get_patient(http: httpx.Client, patient_id: str) -> dict[str, Any]:
    """The patient (``GET /v1/patients/{id}``): adaptation status, progress, figures, fractions.

    Raises:
        ClientError: unknown (404: deleted, or past the retention) or refused.
    """
    r = http.get(f"/v1/patients/{patient_id}")
    if r.status_code != 200:
        raise error_from(r, f"GET /v1/patients/{patient_id}")
    patient: dict[str, Any] = r.json()
    return patient


def wait_for_adaptation(
    http: httpx.Client, patient_id: str, timeout_s: float = 1800.0, poll_s: float = 10.0
) -> dict[str, Any]:
    """Poll the patient until its adaptation is over (succeeded, failed or unavailable).

    Fractions never need this: before the patient model is ready they use the generic model.

    Returns:
        The patient.

    Raises:
        ClientError: still queued/running after `timeout_s` (exit code 5).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        patient = get_patient(http, patient_id)
        if patient["adaptation"]["status"] in ("succeeded", "failed", "unavailable"):
            return patient
        if time.monotonic() >= deadline:
            raise ClientError(
                f"patient {patient_id}: adaptation still {patient['adaptation']['status']} after "
                f"{timeout_s:.0f} s",
                EXIT_TIMEOUT,
            )
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


def submit_fraction(
    http: httpx.Client,
    patient_id: str,
    daily: Sequence[Path],
    *,
    wait_s: float = 30.0,
    busy_timeout_s: float = 600.0,
) -> tuple[dict[str, Any], float | None]:
    """Send a daily CT of a patient (``POST /v1/patients/{id}/fractions``): a job, as `submit`."""
    params = {"wait": "true", "timeout": str(wait_s)} if wait_s > 0 else {"wait": "false"}
    url = f"/v1/patients/{patient_id}/fractions"
    r = post_files(http, url, {"daily": daily}, params, wait_s, busy_timeout_s, (200, 202))
    return r.json(), retry_after(r) if r.status_code == 202 else None


def delete_patient(http: httpx.Client, patient_id: str) -> None:
    """Delete a patient: planning, patient model and finished fractions (``DELETE``)."""
    r = http.delete(f"/v1/patients/{patient_id}")
    if r.status_code != 204:
        raise error_from(r, f"DELETE /v1/patients/{patient_id}")


def wait_for_job(
    http: httpx.Client,
    job: dict[str, Any],
    timeout_s: float = 1800.0,
    first_delay_s: float | None = None,
    max_poll_s: float = 10.0,
) -> dict[str, Any]:
    """Poll ``GET /v1/jobs/{id}`` until the job has succeeded or failed.

    Pauses start at 1 s (or `first_delay_s`, the 202's ``Retry-After``) and grow by 1.5 up to
    `max_poll_s`; a 502/503/504 answer or a lost connection is retried (its ``Retry-After``
    first).

    Returns:
        The finished job (``status`` ``succeeded`` or ``failed``).

    Raises:
        ClientError: still queued/running after `timeout_s` (exit code 5), or polling refused.
    """
    deadline = time.monotonic() + timeout_s
    pause = 1.0
    delay = pause if first_delay_s is None else first_delay_s
    while job.get("status") not in ("succeeded", "failed"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise ClientError(
                f"job {job['id']} still {job.get('status')} after {timeout_s:.0f} s; "
                f"poll GET /v1/jobs/{job['id']} later",
                EXIT_TIMEOUT,
            )
        time.sleep(min(delay, left))
        pause = min(pause * 1.5, max_poll_s)
        delay = pause
        try:
            r = http.get(f"/v1/jobs/{job['id']}")
        except httpx.TransportError:
            continue
        if r.status_code in (502, 503, 504, 507):
            delay = retry_after(r) or pause
            continue
        if r.status_code != 200:
            raise error_from(r, f"GET /v1/jobs/{job['id']}")
        job = r.json()
    return job


def download(http: httpx.Client, job: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write every artefact the job links to into `out_dir` (``qa.json`` last).

    Returns:
        Link key (``rtstruct``, ``dvf``, ``registration``, ``review``, ``qa``) -> file.

    Raises:
        ClientError: the job has no RTSTRUCT, or a download was refused.
    """
    links = job.get("links") or {}
    if not links.get("rtstruct"):
        raise ClientError(
            f"job {job.get('id')} ({job.get('status')}) has no RTSTRUCT to download",
            EXIT_JOB_FAILED,
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for key, name in ARTEFACT_FILES.items():
        url = links.get(key)
        if not url:
            continue
        part = out / (name + ".part")
        try:
            with http.stream("GET", url) as r:
                if r.status_code != 200:
                    r.read()
                    raise error_from(r, f"GET {url}")
                with part.open("wb") as fh:
                    for chunk in r.iter_bytes(1 << 20):
                        fh.write(chunk)
        except httpx.TransportError as exc:
            raise ClientError(f"GET {url}: {type(exc).__name__}: {exc}", EXIT_UNAVAILABLE) from exc
        part.replace(out / name)
        written[key] = out / name
    return written


def recontour(
    url: str,
    api_key: str | None,
    planning: Sequence[Path],
    daily: Sequence[Path],
    out_dir: Path,
    *,
    timeout_s: float = 1800.0,
    wait_s: float = 30.0,
    busy_timeout_s: float = 600.0,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Submit, wait and download (see the module docstring).

    Returns:
        (the succeeded job, artefact key -> file written).

    Raises:
        ClientError: any failure (its ``exit_code`` tells which kind).
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url, headers=headers, timeout=httpx.Timeout(300, connect=10)) as h:
        job, hint = submit(h, planning, daily, wait_s=wait_s, busy_timeout_s=busy_timeout_s)
        print(f"job {job['id']}: {job['status']}", file=sys.stderr)
        job = wait_for_job(h, job, timeout_s, first_delay_s=hint)
        if job["status"] != "succeeded":
            err = job.get("error") or {}
            raise ClientError(
                f"job {job['id']} failed: {err.get('code')}: {err.get('message')}",
                EXIT_JOB_FAILED,
                code=err.get("code"),
            )
        return job, download(h, job, out_dir)


def qa_summary(qa: dict[str, Any]) -> list[str]:
    """One line per structure (source, volumes, flags) and one for the DVF."""
    lines = []
    for s in qa.get("structures", []):
        lines.append(
            "{:<18} {:<13} {:>9.1f} cc -> {:>7.1f} cc  {}".format(
                s["name"],
                s.get("source", ""),
                s.get("planning_cc", 0.0),
                s.get("daily_cc", 0.0),
                "; ".join(s.get("flags", [])) or "ok",
            )
        )
    dvf = qa.get("dvf") or {}
    if dvf:
        lines.append(
            "DVF: min det J {:.3f}, folding {:.3f} %  {}".format(
                dvf.get("min", float("nan")),
                100 * dvf.get("folding_fraction", float("nan")),
                "; ".join(dvf.get("flags", [])) or "ok",
            )
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit code."""
    parser = argparse.ArgumentParser(
        description="Re-contour a daily CT through the jrs service.",
        epilog="Exit codes: 0 ok, 1 job failed, 2 refused (bad input), 3 API key refused, "
        "4 service unavailable, 5 timeout.",
    )
    parser.add_argument("--url", required=True, help="service URL, e.g. http://host:8000")
    parser.add_argument("--api-key", default=os.environ.get("JRS_API_KEY"), help="or JRS_API_KEY")
    parser.add_argument("--planning", nargs="+", type=Path, help="planning CT + RTSTRUCT")
    parser.add_argument("--daily", nargs="+", type=Path, help="daily CT")
    parser.add_argument("--out", type=Path, help="folder for the results")
    parser.add_argument("--timeout", type=float, default=1800.0, help="job deadline, s")
    parser.add_argument("--busy-timeout", type=float, default=600.0, help="503 retries, s")
    parser.add_argument("--wait", type=float, default=30.0, help="server-side wait per POST, s")
    parser.add_argument(
        "--new-patient", action="store_true", help="upload --planning once; prints the id"
    )
    parser.add_argument("--patient", help="patient id: send --daily to it, or --status/--delete")
    parser.add_argument("--status", action="store_true", help="with --patient: show it")
    parser.add_argument("--delete", action="store_true", help="with --patient: delete it")
    parser.add_argument(
        "--wait-adaptation", type=float, default=0.0, help="--new-patient: wait this long, s"
    )
    args = parser.parse_args(argv)
    if not args.api_key:
        print("error: no API key: pass --api-key or set JRS_API_KEY", file=sys.stderr)
        return EXIT_AUTH
    if args.new_patient or args.patient:
        return patient_main(args)
    if not (args.planning and args.daily and args.out):
        parser.error("--planning, --daily and --out are needed (or --new-patient / --patient)")
    try:
        job, files = recontour(
            args.url,
            args.api_key,
            args.planning,
            args.daily,
            args.out,
            timeout_s=args.timeout,
            wait_s=args.wait,
            busy_timeout_s=args.busy_timeout,
        )
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except httpx.HTTPError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    print(f"job {job['id']} succeeded")
    for line in qa_summary(json.loads(files["qa"].read_text(encoding="utf-8"))):
        print("  " + line)
    for path in files.values():
        print(path)
    return EXIT_OK


def patient_main(args: argparse.Namespace) -> int:
    """The patient commands of `main` (``--new-patient``, ``--patient ID ...``)."""
    headers = {"Authorization": f"Bearer {args.api_key}"}
    timeout = httpx.Timeout(300, connect=10)
    try:
        with httpx.Client(base_url=args.url, headers=headers, timeout=timeout) as http:
            if args.new_patient:
                if not args.planning:
                    raise ClientError("--new-patient needs --planning", EXIT_REFUSED)
                patient = create_patient(http, args.planning, busy_timeout_s=args.busy_timeout)
                if args.wait_adaptation > 0:
                    patient = wait_for_adaptation(http, patient["id"], args.wait_adaptation)
                print(json.dumps(patient["adaptation"], indent=2), file=sys.stderr)
                print(patient["id"])
                return EXIT_OK
            if args.delete:
                delete_patient(http, args.patient)
                print(f"patient {args.patient} deleted")
                return EXIT_OK
            if args.status or not args.daily:
                print(json.dumps(get_patient(http, args.patient), indent=2))
                return EXIT_OK
            if not args.out:
                raise ClientError("--patient ID --daily DIR needs --out", EXIT_REFUSED)
            job, hint = submit_fraction(
                http, args.patient, args.daily, wait_s=args.wait, busy_timeout_s=args.busy_timeout
            )
            job = wait_for_job(http, job, args.timeout, first_delay_s=hint)
            if job["status"] != "succeeded":
                err = job.get("error") or {}
                raise ClientError(
                    f"job {job['id']} failed: {err.get('code')}: {err.get('message')}",
                    EXIT_JOB_FAILED,
                    code=err.get("code"),
                )
            files = download(http, job, args.out)
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except httpx.HTTPError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    qa = json.loads(files["qa"].read_text(encoding="utf-8"))
    model = (qa.get("model") or {}).get("kind", "generic")
    why = (qa.get("patient") or {}).get("generic_because")
    print(f"job {job['id']} succeeded ({model} model{f': {why}' if why else ''})")
    for line in qa_summary(qa):
        print("  " + line)
    for path in files.values():
        print(path)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
