"""``jrs batch --server URL``: a manifest re-contoured through a real service process.

Same real server as tests/service/test_client.py (real pipeline, bundled model, 5 mm network-box
margin, small phantom): one good row, one row the server refuses, then a resumed run.
"""

from __future__ import annotations

import csv
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from jrs.cli import app
from tests.service.test_client import (
    KEY,
    PhantomCase,
    Server,
    check_result,
    make_phantom_case,
    start_small_box_server,
    stop_server,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> PhantomCase:
    return make_phantom_case(tmp_path_factory.mktemp("phantom"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_small_box_server(tmp_path_factory.mktemp("server"))
    yield srv
    stop_server(srv)


def read_status(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as fh:
        return {r["id"]: r for r in csv.DictReader(fh)}


def test_batch_through_the_service_records_a_bad_row_and_resumes(
    server: Server, case: PhantomCase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a TPS-like export: CT slices and structure sets in one folder, the planning one named in
    # the manifest, another (the fraction's, another frame of reference) beside it
    export = tmp_path / "export"
    shutil.copytree(case.planning / "ct", export)
    shutil.copyfile(case.planning / "rtstruct.dcm", export / "RS.planning.dcm")
    shutil.copyfile(case.root / "fraction_1" / "rtstruct.dcm", export / "RS.other.dcm")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "id,planning_ct,planning_rtstruct,daily_ct\n"
        f"good,{export},{export / 'RS.planning.dcm'},{case.daily_ct}\n"
        # the daily CT given as the planning CT: its RTSTRUCT belongs to another frame
        f"bad,{case.daily_ct},{case.planning / 'rtstruct.dcm'},{case.daily_ct}\n"
    )
    out = tmp_path / "out"
    args = ["batch", "--manifest", str(manifest), "--out", str(out), "--server", server.url]
    monkeypatch.delenv("JRS_API_KEY", raising=False)

    result = CliRunner().invoke(app, [*args, "--api-key", KEY, "--workers", "2"])
    assert result.exit_code == 1, result.output
    assert "done 1, skipped 0 (earlier runs), failed 1" in result.output
    status = read_status(out / "batch_status.csv")
    assert status["good"]["status"] == "done" and status["good"]["error_code"] == ""
    assert status["bad"]["status"] == "failed"
    assert status["bad"]["error_code"] == "geometry_mismatch"
    # the server's message and request id, naming the upload
    assert "HTTP 422 geometry_mismatch: planning" in status["bad"]["error"]
    assert "request id" in status["bad"]["error"]
    check_result(out / "good", case)
    assert not (out / "bad").exists()

    # resumed (key from JRS_API_KEY): nothing sent again, done and failed rows skipped
    stamp = (out / "good" / "qa.json").stat().st_mtime_ns
    monkeypatch.setenv("JRS_API_KEY", KEY)
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "done 0, skipped 2 (earlier runs), failed 0" in again.output
    assert (out / "good" / "qa.json").stat().st_mtime_ns == stamp
    assert read_status(out / "batch_status.csv") == status


def test_batch_refuses_a_wrong_key_before_touching_any_row(
    server: Server, case: PhantomCase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JRS_API_KEY", raising=False)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "planning_ct,planning_rtstruct,daily_ct\n"
        f"{case.planning / 'ct'},{case.planning / 'rtstruct.dcm'},{case.daily_ct}\n"
    )
    out = tmp_path / "out"
    base = ["batch", "--manifest", str(manifest), "--out", str(out), "--server", server.url]
    result = CliRunner().invoke(app, [*base, "--api-key", "wrong"])
    assert result.exit_code == 1
    assert "HTTP 401 unauthorized: invalid API key" in result.output
    assert "--api-key or JRS_API_KEY" in result.output
    assert not (out / "batch_status.csv").exists()

    dead = CliRunner().invoke(app, [*base[:-1], "http://127.0.0.1:9", "--api-key", KEY])
    assert dead.exit_code == 1 and "cannot connect" in dead.output


def test_run_batch_with_a_row_runner_uses_threads_and_survives_a_raising_runner(
    tmp_path: Path,
) -> None:
    """`run_batch(row_runner=...)` without a server: threads, a raising runner recorded."""
    import threading

    from jrs.pipeline.batch import BatchRow, run_batch

    manifest = tmp_path / "m.csv"
    row = "planning/ct,planning/rtstruct.dcm,daily/ct"  # never read: the runner is a stand-in
    manifest.write_text(f"id,planning_ct,planning_rtstruct,daily_ct\na,{row}\nb,{row}\nc,{row}\n")
    threads: set[str] = set()

    def runner(r: BatchRow, out: Path) -> tuple[str, float, str, str]:
        threads.add(threading.current_thread().name)
        if r.id == "b":
            raise RuntimeError("boom")
        (out / r.id).mkdir()
        (out / r.id / "qa.json").write_text("{}")
        return "done", 0.1, "", ""

    summary = run_batch(manifest, tmp_path / "out", workers=2, row_runner=runner)
    assert sorted(summary.done) == ["a", "c"]
    assert "boom" in summary.failed["b"]
    assert read_status(tmp_path / "out" / "batch_status.csv")["b"]["error_code"] == (
        "internal_error"
    )
    assert threading.current_thread().name not in threads
