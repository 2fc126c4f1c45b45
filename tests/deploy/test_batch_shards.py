"""Sharding of `jrs batch` (--shard-index/--shard-count), which the chart's Indexed Job uses.

Rows point at missing folders and use the iterative method, so each fails at once without a model.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from typer.testing import CliRunner

from jrs.core.errors import InvalidInput
from jrs.pipeline.batch import BatchRow, run_batch, select_shard, status_file_name
from jrs.pipeline.options import RecontourOptions

ITERATIVE = RecontourOptions(method="iterative")


def _manifest(path: Path, n: int) -> Path:
    lines = ["id,planning_ct,planning_rtstruct,daily_ct"]
    lines += [f"r{i},nope/ct,nope/rs.dcm,nope/daily{i}" for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _status(path: Path) -> dict[str, str]:
    with path.open(newline="") as fh:
        return {r["id"]: r["status"] for r in csv.DictReader(fh)}


def test_select_shard_is_round_robin_and_covers_every_row() -> None:
    rows = [BatchRow(f"r{i}", Path("a"), Path("b"), Path("c")) for i in range(7)]
    shards = [[r.id for r in select_shard(rows, i, 3)] for i in range(3)]
    assert shards == [["r0", "r3", "r6"], ["r1", "r4"], ["r2", "r5"]]
    assert select_shard(rows) == rows
    assert select_shard(rows[:2], 4, 5) == []
    with pytest.raises(InvalidInput, match=r"shard index 3 is outside 0\.\.2"):
        select_shard(rows, 3, 3)
    with pytest.raises(InvalidInput, match="shard index -1"):
        select_shard(rows, -1, 3)
    with pytest.raises(InvalidInput, match="shard count must be at least 1"):
        select_shard(rows, 0, 0)


def test_status_file_names() -> None:
    assert status_file_name() == "batch_status.csv"
    assert status_file_name(3, 12) == "batch_status.shard-00003-of-00012.csv"


def test_shards_run_disjoint_rows_with_their_own_status_files(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path / "m.csv", 5)
    out = tmp_path / "out"
    first = run_batch(manifest, out, ITERATIVE, shard_index=0, shard_count=2)
    second = run_batch(manifest, out, ITERATIVE, shard_index=1, shard_count=2)
    assert sorted(first.failed) == ["r0", "r2", "r4"]
    assert sorted(second.failed) == ["r1", "r3"]
    assert not (out / "batch_status.csv").exists()
    assert _status(out / "batch_status.shard-00000-of-00002.csv") == {
        "r0": "failed",
        "r2": "failed",
        "r4": "failed",
    }
    assert _status(out / "batch_status.shard-00001-of-00002.csv") == {
        "r1": "failed",
        "r3": "failed",
    }
    # resuming a shard skips what it recorded
    again = run_batch(manifest, out, ITERATIVE, shard_index=1, shard_count=2)
    assert sorted(again.skipped) == ["r1", "r3"] and not again.failed


def test_rows_done_by_another_shard_count_are_skipped(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path / "m.csv", 4)
    out = tmp_path / "out"
    out.mkdir()
    # an earlier run with 2 shards finished r0 and r2 (their outputs are there)
    (out / status_file_name(0, 2)).write_text("id,status\nr0,done\nr2,done\n")
    for row_id in ("r0", "r2"):
        (out / row_id).mkdir()
        (out / row_id / "qa.json").write_text("{}")
    summary = run_batch(manifest, out, ITERATIVE)
    assert sorted(summary.skipped) == ["r0", "r2"]
    assert sorted(summary.failed) == ["r1", "r3"]
    assert _status(out / "batch_status.csv") == {
        "r0": "done",
        "r2": "done",
        "r1": "failed",
        "r3": "failed",
    }
    # a "done" record without its outputs is run again
    (out / "r2" / "qa.json").unlink()
    rerun = run_batch(manifest, out, ITERATIVE, shard_index=0, shard_count=2)
    assert rerun.skipped == ["r0"] and list(rerun.failed) == ["r2"]


def test_cli_batch_shard_options(tmp_path: Path) -> None:
    from jrs.cli.main import app

    manifest = _manifest(tmp_path / "m.csv", 3)
    out = tmp_path / "out"
    runner = CliRunner()
    base = ["batch", "--manifest", str(manifest), "--out", str(out), "--method", "iterative"]
    result = runner.invoke(app, [*base, "--shard-index", "1", "--shard-count", "2"])
    assert result.exit_code == 1, result.output  # its one row fails
    assert "failed 1" in result.output
    assert "batch_status.shard-00001-of-00002.csv" in result.output
    assert _status(out / status_file_name(1, 2)) == {"r1": "failed"}

    bad = runner.invoke(app, [*base, "--shard-index", "2", "--shard-count", "2"])
    assert bad.exit_code == 2
    assert "shard index 2 is outside 0..1" in bad.output
    negative = runner.invoke(app, [*base, "--shard-count", "0"])
    assert negative.exit_code == 2
