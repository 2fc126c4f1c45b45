"""Bad uploads are refused at once with the right 4xx and a message naming the problem."""

from __future__ import annotations

import io
import stat
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from jrs.core.errors import InvalidInput, PayloadTooLarge
from jrs.service.app import create_app
from jrs.service.unpack import UnpackBudget, extract_zip
from jrs.service.upload_limits import UploadLimits, safe_name
from tests.service.conftest import AUTH, Case, FakeRunner, make_settings, multipart, read_zip_bytes

BOMB_BYTES = 20 * 1024 * 1024


def _symlink_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo("ct/link.dcm")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


def _bomb_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ct/slice.dcm", b"\x00" * BOMB_BYTES)
    return buf.getvalue()


def _truncated(case: Case) -> list[tuple[str, bytes]]:
    files = [(p.name, p.read_bytes()) for p in case.files(case.planning)]
    name, data = files[3]
    files[3] = (name, data[: len(data) // 2])
    return files


# (id, planning, daily, status, code, words expected in the detail)
BAD: list[tuple[str, Callable[[Case], list], Callable[[Case], list], int, str, list[str]]] = [
    (
        "non_zip_non_dicom",
        lambda c: [("notes.txt", b"just some text, not DICOM")],
        lambda c: [c.daily_zip],
        422,
        "invalid_input",
        ["notes.txt", "neither a zip archive nor a DICOM file"],
    ),
    (
        "corrupt_dicom",
        _truncated,
        lambda c: [c.daily_zip],
        422,
        "invalid_input",
        ["planning", "CT.0004.dcm", "truncated"],
    ),
    (
        "mr_instead_of_ct",
        lambda c: [c.planning_zip],
        lambda c: c.files(c.mr_daily),
        415,
        "unsupported_data",
        ["daily", "MR"],
    ),
    (
        "no_rtstruct",
        lambda c: c.files(c.planning / "ct"),
        lambda c: [c.daily_zip],
        422,
        "invalid_input",
        ["no RTSTRUCT", "planning"],
    ),
    (
        "rtstruct_of_another_frame",
        lambda c: [*c.files(c.planning / "ct"), c.foreign_rtstruct],
        lambda c: [c.daily_zip],
        422,
        "geometry_mismatch",
        ["planning", "frame of reference"],
    ),
    (
        "oversize",
        lambda c: [("big.dcm", b"\x00" * 128 + b"DICM" + b"\x01" * (4 * 1024 * 1024))],
        lambda c: [c.daily_zip],
        413,
        "payload_too_large",
        ["upload too large", "JRS_MAX_UPLOAD_BYTES"],
    ),
    (
        "zip_bomb",
        lambda c: [("planning.zip", _bomb_zip())],
        lambda c: [c.daily_zip],
        413,
        "payload_too_large",
        ["ct/slice.dcm", "zip bomb"],
    ),
    (
        "path_traversal",
        lambda c: [("planning.zip", read_zip_bytes({"../../evil.dcm": b"x"}))],
        lambda c: [c.daily_zip],
        422,
        "invalid_input",
        ["'../../evil.dcm'", "path traversal"],
    ),
    (
        "absolute_path",
        lambda c: [("planning.zip", read_zip_bytes({"/etc/evil.dcm": b"x"}))],
        lambda c: [c.daily_zip],
        422,
        "invalid_input",
        ["'/etc/evil.dcm'", "absolute path"],
    ),
    (
        "symlink",
        lambda c: [("planning.zip", _symlink_zip())],
        lambda c: [c.daily_zip],
        422,
        "invalid_input",
        ["'ct/link.dcm'", "symbolic link"],
    ),
    (
        "corrupt_zip",
        lambda c: [("planning.zip", c.planning_zip.read_bytes()[:-200])],
        lambda c: [c.daily_zip],
        422,
        "invalid_input",
        ["planning.zip", "corrupt zip"],
    ),
    (
        "empty_daily",
        lambda c: [c.planning_zip],
        lambda c: [("daily.zip", read_zip_bytes({"readme.txt": b"nothing here"}))],
        422,
        "invalid_input",
        ["daily", "no DICOM image slices"],
    ),
]


@pytest.mark.parametrize(
    ("planning", "daily", "status", "code", "words"),
    [pytest.param(*row[1:], id=row[0]) for row in BAD],
)
def test_bad_upload_is_refused_at_once(
    client: TestClient, case: Case, runner: FakeRunner, planning, daily, status, code, words
) -> None:
    r = client.post("/v1/recontour", headers=AUTH, files=multipart(planning(case), daily(case)))
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == code, body
    for word in words:
        assert word in body["detail"], (word, body["detail"])
    assert "/tmp" not in body["detail"] and "jobs/" not in body["detail"]  # no server paths
    assert runner.calls == 0
    jobs_dir = client.app.state.settings.jobs_dir
    assert not any(jobs_dir.iterdir()), "a refused upload leaves nothing behind"
    assert client.app.state.store.jobs() == []
    assert client.get("/health/ready").status_code == 200


def test_service_stays_up_and_good_jobs_pass_after_bad_ones(client: TestClient, case: Case) -> None:
    for _, planning, daily, status, _, _ in BAD:
        r = client.post("/v1/recontour", headers=AUTH, files=multipart(planning(case), daily(case)))
        assert r.status_code == status
    r = client.post(
        "/v1/recontour", headers=AUTH, files=multipart([case.planning_zip], [case.daily_zip])
    )
    assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
    # files of several series folders and the RTSTRUCT sent as separate parts also work
    files = multipart(case.files(case.planning), case.files(case.daily))
    r = client.post("/v1/recontour", headers=AUTH, files=files)
    assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text


def test_malformed_requests(client: TestClient, case: Case) -> None:
    r = client.post("/v1/recontour", headers=AUTH, json={"planning": "x"})
    assert r.status_code == 422 and "multipart/form-data" in r.json()["detail"]
    r = client.post("/v1/recontour", headers=AUTH, files=multipart([case.planning_zip], []))
    assert r.status_code == 422 and "missing file field 'daily'" in r.json()["detail"]
    files = [*multipart([case.planning_zip], [case.daily_zip]), ("extra", ("x.dcm", b"x", "a/b"))]
    r = client.post("/v1/recontour", headers=AUTH, files=files)
    assert r.status_code == 422 and "unknown form field 'extra'" in r.json()["detail"]
    r = client.post(
        "/v1/recontour",
        headers=AUTH,
        files=multipart([case.planning_zip], [case.daily_zip]),
        data={"daily": "text"},
    )
    assert r.status_code == 422 and "must be a file upload" in r.json()["detail"]


def test_file_and_entry_count_limits(tmp_path: Path, case: Case) -> None:
    app = create_app(make_settings(tmp_path, max_files=25, max_zip_entries=10), FakeRunner())
    with TestClient(app) as client:
        r = client.post(
            "/v1/recontour", headers=AUTH, files=multipart([case.planning_zip], [case.daily_zip])
        )
        assert r.status_code == 413 and "JRS_MAX_ZIP_ENTRIES" in r.json()["detail"]
        files = multipart(case.files(case.planning), case.files(case.daily))
        r = client.post("/v1/recontour", headers=AUTH, files=files)
        assert r.status_code == 413 and "too many files" in r.json()["detail"]


# ------------------------------------------------------------------------------ zip guards
def _limits(**kw: int | float) -> UploadLimits:
    values: dict = {
        "max_upload_bytes": 10**9,
        "max_files": 1000,
        "max_zip_entries": 1000,
        "max_compression_ratio": 100.0,
        "max_extracted_bytes": 10**9,
    }
    values.update(kw)
    return UploadLimits(**values)


def test_zip_with_lying_sizes_is_refused(tmp_path: Path) -> None:
    """A header declaring 1000 bytes for an entry inflating to 20 MB never writes 20 MB."""
    data = bytearray(_bomb_zip())
    assert data[:4] == b"PK\x03\x04"
    struct.pack_into("<I", data, 22, 1000)  # local header: uncompressed size
    central = data.index(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 24, 1000)  # central directory: uncompressed size
    path = tmp_path / "liar.zip"
    path.write_bytes(bytes(data))
    with pytest.raises(InvalidInput, match="ct/slice.dcm"):
        extract_zip(path, tmp_path / "out", "planning: 'liar.zip'", UnpackBudget(_limits()))
    written = sum(p.stat().st_size for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert written <= 1000


def test_archive_ratio_and_extracted_size_limits(tmp_path: Path) -> None:
    path = tmp_path / "many.zip"
    path.write_bytes(read_zip_bytes({f"s{k}.dcm": b"\x00" * 1_000_000 for k in range(10)}))
    with pytest.raises(PayloadTooLarge, match="the archive expands"):
        extract_zip(path, tmp_path / "a", "x", UnpackBudget(_limits()))
    with pytest.raises(PayloadTooLarge, match="JRS_MAX_EXTRACTED_BYTES"):
        extract_zip(path, tmp_path / "b", "x", UnpackBudget(_limits(max_extracted_bytes=5_000_000)))
    # with a permissive ratio it unpacks, keeping (safe) entry names
    n = extract_zip(path, tmp_path / "c", "x", UnpackBudget(_limits(max_compression_ratio=10_000)))
    assert n == 10 and (tmp_path / "c" / "s3.dcm").stat().st_size == 1_000_000


def test_safe_name() -> None:
    assert safe_name("../../etc/passwd") == "passwd"
    assert safe_name("C:\\x\\CT 1.dcm") == "CT 1.dcm"
    assert safe_name("..") == "file" and safe_name("") == "file"
    assert safe_name("a\x00b;rm -rf") == "a_b_rm -rf"


def test_streamed_body_without_length_is_cut_at_the_limit(client: TestClient) -> None:
    boundary = "jrsboundary"
    sent = {"bytes": 0}

    def body():
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="planning"; filename="a.dcm"\r\n'
            "Content-Type: application/dicom\r\n\r\n"
        ).encode()
        yield head
        for _ in range(64):  # 64 MiB offered, limit is 3 MiB
            sent["bytes"] += 1024 * 1024
            yield b"\x00" * (1024 * 1024)

    r = client.post(
        "/v1/recontour",
        headers={**AUTH, "Content-Type": f"multipart/form-data; boundary={boundary}"},
        content=body(),
    )
    assert r.status_code == 413 and "upload too large" in r.json()["detail"]
    assert not any(client.app.state.settings.jobs_dir.iterdir())
