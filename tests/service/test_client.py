"""The example client (examples/client.py) and the product client (jrs.cli.remote).

The end-to-end tests start a real uvicorn process running the real pipeline with the bundled
model on a small phantom (128 x 128 matrix, 5 mm slices). To keep a job near 20 s on 2 CPU cores
the server's runner uses a 5 mm network-box margin instead of the default 30 mm (the network time
grows with the box in mm, whatever the CT matrix); `test_jrs_serve_unmodified_with_the_cli_script`
(slow) runs the shipped ``jrs serve`` as it is. The back-off and error paths are tested without a
server, on httpx's mock transport.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pydicom
import pytest

from jrs.cli import remote
from jrs.core.errors import InvalidInput
from jrs.core.metrics import dice
from jrs.io.rtstruct import masks_from_files, read_rtstruct
from jrs.synth import ROI_NAMES, generate_fraction, generate_patient, write_fraction
from jrs.synth import write_patient as write_planning

ROOT = Path(__file__).resolve().parents[2]
KEY = "client-test-key-0123456789"

#: A real service process: `jrs serve` (uvicorn) with the real pipeline and the bundled model,
#: the network box margin reduced with JRS_MARGIN_MM so that a CPU job takes seconds.
SMALL_BOX_MARGIN_MM = "5"


def load_example_client() -> ModuleType:
    """examples/client.py is a standalone script, not a package module: load it by path."""
    spec = importlib.util.spec_from_file_location(
        "jrs_example_client", ROOT / "examples" / "client.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


client = load_example_client()


@dataclass
class PhantomCase:
    root: Path
    planning: Path  # planning/{ct/, rtstruct.dcm}
    daily_ct: Path
    truth: dict[str, Any]  # ROI name -> daily ground-truth mask


def make_phantom_case(root: Path) -> PhantomCase:
    """A small phantom: 128 x 128 matrix (3.5 mm pixels), 5 mm slices, about 37 slices."""
    patient = generate_patient(7, matrix=128, slice_thickness=5.0)
    fraction = generate_fraction(patient, 1)
    write_planning(patient, root)
    write_fraction(fraction, root / "fraction_1")
    return PhantomCase(root, root / "planning", root / "fraction_1" / "ct", fraction.structures)


@pytest.fixture(scope="module")
def phantom_case(tmp_path_factory: pytest.TempPathFactory) -> PhantomCase:
    return make_phantom_case(tmp_path_factory.mktemp("phantom"))


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path


def start_server(
    folder: Path,
    argv: list[str],
    timeout_s: float = 180.0,
    extra_env: dict[str, str] | None = None,
) -> Server:
    """Start a service process (cwd `folder`, so no .env is read) and wait until it is ready."""
    from jrs.cli.service_bench import free_port

    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("JRS_")}
    env.update(
        JRS_API_KEYS=KEY,
        JRS_DATA_DIR=str(folder / "data"),
        JRS_DEVICE="cpu",
        JRS_LOG_LEVEL="WARNING",
        JRS_QUEUE_SIZE="4",
        PYTHONPATH=str(ROOT),
    )
    env.update(extra_env or {})
    log = folder / "server.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, *[a.replace("{port}", str(port)) for a in argv]],
            cwd=folder,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/health/ready", timeout=5).status_code == 200:
                return Server(url, proc, log)
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the service did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.25)


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(60)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait(10)


def start_small_box_server(folder: Path) -> Server:
    """`jrs serve` with the bundled model and a 5 mm network-box margin (JRS_MARGIN_MM)."""
    argv = ["-m", "jrs.cli", "serve", "--host", "127.0.0.1", "--port", "{port}"]
    return start_server(folder, argv, extra_env={"JRS_MARGIN_MM": SMALL_BOX_MARGIN_MM})


@pytest.fixture(scope="module")
def real_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_small_box_server(tmp_path_factory.mktemp("server"))
    yield server
    stop_server(server)


def check_result(out: Path, case: PhantomCase) -> None:
    """The downloaded artefacts are complete and the contours fit the phantom's truth."""
    for name in ("rtstruct.dcm", "dvf.mha", "registration.dcm", "qa.json", "review.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not list(out.glob("*.part"))
    assert (out / "review.png").read_bytes()[:4] == b"\x89PNG"
    assert pydicom.dcmread(out / "registration.dcm", stop_before_pixels=True).Modality == "REG"
    structure_set = read_rtstruct(out / "rtstruct.dcm")
    assert {roi.name for roi in structure_set.rois} == set(ROI_NAMES)
    _, _, masks = masks_from_files(case.daily_ct, out / "rtstruct.dcm")
    for organ in ("Prostate", "Bladder"):
        assert masks[organ].array.sum() > 0, organ
        score = dice(masks[organ].array, case.truth[organ])
        assert score > 0.5, (organ, score)


# ------------------------------------------------------------------------------ real server
@pytest.mark.integration
def test_example_client_recontours_a_phantom_through_a_real_server(
    real_server: Server, phantom_case: PhantomCase, tmp_path: Path
) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=real_server.url, headers=headers, timeout=60) as http:
        # planning: the folder with the CT series and the RTSTRUCT; daily: the CT folder;
        # no server-side wait, so the job is polled
        job, hint = client.submit(http, [phantom_case.planning], [phantom_case.daily_ct], wait_s=0)
        assert job["status"] in ("queued", "running", "succeeded")
        job = client.wait_for_job(http, job, timeout_s=300, first_delay_s=hint, max_poll_s=2)
        assert job["status"] == "succeeded", job
        assert job["qa"]["model"]["name"] == "crossstitch"
        files = client.download(http, job, tmp_path / "out")
    assert set(files) == {"rtstruct", "dvf", "registration", "review", "qa"}
    check_result(tmp_path / "out", phantom_case)


@pytest.mark.integration
def test_cli_exit_codes_and_server_messages(
    real_server: Server, phantom_case: PhantomCase, tmp_path: Path
) -> None:
    script = [sys.executable, str(ROOT / "examples" / "client.py"), "--url", real_server.url]
    case = ["--planning", str(phantom_case.planning), "--out", str(tmp_path / "o")]
    env = {k: v for k, v in os.environ.items() if k != "JRS_API_KEY"}

    def run(*args: str, key: str | None = KEY) -> subprocess.CompletedProcess[str]:
        e = {**env, "JRS_API_KEY": key} if key else env
        return subprocess.run([*script, *args], capture_output=True, text=True, env=e, timeout=120)

    # daily upload without a CT series: 422 with the server's detail and request id
    p = run(*case, "--daily", str(phantom_case.planning / "rtstruct.dcm"))
    assert p.returncode == 2, p.stderr
    assert "HTTP 422 invalid_input: daily:" in p.stderr and "request id" in p.stderr
    # wrong key (from JRS_API_KEY): 401
    p = run(*case, "--daily", str(phantom_case.daily_ct), key="wrong-key")
    assert p.returncode == 3 and "HTTP 401 unauthorized: invalid API key" in p.stderr
    # no key at all: refused before any request
    p = run(*case, "--daily", str(phantom_case.daily_ct), key=None)
    assert p.returncode == 3 and "no API key" in p.stderr
    # a path that does not exist
    p = run(*case, "--daily", str(tmp_path / "missing"))
    assert p.returncode == 2 and "no such file or folder" in p.stderr


@pytest.mark.integration
def test_product_client_check_and_errors(real_server: Server, tmp_path: Path) -> None:
    with remote.ServiceClient(real_server.url, KEY) as c:
        ready = c.check()
        assert ready["status"] == "ready"
        with pytest.raises(remote.ServiceError) as err:
            c.job("f" * 32)
        assert err.value.status == 404 and err.value.code == "not_found"
        assert err.value.request_id and err.value.request_id in err.value.message
    with (
        remote.ServiceClient(real_server.url, "wrong") as c,
        pytest.raises(remote.ServiceError) as e,
    ):
        c.check()
    assert e.value.status == 401 and "--api-key or JRS_API_KEY" in e.value.message


@pytest.mark.slow
@pytest.mark.integration
def test_jrs_serve_unmodified_with_the_cli_script(
    phantom_case: PhantomCase, tmp_path: Path
) -> None:
    """The shipped ``jrs serve`` (default runner, 30 mm margin: ~70-100 s a job on 2 cores)."""
    server = start_server(
        tmp_path / "srv", ["-m", "jrs.cli", "serve", "--host", "127.0.0.1", "--port", "{port}"]
    )
    try:
        out = tmp_path / "out"
        p = subprocess.run(
            [
                sys.executable,
                str(ROOT / "examples" / "client.py"),
                "--url",
                server.url,
                "--api-key",
                KEY,
                "--planning",
                str(phantom_case.planning / "ct"),
                str(phantom_case.planning / "rtstruct.dcm"),
                "--daily",
                str(phantom_case.daily_ct),
                "--out",
                str(out),
                "--wait",
                "10",
            ],
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert p.returncode == 0, p.stderr
        assert "succeeded" in p.stdout and "Prostate" in p.stdout
    finally:
        stop_server(server)
    check_result(out, phantom_case)


# ------------------------------------------------------------------------------ no server
class Script:
    """An httpx mock transport answering from a list of (method, path prefix) -> responses."""

    def __init__(self, answers: list[tuple[str, str, Callable[[httpx.Request], httpx.Response]]]):
        self.answers = answers
        self.seen: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(f"{request.method} {request.url.path}")
        method, prefix, answer = self.answers.pop(0)
        assert request.method == method and request.url.path.startswith(prefix), self.seen
        return answer(request)


JOB_ID = "a" * 32
QUEUED = {"id": JOB_ID, "status": "queued", "links": {"job": f"/v1/jobs/{JOB_ID}"}}
DONE = {
    "id": JOB_ID,
    "status": "succeeded",
    "links": {
        "job": f"/v1/jobs/{JOB_ID}",
        "rtstruct": f"/v1/jobs/{JOB_ID}/rtstruct",
        "qa": f"/v1/jobs/{JOB_ID}/qa",
    },
}


def busy(_: httpx.Request) -> httpx.Response:
    body = {"error": "service_busy", "detail": "the job queue is full", "request_id": "r1"}
    return httpx.Response(503, json=body, headers={"Retry-After": "7"})


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    slept: list[float] = []
    for module in (client, remote):
        monkeypatch.setattr(module.time, "sleep", slept.append)
    return slept


@pytest.fixture
def upload(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "planning").mkdir()
    (tmp_path / "planning" / "a.dcm").write_bytes(b"x")
    (tmp_path / "daily.zip").write_bytes(b"PK\x05\x06" + b"\x00" * 18)
    return tmp_path / "planning", tmp_path / "daily.zip"


def test_example_client_retries_503_after_retry_after_and_polls_with_backoff(
    sleeps: list[float], upload: tuple[Path, Path], tmp_path: Path
) -> None:
    fields: list[list[str]] = []

    def accepted(request: httpx.Request) -> httpx.Response:
        body = request.read()
        fields.append([f for f in ("planning", "daily") if f'name="{f}"'.encode() in body])
        assert request.headers["authorization"] == "Bearer k"
        assert request.url.params["wait"] == "false"
        return httpx.Response(202, json=QUEUED, headers={"Retry-After": "3"})

    script = Script(
        [
            ("POST", "/v1/recontour", busy),
            ("POST", "/v1/recontour", accepted),
            ("GET", f"/v1/jobs/{JOB_ID}", lambda r: httpx.Response(200, json=QUEUED)),
            (
                "GET",
                f"/v1/jobs/{JOB_ID}",
                lambda r: httpx.Response(503, headers={"Retry-After": "5"}),
            ),
            ("GET", f"/v1/jobs/{JOB_ID}", lambda r: httpx.Response(200, json=QUEUED)),
            ("GET", f"/v1/jobs/{JOB_ID}", lambda r: httpx.Response(200, json=DONE)),
            ("GET", f"/v1/jobs/{JOB_ID}/rtstruct", lambda r: httpx.Response(200, content=b"RT")),
            ("GET", f"/v1/jobs/{JOB_ID}/qa", lambda r: httpx.Response(200, json={"x": 1})),
        ]
    )
    transport = httpx.MockTransport(script)
    headers = {"Authorization": "Bearer k"}
    with httpx.Client(base_url="http://jrs", headers=headers, transport=transport) as http:
        job, hint = client.submit(http, [upload[0]], [upload[1]], wait_s=0)
        assert hint == 3.0
        job = client.wait_for_job(http, job, timeout_s=100, first_delay_s=hint)
        files = client.download(http, job, tmp_path / "out")
    assert fields == [["planning", "daily"]]
    # 503 -> its Retry-After (7); then the 202's Retry-After (3), back-off 1.5, the 503's 5, 3.375
    assert sleeps == [7.0, 3.0, 1.5, 5.0, 3.375]
    assert (tmp_path / "out" / "rtstruct.dcm").read_bytes() == b"RT"
    assert set(files) == {"rtstruct", "qa"}


def test_example_client_gives_up_and_reports_the_server_message(
    sleeps: list[float], upload: tuple[Path, Path]
) -> None:
    # Retry-After 7 s is past a 5 s busy timeout: give up at once with the server's words
    transport = httpx.MockTransport(Script([("POST", "/v1/recontour", busy)]))
    http = httpx.Client(base_url="http://jrs", transport=transport)
    with http, pytest.raises(client.ClientError) as err:
        client.submit(http, [upload[0]], [upload[1]], busy_timeout_s=5)
    assert err.value.exit_code == client.EXIT_UNAVAILABLE
    assert str(err.value) == (
        "POST /v1/recontour: HTTP 503 service_busy: the job queue is full (request id r1)"
    )
    assert sleeps == []

    polls = Script([("GET", "/v1/jobs", lambda r: httpx.Response(200, json=QUEUED))] * 50)
    http = httpx.Client(base_url="http://jrs", transport=httpx.MockTransport(polls))
    with http, pytest.raises(client.ClientError) as err:
        client.wait_for_job(http, QUEUED, timeout_s=0)
    assert err.value.exit_code == client.EXIT_TIMEOUT and JOB_ID in str(err.value)


def test_product_client_failed_job_and_busy_retry(
    sleeps: list[float], upload: tuple[Path, Path], tmp_path: Path
) -> None:
    failed = {
        **QUEUED,
        "status": "failed",
        "error": {"code": "geometry_mismatch", "message": "planning: frame of reference"},
    }
    storage_full = {"error": "storage_full", "detail": "less than JRS_MIN_FREE_BYTES free"}
    script = Script(
        [
            ("POST", "/v1/recontour", busy),
            (
                "POST",
                "/v1/recontour",
                lambda r: httpx.Response(507, json=storage_full, headers={"Retry-After": "4"}),
            ),
            ("POST", "/v1/recontour", lambda r: httpx.Response(202, json=QUEUED)),
            ("GET", f"/v1/jobs/{JOB_ID}", lambda r: httpx.Response(200, json=failed)),
        ]
    )
    c = remote.ServiceClient("http://jrs", "k", transport=httpx.MockTransport(script))
    with c, pytest.raises(remote.JobFailed) as err:
        c.recontour([upload[0]], [upload[1]], tmp_path / "out", wait_s=0)
    assert err.value.code == "geometry_mismatch"
    assert "planning: frame of reference" in err.value.message
    assert sleeps == [7.0, 4.0, 1.0]  # 503 and 507 (storage full) are both retried later
    assert not (tmp_path / "out").exists()


def test_write_zip_skips_duplicates_and_filtered_files(tmp_path: Path) -> None:
    import zipfile

    ct = tmp_path / "ct"
    ct.mkdir()
    for name in ("1.dcm", "2.dcm", "RS.other.dcm"):
        (ct / name).write_bytes(name.encode())
    with (tmp_path / "z.zip").open("wb") as fh:
        n = remote.write_zip([ct, ct / "1.dcm"], fh, skip=lambda p: p.name.startswith("RS."))
    assert n == 2
    assert sorted(zipfile.ZipFile(tmp_path / "z.zip").namelist()) == ["ct/1.dcm", "ct/2.dcm"]
    with pytest.raises(InvalidInput, match="no such file"):
        remote.write_zip([tmp_path / "nope"], (tmp_path / "y.zip").open("wb"))
